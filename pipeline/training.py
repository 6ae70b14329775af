"""Contrastive fine-tuning of the encoder on the `triples` table (Gecko's recipe).

`read_triples` / `read_pairs` turn rows into `Example`s in the unified format, `train` runs AdamW
with warmup + linear decay on `GeckoLoss`, and `write_model` saves a sentence-transformers folder
with a model card and the training config beside the weights (as nanoGPT keeps its config in the
checkpoint). Same params and seed give identical weights on CPU in float32.

Imported only by the train stage and the bench (torch loads at import time).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.losses import Example, GeckoLoss, mrl_dims

TRIPLES_COLUMNS = [
    "query_id", "task", "query", "positive_id", "positive_title", "positive_text",
    "negative_id", "negative_title", "negative_text",
]  # fmt: skip


@dataclass(frozen=True)
class DataCounts:
    """What the model was trained on, for the summary and the model card."""

    triples: int
    queries: int
    with_negative: int
    without_negative: int
    mix_examples: int = 0


@dataclass
class TrainResult:
    steps: int
    examples: int  # examples seen, repeats across epochs included
    seconds: float  # the optimisation loop only (no loading or saving)
    losses: list[float] = field(repr=False)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean of the last 10 steps' losses: one step's loss is too noisy to compare runs by."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


# --- data -----------------------------------------------------------------------------------------


def read_triples(path: str | Path, text_format) -> tuple[list[Example], DataCounts]:
    """Read table `triples` from a DuckDB file (read-only) into examples, in a fixed order.

    Args:
        text_format: a `pipeline.encoder.TextFormat` (the unified format).

    Raises:
        ValueError: the table lacks a needed column or has no rows.
    """
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        have = {row[0] for row in con.execute("SELECT column_name FROM (DESCRIBE triples)").fetchall()}
        missing = [c for c in TRIPLES_COLUMNS if c not in have]
        if missing:
            raise ValueError(f"{path}: table triples lacks column(s) {missing}")
        # Sorted so that the row order upstream never changes the training order.
        rows = con.execute(
            f"SELECT {', '.join(TRIPLES_COLUMNS)} FROM triples "
            "ORDER BY query_id, positive_id, negative_id NULLS FIRST"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path}: table triples is empty")
    examples = [_triple_example(dict(zip(TRIPLES_COLUMNS, row)), text_format) for row in rows]
    with_negative = sum(e.negative is not None for e in examples)
    counts = DataCounts(
        triples=len(examples),
        queries=len({row[0] for row in rows}),
        with_negative=with_negative,
        without_negative=len(examples) - with_negative,
    )
    return examples, counts


def _triple_example(row: dict[str, Any], fmt) -> Example:
    has_negative = row["negative_id"] is not None and row["negative_text"] is not None
    return Example(
        query=fmt.query(row["task"], row["query"]),
        positive=fmt.passage(row["positive_title"], row["positive_text"]),
        negative=fmt.passage(row["negative_title"], row["negative_text"]) if has_negative else None,
        query_text=row["query"],
        positive_text=row["positive_text"],
        negative_text=row["negative_text"] if has_negative else None,
        positive_id=str(row["positive_id"]),
        negative_id=str(row["negative_id"]) if has_negative else None,
    )


def read_pairs(path: str | Path, min_score: float, task: str, text_format) -> list[Example]:
    """Labelled pairs scoring >= min_score as examples, in both directions (similarity is symmetric).

    The file is a TSV with header columns sentence1, sentence2, score (the STS Benchmark layout). It
    has no quoting (sentences contain bare `"`), so it is read with QUOTE_NONE. Pair sides get
    content-derived ids, so the same sentence elsewhere in a batch is masked as a false negative.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence1", "sentence2", "score"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        pairs = [(r["sentence1"], r["sentence2"]) for r in reader if float(r["score"]) >= min_score]
    out = []
    for a, b in pairs:
        for query, passage in ((a, b), (b, a)):
            out.append(
                Example(
                    query=text_format.query(task, query),
                    positive=text_format.passage(None, passage),
                    negative=None,
                    query_text=query,
                    positive_text=passage,
                    negative_text=None,
                    positive_id="pair:" + hashlib.sha1(passage.encode()).hexdigest()[:16],
                    negative_id=None,
                )
            )
    return out


def mix_in(examples: list[Example], extra: list[Example], fraction: float, seed: int) -> list[Example]:
    """Add a seeded sample of `extra` so that it makes up `fraction` of the result (or all of extra)."""
    wanted = min(len(extra), round(fraction / (1 - fraction) * len(examples)))
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(extra), generator=generator)[:wanted].tolist()
    return examples + [extra[i] for i in sorted(picked)]


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


def batches(n_examples: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Index batches for `total_steps` steps: a fresh seeded permutation per epoch."""
    done = 0
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples, batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < 2:
                continue
            yield chunk
            done += 1
            if done == total_steps:
                return


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (init, dropout) so that a run repeats exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays matrices only: decaying biases and LayerNorm gains only shrinks them."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr)


# --- training -------------------------------------------------------------------------------------


def train(encoder, examples: Sequence[Example], params, *, seed: int, live=None, progress: bool = False) -> TrainResult:
    """Fine-tune `encoder.module` in place on `examples` with Gecko's loss.

    Args:
        encoder: a `pipeline.encoder.Encoder`; its `dtype` decides bfloat16 autocast.
        params: the `train` section (`TrainParams`).
        seed: `base.seed`; it fixes dropout and the data order.
        live: a dvclive `Live` (or None); gets train/loss, train/lr, train/grad_norm per step.
        progress: show a tqdm bar (examples/s) on stderr.
    """
    mrl_dims(encoder.dim, params.mrl_dims)  # fail before any work when a dimension is too large
    total, warmup = plan_steps(len(examples), params.epochs, params.max_steps, params.batch_size, params.warmup_ratio)
    seed_everything(seed)
    order = batches(len(examples), params.batch_size, total, torch.Generator().manual_seed(seed))
    loss_fn = GeckoLoss(params.temperature, params.mrl_dims)
    optimizer = make_optimizer(encoder.module, params.lr, params.weight_decay)
    bar = _progress_bar(planned_examples(len(examples), params.batch_size, total), encoder.name) if progress else None
    losses: list[float] = []
    seen = 0
    encoder.module.train()  # dropout on, as in BERT's and sentence-transformers' fine-tuning
    started = time.perf_counter()
    try:
        for step, rows in enumerate(order):
            lr = get_lr(step, total, warmup, params.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(encoder, [examples[i] for i in rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _clip(encoder.module, params.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise ValueError(f"loss is {losses[-1]} at step {step + 1}: lower train.lr or raise train.temperature")
            seen += len(rows)
            if live is not None:
                live.log_metric("train/loss", losses[-1])
                live.log_metric("train/lr", lr)
                live.log_metric("train/grad_norm", grad_norm)
                live.next_step()
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
    finally:
        encoder.module.eval()
        if bar is not None:
            bar.close()
    return TrainResult(steps=len(losses), examples=seen, seconds=time.perf_counter() - started, losses=losses)


def _clip(module: torch.nn.Module, max_norm: float | None) -> float:
    """Clip gradients to max_norm (None: no clipping); returns the norm before clipping."""
    limit = max_norm if max_norm is not None else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(module.parameters(), limit))


def _progress_bar(total_examples: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_examples, unit="ex", desc=f"train {name}", smoothing=0.1)


# --- saving ---------------------------------------------------------------------------------------


def write_model(encoder, path: str | Path, config: dict[str, Any]) -> Path:
    """Save the encoder as a sentence-transformers folder, with `fret_training.json` and a model card.

    Args:
        config: what `training_config` returns; written as JSON and summarised in README.md.
    """
    # Inside the folder before it is swapped in: a crash never leaves new weights without their config.
    extra = {"fret_training.json": json.dumps(config, indent=2) + "\n", "README.md": model_card(config)}
    return encoder.save(path, extra_files=extra)


def training_config(
    *, base_model: str, encoder, params, encoder_params, base_params, counts: DataCounts, result: TrainResult
) -> dict[str, Any]:
    """Everything needed to know how the saved weights were made (JSON-ready).

    Args:
        base_model: the encoder's identity before training; `encoder` is the trained one.
    """
    return {
        "base_model": base_model,
        "model": encoder.identity,
        "mrl_dims": mrl_dims(encoder.dim, params.mrl_dims),
        "train": params.model_dump(mode="json"),
        "encoder": encoder_params.model_dump(mode="json", exclude={"cache_path", "batch_size"}),
        "base": base_params.model_dump(mode="json"),
        "data": asdict(counts),
        "result": {
            "steps": result.steps,
            "examples": result.examples,
            "seconds": round(result.seconds, 3),
            "examples_per_s": round(result.examples_per_s, 3),
            "final_loss": result.final_loss,
            "first_loss": result.losses[0] if result.losses else None,
        },
    }


def model_card(config: dict[str, Any]) -> str:
    """A sentence-transformers style README.md; eval scores are left to the evaluate stage's file."""
    data, res, enc = config["data"], config["result"], config["encoder"]
    params_json = json.dumps({"train": config["train"], "encoder": enc, "base": config["base"]}, indent=2)
    example_query = enc["query_template"].format(task="Given a question, retrieve passages that answer it", query="...")
    example_passage = enc["passage_template"].format(title=enc["empty_title"], text="...")
    return f"""---
library_name: sentence-transformers
base_model: {config["base_model"]}
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, fret, gecko]
---

# fret-encoder

A text encoder fine-tuned by fret from `{config["base_model"]}` with Gecko's recipe (Lee et al. 2024,
arXiv 2403.20327): LLM-generated queries, LLM-ranked positives and hard negatives, and a softmax loss
over in-batch positives, hard negatives and same-tower (query) negatives, with Matryoshka dimensions
{config["mrl_dims"]} (the first k coordinates, re-normalised, are an embedding of their own).

Weights: `{config["model"]}` (name@sha256 of weights and tokenizer).

## Use

Texts are embedded in the unified format the model was trained on:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["{example_query}"])
passages = model.encode(["{example_passage}"])
```

## Training data

| | count |
|---|---|
| triples (training rows) | {data["triples"]} |
| distinct queries | {data["queries"]} |
| rows with a hard negative | {data["with_negative"]} |
| rows without a hard negative | {data["without_negative"]} |
| labelled pair examples mixed in | {data["mix_examples"]} |

## Training

{res["steps"]} steps, {res["examples"]} examples in {res["seconds"]:.1f} s ({res["examples_per_s"]:.1f} examples/s);
loss {res["first_loss"]:.4f} at the first step, {res["final_loss"]:.4f} over the last steps.

Parameters (also in `fret_training.json`):

```json
{params_json}
```

## Evaluation

Scores are written by fret's evaluate stage to `metrics/eval.json` in the project that trained this
model (they are computed after training, so this card does not repeat them).
"""
