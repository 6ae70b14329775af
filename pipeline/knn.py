"""Exact top-N search by blocked matrix products, and the tables of the `neighbors` stage.

Scores are inner products (cosine for the unit vectors the encoder returns). Memory is bounded by
`query_block_size x block_size` scores, never the whole queries x passages matrix. Equal scores are
ordered by the lower passage index, never arbitrarily (argpartition alone would pick any of them).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.embedding_cache import CacheStats, EmbeddingCache, encode_cached

if TYPE_CHECKING:  # torch loads with the encoder; the search itself needs only numpy
    from pipeline.encoder import Encoder, TextFormat

_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)


def _order_keys(scores: np.ndarray, first_index: int) -> np.ndarray:
    """One uint64 per score whose integer order is (score ascending, passage index descending).

    The high half is the float's bits mapped to an order-preserving unsigned integer; the low half
    is the complemented passage index. Every key is distinct, so partitioning never breaks a tie
    arbitrarily and the largest keys are the best scores, lower index first. `scores` is
    overwritten: working in place keeps the peak at 16 bytes per score.
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
    keys |= _LOW32 - np.arange(first_index, first_index + scores.shape[1], dtype=np.uint64)
    return keys


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ordered = (keys >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered & _SIGN, ordered ^ _SIGN, ~ordered)
    index = (_LOW32 - (keys & _LOW32)).astype(np.int64)
    return index, bits.view(np.float32)


def _keep_largest(keys: np.ndarray, n: int) -> np.ndarray:
    if keys.shape[1] <= n:
        return keys
    part = np.argpartition(keys, keys.shape[1] - n, axis=1)[:, keys.shape[1] - n :]
    return np.take_along_axis(keys, part, axis=1)


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
    if n < 1 or block_size < 1 or query_block_size < 1:
        raise ValueError("n, block_size and query_block_size must be >= 1")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    passages = np.ascontiguousarray(passages, dtype=np.float32)
    if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(f"shape mismatch: queries {queries.shape}, passages {passages.shape}")
    if passages.shape[0] >= 2**32:
        raise ValueError("at most 2**32 - 1 passages (indices are packed into 32 bits)")
    keep = min(n, passages.shape[0])
    indices = np.zeros((queries.shape[0], keep), dtype=np.int64)
    scores = np.zeros((queries.shape[0], keep), dtype=np.float32)
    for q0 in range(0, queries.shape[0], query_block_size):
        q_block = queries[q0 : q0 + query_block_size]
        best = np.empty((q_block.shape[0], 0), dtype=np.uint64)
        for p0 in range(0, passages.shape[0], block_size):
            candidates = _keep_largest(_order_keys(q_block @ passages[p0 : p0 + block_size].T, p0), keep)
            best = _keep_largest(np.concatenate([best, candidates], axis=1), keep)
        best = np.sort(best, axis=1)[:, ::-1]
        indices[q0 : q0 + q_block.shape[0]], scores[q0 : q0 + q_block.shape[0]] = _decode_keys(best)
    return indices, scores


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
    """Search every query against every passage and shape the result as the stage's tables.

    `seed_score` is the seed's own score even when it falls outside the top N (null only when the
    seed is not among the passages); inside the top N it equals the `knn_score` exactly.
    """
    indices, scores = top_n_search(
        query_vectors, passage_vectors, top_n, block_size=block_size, query_block_size=query_block_size
    )
    n_queries, keep = indices.shape
    neighbors = pa.table(
        {
            "query_id": query_ids.take(pa.array(np.repeat(np.arange(n_queries), keep))),
            "passage_id": passage_ids.take(pa.array(indices.reshape(-1))),
            "knn_rank": pa.array(np.tile(np.arange(1, keep + 1, dtype=np.int32), n_queries)),
            "knn_score": pa.array(scores.reshape(-1)),
        }
    )
    position = {pid: i for i, pid in enumerate(passage_ids.to_pylist())}
    seed_index = np.array([position.get(s, -1) for s in seed_ids.to_pylist()], dtype=np.int64)
    hit = indices == seed_index[:, None]
    found = hit.any(axis=1)
    rank = np.where(found, hit.argmax(axis=1) + 1, 0).astype(np.int32)
    known = seed_index >= 0
    own = np.einsum("ij,ij->i", query_vectors[known], passage_vectors[seed_index[known]]).astype(np.float32)
    seed_score = np.zeros(n_queries, dtype=np.float32)
    seed_score[known] = own
    seed_score[found] = scores[found, rank[found] - 1]
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
    tables: dict[str, pa.Table]  # neighbors, seed_ranks, passage_embeddings, query_embeddings
    passage_stats: CacheStats
    query_stats: CacheStats
    seconds: dict[str, float]  # embed_passages, embed_queries, search


def mine_neighbors(
    passages: pa.Table,
    queries: pa.Table,
    encoder: "Encoder",
    text_format: "TextFormat",
    cache: EmbeddingCache | None,
    *,
    top_n: int = 20,
    batch_size: int = 64,
    block_size: int = 4096,
    query_block_size: int = 1024,
    progress: bool = False,
) -> MiningResult:
    """Embed passages and queries in the unified format (through the cache) and mine the top N.

    Args:
        passages: columns passage_id, title, text.
        queries: columns query_id, passage_id (the seed), task, query.
    """
    timer = time.perf_counter
    seconds: dict[str, float] = {}
    start = timer()
    passage_texts = text_format.passages(passages["title"].to_pylist(), passages["text"].to_pylist())
    passage_vectors, passage_stats = encode_cached(
        encoder, passage_texts, cache, batch_size=batch_size, progress=progress, desc="embed passages"
    )
    seconds["embed_passages"], start = timer() - start, timer()
    query_texts = text_format.queries(queries["task"].to_pylist(), queries["query"].to_pylist())
    query_vectors, query_stats = encode_cached(
        encoder, query_texts, cache, batch_size=batch_size, progress=progress, desc="embed queries"
    )
    seconds["embed_queries"], start = timer() - start, timer()
    found = neighbor_tables(
        queries["query_id"].combine_chunks(),
        queries["passage_id"].combine_chunks(),
        passages["passage_id"].combine_chunks(),
        query_vectors,
        passage_vectors,
        top_n,
        block_size=block_size,
        query_block_size=query_block_size,
    )
    seconds["search"] = timer() - start
    tables = {
        "neighbors": found.neighbors,
        "seed_ranks": found.seed_ranks,
        "passage_embeddings": embedding_table("passage_id", passages["passage_id"].combine_chunks(), passage_vectors),
        "query_embeddings": embedding_table("query_id", queries["query_id"].combine_chunks(), query_vectors),
    }
    return MiningResult(tables, passage_stats, query_stats, seconds)
