"""Training: Gecko's contrastive fine-tuning of the encoder, resumable, optionally data-parallel.

    data.py             reading triples, train.mix sources and candidates; mining their hard negatives
    loop.py             the schedule and `train`
    model_card.py       `write_model`: the weights with their training config and model card
    losses.py           `GeckoLoss` (in-batch + hard negatives, MRL) and `DistillLoss`
    model_selection.py  dev-set scoring and keeping the best step
    checkpoint.py       `Checkpoint`: resumable state, keyed by the run
    distributed.py      `World`: data-parallel ranks under torchrun

torch loads with this package: only the train stage and the benches import it.
"""

from pipeline.training.checkpoint import Checkpoint, run_key
from pipeline.training.distributed import World, distributed
from pipeline.training.data import read_candidates, read_triples
from pipeline.training.loop import train
from pipeline.training.losses import DistillLoss, Example, GeckoLoss
from pipeline.training.model_card import write_model
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
