"""The judge check (pipeline/evaluation/judge.py, python_steps/judge.py): nDCG, fusion, the weight grid, the stage.

The metrics are checked against hand computations (and pytrec_eval, which BEIR uses); the stage runs
end to end on a tiny BEIR folder with the tiny BERT and GPT-2 built by the shared fixtures.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from fixtures_encoder import tiny_bert_dir  # noqa: F401  (pytest fixture)
from fixtures_llm import tiny_llm_dir  # noqa: F401  (pytest fixture)

from pipeline.evaluation.judge import (
    GECKO_WEIGHTS,
    best_weights,
    fuse,
    judge_rankings,
    load_judge_set,
    ndcg_at_10,
    signals,
    weight_grid,
)
from pipeline.params import JudgeParams, ParamsError, load_params

TASK = "Given a claim, find evidence"
DOCS = {
    "d1": ("Bees", "Forager bees dance to show where food is."),
    "d2": ("", "The cell membrane controls what enters and leaves the cell."),
    "d3": ("Rivers", "Rivers carry sediment from the mountains to the sea."),
    "d4": ("Glaciers", "Glaciers move slowly downhill under their own weight."),
    "d5": ("Vitamin C", "Vitamin C supplements did not reduce how often people caught colds."),
    "d6": ("Proteins", "Proteins fold into shapes that decide their function."),
}
QUERIES = {"q1": "how do bees find food", "q2": "vitamin C prevents colds", "q3": "what moves sediment", "q4": "x"}
QRELS = {"q1": {"d1": 1}, "q2": {"d5": 2, "d2": 1}, "q3": {"d3": 1, "d4": 1}}


def dcg(gains: list[float]) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_ndcg_is_beirs_graded_log2_with_the_ideal_from_qrels():
    qrels = {"a": 2, "b": 1, "c": 1, "z": 0}
    ranked = ["x", "a", "z", "c"]  # b is outside the ranked top N: not retrieved, still in the ideal
    expected = (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3) + 1 / math.log2(4))
    assert ndcg_at_10(ranked, qrels) == pytest.approx(expected, abs=1e-12)
    assert ndcg_at_10(ranked, {"z": 0}) == 0.0  # no relevant document: 0, as pytrec_eval
    # Only the first 10 count.
    assert ndcg_at_10([f"n{i}" for i in range(10)] + ["a"], {"a": 1}) == 0.0


def test_ndcg_equals_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    qrels = {"q": {"a": 2, "b": 1, "c": 1, "d": 3, "z": 0}}
    ranked = ["x", "a", "z", "c", "y", "d", "w", "v", "u", "t", "s", "b"]
    run = {"q": {doc: float(len(ranked) - i) for i, doc in enumerate(ranked)}}  # distinct scores, best first
    expected = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)["q"]["ndcg_cut_10"]
    assert ndcg_at_10(ranked, qrels["q"]) == pytest.approx(expected, abs=1e-9)


def row(pid: str, knn: int, ql: int | None, rc: int | None, query: str = "q") -> dict:
    return {"query_id": query, "passage_id": pid, "knn_rank": knn, "ql_rank": ql, "rc_rank": rc}


def test_fusion_ties_go_to_knn_rank_then_id():
    rows = [row("p1", 3, 1, 3), row("p2", 2, 2, 2), row("p3", 1, 3, 1), row("p4", 4, 4, 4)]
    # Gecko: 1/1 + 1/3 = 1/3 + 1 = 4/3 for p1 and p3 (exact tie) > 1/2 + 1/2 = 1 for p2.
    assert fuse(rows, GECKO_WEIGHTS, 0) == ["p3", "p1", "p2", "p4"]
    # k = 1: 1/2 + 1/4 = 3/4 for p1 and p3, 1/3 + 1/3 = 2/3 for p2: same order.
    assert fuse(rows, GECKO_WEIGHTS, 1) == ["p3", "p1", "p2", "p4"]
    # Equal knn ranks (not in real data): the id decides.
    assert fuse([row("b", 1, 1, 2), row("a", 1, 2, 1)], GECKO_WEIGHTS, 0) == ["a", "b"]
    # rc 0.5, knn 1: p1 = 1/6 + 1/3, p2 = 1/4 + 1/2, p3 = 1/2 + 1, p4 = 1/8 + 1/4.
    assert fuse(rows, {"ql": 0.0, "rc": 0.5, "knn": 1.0}, 0) == ["p3", "p2", "p1", "p4"]


def test_grid_covers_the_computed_signals_only():
    assert signals(["ql", "rc"]) == ["knn", "bm25", "ql", "rc"]
    assert signals([], ["qwen"]) == ["knn", "bm25", "ql@qwen"]
    both, ql_only = weight_grid(["knn", "ql", "rc"]), weight_grid(["knn", "ql"])
    assert len(both) == 26 and {"ql": 0.0, "rc": 0.0, "knn": 0.0} not in both
    assert len(ql_only) == 8 and all("rc" not in w for w in ql_only)
    assert len(weight_grid(signals(["ql", "rc"], ["qwen"]))) == 3**5 - 1
    assert {"knn": 0.0, "ql": 1.0, "rc": 1.0} in both


def point(ql: float, rc: float, knn: float, value: float) -> dict:
    return {"weights": {"ql": ql, "rc": rc, "knn": knn, "bm25": 0.0}, "ndcg_at_10": value}


def test_best_weights_and_its_tie_rules():
    assert best_weights([point(1, 1, 0, 0.5), point(0.5, 0, 1, 0.7)]) == {"ql": 0.5, "rc": 0, "knn": 1, "bm25": 0}
    # A tie prefers Gecko's default...
    assert best_weights([point(0.5, 0.5, 0, 0.7), point(1, 0, 1, 0.7), point(1, 1, 0, 0.7)]) == GECKO_WEIGHTS
    # ...then fewer non-zero weights, then larger ones, then grid order.
    ties = [point(1, 0, 1, 0.7), point(0.5, 0, 0, 0.7), point(1, 0, 0, 0.7)]
    assert best_weights(ties) == {"ql": 1, "rc": 0, "knn": 0, "bm25": 0}
    assert best_weights([point(0, 0, 1, 0.7), point(1, 0, 0, 0.7)]) == {"ql": 0, "rc": 0, "knn": 1, "bm25": 0}
    # Float noise below 1e-12 is a tie, not a win.
    assert best_weights([point(1, 0, 1, 0.7 + 1e-15), point(1, 1, 0, 0.7)]) == GECKO_WEIGHTS


def test_judge_rankings_by_hand():
    # Two queries, top 3 each. qa: knn finds the relevant p1 at 3, QL at 1, RC at 2.
    rows = [
        row("p1", 3, 1, 2, "qa"), row("p2", 1, 2, 1, "qa"), row("p3", 2, 3, 3, "qa"),
        row("r1", 1, 3, 1, "qb"), row("r2", 2, 1, 3, "qb"), row("r3", 3, 2, 2, "qb"),
    ]  # fmt: skip
    qrels = {"qa": {"p1": 1, "gone": 1}, "qb": {"r1": 1}}  # `gone` is outside the top N
    metrics, report = judge_rankings(pa.Table.from_pylist(rows), qrels, ["knn", "ql", "rc"], rrf_k=0)
    ideal_a, ideal_b = dcg([1, 1]), dcg([1])
    expected = {
        "knn": (dcg([0, 0, 1]) / ideal_a + 1) / 2,
        "ql": (1 / ideal_a + dcg([0, 0, 1]) / ideal_b) / 2,
        "rc": (dcg([0, 1]) / ideal_a + 1) / 2,
        # qa: p1 = 1 + 1/2, p2 = 1/2 + 1: tie -> knn rank puts p2 first; qb: r1 = 1/3 + 1, r2 = 1 + 1/3: r1 (knn 1)
        "fused": (dcg([0, 1]) / ideal_a + 1) / 2,
    }
    assert metrics["ndcg_at_10"] == pytest.approx(expected, abs=1e-12)
    assert metrics["recall_at_top_n"] == pytest.approx((1 / 2 + 1) / 2)
    assert len(metrics["grid"]) == 26 and metrics["best_ndcg_at_10"] == max(p["ndcg_at_10"] for p in metrics["grid"])
    # No weighting puts both p1 (qa) and r1 (qb) first: p1 above p2 needs w_ql > w_rc + 4/3 w_knn, r1
    # above r2 needs w_rc + 3/4 w_knn > w_ql. The best is RC's (p1 second, r1 first), which fused ties:
    # the tie goes to Gecko's default.
    assert metrics["best_ndcg_at_10"] == pytest.approx(expected["rc"], abs=1e-12)
    assert metrics["best_weights"] == GECKO_WEIGHTS
    best = [r for r in report if r["is_best"]]
    assert len(best) == 1 and best[0]["ranking"] == "grid"
    assert {k: best[0][f"w_{k}"] for k in ("ql", "rc", "knn", "bm25")} == metrics["best_weights"]
    assert metrics["best_fusion"]["ndcg_at_10"] == metrics["best_ndcg_at_10"]  # every signal is selectable here
    assert metrics["best_over_knn"] == pytest.approx(expected["rc"] - expected["knn"])


def test_judge_rankings_ql_only():
    rows = [row("p1", 2, 1, None), row("p2", 1, 2, None)]
    metrics, report = judge_rankings(pa.Table.from_pylist(rows), {"q": {"p1": 1}}, ["knn", "ql"], rrf_k=0)
    assert set(metrics["ndcg_at_10"]) == {"knn", "ql"}  # no RC: neither it nor Gecko's fusion
    assert metrics["ndcg_at_10"]["ql"] == 1.0
    assert metrics["best_weights"] == {"ql": 1.0, "rc": 0.0, "knn": 0.0, "bm25": 0.0}
    assert len(metrics["grid"]) == 8 and len(report) == 2 + 8


def test_an_extra_model_is_fused_but_never_written_as_select_weights():
    # ql@big ranks the relevant passage first; the selectable signals cannot.
    rows = [
        {**row("p1", 2, 2, None), "extra_ranks": [("ql@big", 1)]},
        {**row("p2", 1, 1, None), "extra_ranks": [("ql@big", 2)]},
    ]
    schema = pa.schema([("query_id", pa.string()), ("passage_id", pa.string()), ("knn_rank", pa.int64()),
                        ("ql_rank", pa.int64()), ("rc_rank", pa.int64()), ("extra_ranks", pa.map_(pa.string(), pa.int64()))])
    table = pa.Table.from_pylist(rows, schema=schema)
    metrics, _ = judge_rankings(table, {"q": {"p1": 1}}, ["knn", "ql", "ql@big"], rrf_k=0)
    assert metrics["ndcg_at_10"]["ql@big"] == 1.0 and metrics["best_fusion"]["ndcg_at_10"] == 1.0
    assert metrics["best_fusion"]["weights"]["ql@big"] > 0
    assert set(metrics["best_weights"]) == {"ql", "rc", "knn", "bm25"} and metrics["best_ndcg_at_10"] < 1.0


# --------------------------------------------------------------------------------------------
# Data and the stage


def write_beir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in DOCS.items())
    )
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": x}) + "\n" for q, x in QUERIES.items()))
    (folder / "qrels").mkdir(exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, j in QRELS.items() for d, s in j.items()]
    for split in ("train", "test"):
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_judge_set_sample_and_corpus_cut(tmp_path):
    folder = write_beir(tmp_path / "beir")
    one = load_judge_set(JudgeParams(path=folder, task=TASK, queries=2, max_corpus=4), seed=7)
    assert len(one.queries) == 2 and set(one.qrels) == {q["id"] for q in one.queries} <= set(QRELS)
    relevant = {d for q in one.qrels for d in QRELS[q]}
    ids = {d["id"] for d in one.corpus}
    assert relevant <= ids and len(ids) == max(4, len(relevant))
    again = load_judge_set(JudgeParams(path=folder, task=TASK, queries=2, max_corpus=4), seed=7)
    assert again == one  # seeded
    whole = load_judge_set(JudgeParams(path=folder, task=TASK, queries=50), seed=7)
    assert len(whole.queries) == 3 and len(whole.corpus) == len(DOCS)  # q4 has no judgement


def test_split_test_is_refused_naming_the_param(tmp_path):
    write_beir(tmp_path / "beir")
    (tmp_path / "params.yaml").write_text("judge: {path: beir, split: test, task: t}\n")
    with pytest.raises(ParamsError, match=r"judge\.split: not a test split"):
        load_params(tmp_path / "params.yaml")


def make_project(root: Path, encoder_dir: Path, llm_dir: Path, judge: str, score: str = "{}") -> None:
    write_beir(root / "beir")
    (root / "params.yaml").write_text(
        textwrap.dedent(
            f"""\
            base: {{threads: 1, device: cpu, seed: 3}}
            llm: {{model: {llm_dir}, dtype: float32, cache_path: cache/llm.duckdb}}
            encoder: {{model: {encoder_dir}, cache_path: cache/embeddings.duckdb}}
            score: {score}
            judge: {judge}
            select: {{rrf_k: 0}}
            """
        )
    )


def read_stage(root: Path) -> tuple[dict, list[tuple], list[tuple]]:
    metrics = json.loads((root / "metrics" / "judge.json").read_text())
    con = duckdb.connect(str(root / "warehouse" / "judge.duckdb"), read_only=True)
    try:
        rankings = con.execute("SELECT * FROM judge_rankings ORDER BY query_id, knn_rank").fetchall()
        report = con.execute("SELECT * FROM judge_report").fetchall()
    finally:
        con.close()
    return metrics, rankings, report


def test_stage_end_to_end(tiny_bert_dir, tiny_llm_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from python_steps import judge

    # N = the whole corpus: every relevant document is among the candidates.
    make_project(tmp_path, tiny_bert_dir, tiny_llm_dir, f"{{path: beir, task: '{TASK}', queries: 3, top_n: 6}}")
    monkeypatch.chdir(tmp_path)
    judge.main()
    out = capsys.readouterr().out
    metrics, rankings, report = read_stage(tmp_path)
    assert set(metrics["ndcg_at_10"]) == {"knn", "bm25", "ql", "rc", "fused"}
    assert all(0 <= v <= 1 for v in metrics["ndcg_at_10"].values())
    assert set(metrics["best_weights"]) == {"ql", "rc", "knn", "bm25"} and metrics["best_from"] == "grid"
    assert metrics["queries"] == 3 and metrics["top_n"] == 6 and len(metrics["grid"]) == 80
    assert metrics["recall_at_top_n"] == 1.0 and metrics["corpus_docs"] == len(DOCS)
    assert all(set(p) == {"weights", "ndcg_at_10"} for p in metrics["grid"])
    assert len(rankings) == 18 and all(r[4] is not None and r[5] is not None for r in rankings)  # ql_rank, rc_rank
    assert sum(r[-1] for r in rankings) == sum(sum(j.values()) for j in QRELS.values())  # every label
    assert all(r[6] is not None for r in rankings)  # bm25_rank
    assert len(report) == 5 + 80 and sum(r[-1] for r in report) == 1  # one best
    assert "nDCG@10" in out and "fused" in out and "best of 80" in out

    judge.main()  # a re-run scores nothing: every prompt is in the LLM cache
    assert "0 scored" in capsys.readouterr().out
    assert read_stage(tmp_path)[0] == metrics


def test_stage_ql_only(tiny_bert_dir, tiny_llm_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from python_steps import judge

    make_project(tmp_path, tiny_bert_dir, tiny_llm_dir, f"{{path: beir, task: '{TASK}', queries: 2, top_n: 4}}",
                 score="{methods: [ql]}")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    judge.main()
    metrics, rankings, _ = read_stage(tmp_path)
    assert "rc" not in metrics["ndcg_at_10"] and "fused" not in metrics["ndcg_at_10"]
    assert metrics["methods"] == ["ql"] and len(metrics["grid"]) == 26 and metrics["best_weights"]["rc"] == 0
    assert len(rankings) == 8 and all(r[5] is None and r[4] is not None for r in rankings)
    assert "QL: 0 prompts cached, 8 scored" in capsys.readouterr().out


def test_stage_with_no_queries_loads_no_model(tmp_path, monkeypatch, capsys):
    from python_steps import judge

    # Model paths that do not exist: loading either would fail the stage.
    make_project(tmp_path, tmp_path / "no_encoder", tmp_path / "no_llm", f"{{path: beir, task: '{TASK}', queries: 0}}")
    monkeypatch.chdir(tmp_path)
    judge.main()
    metrics, rankings, report = read_stage(tmp_path)
    assert metrics["queries"] == 0 and metrics["grid"] == [] and rankings == [] and report == []
    assert metrics["best_weights"] == GECKO_WEIGHTS
    assert metrics["ndcg_at_10"] == {}
    assert "nothing judged" in capsys.readouterr().out
