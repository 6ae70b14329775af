"""Read-only ad-hoc SQL over the warehouse (`fret sql`).

Every stage file is attached READ_ONLY, so the files themselves cannot change; on top of that a
query must be exactly one SELECT (or EXPLAIN) as DuckDB's own parser classifies it, so COPY ... TO,
ATTACH, INSTALL/LOAD, SET, CREATE and friends are refused before anything runs.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline.warehouse.files import open_readonly

READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryRefused(ValueError):
    """A statement that could write or change the session; `fret sql` is read-only."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    relation: duckdb.DuckDBPyRelation | None = None


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Raise QueryRefused unless `query` is a single SELECT/EXPLAIN statement."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as err:
        raise QueryRefused(f"cannot parse the query: {err}") from None
    if len(statements) != 1:
        raise QueryRefused(f"fret sql runs exactly one statement; got {len(statements)}")
    try:
        kind = statements[0].type
    except ValueError:  # a statement type newer than this duckdb module's enum (e.g. UPDATE EXTENSIONS)
        raise QueryRefused("fret sql is read-only: this kind of statement is refused") from None
    if kind not in READ_STATEMENTS:
        raise QueryRefused(
            f"fret sql is read-only: {kind.name} statements are refused "
            "(the warehouse is written only by `dvc repro`)"
        )
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE executes its statement (`EXPLAIN ANALYZE COPY ... TO` writes the file):
        # what is explained must itself be a read.
        inner = _explained(statements[0].query)
        try:
            check_read_only(con, inner)
        except QueryRefused as err:
            raise QueryRefused(f"EXPLAIN of a statement that is not a read: {err}") from None


# First words of a parenthesised statement, told apart from EXPLAIN's `(option, ...)` list.
_QUERY_STARTS = {"select", "with", "from", "values", "table", "(", "summarize", "describe", "show", "pivot", "unpivot"}


def _explained(query: str) -> str:
    """The statement after `EXPLAIN [ANALYZE]` or `EXPLAIN (options)`, comments skipped."""
    tokens = duckdb.tokenize(query)
    ends = [start for start, _ in tokens[1:]] + [len(query)]
    words = [
        (start, query[start:end].strip().lower())
        for (start, kind), end in zip(tokens, ends)
        if kind != duckdb.token_type.comment
    ]
    at = 1  # words[0] is EXPLAIN
    if at < len(words) and words[at][1] == "analyze":
        at += 1
    elif at + 1 < len(words) and words[at][1] == "(" and words[at + 1][1] not in _QUERY_STARTS:
        depth = 0
        while at < len(words):
            depth += words[at][1].count("(") - words[at][1].count(")")
            at += 1
            if depth <= 0:
                break
    return query[words[at][0] :] if at < len(words) else ""


def _lock_down(con: duckdb.DuckDBPyConnection) -> None:
    # No extension may be fetched or loaded behind the user's back, and the query cannot undo this.
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def run_query(query: str, warehouse: Path) -> QueryResult:
    """Run one read-only query with every warehouse table visible by its bare name."""
    con, _ = open_readonly(warehouse)
    check_read_only(con, query)
    _lock_down(con)
    rel = con.sql(query)
    if rel is None:  # EXPLAIN and similar may not return a relation in every DuckDB version
        return QueryResult([], [])
    return QueryResult(list(rel.columns), rel.fetchall(), rel)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:77] + "..."


def format_table(columns: list[str], rows: list[tuple[Any, ...]], max_rows: int = 50) -> str:
    """An aligned plain-text table; numbers right-aligned, long cells cut at 80 characters."""
    shown = [[_cell(v) for v in row] for row in rows[:max_rows]]
    widths = [len(c) for c in columns]
    for row in shown:
        widths = [max(w, len(v)) for w, v in zip(widths, row)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows[:max_rows])
               for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in shown]
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more rows ({len(rows)} in all; use --max-rows or --format csv)")
    else:
        out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def emit(result: QueryResult, fmt: str, output: Path | None, max_rows: int) -> None:
    """Write the result as an aligned table, CSV, JSON (array of objects) or Parquet."""
    if fmt == "parquet":
        assert output is not None and result.relation is not None
        result.relation.write_parquet(str(output))
        return
    stream = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if fmt == "table":
            stream.write(format_table(result.columns, result.rows, max_rows) + "\n")
        elif fmt == "csv":
            writer = csv.writer(stream)
            writer.writerow(result.columns)
            writer.writerows(result.rows)
        elif fmt == "json":
            records = [dict(zip(result.columns, row)) for row in result.rows]
            json.dump(records, stream, default=str, ensure_ascii=False, indent=1)
            stream.write("\n")
    finally:
        if output:
            stream.close()
