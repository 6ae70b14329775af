"""The whole params file: `Params` (one field per section), loading it with errors that name file,
key and line, and the flat variables SQL reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, ValidationInfo, model_validator

from pipeline.params.base import BaseParams, ParamsError, Section
from pipeline.params.corpus import CorpusParams
from pipeline.params.evaluation import EvalParams
from pipeline.params.llm import GenerateParams, JudgeParams, LLMParams, ScoreParams
from pipeline.params.retrieval import EncoderParams, NeighborsParams
from pipeline.params.selection import SelectParams
from pipeline.params.training import TrainParams


PARAMS_FILE = "params.yaml"


class Params(Section):
    """The whole params file: one section per stage, plus `base` (each section's docstring describes it)."""

    base: BaseParams = BaseParams()
    corpus: CorpusParams = CorpusParams()
    llm: LLMParams = LLMParams()
    generate: GenerateParams = GenerateParams()
    score: ScoreParams = ScoreParams()
    judge: JudgeParams = JudgeParams()
    encoder: EncoderParams = EncoderParams()
    neighbors: NeighborsParams = NeighborsParams()
    select: SelectParams = SelectParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()

    @model_validator(mode="after")
    def _dev_sets_disjoint_from_mix(self, info: ValidationInfo) -> "Params":
        # A classification dev set (holdout) scores texts the mix must not train on: same file, same share.
        root = Path((info.context or {}).get("root") or ".")
        sources = {(root / m.path).resolve(): m for m in self.train.mix if m.kind == "classification"}
        for name, dev_set in self.eval.classification.items():
            source = sources.get((root / dev_set.path / "train.tsv").resolve())
            if dev_set.holdout > 0 and source is not None and source.holdout != dev_set.holdout:
                raise ValueError(
                    f"eval.classification.{name} scores the held-out {dev_set.holdout:g} of {source.path}, but train.mix "
                    f"holds out {source.holdout:g} of it: set the same holdout on both, or the model trains on the dev set"
                )
        return self


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


def load_stage_params(stage: str, path: str | Path = PARAMS_FILE) -> Params:
    """`load_params` for a stage script: a bad params file ends the process with one
    `stage: message` line (file, line and key named) for DVC's log, instead of a traceback."""
    try:
        return load_params(path)
    except ParamsError as err:
        raise SystemExit(f"{stage}: {err}") from None


def _describe(err: ValidationError, path: Path, text: str) -> str:
    lines = _key_lines(text)
    problems = []
    for e in err.errors():
        # Tags of a discriminated union ("<numbers>") are pydantic's bookkeeping, not keys in the file.
        loc = [p for p in e["loc"] if not str(p).startswith("<")]
        if 0 in loc and ".".join(str(p) for p in loc[: loc.index(0) + 1]) not in lines:
            del loc[loc.index(0)]  # train.mix written as one mapping is checked as a list of one: name it as written
        key = ".".join(str(p) for p in loc)
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
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                out[f"{prefix}.{index}"] = item.start_mark.line + 1
                walk(item, f"{prefix}.{index}")

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
            scalars = (str, int, float, bool)
            if value is None or isinstance(value, scalars):
                out[f"{section_name}_{key}"] = value
            elif isinstance(value, list) and all(isinstance(v, scalars) for v in value):
                out[f"{section_name}_{key}"] = value
            # Anything else (train.mix's list of sources, nested sections) has no DuckDB type: SQL never reads it.
    # select.weights may say `judge`: resolved to numbers here, so SQL always reads select_weights_ql etc.
    out.pop("select_weights", None)
    weights = params.select.fusion_weights(params.judge.metrics_path)
    out |= {f"select_weights_{name}": value for name, value in weights}
    return out
