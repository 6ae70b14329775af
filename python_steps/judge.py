"""Stage `judge`: on a labelled BEIR split, does the LLM rerank the encoder's top N for the better?

Writes `judge.metrics_path` (nDCG@10 of knn, ql, rc, fused; the weight grid; `best_weights`, which
`select.weights: judge` reads) and `warehouse/judge.duckdb`: `judge_rankings` (query_id, passage_id,
knn_rank, knn_score, ql_rank, rc_rank, ql_sum, rc_logodds, relevance) and `judge_report` (ranking,
w_ql, w_rc, w_knn, ndcg_at_10, is_best). See pipeline/evaluation/judge.py. `judge.queries: 0` loads no model.
Run from the repository root: `python -m python_steps.judge`.
"""

from __future__ import annotations

from pipeline.warehouse import WarehouseError, write_stage, write_table
from python_steps._llm_stage import LLMStage

STAGE = "judge"


def main() -> None:
    run = LLMStage(STAGE)  # the LLM loads inside run_judge, only when there is something to judge
    params = run.params
    from pipeline.evaluation.judge import run_judge, write_metrics
    from pipeline.labelled import EvalDataError
    from pipeline.llm import LLMError, ScoringError
    from pipeline.retrieval.encoder import EncoderError  # torch: only once params are valid

    with run.exits_on(EvalDataError, EncoderError, LLMError, ScoringError, WarehouseError):
        result = run_judge(params, progress=True)
        with write_stage(STAGE) as con:
            write_table(con, "judge_rankings", result.rankings)
            write_table(con, "judge_report", result.report)
    write_metrics(result.metrics, params.judge.metrics_path)
    print(summary(result, params.judge.metrics_path, run.elapsed()))


def summary(result, metrics_path, total_s: float) -> str:
    """One screen: what was judged, with which models, and the nDCG@10 table."""
    from pipeline.evaluation.judge import summary_table

    m, s = result.metrics, result.stats
    if m["queries"] == 0:
        return f"{STAGE}: judge.queries is 0, nothing judged; {metrics_path} holds Gecko's default weights"
    methods = " + ".join(x.upper() for x in m["methods"]) or "no LLM method"
    extra = "".join(f"; {name}: {model}" for name, model in m.get("models", {}).items())
    return "\n".join(
        [
            f"{STAGE}: {m['queries']} queries of {m['path']} ({m['split']}) x top {m['top_n']} of "
            f"{m['corpus_docs']:,} docs in {total_s:.1f} s; relevant docs in the top {m['top_n']}: "
            f"{m['recall_at_top_n']:.1%}",
            f"  encoder {m['encoder']} ({s['embedded']:,} docs embedded); llm {m['llm']}, {methods}: "
            f"{s['cached']:,} prompts cached, {s['computed']:,} scored in {s['score_seconds']:.1f} s{extra}",
            summary_table(m),
            "  seconds per scored pair (uncached): "
            + ", ".join(f"{name} {sec:.3f}" for name, sec in s.get("seconds_per_pair", {}).items()),
            f"  best_weights {m['best_weights']} -> {metrics_path}",
        ]
    )


if __name__ == "__main__":
    main()
