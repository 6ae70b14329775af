"""A DuckDB cache of embeddings, keyed by encoder fingerprint + sha256 of the exact text.

It lives outside the DVC outs (`.fret/cache/embeddings.duckdb` by default), so re-running a stage,
or an experiment that does not touch the encoder, embeds nothing twice. New vectors are committed
in chunks, each its own transaction: a kill loses at most the chunk being embedded.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.progress import progress_bar

if TYPE_CHECKING:  # the encoder pulls in torch; only its type is needed here
    from pipeline.retrieval.encoder import Encoder

DEFAULT_CACHE = Path(".fret/cache/embeddings.duckdb")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    model VARCHAR NOT NULL,       -- Encoder.fingerprint
    text_sha256 BLOB NOT NULL,    -- sha256 of the UTF-8 text
    embedding FLOAT[] NOT NULL,
    PRIMARY KEY (model, text_sha256)
)
"""


@dataclass
class CacheStats:
    texts: int = 0  # texts asked for
    unique: int = 0  # distinct texts among them
    hits: int = 0  # distinct texts found in the cache
    embedded: int = 0  # distinct texts the encoder ran on


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Open (creating if needed) a cache file. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path = DEFAULT_CACHE) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(self.path))
        self.con.execute(_SCHEMA)

    def __enter__(self) -> "EmbeddingCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def lookup(self, model: str, keys: Sequence[bytes]) -> dict[int, np.ndarray]:
        """Cached vectors for `keys`, by position in `keys`; missing keys are absent."""
        if not keys:
            return {}
        wanted = pa.table({"i": pa.array(range(len(keys)), pa.int64()), "text_sha256": pa.array(keys, pa.binary())})
        self.con.register("_wanted", wanted)
        try:
            found = self.con.sql(
                "SELECT w.i, e.embedding FROM _wanted w JOIN embeddings e USING (text_sha256) "
                "WHERE e.model = ? ORDER BY w.i",
                params=[model],
            ).to_arrow_table()
        finally:
            self.con.unregister("_wanted")
        if found.num_rows == 0:
            return {}
        flat = pc.list_flatten(found["embedding"]).to_numpy().astype(np.float32, copy=False)
        vectors = flat.reshape(found.num_rows, -1)
        return dict(zip(found["i"].to_pylist(), vectors, strict=True))

    def store(self, model: str, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Insert one chunk in its own transaction (committed before returning)."""
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        rows = pa.table({"text_sha256": pa.array(keys, pa.binary()), "embedding": embedding})
        self.con.register("_rows", rows)
        try:
            self.con.execute("BEGIN TRANSACTION")
            self.con.execute(
                "INSERT OR IGNORE INTO embeddings SELECT ?, text_sha256, embedding::FLOAT[] FROM _rows", [model]
            )
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        finally:
            self.con.unregister("_rows")

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self.con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        return self.con.execute("SELECT count(*) FROM embeddings WHERE model = ?", [model]).fetchone()[0]


def open_cache(path: str | Path | None) -> EmbeddingCache | None:
    """The cache at `path`, or None when disabled (path None) or held by another process.

    DuckDB lets one process write a file at a time; a second stage running at the same moment
    embeds without the cache instead of failing.
    """
    if path is None:
        return None
    try:
        return EmbeddingCache(path)
    except duckdb.IOException as err:
        print(f"warning: embedding cache {path} unavailable ({err}); embedding without it", file=sys.stderr)
        return None


def encode_cached(
    encoder: "Encoder",
    texts: Sequence[str],
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 64,
    chunk_size: int = 2048,
    progress: bool = False,
    desc: str = "encode",
) -> tuple[np.ndarray, CacheStats]:
    """`encoder.encode(texts)` that embeds each distinct text at most once, ever, per fingerprint.

    Args:
        cache: None embeds everything (duplicates still once).
        chunk_size: texts embedded between commits; a kill loses at most this much work.
        progress: a tqdm bar (texts/s) over the texts that need the encoder.

    Returns:
        (n, dim) float32 unit vectors in input order, and hit/miss counts.
    """
    unique: dict[str, int] = {}
    slots = np.array([unique.setdefault(t, len(unique)) for t in texts], dtype=np.int64)
    distinct = list(unique)
    stats = CacheStats(texts=len(texts), unique=len(distinct))
    vectors = np.empty((len(distinct), encoder.dim), dtype=np.float32)
    keys = [text_key(t) for t in distinct]
    model = encoder.fingerprint
    found = cache.lookup(model, keys) if cache is not None else {}
    for i, vector in found.items():
        vectors[i] = vector
    stats.hits = len(found)
    # Longest first across all chunks, so each chunk's batches are already of similar length.
    missing = sorted((i for i in range(len(distinct)) if i not in found), key=lambda i: -len(distinct[i]))
    stats.embedded = len(missing)
    bar = progress_bar(len(missing), desc, "text", progress)
    try:
        for start in range(0, len(missing), chunk_size):
            rows = missing[start : start + chunk_size]
            chunk = encoder.encode([distinct[i] for i in rows], batch_size, on_batch=bar.update if bar else None)
            vectors[rows] = chunk
            if cache is not None:
                cache.store(model, [keys[i] for i in rows], chunk)
    finally:
        if bar is not None:
            bar.close()
    return vectors[slots], stats
