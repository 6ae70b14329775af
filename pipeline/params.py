"""Typed parameters: `params.yaml` loaded into Pydantic models.

Every section is a strict model (unknown keys are errors), so a typo in `params.yaml` fails before
any work starts, with the dotted key, the file and (when known) the line in the message.
Each pipeline stage reads one section; `base` is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file, key and line."""


class Section(BaseModel):
    """A params section: unknown keys and wrong types are rejected, never coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseParams(Section):
    seed: int = 42
    threads: int = Field(2, ge=1, le=512)
    device: Literal["auto", "cpu", "cuda"] = "auto"


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
        root = (info.context or {}).get("root")
        if root is not None:
            full = value if value.is_absolute() else Path(root) / value
            if not full.exists():
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


class Params(Section):
    base: BaseParams = BaseParams()
    corpus: CorpusParams = CorpusParams()


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a params file.

    Relative paths inside it are checked against the file's own folder.

    Raises:
        ParamsError: the file is missing, is not YAML, or any key is unknown, mistyped or out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(data, context={"root": path.parent})
    except ValidationError as err:
        raise ParamsError(_describe(err, path, text)) from None


def _describe(err: ValidationError, path: Path, text: str) -> str:
    lines = _key_lines(text)
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{where}: {key or '<top level>'}: {msg}{got}")
    return "invalid params:\n  " + "\n  ".join(problems)


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML text, for error messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                out[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(root, "")
    return out


def sql_variables(params: Params) -> dict[str, Any]:
    """Flatten params into DuckDB variable names: `select.negative` -> `select_negative`.

    Only scalars and lists of scalars are exposed; paths become strings.
    """
    out: dict[str, Any] = {}
    for section_name, section in params:
        for key, value in section:
            if isinstance(value, Path):
                value = str(value)
            if value is None or isinstance(value, (str, int, float, bool, list)):
                out[f"{section_name}_{key}"] = value
    return out
