"""Sections `encoder` and `neighbors`: the text encoder, its input format, and top-N mining."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import Section


def _template_fields(template: str) -> set[str]:
    import string

    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # unbalanced braces
        raise ValueError(f"not a str.format template: {err}") from None


class EncoderParams(Section):
    """The text encoder and the Gecko input format, shared by neighbors (mining), train and evaluate."""

    # A local transformers / sentence-transformers folder, or "minilm": the bundled all-MiniLM-L6-v2.
    model: str = "minilm"
    # Tokens kept per text; null = the model's own max_seq_length (256 for MiniLM).
    max_length: int | None = Field(None, ge=2)
    # bfloat16 = float32 weights run under autocast (faster on GPUs and AVX512-BF16 / AMX CPUs);
    # auto = bfloat16 where the device computes it natively, else float32 (resolved at load).
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    batch_size: int = Field(64, ge=1)
    # Python str.format templates (Gecko's unified format); fields: {task} {query} / {title} {text}.
    query_template: str = "task: {task} | query: {query}"
    passage_template: str = "title: {title} | text: {text}"
    empty_title: str = "none"  # written for a missing or blank title
    # false: the query template's instruction (`task: ... | query: `) is left out of mean pooling, so
    # it conditions the text through attention without being averaged into the embedding.
    pool_instruction: bool = True
    # Embeddings keyed by model fingerprint + text, outside the DVC outs; null disables the cache.
    cache_path: Path | None = Path(".fret/cache/embeddings.duckdb")

    @field_validator("query_template", "passage_template")
    @classmethod
    def _template_uses_known_fields(cls, value: str, info: ValidationInfo) -> str:
        allowed, needed = (
            ({"task", "query"}, "query") if info.field_name == "query_template" else ({"title", "text"}, "text")
        )
        fields = _template_fields(value)
        unknown = fields - allowed
        if unknown:
            raise ValueError(f"unknown template field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if needed not in fields:
            raise ValueError(f"template must contain {{{needed}}}")
        return value


class IVFParams(Section):
    """FAISS IndexIVFFlat: k-means cells over the passages; a query scans only `nprobe` of them."""

    # null: 4 x sqrt(passages), the low end of FAISS's guideline, capped at train_size / 39 (the
    # fewest points per centroid FAISS trains without warning). Set: used as given.
    nlist: int | None = Field(None, ge=1)
    nprobe: int = Field(32, ge=1)  # cells scanned per query: the recall / speed knob
    # Passages (a seeded sample, embedded first through the cache) the k-means runs on.
    train_size: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "IVFParams":
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must not exceed nlist ({self.nlist})")
        if self.nlist is not None and self.nlist > self.train_size:
            raise ValueError(f"nlist ({self.nlist}) must not exceed train_size ({self.train_size})")
        return self


class HNSWParams(Section):
    """FAISS IndexHNSWFlat: a navigable small-world graph (no training, more memory per vector)."""

    m: int = Field(32, ge=2, le=256)  # FAISS's M: links per vector; more = better recall, more memory
    ef_construction: int = Field(200, ge=1)  # candidate list while building (FAISS's efConstruction)
    ef_search: int = Field(128, ge=1)  # candidate list per query (FAISS's efSearch); raised to N if lower


class NeighborsParams(Section):
    """Top-N mining of candidate passages for each generated query: exact, or through a FAISS index."""

    top_n: int = Field(20, ge=2)  # Gecko's ablations use N = 20
    # exact: blocked matrix products (fret's own, every pair scored). faiss_flat: FAISS's exhaustive
    # IndexFlatIP (same results, see pipeline/retrieval/faiss_knn.py). faiss_ivf / faiss_hnsw: approximate.
    method: Literal["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"] = "exact"
    # Peak search memory ~ query_block_size x block_size x 20 bytes (score, sort key, index): 80 MiB.
    block_size: int = Field(4096, ge=1)
    query_block_size: int = Field(1024, ge=1)
    # Passages embedded, searched and written per step: their vectors are never all in memory at once
    # (exact keeps only each query's best N; FAISS keeps its index). 65,536 x 384 floats = 96 MiB.
    chunk_size: int = Field(65_536, ge=1)
    ivf: IVFParams = IVFParams()
    hnsw: HNSWParams = HNSWParams()
