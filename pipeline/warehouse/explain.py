"""`fret explain QUERY_ID`: one query's way through the pipeline, on one screen.

The seed passage, the task and query, the query filters' verdict, every mined neighbor with its
kNN / QL / RC / fused ranks and scores, and what became of each: the positive, the seed, a hard
negative, a candidate a false-negative guard removed, or one left unpicked. Read-only: the warehouse
files are attached the way `fret sql` attaches them, and nothing heavier than DuckDB is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipeline.warehouse.files import open_readonly
from pipeline.warehouse.sqlshell import format_table

# Every table the story reads, by the stage that writes it.
NEEDED = {
    "passages": "passages",
    "queries": "queries",
    "neighbors": "neighbors",
    "llm_scores": "llm_scores",
    **{t: "triples" for t in ("fused_ranks", "query_filters", "positives", "negative_candidates",
                              "hard_negatives", "triples")},
}  # fmt: skip

SEED_WORDS = 30  # of the seed passage's text, enough to recognise it

NEIGHBORS_SQL = """
select
    n.passage_id,
    p.title,
    n.knn_rank,
    n.knn_score,
    s.ql_rank,
    s.ql_sum,
    s.rc_rank,
    s.rc_logodds,
    f.fused_rank,
    f.fused_score,
    s.query_id is not null as scored,
    c.passage_id is not null as candidate,
    c.above_relative_margin,
    c.rated_relevant,
    c.eligible,
    c.positive_knn_score,
    h.negative_rank,
    h.strategy
from neighbors n
left join passages p on p.passage_id = n.passage_id
left join llm_scores s on s.query_id = n.query_id and s.passage_id = n.passage_id
left join fused_ranks f on f.query_id = n.query_id and f.passage_id = n.passage_id
left join negative_candidates c on c.query_id = n.query_id and c.passage_id = n.passage_id
left join hard_negatives h on h.query_id = n.query_id and h.negative_id = n.passage_id
where n.query_id = $query_id
order by f.fused_rank nulls last, n.knn_rank, n.passage_id
"""

NEIGHBOR_COLUMNS = ["passage", "title", "knn", "knn_score", "ql", "ql_sum", "rc", "rc_logodds", "fused",
                    "fused_score", "verdict"]  # fmt: skip

FILTERS = ("outside_round_trip", "above_max_copy_rate", "below_min_words", "above_max_words", "duplicate")


class ExplainError(LookupError):
    """An unknown query id, or a warehouse without the stages the story needs."""


@dataclass
class Explanation:
    """Everything `render` prints about one query (rows as column -> value dicts)."""

    query: dict[str, Any]
    seed: dict[str, Any] | None
    filters: dict[str, Any] | None
    positive: dict[str, Any] | None
    neighbors: list[dict[str, Any]] = field(default_factory=list)
    triples: list[dict[str, Any]] = field(default_factory=list)


def explain_query(query_id: str, warehouse: Path) -> Explanation:
    """Read one query's rows from every stage file (read-only).

    Raises:
        ExplainError: a table the story needs is missing (naming the stage to build), or no
            query has this id (with close ids when some share its beginning).
    """
    con, owners = open_readonly(warehouse)
    try:
        missing = sorted({stage for table, stage in NEEDED.items() if table not in owners})
        if missing:
            raise ExplainError(
                f"{warehouse}/ lacks the {', '.join(missing)} stage file(s) that fret explain reads: "
                "run `dvc repro triples`"
            )
        query = _one(con, "select * from queries where query_id = $query_id", query_id)
        if query is None:
            raise ExplainError(_unknown(con, query_id))
        return Explanation(
            query=query,
            seed=_one(con, "select passage_id, title, text from passages where passage_id = $query_id",
                      query["passage_id"]),  # fmt: skip
            filters=_one(con, "select * from query_filters where query_id = $query_id", query_id),
            positive=_one(con, "select * from positives where query_id = $query_id", query_id),
            neighbors=_rows(con, NEIGHBORS_SQL, query_id),
            triples=_rows(
                con, "select negative_id, negative_rank from triples where query_id = $query_id order by negative_rank",
                query_id,
            ),
        )
    finally:
        con.close()


def _rows(con: duckdb.DuckDBPyConnection, sql: str, value: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql, {"query_id": value})
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _one(con: duckdb.DuckDBPyConnection, sql: str, value: str) -> dict[str, Any] | None:
    rows = _rows(con, sql, value)
    return rows[0] if rows else None


def _unknown(con: duckdb.DuckDBPyConnection, query_id: str) -> str:
    """The error for an id not in `queries`: ids sharing its longest known beginning, or seeds' queries."""
    message = f"no query {query_id!r} in table queries"
    from_seed = [r["query_id"] for r in _rows(
        con, "select query_id from queries where passage_id = $query_id order by query_id limit 5", query_id)]
    if from_seed:
        return f"{message}; {query_id} is a seed passage, of query {', '.join(from_seed)}"
    # Longest prefix first, down to 2 characters (a single one matches every id: they all start alike).
    for end in range(len(query_id), 1, -1):
        close = [r["query_id"] for r in _rows(
            con, "select query_id from queries where starts_with(query_id, $query_id) order by query_id limit 5",
            query_id[:end])]  # fmt: skip
        if close:
            return f"{message}; ids beginning with {query_id[:end]!r}: {', '.join(close)}"
    return f"{message} (list some with `fret sql \"select query_id, query from queries limit 10\"`)"


def verdict(row: dict[str, Any], positive: dict[str, Any] | None, seed_id: str) -> str:
    """What became of one neighbor, and why: its role, the guard that removed it, or why it was not picked."""
    pid = row["passage_id"]
    if positive is not None and pid == positive["positive_id"]:
        return "POSITIVE" + (" (p1, not the seed)" if pid != seed_id else " (the seed)")
    if pid == seed_id:
        return "seed: never a negative" + (" (likely a second positive)" if positive is not None else "")
    if row["negative_rank"] is not None:
        return f"NEGATIVE #{row['negative_rank']} ({row['strategy']})"
    if not row["scored"]:
        return "not scored (no llm_scores row)"
    if not row["candidate"]:
        return "-"  # the query has no positive: nothing was selected
    guards = []
    if row["above_relative_margin"]:
        guards.append(f"above_relative_margin (knn {row['knn_score']:.4g} vs positive {row['positive_knn_score']:.4g})")
    if row["rated_relevant"]:
        guards.append(f"rated_relevant (rc_logodds {row['rc_logodds']:.4g})")
    if guards:
        return "guard: " + ", ".join(guards)
    return "eligible, not picked"


def _filter_reasons(filters: dict[str, Any]) -> list[str]:
    measures = {
        "outside_round_trip": f"seed at knn rank {filters['seed_knn_rank']}" if filters["seed_knn_rank"] is not None
        else "seed not mined into the top N",
        "above_max_copy_rate": f"copy rate {filters['copy_rate']:.2f}" if filters["copy_rate"] is not None else "",
        "below_min_words": f"{filters['n_words']} words",
        "above_max_words": f"{filters['n_words']} words",
        "duplicate": f"repeats {filters['duplicate_of']}",
    }
    return [f"{name} ({measures[name]})" for name in FILTERS if filters[name]]


def outcome(ex: Explanation) -> str:
    """One line: did the query reach `triples`, and if not, which step dropped it."""
    if ex.filters is not None and not ex.filters["kept"]:
        return "FILTERED OUT -> dropped: " + ", ".join(_filter_reasons(ex.filters))
    if ex.positive is None:
        return "no positive (no scored neighbor, so no fused top) -> dropped"
    negatives = [t["negative_id"] for t in ex.triples if t["negative_id"] is not None]
    if negatives:
        return f"{len(ex.triples)} training triple(s), negative(s) {', '.join(negatives)}"
    candidates = [r for r in ex.neighbors if r["candidate"]]
    if not candidates:
        why = "no mined passage besides the positive and the seed"
    elif not any(r["eligible"] for r in candidates):
        why = f"a guard removed all {len(candidates)} candidate(s)"
    else:
        why = "no eligible candidate inside select.range_min / range_max"
    if ex.triples:
        return f"no negative ({why}) -> kept without one (select.keep_without_negative): in-batch negatives only"
    return f"no negative ({why}) -> dropped (select.keep_without_negative is off)"


def _short(text: str | None, width: int = 28) -> str | None:
    return text if text is None or len(text) <= width else text[: width - 3] + "..."


def render(ex: Explanation) -> str:
    """The one-screen story of `explain_query`'s result."""
    q, seed_id = ex.query, ex.query["passage_id"]
    lines = [f"query {q['query_id']}  [{q['task_type']}]", f"  task:   {q['task']}", f"  query:  {q['query']}"]
    if ex.seed is None:
        lines.append(f"  seed:   {seed_id} (not in passages)")
    else:
        words = (ex.seed["text"] or "").split()
        text = " ".join(words[:SEED_WORDS]) + (" ..." if len(words) > SEED_WORDS else "")
        lines.append(f"  seed:   {seed_id}  {ex.seed['title'] or '(no title)'}: {text}")
    if ex.filters is not None:
        f = ex.filters
        copy = "-" if f["copy_rate"] is None else f"{f['copy_rate']:.2f}"
        knn = "seed not mined" if f["seed_knn_rank"] is None else f"seed at knn rank {f['seed_knn_rank']}"
        lines.append(f"  filters: {'kept' if f['kept'] else 'FILTERED'} ({f['n_words']} words, copy rate {copy}, {knn})")
    if ex.positive is not None:
        p = ex.positive
        how = "the seed" if p["positive_id"] == seed_id else f"not the seed {seed_id}"
        top = "" if p["fused_top_id"] in (None, p["positive_id"]) else f"; fused top (p1) {p['fused_top_id']}"
        if p["positive_id"] not in {r["passage_id"] for r in ex.neighbors}:
            top += "; not mined into the top N"
        lines.append(f"  positive: {p['positive_id']} ({how}{top})")
    lines.append(f"  outcome: {outcome(ex)}")
    mined = ex.neighbors
    if not mined:
        lines.append("  no neighbors mined for this query")
        return "\n".join(lines)
    rows = [
        (r["passage_id"], _short(r["title"]), r["knn_rank"], r["knn_score"], r["ql_rank"], r["ql_sum"], r["rc_rank"],
         r["rc_logodds"], r["fused_rank"], r["fused_score"], verdict(r, ex.positive, seed_id))
        for r in mined
    ]  # fmt: skip
    lines += ["", f"neighbors ({len(mined)} mined), best fused rank first:"]
    lines.append(format_table(NEIGHBOR_COLUMNS, rows, max_rows=len(rows)))
    return "\n".join(lines)
