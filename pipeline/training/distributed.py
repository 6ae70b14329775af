"""Data-parallel training across processes (torchrun): who is who, gathers and gradient sums.

One process alone (no torchrun) is `World()`: rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


# --- data parallel --------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place in data-parallel training: rank 0 of 1 without torch.distributed."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def shares(self, n: int) -> list[int]:
        """Rows of an n-row global batch per rank: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        return [base + (r < extra) for r in range(self.size)]

    def own(self, n: int) -> slice:
        """This rank's rows of an n-row global batch."""
        shares = self.shares(n)
        start = sum(shares[: self.rank])
        return slice(start, start + shares[self.rank])


@contextlib.contextmanager
def distributed(device: str) -> Iterator[World]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1).

    One process per GPU on CUDA (backend nccl, GPU = LOCAL_RANK), gloo on CPU. Outside torchrun it
    yields `World()` and does nothing.

    Raises:
        ValueError: more processes on this node than visible GPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield World()
        return
    import torch.distributed as dist

    from pipeline.device import resolve_device

    on_cuda = torch.device(resolve_device(device)).type == "cuda"
    if on_cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this node has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)  # "cuda" then means this process's own GPU
    dist.init_process_group("nccl" if on_cuda else "gloo")
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()


def gather_rows(local: torch.Tensor, shares: list[int], rank: int) -> torch.Tensor:
    """Every rank's rows, in rank order; the gradient flows back into this rank's own rows only.

    The other ranks' rows arrive detached. Each rank computes the whole global batch's loss and
    backpropagates it through its own rows; summed over ranks (`sum_gradients`) that is exactly
    the gradient one process computes for the whole batch.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    # all_gather wants equal shapes: pad to the largest share, cut the padding off after.
    padded = F.pad(local, (0, 0, 0, max(shares) - local.shape[0]))
    parts = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(parts, padded.detach().contiguous())
    parts[rank] = padded
    return torch.cat([part[:share] for part, share in zip(parts, shares)])


def sum_gradients(module: torch.nn.Module) -> None:
    """Add up every rank's gradients in place with one all-reduce (DDP's job, done by hand).

    A sum, not DDP's mean: each rank backpropagated the whole global batch's loss through its own
    rows, so the parts add up to the full gradient. By hand because a step runs two forward passes
    (queries, passages) through the module that `Encoder` wraps, which DDP's wrapper does not fit.

    A parameter that has no gradient on any rank (BERT's unused pooler) stays None, as in one
    process, so that AdamW skips it there too instead of decaying it.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in module.parameters() if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, total in zip(used, _unflatten_dense_tensors(flat, grads)):
        p.grad = total


def broadcast_weights(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights (as DDP does), whatever each one loaded."""
    import torch.distributed as dist

    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)
