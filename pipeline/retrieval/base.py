"""The one interface every top-N search implements (`exact.py`, `faiss_knn.py`), and its error."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class IndexParamsError(ValueError):
    """Search settings that do not fit the corpus at hand; the message names the params key."""


class PassageSearch(Protocol):
    """Top-N passages per query, over passages that arrive in chunks: what `mine_neighbors` streams
    passage chunks into (`exact.ExactTopN`, `faiss_knn.FaissTopN`)."""

    def add(self, passages: np.ndarray) -> None:
        """Score one chunk of passages (indices continue from the previous chunk)."""
        ...

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """indices (q, n) int64 and scores float32, best first, ties to the lower passage index."""
        ...
