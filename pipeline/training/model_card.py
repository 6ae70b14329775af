"""The trained model's record: `fret_training.json` and a sentence-transformers model card.

`training_config` gathers how the weights were made (params, data counts, the run's numbers, the
step that model selection kept); `write_model` saves the encoder with both files inside the folder
before it is swapped in, as nanoGPT keeps its config in the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.training.data import DataCounts
from pipeline.training.loop import TrainResult
from pipeline.training.losses import mrl_dims


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
            "dtype": encoder.dtype,
            "world_size": result.world_size,
            "final_loss": result.final_loss,
            "first_loss": result.losses[0] if result.losses else None,
            "final_distill_loss": result.final_distill_loss,
        },
        # best_step 0: no step beat the base on the dev sets, so the saved weights are the base's.
        "selection": result.selection,
    }


def _selection_line(selection: dict[str, Any] | None, steps: int) -> str:
    """The model card's sentence on which step's weights were saved."""
    if selection is None:
        return "The weights are those of the last step."
    best = selection["best_step"]
    which = "the base model's (no step beat it)" if best == 0 else f"those of step {best} of {steps}"
    return (
        f"The weights are {which}: the best mean dev score ({selection['best_score']:.4f}) over evaluations "
        f"every {selection['every']} steps (see `selection` in fret_training.json)."
    )


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

The model was trained on texts in this unified format:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["{example_query}"])
passages = model.encode(["{example_passage}"])
```

Raw texts work too (`model.encode(["..."])`), and fret's evaluate stage reads them raw by default
(`eval.prefixes: false`): on the dev splits fret measured (SciFact, STS Benchmark, Banking77) a
model trained this way scored as well or better on raw texts. Choose per task on your own dev data.

## Training data

| | count |
|---|---|
| triples (training rows) | {data["triples"]} |
| distinct queries | {data["queries"]} |
| rows with a hard negative | {data["with_negative"]} |
| rows without a hard negative | {data["without_negative"]} |
| labelled examples mixed in (train.mix) | {data["mix_examples"]} |

## Training

{res["steps"]} steps, {res["examples"]} examples in {res["seconds"]:.1f} s ({res["examples_per_s"]:.1f} examples/s);
loss {res["first_loss"]:.4f} at the first step, {res["final_loss"]:.4f} over the last steps.
{_selection_line(config.get("selection"), res["steps"])}

Parameters (also in `fret_training.json`):

```json
{params_json}
```

## Evaluation

Scores are written by fret's evaluate stage to `metrics/eval.json` in the project that trained this
model (they are computed after training, so this card does not repeat them).
"""
