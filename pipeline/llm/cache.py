"""A persistent key -> JSON cache for LLM calls, in one DuckDB file outside the DVC outs.

Every LLM step (generation, relevance scoring) keys a call by everything that decides its output:
the model identity, the full prompt, the output schema and the decoding parameters (`cache_key`).
Entries are written per batch as they complete, each batch in one transaction, so a stage killed
mid-way (even `kill -9`) finds every finished batch on its next run and redoes none of it. Only
successful calls are stored; a failure is recomputed next time.

Light on purpose (duckdb + stdlib): stages import it before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_cache (
    key VARCHAR PRIMARY KEY,   -- sha256 of the canonical JSON of the call's parts
    namespace VARCHAR NOT NULL, -- the step that wrote it (generate, score, ...), for inspection
    value VARCHAR NOT NULL,     -- JSON
    created_at TIMESTAMPTZ NOT NULL
)
"""


def cache_key(**parts: Any) -> str:
    """A stable key for a call: sha256 over the canonical JSON of `parts` (sorted keys, no spaces).

    Pass everything that decides the output (model identity, prompt, schema, decoding params) and
    nothing that does not (batch size, thread count), so changing the latter keeps the cache valid.
    """
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    value: Any  # the decoded JSON value
    created_at: datetime  # when the call that produced it finished (UTC)


class LLMCache:
    """Key -> JSON value store in a DuckDB file; `LLMCache(None)` is a disabled cache that stores nothing.

    One process writes at a time (DuckDB's file lock); stages run one after another under DVC.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._con: duckdb.DuckDBPyConnection | None = None
        self.hits = 0
        self.misses = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = duckdb.connect(str(self.path))
            self._con.execute(_SCHEMA)

    @property
    def enabled(self) -> bool:
        return self._con is not None

    def get_many(self, keys: Iterable[str]) -> dict[str, CacheEntry]:
        """The cached entries among `keys` (missing keys are simply absent); counts hits and misses."""
        keys = list(dict.fromkeys(keys))
        if self._con is None or not keys:
            self.misses += len(keys)
            return {}
        rows = self._con.execute(
            "SELECT key, value, created_at FROM llm_cache WHERE key IN (SELECT unnest($keys))",
            {"keys": keys},
        ).fetchall()
        found = {k: CacheEntry(json.loads(v), _utc(t)) for k, v, t in rows}
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, namespace: str, values: Mapping[str, Any]) -> dict[str, CacheEntry]:
        """Store `values` (key -> JSON-serialisable value) in one transaction and return them as entries.

        A key already present is overwritten: callers re-check cached values against their current
        rules and recompute the ones that no longer pass."""
        now = datetime.now(timezone.utc)
        if self._con is None or not values:
            return {k: CacheEntry(v, now) for k, v in values.items()}
        rows = [(k, namespace, json.dumps(v, ensure_ascii=False), now) for k, v in values.items()]
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.executemany("INSERT OR REPLACE INTO llm_cache VALUES (?, ?, ?, ?)", rows)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        return {k: CacheEntry(v, now) for k, v in values.items()}

    def count(self, namespace: str | None = None) -> int:
        if self._con is None:
            return 0
        if namespace is None:
            return self._con.execute("SELECT count(*) FROM llm_cache").fetchall()[0][0]
        return self._con.execute("SELECT count(*) FROM llm_cache WHERE namespace = ?", [namespace]).fetchall()[0][0]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> "LLMCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
