"""Classification and clustering evaluation (MTEB's protocols on local `text label` TSVs), and the
versatility summary: tiny sets and fake encoders, checked against sklearn run by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures_encoder import tiny_bert_dir  # noqa: F401 - session fixture
from test_evaluation import EVAL, HashEncoder, TableEncoder

from pipeline.evaluation.mteb_eval import (
    VERSATILITY,
    MtebEncoder,
    classification_task,
    clustering_subsets,
    clustering_task,
    retrieval_task,
    run_tasks,
    versatility,
    versatility_line,
)
from pipeline.labelled import EvalDataError, held_out, read_labelled

LABELS = ("card", "loan", "cash")


def write_labelled(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


def noisy_set(folder: Path, n_train: int = 12, n_test: int = 6, noise: float = 0.9) -> dict[str, np.ndarray]:
    """train.tsv and test.tsv of three labels, each text a noisy copy of its label's direction.

    Returns the vectors a `TableEncoder` serves: overlapping classes, so accuracy is neither 0 nor 1.
    """
    rng = np.random.default_rng(7)
    vectors: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for k, label in enumerate(LABELS):
            for i in range(n):
                text = f'{split} {label} "{i}'  # a bare quote: read without quote handling
                v = np.eye(8)[k] + noise * rng.normal(size=8)
                vectors[text] = v / np.linalg.norm(v)
                rows.append((text, label))
        write_labelled(folder / f"{split}.tsv", rows)
    return vectors


def mteb_protocol_by_hand(folder: Path, vectors, samples_per_label: int, n_experiments: int) -> tuple[float, float]:
    """MTEB's classification protocol written out with sklearn: the reference the task must match."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train, test = read_labelled(folder / "train.tsv"), read_labelled(folder / "test.tsv")
    x_test = np.stack([vectors[t] for t in test.texts])
    idxs = list(range(len(train.texts)))
    accuracies, f1s = [], []
    for _ in range(n_experiments):
        np.random.RandomState(42).shuffle(idxs)  # re-seeded each time, shuffling the previous order
        counts: dict[str, int] = {}
        picked = []
        for i in idxs:
            if counts.get(train.labels[i], 0) < samples_per_label:
                picked.append(i)
                counts[train.labels[i]] = counts.get(train.labels[i], 0) + 1
        model = LogisticRegression(max_iter=100, random_state=42)
        model.fit(np.stack([vectors[train.texts[i]] for i in picked]), [train.labels[i] for i in picked])
        predicted = model.predict(x_test)
        accuracies.append(accuracy_score(test.labels, predicted))
        f1s.append(f1_score(test.labels, predicted, average="macro"))
    return float(np.mean(accuracies)), float(np.mean(f1s))


def test_classification_follows_mtebs_protocol(tmp_path):
    vectors = noisy_set(tmp_path)
    task = classification_task("toy", tmp_path, samples_per_label=4, n_experiments=3)
    scores = run_tasks(MtebEncoder(TableEncoder(vectors), "fake"), [task])["toy"]
    accuracy, f1 = mteb_protocol_by_hand(tmp_path, vectors, samples_per_label=4, n_experiments=3)
    assert 0.2 < accuracy < 1.0  # the noise makes the check meaningful
    assert scores == {"accuracy": pytest.approx(accuracy, abs=1e-5), "f1": pytest.approx(f1, abs=1e-5)}


def test_clustering_separates_clear_groups_and_averages_subsets(tmp_path):
    rows, vectors = [], {}
    for k, label in enumerate(LABELS):
        for i in range(10):
            text = f"{label} title {i}"
            vectors[text] = np.eye(8)[k] * 0.99 + 0.01 * np.eye(8)[7]
            rows.append((text, label))
    write_labelled(tmp_path / "test.tsv", rows)
    scores = run_tasks(MtebEncoder(TableEncoder(vectors), "fake"), [clustering_task("groups", tmp_path, n_subsets=3)])
    assert scores["groups"] == {"v_measure": pytest.approx(1.0)}


def test_clustering_subsets_are_seeded_sized_and_without_repeats():
    subsets = clustering_subsets(20_000, 10)
    assert [len(s) for s in subsets] == list(range(1_000, 10_001, 1_000))
    assert all(len(set(s)) == len(s) for s in subsets)
    assert subsets == clustering_subsets(20_000, 10)  # seed 42, as MTEB
    assert [len(s) for s in clustering_subsets(30, 3)] == [30, 30, 30]  # a small set: every subset is all of it


def test_prefixes_format_labelled_texts_as_queries_of_the_task(tmp_path):
    from pipeline.retrieval.encoder import TextFormat

    noisy_set(tmp_path, n_train=2, n_test=1)
    tasks = [classification_task("c", tmp_path, task="Classify the intent", samples_per_label=1, n_experiments=1)]
    tasks.append(clustering_task("k", tmp_path, split="train", task="Find the topic", n_subsets=1))
    seen_on, seen_off = [], []
    run_tasks(MtebEncoder(HashEncoder(), "on", TextFormat(), seen=seen_on), tasks)
    run_tasks(MtebEncoder(HashEncoder(), "off", None, seen=seen_off), tasks)
    assert 'task: Classify the intent | query: test card "0' in seen_on
    assert 'task: Find the topic | query: train loan "1' in seen_on
    assert all(t.startswith("task: ") for t in seen_on)
    assert 'test card "0' in seen_off and not any(t.startswith("task:") for t in seen_off)


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("text\tlabel\na\tx\nb\n", r"test\.tsv:3: expected 2 tab-separated columns \(text, label\), got 1"),
        ("text\tlabel\na\tx\nb\ty\tz\n", r"test\.tsv:3: expected 2 tab-separated columns"),
        ("text\tlabel\na\tx\n \ty\n", r"test\.tsv:3: empty text"),
        ("text\tlabel\na\tx\nb\t\n", r"test\.tsv:3: empty label"),
        ("sentence\tlabel\na\tx\n", r"test\.tsv:1: expected the header 'text<TAB>label'"),
        ("text\tlabel\na\tx\nb\tx\n", r"test\.tsv: needs texts of at least 2 labels"),
    ],
)
def test_malformed_labelled_file_names_file_and_line(tmp_path, content, where):
    (tmp_path / "test.tsv").write_text(content)
    with pytest.raises(EvalDataError, match=where):
        read_labelled(tmp_path / "test.tsv")


def test_holdout_dev_split_is_disjoint_and_content_derived(tmp_path):
    texts = [f"text {i}" for i in range(2_000)]
    dev = {t for t in texts if held_out(t, 0.2)}
    assert 300 < len(dev) < 500  # about a fifth
    assert dev == {t for t in texts if held_out(t, 0.2)}  # deterministic: the mix and evaluate agree
    assert {t for t in texts if held_out(t, 0.1)} <= dev  # a smaller share is a subset
    assert not any(held_out(t, 0.0) for t in texts)

    rows = [(t, LABELS[i % 3]) for i, t in enumerate(texts[:300])] + [(texts[0], LABELS[0])]  # a duplicate
    write_labelled(tmp_path / "train.tsv", rows)
    task = classification_task("dev", tmp_path, split="train", holdout=0.2)
    task.load_data()
    pool, scored = set(task.dataset["train"]["text"]), set(task.dataset["heldout"]["text"])
    assert scored and pool and not pool & scored
    assert pool | scored == set(texts[:300])
    with pytest.raises(EvalDataError, match="split must be 'train'"):
        classification_task("dev", tmp_path, split="test", holdout=0.2)
    with pytest.raises(EvalDataError, match="scoring the classifier's own pool"):
        classification_task("dev", tmp_path, split="train")


def test_versatility_means_main_metrics_per_category(tmp_path):
    noisy_set(tmp_path)
    tasks = [classification_task("c1", tmp_path), classification_task("c2", tmp_path), clustering_task("k", tmp_path)]
    scores = {"c1": {"accuracy": 0.8, "f1": 0.1}, "c2": {"accuracy": 0.6, "f1": 0.1}, "k": {"v_measure": 0.4}}
    assert versatility(scores, tasks) == {"classification": 0.7, "clustering": 0.4, "mean": 0.55}
    results = {"base": {VERSATILITY: {"clustering": 0.4, "mean": 0.4}}, "trained": {VERSATILITY: {"clustering": 0.5, "mean": 0.5}}}
    assert versatility_line(results) == "versatility (base -> trained): clustering 0.4000 -> 0.5000 | mean 0.4000 -> 0.5000"


def eval_params_text(tmp_path: Path, body: str) -> Path:
    (tmp_path / "params.yaml").write_text(body)
    return tmp_path / "params.yaml"


def test_eval_params_check_classification_and_clustering_sets(tmp_path):
    from pipeline.params import ParamsError, load_params

    noisy_set(tmp_path / "b77")
    good = "eval:\n  retrieval: {}\n  classification:\n    b77: {path: b77, task: Classify}\n  clustering:\n    k: {path: b77, task: Topic}\n"
    ev = load_params(eval_params_text(tmp_path, good)).eval
    assert (ev.classification["b77"].samples_per_label, ev.classification["b77"].n_experiments) == (8, 10)
    assert ev.clustering["k"].n_subsets == 10
    bad = {
        good.replace("b77: {path: b77,", "versatility: {path: b77,"): "'versatility' is reserved",
        good.replace("k: {path: b77,", "k: {path: b77, split: dev,"): r"eval set 'k': file not found: .*b77/dev\.tsv",
        good.replace("task: Classify", "task: Classify, split: train"): "set holdout",
        good.replace("task: Classify", "task: Classify, holdout: 0.2"): "set split: train",
        good.replace("task: Classify", "task: Classify, samples_per_label: 0"): r"eval\.classification\.b77\.samples_per_label",
    }
    for text, message in bad.items():
        with pytest.raises(ParamsError, match=message):
            load_params(eval_params_text(tmp_path, text))
    (tmp_path / "b77" / "train.tsv").unlink()
    with pytest.raises(ParamsError, match=r"eval set 'b77': file not found: .*b77/train\.tsv"):
        load_params(eval_params_text(tmp_path, good))


def test_stage_writes_classification_clustering_and_versatility(tmp_path, tiny_bert_dir, capsys):  # noqa: F811
    from python_steps.evaluate import main

    noisy_set(tmp_path / "b77")
    (tmp_path / "beir").mkdir()
    from test_evaluation import write_beir

    write_beir(tmp_path / "beir" / "set")
    (tmp_path / "params.yaml").write_text(
        f"encoder:\n  model: {tiny_bert_dir}\n  cache_path: null\n"
        f"train:\n  output: {tiny_bert_dir}\n"
        "eval:\n  retrieval:\n    tiny: {path: beir/set, task: Find}\n"
        "  classification:\n    b77: {path: b77, task: Classify, samples_per_label: 2, n_experiments: 2}\n"
        "  clustering:\n    topics: {path: b77, task: Topic, n_subsets: 2}\n"
        "  metrics_path: out/eval.json\n  plot_path: out/plot.json\n"
    )
    main([str(tmp_path / "params.yaml")])
    metrics = json.loads((tmp_path / "out/eval.json").read_text())
    for model in ("base", "trained"):
        assert set(metrics[model]) == {"tiny", "b77", "topics", VERSATILITY}
        assert set(metrics[model]["b77"]) == {"accuracy", "f1"} and set(metrics[model]["topics"]) == {"v_measure"}
        main_scores = [metrics[model]["tiny"]["ndcg_at_10"], metrics[model]["b77"]["accuracy"], metrics[model]["topics"]["v_measure"]]
        assert metrics[model][VERSATILITY] == {
            "retrieval": main_scores[0], "classification": main_scores[1], "clustering": main_scores[2],
            "mean": pytest.approx(sum(main_scores) / 3, abs=1e-5),
        }  # fmt: skip
    out = capsys.readouterr().out
    assert "b77 accuracy" in out and "topics v_measure" in out and "versatility (base -> trained): retrieval" in out


@pytest.mark.slow
def test_minilm_reproduces_published_classification_and_clustering_scores(tmp_path):
    """Acceptance: plain all-MiniLM-L6-v2, no prefixes, within 0.02 of MTEB's published scores
    (Banking77 accuracy 0.80042, TwentyNewsgroupsClustering V-measure 0.4649). Minutes on a CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.evaluation.mteb_eval import CachedEncoder
    from pipeline.retrieval.embedding_cache import EmbeddingCache
    from pipeline.retrieval.encoder import Encoder

    encoder = Encoder.load("minilm", device="cpu", threads=2)
    tasks = [classification_task("banking77", EVAL / "banking77"), clustering_task("tng", EVAL / "twentynewsgroups")]
    # The clustering subsets repeat titles: the cache embeds each distinct text once.
    with EmbeddingCache(tmp_path / "cache.duckdb") as cache:
        scores = run_tasks(MtebEncoder(CachedEncoder(encoder, cache), "minilm"), tasks)
    print(scores)
    assert scores["banking77"]["accuracy"] == pytest.approx(0.80042, abs=0.02)
    assert scores["tng"]["v_measure"] == pytest.approx(0.4649, abs=0.02)


def test_retrieval_task_unaffected_by_new_categories(tmp_path):
    from test_evaluation import write_beir

    task = retrieval_task("r", write_beir(tmp_path / "b"))
    assert versatility({"r": {"ndcg_at_10": 0.5}}, [task]) == {"retrieval": 0.5, "mean": 0.5}


def test_dev_set_and_train_mix_must_hold_out_the_same_share(tmp_path):
    from pipeline.params import ParamsError, load_params

    noisy_set(tmp_path / "b77")
    text = (
        "train:\n  mix: {path: b77/train.tsv, kind: classification, fraction: 0.1, task: Classify, holdout: 0.2}\n"
        "eval:\n  retrieval: {}\n  classification:\n    b77_dev: {path: b77, split: train, holdout: 0.2, task: Classify}\n"
    )
    params = load_params(eval_params_text(tmp_path, text))
    assert params.train.mix[0].holdout == params.eval.classification["b77_dev"].holdout == 0.2
    for mix_holdout in ("0.1", "0"):
        with pytest.raises(ParamsError, match="the model trains on the dev set"):
            load_params(eval_params_text(tmp_path, text.replace("holdout: 0.2}\neval", f"holdout: {mix_holdout}}}\neval")))


def test_report_shows_the_versatility_line(tmp_path):
    from pipeline.report import eval_section

    results = {
        model: {"b77": {"accuracy": acc}, VERSATILITY: {"classification": acc, "mean": acc}}
        for model, acc in (("base", 0.8), ("trained", 0.82))
    }
    (tmp_path / "eval.json").write_text(json.dumps(results))
    body = eval_section(tmp_path / "eval.json").body
    assert "versatility (base -&gt; trained): classification 0.8000 -&gt; 0.8200" in body
