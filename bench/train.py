"""Benchmark: fret's training loop vs the plain way (sentence-transformers' trainer).

Both fine-tune the bundled all-MiniLM-L6-v2 on the same SciFact-derived triples (train qrels as
positives, a seeded random other document as the hard negative, in Gecko's unified format) with
the same batch size, steps, max_length, lr, warmup, thread count and the same objective: in-batch +
hard + same-tower negatives (MultipleNegativesRankingLoss with directions query->doc and
query->query) under Matryoshka dimensions 384/256/128/64 (MatryoshkaLoss). fret additionally masks
false negatives, which costs next to nothing. One process, one after the other (`--peer-first`
swaps them), after untimed warm-up steps in both precisions, so neither pays the kernels'
first-call cost. The last line is `ratio: X.XX`, fret's examples/s over the peer's.

Each side runs with its own defaults, as a user gets them: fret's `train.dtype: auto` trains
under bfloat16 autocast where the CPU computes bf16 natively (AVX512-BF16 / AMX) and float32
elsewhere; the peer trains in float32 (its default). Both draw random batches. `--dtype float32`
and `--peer-bf16` (the peer with `bf16=True`) compare like for like; `--group-by-length` turns on
fret's `train.group_by_length` (about 5% fewer padded tokens here, but SciFact's repeated queries
then share batches, so the loss is not comparable). The header line says what each side used.

    .venv/bin/python bench/train.py [--triples 256] [--batch-size 16] [--steps 8] [--max-length 128] [--profile 4]

`--profile N` adds a table of fret's step cut into phases (tokenize and pad, the query pass, the
passages pass, loss, backward, clip and optimizer), each timed over N steps, with the model phases'
GFLOP/s counted on the padded tokens they actually run.

Roofline (bench/_roofline.py): each side's GFLOP/s and share of the matmul peak measured in this
process. FLOPs per example = 3 (forward + backward) x the forward FLOPs of its query, positive and
negative: 2 x linear params x tokens + 2 x 2 x layers x n^2 x hidden per text of n tokens (MiniLM's
config; real tokens after truncation to --max-length), times the examples trained; batches are
random draws, so the per-example count is the mean over the triples.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

MRL_DIMS = [384, 256, 128, 64]
TASK = "Given a scientific claim, retrieve documents that support or refute the claim"


def scifact_triples(folder: Path, n: int, seed: int) -> list[tuple[str, str, str, str, str]]:
    """(query, positive title, positive text, negative title, negative text) for the first n train qrels."""
    corpus = {}
    with open(folder / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            corpus[doc["_id"]] = (doc.get("title", ""), doc["text"])
    with open(folder / "queries.jsonl", encoding="utf-8") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
    with open(folder / "qrels" / "train.tsv", encoding="utf-8") as f:
        qrels = [line.rstrip("\n").split("\t")[:2] for line in f][1:]
    rng = random.Random(seed)
    ids = sorted(corpus)
    out = []
    for query_id, doc_id in qrels[:n]:
        negative = rng.choice([d for d in rng.sample(ids, 2) if d != doc_id])
        out.append((queries[query_id], *corpus[doc_id], *corpus[negative]))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} triples available in {folder}")
    return out


def run_fret(rows, args, fmt) -> tuple[float, float]:
    """fret's `train` on the rows; returns (seconds, mean loss)."""
    from pipeline.params import TrainParams
    from pipeline.retrieval.encoder import Encoder
    from pipeline.training.loop import train

    examples = fret_examples(rows, fmt)
    encoder = Encoder.load("minilm", device="cpu", dtype=args.fret_dtype, max_length=args.max_length, threads=args.threads,
                           attention_dropout=args.attention_dropout)
    params = TrainParams(
        batch_size=args.batch_size, max_steps=args.steps, mrl_dims=MRL_DIMS, max_grad_norm=1.0,
        group_by_length=args.group_by_length,
    )  # fmt: skip
    result = train(encoder, examples, params, seed=args.seed)
    return result.seconds, sum(result.losses) / len(result.losses)


def run_peer(rows, args, fmt) -> tuple[float, float]:
    """SentenceTransformerTrainer with MatryoshkaLoss(MultipleNegativesRankingLoss); (seconds, mean loss)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    from pipeline.retrieval.encoder import resolve_model_path

    model = SentenceTransformer(str(resolve_model_path("minilm")[0]), device="cpu")
    model.max_seq_length = args.max_length
    data = Dataset.from_dict(
        {
            "anchor": [fmt.query(TASK, q) for q, *_ in rows],
            "positive": [fmt.passage(pt, p) for _, pt, p, _, _ in rows],
            "negative": [fmt.passage(nt, n) for *_, nt, n in rows],
        }
    )
    inner = MultipleNegativesRankingLoss(model, scale=20.0, directions=("query_to_doc", "query_to_query"))
    with tempfile.TemporaryDirectory() as out:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=2e-5, warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=1.0, seed=args.seed,
            use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            bf16=args.peer_bf16,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(
            model=model, args=training_args, train_dataset=data, loss=MatryoshkaLoss(model, inner, MRL_DIMS)
        )
        start = time.perf_counter()
        output = trainer.train()
        return time.perf_counter() - start, output.training_loss


PHASES = ("tokenize+pad", "forward queries", "forward docs", "loss", "backward", "clip+optimizer")


def profile_fret(rows, args, fmt, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """One fret training step cut into its phases, timed over `steps` steps after one untimed step.

    The same calls as `pipeline.training.loop._step` makes through `GeckoLoss.embed` (queries in one
    pass, positives and negatives padded together in a second), split so each phase gets its own
    clock. Returns (seconds per step by phase, token counts per step: real and padded, per pass).
    """
    import torch

    from pipeline.retrieval.encoder import Encoder
    from pipeline.training.loop import make_optimizer
    from pipeline.training.losses import GeckoLoss, candidate_mask

    encoder = Encoder.load("minilm", device="cpu", dtype=args.fret_dtype, max_length=args.max_length, threads=args.threads,
                           attention_dropout=args.attention_dropout)
    examples = fret_examples(rows, fmt)
    loss_fn, optimizer = GeckoLoss(0.05, MRL_DIMS), make_optimizer(encoder.module, 2e-5, 0.01)
    draw = random.Random(args.seed)
    seconds = dict.fromkeys(PHASES, 0.0)
    tokens = {"query real": 0, "query padded": 0, "docs real": 0, "docs padded": 0}
    encoder.module.train()
    for step in range(steps + 1):
        batch = draw.sample(examples, args.batch_size)
        clock = [time.perf_counter()]
        texts = {"query": [e.query for e in batch], "docs": [e.positive for e in batch] + [e.negative for e in batch]}
        ids = {side: encoder.tokenize(t) for side, t in texts.items()}
        inputs = {side: encoder._pad(i) for side, i in ids.items()}
        spans = {side: encoder._instruction_spans(texts[side], ids[side]) for side in texts}
        clock.append(time.perf_counter())
        q = encoder._forward(*inputs["query"], spans["query"])
        clock.append(time.perf_counter())
        docs = encoder._forward(*inputs["docs"], spans["docs"])
        clock.append(time.perf_counter())
        loss = loss_fn.compute_loss_from_embeddings(q, docs[: len(batch)], docs[len(batch) :], candidate_mask(batch))
        clock.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(encoder.module.parameters(), 1.0)
        optimizer.step()
        clock.append(time.perf_counter())
        if step == 0:
            continue  # oneDNN's first-call setup
        for name, start, end in zip(PHASES, clock, clock[1:]):
            seconds[name] += (end - start) / steps
        for side in ("query", "docs"):
            tokens[f"{side} real"] += sum(len(i) for i in ids[side]) / steps
            tokens[f"{side} padded"] += inputs[side][0].numel() / steps
    return seconds, tokens


def profile_lines(seconds: dict[str, float], tokens: dict[str, float], model, args) -> list[str]:
    """The phase table: share of the step, and GFLOP/s of the model phases (padded tokens: what runs)."""
    b = args.batch_size

    def forward_flops(side: str, rows: int) -> float:
        width = tokens[f"{side} padded"] / rows
        return model.forward(tokens[f"{side} padded"], rows * width * width)

    flops = {"forward queries": forward_flops("query", b), "forward docs": forward_flops("docs", 2 * b)}
    flops["backward"] = 2 * (flops["forward queries"] + flops["forward docs"])  # grads of activations and weights
    step = sum(seconds.values())
    lines = [f"profile: one step of {b} examples, {step:.2f} s ({b / step:.2f} examples/s); tokens per step "
             f"real/padded: queries {tokens['query real']:,.0f}/{tokens['query padded']:,.0f}, "
             f"docs {tokens['docs real']:,.0f}/{tokens['docs padded']:,.0f}"]  # fmt: skip
    for name in PHASES:
        rate = f"{flops[name] / seconds[name] / 1e9:8.1f} GFLOP/s" if name in flops else ""
        lines.append(f"  {name:<16}{seconds[name]:8.3f} s {seconds[name] / step:6.1%} {rate}")
    return lines


def fret_examples(rows, fmt):
    from pipeline.training.losses import Example

    return [
        Example(
            query=fmt.query(TASK, q), positive=fmt.passage(pt, p), negative=fmt.passage(nt, n),
            query_text=q, positive_text=p, negative_text=n, positive_id=f"p:{p}", negative_id=f"p:{n}",
        )
        for q, pt, p, nt, n in rows
    ]  # fmt: skip


def warm_up(rows, args, fmt) -> None:
    """Untimed training steps in each precision timed after, so oneDNN's first-call setup is paid first."""
    for dtype in sorted({args.fret_dtype, "bfloat16" if args.peer_bf16 else "float32"}):
        run_fret(rows, argparse.Namespace(**{**vars(args), "steps": 1, "fret_dtype": dtype}), fmt)


def _dropout(value: str) -> float | None:
    """--attention-dropout: a probability, or "model" for the model's own (train.attention_dropout: null)."""
    return None if value == "model" else float(value)


def main(argv: list[str] | None = None) -> None:
    from pipeline.params import TrainParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parents[1] / "data/eval/scifact")
    parser.add_argument("--triples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peer-first", action="store_true", help="time sentence-transformers first")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="fret's train.dtype")
    parser.add_argument("--group-by-length", action="store_true", help="fret: batches of similar token length")
    parser.add_argument("--peer-bf16", action="store_true", help="sentence-transformers with bf16=True")
    parser.add_argument("--attention-dropout", type=_dropout, default=TrainParams().attention_dropout,
                        help="fret's train.attention_dropout (default: fret's default, 0; 'model': the model's "
                             "own, 0.1); the peer keeps the model's, as sentence-transformers does")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also time fret's step phase by phase over STEPS steps (table before the ratio)")
    args = parser.parse_args(argv)

    import torch

    from pipeline.device import resolve_dtype
    from pipeline.retrieval.encoder import TextFormat

    torch.set_num_threads(args.threads)
    args.fret_dtype = resolve_dtype(args.dtype, "cpu")
    rows = scifact_triples(args.folder, args.triples, args.seed)
    fmt = TextFormat()
    examples = args.steps * args.batch_size
    print(
        f"{len(rows)} SciFact triples, batch {args.batch_size}, {args.steps} steps ({examples} examples), "
        f"max_length {args.max_length}, {args.threads} threads, MiniLM-L6, MRL {MRL_DIMS}; "
        f"fret {args.fret_dtype}{', length-grouped' if args.group_by_length else ''}, "
        f"peer {'bfloat16' if args.peer_bf16 else 'float32'}"
    )
    warm_up(rows, args, fmt)
    if args.peer_first:  # to check that the order does not decide the ratio
        peer_s, peer_loss = run_peer(rows, args, fmt)
        fret_s, fret_loss = run_fret(rows, args, fmt)
    else:
        fret_s, fret_loss = run_fret(rows, args, fmt)
        peer_s, peer_loss = run_peer(rows, args, fmt)
    print(f"{'':16}{'fret':>10}{'peer':>10}")
    print(f"{'seconds':16}{fret_s:>10.1f}{peer_s:>10.1f}")
    print(f"{'examples/s':16}{examples / fret_s:>10.2f}{examples / peer_s:>10.2f}")
    # MatryoshkaLoss sums its dimensions' losses where fret averages them: put both on fret's scale.
    print(f"{'mean loss':16}{fret_loss:>10.4f}{peer_loss / len(MRL_DIMS):>10.4f}")
    from _roofline import Transformer, peaks, report
    from pipeline.retrieval.encoder import Encoder

    encoder = Encoder.load("minilm", device="cpu", max_length=args.max_length, threads=args.threads)
    model = Transformer.from_config(encoder.module.config)
    texts = [t for q, pt, p, nt, n in rows for t in (fmt.query(TASK, q), fmt.passage(pt, p), fmt.passage(nt, n))]
    lengths = [len(ids) for ids in encoder.tokenize(texts)]
    flops = 3 * model.encode(lengths) * examples / len(rows)
    shape = (3 * args.batch_size * sum(lengths) // len(lengths), model.hidden, encoder.module.config.intermediate_size)
    peak = peaks({"train": shape})
    peer_dtype = "bfloat16" if args.peer_bf16 else "float32"
    print("\n".join(report(peak, {"fret": (flops, fret_s, args.fret_dtype), "peer": (flops, peer_s, peer_dtype)})))
    if args.profile:
        print("\n".join(profile_lines(*profile_fret(rows, args, fmt, args.profile), model, args)))
    print(f"ratio: {peer_s / fret_s:.2f}")


if __name__ == "__main__":
    main()
