"""Top-N search through FAISS (`faiss-cpu`): IndexFlatIP, IndexIVFFlat or IndexHNSWFlat.

Inner product on unit vectors (cosine), as in the exact search; passages arrive in chunks (`add`)
and take the positions 0, 1, ... in arrival order, so results index the same passages as
`ExactTopN`'s and go through the same `shape_tables`.

Ties, and what FAISS allows:
- FAISS's heaps keep equal scores in no documented order. Each query's results are re-sorted by
  (score descending, passage index ascending), and a query whose score at rank N equals the last
  one fetched is searched again with twice the k until its tie group is complete: among the
  passages FAISS scored, equal scores go to the lower index, as in the exact search.
- faiss_flat scores every pair with FAISS's kernels (BLAS for 20 queries or more at a time, a
  SIMD loop below that), so a score can differ from numpy's in the last float bit. It equals
  `exact` exactly whenever scores are exact in float32 (tests: small-integer vectors, ties
  included); on real embeddings two passages within ~1e-7 of each other can swap ranks.
- faiss_ivf is deterministic for a fixed `base.threads` (seeded sample, seeded k-means; k-means
  sums per thread). faiss_hnsw builds its graph with threads racing for locks: deterministic with
  one thread, with more the lists can differ from run to run (at the recall level, not in layout).
- A query that gets fewer than N results (IVF: its nprobe cells hold fewer passages) is searched
  again with twice the nprobe / efSearch until it has N.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.params import NeighborsParams
from pipeline.retrieval.base import IndexParamsError

# FAISS warns below 39 training points per centroid (its k-means quality threshold).
MIN_POINTS_PER_CENTROID = 39


def ivf_nlist(params: NeighborsParams, n_passages: int, n_train: int) -> int:
    """The number of IVF cells: `ivf.nlist` as given, or 4 sqrt(passages) capped by the sample.

    Raises:
        IndexParamsError: an explicit `neighbors.ivf.nlist` larger than the passages there are to train on.
    """
    if params.ivf.nlist is not None:
        if params.ivf.nlist > n_train:
            raise IndexParamsError(
                f"neighbors.ivf.nlist ({params.ivf.nlist}) exceeds the {n_train} passages available to train on; "
                "lower it, or set it to null (4 x sqrt(passages))"
            )
        return params.ivf.nlist
    wanted = round(4 * math.sqrt(max(n_passages, 1)))
    return max(1, min(wanted, n_train // MIN_POINTS_PER_CENTROID))


class FaissTopN:
    """Top-N through a FAISS index, with the `ExactTopN` interface (`add`, then `result`).

    faiss_ivf needs `train` (on a sample of the passages) before the first `add`.
    """

    def __init__(
        self, queries: np.ndarray, params: NeighborsParams, *, threads: int | None = None, seed: int = 0
    ) -> None:
        import faiss

        if params.method == "exact":
            raise ValueError("neighbors.method 'exact' does not use FAISS (see pipeline.retrieval.exact.ExactTopN)")
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.queries.ndim != 2:
            raise ValueError(f"queries must be 2-d, got shape {self.queries.shape}")
        self.params = params
        self.seed = seed
        self.needs_training = params.method == "faiss_ivf"
        dim = self.queries.shape[1]
        self.index = None
        if params.method == "faiss_flat":
            self.index = faiss.IndexFlatIP(dim)
        elif params.method == "faiss_hnsw":
            self.index = faiss.IndexHNSWFlat(dim, params.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = params.hnsw.ef_construction

    def train(self, sample: np.ndarray, *, n_passages: int) -> None:
        """Seeded spherical k-means on `sample` (unit vectors) into the IVF cells."""
        import faiss

        sample = np.ascontiguousarray(sample, dtype=np.float32)
        nlist = ivf_nlist(self.params, n_passages, sample.shape[0])
        dim = self.queries.shape[1]
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = self.seed % 2**31  # FAISS takes an int; base.seed may be any integer
        self.index.cp.spherical = True  # centroids on the unit sphere, like the vectors: cosine cells
        if sample.shape[0]:
            self.index.train(sample)

    def add(self, passages: np.ndarray) -> None:
        if self.index is None or not self.index.is_trained:
            raise RuntimeError("faiss_ivf: call train() on a passage sample before add()")
        passages = np.ascontiguousarray(passages, dtype=np.float32)
        if passages.ndim != 2 or passages.shape[1] != self.queries.shape[1]:
            raise ValueError(f"shape mismatch: queries {self.queries.shape}, passages {passages.shape}")
        self.index.add(passages)

    @property
    def total(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """indices (q, min(N, passages)) int64 and scores float32, best first, ties to the lower index."""
        keep = min(self.params.top_n, self.total)
        indices = np.zeros((self.queries.shape[0], keep), dtype=np.int64)
        scores = np.zeros((self.queries.shape[0], keep), dtype=np.float32)
        if keep == 0:
            return indices, scores
        step = self.params.query_block_size
        for q0 in range(0, self.queries.shape[0], step):
            block = self.queries[q0 : q0 + step]
            indices[q0 : q0 + len(block)], scores[q0 : q0 + len(block)] = self._search(block, keep, keep + 1, 0)
        return indices, scores

    def _search(self, queries: np.ndarray, keep: int, k: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        """`keep` results per query, re-fetching the queries whose tie group or list came up short.

        Each re-fetch depends on the query alone, so a query's result never depends on its block.
        """
        k = min(k, self.total)
        scores, ids = self.index.search(queries, k, params=self._search_params(widen))
        ids, scores = _sort_results(ids, scores)
        found = (ids >= 0).sum(axis=1)
        short = found < keep
        tie_cut = ~short & (found == k) & (k < self.total) & (scores[:, keep - 1] == scores[:, k - 1])
        if short.any():
            if not self._can_widen(widen):
                raise RuntimeError(
                    f"{self.params.method}: {int(short.sum())} queries got fewer than {keep} results even "
                    "with the widest search; rebuild with larger index parameters"
                )
            ids[short, :keep], scores[short, :keep] = self._search(queries[short], keep, k, widen + 1)
        if tie_cut.any():
            ids[tie_cut, :keep], scores[tie_cut, :keep] = self._search(queries[tie_cut], keep, 2 * k, widen)
        return ids[:, :keep], scores[:, :keep]

    def _search_params(self, widen: int):
        import faiss

        if self.params.method == "faiss_ivf":
            return faiss.SearchParametersIVF(nprobe=self._nprobe(widen))
        if self.params.method == "faiss_hnsw":
            return faiss.SearchParametersHNSW(efSearch=self.params.hnsw.ef_search * 2**widen)
        return None

    def _nprobe(self, widen: int) -> int:
        return min(self.params.ivf.nprobe * 2**widen, self.index.nlist)

    def _can_widen(self, widen: int) -> bool:
        if self.params.method == "faiss_ivf":
            return self._nprobe(widen) < self.index.nlist
        if self.params.method == "faiss_hnsw":
            return self.params.hnsw.ef_search * 2**widen < self.total
        return False  # flat scores every passage: nothing wider to try


def _sort_results(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ordered by (score descending, index ascending); FAISS's empty slots (-1) last."""
    missing = ids < 0
    keyed_scores = np.where(missing, -np.inf, scores)
    keyed_ids = np.where(missing, np.iinfo(np.int64).max, ids)
    # -0.0 and 0.0 compare equal here, as in the exact search's keys.
    order = np.lexsort((keyed_ids, -keyed_scores), axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    return ids, scores
