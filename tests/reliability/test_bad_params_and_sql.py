"""Bad params, bad SQL models and `fret sql` write attempts: refused before any work, naming the culprit.

- Params: every field of every section (nested sections too), found by walking `Params`, gets a
  value of the wrong type; `load_params` must name `section.key` with the file and line, and every
  stage must stop on it before doing any work.
- SQL models: syntax error, cycle, unknown table, not a SELECT, undecodable file, failing SQL...:
  `fret build` names the file and leaves the stage file byte-identical.
- `fret sql`: every way to write (including EXPLAIN ANALYZE, which executes its statement) is
  refused, while reads of every table of every stage work.
(tests/test_params.py, tests/test_models.py and tests/test_sql_cli.py have fixed examples; this
covers every field and the cases they miss.)
"""

from __future__ import annotations

import importlib
import types
import typing
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner
from conftest import file_digests

from pipeline import warehouse as wh
from pipeline.cli import main as fret
from pipeline.params import Params, ParamsError, Section, load_params

# --- params ---------------------------------------------------------------------------------------

# Valid values for the required fields of nested sections, so only the field under test is wrong.
NESTED_BASE = {"train.mix": {"path": "mix.tsv"}, "eval.retrieval.set": {"path": "evalset", "task": "find it"}}


def _is_list(annotation) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        typing.get_origin(a) is list for a in typing.get_args(annotation)
    )


def _section_type(annotation) -> type[Section] | None:
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, Section):
            return a
        if typing.get_origin(a) is dict and issubclass(typing.get_args(a)[1], Section):
            return typing.get_args(a)[1]
    return None


def every_field(model: type[Section] = Params, prefix: tuple[str, ...] = ()):
    """(dotted path as a tuple, annotation) of every leaf field, nested sections walked."""
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        nested = _section_type(info.annotation)
        if nested is not None and model is not Params:  # mix: MixParams | None; retrieval: dict[str, EvalSetParams]
            if typing.get_origin(info.annotation) is dict:
                path = path + ("set",)
            yield path, info.annotation  # the nested section itself, given a wrong type
            yield from every_field(nested, path)
        elif nested is not None:
            yield from every_field(nested, path)
        else:
            yield path, info.annotation


FIELDS = list(every_field())


def wrong_value(annotation):
    """A value no field of this annotation accepts: a string for lists, a list for everything else."""
    return "not-a-list" if _is_list(annotation) else ["a", "list"]


def params_text(path: tuple[str, ...], value) -> str:
    data: dict = {}
    for depth in range(2, len(path)):
        base = NESTED_BASE.get(".".join(path[:depth]))
        if base is not None:
            node = data
            for key in path[: depth - 1]:
                node = node.setdefault(key, {})
            node[path[depth - 1]] = dict(base)
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return yaml.safe_dump(data, sort_keys=False)


def test_the_walk_finds_every_section_and_nested_field():
    dotted = {".".join(p) for p, _ in FIELDS}
    assert {p.split(".")[0] for p in dotted} == set(Params.model_fields)
    assert {"base.seed", "generate.max_failure_rate", "train.mix.fraction", "eval.retrieval.set.task"} <= dotted
    assert len(dotted) == len(FIELDS) > 60


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "mix.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t5\n")
    (tmp_path / "evalset" / "qrels").mkdir(parents=True)
    (tmp_path / "evalset" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    return tmp_path


@pytest.mark.parametrize("path", [p for p, _ in FIELDS], ids=[".".join(p) for p, _ in FIELDS])
def test_every_field_with_a_wrong_type_is_rejected_naming_file_key_and_line(path, project):
    annotation = dict(FIELDS)[path]
    file = project / "params.yaml"
    file.write_text(params_text(path, wrong_value(annotation)))
    with pytest.raises(ParamsError) as info:
        load_params(file)
    message = str(info.value)
    line = len(path)  # one YAML line per nesting level: the bad key sits on line len(path)
    if any(".".join(path[:d]) in NESTED_BASE for d in range(2, len(path))):
        line = next(i + 1 for i, text in enumerate(file.read_text().splitlines()) if text.strip().startswith(path[-1] + ":"))
    assert f"{file}:{line}: {'.'.join(path)}" in message, message


STAGES = ["passages", "queries", "neighbors", "llm_scores", "train", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_stops_on_bad_params_before_any_work(stage, project, monkeypatch):
    """Each stage, given each bad field, exits naming it, and has touched nothing."""
    from pipeline import ingest, llm
    from pipeline.retrieval import encoder

    def no_work(*args, **kwargs):
        raise AssertionError("work started despite bad params")

    for module, name in [(llm, "load_llm"), (encoder.Encoder, "load"), (ingest, "ingest_corpus")]:
        monkeypatch.setattr(module, name, no_work)
    module = importlib.import_module(f"python_steps.{stage}")
    if hasattr(module, "ingest_corpus"):
        monkeypatch.setattr(module, "ingest_corpus", no_work)
    monkeypatch.chdir(project)
    Path("params.yaml").write_text("")
    before = sorted(p.name for p in project.iterdir())
    for path, annotation in FIELDS:
        Path("params.yaml").write_text(params_text(path, wrong_value(annotation)))
        with pytest.raises(SystemExit) as info:
            module.main() if stage != "evaluate" else module.main([])
        assert f"{stage}: invalid params" in str(info.value) and ".".join(path) in str(info.value)
    assert sorted(p.name for p in project.iterdir()) == before  # no warehouse/, cache/, models/, dvclive/


# --- SQL models -----------------------------------------------------------------------------------

GOOD_MODEL = "-- the passages, renamed\nselect passage_id as id from passages\n"
BAD_MODELS = {
    "syntax": ({"broken.sql": "-- broken\nselect from where (\n"}, "broken.sql", "does not parse"),
    "cycle": ({"a.sql": "-- a\nselect * from b\n", "b.sql": "-- b\nselect * from a\n"}, "a.sql", "dependency cycle: a -> b -> a"),
    "unknown_table": ({"lost.sql": "-- lost\nselect * from nowhere\n"}, "lost.sql", "unknown table 'nowhere'"),
    "not_a_select": ({"ins.sql": "-- ins\ninsert into passages values (1)\n"}, "ins.sql", "exactly one SELECT"),
    "two_statements": ({"two.sql": "-- two\nselect 1 as x; select 2 as y\n"}, "two.sql", "exactly one SELECT"),
    "no_purpose": ({"bare.sql": "select 1 as x\n"}, "bare.sql", "purpose comment"),
    "empty": ({"void.sql": ""}, "void.sql", ""),
    "runtime": ({"cast.sql": "-- cast\nselect cast('x' as integer) as n\n"}, "cast.sql", "DuckDB failed to build cast"),
    "unknown_variable": ({"var.sql": "-- var\nselect getvariable('nope_nope') as v\n"}, "var.sql", "getvariable('nope_nope')"),
    "bad_name": ({"Bad-Name.sql": "-- x\nselect 1 as x\n"}, "Bad-Name.sql", "lower-case identifiers"),
    "not_utf8": ({"latin.sql": b"-- caf\xe9\nselect 1 as x\n"}, "latin.sql", "UTF-8"),
    "schema_not_utf8": ({"ok.sql": GOOD_MODEL, "schema.yml": b"version: 2\n# caf\xe9\n"}, "schema.yml", "UTF-8"),
    "schema_unknown_model": ({"ok.sql": GOOD_MODEL, "schema.yml": "models:\n  - name: ghost\n"}, "schema.yml", "ghost"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_sql_models_name_the_file_and_keep_the_stage_file(case, tmp_path):
    files, culprit, message = BAD_MODELS[case]
    warehouse, sql_dir = tmp_path / "warehouse", tmp_path / "sql"
    with wh.write_stage("passages", warehouse=warehouse) as con:
        wh.write_table(con, "passages", pa.table({"passage_id": ["p1", "p2"]}))
    sql_dir.mkdir()
    (sql_dir / "ok.sql").write_text(GOOD_MODEL)
    params = tmp_path / "params.yaml"
    params.write_text("base: {seed: 1}\n")
    args = ["build", "--sql-dir", str(sql_dir), "--warehouse", str(warehouse), "--params", str(params)]
    assert CliRunner().invoke(fret, args).exit_code == 0  # a previous good build
    before = file_digests(warehouse)
    (sql_dir / "ok.sql").unlink()
    for name, text in files.items():
        (sql_dir / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(fret, args)
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert f"{sql_dir / culprit}" in result.output and message in result.output, result.output
    assert file_digests(warehouse) == before  # the previous triples.duckdb, byte for byte; no debris


# --- fret sql -------------------------------------------------------------------------------------


@pytest.fixture()
def warehouse(tmp_path):
    root = tmp_path / "warehouse"
    tables = {
        "passages": {"passages": pa.table({"passage_id": ["p1", "p2"], "text": ["a", "b"]}),
                     "ingest_report": pa.table({"metric": ["files"], "count": [1]})},
        "queries": {"queries": pa.table({"query_id": ["q1"], "passage_id": ["p1"]}),
                    "generation_failures": pa.table({"passage_id": pa.array([], pa.string())})},
        "odd": {"weird name": pa.table({"x": [1, 2, 3]}), "select": pa.table({"from": [4]})},
    }  # fmt: skip
    for stage, named in tables.items():
        with wh.write_stage(stage, warehouse=root) as con:
            for name, table in named.items():
                wh.write_table(con, name, table)
    return root


def sql(query: str, warehouse: Path):
    return CliRunner().invoke(fret, ["sql", "--warehouse", str(warehouse), "--format", "csv", "--", query])


REFUSED = [
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "explain analyze copy passages to '{tmp}/leak.csv'",
    "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "EXPLAIN (FORMAT json, ANALYZE true) COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "/* hi */ EXPLAIN /* there */ ANALYZE COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "EXPLAIN ANALYZE INSERT INTO passages VALUES ('p3', 'c')",
    "-- a comment first\nCOPY passages TO '{tmp}/leak.csv'",
    "copy (from passages) to '{tmp}/leak.parquet' (format parquet)",
    "SELECT 1; SELECT 2",
    "SELECT 1;\nCOPY passages TO '{tmp}/leak.csv'",
    "PRAGMA show_tables",
    "CALL pragma_version()",
    "USE wh_passages",
    "DETACH wh_passages",
    "VACUUM",
    "SET VARIABLE x = 1",
    "RESET threads",
    "BEGIN TRANSACTION",
    "CREATE VIEW v AS SELECT 1",
    "CREATE MACRO m(x) AS x + 1",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'x')",
    "FORCE INSTALL httpfs",
    "UPDATE EXTENSIONS",
    "LOAD '{tmp}/evil.duckdb_extension'",
    "IMPORT DATABASE '{tmp}/dump'",
    "COPY FROM DATABASE wh_passages TO memory",
    "ALTER TABLE passages RENAME TO p",
    "TRUNCATE passages",
]


@pytest.mark.parametrize("statement", REFUSED)
def test_every_write_path_is_refused(statement, warehouse, tmp_path):
    before = file_digests(warehouse)
    result = sql(statement.format(tmp=tmp_path), warehouse)
    assert result.exit_code != 0, result.output
    assert "read-only" in result.output or "exactly one statement" in result.output or "cannot parse" in result.output
    assert file_digests(warehouse) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "warehouse"]  # nothing written beside it


READS = [
    ("SELECT count(*) FROM passages", [["count_star()"], ["2"]]),
    ("FROM \"weird name\" ORDER BY x", [["x"], ["1"], ["2"], ["3"]]),
    ('SELECT "from" FROM "select"', [["from"], ["4"]]),
    ("WITH q AS (SELECT * FROM queries) SELECT query_id, text FROM q JOIN passages USING (passage_id)",
     [["query_id", "text"], ["q1", "a"]]),
    ("SELECT count(*) AS n FROM generation_failures UNION ALL SELECT count(*) FROM ingest_report ORDER BY 1",
     [["n"], ["0"], ["1"]]),
    ("VALUES (1, 'a')", [["col0", "col1"], ["1", "a"]]),
]  # fmt: skip


@pytest.mark.parametrize(("query", "expected"), READS)
def test_reads_of_any_table_work(query, expected, warehouse):
    result = sql(query, warehouse)
    assert result.exit_code == 0, result.output
    assert [line.split(",") for line in result.output.splitlines()] == expected


@pytest.mark.parametrize("query", ["EXPLAIN SELECT * FROM passages", "EXPLAIN ANALYZE SELECT * FROM passages",
                                   "EXPLAIN (FORMAT json) SELECT 1", "DESCRIBE queries", "SUMMARIZE passages",
                                   "SHOW TABLES", "-- comment\nEXPLAIN ANALYZE (SELECT 1)"])  # fmt: skip
def test_inspection_statements_work(query, warehouse):
    result = CliRunner().invoke(fret, ["sql", "--warehouse", str(warehouse), "--", query])
    assert result.exit_code == 0, result.output


def test_every_table_of_every_stage_is_readable_by_bare_name(warehouse):
    infos = wh.list_tables(warehouse)
    assert len(infos) == 6
    for info in infos:
        quoted = '"' + info.name.replace('"', '""') + '"'
        result = sql(f"SELECT count(*) AS n FROM {quoted}", warehouse)
        assert result.exit_code == 0 and result.output.splitlines() == ["n", str(info.rows)], (info, result.output)
