"""What the LLM scores mean: rerank MiniLM's top-20 on SciFact TRAIN queries by QL, RC and their fusions.

The `judge` stage's own code (`pipeline.evaluation.judge.run_judge`) on the full SciFact corpus
(data/eval/scifact, qrels/train.tsv; the test split stays untouched): seeded train queries,
MiniLM's top 20 of all 5,183 documents, every pair scored by fret's scorer (`score_relevance`, the
stage's prompts) with the fixed task below, and nDCG@10 of the encoder, QL, RC, Gecko's fusion
R = 1/r_QL + 1/r_RC and the best of the weight grid, beside Gecko's reference. MiniLM sees raw texts
by default, as MTEB embeds SciFact (its best score); --gecko-format uses the pipeline's templates.
Embeddings and scores go through fret's caches, so a re-run with more queries scores only the new pairs.
Gecko's reference (a large LLM, BEIR average): 51.3 encoder, 52.8 QL, 54.1 RC, 56.8 fused.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_rerank_check.py [--queries 100 --dtype bfloat16 --threads 1]
"""

from __future__ import annotations

import argparse
import time

from _scifact import SCIFACT, TASK

GECKO = {"knn": "51.3", "ql": "52.8", "rc": "54.1", "fused": "56.8"}


def build_params(args: argparse.Namespace):
    """The judge's params for this run: SciFact train, MiniLM (raw texts unless --gecko-format)."""
    from pipeline.params import BaseParams, EncoderParams, JudgeParams, LLMParams, Params, ScoreParams

    raw = {"query_template": "{query}", "passage_template": "{title} {text}", "empty_title": ""}
    return Params(
        base=BaseParams(seed=args.seed, threads=args.threads, device="cpu"),
        llm=LLMParams(dtype=args.dtype),
        score=ScoreParams(batch_size=args.batch_size, max_passage_tokens=args.max_passage_tokens, methods=args.methods),
        encoder=EncoderParams() if args.gecko_format else EncoderParams(**raw),
        judge=JudgeParams(
            path=SCIFACT, split="train", task=TASK, queries=args.queries, top_n=args.top, max_corpus=args.max_corpus
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--max-corpus", type=int, default=None, help="relevant docs + a seeded sample (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    parser.add_argument("--methods", nargs="+", choices=["ql", "rc"], default=["ql", "rc"])
    parser.add_argument("--gecko-format", action="store_true", help="embed with the Gecko templates, not raw texts")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from pipeline.evaluation.judge import run_judge

    started = time.perf_counter()
    result = run_judge(build_params(args), progress=True)
    m, s = result.metrics, result.stats
    print(f"SciFact train: {m['queries']} queries (seed {args.seed}) x MiniLM top {m['top_n']} of "
          f"{m['corpus_docs']:,} docs; relevant docs in the top {m['top_n']}: {m['recall_at_top_n']:.0%}")
    print(f"llm {m['llm']}, passages cut at {args.max_passage_tokens} tokens; task: {TASK!r}")
    print(f"{s['pairs']} pairs: {s['cached']} prompts cached, {s['computed']} scored in {s['score_seconds']:.0f} s "
          f"({s['pairs_per_s']:.2f} pairs/s); total {time.perf_counter() - started:.0f} s")
    print(f"{'ranking':<24} nDCG@10   (Gecko, BEIR avg, large LLM)")
    for name, value in m["ndcg_at_10"].items():
        shown = f"{100 * value:6.1f}" if value is not None else f"{'-':>6}"
        print(f"{name:<24} {shown}    ({GECKO[name]})")
    w = m["best_weights"]
    weights = f"w_ql {w['ql']:g}, w_rc {w['rc']:g}, w_knn {w['knn']:g}"
    print(f"{'best of the grid':<24} {100 * m['best_ndcg_at_10']:6.1f}    ({weights})")


if __name__ == "__main__":
    main()
