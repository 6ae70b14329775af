"""pipeline/retrieval/knn.py: exact top-N equal to a full-matrix reference, ties and memory included."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.retrieval.exact import top_n_search
from pipeline.retrieval.knn import embedding_table, neighbor_tables


def reference_top_n(queries: np.ndarray, passages: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole score matrix, sorted by (score desc, passage index asc)."""
    scores = queries @ passages.T
    index = np.broadcast_to(np.arange(passages.shape[0]), scores.shape)
    order = np.lexsort((index, -scores), axis=1)[:, :n]
    return order, np.take_along_axis(scores, order, axis=1)


def integer_data(rng: np.random.Generator, q: int, p: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integers: every dot product is exact in float32 whatever the summation order, and many tie."""
    queries = rng.integers(-2, 3, size=(q, d)).astype(np.float32)
    passages = rng.integers(-2, 3, size=(p, d)).astype(np.float32)
    if p > 3:
        passages[5::7] = passages[3]  # exact duplicates, spread over several blocks
    return queries, passages


@pytest.mark.parametrize("block_size,query_block_size", [(1, 1), (3, 5), (7, 64), (40, 2), (1000, 1000)])
def test_equals_reference_with_ties_for_any_block_size(block_size, query_block_size):
    queries, passages = integer_data(np.random.default_rng(0), q=13, p=97, d=4)
    expected_index, expected_score = reference_top_n(queries, passages, 10)
    index, score = top_n_search(queries, passages, 10, block_size=block_size, query_block_size=query_block_size)
    assert (score[:, :-1] == score[:, 1:]).any(), "the data must contain ties for this test to mean anything"
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_array_equal(score, expected_score)


@settings(max_examples=60, deadline=None)
@given(
    q=st.integers(1, 9),
    p=st.integers(1, 40),
    n=st.integers(1, 45),
    block=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_equals_reference_property(q, p, n, block, seed):
    queries, passages = integer_data(np.random.default_rng(seed), q, p, d=3)
    expected_index, expected_score = reference_top_n(queries, passages, n)
    index, score = top_n_search(queries, passages, n, block_size=block, query_block_size=max(1, block // 3))
    assert index.shape == (q, min(n, p))
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_array_equal(score, expected_score)


def test_unit_vectors_match_argsort():
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    passages = rng.standard_normal((500, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    index, score = top_n_search(queries, passages, 20, block_size=64)
    full = queries @ passages.T
    np.testing.assert_array_equal(index, np.argsort(-full, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(score, np.take_along_axis(full, index, axis=1), atol=1e-6)


def test_negative_and_signed_zero_scores_order_like_floats():
    queries = np.array([[1.0]], dtype=np.float32)
    passages = np.array([[-0.0], [-2.0], [0.0], [3.0], [-0.5], [-0.0]], dtype=np.float32)
    index, score = top_n_search(queries, passages, 6, block_size=2)
    # -0.0 == 0.0, so the three zeros tie and keep index order.
    assert index.tolist() == [[3, 0, 2, 5, 4, 1]]
    assert score.tolist() == [[3.0, 0.0, 0.0, 0.0, -0.5, -2.0]]


def test_memory_is_bounded_by_the_block_not_the_corpus():
    rng = np.random.default_rng(2)
    n_queries, n_passages, block = 200, 40_000, 1_000
    queries = rng.standard_normal((n_queries, 8)).astype(np.float32)
    passages = rng.standard_normal((n_passages, 8)).astype(np.float32)
    full_matrix = n_queries * n_passages * 4  # 32 MB of float32 scores
    tracemalloc.start()
    try:
        top_n_search(queries, passages, 20, block_size=block, query_block_size=n_queries)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One block at a time: float32 scores + uint64 keys, then keys + int64 partition indices.
    assert peak <= 20 * block * n_queries
    assert peak < full_matrix / 5


def test_rejects_mismatched_shapes_and_bad_sizes():
    with pytest.raises(ValueError, match="shape"):
        top_n_search(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), 2)
    with pytest.raises(ValueError, match=">= 1"):
        top_n_search(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), 0)


def test_neighbor_tables_rank_the_seed_or_leave_it_null():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    passages = np.array([[0.9, 0.1], [0.1, 0.9], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    tables = neighbor_tables(
        query_ids=pa.array(["q1", "q2", "q3"]),
        seed_ids=pa.array(["p0", "p3", "missing"]),
        passage_ids=pa.array(["p0", "p1", "p2", "p3"]),
        query_vectors=queries,
        passage_vectors=passages,
        top_n=2,
    )
    rows = tables.neighbors.to_pylist()
    assert [(r["query_id"], r["passage_id"], r["knn_rank"]) for r in rows] == [
        ("q1", "p2", 1), ("q1", "p0", 2), ("q2", "p1", 1), ("q2", "p0", 2), ("q3", "p2", 1), ("q3", "p0", 2),
    ]  # fmt: skip
    seeds = {r["query_id"]: r for r in tables.seed_ranks.to_pylist()}
    assert seeds["q1"]["seed_rank"] == 2 and seeds["q1"]["seed_score"] == pytest.approx(0.9)
    assert seeds["q2"]["seed_rank"] is None and seeds["q2"]["seed_score"] == pytest.approx(0.0)  # outside top 2
    assert seeds["q3"]["seed_rank"] is None and seeds["q3"]["seed_score"] is None  # seed not a passage


def test_embedding_table_is_a_fixed_size_list():
    import duckdb

    table = embedding_table("passage_id", pa.array(["a", "b"]), np.eye(2, 3, dtype=np.float32))
    con = duckdb.connect()
    con.register("t", table)
    assert con.execute("SELECT typeof(embedding) FROM t LIMIT 1").fetchone()[0] == "FLOAT[3]"
    sim = con.execute("SELECT array_cosine_similarity(embedding, [1, 0, 0]::FLOAT[3]) FROM t ORDER BY passage_id")
    assert [r[0] for r in sim.fetchall()] == [1.0, 0.0]


# --- streaming: mine_neighbors embeds and searches the passages chunk by chunk ----------------------


class HashEncoder:
    """A fake encoder: small-integer vectors from each text's sha256 (exact dot products, many ties),
    the same whatever the batch; it records the most passages it was handed at once."""

    dim = 16
    fingerprint = "hash-encoder"

    def __init__(self) -> None:
        self.largest_call = 0

    def encode(self, texts, batch_size=64, *, on_batch=None) -> np.ndarray:
        import hashlib

        if texts and texts[0].startswith("title:"):
            self.largest_call = max(self.largest_call, len(texts))
        digests = b"".join(hashlib.sha256(t.encode()).digest()[: self.dim] for t in texts)
        values = np.frombuffer(digests, dtype=np.uint8).reshape(len(texts), self.dim)
        return (values % 5).astype(np.float32) - 2.0


def corpus_tables(n_passages: int, n_queries: int) -> tuple[pa.Table, pa.Table]:
    """Passages (some with equal texts, so equal vectors) and queries seeded on every 7th of them."""
    passages = pa.table(
        {
            "passage_id": [f"p{i:06d}" for i in range(n_passages)],
            "title": [None] * n_passages,
            "text": [f"passage {i % (n_passages - 3)}" for i in range(n_passages)],  # the last 3 repeat the first 3
        }
    )
    queries = pa.table(
        {
            "query_id": [f"q{i:04d}" for i in range(n_queries)],
            "passage_id": [f"p{7 * i % n_passages:06d}" for i in range(n_queries - 1)] + ["not-a-passage"],
            "task": ["find it"] * n_queries,
            "query": [f"query {i}" for i in range(n_queries)],
        }
    )
    return passages, queries


def mine(passages: pa.Table, queries: pa.Table, encoder, sink=None, **params):
    from pipeline.params import NeighborsParams
    from pipeline.retrieval.encoder import TextFormat
    from pipeline.retrieval.knn import mine_neighbors

    return mine_neighbors(
        passages, queries, encoder, TextFormat(), None, NeighborsParams(**params), passage_sink=sink, threads=1
    )


def test_streamed_chunks_give_the_same_tables_as_one_chunk():
    passages, queries = corpus_tables(500, 40)
    whole = mine(passages, queries, HashEncoder(), chunk_size=10_000, top_n=10)
    encoder, chunks = HashEncoder(), []
    streamed = mine(passages, queries, encoder, sink=chunks.append, chunk_size=37, top_n=10, block_size=5)
    assert encoder.largest_call == 37  # never more passages at once than a chunk
    assert "passage_embeddings" not in streamed.tables  # the sink took them
    assert [c.num_rows for c in chunks] == [37] * 13 + [19]
    assert pa.concat_tables(chunks).equals(whole.tables["passage_embeddings"])
    for name in ("neighbors", "seed_ranks", "query_embeddings"):
        assert streamed.tables[name].equals(whole.tables[name]), name
    # And both are the full-matrix reference, ties included (equal texts give equal vectors).
    vectors = HashEncoder().encode([f"title: none | text: {t}" for t in passages["text"].to_pylist()])
    query_vectors = HashEncoder().encode([f"task: find it | query: {q}" for q in queries["query"].to_pylist()])
    expected, _ = reference_top_n(query_vectors, vectors, 10)
    got = np.array(streamed.tables["neighbors"]["passage_id"].to_pylist()).reshape(40, 10)
    np.testing.assert_array_equal(got, np.array(passages["passage_id"].to_pylist())[expected])
    seeds = streamed.tables["seed_ranks"].to_pylist()
    assert seeds[-1]["seed_score"] is None and seeds[0]["seed_score"] == float(query_vectors[0] @ vectors[0])
    assert streamed.passage_stats.texts == 500 and streamed.passage_stats.embedded == 500


def test_streaming_bounds_the_memory_of_passage_vectors():
    passages, queries = corpus_tables(40_000, 50)

    def peak_bytes(chunk_size: int) -> int:
        tracemalloc.start()
        try:
            mine(passages, queries, HashEncoder(), sink=lambda table: None, chunk_size=chunk_size)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    all_vectors = 40_000 * HashEncoder.dim * 4  # 2.6 MB of float32, before texts and hashes
    one_chunk, streamed = peak_bytes(40_000), peak_bytes(500)
    assert one_chunk > all_vectors  # embedding everything at once holds every vector (and more)
    assert streamed < one_chunk / 10
    assert streamed < all_vectors / 2
