"""Evaluation: local BEIR / STS files through mteb, scored against hand-computed values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.mteb_eval import MtebEncoder, format_texts, retrieval_task, run_tasks, sts_task
from pipeline.labelled import EvalDataError, read_beir, read_sts

EVAL = Path(__file__).resolve().parents[1] / "data/eval"
TASK = "Find the document"

# Cosine of each query with each document (rows q1..q3, columns d1..d6); no ties within a row.
SIMS = {
    "q1": [0.50, 0.10, 0.40, 0.30, 0.20, 0.05],
    "q2": [0.05, 0.30, 0.20, 0.40, 0.50, 0.10],
    "q3": [0.20, 0.30, 0.10, 0.05, 0.40, 0.50],
}
QRELS = {"q1": {"d3": 1}, "q2": {"d2": 2, "d5": 1}, "q3": {"d6": 1}}
DOCS = {f"d{i}": (f"T{i}", f"doc {i} text") for i in range(1, 7)}
DOCS["d4"] = ("", "doc 4 text")  # no title: mteb passes the text alone
QUERIES = {"q1": "first query", "q2": "second query", "q3": "third query", "q4": "unjudged query"}


class TableEncoder:
    """Fake encoder: each known text has a fixed unit vector; an unknown text is a test failure."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, texts, batch_size=64):
        missing = [t for t in texts if t not in self.vectors]
        assert not missing, f"unexpected texts: {missing}"
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


class HashEncoder:
    """Fake encoder for formatting tests: any text gets a deterministic unit vector."""

    def encode(self, texts, batch_size=64):
        rows = []
        for text in texts:
            rng = np.random.default_rng(abs(hash(text)) % 2**32)
            v = rng.normal(size=8)
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, dtype=np.float32)


def write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for doc_id, (title, text) in DOCS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for query_id, text in QUERIES.items():
            f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, ds in QRELS.items() for d, s in ds.items()]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def retrieval_vectors() -> dict[str, np.ndarray]:
    """Query i is basis vector e_i; a document's i-th coordinate is its cosine with query i.

    The last coordinate pads each document to unit length without touching any query.
    """
    vectors = {}
    for i, query_id in enumerate(SIMS):
        vectors[QUERIES[query_id]] = np.eye(8)[i]
    for j, (doc_id, (title, text)) in enumerate(DOCS.items()):
        v = np.zeros(8)
        v[:3] = [SIMS[q][j] for q in SIMS]
        v[7] = math.sqrt(1 - (v[:3] ** 2).sum())
        vectors[f"{title} {text}".strip()] = v  # mteb's title + text join for models without prompts
    return vectors


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"))


def test_retrieval_scores_match_hand_computed(beir):
    scores = run_tasks(MtebEncoder(TableEncoder(retrieval_vectors()), "fake"), [retrieval_task("tiny", beir)])["tiny"]
    # Rankings read off SIMS: q1 d1 d3 d4 d5 d2 d6; q2 d5 d4 d2 d3 d6 d1; q3 d6 d5 d2 d1 d3 d4.
    # trec_eval nDCG: gain = relevance grade, discount log2(rank + 1).
    q1 = (1 / math.log2(3)) / 1
    q2 = (1 / math.log2(2) + 2 / math.log2(4)) / (2 / math.log2(2) + 1 / math.log2(3))
    q3 = 1.0
    assert scores["ndcg_at_10"] == pytest.approx((q1 + q2 + q3) / 3, abs=1e-5)
    # AP: q1 hit at rank 2; q2 hits at ranks 1 and 3; q3 at rank 1.
    assert scores["map_at_100"] == pytest.approx((1 / 2 + (1 / 1 + 2 / 3) / 2 + 1) / 3, abs=1e-5)
    assert scores["recall_at_100"] == pytest.approx(1.0)


def test_beir_reader_keeps_only_judged_queries(beir):
    data = read_beir(beir, "test")
    assert [q["id"] for q in data.queries] == ["q1", "q2", "q3"]
    assert data.qrels == QRELS
    assert len(data.corpus) == 6


def test_sts_spearman_matches_hand_value(tmp_path):
    # Predicted cosines rise with k; gold scores swap the last two -> ranks 1 2 3 5 4.
    cosines = [0.1, 0.3, 0.5, 0.7, 0.9]
    gold = [0.5, 1.0, 2.0, 4.8, 4.0]
    rows = ["sentence1\tsentence2\tscore\tgenre"]
    vectors = {"anchor": np.eye(8)[0]}
    for k, (c, g) in enumerate(zip(cosines, gold)):
        other = f'pair {k} says "hi'  # a bare quote: the file must be read without quote handling
        vectors[other] = np.array([c, math.sqrt(1 - c * c)] + [0.0] * 6)
        rows.append(f"anchor\t{other}\t{g}\tnews")
    (tmp_path / "test.tsv").write_text("\n".join(rows) + "\n")
    scores = run_tasks(MtebEncoder(TableEncoder(vectors), "fake"), [sts_task("tiny_sts", tmp_path)])["tiny_sts"]
    n, d2 = 5, 1**2 + 1**2
    assert scores["cosine_spearman"] == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)), abs=1e-5)  # 0.9


def test_prefixes_on_and_off(beir, tmp_path):
    from pipeline.retrieval.encoder import TextFormat

    seen_on, seen_off = [], []
    task = retrieval_task("tiny", beir, task=TASK)
    run_tasks(MtebEncoder(HashEncoder(), "on", TextFormat(), seen=seen_on), [task])
    run_tasks(MtebEncoder(HashEncoder(), "off", None, seen=seen_off), [task])
    assert f"task: {TASK} | query: first query" in seen_on
    assert "title: T1 | text: doc 1 text" in seen_on
    assert "title: none | text: doc 4 text" in seen_on  # Gecko writes "none" for a missing title
    assert "first query" in seen_off and "T1 doc 1 text" in seen_off and "doc 4 text" in seen_off
    assert not any(t.startswith(("task:", "title:")) for t in seen_off)

    # STS: both sentences of a pair are queries of the task.
    (tmp_path / "test.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t1\nc\td\t2\ne\tf\t3\n")
    seen_sts = []
    run_tasks(MtebEncoder(HashEncoder(), "on", TextFormat(), seen=seen_sts), [sts_task("s", tmp_path, task="Similar")])
    assert sorted(seen_sts) == sorted(f"task: Similar | query: {x}" for x in "abcdef")


def test_format_texts_uses_body_not_joined_text():
    batch = {"id": ["d1"], "text": ["T1 body"], "title": ["T1"], "body": ["body"]}
    from pipeline.retrieval.encoder import TextFormat

    assert format_texts([batch], side="document", task="x", text_format=TextFormat()) == ["title: T1 | text: body"]
    assert format_texts([batch], side="document", task="x", text_format=None) == ["T1 body"]


def test_missing_qrels_split_names_the_file(beir):
    with pytest.raises(EvalDataError, match=r"qrels/dev\.tsv: qrels file not found"):
        read_beir(beir, "dev")


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\n", "test.tsv:3: expected 3 tab-separated columns, got 2"),
        ("sentence1\tsentence2\tscore\na\tb\t1\nc\td\tfive\n", "test.tsv:3: score 'five' is not a number"),
        ("s1\ts2\tscore\na\tb\t1\n", "test.tsv:1: header must name sentence1, sentence2 and score"),
    ],
)
def test_malformed_sts_names_file_and_line(tmp_path, content, where):
    (tmp_path / "test.tsv").write_text(content)
    with pytest.raises(EvalDataError, match=where):
        read_sts(tmp_path / "test.tsv")


def test_malformed_beir_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "b")
    with (folder / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d7", "text": \n')
    with pytest.raises(EvalDataError, match=r"corpus\.jsonl:7: not valid JSON"):
        read_beir(folder, "test")
    folder = write_beir(tmp_path / "c")
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\td1\n")
    with pytest.raises(EvalDataError, match=r"qrels/test\.tsv:6: expected 3 tab-separated columns"):
        read_beir(folder, "test")
    folder = write_beir(tmp_path / "d")
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\td99\t1\n")
    with pytest.raises(EvalDataError, match=r"corpus ids not in .*corpus\.jsonl: \['d99'\]"):
        read_beir(folder, "test")


def test_eval_params_check_names_and_files(tmp_path, beir):
    from pipeline.params import ParamsError, load_params

    good = f"eval:\n  retrieval:\n    tiny: {{path: {beir}, task: t}}\n"
    (tmp_path / "params.yaml").write_text(good)
    assert load_params(tmp_path / "params.yaml").eval.retrieval["tiny"].split == "test"
    (tmp_path / "params.yaml").write_text(good.replace("task: t", "task: t, split: dev"))
    with pytest.raises(ParamsError, match=r"eval set 'tiny': file not found: .*qrels/dev\.tsv"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(good.replace("tiny:", "Tiny Set:"))
    with pytest.raises(ParamsError, match="lowercase"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_minilm_reproduces_published_mteb_scores():
    """Acceptance: plain all-MiniLM-L6-v2, no prefixes, within 0.005 of MTEB's published scores.

    Full SciFact test + STSBenchmark test: minutes on a CPU.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.retrieval.encoder import Encoder

    encoder = Encoder.load("minilm", device="cpu", threads=2)
    tasks = [retrieval_task("scifact", EVAL / "scifact"), sts_task("stsb", EVAL / "stsb")]
    scores = run_tasks(MtebEncoder(encoder, "minilm"), tasks)
    print(scores)
    assert scores["scifact"]["ndcg_at_10"] == pytest.approx(0.64508, abs=0.005)
    assert scores["stsb"]["cosine_spearman"] == pytest.approx(0.82032, abs=0.005)


def test_stage_writes_metrics_and_plot_for_base_and_trained(tmp_path, beir, capsys):
    """The stage end to end on the tiny set; the bundled MiniLM folder stands in for a trained model."""
    from pipeline.retrieval.encoder import resolve_model_path
    from python_steps.evaluate import main

    trained = resolve_model_path("minilm")[0]
    (tmp_path / "params.yaml").write_text(
        "encoder:\n  cache_path: null\n"
        f"train:\n  output: {trained}\n"
        f"eval:\n  retrieval:\n    tiny: {{path: {beir}, task: {TASK}}}\n  base_prefixes: true\n  prefixes: true\n"
        "  metrics_path: out/eval.json\n  plot_path: out/plot.json\n"
    )
    main([str(tmp_path / "params.yaml")])
    metrics = json.loads((tmp_path / "out/eval.json").read_text())
    assert set(metrics) == {"base", "trained", "intervals"}
    # Same weights: every paired difference is exactly 0.
    assert metrics["intervals"] == {"trained_vs_base": {"tiny": {"diff": 0.0, "low": 0.0, "high": 0.0}}}
    assert set(metrics["base"]["tiny"]) == {"ndcg_at_10", "recall_at_100", "map_at_100"}
    assert metrics["base"]["tiny"] == metrics["trained"]["tiny"]  # same weights, same scores
    rows = json.loads((tmp_path / "out/plot.json").read_text())
    assert [(r["model"], r["metric"]) for r in rows[:2]] == [("base", "map_at_100"), ("trained", "map_at_100")]
    out = capsys.readouterr().out
    assert "tiny ndcg_at_10" in out and "delta" in out


def test_prefixes_per_category_route_each_set_to_its_format(tmp_path, beir, monkeypatch):
    """`eval.prefixes: {sts: false}`: the trained model reads STS pairs raw and retrieval in the Gecko
    format; with the same weights and both raw, its STS score is the base's to the last digit."""
    from pipeline.evaluation import mteb_eval
    from pipeline.retrieval.encoder import resolve_model_path
    from python_steps.evaluate import main

    (tmp_path / "sts").mkdir()
    (tmp_path / "sts" / "dev.tsv").write_text(
        "sentence1\tsentence2\tscore\n"
        "a cat sits\ta cat is sitting\t5\nthe sky is blue\tprices rose\t0\nhe runs fast\the is running\t3.5\n"
        "rain falls\tit is raining\t4.5\nan old car\ta red apple\t0.5\n"
    )
    calls = []

    def recording(model, tasks, **kwargs):
        calls.append((model.name, model.text_format is not None, sorted(t.metadata.name for t in tasks)))
        return real(model, tasks, **kwargs)

    real = mteb_eval.run_tasks
    monkeypatch.setattr(mteb_eval, "run_tasks", recording)
    trained = resolve_model_path("minilm")[0]
    (tmp_path / "params.yaml").write_text(
        "encoder:\n  cache_path: null\n"
        f"train:\n  output: {trained}\n"
        f"eval:\n  retrieval:\n    tiny: {{path: {beir}, task: {TASK}}}\n"
        "  sts:\n    sim: {path: sts, split: dev, task: Similar}\n"
        "  prefixes: {sts: false}\n  metrics_path: out/eval.json\n  plot_path: out/plot.json\n"
    )
    main([str(tmp_path / "params.yaml")])
    assert calls == [("base", False, ["sim", "tiny"]), ("trained", True, ["tiny"]), ("trained", False, ["sim"])]
    metrics = json.loads((tmp_path / "out/eval.json").read_text())
    assert list(metrics["trained"]) == ["tiny", "sim", "versatility"]  # the params' order, not the runs'
    assert metrics["trained"]["sim"] == metrics["base"]["sim"]


def test_prefixes_setting_names_only_eval_categories(tmp_path, beir):
    from pipeline.params import ParamsError, load_params

    sets = f"eval:\n  retrieval:\n    tiny: {{path: {beir}, task: t}}\n"
    (tmp_path / "params.yaml").write_text(sets + "  prefixes: {sts: false, stsb: true}\n")
    with pytest.raises(ParamsError, match=r"eval\.prefixes"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(sets + "  prefixes: {classification: false}\n  base_prefixes: {sts: true}\n")
    ev = load_params(tmp_path / "params.yaml").eval
    assert [ev.uses_prefixes(k) for k in ("retrieval", "sts", "classification")] == [True, True, False]
    assert [ev.uses_prefixes(k, "base") for k in ("retrieval", "sts")] == [True, True]


def test_stage_fails_with_one_line_on_bad_data(tmp_path, beir):
    from python_steps.evaluate import main

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test.tsv").write_text("sentence1\tsentence2\tscore\na\tb\n")
    (tmp_path / "params.yaml").write_text(
        f"eval:\n  retrieval:\n    tiny: {{path: {beir}, task: t}}\n  sts:\n    broken: {{path: broken, task: t}}\n"
    )
    with pytest.raises(SystemExit, match=r"evaluate: .*broken/test\.tsv:2: expected 3 tab-separated columns"):
        main([str(tmp_path / "params.yaml")])
