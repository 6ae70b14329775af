"""Benchmark: top-N search at corpus scale, fret's methods vs plain FAISS IndexFlatIP.

Data: --passages synthetic unit vectors of dimension --dim around --clusters random centres (so
neighbours mean something and approximate recall is not trivial), made chunk by chunk from seeds,
never all at once; --queries drawn the same way. Each method runs in its own process, fed the same
chunks, so its peak RSS (getrusage) is its own; the time of making the vectors is left out.

- fret exact: `ExactTopN`, the `neighbors` stage's default: chunks merged into each query's best N.
- fret faiss_flat / faiss_ivf / faiss_hnsw: `FaissTopN`, chunks added to the index as they come
  (IVF trained first on a seeded sample of --ivf-train passages).
- peer: what a user would otherwise write: every vector in one matrix, `faiss.IndexFlatIP`, search.

Recall@N of each method is measured against fret exact; the peer must return the same lists.
"add s" is the time spent taking the chunks in (exact scores them there, FAISS builds its index;
IVF's k-means training included), "search s" the time of the final search.

    .venv/bin/python bench/knn_scale.py [--passages 1000000 --queries 1000 --dim 384 --threads 2]
        [--methods exact,peer,faiss_flat,faiss_ivf,faiss_hnsw]

Last line: `ratio: X.XX` = fret's default method's (exact) throughput over the peer's: the peer's
search seconds (build + search) over fret's, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

METHODS = ["exact", "peer", "faiss_flat", "faiss_ivf", "faiss_hnsw"]
# HNSW's graph build is the slow one on 2 cores (~4 min per 1M vectors at M 16, efConstruction 40):
# opt in with --methods ...,faiss_hnsw, so the default run stays near 5 minutes.
DEFAULT_METHODS = ["exact", "peer", "faiss_flat", "faiss_ivf"]


def centres(args: argparse.Namespace) -> np.ndarray:
    rng = np.random.default_rng([args.seed, 0])
    return rng.standard_normal((args.clusters, args.dim), dtype=np.float32)


def draw(rng: np.random.Generator, n: int, middles: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors scattered around random centres; `noise` is per dimension, relative to a centre's."""
    scale = noise * np.sqrt(1.0 / middles.shape[1]) * np.linalg.norm(middles[0])
    x = middles[rng.integers(0, len(middles), n)]
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(scale)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def passage_chunks(args: argparse.Namespace, middles: np.ndarray) -> Iterator[np.ndarray]:
    """The corpus, chunk by chunk; chunk i depends only on (seed, i), so every process sees the same."""
    for i, first in enumerate(range(0, args.passages, args.chunk)):
        n = min(args.chunk, args.passages - first)
        yield draw(np.random.default_rng([args.seed, 2, i]), n, middles, args.noise)


def training_sample(args: argparse.Namespace, middles: np.ndarray) -> np.ndarray:
    """A seeded uniform sample of the passages for IVF, picked from the chunks as the stage does."""
    from pipeline.retrieval.knn import training_sample as positions

    wanted = positions(args.passages, args.ivf_train, args.seed)
    parts = []
    for i, chunk in enumerate(passage_chunks(args, middles)):
        first = i * args.chunk
        local = wanted[(wanted >= first) & (wanted < first + len(chunk))] - first
        parts.append(chunk[local])
    return np.concatenate(parts)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def params_for(method: str, args: argparse.Namespace):
    from pipeline.params import NeighborsParams

    return NeighborsParams(
        method=method,
        top_n=args.top_n,
        chunk_size=args.chunk,
        ivf={"nlist": args.ivf_nlist, "nprobe": args.ivf_nprobe, "train_size": args.ivf_train},
        hnsw={"m": args.hnsw_m, "ef_construction": args.hnsw_ef_construction, "ef_search": args.hnsw_ef_search},
    )


def run_fret(method: str, args: argparse.Namespace, queries: np.ndarray, middles: np.ndarray) -> tuple:
    from pipeline.retrieval.knn import make_search

    search = make_search(queries, params_for(method, args), threads=args.threads, seed=args.seed)
    build = 0.0
    if getattr(search, "needs_training", False):
        sample = training_sample(args, middles)
        started = time.perf_counter()
        search.train(sample, n_passages=args.passages)
        build += time.perf_counter() - started
        del sample
    for chunk in passage_chunks(args, middles):
        started = time.perf_counter()
        search.add(chunk)
        build += time.perf_counter() - started
    started = time.perf_counter()
    indices, _ = search.result()
    return indices, build, time.perf_counter() - started


def run_peer(args: argparse.Namespace, queries: np.ndarray, middles: np.ndarray) -> tuple:
    """One matrix of every vector, one IndexFlatIP, one search call: the plain way."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    chunks = list(passage_chunks(args, middles))  # as the embeddings of a whole corpus would be held
    started = time.perf_counter()
    matrix = np.concatenate(chunks)
    del chunks
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    build = time.perf_counter() - started
    started = time.perf_counter()
    _, indices = index.search(queries, args.top_n)
    return indices, build, time.perf_counter() - started


def worker(method: str, args: argparse.Namespace) -> None:
    """One method in this process; prints a JSON line, writes its lists to --out."""
    import faiss  # noqa: F401 - loaded before the baseline, as in every method

    import pipeline.retrieval.faiss_knn  # noqa: F401

    baseline = peak_rss_mib()
    middles = centres(args)
    queries = draw(np.random.default_rng([args.seed, 1]), args.queries, middles, args.noise)
    if method == "peer":
        indices, build, search = run_peer(args, queries, middles)
    else:
        indices, build, search = run_fret(method, args, queries, middles)
    np.save(args.out, indices)
    print(json.dumps({"method": method, "build": build, "search": search, "rss": peak_rss_mib(), "base": baseline}))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def run_all(args: argparse.Namespace, argv: list[str]) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = Path(tmp) / f"{method}.npy"
            cmd = [sys.executable, __file__, *argv, "--worker", method, "--out", str(out)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"{method} failed:\n{run.stderr}")
            results[method] = json.loads(run.stdout.strip().splitlines()[-1])
            results[method]["indices"] = np.load(out)
            print(f"  {method:<11} done in {results[method]['build'] + results[method]['search']:.1f} s", flush=True)
    report(args, results)


def report(args: argparse.Namespace, results: dict) -> None:
    truth = results["exact"]["indices"]
    vectors_mib = args.passages * args.dim * 4 / 2**20
    print(f"passages: {args.passages:,} x {args.dim} float32 ({vectors_mib:,.0f} MiB), {args.clusters:,} clusters, "
          f"noise {args.noise}; queries {args.queries:,}; top {args.top_n}; chunks of {args.chunk:,}; "
          f"{args.threads} threads")  # fmt: skip
    print(f"ivf: nlist {args.ivf_nlist or '4 sqrt(passages)'}, nprobe {args.ivf_nprobe}, trained on {args.ivf_train:,}; "
          f"hnsw: M {args.hnsw_m}, efConstruction {args.hnsw_ef_construction}, efSearch {args.hnsw_ef_search}")  # fmt: skip
    print(f"{'method':<12}{'add s':>9}{'search s':>10}{'total s':>9}{'peak RSS MiB':>14}{'  (imports)':>12}"
          f"{'recall@' + str(args.top_n):>11}{'same lists':>12}")  # fmt: skip
    for method, r in results.items():
        same = float(np.mean(np.all(r["indices"] == truth, axis=1)))
        print(f"{method:<12}{r['build']:>9.1f}{r['search']:>10.1f}{r['build'] + r['search']:>9.1f}{r['rss']:>14,.0f}"
              f"{r['base']:>12,.0f}{recall(r['indices'], truth):>11.4f}{same:>12.1%}")  # fmt: skip
    fret = results["exact"]["build"] + results["exact"]["search"]
    if "peer" not in results:
        return
    peer = results["peer"]["build"] + results["peer"]["search"]
    assert recall(results["peer"]["indices"], truth) >= 0.999, "the peer and fret exact disagree"
    for method in ("faiss_flat", "faiss_ivf", "faiss_hnsw"):
        if method in results:
            other = results[method]["build"] + results[method]["search"]
            print(f"fret {method} vs peer: {peer / other:.2f}x the throughput")
    print("ratio: fret exact (the default) over peer IndexFlatIP, build + search; not the lines above")
    print(f"ratio: {peer / fret:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm relative to a centre's")
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=65_536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ivf-nlist", type=int, default=None)
    parser.add_argument("--ivf-nprobe", type=int, default=32)
    parser.add_argument("--ivf-train", type=int, default=50_000)  # the stage default is 100,000: half the k-means
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=DEFAULT_METHODS,
                        help="comma-separated, from " + ",".join(METHODS) + " (exact always runs first)")  # fmt: skip
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args)
        return
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    args.methods = ["exact"] + [m for m in args.methods if m != "exact"]
    run_all(args, argv)


if __name__ == "__main__":
    main()
