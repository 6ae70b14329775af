"""Resumable training: a checkpoint of everything that decides the weights, keyed by the run.

`run_key` hashes what decides a run's weights; a `Checkpoint` holds the model, AdamW, RNG states,
losses, selection state and dvclive events of one run, replaced atomically every
`train.checkpoint_every` steps, so a re-run continues to the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training.distributed import World
from pipeline.training.losses import Candidate, Example

CHECKPOINT_FORMAT = 1
_CHECKPOINT_FIELDS = {"format", "key", "step", "total", "model", "optimizer", "rng", "losses", "distill_losses",
                      "seen", "seconds", "selection", "live"}  # fmt: skip


def run_key(
    params, *, seed: int, examples: Sequence[Example], candidates: Mapping[str, Sequence[Candidate]] | None = None,
    dev: Any = None, context: Any = (), world_size: int = 1,
) -> str:  # fmt: skip
    """A hash of everything that decides a run's weights: a checkpoint is resumed only by its own run.

    It covers the train params but checkpoint_every (how often to save changes no weight), the seed,
    the examples and candidate lists themselves (their content, not their file: DuckDB files differ
    byte for byte between identical builds), the dev sets when they are data (a `DevScorer`), the
    number of processes, and `context`: what the caller adds (the stage: the encoder's fingerprint,
    the encoder and base params).
    """
    digest = hashlib.sha256()
    dev_part = repr(dev) if is_dataclass(dev) else type(dev).__qualname__
    head = [params.model_dump(mode="json", exclude={"checkpoint_every"}), seed, world_size, dev_part, context]
    digest.update(repr(head).encode())
    for example in examples:
        digest.update(repr(example).encode())
    for query in sorted(candidates or {}):
        digest.update(repr((query, candidates[query])).encode())
    return digest.hexdigest()[:24]


@dataclass(frozen=True)
class Checkpoint:
    """Where a run keeps its resumable state: one file per run key and rank, replaced atomically.

    The stage keeps it outside the DVC outs (`.fret/checkpoints/train/`), so that DVC neither tracks
    nor deletes it. Saving removes other runs' checkpoints (the folder holds one run's at most), and
    the stage removes the run's own once the model is saved. A kill leaves the previous file whole
    (temporary + os.replace); a file cut short some other way is ignored with a warning on load.
    """

    folder: Path
    key: str  # `run_key`
    every: int  # train.checkpoint_every
    rank: int = 0

    @classmethod
    def for_run(cls, folder: str | Path, params, *, world: World | None = None, **run: Any) -> "Checkpoint | None":
        """The checkpoint of the run `params` (`TrainParams`) and `run` (`run_key`'s arguments) describe;
        None when params.checkpoint_every is null."""
        if params.checkpoint_every is None:
            return None
        world = world or World()
        key = run_key(params, world_size=world.size, **run)
        if world.size > 1:  # only rank 0 holds the dev sets: its key names every rank's file
            import torch.distributed as dist

            box = [key]
            dist.broadcast_object_list(box, src=0)
            key = box[0]
        return cls(Path(folder), key, params.checkpoint_every, world.rank)

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}-rank{self.rank}.pt"

    def due(self, step: int, total: int) -> bool:
        """Whether to save after `step` updates; never after the last (the model itself is saved then)."""
        return step % self.every == 0 and step < total

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` under this run's key: to a temporary file, then renamed over the previous one.

        No fsync: a killed process loses nothing the kernel holds, and a file a power cut leaves
        short fails to load and is ignored.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.path.name}.tmp-{os.getpid()}"
        try:
            torch.save({"format": CHECKPOINT_FORMAT, "key": self.key, **state}, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        for other in self.folder.iterdir():
            ours = other.name.startswith((self.key, f".{self.key}"))  # any rank's file or save in progress
            debris = other.name.startswith(f".{self.path.name}.tmp-")  # this rank's killed saves
            if other.is_file() and (debris or not ours):
                other.unlink(missing_ok=True)

    def load(self, total: int) -> dict[str, Any] | None:
        """The saved state of this run (`total` steps), or None: no file, or one that cannot be used."""
        if not self.path.is_file():
            return None
        try:
            with warnings.catch_warnings():  # torch's own remarks on a garbled file: ours below says it all
                warnings.simplefilter("ignore")
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            problem = _checkpoint_problem(state, self.key, total)
        except Exception as err:  # noqa: BLE001 - a truncated or garbled file fails in many ways; none may stop training
            problem = f"unreadable ({type(err).__name__}: {str(err)[:200]})"
        if problem:
            warnings.warn(f"ignoring checkpoint {self.path}: {problem}; training starts from step 0", stacklevel=2)
            return None
        return state

    def remove(self) -> None:
        """Delete this run's files (every rank's), and the folder when nothing else is in it."""
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name.startswith((self.key, f".{self.key}")):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def _checkpoint_problem(state: Any, key: str, total: int) -> str | None:
    """Why a loaded checkpoint cannot be resumed, or None."""
    if not isinstance(state, dict) or not _CHECKPOINT_FIELDS <= state.keys():
        return "not a training checkpoint of this version"
    if state["format"] != CHECKPOINT_FORMAT or state["key"] != key:
        return "written by another version or run"
    if state["total"] != total or not 0 < state["step"] < total or len(state["losses"]) != state["step"]:
        return f"step {state['step']} of {state['total']} does not fit a run of {total} steps"
    return None


def rng_state() -> dict[str, Any]:
    """Every generator a step may draw from: python, numpy, torch (CPU, and each GPU once CUDA is up)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def agreed_state(state: dict[str, Any] | None, world: World, device: torch.device) -> dict[str, Any] | None:
    """The loaded state if every rank loaded one of the same step (a kill can land between two
    ranks' saves), else None everywhere: the ranks must start from one step."""
    if world.size == 1:
        return state
    import torch.distributed as dist

    step = state["step"] if state is not None else 0
    bounds = torch.tensor([step, -step], device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MIN)
    return state if bounds[0].item() == -bounds[1].item() == step and step > 0 else None
