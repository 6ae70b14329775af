"""Benchmark: fret's batched query generation vs the plain Outlines loop a user would write.

Peer: `outlines.Generator(model, JsonSchema(GeneratedQuery))` called once per passage with the
chat messages (Outlines applies the chat template), greedy. fret: `generate_queries` with the LLM
cache disabled: batches of --batch-size, shared few-shot prefix computed once, finished rows leave
the batch. Same model (SmolLM2-135M-Instruct from the wheel, one loaded copy), same prompts, same
JSON constraint (same whitespace rule), same passages (SciFact), same max_new_tokens and threads.
Model loading and a warm-up call on each side (index build, Outlines' compiled kernel) are kept
out of the timings. The share of identical outputs is printed as a sanity check, and the CPU-time
ratio beside the wall-time one (other engineers' processes share these cores).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate.py [--passages 16 --batch-size 16 --threads 2 --dtype auto]

Both sides run the same dtype (`auto`, the stage's default, is bfloat16 on a CPU with native bf16).
bf16 widens the gap: it doubles the throughput of fret's large batched matrix products, while
the peer's one-row decoding steps are bound by memory and Python, where bf16 gains nothing.

Roofline (bench/_roofline.py): each side's GFLOP/s and share of the matmul peak measured in this
process, over the forward passes each side ran (counted by a hook on the model, retries included):
2 x linear params x tokens (pads included; fret runs a stored few-shot prefix once) + 2 x 2 x
layers x Q x K x hidden (Q new positions over K keys: n^2 for a prefill of n tokens, 1 x (c + 1)
per decoded token after c) + 2 x vocab x hidden per position whose logits are computed.
SmolLM2-135M's config.

Last line: `ratio: X.XX` = fret's passages/s over the peer's, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SCIFACT = Path(__file__).resolve().parents[1] / "data/eval/scifact/corpus.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="llm.dtype, both sides")
    args = parser.parse_args()

    import pyarrow as pa
    from outlines import Generator
    from outlines.inputs import Chat
    from outlines.types import JsonSchema

    from pipeline.llm import JSON_WHITESPACE, load_llm
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.generate import GeneratedQuery, PromptTemplate, build_requests, clip_words, generate_queries, validate
    from pipeline.params import BaseParams, GenerateParams, LLMParams

    rows = [json.loads(line) for _, line in zip(range(args.passages + 1), SCIFACT.open(encoding="utf-8"))]
    table = pa.table(
        {
            "passage_id": [f"{r['_id']}#0" for r in rows],
            "title": [r["title"] for r in rows],
            "text": [r["text"] for r in rows],
        }
    )
    warm, passages = table.slice(0, 1), table.slice(1)
    base = BaseParams(threads=args.threads, device="cpu")
    # limit=None: a query for every passage given, not for generate.limit's sample of them.
    params = GenerateParams(
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_failure_rate=1.0, limit=None
    )
    t0 = time.perf_counter()
    llm = load_llm(LLMParams(dtype=args.dtype), base)
    print(f"model {llm.identity} loaded in {time.perf_counter() - t0:.1f} s, {args.threads} thread(s), dtype {args.dtype}")
    template = PromptTemplate()

    # Peer: one generator, called passage by passage with the same chat messages.
    generator = Generator(llm.outlines_model, JsonSchema(GeneratedQuery, whitespace_pattern=JSON_WHITESPACE))
    texts = dict(zip(table.column("passage_id").to_pylist(), table.column("text").to_pylist()))
    titles = dict(zip(table.column("passage_id").to_pylist(), table.column("title").to_pylist()))

    def peer_messages(r):
        return template.messages(r.task_type, titles[r.passage_id], clip_words(texts[r.passage_id], params.max_passage_words))

    peer_requests = build_requests(passages, llm, params, base.seed, template)
    warm_request = build_requests(warm, llm, params, base.seed, template)[0]
    generator(Chat(peer_messages(warm_request)), max_new_tokens=params.max_new_tokens, do_sample=False)
    from _roofline import ForwardCounter, Transformer, peaks, report

    model, counter = Transformer.from_config(llm.model.config), ForwardCounter(llm.model)
    t0, c0 = time.perf_counter(), time.process_time()
    peer_out = [
        generator(Chat(peer_messages(r)), max_new_tokens=params.max_new_tokens, do_sample=False) for r in peer_requests
    ]
    peer_s, peer_cpu = time.perf_counter() - t0, time.process_time() - c0
    peer_flops = counter.flops(model)
    peer_tokens = sum(len(llm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in peer_out)
    peer_valid = sum(validate(t)[0] is not None for t in peer_out)

    # fret: the stage's own function, cache disabled; warm-up on another passage, prefix cache emptied.
    generate_queries(warm, llm, params, base.seed, LLMCache(None), template, progress=False)
    llm._prefixes.clear()
    counter.reset()
    c0 = time.process_time()
    result = generate_queries(passages, llm, params, base.seed, LLMCache(None), template, progress=False)
    fret_cpu = time.process_time() - c0
    fret_flops = counter.flops(model)
    counter.close()
    s = result.stats
    fret_s = s["generate_seconds"]
    fret_by_id = {(r["passage_id"]): r for r in result.queries.to_pylist()}
    same = 0
    for r, text in zip(peer_requests, peer_out):
        parsed, _ = validate(text)
        mine = fret_by_id.get(r.passage_id)
        same += bool(parsed and mine and (parsed.task, parsed.query) == (mine["task"], mine["query"]))

    n = len(peer_requests)
    peer_rate, fret_rate = n / peer_s, n / fret_s
    print(f"passages: {n} SciFact, max_new_tokens {params.max_new_tokens}, batch size {params.batch_size}")
    print(f"peer (outlines, per passage): {peer_s:.1f} s, {peer_rate:.3f} passages/s, {peer_tokens / peer_s:.1f} tokens/s, valid {peer_valid}/{n}")
    print(
        f"fret (batched, prefix reuse): {fret_s:.1f} s, {fret_rate:.3f} passages/s, {s['new_tokens'] / fret_s:.1f} tokens/s, "
        f"valid {result.queries.num_rows}/{n}, calls {int(s['calls'])} (retries included)"
    )
    print(f"identical outputs: {same}/{n}")
    # The machine is shared: wall time moves with other processes' load; CPU seconds much less so.
    print(f"cpu seconds: peer {peer_cpu:.1f}, fret {fret_cpu:.1f}, cpu ratio {peer_cpu / fret_cpu:.2f}")
    dtype = str(llm.model.dtype).removeprefix("torch.")
    config = llm.model.config
    peak = peaks({"decode": (params.batch_size, model.hidden, config.intermediate_size),
                  "prefill": (2048, model.hidden, config.intermediate_size)})  # fmt: skip
    print("\n".join(report(peak, {"peer": (peer_flops, peer_s, dtype), "fret": (fret_flops, fret_s, dtype)})))
    print(f"ratio: {fret_rate / peer_rate:.2f}")


if __name__ == "__main__":
    main()
