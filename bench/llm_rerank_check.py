"""What the LLM scores mean: rerank MiniLM's top-20 on SciFact TRAIN queries by QL, RC and their fusion.

For seeded SciFact train queries (qrels/train.tsv; the test split stays untouched), MiniLM
(all-MiniLM-L6-v2, raw texts, no prefixes) retrieves the top 20 of the full corpus; fret's scorer
(`score_relevance`, the stage's code and prompts) scores every pair with the fixed task below; the
20 are reranked by QL (ql_sum), by RC (rc_logodds) and by Gecko's fusion R = 1/r_QL + 1/r_RC (ties:
rc_rank, then knn_rank, as sql/fused_ranks.sql), and nDCG@10 of each is printed beside MiniLM's.
Scores go through the LLM cache (`llm.cache_path`), so a re-run with more queries scores only the new pairs.
Gecko's reference (a large LLM, BEIR average): 51.3 encoder, 52.8 QL, 54.1 RC, 56.8 fused.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_rerank_check.py [--queries 100 --dtype bfloat16 --threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

from _scifact import TASK, load_scifact, minilm_top_k, pairs_table, sample_queries


def ndcg_at_10(ranked: list[str], relevant: dict[str, int]) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(relevant.values(), reverse=True)[:10]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def rerankings(rows: list[dict]) -> dict[str, list[str]]:
    """One query's scored top-k -> passage ids in each method's order."""
    fused = lambda r: (-(1 / r["ql_rank"] + 1 / r["rc_rank"]), r["rc_rank"], r["knn_rank"])  # noqa: E731
    return {
        "MiniLM (encoder)": [r["passage_id"] for r in sorted(rows, key=lambda r: r["knn_rank"])],
        "QL rerank": [r["passage_id"] for r in sorted(rows, key=lambda r: r["ql_rank"])],
        "RC rerank": [r["passage_id"] for r in sorted(rows, key=lambda r: r["rc_rank"])],
        "fused 1/r_QL + 1/r_RC": [r["passage_id"] for r in sorted(rows, key=fused)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from pipeline.cache import LLMCache
    from pipeline.llm import load_llm
    from pipeline.params import BaseParams, LLMParams, ScoreParams
    from pipeline.scoring import score_relevance

    started = time.perf_counter()
    corpus, queries, qrels = load_scifact("train")
    chosen = sample_queries(queries, args.queries, args.seed)
    top = minilm_top_k(corpus, sorted(corpus), queries, chosen, args.top, args.threads)
    pairs = pairs_table(corpus, queries, top)
    llm_params = LLMParams(dtype=args.dtype)
    llm = load_llm(llm_params, BaseParams(threads=args.threads, device="cpu"))
    params = ScoreParams(batch_size=args.batch_size, max_passage_tokens=args.max_passage_tokens)
    with LLMCache(llm_params.cache_path) as cache:
        result = score_relevance(pairs, llm, params, cache, progress=True)

    by_query: dict[str, list[dict]] = {}
    for row in result.scores.to_pylist():
        by_query.setdefault(row["query_id"], []).append(row)
    totals: dict[str, float] = {}
    for qid, rows in by_query.items():
        for method, ranked in rerankings(rows).items():
            totals[method] = totals.get(method, 0.0) + ndcg_at_10(ranked, qrels[qid])
    n = len(by_query)
    recall = sum(any(d in qrels[q] for d, _ in top[q]) for q in chosen) / n
    s = result.stats
    print(f"SciFact train: {n} queries (seed {args.seed}) x MiniLM top {args.top} of {len(corpus):,} docs; "
          f"a relevant doc in the top {args.top} for {recall:.0%}")
    print(f"llm {llm.identity}, passages cut at {args.max_passage_tokens} tokens; task: {TASK!r}")
    print(f"{s['pairs']} pairs: {s['cached']} prompts cached, {s['computed']} scored in {s['score_seconds']:.0f} s "
          f"({s['pairs_per_s']:.2f} pairs/s); total {time.perf_counter() - started:.0f} s")
    print(f"{'ranking':<24} nDCG@10   (Gecko, BEIR avg, large LLM)")
    for method, gecko in zip(totals, ["51.3", "52.8", "54.1", "56.8"]):
        print(f"{method:<24} {100 * totals[method] / n:6.1f}    ({gecko})")


if __name__ == "__main__":
    main()
