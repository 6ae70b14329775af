"""Contrastive fine-tuning of the encoder on examples (Gecko's recipe): the schedule and `train`.

`train` runs AdamW with warmup + linear decay on `GeckoLoss` (+ `DistillLoss`) over the examples
that `pipeline.training.data` reads, optionally keeping the best step on dev sets
(`pipeline.training.model_selection`) and saving a resumable `Checkpoint` every few steps;
`pipeline.training.model_card` saves the result. Same params and seed give identical weights on
CPU in float32, whether the run went through in one go or was killed and resumed.

Imported only by the train stage and the benches (torch loads at import time).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.training.checkpoint import Checkpoint, agreed_state, rng_state, set_rng_state
from pipeline.training.distributed import World, broadcast_weights, gather_rows, sum_gradients
from pipeline.training.losses import Candidate, DistillLoss, Example, GeckoLoss, candidate_mask, mrl_dims
from pipeline.progress import progress_bar
from pipeline.training.model_selection import ModelSelector, Scorer

# group_by_length sorts this many batches' worth of examples at a time: wide enough that batches
# pad little, narrow enough that batch composition stays random (HF's Trainer takes 50).
LENGTH_WINDOW = 16


@dataclass
class TrainResult:
    steps: int
    examples: int  # examples seen, repeats across epochs included
    seconds: float  # the optimisation loop only (no loading or saving)
    losses: list[float] = field(repr=False)
    world_size: int = 1  # processes that trained together (torchrun); examples counts them all
    distill_losses: list[float] = field(default_factory=list, repr=False)  # the KL term per step, when on
    # Model selection (train.eval_every): ModelSelector.summary(), with best_step (0 = the base won).
    selection: dict[str, Any] | None = None
    resumed_from: int = 0  # the checkpoint's step this run started from (0: from scratch)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean of the last 10 steps' losses: one step's loss is too noisy to compare runs by."""
        return _tail_mean(self.losses)

    @property
    def final_distill_loss(self) -> float | None:
        """Mean of the last 10 steps' distillation terms; None when distillation was off."""
        return _tail_mean(self.distill_losses) if self.distill_losses else None


def _tail_mean(values: Sequence[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


# --- schedule -------------------------------------------------------------------------------------


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of a single example is dropped (it has no in-batch negatives)."""
    full, rest = divmod(n_examples, batch_size)
    return full + (rest >= 2)


def plan_steps(n_examples: int, epochs: int, max_steps: int | None, batch_size: int, warmup_ratio: float) -> tuple[int, int]:
    """(total steps, warmup steps): max_steps when set, else epochs x batches per epoch."""
    if n_examples < 2:
        raise ValueError(f"need at least 2 training examples, got {n_examples}")
    total = max_steps or epochs * steps_per_epoch(n_examples, batch_size)
    return total, math.ceil(warmup_ratio * total)


def get_lr(step: int, total_steps: int, warmup_steps: int, lr: float) -> float:
    """Learning rate for `step` (0-based)."""
    # 1) linear warmup: small first steps while Adam's moment estimates are still noisy
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    # 2) linear decay to zero at the last step, so the final updates barely move the weights
    return lr * (total_steps - step) / max(1, total_steps - warmup_steps)


def planned_examples(n_examples: int, batch_size: int, total_steps: int) -> int:
    """Examples that `batches` yields over `total_steps` steps (for the progress bar's total)."""
    sizes = [batch_size] * (n_examples // batch_size) + ([n_examples % batch_size] if n_examples % batch_size >= 2 else [])
    epochs, rest = divmod(total_steps, len(sizes))
    return epochs * sum(sizes) + sum(sizes[:rest])


def batches(
    n_examples: int,
    batch_size: int,
    total_steps: int,
    generator: torch.Generator,
    lengths: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """Index batches for `total_steps` steps: a fresh seeded permutation per epoch.

    With `lengths` (token counts per example), batches group examples of similar length, so each
    pads to less (see `_group_by_length`); without, they are plain slices of the permutation.
    """
    done = 0
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        if lengths is not None:
            chunks = _group_by_length(order, batch_size, lengths, generator)
        else:
            chunks = [order[start : start + batch_size] for start in range(0, n_examples, batch_size)]
        for chunk in chunks:
            if len(chunk) < 2:
                continue
            yield chunk
            done += 1
            if done == total_steps:
                return


def _group_by_length(
    order: list[int], batch_size: int, lengths: Sequence[int], generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches of similar-length examples, still random (the recipe of HF's group_by_length).

    The permutation is cut into windows of LENGTH_WINDOW batches, each window is sorted by length
    and cut into batches, and the full batches are shuffled over the whole epoch (the short last
    one stays last, as without grouping). Windows differ every epoch, so which examples meet as
    in-batch negatives still changes between epochs, but within a window they meet by length (so
    copies of one query, being equally long, meet too: see `TrainParams.group_by_length`).
    """
    span = LENGTH_WINDOW * batch_size
    # sorted() is stable: equal lengths keep their random order, so ties do not repeat across epochs.
    windows = [order[start : start + span] for start in range(0, len(order), span)]
    grouped = [i for window in windows for i in sorted(window, key=lengths.__getitem__)]
    chunks = [grouped[start : start + batch_size] for start in range(0, len(grouped), batch_size)]
    full = len(order) // batch_size
    shuffled = torch.randperm(full, generator=generator).tolist()
    return [chunks[i] for i in shuffled] + chunks[full:]


def example_lengths(encoder, examples: Sequence[Example]) -> list[int]:
    """Tokens per example (query + positive + negative, after truncation): the batch-grouping key.

    Each batch pads its queries to their longest and its passages to theirs, so examples of similar
    total length waste little padding together.
    """
    queries = encoder.tokenize([e.query for e in examples])
    positives = encoder.tokenize([e.positive for e in examples])
    negatives = encoder.tokenize([e.negative or "" for e in examples])
    return [
        len(q) + len(p) + (len(n) if e.negative is not None else 0)
        for e, q, p, n in zip(examples, queries, positives, negatives, strict=True)
    ]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (init, dropout) so that a run repeats exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays matrices only: decaying biases and LayerNorm gains only shrinks them.

    The fused kernel (one pass over each tensor, on CPU and CUDA) is what HF's Trainer uses by
    default; it is deterministic too, and about twice as fast as the for-each one on CPU.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class _LiveLog:
    """A dvclive `Live` that keeps what it was given, so that a resumed run writes the same files.

    Live starts its files afresh; a resumed run replays the checkpoint's events into it first, so
    its plots and summary equal an uninterrupted run's (rows for steps a killed run logged after its
    checkpoint are not kept: those steps are done again).
    """

    def __init__(self, live, events: Sequence[tuple[str, float] | None] = ()) -> None:
        self.live = live
        self.events: list[tuple[str, float] | None] = []
        for event in events:
            if event is None:
                self.next_step()
            else:
                self.log_metric(*event)

    def log_metric(self, name: str, value: float) -> None:
        self.events.append((name, value))
        self.live.log_metric(name, value)

    def next_step(self) -> None:
        self.events.append(None)
        self.live.next_step()


# --- training -------------------------------------------------------------------------------------


def batch_loss(loss_fn: GeckoLoss, encoder, batch: Sequence[Example], world: World) -> torch.Tensor:
    """The loss of a global batch; with several ranks each embeds only its share of the rows.

    The embeddings are gathered before the loss, so every query still sees the whole global batch
    as in-batch negatives, and the false-negative mask covers it all.
    """
    if world.size == 1:
        return loss_fn(encoder, batch)
    local = loss_fn.embed(encoder, batch[world.own(len(batch))])
    q, p, n = (gather_rows(t, world.shares(len(batch)), world.rank) for t in local)
    return loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(batch).to(q.device))


@dataclass(frozen=True)
class Distillation:
    """The soft-label term as `train` adds it: weight x `DistillLoss` over each query's candidates."""

    loss: DistillLoss
    weight: float
    pools: Mapping[str, Sequence[Candidate]]  # `read_candidates`: formatted query -> candidates
    seed: int

    def rng(self, step: int) -> random.Random:
        """The candidate draws of `step`, fixed by base.seed and the step alone.

        `random.Random` hashes a string seed with SHA-512, the same in every process and Python
        version; a private generator leaves torch's dropout and data-order draws untouched.
        """
        return random.Random(f"distill:{self.seed}:{step}")


def distillation(params, pools: Mapping[str, Sequence[Candidate]] | None, seed: int, world: World) -> Distillation | None:
    """The term for `params` (`TrainParams`); None at distill_weight 0, so training stays bit for bit the contrastive one.

    Raises:
        ValueError: distillation asked for without candidate lists, or under data parallelism.
    """
    if params.distill_weight == 0:
        return None
    if world.size > 1:
        raise ValueError("train.distill_weight > 0 trains in one process only: run without torchrun (nproc_per_node: 1)")
    if not pools:
        raise ValueError("train.distill_weight > 0 needs the candidate lists of table distill_candidates")
    loss = DistillLoss(params.temperature, params.distill_temperature, params.distill_candidates, params.mrl_dims)
    return Distillation(loss, params.distill_weight, pools, seed)


def distilled_loss(
    loss_fn: GeckoLoss, distill: Distillation, encoder, batch: Sequence[Example], step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, KL term) of a batch: contrastive + weight x distillation on one set of q, p, n embeddings."""
    q, p, n = loss_fn.embed(encoder, batch)
    contrastive = loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(batch).to(q.device))
    term = distill.loss(encoder, batch, distill.pools, (q, p, n), distill.rng(step))
    return contrastive + distill.weight * term, term


def train(
    encoder,
    examples: Sequence[Example],
    params,
    *,
    seed: int,
    live=None,
    progress: bool = False,
    candidates: Mapping[str, Sequence[Candidate]] | None = None,
    dev: Scorer | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Fine-tune `encoder.module` in place on `examples` with Gecko's loss.

    Under torchrun (inside `distributed`) every rank draws the same global batches from the same
    seeded generator and embeds its own share of each; the embeddings are gathered for the loss
    and the gradients summed, so K processes train like one with the same `batch_size` (equal
    weights up to float rounding when dropout is off; each rank draws its own dropout masks).

    Args:
        encoder: a `pipeline.retrieval.encoder.Encoder`; its `dtype` decides bfloat16 autocast.
        params: the `train` section (`TrainParams`).
        seed: `base.seed`; it fixes dropout and the data order.
        live: a dvclive `Live` (or None); gets train/loss, train/lr, train/grad_norm per step.
        progress: show a tqdm bar (examples/s) on stderr.
        candidates: `read_candidates`' lists; needed when params.distill_weight > 0.
        dev: encoder -> {dev set: score} (a `DevScorer`); with params.eval_every set, the weights of
            the best-scoring step (0 = before training) are left in `encoder` instead of the last.
        checkpoint: where to save the run's state every `checkpoint.every` steps; a run that finds
            its own checkpoint there continues from it and ends with the weights (and dvclive
            files) of an uninterrupted run. The caller removes it once the model is saved.
    """
    mrl_dims(encoder.dim, params.mrl_dims)  # fail before any work when a dimension is too large
    world = World.current()
    distill = distillation(params, candidates, seed, world)
    total, warmup = plan_steps(len(examples), params.epochs, params.max_steps, params.batch_size, params.warmup_ratio)
    seed_everything(seed + world.rank)  # only dropout differs by rank; rank 0 matches one process
    lengths = example_lengths(encoder, examples) if params.group_by_length else None
    order = batches(len(examples), params.batch_size, total, torch.Generator().manual_seed(seed), lengths)
    loss_fn = GeckoLoss(params.temperature, params.mrl_dims)
    if world.size > 1:
        broadcast_weights(encoder.module)
    optimizer = make_optimizer(encoder.module, params.lr, params.weight_decay)
    bar = progress_bar(planned_examples(len(examples), params.batch_size, total), f"train {encoder.name}", "ex", progress)
    state = agreed_state(checkpoint.load(total) if checkpoint is not None else None, world, encoder.device)
    # Replayed from a checkpoint's events, or recorded for the checkpoints to come.
    live = _LiveLog(live, state["live"] if state is not None else ()) if live is not None else None
    selector = ModelSelector(dev, params.eval_every, total, live) if dev is not None and params.eval_every else None
    losses: list[float] = []
    distill_losses: list[float] = []
    seen, start, before = 0, 0, 0.0
    if state is not None:
        start, seen, before = state["step"], state["seen"], state["seconds"]
        losses, distill_losses = list(state["losses"]), list(state["distill_losses"])
        encoder.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if selector is not None:
            selector.load_state_dict(state["selection"])
        set_rng_state(state["rng"])
        if progress:
            print(f"train: resuming from step {start} of {total} ({checkpoint.path})", file=sys.stderr)
        if bar is not None:
            bar.update(seen)
        del state  # the checkpoint's tensors: a model's worth of memory, and more
    encoder.module.train()  # dropout on, as in BERT's and sentence-transformers' fine-tuning
    started = time.perf_counter()
    saving = 0.0  # seconds spent writing checkpoints, left out of the throughput like evaluation

    def elapsed() -> float:
        return before + time.perf_counter() - started - saving - (selector.seconds if selector is not None else 0.0)

    try:
        if selector is not None and start == 0:
            selector.evaluate(encoder, 0)  # the base is a candidate: training may never beat it
        for step, rows in enumerate(order):
            if step < start:
                continue  # drawing the done steps' batches again puts the data order where it was
            lr = get_lr(step, total, warmup, params.lr)
            batch = [examples[i] for i in rows]
            loss, grad_norm, term = _step(encoder, loss_fn, optimizer, batch, lr, params.max_grad_norm, world, distill, step)
            losses.append(loss)
            if not math.isfinite(loss):
                raise ValueError(f"loss is {loss} at step {step + 1}: lower train.lr or raise train.temperature")
            if term is not None:
                distill_losses.append(term)
            seen += len(rows)
            _log_step(live, loss, lr, grad_norm, term)
            if selector is not None and selector.due(step + 1):
                selector.evaluate(encoder, step + 1)  # logged at dvclive step = updates done
            if checkpoint is not None and checkpoint.due(step + 1, total):
                saving_started = time.perf_counter()
                checkpoint.save({
                    "step": step + 1, "total": total, "model": encoder.module.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": rng_state(), "losses": losses,
                    "distill_losses": distill_losses, "seen": seen, "seconds": elapsed(),
                    "selection": selector.state_dict() if selector is not None else None,
                    "live": live.events if live is not None else None,
                })  # fmt: skip
                saving += time.perf_counter() - saving_started
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if selector is not None:
            selector.restore(encoder, len(losses))
    finally:
        encoder.module.eval()
        if bar is not None:
            bar.close()
    # Throughput is the optimisation's: dev evaluations and checkpoints are left out of the time, and
    # a resumed run adds the time its checkpoint had taken.
    return TrainResult(
        steps=len(losses), examples=seen, seconds=elapsed(), losses=losses, world_size=world.size,
        distill_losses=distill_losses, selection=selector.summary() if selector is not None else None,
        resumed_from=start,
    )  # fmt: skip


def _log_step(live, loss: float, lr: float, grad_norm: float, distill_loss: float | None) -> None:
    """One step's numbers to dvclive, then its next step."""
    if live is None:
        return
    live.log_metric("train/loss", loss)
    live.log_metric("train/lr", lr)
    live.log_metric("train/grad_norm", grad_norm)
    if distill_loss is not None:
        live.log_metric("train/distill_loss", distill_loss)
    live.next_step()


def _step(
    encoder, loss_fn: GeckoLoss, optimizer, batch: list[Example], lr: float, max_norm: float | None, world: World,
    distill: Distillation | None = None, step: int = 0,
) -> tuple[float, float, float | None]:  # fmt: skip
    """One optimisation step on a global batch; returns (loss, gradient norm before clipping, KL term or None)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if distill is None:
        loss, term = batch_loss(loss_fn, encoder, batch, world), None
    else:
        loss, term = distilled_loss(loss_fn, distill, encoder, batch, step)
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:  # a rank with no share of a tiny last batch has nothing to backpropagate
        loss.backward()
    if world.size > 1:
        sum_gradients(encoder.module)
    grad_norm = _clip(encoder.module, max_norm)
    optimizer.step()
    # One host-device sync per step for all numbers (on CUDA each .item() would wait on its own).
    numbers = [loss.detach(), grad_norm.to(loss.dtype)] + ([term.detach()] if term is not None else [])
    values = torch.stack(numbers).tolist()
    return values[0], values[1], values[2] if term is not None else None


def _clip(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients to max_norm (None: no clipping); returns the norm before clipping."""
    limit = max_norm if max_norm is not None else float("inf")
    return torch.nn.utils.clip_grad_norm_(module.parameters(), limit)
