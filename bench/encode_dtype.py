"""Benchmark: the encoder in bfloat16 autocast vs float32, same texts, side by side (issue 16.2).

Texts: raw, as MTEB embeds them for the base model: SciFact documents (`title text`) and test
queries, and STSB test sentences. One loaded model per dtype (`Encoder.load(dtype=...)`), runs
interleaved, best of --repeat, after a warm-up each. The vectors' agreement (cosine of bf16 to
fp32 per text) is printed as a sanity check; the quality cost is measured on the full sets by
`python -m python_steps.evaluate` (see the README's measured numbers).

Roofline (bench/_roofline.py): FLOPs = 2 x linear params x tokens + 2 x 2 x layers x n^2 x hidden
per text of n tokens (MiniLM's config, real tokens), over each dtype's seconds, against the matmul
peak of that dtype measured in this process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/encode_dtype.py [--docs 1000 --sentences 1000 --repeat 2]

Last line: `ratio: X.XX` = bfloat16 texts/s over float32 texts/s, measured in this run.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "data/eval"


def texts(docs: int, sentences: int) -> list[str]:
    out = []
    with (EVAL / "scifact" / "corpus.jsonl").open(encoding="utf-8") as f:
        for _, line in zip(range(docs), f):
            row = json.loads(line)
            out.append(f"{row.get('title') or ''} {row['text']}".strip())
    with (EVAL / "scifact" / "queries.jsonl").open(encoding="utf-8") as f:
        out += [json.loads(line)["text"] for line in f][:300]
    with (EVAL / "stsb" / "test.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    out += [r[k] for r in rows for k in ("sentence1", "sentence2")][:sentences]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from _roofline import Transformer, peaks, report
    from pipeline.retrieval.encoder import Encoder

    data = texts(args.docs, args.sentences)
    encoders = {d: Encoder.load("minilm", device="cpu", dtype=d, threads=args.threads) for d in ("float32", "bfloat16")}
    for encoder in encoders.values():
        encoder.encode(data[:16], args.batch_size)  # warm-up: oneDNN kernels, thread pool
    seconds = {d: float("inf") for d in encoders}
    cpu = dict.fromkeys(encoders, float("inf"))
    vectors = {}
    for _ in range(args.repeat):
        for dtype, encoder in encoders.items():
            t, c = time.perf_counter(), time.process_time()
            vectors[dtype] = encoder.encode(data, args.batch_size)
            seconds[dtype] = min(seconds[dtype], time.perf_counter() - t)
            cpu[dtype] = min(cpu[dtype], time.process_time() - c)
    cosine = np.sum(vectors["float32"] * vectors["bfloat16"], axis=1)

    model = Transformer.from_config(encoders["float32"].module.config)
    lengths = [len(ids) for ids in encoders["float32"].tokenize(data)]
    flops = model.encode(lengths)
    rows = args.batch_size * sum(lengths) // len(lengths)
    peak = peaks({"encode": (rows, model.hidden, encoders["float32"].module.config.intermediate_size)})
    print(f"texts: {len(data):,} ({args.docs} SciFact docs, 300 queries, {args.sentences} STSB sentences), "
          f"{sum(lengths):,} tokens, batch {args.batch_size}, {args.threads} threads, best of {args.repeat}")  # fmt: skip
    for dtype in encoders:
        print(f"{dtype:9} {seconds[dtype]:7.1f} s  {len(data) / seconds[dtype]:7.1f} texts/s  cpu {cpu[dtype]:7.1f} s")
    print(f"bf16 vs fp32 vectors: cosine min {cosine.min():.5f}, mean {cosine.mean():.6f}")
    print(f"cpu-time ratio (fp32 / bf16): {cpu['float32'] / cpu['bfloat16']:.2f}")
    print("\n".join(report(peak, {d: (flops, seconds[d], d) for d in encoders})))
    print(f"ratio: {seconds['float32'] / seconds['bfloat16']:.2f}")


if __name__ == "__main__":
    main()
