"""Dev metrics for model selection: nDCG@10 against pytrec_eval and mteb, Spearman against mteb."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures_encoder import SENTENCES, tiny_bert_dir, tiny_encoder  # noqa: F401  (session fixtures)
from pipeline.params import DevParams, EvalSetParams, RetrievalSetParams
from pipeline.retrieval.encoder import TextFormat
from pipeline.training.model_selection import DevScorer, ModelSelector, cosine_spearman, mean_ndcg, ndcg, ranked

TASK = "Find the passage"


def test_ndcg_hand_computed_graded_and_no_relevant():
    # Ranking d1 d2 d3 with d2 graded 2, d3 graded 1 (d4 relevant, never retrieved).
    # DCG = 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3) + 1/log2(4).
    got = ndcg(["d1", "d2", "d3"], {"d2": 2, "d3": 1, "d4": 1, "d9": 0})
    assert got == pytest.approx((2 / np.log2(3) + 0.5) / (2 + 1 / np.log2(3) + 0.5))
    assert ndcg(["d1"], {"d1": 0}) == 0.0  # no relevant document: 0, as trec_eval


def test_ranked_breaks_ties_like_trec_eval():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5], dtype=np.float32)
    ids = ["a", "b", "c", "d", "e"]
    assert [ids[i] for i in ranked(scores, ids, 3)] == ["b", "e", "c"]  # ties: descending id
    assert [ids[i] for i in ranked(scores, ids, 10)] == ["b", "e", "c", "a", "d"]


def test_mean_ndcg_equals_pytrec_eval_with_ties_and_grades():
    import pytrec_eval

    rng = np.random.default_rng(0)
    queries = rng.normal(size=(12, 8))
    docs = rng.normal(size=(40, 8))
    docs[5] = docs[6]  # an exact tie between two documents
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    query_ids = [f"q{i}" for i in range(12)]
    doc_ids = [f"d{i:02d}" for i in range(40)]
    qrels = {q: {doc_ids[j]: int(rng.integers(0, 3)) for j in rng.choice(40, 6, replace=False)} for q in query_ids}
    qrels["q0"] = {"d05": 1, "d06": 2}  # graded, and tied in every ranking
    scores = queries @ docs.T
    run = {q: {d: float(s) for d, s in zip(doc_ids, row)} for q, row in zip(query_ids, scores)}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    expected = np.mean([theirs[q]["ndcg_cut_10"] for q in query_ids])
    assert mean_ndcg(queries, docs, query_ids, doc_ids, qrels) == pytest.approx(expected, abs=1e-12)


def write_dev_sets(root: Path) -> DevParams:
    """A BEIR folder (split dev) and an STS folder (split dev) of tiny texts."""
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    topics = ["vaccines", "glaciers", "proteins", "rivers", "foxes", "membranes"]
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"c{i}", "title": t if i % 2 else "", "text": f"{t} are described here"}) + "\n"
                for i, t in enumerate(topics))
    )  # fmt: skip
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"k{i}", "text": f"what about {t}?"}) + "\n" for i, t in enumerate(topics[:4]))
    )
    qrels = "".join(f"k{i}\tc{i}\t1\n" for i in range(4)) + "k0\tc4\t2\n"
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    sts = root / "sts"
    sts.mkdir()
    # Sentences in the tiny tokenizer's vocabulary, so the pairs' cosines differ.
    pairs = [(a, b, float(i % 6)) for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]))]
    (sts / "dev.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    return DevParams(
        retrieval={"tiny": EvalSetParams(path=beir, split="dev", task=TASK)},
        sts={"tiny_sts": EvalSetParams(path=sts, split="dev", task=TASK)},
    )


def test_dev_scorer_matches_mteb_in_the_gecko_format(tiny_encoder, tmp_path):  # noqa: F811
    from pipeline.evaluation.mteb_eval import MtebEncoder, retrieval_task, run_tasks, sts_task

    dev = write_dev_sets(tmp_path)
    ours = DevScorer.from_params(dev, TextFormat(), tmp_path)(tiny_encoder)
    tasks = [retrieval_task("tiny", tmp_path / "beir", "dev", TASK), sts_task("tiny_sts", tmp_path / "sts", "dev", TASK)]
    theirs = run_tasks(MtebEncoder(tiny_encoder, "tiny", TextFormat()), tasks)
    assert ours["tiny"] == pytest.approx(theirs["tiny"]["ndcg_at_10"], abs=1e-5)
    assert ours["tiny_sts"] == pytest.approx(theirs["tiny_sts"]["cosine_spearman"], abs=1e-5)


def test_dev_scorer_scores_only_the_held_out_queries_as_mteb_does(tiny_encoder, tmp_path):  # noqa: F811
    """A retrieval dev set with a holdout: the queries a train.mix retrieval source leaves out, and
    the same subset (and nDCG) as the evaluate stage's retrieval task with that holdout."""
    from pipeline.evaluation.mteb_eval import MtebEncoder, retrieval_task, run_tasks
    from pipeline.labelled import held_out

    dev = write_dev_sets(tmp_path)
    holdout = 0.8  # holds out two of the four queries (text hashes 0.70 and 0.78 of 2^64)
    cut = DevParams(retrieval={"tiny": RetrievalSetParams(path=tmp_path / "beir", split="dev", task=TASK, holdout=holdout)})
    scorer = DevScorer.from_params(cut, TextFormat(), tmp_path)
    everything = DevScorer.from_params(dev, TextFormat(), tmp_path).retrieval["tiny"]
    kept = [q for q, text in zip(everything.query_ids, everything.queries) if held_out(text.split("query: ")[1], holdout)]
    assert 0 < len(kept) < len(everything.query_ids) and scorer.retrieval["tiny"].query_ids == kept
    task = retrieval_task("tiny", tmp_path / "beir", "dev", TASK, holdout=holdout)
    theirs = run_tasks(MtebEncoder(tiny_encoder, "tiny", TextFormat()), [task])
    assert scorer(tiny_encoder)["tiny"] == pytest.approx(theirs["tiny"]["ndcg_at_10"], abs=1e-5)


def test_dev_scorer_formats_queries_with_the_task_and_documents_as_passages(tmp_path):
    dev = write_dev_sets(tmp_path)
    scorer = DevScorer.from_params(dev, TextFormat(), tmp_path)
    assert scorer.retrieval["tiny"].queries[0] == f"task: {TASK} | query: what about vaccines?"
    assert scorer.retrieval["tiny"].docs[:2] == ["title: none | text: vaccines are described here",
                                                 "title: glaciers | text: glaciers are described here"]  # fmt: skip
    assert scorer.sts["tiny_sts"].sentence2[0] == f"task: {TASK} | query: {SENTENCES[1]}"


def test_dev_scorer_reads_raw_categories_as_mteb_does_without_prefixes(tiny_encoder, tmp_path):  # noqa: F811
    """`raw` categories (eval.prefixes false for them) see mteb's own texts and score as mteb does."""
    from pipeline.evaluation.mteb_eval import MtebEncoder, retrieval_task, run_tasks, sts_task

    dev = write_dev_sets(tmp_path)
    scorer = DevScorer.from_params(dev, TextFormat(), tmp_path, raw=("retrieval", "sts"))
    assert scorer.retrieval["tiny"].queries[0] == "what about vaccines?"
    assert scorer.retrieval["tiny"].docs[:2] == ["vaccines are described here", "glaciers glaciers are described here"]
    assert scorer.sts["tiny_sts"].sentence2[0] == SENTENCES[1]
    ours = scorer(tiny_encoder)
    tasks = [retrieval_task("tiny", tmp_path / "beir", "dev", TASK), sts_task("tiny_sts", tmp_path / "sts", "dev", TASK)]
    theirs = run_tasks(MtebEncoder(tiny_encoder, "tiny", None), tasks)
    assert ours["tiny"] == pytest.approx(theirs["tiny"]["ndcg_at_10"], abs=1e-5)
    assert ours["tiny_sts"] == pytest.approx(theirs["tiny_sts"]["cosine_spearman"], abs=1e-5)
    only_sts = DevScorer.from_params(dev, TextFormat(), tmp_path, raw=("sts",))
    assert only_sts.retrieval["tiny"].queries[0] == f"task: {TASK} | query: what about vaccines?"


def test_constant_similarities_score_zero_not_nan():
    a = np.ones((3, 2)) / np.sqrt(2)
    assert cosine_spearman(a, a, [1.0, 2.0, 3.0]) == 0.0


def test_selector_schedule():
    selector = ModelSelector(lambda encoder: {}, every=3, total_steps=7)
    assert [s for s in range(8) if selector.due(s)] == [0, 3, 6, 7]
