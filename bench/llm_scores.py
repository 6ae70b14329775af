"""Benchmark: fret's LLM relevance scorer vs the plain one-pair-at-a-time transformers loop.

Workload: seeded SciFact train queries and their MiniLM top-k. By default (`--pool seeds`) the
documents searched are the gold documents of twice as many seeded train queries, so that, as in the
`llm_scores` stage (queries are written from the corpus's own passages), passages come back for
several queries; `--pool full` searches all 5,183 documents, where almost no passage is shared and
only the QL/RC prefix sharing is left. The pairs-per-passage figure is printed.

Peer: for each pair, the QL prompt and the RC prompt each through `model(input_ids)` on its own, full
logits, log-softmax, gather: what one writes without fret. fret: `score_relevance` with a disabled
cache (every pair computed). Same model (SmolLM2-135M-Instruct), same pairs, same prompts, same
dtype and threads; scores are checked equal before any number is printed. Model loading and a
warm-up are kept out of the timings.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_scores.py [--queries 8 --top 10 --pool seeds --threads 1]

Roofline (bench/_roofline.py): each side's GFLOP/s and share of the matmul peak measured in this
process, over the forward passes each side ran (counted by a hook on the model): 2 x linear params x
tokens (pads included; the peer runs every prompt whole, fret each passage prefix once, then the
tails) + 2 x 2 x layers x Q x K x hidden (Q positions over K keys: n^2 for a whole prompt of n
tokens, t x (p + t) for a tail of t after a cached prefix of p) + 2 x vocab x hidden per position
whose logits are computed (the peer: all; fret: from the first position a score reads).
SmolLM2-135M's config.

Last line: `ratio: X.XX` = fret's pairs/s over the peer's, measured in this run.
"""

from __future__ import annotations

import argparse
import time

from _scifact import load_scifact, minilm_top_k, pairs_table, sample_queries


def plain_scores(llm, requests, yes_ids, no_ids) -> dict[str, float]:
    """The peer: every prompt on its own through the model; cache key -> QL sum or RC log-odds."""
    import torch

    out = {}
    with torch.inference_mode():
        for r in requests:
            ids = llm.encode(r.prompt)
            logprobs = torch.log_softmax(llm.model(torch.tensor([ids])).logits[0].float(), dim=-1)
            if r.method == "ql":
                start = len(llm.encode(r.prompt[: r.target_start]))
                out[r.key] = float(sum(logprobs[i - 1, ids[i]] for i in range(start, len(ids))))
            else:
                last = logprobs[-1].double()
                out[r.key] = float(torch.logsumexp(last[yes_ids], 0) - torch.logsumexp(last[no_ids], 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--pool", choices=["seeds", "full"], default="seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-passage-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--min-shared-prompts", type=int, default=None,
                        help="score.min_shared_prompts (default: fret's); 1 scores every passage on its own")
    args = parser.parse_args()

    import torch

    from pipeline.llm import load_llm
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.scoring import ScoreTemplate, build_requests, score_relevance
    from pipeline.llm.transformers_backend import PrefixScorer
    from pipeline.params import BaseParams, LLMParams, ScoreParams

    corpus, queries, qrels = load_scifact("train")
    pool_queries = sample_queries(queries, 2 * args.queries, args.seed)
    chosen = pool_queries[: args.queries]
    doc_ids = sorted(corpus) if args.pool == "full" else sorted({d for q in pool_queries for d in qrels[q]})
    top = minilm_top_k(corpus, doc_ids, queries, chosen, args.top, args.threads)
    pairs = pairs_table(corpus, queries, top)
    n_passages = len(set(pairs["passage_id"].to_pylist()))

    started = time.perf_counter()
    llm = load_llm(LLMParams(dtype=args.dtype), BaseParams(threads=args.threads, device="cpu"))
    load_s = time.perf_counter() - started
    params = ScoreParams(batch_size=args.batch_size, max_passage_tokens=args.max_passage_tokens)
    if args.min_shared_prompts is not None:
        params = params.model_copy(update={"min_shared_prompts": args.min_shared_prompts})
    template = ScoreTemplate()
    scorer = PrefixScorer(llm, template.yes_words, template.no_words)
    requests = build_requests(pairs, llm, params, template)
    with torch.inference_mode():  # warm-up, untimed
        llm.model(torch.tensor([llm.encode(requests[0].prompt)]))

    from _roofline import ForwardCounter, Transformer, peaks, report

    model, counter = Transformer.from_config(llm.model.config), ForwardCounter(llm.model)
    started = time.perf_counter()
    peer = plain_scores(llm, requests, scorer.yes_ids, scorer.no_ids)
    peer_s = time.perf_counter() - started
    peer_flops = counter.flops(model)
    counter.reset()
    started = time.perf_counter()
    result = score_relevance(pairs, llm, params, LLMCache(None), template, progress=False, scorer=scorer)
    fret_s = time.perf_counter() - started
    fret_flops = counter.flops(model)
    alone_s = None
    if params.min_shared_prompts > 1:  # the same work with every passage on its own, side by side
        alone = params.model_copy(update={"min_shared_prompts": 1})
        alone_scorer = PrefixScorer(llm, template.yes_words, template.no_words)
        started = time.perf_counter()
        alone_result = score_relevance(pairs, llm, alone, LLMCache(None), template, progress=False, scorer=alone_scorer)
        alone_s = time.perf_counter() - started
    counter.close()

    ours = {}
    for row in result.scores.to_pylist():
        ours[(row["query_id"], row["passage_id"], "ql")] = row["ql_sum"]
        ours[(row["query_id"], row["passage_id"], "rc")] = row["rc_logodds"]
    tokens = {(row["query_id"], row["passage_id"]): row["ql_tokens"] for row in result.scores.to_pylist()}
    diffs = [abs(ours[(r.query_id, r.passage_id, r.method)] - peer[r.key]) for r in requests]
    # bf16: batch shapes change the rounding, up to ~0.1 nat per scored token (a QL sum adds them up)
    limits = [1e-3 if args.dtype == "float32" else 0.1 * (tokens[(r.query_id, r.passage_id)] if r.method == "ql" else 5)
              for r in requests]  # fmt: skip
    worst = max(range(len(diffs)), key=lambda i: diffs[i] / limits[i])
    assert diffs[worst] < limits[worst], f"scores differ by {diffs[worst]:.2e} (limit {limits[worst]:.1e})"

    n = pairs.num_rows
    peer_rate, fret_rate = n / peer_s, n / fret_s
    print(f"pairs: {len(chosen)} SciFact train queries x MiniLM top {args.top} of {len(doc_ids):,} docs "
          f"({args.pool} pool) = {n} pairs over {n_passages} passages ({n / n_passages:.1f} pairs per passage)")
    print(f"llm: {llm.identity}, {args.dtype}, {torch.get_num_threads()} threads, loaded in {load_s:.1f} s "
          f"(not timed); passages cut at {args.max_passage_tokens} tokens, batch {args.batch_size}, "
          f"min_shared_prompts {params.min_shared_prompts}")
    print(f"same scores: max |diff| {max(diffs):.1e} over {len(diffs)} QL sums and RC log-odds")
    print(f"tokens through the model: peer {scorer.prompt_tokens:,}, fret {scorer.forward_tokens:,} "
          f"(passage prefix once per passage)")
    print(f"peer  (one prompt per forward, QL and RC apart): {peer_s:8.1f} s  {peer_rate:6.2f} pairs/s")
    print(f"fret  (score_relevance, shared prefixes, batched): {fret_s:8.1f} s  {fret_rate:6.2f} pairs/s "
          f"in {result.stats['batches']} forward batches")
    if alone_s is not None:
        print(f"fret  (each passage on its own, min_shared_prompts 1): {alone_s:8.1f} s  {n / alone_s:6.2f} pairs/s "
              f"in {alone_result.stats['batches']} forward batches: the pool is {alone_s / fret_s:.2f}x faster")
    rows = args.batch_size * max(1, scorer.forward_tokens // max(1, scorer.forward_rows))
    peak = peaks({"score": (rows, model.hidden, llm.model.config.intermediate_size)})
    print("\n".join(report(peak, {"peer": (peer_flops, peer_s, args.dtype), "fret": (fret_flops, fret_s, args.dtype)})))
    print(f"ratio: {fret_rate / peer_rate:.2f}")


if __name__ == "__main__":
    main()
