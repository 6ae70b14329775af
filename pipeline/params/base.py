"""The base of every params section: strict models, the error type, helpers the sections share, `base`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file, key and line."""


class Section(BaseModel):
    """A params section: unknown keys and wrong types are rejected, never coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def under_root(path: Path, info: ValidationInfo) -> Path | None:
    """`path` resolved against the params file's folder; None when validating without a file."""
    root = (info.context or {}).get("root")
    if root is None:
        return None
    return path if path.is_absolute() else Path(root) / path


def sources_as_list(value: Any, key: str) -> Any:
    """A list of sources written as one mapping, a list of mappings or null (`train.mix`, `generate.examples`)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{key} must be a mapping (one source), a list of mappings, or null")
    return value


# The query-side task of the bundled sample (SciFact claims): the default of every setting that reads data/sample.
SAMPLE_TASK = "Given a scientific claim, retrieve documents that support or refute the claim"


class BaseParams(Section):
    """Settings every stage shares."""

    seed: int = Field(
        42, description="Every random choice (task types, samples, negatives, initialisation) derives from it."
    )
    threads: int = Field(2, ge=1, le=512, description="Torch threads per stage.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else the CPU."
    )
