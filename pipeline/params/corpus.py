"""Section `corpus`: how the `passages` stage reads and cuts the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import Section, under_root


class CorpusParams(Section):
    """Stage `passages`: how the corpus is read and cut into passages."""

    path: Path = Field(
        Path("data/sample/corpus.jsonl"),
        description="The corpus: a BEIR corpus.jsonl, a JSONL, CSV or Parquet file, or a folder of .txt/.md files.",
    )
    format: Literal["auto", "jsonl", "csv", "parquet", "text_dir"] = Field(
        "auto", description="auto: by extension (.jsonl/.json: jsonl, .csv, .parquet; a folder: text_dir)."
    )
    id_field: str = Field(
        "_id", description="The document id's field (BEIR's names by default; rename them for other layouts)."
    )
    title_field: str | None = Field("title", description="The title's field; null: the documents have no title.")
    text_field: str = Field("text", description="The text's field.")
    max_words: int = Field(
        256, ge=8, description="Longer documents are split into overlapping passages of at most this many words."
    )
    overlap_words: int = Field(32, ge=0, description="Words two consecutive passages of a document share.")
    min_words: int = Field(5, ge=1, description="Shorter passages are dropped (counted in table ingest_report).")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="A bad record: fail stops at the first one, naming file and line; skip counts it in ingest_report.",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path, info: ValidationInfo) -> Path:
        full = under_root(value, info)
        if full is not None and not full.exists():
            raise ValueError(f"corpus file or folder not found: {full}")
        return value

    @model_validator(mode="after")
    def _overlap_below_max(self) -> "CorpusParams":
        if self.overlap_words >= self.max_words:
            raise ValueError(
                f"overlap_words ({self.overlap_words}) must be smaller than max_words ({self.max_words})"
            )
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        return self
