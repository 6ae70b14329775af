"""Exact top-N search: blocked matrix products, memory bounded, ties to the lower passage index.

Scores are inner products (cosine for the unit vectors the encoder returns). Memory is bounded by
`query_block_size x block_size` scores, never the whole queries x passages matrix. Equal scores are
ordered by the lower passage index, never arbitrarily (argpartition alone would pick any of them).
"""

from __future__ import annotations

import numpy as np

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
