"""Every parameter documented from the code: its key, type, default and description, walked from the
models (a field added with `Field(description=...)` shows up by itself). `fret params` prints them
with the effective values; `fret params --markdown` writes docs/params.md.
"""

from __future__ import annotations

import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from pipeline.params.base import Section
from pipeline.params.gecko import GECKO
from pipeline.params.loading import Params

# Keys inside a list or a mapping of sets have no one effective value: their path says which.
LIST_ITEM, SET_NAME = "[]", "<name>"
NO_VALUE = object()
CONSTRAINTS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))


@dataclass(frozen=True)
class ParamKey:
    """One documented key: a field, or a nested section (whose keys follow it)."""

    path: str  # dotted: "neighbors.ivf.nprobe", "train.mix[].path", "eval.retrieval.<name>.task"
    type: str
    default: Any  # as JSON; None when required
    description: str
    section: bool = False
    required: bool = False


def param_keys(model: type[Section] = Params, prefix: str = "") -> Iterator[ParamKey]:
    """Every key of `model` in field order, nested sections walked (a list's items as `[]`, a mapping's
    values as `<name>`)."""
    for name, info in model.model_fields.items():
        path, annotation = prefix + name, _strip(info.annotation)
        nested = _nested_section(annotation)
        if nested is annotation:  # a section of its own, described by its docstring
            yield ParamKey(path, "section", None, info.description or section_doc(nested), section=True)
            yield from param_keys(nested, path + ".")
            continue
        yield ParamKey(path, _type_text(info), _default(info), info.description or "", required=info.is_required())
        if nested is None:
            continue
        origin = typing.get_origin(annotation)
        if origin in (list, dict):
            item = path + (LIST_ITEM if origin is list else f".{SET_NAME}")
            yield ParamKey(item, "section", None, section_doc(nested), section=True)
            yield from param_keys(nested, item + ".")
        else:  # a union with a section among its members (select.weights): its keys follow the field's row
            yield from param_keys(nested, path + ".")


def section_doc(model: type[Section]) -> str:
    """A section's description: its docstring, one paragraph."""
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


def differing_defaults(shipped: Params) -> dict[str, tuple[Any, Any]]:
    """Key -> (code default, value in `shipped`) for every key whose value differs, compared as JSON.
    Nested sections are walked key by key; a list, a mapping or a union is one value."""
    return _differences(Params(), shipped, "")


def _differences(code: Section, shipped: Section, prefix: str) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for name, info in type(code).model_fields.items():
        ours, theirs = getattr(code, name), getattr(shipped, name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            out |= _differences(ours, theirs, f"{prefix}{name}.")
        elif to_jsonable_python(ours) != to_jsonable_python(theirs):
            out[prefix + name] = (to_jsonable_python(ours), to_jsonable_python(theirs))
    return out


def describe(params: Params) -> str:
    """Each key with its value in `params` (and the code default where that differs) and its description,
    for a terminal."""
    values = params.model_dump(mode="json")
    lines = []
    for key in param_keys():
        if key.section:
            lines += ["", f"[{key.path}]", *_wrapped(key.description)]
            continue
        value = _value_at(values, key.path)
        if value is not NO_VALUE:
            head = f"{key.path}: {yaml_value(value)}"
            if value != key.default:
                head += f"  (code default: {yaml_value(key.default)})"
        else:
            head = f"{key.path}  ({'required' if key.required else 'default: ' + yaml_value(key.default)})"
        lines += [head, *_wrapped(key.description)]
    return "\n".join(lines).strip()


def markdown(shipped: Params) -> str:
    """docs/params.md: one table per section, keys as the code defines them; a key whose value in
    `shipped` (the repository's params.yaml) differs from the code default says so, with GECKO's why."""
    diffs = differing_defaults(shipped)
    out = [
        "# Parameters",
        "",
        "Every key of `params.yaml`, generated from the code (`pipeline/params/`) by "
        "`fret params --markdown > docs/params.md`: edit the descriptions there, not here. "
        "`fret params` prints the same with your file's values. A key left out of `params.yaml` takes its default.",
    ]
    for key in param_keys():
        if key.section and "." not in key.path:
            out += ["", f"## {key.path}", "", _cell(key.description), "", "| key | type | default | description |",
                    "|---|---|---|---|"]  # fmt: skip
            continue
        default = "" if key.section else "(required)" if key.required else f"`{yaml_value(key.default)}`"
        text = key.description
        if key.path in diffs:
            why = f": the default is the Gecko paper's setting; {GECKO[key.path].why}" if key.path in GECKO else ""
            text += f" **params.yaml ships `{yaml_value(diffs[key.path][1])}`{why}**"
        out.append(f"| `{key.path}` | {_cell(key.type)} | {_cell(default)} | {_cell(text)} |")
    return "\n".join(out) + "\n"


def yaml_value(value: Any) -> str:
    """`value` as one line of YAML flow style, as params.yaml would write it."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10**9, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def _value_at(data: dict[str, Any], path: str) -> Any:
    """The value at a dotted `path` of dumped params; NO_VALUE inside a list or a mapping of sets."""
    if LIST_ITEM in path or SET_NAME in path:
        return NO_VALUE
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return NO_VALUE  # e.g. select.weights.ql when select.weights is `judge`
        data = data[part]
    return data


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, 100, initial_indent="    ", subsequent_indent="    ")


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell: pipes escaped, and `<` outside code spans, which would
    otherwise open an HTML tag (`qrels/<split>.tsv`)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _default(info: FieldInfo) -> Any:
    return None if info.is_required() else to_jsonable_python(info.get_default(call_default_factory=True))


def _strip(annotation: Any) -> Any:
    """`annotation` without Annotated's metadata."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> tuple[Any, ...]:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(_strip(a) for a in typing.get_args(annotation))
    return (annotation,)


def _nested_section(annotation: Any) -> type[Section] | None:
    """The section a field holds: itself, a list's items, a mapping's values, or a union's member."""
    for member in _members(annotation):
        candidates = typing.get_args(member)[-1:] if typing.get_origin(member) in (list, dict) else (member,)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, Section):
                return candidate
    return None


def _type_text(info: FieldInfo) -> str:
    text = " | ".join(_member_text(m) for m in _members(info.annotation))
    bounds = [f"{sign} {getattr(m, attr)}" for m in info.metadata for attr, sign in CONSTRAINTS if hasattr(m, attr)]
    return ", ".join([text, *bounds])


def _member_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is list:
        return f"list of {_member_text(_strip(args[0]))}"
    if origin is dict:
        return f"mapping of name to {_member_text(_strip(args[1]))}"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))

