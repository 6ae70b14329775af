"""Projection: what a Gecko-sized run would cost, from per-item costs measured live on this machine.

Not a test and not a peer comparison: small timed runs of fret's own stage functions, multiplied
out. Gecko's FRet: 6.6M generated queries, N = 20 neighbours each (132M LLM-scored pairs), the
queries and the corpus embedded, a kNN over the corpus, one epoch of training.

Measured here (and again on the GPU when CUDA is visible), on the bundled sample (data/sample):
- generate:    `generate_queries` on --gen-passages passages (the configured LLM, batched, no cache)
- llm_scores:  `score_relevance` on --score-queries x --score-top pairs (QL + RC per pair, no cache)
- embed:       `Encoder.encode` on --embed-texts passages and as many queries (Gecko format)
- kNN exact:   `ExactTopN` on --knn-queries x --knn-passages random unit vectors (the encoder's dim)
- kNN IVF:     `FaissTopN` faiss_ivf at --knn-passages; its cost per scanned vector is projected to
               nlist = 4 sqrt(corpus), nprobe --nprobe (about 8 sqrt(corpus) vectors per query)
- train:       `pipeline.training.loop.train` for --train-steps steps of --train-batch examples

The projection assumes every stage scales linearly with its items (IVF as described) and that
--servers machines split every stage evenly (generation, scoring, embedding and search shard by
query or passage; data-parallel training on that many GPUs is the optimistic case).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale.py [--queries 6600000 --corpus 6600000 --servers 64]

Last line: the total projected hours (exact kNN, and with faiss_ivf instead).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
TASK = "Given a scientific claim, retrieve documents that support or refute the claim"


@dataclass
class Cost:
    stage: str
    seconds_per_item: float
    items: float
    unit: str

    @property
    def hours(self) -> float:
        return self.seconds_per_item * self.items / 3600


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def sample_passages(n: int):
    import pyarrow as pa

    rows = read_jsonl(SAMPLE / "corpus.jsonl", n)
    return pa.table(
        {
            "passage_id": [str(r["_id"]) for r in rows],
            "title": [r.get("title") or "" for r in rows],
            "text": [r["text"] for r in rows],
        }
    )


def sample_queries(n: int) -> list[str]:
    return [r["text"] for r in read_jsonl(SAMPLE / "queries.jsonl", n)]


def measure_generation(llm, args) -> float:
    """Seconds per generated (task, query), batched as the `queries` stage runs it."""
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.generate import generate_queries
    from pipeline.params import GenerateParams

    # limit=None: a query for every passage given, not for generate.limit's sample of them.
    params = GenerateParams(
        batch_size=args.gen_batch, max_new_tokens=args.max_new_tokens, max_failure_rate=1.0, limit=None
    )
    passages = sample_passages(args.gen_passages + 1)
    generate_queries(passages.slice(0, 1), llm, params, args.seed, LLMCache(None), progress=False)  # warm-up
    result = generate_queries(passages.slice(1), llm, params, args.seed, LLMCache(None), progress=False)
    return result.stats["generate_seconds"] / args.gen_passages


def measure_scoring(llm, args) -> float:
    """Seconds per (query, passage) pair, QL and RC both, as the `llm_scores` stage runs them.

    Every pair has its own passage, so no passage prefix is shared across queries: an upper bound
    (in the stage, a passage retrieved for several queries has its prefix computed once).
    """
    import pyarrow as pa

    from pipeline.llm.cache import LLMCache
    from pipeline.llm.scoring import score_relevance
    from pipeline.params import ScoreParams

    passages = sample_passages(args.score_queries * args.score_top + 1).to_pylist()
    queries = sample_queries(args.score_queries + 1)

    def pair(i: int, rank: int, passage: dict) -> dict:
        return {"query_id": f"q{i}", "passage_id": passage["passage_id"], "knn_rank": rank, "task": TASK,
                "query": queries[i], "title": passage["title"], "text": passage["text"]}  # fmt: skip

    params = ScoreParams(batch_size=args.score_batch)
    warm = pa.Table.from_pylist([pair(args.score_queries, 1, passages[-1])])  # untimed: first-call costs
    score_relevance(warm, llm, params, LLMCache(None), progress=False)
    timed = pa.Table.from_pylist(
        [
            pair(i, rank, passages[i * args.score_top + rank - 1])
            for i in range(args.score_queries)
            for rank in range(1, args.score_top + 1)
        ]
    )
    result = score_relevance(timed, llm, params, LLMCache(None), progress=False)
    return result.stats["score_seconds"] / timed.num_rows


def measure_embedding(encoder, args) -> tuple[float, float]:
    """Seconds per passage and per query through `Encoder.encode` (Gecko unified format)."""
    from pipeline.retrieval.encoder import TextFormat

    fmt = TextFormat()
    rows = read_jsonl(SAMPLE / "corpus.jsonl", args.embed_texts)
    passages = [fmt.passage(r.get("title"), r["text"]) for r in rows]
    queries = [fmt.query(TASK, q) for q in sample_queries(args.embed_texts)]
    encoder.encode(passages[:8], args.embed_batch)  # warm-up
    started = time.perf_counter()
    encoder.encode(passages, args.embed_batch)
    per_passage = (time.perf_counter() - started) / len(passages)
    started = time.perf_counter()
    encoder.encode(queries, args.embed_batch)
    return per_passage, (time.perf_counter() - started) / len(queries)


def measure_training(encoder, args) -> float:
    """Seconds per training example (forward + backward of query, positive and hard negative)."""
    from pipeline.params import TrainParams
    from pipeline.retrieval.encoder import TextFormat
    from pipeline.training.loop import train
    from pipeline.training.losses import Example

    fmt = TextFormat()
    n = args.train_batch * args.train_steps
    passages = read_jsonl(SAMPLE / "corpus.jsonl", 2 * n)
    queries = sample_queries(n)
    examples = [
        Example(query=fmt.query(TASK, q), positive=fmt.passage(p.get("title"), p["text"]),
                negative=fmt.passage(m.get("title"), m["text"]), query_text=q, positive_text=p["text"],
                negative_text=m["text"], positive_id=str(p["_id"]), negative_id=str(m["_id"]))
        for q, p, m in zip(queries, passages[:n], passages[n:])
    ]  # fmt: skip
    params = TrainParams(batch_size=args.train_batch, max_steps=1)
    train(encoder, examples, params, seed=args.seed)  # warm-up step (kernels, allocator)
    result = train(encoder, examples, params.model_copy(update={"max_steps": args.train_steps}), seed=args.seed)
    return result.seconds / result.examples


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure_exact_knn(args, dim: int) -> float:
    """Seconds per scored (query, passage) pair of `ExactTopN` (fret's default, every pair scored)."""
    from pipeline.retrieval.exact import ExactTopN

    rng = np.random.default_rng(args.seed)
    queries, passages = unit_vectors(rng, args.knn_queries, dim), unit_vectors(rng, args.knn_passages, dim)
    started = time.perf_counter()
    search = ExactTopN(queries, args.top_n)
    search.add(passages)
    search.result()
    return (time.perf_counter() - started) / (args.knn_queries * args.knn_passages)


def measure_torch_knn(args, dim: int, device: str) -> float:
    """Seconds per pair of a matrix product + topk on `device` (the GPU form of the exact search)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(args.seed)
    queries = torch.nn.functional.normalize(torch.randn(args.knn_queries, dim, device=device, generator=gen), dim=1)
    passages = torch.nn.functional.normalize(torch.randn(args.knn_passages, dim, device=device, generator=gen), dim=1)
    torch.topk(queries @ passages[:1024].T, args.top_n, dim=1)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for p0 in range(0, args.knn_passages, 65_536):
        torch.topk(queries @ passages[p0 : p0 + 65_536].T, args.top_n, dim=1)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / (args.knn_queries * args.knn_passages)


@dataclass
class IVFCosts:
    train_per_pair: float  # k-means, per (training vector x centroid x iteration)
    add_per_pair: float  # assignment, per (passage x centroid)
    search_per_vector: float  # per vector scanned or centroid compared, per query


def measure_ivf(args, dim: int) -> IVFCosts:
    """faiss_ivf's costs per elementary step, measured at --knn-passages."""
    from pipeline.params import NeighborsParams
    from pipeline.retrieval.faiss_knn import FaissTopN, ivf_nlist

    rng = np.random.default_rng(args.seed)
    queries, passages = unit_vectors(rng, args.knn_queries, dim), unit_vectors(rng, args.knn_passages, dim)
    params = NeighborsParams(method="faiss_ivf", top_n=args.top_n, ivf={"nprobe": args.nprobe})
    sample = passages[: min(args.knn_passages, 39 * 256)]
    nlist = ivf_nlist(params, args.knn_passages, len(sample))
    search = FaissTopN(queries, params, threads=args.threads, seed=args.seed)
    started = time.perf_counter()
    search.train(sample, n_passages=args.knn_passages)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    search.add(passages)
    add_s = time.perf_counter() - started
    started = time.perf_counter()
    search.result()
    search_s = time.perf_counter() - started
    scanned = min(args.nprobe, nlist) * args.knn_passages / nlist + nlist
    return IVFCosts(
        train_per_pair=train_s / (len(sample) * nlist * 10),  # FAISS's k-means: 10 iterations
        add_per_pair=add_s / (args.knn_passages * nlist),
        search_per_vector=search_s / (args.knn_queries * scanned),
    )


def ivf_hours(costs: IVFCosts, args) -> tuple[float, float]:
    """(projected hours, seconds per query) of faiss_ivf at the full corpus, nlist = 4 sqrt(corpus)."""
    nlist = round(4 * math.sqrt(args.corpus))
    train_points = min(args.corpus, 100_000, 256 * nlist)  # ivf.train_size default; FAISS's own cap
    nlist = min(nlist, train_points // 39)
    scanned = args.nprobe * args.corpus / nlist + nlist
    seconds = (
        costs.train_per_pair * train_points * nlist * 10
        + costs.add_per_pair * args.corpus * nlist
        + costs.search_per_vector * scanned * args.queries
    )
    return seconds / 3600, seconds / args.queries


def measure(device: str, args) -> dict[str, float]:
    """Per-item seconds of every stage on `device`."""
    from pipeline.llm import load_llm
    from pipeline.params import BaseParams, LLMParams
    from pipeline.retrieval.encoder import Encoder

    out: dict[str, float] = {}
    base = BaseParams(threads=args.threads, device=device)
    started = time.perf_counter()
    llm = load_llm(LLMParams(model=args.llm, dtype=args.llm_dtype), base)
    print(f"  [{device}] LLM {llm.identity} loaded in {time.perf_counter() - started:.1f} s", flush=True)
    out["generate"] = measure_generation(llm, args)
    print(f"  [{device}] generate: {out['generate']:.2f} s per query", flush=True)
    out["llm_scores"] = measure_scoring(llm, args)
    print(f"  [{device}] llm_scores: {out['llm_scores']:.3f} s per pair", flush=True)
    del llm
    encoder = Encoder.load(args.encoder, device=device, threads=args.threads)
    out["embed_passages"], out["embed_queries"] = measure_embedding(encoder, args)
    print(f"  [{device}] embed: {out['embed_passages'] * 1e3:.1f} ms per passage, "
          f"{out['embed_queries'] * 1e3:.1f} ms per query", flush=True)  # fmt: skip
    out["train"] = measure_training(encoder, args)
    print(f"  [{device}] train: {out['train']:.3f} s per example", flush=True)
    out["dim"] = encoder.dim
    if device == "cpu":
        out["knn_exact"] = measure_exact_knn(args, encoder.dim)
    else:
        out["knn_exact"] = measure_torch_knn(args, encoder.dim, device)
    print(f"  [{device}] kNN exact: {out['knn_exact'] * 1e9:.2f} ns per pair", flush=True)
    return out


def fmt_cost(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e9:.2f} ns"


def stage_costs(per_item: dict[str, float], args) -> list[Cost]:
    pairs = args.queries * args.top_n
    return [
        Cost("generate", per_item["generate"], args.queries, "queries"),
        Cost("llm_scores (QL+RC)", per_item["llm_scores"], pairs, "pairs"),
        Cost("embed queries", per_item["embed_queries"], args.queries, "queries"),
        Cost("embed corpus", per_item["embed_passages"], args.corpus, "passages"),
        Cost("kNN exact", per_item["knn_exact"], args.queries * args.corpus, "pairs"),
        Cost("train", per_item["train"], args.queries * args.epochs, "examples"),
    ]


def print_table(cpu: list[Cost], gpu: list[Cost] | None, ivf: tuple[float, float], args) -> None:
    n = args.servers
    head = f"{'stage':<20}{'per item':>11}{'items':>28}{'hours here':>12}"
    head += f"{'per item GPU':>14}{'hours GPU':>11}" if gpu else ""
    head += f"{f'hours / {n} servers':>20}" + (f"{f'GPU hours / {n}':>16}" if gpu else "")
    print(head)
    for i, c in enumerate(cpu):
        line = f"{c.stage:<20}{fmt_cost(c.seconds_per_item):>11}{f'{c.items:,.0f} {c.unit}':>28}{c.hours:>12,.1f}"
        if gpu:
            line += f"{fmt_cost(gpu[i].seconds_per_item):>14}{gpu[i].hours:>11,.1f}"
        line += f"{c.hours / n:>20,.1f}" + (f"{gpu[i].hours / n:>16,.1f}" if gpu else "")
        print(line)
    hours, per_query = ivf
    print(f"{'kNN faiss_ivf':<20}{fmt_cost(per_query):>11}{f'{args.queries:,.0f} queries':>28}{hours:>12,.1f}"
          + (" " * 25 if gpu else "") + f"{hours / n:>20,.1f}"
          + ("   (build included; nprobe " + str(args.nprobe) + ")"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=6_600_000, help="generated queries (Gecko: 6.6M)")
    parser.add_argument("--corpus", type=int, default=6_600_000, help="passages embedded and searched")
    parser.add_argument("--top-n", type=int, default=20, help="neighbours scored by the LLM per query")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--servers", type=int, default=64, help="machines (or GPUs) sharing the work")
    parser.add_argument("--llm", default="smollm2", help="llm.model: smollm2 or a local transformers folder")
    parser.add_argument("--llm-dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="llm.dtype (auto: the stage default)")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--gen-passages", type=int, default=16)  # a full batch: per-item cost as in the stage
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--score-queries", type=int, default=2)
    parser.add_argument("--score-top", type=int, default=10)
    parser.add_argument("--score-batch", type=int, default=16)
    parser.add_argument("--embed-texts", type=int, default=128)
    parser.add_argument("--embed-batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--knn-queries", type=int, default=500)
    parser.add_argument("--knn-passages", type=int, default=50_000)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"measuring on cpu ({args.threads} threads)...", flush=True)
    cpu = measure("cpu", args)
    ivf = ivf_hours(measure_ivf(args, int(cpu["dim"])), args)
    gpu = None
    if torch.cuda.is_available():
        print(f"measuring on {torch.cuda.get_device_name(0)}...", flush=True)
        gpu = stage_costs(measure("cuda", args), args)
    else:
        print("no CUDA device visible: GPU columns left out")
    cpu_costs = stage_costs(cpu, args)
    print(f"measured in {time.perf_counter() - started:.0f} s; projection for {args.queries:,} queries x top "
          f"{args.top_n}, corpus {args.corpus:,} passages, {args.epochs} epoch(s); LLM {args.llm} ({args.llm_dtype}), "
          f"encoder {args.encoder}")  # fmt: skip
    print_table(cpu_costs, gpu, ivf, args)
    exact_total = sum(c.hours for c in cpu_costs)
    ivf_total = exact_total - cpu_costs[4].hours + ivf[0]
    summary = (f"total: {exact_total:,.0f} h here with exact kNN ({exact_total / args.servers:,.1f} h on "
               f"{args.servers} servers), {ivf_total:,.0f} h with faiss_ivf ({ivf_total / args.servers:,.1f} h)")  # fmt: skip
    if gpu:
        gpu_total = sum(c.hours for c in gpu)
        summary += f"; GPU: {gpu_total:,.0f} h ({gpu_total / args.servers:,.1f} h on {args.servers} GPUs)"
    print(summary)


if __name__ == "__main__":
    main()
