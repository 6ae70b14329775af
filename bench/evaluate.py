"""Benchmark: fret's evaluator vs the plain way (`mteb.evaluate` with a SentenceTransformer).

Both run the same local mteb retrieval task (full SciFact test by default) with the same model
(the bundled all-MiniLM-L6-v2), batch size and thread count, in one process, one after the other.
Scores must agree (fret encodes with its own torch loop, so tiny float differences are allowed);
the last line is `ratio: X.XX`, fret's throughput (texts encoded per second) over the peer's.

Roofline (bench/_roofline.py): each side's GFLOP/s and share of the matmul peak measured in this
process. FLOPs = 2 x linear params x tokens + 2 x 2 x layers x n^2 x hidden per text of n tokens,
over the texts the task embeds (documents as `title text`, queries), real tokens, MiniLM's config.
The seconds are the whole evaluation (scoring included), so the share is a floor for the encoder.

    .venv/bin/python bench/evaluate.py [--folder PATH] [--split test] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TOLERANCE = 1e-3  # nDCG@10 agreement between the two encoders' float paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parents[1] / "data/eval/scifact")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.evaluation.mteb_eval import MtebEncoder, retrieval_task, run_tasks
    from pipeline.labelled import read_beir
    from pipeline.retrieval.encoder import Encoder, resolve_model_path

    torch.set_num_threads(args.threads)
    data = read_beir(args.folder, args.split)
    n_texts = len(data.corpus) + len(data.queries)
    print(f"{args.folder} {args.split}: {len(data.corpus)} documents, {len(data.queries)} queries")

    encoder = Encoder.load("minilm", device="cpu", threads=args.threads)
    start = time.perf_counter()
    fret = run_tasks(MtebEncoder(encoder, "minilm"), [retrieval_task("bench", args.folder, args.split)], batch_size=args.batch_size)["bench"]
    fret_s = time.perf_counter() - start

    import mteb

    model = SentenceTransformer(str(resolve_model_path("minilm")[0]), device="cpu")
    start = time.perf_counter()
    result = mteb.evaluate(
        model,
        [retrieval_task("bench", args.folder, args.split)],
        cache=None,
        encode_kwargs={"batch_size": args.batch_size, "show_progress_bar": False},
        show_progress_bar=False,
        co2_tracker=False,
    )
    peer_s = time.perf_counter() - start
    peer = result.task_results[0].scores[args.split][0]

    print(f"{'':14}{'fret':>10}{'peer':>10}")
    for metric, value in fret.items():
        print(f"{metric:14}{value:>10.5f}{peer[metric]:>10.5f}")
    print(f"{'seconds':14}{fret_s:>10.1f}{peer_s:>10.1f}")
    print(f"{'texts/s':14}{n_texts / fret_s:>10.1f}{n_texts / peer_s:>10.1f}")
    from _roofline import Transformer, peaks, report

    model = Transformer.from_config(encoder.module.config)
    texts = [f"{d['title']} {d['text']}".strip() for d in data.corpus] + [q["text"] for q in data.queries]
    lengths = [len(ids) for ids in encoder.tokenize(texts)]
    flops = model.encode(lengths)
    rows = args.batch_size * sum(lengths) // len(lengths)
    peak = peaks({"encode": (rows, model.hidden, encoder.module.config.intermediate_size)})
    print("\n".join(report(peak, {"peer": (flops, peer_s, "float32"), "fret": (flops, fret_s, encoder.dtype)})))
    gap = abs(fret["ndcg_at_10"] - peer["ndcg_at_10"])
    if gap > TOLERANCE:
        raise SystemExit(f"scores differ: nDCG@10 fret {fret['ndcg_at_10']:.5f} vs peer {peer['ndcg_at_10']:.5f}")
    print(f"ratio: {peer_s / fret_s:.2f}")


if __name__ == "__main__":
    main()
