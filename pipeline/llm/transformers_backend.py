"""The in-process backend (`llm.backend: transformers`): a Hugging Face causal LM on this machine.

`load_transformers_llm` returns a `TransformersLLM`, the `pipeline.llm.base.LLM` of this backend: the plain
Hugging Face model and tokenizer (`llm.model`, `llm.tokenizer`), its Outlines view
(`llm.outlines_model`) and `llm.identity` (name + weights hash + dtype), which goes into every
cache key and every row the model produces. Its scorer is `PrefixScorer`.

Structured generation follows Outlines: the Pydantic schema becomes a regex and an outlines_core
`Index` through Outlines' own backend. The decoding loop is ours, because Outlines' batch path
(`Generator.batch` -> HF `generate`) has no way to (a) reuse the KV cache of the few-shot prefix
that every prompt shares, which is most of each prompt, (b) seed sampling per row, so that a
query's text does not depend on what else is in its batch, (c) drop finished rows from the
batch, or (d) retry a row in place. The loop drives one outlines_core `Guide` per row over a
left-padded batch whose rows may come from different few-shot prefixes (task types), with a KV
cache written in place rather than concatenated at every step.

Scoring (`PrefixScorer`) runs the passage prefix that all the prompts of one passage share once,
repeats its KV cache across a batch of the passage's prompts and runs only their differing tails,
keeping logits only where a score reads them. This gives the scores of the plain computation
(each full prompt through the model, log-softmax, gather), up to float rounding;
tests/test_scoring.py checks it.

Heavy imports (torch, transformers, outlines) happen inside functions: only stages import this.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.device import DeviceError, resolve_device, resolve_dtype
from pipeline.llm.base import (
    JSON_WHITESPACE,
    QL,
    ChatPrompts,
    Completion,
    Decoding,
    LLMError,
    ScoreRequest,
    ScoringError,
    answer_token_ids,
)
from pipeline.llm.weights import ModelSource, resolve_model
from pipeline.params import BaseParams, LLMParams

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

_PREFIX_SLOTS = 16  # prefix KV caches kept: the system turn, one per few-shot variant (task type), a few more
_MIN_PREFIX_GAIN = 32  # a shared prefix shorter than this is not worth storing or copying
_GROW = 64  # positions a decoding KV buffer gains when full (it starts with this much room)


def resolve_placement(params: LLMParams, base: BaseParams) -> tuple[str, str]:
    """(device, dtype): `llm.device` overrides `base.device`, and "auto" means what it means for the
    encoder (`pipeline.device`). The resolved dtype, not `auto`, goes into the identity and cache keys."""
    try:
        device = resolve_device(params.device or base.device)
        return device, resolve_dtype(params.dtype, device)
    except DeviceError as err:
        raise LLMError(str(err)) from None


def load_transformers_llm(params: LLMParams, base: BaseParams) -> "TransformersLLM":
    """Load the LLM named by `params` on the device and thread count of `params`/`base`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(base.threads)
    source = resolve_model(params)
    device, dtype_name = resolve_placement(params, base)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype).to(device).eval()
    # dtype changes the numbers, hence the outputs: it is part of who answered.
    identity = f"{source.name}@{source.sha256[:16]}:{dtype_name}"
    return TransformersLLM(model, tokenizer, identity, source=source)



class TransformersLLM(ChatPrompts):
    """A causal LM with its tokenizer, identity and batched schema-constrained generation (an `LLM`).

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
    def outlines_model(self) -> Any:
        """The same model and tokenizer seen as an Outlines `Transformers` model (built once)."""
        if self._outlines_model is None:
            import outlines

            self._outlines_model = outlines.from_transformers(self.model, self.tokenizer)
        return self._outlines_model

    def scorer(self, yes_words: Sequence[str], no_words: Sequence[str]) -> "PrefixScorer":
        """The scorer `pipeline.llm.scoring.score_relevance` uses for this model: shared passage prefixes."""
        return PrefixScorer(self, yes_words, no_words)

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
        stop: Callable[[int, str], bool] | None = None,
    ) -> list[Completion]:
        """Generate, for each prompt, text held to `schema`'s JSON regex, all prompts in one batch.

        `retry(i, completion)` is called when row `i` ends an attempt; a `Decoding` it returns
        starts a new attempt of that row from its prompt, in place in the running batch (the prompt
        is not run again, the other rows do not wait), and None keeps the attempt. The result is
        each row's last attempt.

        Prompts need not share anything: each row reuses the longest stored prefix KV cache it
        starts with (the few-shot part of its prompt) and prefills only the rest, then all rows
        decode together in one left-padded batch. `stop(i, text)` is asked after each token of row
        `i` (`Completion.stopped` when it ends the attempt), so a doomed attempt frees its place early.

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
            return self._decode(logits, attention, positions, cache, attempts, ids, max_new_tokens, retry, stop)

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

    def _decode(self, logits, attention, positions, cache, attempts, ids, max_new_tokens, retry, stop) -> list[Completion]:
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
                    text = self.tokenizer.decode(attempt.tokens, skip_special_tokens=True) if stop else None
                    stopped = stop is not None and stop(r, text)
                    if len(attempt.tokens) < max_new_tokens and not stopped:
                        keep.append(i)
                        continue
                    if text is None:
                        text = self.tokenizer.decode(attempt.tokens, skip_special_tokens=True)
                    done = Completion(text, len(attempt.tokens), False, stopped)  # cut or stopped
                else:
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


# --- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """A tokenized request: its ids and the first position whose logits a score reads."""

    request: ScoreRequest
    ids: list[int]
    first_logit: int  # QL: position before the first query token; RC: the last position


class PrefixScorer:
    """Forward passes for score requests, the passage prefix computed once per passage.

    Attributes:
        forward_rows: prompts scored so far (tests count them to check that a resume redoes nothing).
        forward_tokens: tokens run through the model; `prompt_tokens`: tokens the prompts hold.
    """

    shares_prefixes = True  # score_relevance hands it prompts that share a prefix (one passage's, or a pool)

    def __init__(self, llm: TransformersLLM, yes_words: Sequence[str], no_words: Sequence[str]):
        self.llm = llm
        self.yes_ids = answer_token_ids(llm.tokenizer, yes_words)
        self.no_ids = answer_token_ids(llm.tokenizer, no_words)
        if not self.yes_ids or not self.no_ids:
            raise ScoringError(f"no single-token spelling of {list(yes_words)} or {list(no_words)} in the tokenizer")
        if set(self.yes_ids) & set(self.no_ids):
            raise ScoringError("a token counts as both yes and no")
        self._cache_arg = _cache_kwarg(llm.model)
        self.forward_rows = 0
        self.forward_tokens = 0
        self.prompt_tokens = 0

    def tokenize(self, requests: Sequence[ScoreRequest]) -> list[_Row]:
        """Token ids of each full prompt, and where its score is read (from the tokenizer's offsets)."""
        if not requests:
            return []
        add_special = not self.llm.has_chat_template  # a chat prompt holds its special tokens already
        enc = self.llm.tokenizer(
            [r.prompt for r in requests], add_special_tokens=add_special, return_offsets_mapping=True
        )
        rows = []
        for r, ids, offsets in zip(requests, enc["input_ids"], enc["offset_mapping"]):
            # Drop special tokens a tokenizer appends (an EOS): the prompt's text ends the sequence.
            while offsets and offsets[-1][1] <= offsets[-1][0]:
                ids, offsets = ids[:-1], offsets[:-1]
            if r.method == QL:
                # The query's tokens: those ending inside it (a leading space merged into the first
                # query word belongs to the query; the template text before it does not).
                first = next((i for i, (_, end) in enumerate(offsets) if end > r.target_start), len(ids))
                if first == 0 or first == len(ids):
                    raise ScoringError(f"QL prompt of {r.query_id}/{r.passage_id}: no query tokens to score")
                rows.append(_Row(r, list(ids), first - 1))
            else:
                rows.append(_Row(r, list(ids), len(ids) - 1))
        return rows

    def score_group(
        self, rows: Sequence[_Row], batch_size: int, skip: Container[str] = ()
    ) -> Iterator[dict[str, dict[str, float]]]:
        """Score rows that share a prefix (one passage's prompts, or a pool of small passages'
        after their common system turn); yields {cache key: value} per forward batch.

        The rows' common token prefix (stopping before the first position any row reads logits
        from) runs once; each batch runs only the rows' tails on a copy of its KV cache. Rows whose
        keys are in `skip` (already stored) are never run: the batches are cut from the others.
        """
        # Only the rows left to score are batched. The prefix still comes from all `rows`, and the
        # batches are cut in a fixed order, so a run resumed after a crash (which stores whole
        # batches, in order) cuts its remaining rows into exactly the batches the uninterrupted run
        # would have run next: the same floats. A run that grows (more queries, a larger top N) does
        # not re-run the stored prompts that sort into a batch with new ones (in the pool of small
        # passages, nearly every batch holds a new prompt).
        # One method per batch (an edited QL or RC prompt then leaves the other method's batches
        # cached whole), similar lengths together (less padding).
        batches = []
        todo = [r for r in rows if r.request.key not in skip]
        for method in sorted({r.request.method for r in todo}):
            ordered = sorted((r for r in todo if r.request.method == method), key=lambda r: (len(r.ids), r.request.key))
            batches += [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
        if not batches:
            return
        prefix = _common_prefix([r.ids for r in rows])[: min(r.first_logit for r in rows)]
        base_cache = self._run_prefix(prefix) if prefix else None
        for batch in batches:
            yield self._score_batch(batch, len(prefix), base_cache)

    def _run_prefix(self, prefix: list[int]) -> Any:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.model.config)
        input_ids = torch.tensor([prefix], device=self.llm.device)
        with torch.inference_mode():
            self.llm.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self.forward_tokens += len(prefix)
        return cache

    def _score_batch(self, batch: Sequence[_Row], prefix_len: int, base_cache: Any) -> dict[str, dict[str, float]]:
        import torch

        tails = [r.ids[prefix_len:] for r in batch]
        width = max(len(t) for t in tails)
        # Right padding: a causal model's real tokens never attend to the pads after them, and
        # positions stay those of the unpadded prompt, so no mask or position ids are needed.
        pad = next((t for t in (self.llm.tokenizer.pad_token_id, self.llm.tokenizer.eos_token_id) if t is not None), 0)
        input_ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=self.llm.device)
        kwargs: dict[str, Any] = {}
        if base_cache is not None:
            cache = copy.deepcopy(base_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[self._cache_arg] = cache
        # Logits only from the first position any row reads: the LM head over the whole vocabulary
        # at every position would be a large share of the cost of these short tails.
        first = min(r.first_logit for r in batch) - prefix_len
        keep = width - first
        with torch.inference_mode():
            out = self.llm.model(input_ids=input_ids, use_cache=base_cache is not None, logits_to_keep=keep, **kwargs)
        logits = out.logits  # (batch, keep, vocab): position p of a tail sits at p - first
        self.forward_rows += len(batch)
        self.forward_tokens += sum(len(t) for t in tails)
        self.prompt_tokens += sum(len(r.ids) for r in batch)
        values = {}
        for i, row in enumerate(batch):
            start = row.first_logit - prefix_len - first
            end = len(row.ids) - 1 - prefix_len - first  # the last real token's logits
            if row.request.method == QL:
                values[row.request.key] = self._ql(logits[i, start:end], row.ids[row.first_logit + 1 :])
            else:
                values[row.request.key] = self._rc(logits[i, end])
        return values

    def _ql(self, logits: "torch.Tensor", targets: list[int]) -> dict[str, float]:
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        token_lp = logprobs.gather(1, index).squeeze(1).double()
        total = float(token_lp.sum())
        return {"sum": total, "mean": total / len(targets), "tokens": len(targets)}

    def _rc(self, logits: "torch.Tensor") -> dict[str, float]:
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1).double()
        yes = float(torch.logsumexp(logprobs[self.yes_ids], dim=0))
        no = float(torch.logsumexp(logprobs[self.no_ids], dim=0))
        return {"logodds": yes - no, "log_p_yes": yes, "log_p_no": no}


def _common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    first = list(rows[0])
    n = len(first)
    for row in rows[1:]:
        n = min(n, len(row))
        for i in range(n):
            if row[i] != first[i]:
                n = i
                break
    return first[:n]
