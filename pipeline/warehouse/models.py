"""The SQL model engine: `sql/*.sql` built into one stage's DuckDB file, dbt-style.

One file = one model = one table named after the file stem. Each model is a single SELECT opening
with a one-line purpose comment. Dependencies come from the SQL itself (sqlglot scopes: every
scope's tables minus its CTE names), so there is no `ref()` and no templating; params arrive as
DuckDB variables read with `getvariable('section_key')`. `schema.yml` beside the models documents
columns and declares data tests; a failing test aborts the build before the stage file is replaced.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import sqlglot
import yaml
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError
from sqlglot.optimizer.scope import traverse_scope

from pipeline.warehouse.dag import DAG, CycleError
from pipeline.warehouse.files import WAREHOUSE_DIR, stage_files, stage_path, write_stage

SCHEMA_FILE = "schema.yml"
SHOWN_ROWS = 10
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ModelError(ValueError):
    """A model, schema.yml or data test that fails; the message names the file and what is wrong."""


@dataclass
class Model:
    name: str
    path: Path
    sql: str
    deps: tuple[str, ...]
    description: str
    # Names passed to getvariable(); checked against the params before anything is built.
    variables: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Parsing models


def find_dependencies(sql: str) -> tuple[str, ...]:
    """Tables a query reads: every scope's tables minus the CTEs visible there, sorted, lower case.

    Table functions (`read_parquet(...)`, `range(...)`, `unnest(...)`) are not tables.

    Raises:
        sqlglot.errors.SqlglotError: the SQL does not parse.
    """
    return _dependencies(_parse_query(sql))


def _parse_query(sql: str) -> exp.Query:
    statements = [s for s in sqlglot.parse(sql, dialect="duckdb") if s is not None]
    if len(statements) != 1 or not isinstance(statements[0], exp.Query):
        kinds = ", ".join(type(s).__name__.upper() for s in statements) or "nothing"
        raise ParseError(f"expected exactly one SELECT statement, found {kinds}")
    return statements[0]


def _dependencies(query: exp.Query) -> tuple[str, ...]:
    deps = set()
    for scope in traverse_scope(query):
        for table in scope.tables:
            # A table function parses as a Table wrapping the function call, not an identifier.
            if isinstance(table.this, exp.Identifier) and table.name not in scope.cte_sources:
                deps.add(table.name.lower())
    return tuple(sorted(deps))


def _variables_used(query: exp.Query) -> tuple[str, ...]:
    names = set()
    for call in query.find_all(exp.Anonymous):
        if call.name.lower() == "getvariable" and call.expressions:
            arg = call.expressions[0]
            if isinstance(arg, exp.Literal) and arg.is_string:
                names.add(arg.this)
    return tuple(sorted(names))


def parse_model(path: Path) -> Model:
    """Read one model file.

    Raises:
        ModelError: bad file name, missing purpose comment, or SQL that is not one parseable SELECT.
    """
    path = Path(path)
    name = path.stem
    if not _NAME.match(name):
        raise ModelError(f"{path}: model file names must be lower-case identifiers ([a-z_][a-z0-9_]*)")
    sql = _read_text(path)
    try:
        query = _parse_query(sql)
    except SqlglotError as err:
        raise ModelError(f"{_where(path, err)}: SQL does not parse: {_first_error(err)}") from None
    return Model(name, path, sql, _dependencies(query), _purpose(path, sql), _variables_used(query))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes().count(b"\n", 0, err.start) + 1
        raise ModelError(f"{path}:{line}: not UTF-8 (byte 0x{err.object[err.start]:02x})") from None


def _where(path: Path, err: SqlglotError) -> str:
    errors = getattr(err, "errors", None) or []
    line = errors[0].get("line") if errors else None
    return f"{path}:{line}" if line else str(path)


def _first_error(err: SqlglotError) -> str:
    errors = getattr(err, "errors", None) or []
    if errors and errors[0].get("description"):
        return errors[0]["description"]
    return str(err).splitlines()[0]


def _purpose(path: Path, sql: str) -> str:
    first = next((line.strip() for line in sql.splitlines() if line.strip()), "")
    text = first.removeprefix("--").strip() if first.startswith("--") else ""
    if not text:
        raise ModelError(f"{path}:1: a model opens with a one-line purpose comment (`-- what this table is`)")
    return text


def load_models(sql_dir: str | Path) -> list[Model]:
    """Every `*.sql` model in `sql_dir`, in build order (dependencies first, ties by name).

    Raises:
        ModelError: a model fails to parse, or models depend on each other in a cycle.
    """
    sql_dir = Path(sql_dir)
    if not sql_dir.is_dir():
        raise ModelError(f"{sql_dir}: SQL model folder not found")
    models = {m.name: m for m in (parse_model(p) for p in sorted(sql_dir.glob("*.sql")))}
    dag: DAG[str] = DAG()
    for model in models.values():
        # Only model-to-model edges order the build; upstream-stage tables already exist.
        dag.add(model.name, [d for d in model.deps if d in models])
    try:
        order = dag.sorted()
    except CycleError as err:
        files = ", ".join(models[n].path.as_posix() for n in dict.fromkeys(err.cycle))
        raise ModelError(f"{err} ({files})") from None
    return [models[name] for name in order]


# --------------------------------------------------------------------------------------------
# schema.yml


@dataclass
class DataTest:
    """One data test; its query returns the offending rows, so passing means no rows."""

    kind: str
    model: str
    column: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        target = f"{self.model}.{self.column}" if self.column else self.model
        if self.kind == "expect_empty" and self.args.get("description"):
            return f"expect_empty on {target} ({self.args['description']})"
        if self.kind == "relationships":
            return f"relationships on {target} -> {self.args['to']}.{self.args['field']}"
        return f"{self.kind} on {target}"

    def query(self) -> str:
        model, col = _quote(self.model), _quote(self.column or "")
        if self.kind == "not_null":
            return f"SELECT * FROM {model} WHERE {col} IS NULL"
        if self.kind == "unique":
            return (
                f"SELECT {col}, count(*) AS n_rows FROM {model} WHERE {col} IS NOT NULL "
                f"GROUP BY ALL HAVING count(*) > 1 ORDER BY n_rows DESC, {col}"
            )
        if self.kind == "accepted_values":
            values = ", ".join(exp.convert(v).sql("duckdb") for v in self.args["values"])
            return (
                f"SELECT {col}, count(*) AS n_rows FROM {model} WHERE {col} IS NOT NULL "
                f"AND {col} NOT IN ({values}) GROUP BY ALL ORDER BY {col}"
            )
        if self.kind == "relationships":
            parent, key = _quote(self.args["to"]), _quote(self.args["field"])
            # An ANTI JOIN, not NOT EXISTS: the same rows (a NULL parent key matches nothing either
            # way), and DuckDB plans it as one hash anti join, about 2x faster on a million-row child
            # (fused_ranks.passage_id -> passages in bench/triples.py: 0.25 -> 0.14 s).
            return (
                f"SELECT child.{col}, count(*) AS n_rows FROM {model} AS child "
                f"ANTI JOIN {parent} AS parent ON parent.{key} = child.{col} "
                f"WHERE child.{col} IS NOT NULL GROUP BY ALL ORDER BY child.{col}"
            )
        return str(self.args["sql"]).strip().rstrip(";")


@dataclass
class ModelSchema:
    name: str
    description: str = ""
    columns: dict[str, str] = field(default_factory=dict)  # column name -> description
    tests: list[DataTest] = field(default_factory=list)


_COLUMN_TESTS = {"unique": (), "not_null": (), "accepted_values": ("values",), "relationships": ("to", "field")}
_MODEL_TESTS = {"expect_empty": ("sql",)}
_OPTIONAL_ARGS = {"expect_empty": ("description",)}


def load_schema(sql_dir: str | Path, models: list[Model]) -> list[ModelSchema]:
    """Parse `sql_dir/schema.yml` (absent means no docs and no tests).

    Raises:
        ModelError: naming schema.yml, for unknown keys or tests, bad test arguments, or an entry for
            a model that has no `.sql` file.
    """
    path = Path(sql_dir) / SCHEMA_FILE
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as err:
        raise ModelError(f"{path}: not valid YAML: {err}") from None
    _check_keys(data, {"version", "models"}, path, "top level")
    known = {m.name for m in models}
    schemas = [_model_schema(entry, path, known) for entry in _as_list(data.get("models"), path, "models")]
    seen: set[str] = set()
    for schema in schemas:
        if schema.name in seen:
            raise ModelError(f"{path}: model {schema.name!r} is described twice")
        seen.add(schema.name)
    return schemas


def _model_schema(entry: Any, path: Path, known: set[str]) -> ModelSchema:
    _check_keys(entry, {"name", "description", "columns", "tests"}, path, "a models entry", required={"name"})
    name = str(entry["name"])
    where = f"model {name}"
    if name not in known:
        raise ModelError(f"{path}: {where}: no such model (no {name}.sql in {path.parent})")
    schema = ModelSchema(name, str(entry.get("description") or ""))
    for item in _as_list(entry.get("tests"), path, f"{where}: tests"):
        schema.tests.append(_data_test(item, name, None, _MODEL_TESTS, path))
    for col in _as_list(entry.get("columns"), path, f"{where}: columns"):
        _check_keys(col, {"name", "description", "tests"}, path, f"{where}: a columns entry", required={"name"})
        column = str(col["name"])
        schema.columns[column] = str(col.get("description") or "")
        for item in _as_list(col.get("tests"), path, f"{where}: column {column}: tests"):
            schema.tests.append(_data_test(item, name, column, _COLUMN_TESTS, path))
    return schema


def _data_test(item: Any, model: str, column: str | None, allowed: dict, path: Path) -> DataTest:
    """A test written as a bare name (`unique`) or a one-key mapping (`accepted_values: {values: [..]}`)."""
    where = f"model {model}" + (f": column {column}" if column else "")
    if isinstance(item, str):
        kind, args = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        kind, args = next(iter(item.items()))
        args = {} if args is None else args
    else:
        raise ModelError(f"{path}: {where}: a test is a name or a one-key mapping, got {item!r}")
    if kind not in allowed:
        level = "column" if column else "model"
        raise ModelError(f"{path}: {where}: unknown {level}-level test {kind!r} (known: {', '.join(allowed)})")
    required = set(allowed[kind])
    _check_keys(args, required | set(_OPTIONAL_ARGS.get(kind, ())), path, f"{where}: {kind}", required)
    _check_test_args(kind, args, path, where)
    return DataTest(kind, model, column, dict(args))


def _check_test_args(kind: str, args: dict, path: Path, where: str) -> None:
    if kind == "accepted_values" and not (isinstance(args["values"], list) and args["values"]):
        raise ModelError(f"{path}: {where}: accepted_values needs a non-empty list `values`")
    if kind == "relationships" and not all(isinstance(args[k], str) for k in ("to", "field")):
        raise ModelError(f"{path}: {where}: relationships needs `to: <table>` and `field: <column>`")
    if kind == "expect_empty":
        try:
            _parse_query(str(args["sql"]))
        except SqlglotError as err:
            raise ModelError(f"{path}: {where}: expect_empty sql does not parse: {_first_error(err)}") from None


def _check_keys(value: Any, allowed: set[str], path: Path, where: str, required: set[str] = frozenset()) -> None:
    if not isinstance(value, dict):
        raise ModelError(f"{path}: {where}: expected a mapping, got {value!r}")
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ModelError(f"{path}: {where}: unknown key(s) {', '.join(unknown)} (allowed: {known})")
    missing = sorted(required - set(value))
    if missing:
        raise ModelError(f"{path}: {where}: missing key(s) {', '.join(missing)}")


def _as_list(value: Any, path: Path, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ModelError(f"{path}: {where}: expected a list, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Building


@dataclass
class BuiltModel:
    name: str
    rows: int
    seconds: float


@dataclass
class BuildResult:
    stage_file: Path
    models: list[BuiltModel]
    tests_passed: int
    seconds: float

    def summary(self) -> str:
        if not self.models:
            return f"no SQL models: wrote an empty {self.stage_file}"
        width = max(len(m.name) for m in self.models)
        lines = [f"built {len(self.models)} model(s) into {self.stage_file} in {self.seconds:.2f} s"]
        lines += [f"  {m.name:<{width}}  {m.rows:>10,} rows  {m.seconds:6.2f} s" for m in self.models]
        lines.append(f"data tests: {self.tests_passed} passed")
        return "\n".join(lines)


def build_models(
    sql_dir: str | Path,
    stage: str = "triples",
    variables: dict[str, Any] | None = None,
    warehouse: Path = WAREHOUSE_DIR,
    upstream: list[str] | None = None,
) -> BuildResult:
    """Build every model of `sql_dir` into `warehouse/<stage>.duckdb`, then run schema.yml's tests.

    Args:
        variables: set as DuckDB variables first (`params.sql_variables` gives `section_key` names).
        upstream: stages attached read-only; default every other stage file in `warehouse`.

    Raises:
        ModelError: a model or schema.yml is invalid, SQL fails, or a data test finds bad rows; the
            stage file is then left exactly as it was.
        pipeline.warehouse.WarehouseError: an upstream stage file is missing or unreadable.
    """
    started = time.perf_counter()
    models = load_models(sql_dir)
    schemas = load_schema(sql_dir, models)
    variables = dict(variables or {})
    if upstream is None:
        upstream = [s for s in stage_files(warehouse) if s != stage]
    if stage in upstream:
        raise ModelError(f"stage {stage!r} cannot read its own file as upstream")
    with write_stage(stage, upstream, warehouse) as con:
        built, passed = build_into(con, sql_dir, models, schemas, variables)
    return BuildResult(stage_path(stage, warehouse), built, passed, time.perf_counter() - started)


def build_into(
    con: duckdb.DuckDBPyConnection,
    sql_dir: str | Path,
    models: list[Model],
    schemas: list[ModelSchema],
    variables: dict[str, Any],
) -> tuple[list[BuiltModel], int]:
    """Build `models` as tables of `con` and run their data tests; returns (built models, tests passed).

    Every getvariable() name must be in `variables` (checked first). `con` already exposes the upstream tables (write_stage does that for a stage file; bench/triples.py
    passes an in-memory connection to time the SQL without the write to disk).

    Raises:
        ModelError: as build_models.
    """
    schema_path = Path(sql_dir) / SCHEMA_FILE
    _check_variables(models, variables)
    _check_references(con, models, schemas, schema_path)
    _set_variables(con, variables)
    built = [_build_one(con, model) for model in models]
    _check_columns(con, schemas, schema_path)
    return built, _run_tests(con, [t for s in schemas for t in s.tests], schema_path)


def _check_variables(models: list[Model], variables: dict[str, Any]) -> None:
    # An unset DuckDB variable reads as NULL, which would silently empty a filter: refuse instead.
    for model in models:
        missing = [v for v in model.variables if v not in variables]
        if missing:
            known = ", ".join(sorted(variables)) or "none"
            raise ModelError(f"{model.path}: getvariable({missing[0]!r}) names no param (known: {known})")
    for name in variables:
        if not _VARIABLE.match(name):
            raise ModelError(f"variable name {name!r} is not an identifier")


def _set_variables(con: duckdb.DuckDBPyConnection, variables: dict[str, Any]) -> None:
    for name, value in variables.items():
        try:
            con.execute(f"SET VARIABLE {_quote(name)} = ?", [value])
        except duckdb.Error as err:
            raise ModelError(f"variable {name} = {value!r}: DuckDB cannot hold it: {err}") from None


def _check_references(
    con: duckdb.DuckDBPyConnection, models: list[Model], schemas: list[ModelSchema], schema_path: Path
) -> None:
    """Every table a model or relationships test reads exists, and no model shadows an upstream table."""
    # write_stage exposes each upstream table as a temporary view of the same bare name.
    views = con.execute("SELECT view_name FROM duckdb_views() WHERE temporary AND NOT internal").fetchall()
    upstream = {name for (name,) in views}
    names = {m.name for m in models}
    for model in models:
        if model.name in upstream:
            raise ModelError(f"{model.path}: model {model.name} has the name of an upstream table; rename it")
        unknown = [d for d in model.deps if d not in names and d not in upstream]
        if unknown:
            raise ModelError(
                f"{model.path}: reads unknown table {unknown[0]!r} (neither a model in {model.path.parent} "
                f"nor a table of an upstream stage)"
            )
    for schema in schemas:
        for test in schema.tests:
            if test.kind == "relationships" and test.args["to"] not in names | upstream:
                raise ModelError(f"{schema_path}: {test.label()}: unknown table {test.args['to']!r}")


def _build_one(con: duckdb.DuckDBPyConnection, model: Model) -> BuiltModel:
    started = time.perf_counter()
    try:
        # The file's own text runs, not sqlglot's re-rendering, so DuckDB semantics stay exact.
        con.execute(f"CREATE TABLE {_quote(model.name)} AS\n{model.sql}\n")
    except duckdb.Error as err:
        raise ModelError(f"{model.path}: DuckDB failed to build {model.name}: {err}") from None
    rows = con.execute(f"SELECT count(*) FROM {_quote(model.name)}").fetchone()[0]
    return BuiltModel(model.name, rows, time.perf_counter() - started)


def _check_columns(con: duckdb.DuckDBPyConnection, schemas: list[ModelSchema], schema_path: Path) -> None:
    for schema in schemas:
        actual = [d[0] for d in con.execute(f"SELECT * FROM {_quote(schema.name)} LIMIT 0").description]
        lowered = {c.lower() for c in actual}
        unknown = [c for c in schema.columns if c.lower() not in lowered]
        if unknown:
            raise ModelError(
                f"{schema_path}: model {schema.name}: unknown column {unknown[0]!r} (columns: {', '.join(actual)})"
            )


def _run_tests(con: duckdb.DuckDBPyConnection, tests: list[DataTest], schema_path: Path) -> int:
    """Run every test, then fail once listing all failures, so one build shows every problem."""
    failures = [msg for msg in (_run_test(con, t, schema_path) for t in tests) if msg]
    if failures:
        summary = f"{schema_path}: {len(failures)} of {len(tests)} data test(s) failed:\n"
        raise ModelError(summary + "\n".join(failures))
    return len(tests)


def _run_test(con: duckdb.DuckDBPyConnection, test: DataTest, schema_path: Path) -> str | None:
    query = test.query()
    try:
        total = con.execute(f"SELECT count(*) FROM (\n{query}\n)").fetchone()[0]
        if not total:
            return None
        cursor = con.execute(f"SELECT * FROM (\n{query}\n) LIMIT {SHOWN_ROWS}")
        header = [d[0] for d in cursor.description]
        rows = cursor.fetchall()
    except duckdb.Error as err:
        raise ModelError(f"{schema_path}: {test.label()}: the test query failed: {err}") from None
    shown = "\n".join("    " + ", ".join(f"{h}={v!r}" for h, v in zip(header, row)) for row in rows)
    more = f"\n    ... and {total - len(rows)} more" if total > len(rows) else ""
    return f"  FAIL {test.label()}: {total} offending row(s)\n{shown}{more}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
