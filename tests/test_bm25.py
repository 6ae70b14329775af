"""BM25 (pipeline/retrieval/bm25.py): scores, top passages, and the hybrid neighbors table."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.retrieval.bm25 import BM25Index, hybrid_neighbors, passage_text

EVAL = Path(__file__).resolve().parent.parent / "data" / "eval"

IDS = ["p1", "p2", "p3", "p4"]
TEXTS = ["cats chase mice in barns", "dogs chase cats", "stock markets fell sharply", "mice eat cheese and grain"]


def test_scores_follow_term_overlap_and_stemming():
    index = BM25Index.build(IDS, TEXTS)
    scores = index.scores("which mouse eats cheese")  # no exact "mouse"/"eats": Porter stems "eats" -> "eat"
    assert scores[3] > 0 and scores[2] == 0
    assert index.scores("the of and").tolist() == [0.0] * 4  # stopwords only: nothing matches


def test_top_is_best_first_and_never_returns_non_matching_passages():
    index = BM25Index.build(IDS, TEXTS)
    indices, scores = index.top(["cats chase", "quantum"], 3)
    assert set(indices[0][:2].tolist()) == {0, 1} and indices[0][2] == -1
    assert scores[0][0] >= scores[0][1] > 0
    assert indices[1].tolist() == [-1, -1, -1]


def test_hybrid_adds_bm25_passages_with_their_cosine_and_ranks_both_signals():
    passages = pa.table({"passage_id": IDS, "title": [None, "", "markets", None], "text": TEXTS})
    queries = pa.table({"query_id": ["q1"], "query": ["mice eat cheese"]})
    vectors = np.eye(4, dtype=np.float32)
    query_vectors = np.array([[0.6, 0.8, 0.0, 0.0]], dtype=np.float32)
    # The encoder mined p2 and p1 (cosines 0.8, 0.6); BM25's best passage, p4, is not among them.
    neighbors = pa.table({"query_id": ["q1", "q1"], "passage_id": ["p2", "p1"], "knn_rank": [1, 2],
                          "knn_score": pa.array([0.8, 0.6], pa.float32())})  # fmt: skip
    lookups: list[list[str]] = []

    def passage_vectors(ids):
        lookups.append(ids)
        return vectors[[IDS.index(i) for i in ids]]

    plain, stats = hybrid_neighbors(neighbors, passages, queries, query_vectors, passage_vectors)
    assert plain["passage_id"].to_pylist() == ["p2", "p1"] and plain["knn_rank"].to_pylist() == [1, 2]
    assert plain["bm25_rank"].to_pylist() == [2, 1]  # p1 shares "mice"; p2 nothing (tie at 0 -> lower id first)
    assert stats["extra_pairs"] == 0 and lookups == []

    hybrid, stats = hybrid_neighbors(neighbors, passages, queries, query_vectors, passage_vectors, top_n=1)
    rows = hybrid.to_pylist()
    assert [(r["passage_id"], r["knn_rank"], r["bm25_rank"], r["mined_by"]) for r in rows] == [
        ("p2", 1, 3, "knn"), ("p1", 2, 2, "knn"), ("p4", 3, 1, "bm25"),
    ]  # fmt: skip
    assert rows[2]["knn_score"] == pytest.approx(0.0) and rows[2]["bm25_score"] > rows[1]["bm25_score"] > 0
    assert stats["extra_pairs"] == 1 and lookups == [["p4"]]


@pytest.mark.slow
def test_bm25_reproduces_beir_on_full_scifact_test():
    """BEIR's BM25 (Elasticsearch, k1 0.9, b 0.4) reads nDCG@10 0.665 on SciFact test."""
    from pipeline.evaluation.judge import ndcg_at_10
    from pipeline.labelled import read_beir

    data = read_beir(EVAL / "scifact", "test")
    ids = [d["id"] for d in data.corpus]
    index = BM25Index.build(ids, [passage_text(d["title"], d["text"]) for d in data.corpus])
    top, _ = index.top([q["text"] for q in data.queries], 10)
    ndcg = statistics.mean(
        ndcg_at_10([ids[i] for i in row if i >= 0], data.qrels[q["id"]]) for q, row in zip(data.queries, top)
    )
    assert abs(ndcg - 0.665) < 0.01, ndcg
