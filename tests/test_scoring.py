"""LLM relevance scoring (pipeline/llm/scoring.py, python_steps/llm_scores.py) on a tiny GPT-2.

The scorer's batched, prefix-cached scores are checked against a plain reference written here:
each full prompt through the model on its own, log-softmax, gather. The tiny model comes in two
flavours, with and without a chat template, since the prompt's special tokens and the answer
position differ between them.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline.llm.cache import LLMCache
from pipeline.llm.scoring import PROMPT_FILE, ScoreTemplate, rank_scores, score_relevance
from pipeline.llm.transformers_backend import PrefixScorer
from pipeline.params import BaseParams, LLMParams, ScoreParams

ROOT = Path(__file__).resolve().parent.parent
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASK = "Given a question, retrieve passages that answer the question"
PASSAGES = {
    "p1": ("Bees", "Forager bees tell their nestmates where food is with the waggle dance."),
    "p2": (None, "The venv module creates a lightweight virtual environment with its own site-packages."),
    "p3": ("Kilimanjaro", "Kilimanjaro is the highest mountain in Africa. " * 12),  # cut at max_passage_tokens
    "p4": ("Vitamin C", "Vitamin C supplements did not reduce how often people caught colds."),
}
QUERIES = {
    "q1": "how do bees tell other bees where food is",
    "q2": "python venv activate",
    "q3": "highest mountain in africa?",
}
# (query, passage, knn_rank): p1 and p3 are retrieved by several queries, p4 by one.
PAIRS = [
    ("q1", "p1", 1), ("q1", "p3", 2), ("q1", "p2", 3),
    ("q2", "p2", 1), ("q2", "p1", 2),
    ("q3", "p3", 1), ("q3", "p1", 2), ("q3", "p4", 3),
]  # fmt: skip


def _train_texts() -> list[str]:
    texts = [ROOT.joinpath(PROMPT_FILE).read_text(), TASK] + ["Yes No yes no\nYes. No. yes. no."] * 20
    texts += [f"{t or ''} {x}" for t, x in PASSAGES.values()] + list(QUERIES.values())
    return texts * 3


def _build_tiny_gpt2(folder: Path, chat: bool) -> Path:
    """Random-init 2-layer GPT-2 (width 32) with a byte-level BPE tokenizer trained on the test texts."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_train_texts(), vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                        initializer_range=0.3)  # wide init: log-probs differ clearly between passages
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["plain", "chat"])
def tiny_llm_dir(request, tmp_path_factory) -> Path:
    return _build_tiny_gpt2(tmp_path_factory.mktemp(f"tiny_gpt2_{request.param}"), request.param == "chat")


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir):
    from pipeline.llm import load_llm

    return load_llm(LLMParams(model=str(tiny_llm_dir), dtype="float32", cache_path=None), BaseParams(threads=1, device="cpu"))


@pytest.fixture(scope="session")
def template() -> ScoreTemplate:
    return ScoreTemplate(ROOT / PROMPT_FILE)


def make_pairs() -> pa.Table:
    rows = [
        {"query_id": q, "passage_id": p, "knn_rank": k, "task": TASK, "query": QUERIES[q],
         "title": PASSAGES[p][0], "text": PASSAGES[p][1]}
        for q, p, k in PAIRS
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)


PARAMS = ScoreParams(batch_size=3, max_passage_tokens=40)


def reference_scores(llm, template: ScoreTemplate, title, text, query) -> tuple[float, float, float]:
    """(ql_sum, ql_mean, rc_logodds) the plain way: one full prompt per forward pass."""
    import torch

    from pipeline.llm.scoring import clip_tokens

    text = clip_tokens(llm.tokenizer, text, PARAMS.max_passage_tokens)
    with torch.inference_mode():
        prompt, start = template.query_likelihood(llm, title, text, TASK, query)
        head, ids = llm.encode(prompt[:start]), llm.encode(prompt)
        assert ids[: len(head)] == head  # the query's tokens are exactly the ones after the head's
        logprobs = torch.log_softmax(llm.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        token_lp = [float(logprobs[i - 1, ids[i]]) for i in range(len(head), len(ids))]
        ids = llm.encode(template.relevance(llm, title, text, TASK, query))
        last = torch.log_softmax(llm.model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)

    def single_tokens(words):
        spellings = [s for w in words for s in (w, " " + w)]
        return {t[0] for t in (llm.tokenizer(s, add_special_tokens=False)["input_ids"] for s in spellings) if len(t) == 1}

    yes = math.log(sum(math.exp(float(last[i])) for i in single_tokens(template.yes_words)))
    no = math.log(sum(math.exp(float(last[i])) for i in single_tokens(template.no_words)))
    return sum(token_lp), sum(token_lp) / len(token_lp), yes - no


def test_scores_equal_the_plain_one_pair_computation(tiny_llm, template):
    scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    result = score_relevance(make_pairs(), tiny_llm, PARAMS, LLMCache(None), template, progress=False, scorer=scorer)
    rows = result.scores.to_pylist()
    assert len(rows) == len(PAIRS) and result.stats["computed"] == 2 * len(PAIRS)
    for row in rows:
        title, text = PASSAGES[row["passage_id"]]
        ql_sum, ql_mean, rc = reference_scores(tiny_llm, template, title, text, QUERIES[row["query_id"]])
        assert row["ql_sum"] == pytest.approx(ql_sum, abs=1e-4)
        assert row["ql_mean"] == pytest.approx(ql_mean, abs=1e-4)
        assert row["rc_logodds"] == pytest.approx(rc, abs=1e-4)
    # The passage prefix was shared: fewer tokens went through the model than the prompts hold.
    assert scorer.forward_tokens < 0.8 * scorer.prompt_tokens
    # Scores differ between passages (a constant score would pass any ranking test).
    assert len({round(r["ql_sum"], 6) for r in rows}) > 3 and len({round(r["rc_logodds"], 6) for r in rows}) > 3


def test_a_prompt_alone_reuses_all_of_its_prompt_but_the_scored_tokens(tiny_llm, template):
    """A passage with one prompt left to score (the rest cached) caches the longest prefix possible."""
    from pipeline.llm.scoring import build_requests

    scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    requests = build_requests(make_pairs().slice(0, 1), tiny_llm, PARAMS, template)  # q1/p1: QL, RC
    values = {}
    for request in requests:
        values.update(*scorer.score_group(scorer.tokenize([request]), batch_size=1))
    ql, rc = (values[r.key] for r in requests)
    ql_sum, ql_mean, rc_logodds = reference_scores(tiny_llm, template, *PASSAGES["p1"], QUERIES["q1"])
    assert ql["sum"] == pytest.approx(ql_sum, abs=1e-4) and ql["mean"] == pytest.approx(ql_mean, abs=1e-4)
    assert rc["logodds"] == pytest.approx(rc_logodds, abs=1e-4)
    assert scorer.forward_tokens == scorer.prompt_tokens  # prefix + tail, each token once


def test_pooled_passages_score_as_the_plain_computation_in_fewer_batches(tiny_llm, template):
    """score.min_shared_prompts: passages with few prompts are scored whole, batched across passages."""
    runs = {}
    for min_shared in (1, 100):  # every passage alone; every passage in one pool
        params = PARAMS.model_copy(update={"min_shared_prompts": min_shared})
        runs[min_shared] = score_relevance(make_pairs(), tiny_llm, params, LLMCache(None), template, progress=False)
    alone, pooled = runs[1], runs[100]
    assert pooled.stats["batches"] < alone.stats["batches"]  # 16 prompts: 6 batches of 3, not 7 (one group each)
    for a, b in zip(alone.scores.to_pylist(), pooled.scores.to_pylist()):
        assert (a["query_id"], a["passage_id"]) == (b["query_id"], b["passage_id"])
        title, text = PASSAGES[b["passage_id"]]
        ql_sum, ql_mean, rc = reference_scores(tiny_llm, template, title, text, QUERIES[b["query_id"]])
        assert b["ql_sum"] == pytest.approx(ql_sum, abs=1e-4) and b["ql_mean"] == pytest.approx(ql_mean, abs=1e-4)
        assert b["rc_logodds"] == pytest.approx(rc, abs=1e-4)
        assert b["ql_sum"] == pytest.approx(a["ql_sum"], abs=1e-4)


def test_the_pool_holds_every_small_passage_cached_or_not(tiny_llm, template):
    """A resumed run must cut the pool into the same batches: fully cached small passages stay in it."""
    from pipeline.llm.scoring import _work_units, build_requests

    scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    requests = build_requests(make_pairs(), tiny_llm, PARAMS, template)  # p1: 6 prompts, p2 4, p3 4, p4 2
    todo = [r for r in requests if r.passage_id == "p4"]  # only p4 left to score
    units = _work_units(scorer, requests, todo, min_shared=5)
    assert [sorted({r.passage_id for r in u}) for u in units] == [["p2", "p3", "p4"]]
    assert _work_units(scorer, requests, todo, min_shared=1) == [todo]
    assert _work_units(scorer, requests, [], min_shared=5) == []
    missing_p1 = [r for r in requests if r.passage_id == "p1"][:1]
    assert [len(u) for u in _work_units(scorer, requests, missing_p1, min_shared=5)] == [6]  # the pool is complete


def test_batch_size_does_not_change_scores(tiny_llm, template):
    one = score_relevance(make_pairs(), tiny_llm, ScoreParams(batch_size=1, max_passage_tokens=40), LLMCache(None),
                          template, progress=False).scores  # fmt: skip
    many = score_relevance(make_pairs(), tiny_llm, ScoreParams(batch_size=64, max_passage_tokens=40), LLMCache(None),
                           template, progress=False).scores  # fmt: skip
    for a, b in zip(one.to_pylist(), many.to_pylist()):
        assert (a["query_id"], a["passage_id"]) == (b["query_id"], b["passage_id"])
        assert a["ql_sum"] == pytest.approx(b["ql_sum"], abs=1e-4)
        assert a["rc_logodds"] == pytest.approx(b["rc_logodds"], abs=1e-4)


def test_answer_tokens_cover_both_spellings(tiny_llm, template):
    scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    decoded = {tiny_llm.tokenizer.decode([i]) for i in scorer.yes_ids}
    assert {"yes", "Yes"} <= decoded and decoded <= {"yes", "Yes", " yes", " Yes"}
    assert not set(scorer.yes_ids) & set(scorer.no_ids)


def test_ranks_within_query_with_ties():
    scores = pa.Table.from_pylist(
        [
            # qa: p2 and p3 tie on ql_sum -> the better knn_rank (p3, 1) first; rc all tied -> knn order.
            {"query_id": "qa", "passage_id": "p1", "knn_rank": 3, "ql_sum": -1.0, "rc_logodds": 0.5},
            {"query_id": "qa", "passage_id": "p2", "knn_rank": 2, "ql_sum": -2.0, "rc_logodds": 0.5},
            {"query_id": "qa", "passage_id": "p3", "knn_rank": 1, "ql_sum": -2.0, "rc_logodds": 0.5},
            # qb: ranks are per query, highest score first.
            {"query_id": "qb", "passage_id": "p1", "knn_rank": 1, "ql_sum": -9.0, "rc_logodds": -3.0},
            {"query_id": "qb", "passage_id": "p4", "knn_rank": 2, "ql_sum": -0.5, "rc_logodds": 2.0},
        ]
    )
    scores = scores.append_column("ql_mean", scores["ql_sum"]).append_column("ql_tokens", pa.array([1] * 5, pa.int32()))
    scores = scores.append_column("llm", pa.array(["m"] * 5)).append_column("prompt_hash", pa.array(["h"] * 5))
    ranked = {(r["query_id"], r["passage_id"]): (r["ql_rank"], r["rc_rank"]) for r in rank_scores(scores).to_pylist()}
    assert ranked == {
        ("qa", "p1"): (1, 3),
        ("qa", "p3"): (2, 1),
        ("qa", "p2"): (3, 2),
        ("qb", "p4"): (1, 1),
        ("qb", "p1"): (2, 2),
    }


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("methods", [["ql", "rc"], ["ql"]])
@pytest.mark.parametrize("min_shared", [3, 100], ids=["per-passage", "pooled"])
def test_resume_after_crash_redoes_no_finished_prompt(tiny_llm, template, tmp_path, methods, min_shared):
    params = PARAMS.model_copy(update={"methods": methods, "min_shared_prompts": min_shared})
    prompts = len(methods) * len(PAIRS)
    expected = score_relevance(make_pairs(), tiny_llm, params, LLMCache(None), template, progress=False).scores
    path = tmp_path / "llm.duckdb"
    first = PrefixScorer(tiny_llm, template.yes_words, template.no_words)

    def crash_after_one(batches: int) -> None:
        if batches == 1:  # QL + RC: passage p1 has 6 prompts = 2 batches, the crash falls inside its group
            raise Crash

    with LLMCache(path) as cache, pytest.raises(Crash):
        score_relevance(make_pairs(), tiny_llm, params, cache, template, progress=False,
                        on_batch=crash_after_one, scorer=first)  # fmt: skip
    assert 0 < first.forward_rows < prompts

    second = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    with LLMCache(path) as cache:
        resumed = score_relevance(make_pairs(), tiny_llm, params, cache, template, progress=False, scorer=second)
    assert second.forward_rows == prompts - first.forward_rows  # nothing finished is redone
    assert resumed.stats["cached"] == first.forward_rows

    third = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    with LLMCache(path) as cache:
        again = score_relevance(make_pairs(), tiny_llm, params, cache, template, progress=False, scorer=third)
    assert third.forward_rows == 0 and again.stats["cached"] == prompts
    # Bit for bit: the resumed prompts ran in the same batches, after the same prefix, as without the crash.
    assert again.scores.to_pylist() == expected.to_pylist()


@pytest.mark.parametrize("min_shared", [3, 100], ids=["per-passage", "pooled"])
def test_a_grown_run_scores_only_its_new_prompts(tiny_llm, template, tmp_path, min_shared):
    """More queries later (a larger generate.limit): stored prompts never run again, even when they
    sort into the same batch as new ones, and the new prompts score as the plain computation."""
    params = PARAMS.model_copy(update={"min_shared_prompts": min_shared})
    pairs = make_pairs()
    first_queries = pa.array([q != "q3" for q in pairs["query_id"].to_pylist()])
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        before = score_relevance(pairs.filter(first_queries), tiny_llm, params, cache, template, progress=False)
        scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
        grown = score_relevance(pairs, tiny_llm, params, cache, template, progress=False, scorer=scorer)
    new_prompts = 2 * sum(1 for q, _, _ in PAIRS if q == "q3")  # QL and RC of q3's three pairs
    assert grown.stats["cached"] == 2 * len(PAIRS) - new_prompts
    assert scorer.forward_rows == grown.stats["computed"] == new_prompts
    stored = {(r["query_id"], r["passage_id"]): r for r in before.scores.to_pylist()}
    for row in grown.scores.to_pylist():
        key = (row["query_id"], row["passage_id"])
        if key in stored:  # what was stored is read back as it was
            assert (row["ql_sum"], row["rc_logodds"]) == (stored[key]["ql_sum"], stored[key]["rc_logodds"])
            continue
        ql_sum, ql_mean, rc = reference_scores(tiny_llm, template, *PASSAGES[row["passage_id"]], QUERIES["q3"])
        assert row["ql_sum"] == pytest.approx(ql_sum, abs=1e-4) and row["ql_mean"] == pytest.approx(ql_mean, abs=1e-4)
        assert row["rc_logodds"] == pytest.approx(rc, abs=1e-4)


def test_editing_the_rc_prompt_keeps_ql_cached(tiny_llm, template, tmp_path):
    edited = tmp_path / "score.jinja"
    edited.write_text(template.source.replace("Answer yes or no.", "Reply yes or no."))
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        score_relevance(make_pairs(), tiny_llm, PARAMS, cache, template, progress=False)
        scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
        result = score_relevance(make_pairs(), tiny_llm, PARAMS, cache, ScoreTemplate(edited), progress=False,
                                 scorer=scorer)  # fmt: skip
    assert result.stats["cached"] == len(PAIRS) and scorer.forward_rows == len(PAIRS)  # the RC prompts only


def test_ql_only_scores_half_the_prompts_and_leaves_rc_null(tiny_llm, template, tmp_path):
    ql_only = PARAMS.model_copy(update={"methods": ["ql"]})
    both = score_relevance(make_pairs(), tiny_llm, PARAMS, LLMCache(None), template, progress=False).scores
    scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        result = score_relevance(make_pairs(), tiny_llm, ql_only, cache, template, progress=False, scorer=scorer)
    assert scorer.forward_rows == len(PAIRS) and result.stats["prompts"] == len(PAIRS)
    for row, full in zip(result.scores.to_pylist(), both.to_pylist()):
        assert (row["query_id"], row["passage_id"]) == (full["query_id"], full["passage_id"])
        assert row["rc_logodds"] is None and row["rc_rank"] is None
        assert row["ql_sum"] == pytest.approx(full["ql_sum"], abs=1e-4) and row["ql_rank"] == full["ql_rank"]


def test_switching_methods_reuses_the_cached_prompts(tiny_llm, template, tmp_path):
    ql_only = PARAMS.model_copy(update={"methods": ["ql"]})
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        score_relevance(make_pairs(), tiny_llm, ql_only, cache, template, progress=False)
        scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
        both = score_relevance(make_pairs(), tiny_llm, PARAMS, cache, template, progress=False, scorer=scorer)
        assert both.stats["cached"] == len(PAIRS) and scorer.forward_rows == len(PAIRS)  # only RC was scored
        scorer = PrefixScorer(tiny_llm, template.yes_words, template.no_words)
        again = score_relevance(make_pairs(), tiny_llm, ql_only, cache, template, progress=False, scorer=scorer)
    assert scorer.forward_rows == 0 and again.stats["cached"] == len(PAIRS)


@pytest.mark.parametrize("methods", [["ql", "ql"], ["bm25"]])
def test_methods_param_rejects_repeated_or_unknown(methods):
    with pytest.raises(ValueError, match="methods"):
        ScoreParams(methods=methods)


def make_project(
    root: Path, model_dir: Path, score: str = "{batch_size: 4, max_passage_tokens: 40}", orphans: tuple = ()
) -> None:
    """params.yaml, the prompt file and the three upstream stage files of a tiny project.

    `orphans`: more (query, passage, knn_rank) neighbor rows, whose query or passage is missing upstream.
    """
    from pipeline.warehouse import write_stage, write_table

    (root / "params.yaml").write_text(
        textwrap.dedent(
            f"""\
            base: {{threads: 1, device: cpu}}
            llm: {{model: {model_dir}, dtype: float32, cache_path: cache/llm.duckdb}}
            score: {score}
            """
        )
    )
    passages = pa.Table.from_pylist(
        [{"passage_id": p, "doc_id": p, "title": t, "text": x, "n_words": len(x.split()), "source": "c"}
         for p, (t, x) in PASSAGES.items()]
    )  # fmt: skip
    queries = pa.Table.from_pylist(
        [{"query_id": q, "passage_id": "p1", "task_type": "question answering", "task": TASK, "query": text,
          "llm": "tiny", "prompt_hash": "h"} for q, text in QUERIES.items()]
    )  # fmt: skip
    neighbors = pa.Table.from_pylist(
        [{"query_id": q, "passage_id": p, "knn_rank": k, "knn_score": 1.0 - k / 10, "bm25_rank": k,
         "bm25_score": 1.0 / k, "mined_by": "knn"} for q, p, k in PAIRS + list(orphans)]
    )
    for stage, table, upstream in [
        ("passages", passages, []), ("queries", queries, ["passages"]), ("neighbors", neighbors, ["passages", "queries"])
    ]:  # fmt: skip
        with write_stage(stage, upstream=upstream, warehouse=root / "warehouse") as con:
            write_table(con, stage, table)


def test_stage_end_to_end_and_cached_rerun(tiny_llm_dir, tmp_path, monkeypatch, capsys):
    from python_steps import llm_scores

    make_project(tmp_path, tiny_llm_dir)
    monkeypatch.chdir(tmp_path)
    llm_scores.main()
    out = capsys.readouterr().out
    assert f"llm_scores: {len(PAIRS)} scored pairs" in out
    assert f"llm cache: 0 hits, {2 * len(PAIRS)} prompts scored" in out

    con = duckdb.connect(str(tmp_path / "warehouse" / "llm_scores.duckdb"), read_only=True)
    columns = [r[0] for r in con.execute("DESCRIBE llm_scores").fetchall()]
    assert columns[:8] == ["query_id", "passage_id", "knn_rank", "ql_sum", "ql_mean", "rc_logodds", "ql_rank", "rc_rank"]
    first = con.execute("SELECT * FROM llm_scores ORDER BY query_id, passage_id").fetchall()
    # Ranks are a permutation 1..n within each query.
    bad = con.execute(
        "SELECT count(*) FROM (SELECT query_id, list_sort(list(ql_rank)) a, list_sort(list(rc_rank)) b, "
        "range(1, count(*) + 1) want FROM llm_scores GROUP BY query_id) WHERE a != want OR b != want"
    ).fetchone()[0]
    con.close()
    assert len(first) == len(PAIRS) and bad == 0

    llm_scores.main()  # nothing changed: every prompt comes from the cache
    out = capsys.readouterr().out
    assert f"llm cache: {2 * len(PAIRS)} hits, 0 prompts scored" in out
    con = duckdb.connect(str(tmp_path / "warehouse" / "llm_scores.duckdb"), read_only=True)
    assert con.execute("SELECT * FROM llm_scores ORDER BY query_id, passage_id").fetchall() == first
    # The downstream fusion SQL reads this table as written.
    con.execute("SET VARIABLE select_rrf_k = 0")
    con.execute(f"ATTACH '{tmp_path / 'warehouse' / 'neighbors.duckdb'}' AS nb (READ_ONLY)")
    con.execute(f"ATTACH '{tmp_path / 'warehouse' / 'queries.duckdb'}' AS qs (READ_ONLY)")
    con.execute("CREATE TEMP VIEW neighbors AS SELECT * FROM nb.neighbors")
    con.execute("CREATE TEMP VIEW queries AS SELECT * FROM qs.queries")
    fused = con.execute((ROOT / "sql" / "fused_ranks.sql").read_text()).fetchall()
    con.close()
    assert len(fused) == len(PAIRS)


def test_stage_counts_and_reports_neighbors_the_joins_drop(tiny_llm_dir, tmp_path, monkeypatch, capsys):
    from python_steps import llm_scores

    # q9 is not in queries, p9 not in passages; the last row misses both and counts under each.
    orphans = (("q9", "p1", 1), ("q9", "p2", 2), ("q1", "p9", 4), ("q8", "p8", 1))
    make_project(tmp_path, tiny_llm_dir, score="{batch_size: 4, max_passage_tokens: 40, methods: [ql]}", orphans=orphans)
    monkeypatch.chdir(tmp_path)
    llm_scores.main()
    out = capsys.readouterr().out
    n = len(PAIRS) + len(orphans)
    assert f"joins: 4 of {n} neighbors NOT scored: 3 whose query is missing from queries, 2 whose passage" in out
    con = duckdb.connect(str(tmp_path / "warehouse" / "llm_scores.duckdb"), read_only=True)
    report = dict(con.execute("SELECT metric, value FROM llm_scores_report").fetchall())
    assert con.execute("SELECT count(*) FROM llm_scores").fetchone()[0] == len(PAIRS)
    con.close()
    assert report == {"neighbors": n, "neighbors_without_query": 3, "neighbors_without_passage": 2,
                      "neighbors_dropped": 4, "pairs_scored": len(PAIRS)}  # fmt: skip

    make_project(tmp_path, tiny_llm_dir, score="{batch_size: 4, max_passage_tokens: 40, methods: [ql]}")
    llm_scores.main()
    assert f"joins: all {len(PAIRS)} neighbors have their query and passage" in capsys.readouterr().out


def test_stage_ql_only_writes_null_rc(tiny_llm_dir, tmp_path, monkeypatch, capsys):
    from python_steps import llm_scores

    make_project(tmp_path, tiny_llm_dir, score="{batch_size: 4, max_passage_tokens: 40, methods: [ql]}")
    monkeypatch.chdir(tmp_path)
    llm_scores.main()
    assert f"({len(PAIRS)} prompts: QL)" in capsys.readouterr().out
    con = duckdb.connect(str(tmp_path / "warehouse" / "llm_scores.duckdb"), read_only=True)
    counts = con.execute(
        "SELECT count(*), count(ql_sum), count(ql_rank), count(rc_logodds), count(rc_rank) FROM llm_scores"
    ).fetchone()
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE llm_scores)").fetchall())
    con.close()
    assert counts == (len(PAIRS), len(PAIRS), len(PAIRS), 0, 0)
    assert types["rc_logodds"] == "DOUBLE" and types["rc_rank"] == "BIGINT"  # typed NULLs, same schema


@pytest.mark.slow
def test_smollm2_scores_equal_the_plain_computation(template, tmp_path):
    """Real SmolLM2-135M: 2 queries x 3 passages, scorer vs the plain reference."""
    from pipeline.llm import load_llm

    llm = load_llm(LLMParams(model_cache_dir=ROOT / ".fret/cache/models", dtype="float32"), BaseParams(threads=1, device="cpu"))
    pairs = [(q, p, k) for q in ("q1", "q3") for k, p in enumerate(("p1", "p3", "p4"), 1)]
    table = pa.Table.from_pylist(
        [{"query_id": q, "passage_id": p, "knn_rank": k, "task": TASK, "query": QUERIES[q],
          "title": PASSAGES[p][0], "text": PASSAGES[p][1]} for q, p, k in pairs]
    )  # fmt: skip
    scores = score_relevance(table, llm, PARAMS, LLMCache(None), template, progress=False).scores
    for row in scores.to_pylist():
        title, text = PASSAGES[row["passage_id"]]
        ql_sum, ql_mean, rc = reference_scores(llm, template, title, text, QUERIES[row["query_id"]])
        assert row["ql_sum"] == pytest.approx(ql_sum, abs=1e-4)
        assert row["ql_mean"] == pytest.approx(ql_mean, abs=1e-4)
        assert row["rc_logodds"] == pytest.approx(rc, abs=1e-4)
    # The bee query is most likely under the bee passage.
    best = {r["query_id"]: r["passage_id"] for r in scores.to_pylist() if r["ql_rank"] == 1}
    assert best["q1"] == "p1"
