"""Section `corpus`: how the `passages` stage reads and cuts the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import Section, under_root


class CorpusParams(Section):
    """How the `passages` stage reads and cuts the corpus."""

    path: Path = Path("data/sample/corpus.jsonl")
    # auto: by extension (.jsonl/.json -> jsonl, .csv, .parquet, a directory -> text_dir)
    format: Literal["auto", "jsonl", "csv", "parquet", "text_dir"] = "auto"
    # BEIR field names by default; other JSONL/CSV/Parquet layouts rename them here.
    id_field: str = "_id"
    title_field: str | None = "title"
    text_field: str = "text"
    max_words: int = Field(256, ge=8)
    overlap_words: int = Field(32, ge=0)
    min_words: int = Field(5, ge=1)
    on_error: Literal["fail", "skip"] = "fail"

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
