"""The `neighbors` stage's work: stream passage embeddings into a top-N search, shape its tables.

`make_search` picks the search `neighbors.method` names, behind one interface (`base.PassageSearch`):
exact (pipeline/retrieval/exact.py) or FAISS (pipeline/retrieval/faiss_knn.py). `mine_neighbors`
streams passages in chunks: their embeddings are never all in memory at once, whichever method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.params import NeighborsParams
from pipeline.retrieval.base import PassageSearch
from pipeline.retrieval.embedding_cache import CacheStats, EmbeddingCache, encode_cached
from pipeline.retrieval.exact import ExactTopN, top_n_search

if TYPE_CHECKING:  # torch loads with the encoder; the search itself needs only numpy
    from pipeline.retrieval.encoder import Encoder, TextFormat


def make_search(
    queries: np.ndarray, params: NeighborsParams, *, threads: int | None = None, seed: int = 0
) -> PassageSearch:
    """The searcher `params.method` names, for these queries and `params.top_n`."""
    if params.method == "exact":
        return ExactTopN(
            queries, params.top_n, block_size=params.block_size, query_block_size=params.query_block_size
        )
    from pipeline.retrieval.faiss_knn import FaissTopN  # faiss loads only when asked for

    return FaissTopN(queries, params, threads=threads, seed=seed)


class SeedScores:
    """Each query's score against its own seed passage, gathered as passage chunks go by.

    The seed's score is kept even when the seed falls outside the top N; a seed id that never
    appears among the passages stays unknown (index -1).
    """

    def __init__(self, seed_ids: Sequence, query_vectors: np.ndarray) -> None:
        self.query_vectors = query_vectors
        self.rows_of: dict = {}
        for row, seed in enumerate(seed_ids):
            self.rows_of.setdefault(seed, []).append(row)
        self.index = np.full(len(seed_ids), -1, dtype=np.int64)
        self.score = np.zeros(len(seed_ids), dtype=np.float32)

    def add(self, passage_ids: Sequence, vectors: np.ndarray, first_index: int) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for col, pid in enumerate(passage_ids):
            for row in self.rows_of.get(pid, ()):
                rows.append(row)
                cols.append(col)
        if rows:
            self.index[rows] = first_index + np.array(cols, dtype=np.int64)
            own = np.einsum("ij,ij->i", self.query_vectors[rows], vectors[cols])
            self.score[rows] = own.astype(np.float32)


def embedding_table(id_name: str, ids: pa.Array | Sequence, vectors: np.ndarray) -> pa.Table:
    """(id, embedding) with a FixedSizeList column, which DuckDB stores as FLOAT[d]."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    return pa.table({id_name: ids, "embedding": column})


@dataclass
class NeighborTables:
    neighbors: pa.Table  # query_id, passage_id, knn_rank (1 = best), knn_score
    seed_ranks: pa.Table  # query_id, seed_passage_id, seed_rank (null outside top N), seed_score


def neighbor_tables(
    query_ids: pa.Array,
    seed_ids: pa.Array,
    passage_ids: pa.Array,
    query_vectors: np.ndarray,
    passage_vectors: np.ndarray,
    top_n: int,
    *,
    block_size: int = 4096,
    query_block_size: int = 1024,
) -> NeighborTables:
    """Search every query against every passage (exactly) and shape the result as the stage's tables.

    `seed_score` is the seed's own score even when it falls outside the top N (null only when the
    seed is not among the passages); inside the top N it equals the `knn_score` exactly.
    """
    indices, scores = top_n_search(
        query_vectors, passage_vectors, top_n, block_size=block_size, query_block_size=query_block_size
    )
    seeds = SeedScores(seed_ids.to_pylist(), query_vectors)
    seeds.add(passage_ids.to_pylist(), passage_vectors, 0)
    return shape_tables(query_ids, seed_ids, passage_ids, indices, scores, seeds)


def shape_tables(
    query_ids: pa.Array,
    seed_ids: pa.Array,
    passage_ids: pa.Array,
    indices: np.ndarray,
    scores: np.ndarray,
    seeds: SeedScores,
) -> NeighborTables:
    """The `neighbors` and `seed_ranks` tables from a search result (indices into `passage_ids`)."""
    n_queries, keep = indices.shape
    neighbors = pa.table(
        {
            "query_id": query_ids.take(pa.array(np.repeat(np.arange(n_queries), keep))),
            "passage_id": passage_ids.take(pa.array(indices.reshape(-1))),
            "knn_rank": pa.array(np.tile(np.arange(1, keep + 1, dtype=np.int32), n_queries)),
            "knn_score": pa.array(scores.reshape(-1)),
        }
    )
    hit = indices == seeds.index[:, None]
    found = hit.any(axis=1)
    rank = np.where(found, hit.argmax(axis=1) + 1, 0).astype(np.int32)
    known = seeds.index >= 0
    seed_score = seeds.score.copy()
    seed_score[found] = scores[found, rank[found] - 1]  # the very number in `neighbors`, not a recomputation
    seed_ranks = pa.table(
        {
            "query_id": query_ids,
            "seed_passage_id": seed_ids,
            "seed_rank": pa.array(rank, mask=~found),
            "seed_score": pa.array(seed_score, mask=~known),
        }
    )
    return NeighborTables(neighbors, seed_ranks)


@dataclass
class MiningResult:
    # neighbors, seed_ranks, query_embeddings, and passage_embeddings unless a sink took its chunks
    tables: dict[str, pa.Table]
    passage_stats: CacheStats
    query_stats: CacheStats
    seconds: dict[str, float]  # embed_passages, embed_queries, search (index training included)


def _add_stats(total: CacheStats, part: CacheStats) -> None:
    total.texts += part.texts
    total.unique += part.unique
    total.hits += part.hits
    total.embedded += part.embedded


def training_sample(n_passages: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded uniform sample of `size` passages (all of them when fewer)."""
    if size >= n_passages:
        return np.arange(n_passages, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_passages, size=size, replace=False))


def mine_neighbors(
    passages: pa.Table,
    queries: pa.Table,
    encoder: "Encoder",
    text_format: "TextFormat",
    cache: EmbeddingCache | None,
    params: NeighborsParams | None = None,
    *,
    batch_size: int = 64,
    threads: int | None = None,
    seed: int = 0,
    passage_sink: Callable[[pa.Table], None] | None = None,
    progress: bool = False,
) -> MiningResult:
    """Embed queries, then stream the passages chunk by chunk through the cache into the search.

    Passage vectors exist one chunk (`params.chunk_size`) at a time: each chunk is embedded, added to
    the search (exact: merged into each query's best N; FAISS: added to the index) and handed to
    `passage_sink` (or kept for `tables["passage_embeddings"]` when there is none). Results do not
    depend on the chunk size (the exact keys are total, FAISS sees the same vectors in the same
    order); embeddings can, at float-rounding level, when a chunk boundary changes which texts share
    an encoder batch (cached vectors never change).

    Args:
        passages: columns passage_id, title, text.
        queries: columns query_id, passage_id (the seed), task, query.
        params: the `neighbors` section (method, top_n, blocks, chunk_size, FAISS knobs).
        threads: FAISS threads (the `base.threads` param); None leaves FAISS's default.
        seed: the `base.seed` param: IVF's training sample and k-means.
        passage_sink: receives each chunk's (passage_id, embedding) table, in passage order.

    Returns:
        Tables and timings; passage cache stats are summed over chunks (a text repeated in two
        chunks counts in both, as a cache hit the second time).
    """
    params = params if params is not None else NeighborsParams()
    timer = time.perf_counter
    seconds = dict.fromkeys(("embed_passages", "embed_queries", "search"), 0.0)
    start = timer()
    query_texts = text_format.queries(queries["task"].to_pylist(), queries["query"].to_pylist())
    query_vectors, query_stats = encode_cached(
        encoder, query_texts, cache, batch_size=batch_size, progress=progress, desc="embed queries"
    )
    del query_texts
    seconds["embed_queries"] = timer() - start

    def embed(rows: pa.Table, desc: str) -> tuple[np.ndarray, CacheStats]:
        texts = text_format.passages(rows["title"].to_pylist(), rows["text"].to_pylist())
        return encode_cached(encoder, texts, cache, batch_size=batch_size, progress=progress, desc=desc)

    passage_stats = CacheStats()
    search = make_search(query_vectors, params, threads=threads, seed=seed)
    if getattr(search, "needs_training", False):
        start = timer()
        sample = passages.take(pa.array(training_sample(passages.num_rows, params.ivf.train_size, seed)))
        vectors, stats = embed(sample, "embed training sample")
        _add_stats(passage_stats, stats)
        seconds["embed_passages"] += timer() - start
        start = timer()
        search.train(vectors, n_passages=passages.num_rows)
        seconds["search"] += timer() - start
        del vectors, sample

    seeds = SeedScores(queries["passage_id"].to_pylist(), query_vectors)
    kept: list[pa.Table] = []
    for first in range(0, passages.num_rows, params.chunk_size):
        chunk = passages.slice(first, params.chunk_size)
        start = timer()
        vectors, stats = embed(chunk, "embed passages")
        _add_stats(passage_stats, stats)
        seconds["embed_passages"] += timer() - start
        start = timer()
        search.add(vectors)
        ids = chunk["passage_id"].combine_chunks()
        seeds.add(ids.to_pylist(), vectors, first)
        seconds["search"] += timer() - start
        table = embedding_table("passage_id", ids, vectors)
        if passage_sink is not None:
            passage_sink(table)
        else:
            kept.append(table)
        del vectors, table

    start = timer()
    indices, scores = search.result()
    found = shape_tables(
        queries["query_id"].combine_chunks(),
        queries["passage_id"].combine_chunks(),
        passages["passage_id"].combine_chunks(),
        indices,
        scores,
        seeds,
    )
    seconds["search"] += timer() - start
    tables = {"neighbors": found.neighbors, "seed_ranks": found.seed_ranks}
    if passage_sink is None:
        tables["passage_embeddings"] = _concat_embeddings(kept, encoder.dim)
    tables["query_embeddings"] = embedding_table("query_id", queries["query_id"].combine_chunks(), query_vectors)
    return MiningResult(tables, passage_stats, query_stats, seconds)


def _concat_embeddings(tables: list[pa.Table], dim: int) -> pa.Table:
    if not tables:
        return embedding_table("passage_id", pa.array([], pa.string()), np.empty((0, dim), np.float32))
    return pa.concat_tables(tables).combine_chunks()
