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

    model: str = Field(
        "minilm",
        description="minilm: the bundled all-MiniLM-L6-v2; else a local sentence-transformers or BERT model folder.",
    )
    max_length: int | None = Field(
        None, ge=2, description="Tokens kept per text; null: the model's own max_seq_length (256 for MiniLM)."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16: float32 weights run under autocast (faster on GPUs and AVX512-BF16 / AMX CPUs); "
        "auto: bfloat16 where the device computes it natively, else float32 (resolved when the model loads).",
    )
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    query_template: str = Field(
        "task: {task} | query: {query}",
        description="A query's text as the encoder reads it: a str.format template of {task} and {query} "
        "(Gecko's unified format).",
    )
    passage_template: str = Field(
        "title: {title} | text: {text}",
        description="A passage's text as the encoder reads it: a str.format template of {title} and {text}.",
    )
    empty_title: str = Field("none", description="Written in place of a missing or blank title.")
    pool_instruction: bool = Field(
        False,
        description="false: the query template's instruction (`task: ... | query: `) conditions the text through "
        "attention but is left out of the mean pooling (as INSTRUCTOR does; sentence-transformers' "
        "include_prompt: false), which scored better on the dev splits measured (docs/levers.md); true: every "
        "token is pooled.",
    )
    cache_path: Path | None = Field(
        Path(".fret/cache/embeddings.duckdb"),
        description="Embeddings keyed by model fingerprint and text, outside the DVC outs; null disables the cache.",
    )

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
    """FAISS IndexIVFFlat (`neighbors.method: faiss_ivf`): k-means cells over the passages; a query scans only
    `nprobe` of them."""

    nlist: int | None = Field(
        None,
        ge=1,
        description="k-means cells. null: 4 x sqrt(passages), the low end of FAISS's guideline, capped at "
        "train_size / 39 (the fewest points per centroid FAISS trains on without a warning).",
    )
    nprobe: int = Field(32, ge=1, description="Cells scanned per query: the recall / speed knob.")
    train_size: int = Field(
        100_000,
        ge=1,
        description="Passages the k-means trains on: a sample seeded by base.seed, embedded first (through the cache).",
    )

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "IVFParams":
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must not exceed nlist ({self.nlist})")
        if self.nlist is not None and self.nlist > self.train_size:
            raise ValueError(f"nlist ({self.nlist}) must not exceed train_size ({self.train_size})")
        return self


class HNSWParams(Section):
    """FAISS IndexHNSWFlat (`neighbors.method: faiss_hnsw`): a navigable small-world graph; no training, more
    memory per vector, and a build that is not deterministic with base.threads above 1."""

    m: int = Field(32, ge=2, le=256, description="Links per vector (FAISS's M): more recall, more memory.")
    ef_construction: int = Field(200, ge=1, description="Candidate list while building (FAISS's efConstruction).")
    ef_search: int = Field(
        128, ge=1, description="Candidate list per query (FAISS's efSearch): recall vs speed; raised to top_n if lower."
    )


class BM25Params(Section):
    """The lexical teacher (pipeline/retrieval/bm25.py): BM25 over the passages' title and text, Porter-stemmed,
    Lucene's English stopwords removed (bm25s)."""

    k1: float = Field(0.9, gt=0, description="Term-frequency saturation; 0.9 with b 0.4 is BEIR's setting.")
    b: float = Field(0.4, ge=0, le=1, description="Length normalisation: 0 none, 1 full.")
    top_n: int = Field(
        0,
        ge=0,
        description="Hybrid mining: each query's top_n passages by BM25 join the encoder's top N (a union, as "
        "InPars and DPR mine with BM25); 0: the encoder's candidates only (BM25 still ranks them, bm25_rank).",
    )


class NeighborsParams(Section):
    """Stage `neighbors`: each generated query's top N passages by cosine, exact or through a FAISS index."""

    top_n: int = Field(
        10,
        ge=2,
        description="Candidates mined per query, each scored by the LLM (llm_scores) and fused into the ranking "
        "that picks positive and negatives. Gecko's ablations use 20; 10 halves the LLM's scoring (llm_scores, "
        "judge) and ranked as well on dev data.",
    )
    method: Literal["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"] = Field(
        "exact",
        description="exact: blocked matrix products, every pair scored; faiss_flat: FAISS's exhaustive IndexFlatIP "
        "(the same lists); faiss_ivf, faiss_hnsw: approximate indexes for large corpora (see ivf, hnsw).",
    )
    # Peak search memory ~ query_block_size x block_size x 20 bytes (score, sort key, index): 80 MiB.
    block_size: int = Field(4096, ge=1, description="exact: passages per block of the matrix product.")
    query_block_size: int = Field(1024, ge=1, description="Queries per block (exact) or per FAISS search call.")
    chunk_size: int = Field(
        65_536,
        ge=1,
        description="Passages embedded, searched and written per step, so their vectors are never all in memory "
        "at once (exact keeps each query's best N, FAISS its index): 65,536 x 384 floats take 96 MiB.",
    )
    ivf: IVFParams = IVFParams()
    hnsw: HNSWParams = HNSWParams()
    # Every mined pair also gets its BM25 rank and score among the query's candidates (bm25_rank,
    # bm25_score) and how it was mined (mined_by); a union with BM25's own top passages when top_n > 0.
    bm25: BM25Params = BM25Params()
