"""Stage `queries`: the LLM writes a task and a query for each seed passage (Gecko's FRet step 1).

Tables in `warehouse/queries.duckdb`: `queries` (one row per valid query), `generation_failures`
(every output still invalid after its retries, with the raw text) and `generation_report`
(metric, value: counts, copy rate, duplicates, task types). LLM calls are cached in `llm.cache_path`,
so a re-run, a grown corpus or a run resumed after a crash only generates what is missing.
Run from the repository root: `python -m python_steps.queries`.
"""

from __future__ import annotations

from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import GenerationError, GenerationResult, PromptTemplate, few_shot_examples, generate_queries
from pipeline.params import GenerateParams
from pipeline.warehouse import write_stage, write_table
from python_steps._llm_stage import LLMStage

STAGE = "queries"


def main() -> None:
    run = LLMStage(STAGE)
    params = run.params
    with run.exits_on(ValueError):  # bad few-shot files fail before the LLM loads
        template = prompt_template(params.generate, params.base.seed)
    llm = run.load_llm()
    with write_stage(STAGE, upstream=["passages"]) as con, LLMCache(params.llm.cache_path) as cache:
        passages = con.sql("SELECT passage_id, title, text FROM passages ORDER BY passage_id").to_arrow_table()
        with run.exits_on(GenerationError):
            result = generate_queries(passages, llm, params.generate, params.base.seed, cache, template)
        rows = write_table(con, "queries", result.queries)
        write_table(con, "generation_failures", result.failures)
        write_table(con, "generation_report", result.report)
    print(summary(result, rows, llm.identity, run.load_seconds, run.elapsed()))


def prompt_template(params: GenerateParams, seed: int) -> PromptTemplate:
    """prompts/generate.jinja, with the few-shot examples of `generate.examples` in place of its own."""
    shots = [e for source in params.examples for e in few_shot_examples(source, seed, params.max_passage_words)]
    return PromptTemplate().with_examples(shots)


def summary(result: GenerationResult, rows: int, llm: str, load_seconds: float, seconds: float) -> str:
    """One screen: rows, failures, cache use, time and throughput, quality, task types, examples."""
    s = result.stats
    report = dict(zip(result.report.column("metric").to_pylist(), result.report.column("value").to_pylist()))
    types = ", ".join(f"{k.removeprefix('task_type:')} {int(v)}" for k, v in report.items() if k.startswith("task_type:"))
    lines = [
        f"{STAGE}: {rows:,} queries, {int(s['failures']):,} failures (table generation_failures) "
        f"in {seconds:.1f} s with {llm} (load {load_seconds:.1f} s)",
        f"  {int(s['requests']):,} requested: {int(s['cached']):,} from the LLM cache, {int(s['generated']):,} generated "
        f"({int(s['calls']):,} calls with retries, {int(s['stopped_copies']):,} cut as few-shot copies) "
        f"in {s['generate_seconds']:.1f} s: "
        f"{s['passages_per_s']:.2f} passages/s, {s['tokens_per_s']:.0f} tokens/s",
        f"  query words {report['mean_query_words']:.1f}, copy rate {report['mean_copy_rate']:.2f} "
        f"({int(report['full_copies'])} full copies), duplicates {int(report['duplicate_queries'])}, "
        f"retried {int(report['retried'])}",
        f"  task types: {types}",
    ]
    for r in result.queries.slice(0, 3).to_pylist():
        lines.append(f"  [{r['task_type']}] {r['task']} | {r['query']}")
    for f in result.failures.slice(0, 3).to_pylist():
        lines.append(f"  failed {f['passage_id']}: {f['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
