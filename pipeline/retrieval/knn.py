"""Top-N search (exact blocked matrix products, or FAISS), and the tables of the `neighbors` stage.

Scores are inner products (cosine for the unit vectors the encoder returns). The exact search's
memory is bounded by `query_block_size x block_size` scores, never the whole queries x passages
matrix. Equal scores are ordered by the lower passage index, never arbitrarily (argpartition alone
would pick any of them). `mine_neighbors` streams passages in chunks: their embeddings are never
all in memory at once, whichever method (`pipeline/faiss_knn.py` holds the FAISS ones).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from pipeline.embedding_cache import CacheStats, EmbeddingCache, encode_cached
from pipeline.params import NeighborsParams

if TYPE_CHECKING:  # torch loads with the encoder; the search itself needs only numpy
    from pipeline.encoder import Encoder, TextFormat


class IndexParamsError(ValueError):
    """Search settings that do not fit the corpus at hand; the message names the params key."""


_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)


def _order_keys(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One uint64 per score whose integer order is (score ascending, passage index descending).

    The high half is the float's bits mapped to an order-preserving unsigned integer; the low half
    is the complemented passage index. Every key is distinct, so partitioning never breaks a tie
    arbitrarily and the largest keys are the best scores, lower index first. `scores` is
    overwritten: working in place keeps the peak at 16 bytes per score. `indices` (uint64, the
    passage index of each score) broadcasts against `scores`. No real key is 0.
    """
    np.add(scores, np.float32(0.0), out=scores)  # -0.0 -> +0.0: they tie as floats, so must as keys
    bits = scores.view(np.uint32)
    # Negative floats: flip every bit (larger magnitude sorts lower); others: set the sign bit.
    mask = bits >> np.uint32(31)
    mask *= np.uint32(0x7FFFFFFF)
    mask |= _SIGN
    bits ^= mask
    del mask
    keys = bits.astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= _LOW32 - indices
    return keys


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ordered = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered & _SIGN, ordered ^ _SIGN, ~ordered)
    index = (_LOW32 - (keys & _LOW32)).astype(np.int64)
    return index, bits.view(np.float32)


def _keys_at_least(scores: np.ndarray, threshold: np.ndarray, first_index: int) -> np.ndarray:
    """Keys of the scores >= each row's threshold, rows padded with 0 (below every real key).

    Once a query holds N passages, only scores reaching its N-th best can enter: keying just those
    skips most of the per-score work of `_order_keys` (ties at the threshold are all kept).
    """
    rows, cols = np.nonzero(scores >= threshold)
    if rows.size == 0:
        return np.empty((scores.shape[0], 0), dtype=np.uint64)
    keys = _order_keys(scores[rows, cols], cols.astype(np.uint64) + np.uint64(first_index))
    counts = np.bincount(rows, minlength=scores.shape[0])
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    padded = np.zeros((scores.shape[0], int(counts.max())), dtype=np.uint64)
    padded[rows, slot] = keys
    return padded


def _keep_largest(keys: np.ndarray, n: int) -> np.ndarray:
    if keys.shape[1] <= n:
        return keys
    part = np.argpartition(keys, keys.shape[1] - n, axis=1)[:, keys.shape[1] - n :]
    return np.take_along_axis(keys, part, axis=1)


class ExactTopN:
    """Exact top-N over passages that arrive in chunks; only each query's best N keys are kept.

    Memory: the queries, (q, N) uint64 keys, and one `query_block_size x block_size` score block;
    the passages of a chunk can be dropped once `add` returns.
    """

    def __init__(self, queries: np.ndarray, n: int, *, block_size: int = 4096, query_block_size: int = 1024) -> None:
        if n < 1 or block_size < 1 or query_block_size < 1:
            raise ValueError("n, block_size and query_block_size must be >= 1")
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.queries.ndim != 2:
            raise ValueError(f"queries must be 2-d, got shape {self.queries.shape}")
        self.n, self.block_size, self.query_block_size = n, block_size, query_block_size
        self.total = 0  # passages added so far = the index of the next one
        self.best = np.empty((self.queries.shape[0], 0), dtype=np.uint64)

    def add(self, passages: np.ndarray) -> None:
        """Score one chunk of passages (indices continue from the previous chunk)."""
        passages = np.ascontiguousarray(passages, dtype=np.float32)
        if passages.ndim != 2 or passages.shape[1] != self.queries.shape[1]:
            raise ValueError(f"shape mismatch: queries {self.queries.shape}, passages {passages.shape}")
        if self.total + passages.shape[0] >= 2**32:
            raise ValueError("at most 2**32 - 1 passages (indices are packed into 32 bits)")
        width = min(self.n, self.total + passages.shape[0])
        merged = np.empty((self.queries.shape[0], width), dtype=np.uint64)
        for q0 in range(0, self.queries.shape[0], self.query_block_size):
            q_block = self.queries[q0 : q0 + self.query_block_size]
            best = self.best[q0 : q0 + self.query_block_size]
            for p0 in range(0, passages.shape[0], self.block_size):
                block = passages[p0 : p0 + self.block_size]
                first = self.total + p0
                # One expression each: a block's scores and keys die before the next block's are made.
                if best.shape[1] < self.n:  # still filling up: every score is a candidate
                    indices = np.arange(first, first + block.shape[0], dtype=np.uint64)
                    candidates = _keep_largest(_order_keys(q_block @ block.T, indices), self.n)
                else:
                    threshold = _decode_keys(best.min(axis=1, keepdims=True))[1]
                    candidates = _keys_at_least(q_block @ block.T, threshold, first)
                best = _keep_largest(np.concatenate([best, candidates], axis=1), self.n)
            merged[q0 : q0 + q_block.shape[0]] = best
        self.best = merged
        self.total += passages.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """indices (q, min(n, passages)) int64 and scores float32, best first, ties to the lower index."""
        return _decode_keys(np.sort(self.best, axis=1)[:, ::-1])


def top_n_search(
    queries: np.ndarray,
    passages: np.ndarray,
    n: int,
    *,
    block_size: int = 4096,
    query_block_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The n highest-scoring passages per query, exactly.

    Args:
        queries: (q, d) float32.
        passages: (p, d) float32.
        block_size: passages scored per matrix product.
        query_block_size: queries scored per matrix product.

    Returns:
        indices (q, min(n, p)) int64 into `passages` and their scores (float32), best first;
        equal scores are ordered by the lower passage index.
    """
    search = ExactTopN(queries, n, block_size=block_size, query_block_size=query_block_size)
    search.add(passages)
    return search.result()


class PassageSearch(Protocol):
    """What `mine_neighbors` streams passage chunks into: `ExactTopN` or `faiss_knn.FaissTopN`."""

    def add(self, passages: np.ndarray) -> None: ...

    def result(self) -> tuple[np.ndarray, np.ndarray]: ...


def make_search(
    queries: np.ndarray, params: NeighborsParams, *, threads: int | None = None, seed: int = 0
) -> PassageSearch:
    """The searcher `params.method` names, for these queries and `params.top_n`."""
    if params.method == "exact":
        return ExactTopN(
            queries, params.top_n, block_size=params.block_size, query_block_size=params.query_block_size
        )
    from pipeline.faiss_knn import FaissTopN  # faiss loads only when asked for

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
