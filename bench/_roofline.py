"""Roofline helpers for the model benches: FLOPs per item from a model's config, and the peak.

FLOP count of one forward pass of a transformer (the convention of Kaplan et al. and PaLM's MFU):

    linear = 2 x P x T                      P: weights of the blocks' linear layers, T: tokens run
    attention = 2 x 2 x layers x Q x K x hidden    QK^T and AV, Q query positions over K keys
    head = 2 x vocab x hidden x H           an LM head, over the H positions whose logits are kept

For a text of n tokens encoded in one pass Q = K = n, so attention is 2 x 2 x layers x n^2 x hidden.
P comes from the config: per layer 4 x hidden^2 (BERT: Q, K, V, O) or hidden x (2 x hidden +
2 x kv_heads x head_dim) (grouped-query attention, Llama), plus 2 x hidden x intermediate (BERT's
MLP) or 3 x hidden x intermediate (gated MLP). Embedding lookups, norms, softmax and pooling are
left out (well under 1% here). Training (forward + backward) is 3 x the forward count.

The peak is measured in the same process, right before the report: torch matmul GFLOP/s in
bfloat16 and float32 at the stage's own shapes and at 2048x2048, on the bench's thread count, best
of a few timed runs. The share printed is achieved FLOP/s over the peak of the dtype the side ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Transformer:
    """What the FLOP count needs from a Hugging Face config."""

    layers: int
    hidden: int
    linear_params: int  # weights of the blocks' linear layers, all layers
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Transformer":
        h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        attention = h * (2 * h + 2 * kv_heads * head_dim) if kv_heads != heads else 4 * h * h
        gated = getattr(config, "hidden_act", "") in ("silu", "swiglu") or config.model_type in ("llama", "mistral", "qwen2")
        mlp = (3 if gated else 2) * h * inter
        return cls(layers, h, layers * (attention + mlp), config.vocab_size)

    def forward(self, tokens: int, attention_pairs: int = 0, head_positions: int = 0) -> float:
        """FLOPs of a forward pass: `tokens` run, sum of Q x K over sequences, LM-head positions."""
        return (
            2.0 * self.linear_params * tokens
            + 4.0 * self.layers * self.hidden * attention_pairs
            + 2.0 * self.vocab * self.hidden * head_positions
        )

    def encode(self, lengths) -> float:
        """Forward FLOPs of encoding texts of these token lengths, each in one bidirectional pass."""
        lengths = list(lengths)
        return self.forward(sum(lengths), sum(n * n for n in lengths))


def matmul_gflops(m: int, k: int, n: int, dtype: str, seconds: float = 0.3) -> float:
    """Best GFLOP/s of an (m x k) @ (k x n) torch matmul in `dtype`, on torch's current threads."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(m, k).to(dt), torch.randn(k, n).to(dt)
    torch.matmul(a, b)  # first call: oneDNN kernel selection
    best, spent, reps = float("inf"), 0.0, 0
    while spent < seconds or reps < 3:
        t = time.perf_counter()
        torch.matmul(a, b)
        dt_s = time.perf_counter() - t
        best, spent, reps = min(best, dt_s), spent + dt_s, reps + 1
    return 2.0 * m * k * n / best / 1e9


def peaks(stage_shapes: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, float]]:
    """GFLOP/s per dtype at each named (m, k, n) shape and at 2048x2048; 'peak' = the best of them."""
    import torch

    shapes = {**stage_shapes, "2048x2048": (2048, 2048, 2048)}
    out: dict[str, dict[str, float]] = {}
    for dtype in ("bfloat16", "float32"):
        out[dtype] = {name: matmul_gflops(*shape, dtype) for name, shape in shapes.items()}
        out[dtype]["peak"] = max(out[dtype].values())
    out["threads"] = {"n": torch.get_num_threads()}
    return out


def report(peak: dict[str, dict[str, float]], sides: dict[str, tuple[float, float, str]]) -> list[str]:
    """Lines to print: the measured peaks, then per side achieved GFLOP/s and its share of the peak.

    Args:
        sides: name -> (FLOPs done, seconds, dtype it ran in).
    """
    lines = [
        f"peak ({int(peak['threads']['n'])} threads, torch matmul GFLOP/s): "
        + "; ".join(
            f"{dtype} " + ", ".join(f"{name} {v:.0f}" for name, v in peak[dtype].items() if name != "peak")
            for dtype in ("bfloat16", "float32")
        )
    ]
    # bf16 slower than fp32 means it is emulated (no AVX512-BF16 / AMX): a share of that "peak" would
    # read in the thousands of percent and say nothing, so only the float32 share is printed then.
    bf16_native = peak["bfloat16"]["peak"] >= peak["float32"]["peak"]
    if not bf16_native:
        lines.append("bfloat16 is emulated on this CPU (slower than float32): shares are of the float32 peak only")
    for name, (flops, seconds, dtype) in sides.items():
        achieved = flops / seconds / 1e9
        lines.append(
            f"roofline {name}: {flops / 1e9:,.1f} GFLOP in {seconds:.1f} s = {achieved:.1f} GFLOP/s, "
            f"{achieved / peak[dtype]['peak']:.1%} of the {dtype} peak ({peak[dtype]['peak']:.0f})"
            + ("" if dtype == "bfloat16" or not bf16_native
               else f", {achieved / peak['bfloat16']['peak']:.1%} of the bfloat16 peak")
        )
    return lines


class ForwardCounter:
    """Counts what a causal LM's forward passes actually run, through a forward pre-hook.

    Per call with input ids of shape (b, q) over a KV cache of c tokens: b x q tokens (pads
    included: they are computed), b x q x (c + q) attention Q x K pairs, and b x h LM-head positions
    (h = `logits_to_keep` when set, else q). `flops(model)` turns the counts into FLOPs.
    """

    def __init__(self, module) -> None:
        self.tokens = self.attention_pairs = self.head_positions = 0
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        b, q = ids.shape
        # The KV cache, whatever the keyword (past_key_values, or fret's per-model name).
        cache = next((v for v in kwargs.values() if hasattr(v, "get_seq_length")), None)
        past = cache.get_seq_length() if cache is not None else 0
        keep = kwargs.get("logits_to_keep") or 0
        keep = keep if isinstance(keep, int) else len(keep)
        self.tokens += b * q
        self.attention_pairs += b * q * (past + q)
        self.head_positions += b * (min(keep, q) if keep else q)

    def flops(self, model: Transformer) -> float:
        return model.forward(self.tokens, self.attention_pairs, self.head_positions)

    def reset(self) -> None:
        self.tokens = self.attention_pairs = self.head_positions = 0

    def close(self) -> None:
        self._handle.remove()
