"""Stage `llm_scores`: the LLM scores every mined (query, passage) pair by QL and RC (Gecko's relabelling).

Tables in `warehouse/llm_scores.duckdb`: `llm_scores` (query_id, passage_id, knn_rank, ql_sum,
ql_mean, rc_logodds, ql_rank, rc_rank, ql_tokens, llm, prompt_hash); the columns of a method left out
of `score.methods` are NULL. `llm_scores_report` (metric, value) counts the neighbors and those the
joins leave unscored because their query or passage is missing upstream. Every prompt goes through
the LLM cache in `llm.cache_path`.
Run from the repository root: `python -m python_steps.llm_scores`.
"""

from __future__ import annotations

from pipeline.warehouse import WarehouseError, write_stage, write_table
from python_steps._llm_stage import LLMStage

STAGE = "llm_scores"
UPSTREAM = ["passages", "queries", "neighbors"]

# Sorted, so the output does not depend on upstream row order.
PAIRS_SQL = """
select n.query_id, n.passage_id, n.knn_rank::bigint as knn_rank, q.task, q.query, p.title, p.text
from neighbors n
join queries q using (query_id)
join passages p on p.passage_id = n.passage_id
order by n.query_id, n.knn_rank, n.passage_id
"""

# What PAIRS_SQL's inner joins leave out, by reason (a row missing both counts under each), so no
# neighbor goes unscored without a word. Against distinct ids: a repeated id must not inflate counts.
DROPS_SQL = """
select
    count(*) as neighbors,
    count(*) filter (where q.query_id is null) as neighbors_without_query,
    count(*) filter (where p.passage_id is null) as neighbors_without_passage,
    count(*) filter (where q.query_id is null or p.passage_id is null) as neighbors_dropped
from neighbors n
left join (select distinct query_id from queries) q using (query_id)
left join (select distinct passage_id from passages) p on p.passage_id = n.passage_id
"""


def main() -> None:
    run = LLMStage(STAGE)
    params = run.params
    if not params.score.methods:
        return write_unscored(run)
    from pipeline.llm import LLMError, ScoringError
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.scoring import score_relevance

    llm = run.load_llm()
    cache = LLMCache(params.llm.cache_path)
    try:
        with run.exits_on(WarehouseError, ScoringError, LLMError), write_stage(STAGE, upstream=UPSTREAM) as con:
            drops = join_drops(con)
            pairs = con.sql(PAIRS_SQL).to_arrow_table()
            result = score_relevance(pairs, llm, params.score, cache, progress=True)
            rows = write_table(con, STAGE, result.scores)
            write_table(con, "llm_scores_report", report_table({**drops, "pairs_scored": rows}))
    finally:
        cache.close()
    print(summary(result.stats, rows, llm, params, run.load_seconds, run.elapsed(), drops))


def write_unscored(run: LLMStage) -> None:
    """score.methods: []: the mined pairs with NULL scores, and no LLM loaded."""
    from pipeline.llm.scoring import unscored_table

    with run.exits_on(WarehouseError), write_stage(STAGE, upstream=UPSTREAM) as con:
        drops = join_drops(con)
        rows = write_table(con, STAGE, unscored_table(con.sql(PAIRS_SQL).to_arrow_table()))
        write_table(con, "llm_scores_report", report_table({**drops, "pairs_scored": 0}))
    print(f"{STAGE}: {rows:,} mined pairs written unscored (score.methods: []) in {run.elapsed():.2f} s")
    print(drops_line(drops))


def join_drops(con) -> dict[str, int]:
    """Counts of the neighbors PAIRS_SQL drops (query or passage missing upstream), by reason."""
    cursor = con.execute(DROPS_SQL)
    (row,) = cursor.fetchall()
    return dict(zip([d[0] for d in cursor.description], row))


def report_table(counts: dict[str, int]):
    """The (metric, value) table `llm_scores_report`."""
    import pyarrow as pa

    return pa.table({"metric": list(counts), "value": pa.array(list(counts.values()), pa.int64())})


def drops_line(drops: dict[str, int]) -> str:
    """The summary's account of the joins: every neighbor scored, or how many were not and why."""
    if not drops["neighbors_dropped"]:
        return f"  joins: all {drops['neighbors']:,} neighbors have their query and passage"
    return (
        f"  joins: {drops['neighbors_dropped']:,} of {drops['neighbors']:,} neighbors NOT scored: "
        f"{drops['neighbors_without_query']:,} whose query is missing from queries, "
        f"{drops['neighbors_without_passage']:,} whose passage is missing from passages "
        "(table llm_scores_report; re-run `dvc repro` upstream)"
    )


def summary(stats: dict, rows: int, llm, params, load_s: float, total_s: float, drops: dict[str, int]) -> str:
    """One screen: rows written, neighbors the joins dropped, cache use, time and throughput."""
    s = stats
    rate = f"{s['pairs_per_s']:.2f} pairs/s" if s["computed"] else "nothing to score"
    methods = " + ".join(m.upper() for m in params.score.methods)
    return "\n".join(
        [
            f"{STAGE}: {rows:,} scored pairs ({s['prompts']:,} prompts: {methods}) in {total_s:.2f} s",
            f"  llm {llm.identity} on {llm.device.type}, loaded in {load_s:.2f} s; "
            f"batch {params.score.batch_size}, passages cut at {params.score.max_passage_tokens} tokens",
            f"  llm cache: {s['cached']:,} hits, {s['computed']:,} prompts scored over {s['passages']:,} passages "
            f"in {s['batches']:,} batches, {s['score_seconds']:.2f} s: {rate}",
            f"  tokens through the model: {s['forward_tokens']:,} for prompts of {s['prompt_tokens']:,} "
            f"(shared prefixes run once; passages with fewer than {params.score.min_shared_prompts} prompts pooled)",
            drops_line(drops),
        ]
    )


if __name__ == "__main__":
    main()
