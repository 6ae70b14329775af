"""pipeline/retrieval/faiss_knn.py: faiss_flat equals the exact search, IVF / HNSW reach a stated recall."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_encoder import tiny_bert_dir  # noqa: F401 - fixture
from test_knn import HashEncoder, corpus_tables, integer_data, mine, reference_top_n
from test_neighbors_stage import make_project

from pipeline.params import NeighborsParams, ParamsError, load_params
from pipeline.retrieval.base import IndexParamsError
from pipeline.retrieval.exact import top_n_search
from pipeline.retrieval.faiss_knn import FaissTopN, ivf_nlist

# Stated recall@20 against the exact search on `clustered_set` (measured: IVF nprobe 8 and HNSW
# efSearch 64 both 1.00; IVF with nprobe 1: 0.54).
IVF_RECALL = 0.97
HNSW_RECALL = 0.97


def faiss_search(queries, passages, chunks=1, threads=1, seed=0, **params) -> tuple[np.ndarray, np.ndarray]:
    """FaissTopN over `passages` added in `chunks` pieces (IVF trained on every passage)."""
    search = FaissTopN(queries, NeighborsParams(**params), threads=threads, seed=seed)
    if search.needs_training:
        search.train(passages, n_passages=len(passages))
    for piece in np.array_split(passages, chunks):
        search.add(piece)
    return search.result()


def clustered_set(seed: int = 0, n_passages: int = 6000, n_queries: int = 200, dim: int = 32):
    """Unit vectors around 40 random centres, queries drawn the same way: neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))

    def draw(n: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n_queries), draw(n_passages)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.mark.parametrize("n_queries,query_block_size", [(13, 1024), (13, 4), (60, 1024)])  # SIMD and BLAS kernels
def test_flat_equals_exact_with_ties(n_queries, query_block_size):
    queries, passages = integer_data(np.random.default_rng(0), q=n_queries, p=97, d=4)
    expected_index, expected_score = reference_top_n(queries, passages, 10)
    # Ties that straddle rank 10 make FAISS's own cut arbitrary: the re-fetch must settle them.
    all_index, all_score = reference_top_n(queries, passages, 97)
    assert (all_score[:, 9] == all_score[:, 10]).any()
    index, score = faiss_search(queries, passages, chunks=3, method="faiss_flat", top_n=10,
                                query_block_size=query_block_size)  # fmt: skip
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_array_equal(score, expected_score)


def test_flat_matches_exact_on_unit_vectors_up_to_float_rounding():
    queries, passages = clustered_set(1, n_passages=3000, n_queries=100)
    exact_index, exact_score = top_n_search(queries, passages, 20)
    index, score = faiss_search(queries, passages, method="faiss_flat", top_n=20)
    np.testing.assert_allclose(score, exact_score, atol=1e-6)
    # FAISS's kernels round differently from numpy's: a row may differ only by swapping passages
    # whose exact scores are within rounding of each other.
    for row in np.flatnonzero((index != exact_index).any(axis=1)):
        full = queries[row] @ passages.T
        assert np.abs(full[index[row]] - full[exact_index[row]]).max() < 1e-6
    assert (index == exact_index).all(axis=1).mean() >= 0.95


def test_ivf_reaches_the_stated_recall_and_is_seeded():
    queries, passages = clustered_set()
    truth, _ = top_n_search(queries, passages, 20)
    found, _ = faiss_search(queries, passages, chunks=4, method="faiss_ivf", top_n=20, ivf={"nprobe": 8}, seed=7)
    assert recall(found, truth) >= IVF_RECALL
    again, _ = faiss_search(queries, passages, chunks=2, method="faiss_ivf", top_n=20, ivf={"nprobe": 8}, seed=7)
    np.testing.assert_array_equal(again, found)  # same seed and threads: the same cells and lists
    one_probe, _ = faiss_search(queries, passages, method="faiss_ivf", top_n=20, ivf={"nprobe": 1}, seed=7)
    assert recall(one_probe, truth) < recall(found, truth)  # nprobe is the knob it claims to be


def test_hnsw_reaches_the_stated_recall():
    queries, passages = clustered_set()
    truth, _ = top_n_search(queries, passages, 20)
    found, score = faiss_search(queries, passages, chunks=3, method="faiss_hnsw", top_n=20,
                                hnsw={"m": 16, "ef_construction": 64, "ef_search": 64})  # fmt: skip
    assert recall(found, truth) >= HNSW_RECALL
    assert (np.diff(score, axis=1) <= 0).all()  # best first


def test_short_ivf_lists_are_widened_to_n_results():
    queries, passages = clustered_set(2, n_passages=400, n_queries=30)
    # 20 cells of ~20 passages and one probe: many queries see fewer than 50 candidates at first.
    index, score = faiss_search(queries, passages, method="faiss_ivf", top_n=50, ivf={"nlist": 20, "nprobe": 1})
    assert index.shape == (30, 50) and (index >= 0).all()
    assert all(len(set(row)) == 50 for row in index)


def test_results_do_not_depend_on_the_query_block():
    queries, passages = clustered_set(3, n_passages=2000, n_queries=64)
    one, _ = faiss_search(queries, passages, method="faiss_ivf", ivf={"nprobe": 2}, query_block_size=1)
    many, _ = faiss_search(queries, passages, method="faiss_ivf", ivf={"nprobe": 2}, query_block_size=1000)
    np.testing.assert_array_equal(one, many)


def test_ivf_nlist_defaults_and_limits():
    params = NeighborsParams(method="faiss_ivf")
    assert ivf_nlist(params, 1_000_000, 200_000) == 4000  # 4 sqrt(1M): the sample supports it
    assert ivf_nlist(params, 1_000_000, 100_000) == 2564  # capped at 39 training points per cell
    assert ivf_nlist(params, 10, 10) == 1
    explicit = NeighborsParams(method="faiss_ivf", ivf={"nlist": 64})
    assert ivf_nlist(explicit, 10_000, 5000) == 64
    with pytest.raises(IndexParamsError, match=r"neighbors\.ivf\.nlist \(64\) exceeds the 50 passages"):
        ivf_nlist(explicit, 50, 50)


def test_mine_neighbors_with_faiss_flat_writes_the_exact_tables():
    passages, queries = corpus_tables(300, 25)
    exact = mine(passages, queries, HashEncoder(), chunk_size=50, top_n=8)
    flat = mine(passages, queries, HashEncoder(), chunk_size=50, top_n=8, method="faiss_flat")
    for name in ("neighbors", "seed_ranks", "passage_embeddings", "query_embeddings"):
        assert flat.tables[name].equals(exact.tables[name]), name


def test_mine_neighbors_trains_ivf_on_a_seeded_sample():
    passages, queries = corpus_tables(600, 20)
    params = {"method": "faiss_ivf", "top_n": 5, "chunk_size": 100, "ivf": {"nlist": 4, "nprobe": 4, "train_size": 200}}
    result = mine(passages, queries, HashEncoder(), **params)
    exact = mine(passages, queries, HashEncoder(), top_n=5)
    # nprobe = nlist scans every cell: the same lists as the exact search.
    assert result.tables["neighbors"].equals(exact.tables["neighbors"])
    # Without a cache the 200 sampled passages go through the encoder twice (to train, then in their chunk).
    assert result.passage_stats.texts == 800 and result.tables["passage_embeddings"].num_rows == 600


def test_params_name_the_bad_key(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    cases = {
        "neighbors:\n  method: annoy\n": "neighbors.method",
        "neighbors:\n  ivf:\n    nlist: 8\n    nprobe: 16\n": "nprobe (16) must not exceed nlist (8)",
        "neighbors:\n  hnsw:\n    ef_search: 0\n": "neighbors.hnsw.ef_search",
        "neighbors:\n  hnsw:\n    M: 16\n": "neighbors.hnsw.M: unknown key",
        "neighbors:\n  chunk_size: 0\n": "neighbors.chunk_size",
    }
    for body, expected in cases.items():
        (tmp_path / "params.yaml").write_text("corpus:\n  path: c.jsonl\n" + body)
        with pytest.raises(ParamsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_params(tmp_path / "params.yaml")


def test_ivf_refuses_add_before_train():
    search = FaissTopN(np.zeros((1, 4), np.float32), NeighborsParams(method="faiss_ivf"))
    with pytest.raises(RuntimeError, match="train"):
        search.add(np.zeros((3, 4), np.float32))


def test_empty_corpus_gives_empty_lists():
    index, score = FaissTopN(np.ones((3, 4), np.float32), NeighborsParams(method="faiss_flat")).result()
    assert index.shape == (3, 0) and score.shape == (3, 0)


def test_stage_runs_faiss_and_names_a_bad_nlist(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    import duckdb

    from python_steps import neighbors

    make_project(tmp_path, tiny_bert_dir)
    monkeypatch.chdir(tmp_path)
    neighbors.main()
    con = duckdb.connect("warehouse/neighbors.duckdb", read_only=True)
    exact = con.execute("SELECT query_id, passage_id, knn_rank FROM neighbors ORDER BY ALL").fetchall()
    con.close()
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("  top_n: 3\n", "  top_n: 3\n  method: faiss_flat\n"))
    neighbors.main()
    assert "faiss_flat, exhaustive" in capsys.readouterr().out
    con = duckdb.connect("warehouse/neighbors.duckdb", read_only=True)
    assert con.execute("SELECT query_id, passage_id, knn_rank FROM neighbors ORDER BY ALL").fetchall() == exact
    assert con.execute("SELECT count(*) FROM passage_embeddings").fetchone()[0] == 10
    con.close()
    bad = params.replace("  top_n: 3\n", "  top_n: 3\n  method: faiss_ivf\n  ivf:\n    nlist: 64\n    nprobe: 4\n")
    (tmp_path / "params.yaml").write_text(bad)
    with pytest.raises(SystemExit, match=r"neighbors: neighbors\.ivf\.nlist \(64\) exceeds the 10 passages"):
        neighbors.main()
