"""pipeline/llm/generate.py: task types, sampling, caching, resume, failures and the output tables."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from fixtures_llm import tiny_llm, tiny_llm_dir  # noqa: F401  (pytest fixtures)

from pipeline.llm import Completion
from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import (
    GenerationError,
    draw_task_type,
    generate_queries,
    query_id,
    sample_passages,
)
from pipeline.params import GenerateParams

TYPES = ["question answering", "search result", "fact checking", "sentence similarity"]


def _passages(n: int, start: int = 0) -> pa.Table:
    ids = [f"doc{i}#0" for i in range(start, start + n)]
    return pa.table(
        {
            "passage_id": ids,
            "title": [f"Title {i}" for i in range(start, start + n)],
            "text": [f"Passage {i} says that rivers carry sediment to the sea." for i in range(start, start + n)],
        }
    )


def _params(**kw) -> GenerateParams:
    return GenerateParams(**{"max_new_tokens": 400, "batch_size": 4, "max_passage_words": 20, **kw})


class Counting:
    """Wraps an LLM; counts generated rows and can corrupt the output for chosen passages."""

    def __init__(self, llm, corrupt: set[str] = frozenset(), corrupt_attempts: int = 10**9):
        self.llm, self.identity, self.corrupt = llm, llm.identity, corrupt
        self.rows = 0
        self.seen: Counter = Counter()
        self.corrupt_attempts = corrupt_attempts

    def chat_prompt(self, messages):
        return self.llm.chat_prompt(messages)

    def generate_json(self, prompts, schema, decodings, max_new_tokens, retry=None, stop=None):
        """Counts first attempts as rows; an attempt of a corrupted passage reaches `retry` replaced."""
        self.rows += len(prompts)

        def check(i, out):
            bad = next((p for p in self.corrupt if f"Title {p}\n" in prompts[i]), None)
            if bad is not None:
                self.seen[bad] += 1
                if self.seen[bad] <= self.corrupt_attempts:
                    out = Completion('{"task": "short", "query": "x"}', 9, True)
            return retry(i, out) if retry is not None else None

        return self.llm.generate_json(prompts, schema, decodings, max_new_tokens, retry=check, stop=stop)


def _rows(table: pa.Table) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "created_at"} for r in table.to_pylist()]


def test_task_types_are_uniform_and_stable_as_the_corpus_grows():
    ids = [f"d{i}#0" for i in range(8000)]
    counts = Counter(draw_task_type(pid, 0, TYPES, seed=42) for pid in ids)
    assert set(counts) == set(TYPES)
    assert all(abs(c - 2000) < 200 for c in counts.values()), counts  # ~4.5 sigma
    assert [draw_task_type(p, 0, TYPES, 42) for p in ids[:50]] != [draw_task_type(p, 0, TYPES, 7) for p in ids[:50]]
    # A passage keeps its type whatever else is in the corpus: the draw depends on its id only.
    assert [draw_task_type(p, 0, TYPES, 42) for p in ids[:100]] == [draw_task_type(p, 0, TYPES, 42) for p in ids[:100]]


def test_limit_sample_is_seeded_and_mostly_stable_when_the_corpus_grows():
    ids = [f"d{i}#0" for i in range(1000)]
    first = sample_passages(ids, 100, seed=1)
    assert len(first) == 100 and first == sample_passages(ids, 100, seed=1) != sample_passages(ids, 100, seed=2)
    grown = sample_passages(ids + [f"n{i}#0" for i in range(100)], 100, seed=1)
    # Newcomers can only take places from the old sample; about 100 x 100/1100 of them do.
    assert len(set(first) & set(grown)) > 75
    assert sample_passages(ids, None, seed=1) == ids


def test_rows_are_schema_valid_with_stable_ids(tiny_llm, tmp_path):
    passages = _passages(6)
    result = generate_queries(passages, tiny_llm, _params(), 42, LLMCache(tmp_path / "c.duckdb"), progress=False)
    assert result.queries.num_rows == 6 and result.failures.num_rows == 0
    rows = result.queries.to_pylist()
    assert [r["query_id"] for r in rows] == [query_id(f"doc{i}#0", 0) for i in range(6)]
    for r in rows:
        assert r["llm"] == tiny_llm.identity and len(r["prompt_hash"]) == 16
        assert r["task_type"] == draw_task_type(r["passage_id"], 0, TYPES, 42)
        assert 10 <= len(r["task"]) <= 120 and 5 <= len(r["query"]) <= 160
        assert 0.0 <= r["copy_rate"] <= 1.0 and r["query_words"] == len(r["query"].split())
    report = dict(zip(*[result.report.column(c).to_pylist() for c in ("metric", "value")]))
    assert report["queries_written"] == 6 and report["failure_rate"] == 0
    assert sum(v for k, v in report.items() if k.startswith("task_type:")) == 6


def test_same_seed_same_rows(tiny_llm, tmp_path):
    passages = _passages(5)
    params = _params(temperature=1.0, queries_per_passage=2)
    runs = [
        generate_queries(passages, tiny_llm, params, seed, LLMCache(tmp_path / f"c{i}.duckdb"), progress=False)
        for i, seed in enumerate([42, 42, 43])
    ]
    assert _rows(runs[0].queries) == _rows(runs[1].queries)
    assert [r["query"] for r in _rows(runs[0].queries)] != [r["query"] for r in _rows(runs[2].queries)]


def test_rerun_and_grown_corpus_only_generate_what_is_missing(tiny_llm, tmp_path):
    path = tmp_path / "c.duckdb"
    llm = Counting(tiny_llm)
    with LLMCache(path) as cache:
        first = generate_queries(_passages(5), llm, _params(), 42, cache, progress=False)
    assert llm.rows == 5
    with LLMCache(path) as cache:
        again = generate_queries(_passages(5), llm, _params(), 42, cache, progress=False)
        assert cache.hits == 5
    assert llm.rows == 5 and again.queries.equals(first.queries)  # created_at comes from the cache
    with LLMCache(path) as cache:
        grown = generate_queries(_passages(8), llm, _params(), 42, cache, progress=False)
    assert llm.rows == 8 and grown.queries.num_rows == 8


def test_resume_after_a_crash_redoes_no_finished_batch(tiny_llm, tmp_path):
    path = tmp_path / "c.duckdb"
    llm = Counting(tiny_llm)

    def crash_after_two(done_batches):
        if done_batches == 2:
            raise KeyboardInterrupt  # what a kill looks like from here: no cleanup code of ours runs

    with pytest.raises(KeyboardInterrupt), LLMCache(path) as cache:
        generate_queries(_passages(10), llm, _params(batch_size=3), 42, cache, progress=False, on_batch=crash_after_two)
    with LLMCache(path) as cache:
        finished = cache.count()
    assert finished == llm.rows == 6  # two full batches of 3 made it
    with LLMCache(path) as cache:
        result = generate_queries(_passages(10), llm, _params(batch_size=3), 42, cache, progress=False)
        assert cache.hits == finished
    assert llm.rows == 10 and result.queries.num_rows == 10  # the rest only: nothing generated twice


def test_invalid_outputs_land_in_failures_and_are_never_cached(tiny_llm, tmp_path):
    path = tmp_path / "c.duckdb"
    llm = Counting(tiny_llm, corrupt={"2"})
    params = _params(max_retries=2, max_failure_rate=0.5)
    with LLMCache(path) as cache:
        result = generate_queries(_passages(4), llm, params, 42, cache, progress=False)
        assert cache.count() == 3
    assert result.queries.num_rows == 3 and llm.seen["2"] == 3  # first try + 2 retries
    (failure,) = result.failures.to_pylist()
    assert failure["passage_id"] == "doc2#0" and failure["attempts"] == 3
    assert failure["raw_output"] == '{"task": "short", "query": "x"}' and "task" in failure["reason"]
    with LLMCache(path) as cache:
        generate_queries(_passages(4), llm, params, 42, cache, progress=False)
    assert llm.seen["2"] == 6  # the failure was retried from scratch, the 3 good ones came from the cache


def test_a_retry_can_rescue_an_output(tiny_llm, tmp_path):
    llm = Counting(tiny_llm, corrupt={"1"}, corrupt_attempts=1)
    result = generate_queries(_passages(3), llm, _params(max_retries=1), 42, LLMCache(None), progress=False)
    assert result.failures.num_rows == 0
    assert {r["passage_id"]: r["attempt"] for r in result.queries.to_pylist()}["doc1#0"] == 1


def test_too_many_failures_fail_loudly(tiny_llm):
    llm = Counting(tiny_llm, corrupt={"0", "1"})
    with pytest.raises(GenerationError, match=r"2 of 4 queries \(50.0%\) failed"):
        generate_queries(_passages(4), llm, _params(max_retries=0, max_failure_rate=0.25), 42, LLMCache(None), progress=False)


def test_greedy_with_several_queries_per_passage_is_rejected():
    with pytest.raises(ValueError, match="needs temperature > 0"):
        GenerateParams(queries_per_passage=2)


def test_a_query_copied_from_the_few_shot_examples_is_invalid():
    from pipeline.llm.generate import PromptTemplate, validate

    example = PromptTemplate().examples[0]
    text = '{"task": "Given a question, find answers", "query": "%s"}' % example["query"].upper()
    assert validate(text)[0] is not None
    assert validate(text, PromptTemplate().examples) == (None, "query: copies a few-shot example")


def test_a_query_starting_with_an_example_s_first_words_is_a_copy():
    from pipeline.llm.generate import CopyCheck, validate

    examples = [{"query": "how do bees tell other bees where to find food"}, {"query": "venv activate"}]
    check = CopyCheck(examples, prefix_words=4)
    reason = "query: starts with a few-shot example's first 4 words"
    assert check.reason("How do bees, TELL other bees where to find food") == CopyCheck.EXACT
    assert check.reason("how do bees tell the time at night") == reason  # the start kept, the end new
    assert check.reason("venv activate on windows") == reason  # a shorter example: all of its words
    assert check.reason("how do bees see colour") is None  # three words in common are not a copy
    assert check.reason("how do cells tell other cells where to go") is None
    assert CopyCheck(examples).reason("how do bees tell the time at night") is None  # prefix_words off
    text = '{"task": "Given a question, find answers", "query": "how do bees tell the time"}'
    assert validate(text, examples) == (validate(text)[0], None)
    assert validate(text, examples, prefix_words=4) == (None, reason)


@pytest.mark.parametrize(
    ("partial", "copying"),
    [
        ('{"task": "how do bees tell other bees', False),  # the task may say anything
        ('{"task": "Find answers", "query": "how do bees tel', False),  # 3 words and one still growing
        ('{"task": "Find answers", "query": "how do bees tell', False),  # "tell" may become "tells"
        ('{"task": "Find answers", "query": "how do bees tells ', False),
        ('{"task": "Find answers", "query": "how do bees tell ', True),
        ('{"task": "Find answers", "query": "How do bees tell?', True),
        ('{"task": "Find answers", "query": "how do bees tell"', True),  # the string has ended
        ('{"task": "Find answers", "query":"how do  bees tell the', True),
        ('{"task": "Find answers", "query": "so how do bees tell ', False),
    ],
)
def test_a_copy_is_seen_in_the_partial_output_once_its_words_are_out(partial, copying):
    from pipeline.llm.generate import CopyCheck

    examples = [{"query": "how do bees tell other bees where to find food"}]
    assert CopyCheck(examples, prefix_words=4).copying_so_far(partial) is copying
    assert CopyCheck(examples).copying_so_far(partial) is False


class Typing:
    """Writes scripted outputs one character at a time, asking `stop` after each (as the in-process
    backend does per token); attempt k of a passage gets its script's k-th output (the last repeats)."""

    identity = "typing-llm"

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.attempts, self.typed = script, Counter(), 0

    def chat_prompt(self, messages):
        return "\n".join(m["content"] for m in messages)

    def generate_json(self, prompts, schema, decodings, max_new_tokens, retry=None, stop=None):
        out = []
        for i, prompt in enumerate(prompts):
            while True:
                done = self._type(i, prompt, stop)
                if retry is None or retry(i, done) is None:
                    out.append(done)
                    break
        return out

    def _type(self, i, prompt, stop):
        passage = next(p for p in self.script if f"Title {p}\n" in prompt)
        outputs = self.script[passage]
        text = outputs[min(self.attempts[passage], len(outputs) - 1)]
        self.attempts[passage] += 1
        for n in range(1, len(text) + 1):
            self.typed += 1
            if stop is not None and stop(i, text[:n]):
                return Completion(text[:n], n, False, True)
        return Completion(text, len(text), True)


def test_a_row_that_starts_copying_an_example_is_cut_there_and_retried(tmp_path):
    from pipeline.llm.generate import PromptTemplate

    example = PromptTemplate().examples[0]["query"]  # "how do bees tell other bees where to find food"
    copy = '{"task": "Given a question, find the answer", "query": "%s and honey"}' % example
    good = '{"task": "Given a question, find the answer", "query": "what carries sediment to the sea"}'
    llm = Typing({"0": [copy, good], "1": [good], "2": [copy]})
    params = _params(task_types=["question answering"], max_failure_rate=1.0, max_retries=1)
    result = generate_queries(_passages(3), llm, params, 42, LLMCache(tmp_path / "c.duckdb"), progress=False)
    cut = copy.index(" tell ") + len(" tell ")  # the fourth word and the character that ends it
    assert [r["attempt"] for r in result.queries.to_pylist()] == [1, 0]  # doc0 on its retry, doc1 at once
    (failure,) = result.failures.to_pylist()  # doc2 copies on every attempt
    assert failure["passage_id"] == "doc2#0" and failure["raw_output"] == copy[:cut]
    assert failure["reason"] == "query: starts with a few-shot example's first 4 words"
    assert result.stats["stopped_copies"] == 3 and llm.typed == 3 * cut + 2 * len(good)
    # Off, the copies are written to their end and only the exact rule applies: the copy passes.
    llm = Typing({"0": [copy, good], "1": [good], "2": [copy]})
    result = generate_queries(_passages(3), llm, _params(task_types=["question answering"], copy_prefix_words=None),
                              42, LLMCache(tmp_path / "off.duckdb"), progress=False)  # fmt: skip
    assert result.stats["stopped_copies"] == 0 and result.queries.num_rows == 3
    assert llm.typed == 2 * len(copy) + len(good)


def test_a_cached_output_that_no_longer_validates_is_recomputed(tiny_llm, tmp_path):
    from pipeline.llm.generate import build_requests, PromptTemplate

    path = tmp_path / "c.duckdb"
    template = PromptTemplate()
    (request,) = build_requests(_passages(1), tiny_llm, _params(), 42, template)
    copied = {"task": "Given a question, find it", "query": template.examples[0]["query"], "attempt": 0, "new_tokens": 9}
    with LLMCache(path) as cache:
        cache.put_many("generate", {request.key: copied})  # stored before the copy rule existed
        llm = Counting(tiny_llm)
        result = generate_queries(_passages(1), llm, _params(), 42, cache, progress=False)
        assert llm.rows == 1 and result.queries.column("query")[0].as_py() != copied["query"]
        assert cache.get_many([request.key])[request.key].value["query"] != copied["query"]


# ------------------------------------------------------------ few-shot examples from labelled queries

CLAIM_TASK = "Given a claim, find evidence for or against it"


def _write_labelled(folder):
    """A BEIR folder: 8 judged claims; c1 cites d1 (1) and d2 (2); c7 has a quote (breaks the schema);
    c8 only a 0 judgment."""
    import json

    (folder / "qrels").mkdir(parents=True)
    docs = {"d1": ("Glaciers", "ice moves slowly " * 40), "d2": ("", "rivers carry sand"), "d3": ("Foxes", "foxes hunt")}
    rows = [json.dumps({"_id": i, "title": t, "text": x}) for i, (t, x) in docs.items()]
    (folder / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    claims = {f"c{i}": f"Claim number {i} about moving ice." for i in range(1, 9)}
    claims["c7"] = 'A "quoted" claim about foxes.'
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in claims.items()))
    judged = ["c1\td1\t1", "c1\td2\t2"] + [f"c{i}\td{1 + i % 3}\t1" for i in range(2, 8)] + ["c8\td3\t0"]
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(judged) + "\n")
    return folder


def _source(folder, **kw):
    from pipeline.params import FewShotParams

    return FewShotParams(**{"path": folder, "task_type": "fact checking", "task": CLAIM_TASK, **kw})


def test_few_shot_examples_are_judged_queries_with_their_best_document(tmp_path):
    from pipeline.llm.generate import few_shot_examples

    folder = _write_labelled(tmp_path / "beir")
    shots = few_shot_examples(_source(folder, n=6), seed=42, max_words=5)
    # c7 breaks the output schema and c8 has no relevant document: the six others, in seeded order.
    assert sorted(s["query"] for s in shots) == [f"Claim number {i} about moving ice." for i in (1, 2, 3, 4, 5, 6)]
    by_query = {s["query"]: s for s in shots}
    c1 = by_query["Claim number 1 about moving ice."]
    assert (c1["title"], c1["text"]) == ("", "rivers carry sand")  # d2 is judged 2, above d1's 1
    c3 = by_query["Claim number 3 about moving ice."]  # cites d1, cut to 5 words like the seed passages
    assert (c3["title"], c3["text"]) == ("Glaciers", "ice moves slowly ice moves ...")
    assert all((s["task_type"], s["task"]) == ("fact checking", CLAIM_TASK) for s in shots)
    # Seeded: another seed draws another subset, the same seed the same one.
    assert few_shot_examples(_source(folder, n=3), 42, 5) == few_shot_examples(_source(folder, n=3), 42, 5)
    draws = {tuple(s["query"] for s in few_shot_examples(_source(folder, n=3), seed, 5)) for seed in range(6)}
    assert len(draws) > 1


def test_few_shot_examples_skip_the_held_out_queries(tmp_path):
    from pipeline.labelled import held_out
    from pipeline.llm.generate import few_shot_examples

    folder = _write_labelled(tmp_path / "beir")
    kept = [f"Claim number {i} about moving ice." for i in range(1, 7)]
    outside = [q for q in kept if not held_out(q, 0.5)]
    assert 0 < len(outside) < len(kept)  # the fixture's claims fall on both sides of the cut
    shots = few_shot_examples(_source(folder, n=len(outside), holdout=0.5), 42, 5)
    assert sorted(s["query"] for s in shots) == sorted(outside)
    with pytest.raises(ValueError, match=rf"has {len(outside)} usable queries .* fewer than n={len(outside) + 1}"):
        few_shot_examples(_source(folder, n=len(outside) + 1, holdout=0.5), 42, 5)


def test_few_shot_examples_refuse_a_task_outside_the_schema(tmp_path):
    from pipeline.llm.generate import few_shot_examples

    folder = _write_labelled(tmp_path / "beir")
    with pytest.raises(ValueError, match="task 'Find' must be 10-120 characters"):
        few_shot_examples(_source(folder, task="Find"), 42, 5)


def test_prompt_with_examples_replaces_only_their_task_type(tmp_path):
    from pipeline.llm.generate import PromptTemplate

    base = PromptTemplate()
    shot = {"task_type": "fact checking", "title": "T", "text": "ice moves slowly", "task": CLAIM_TASK}
    shot["query"] = "Ice moves."
    template = base.with_examples([shot])
    assert [e for e in template.examples if e["task_type"] == "fact checking"] == [shot]
    assert [e for e in template.examples if e["task_type"] != "fact checking"] == [
        e for e in base.examples if e["task_type"] != "fact checking"
    ]
    assert template.hash != base.hash and base.with_examples([]) is base
    assert len(base.examples) == 12  # the file's own examples are untouched
    messages = template.messages("fact checking", "Seed", "seed text")
    assert len(messages) == 4  # system, the one example's two turns, the seed passage
    assert "ice moves slowly" in messages[1]["content"] and '"query": "Ice moves."' in messages[2]["content"]
    assert len(template.messages("search result", "Seed", "seed text")) == 8  # still the file's three


def test_few_shot_params_are_checked(tmp_path):
    from pipeline.params import ParamsError, load_params

    _write_labelled(tmp_path / "beir")
    ok = "generate:\n  examples:\n    - {path: beir, task_type: fact checking, task: Find evidence}\n"
    (tmp_path / "params.yaml").write_text(ok)
    assert load_params(tmp_path / "params.yaml").generate.examples[0].n == 4
    (tmp_path / "params.yaml").write_text(ok.replace("    - {", "    {"))  # one source as a mapping
    assert [s.task for s in load_params(tmp_path / "params.yaml").generate.examples] == ["Find evidence"]
    for text, message in [
        ("generate:\n  task_types: [search result]\n  examples:\n"
         "    - {path: beir, task_type: fact checking, task: Find evidence}\n",
         r"examples\[0\]\.task_type 'fact checking' is not in task_types"),
        ("generate:\n  examples:\n    - {path: beir, task_type: fact checking, task: Find evidence, split: test}\n",
         "test queries to the LLM"),
        ("generate:\n  examples:\n    - {path: nowhere, task_type: fact checking, task: Find evidence}\n",
         r"few-shot qrels file not found: .*nowhere/qrels/train\.tsv"),
        ("generate:\n  examples:\n    - {path: beir, task: Find evidence}\n", r"generate\.examples\.0\.task_type"),
    ]:  # fmt: skip
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(ParamsError, match=message):
            load_params(tmp_path / "params.yaml")
