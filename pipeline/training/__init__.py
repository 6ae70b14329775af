"""Training: Gecko's contrastive fine-tuning of the encoder, resumable, optionally data-parallel.

    loop.py             reading triples / pairs / candidates, the schedule, `train`, `write_model`
    losses.py           `GeckoLoss` (in-batch + hard negatives, MRL) and `DistillLoss`
    model_selection.py  dev-set scoring and keeping the best step
    checkpoint.py       `Checkpoint`: resumable state, keyed by the run
    distributed.py      `World`: data-parallel ranks under torchrun

torch loads with this package: only the train stage and the benches import it.
"""

from pipeline.training.checkpoint import Checkpoint, run_key
from pipeline.training.distributed import World, distributed
from pipeline.training.loop import read_candidates, read_triples, train, write_model
from pipeline.training.losses import DistillLoss, Example, GeckoLoss
from pipeline.training.model_selection import DevScorer, ModelSelector

__all__ = [
    "Checkpoint",
    "DevScorer",
    "DistillLoss",
    "Example",
    "GeckoLoss",
    "ModelSelector",
    "World",
    "distributed",
    "read_candidates",
    "read_triples",
    "run_key",
    "train",
    "write_model",
]
