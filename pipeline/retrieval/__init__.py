"""Retrieval: the encoder, top-N search behind one interface, the embedding cache, neighbor mining.

    base.py             `PassageSearch`, the interface every search implements, and its error
    exact.py            exact top-N by blocked matrix products
    faiss_knn.py        FAISS flat / IVF / HNSW top-N
    knn.py              `make_search` and the `neighbors` stage's work (`mine_neighbors`)
    encoder.py          the one encoder wrapper (torch) and the Gecko text format
    embedding_cache.py  embeddings cached by encoder fingerprint and text

Only the interface is imported here: a stage that uses the encoder does not run (or depend on)
the searches, and no torch loads before `pipeline.retrieval.encoder` is imported.
"""

from pipeline.retrieval.base import IndexParamsError, PassageSearch

__all__ = ["IndexParamsError", "PassageSearch"]
