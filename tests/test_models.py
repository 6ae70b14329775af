"""SQL model engine: dependencies from sqlglot scopes, build order, variables, schema.yml data tests."""

from pathlib import Path
from textwrap import dedent

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import warehouse as wh
from pipeline.cli import main
from pipeline.warehouse.dag import DAG, CycleError
from pipeline.warehouse.models import (
    ModelError,
    build_into,
    build_models,
    find_dependencies,
    load_models,
    load_schema,
)


# ---------------------------------------------------------------- helpers (sqlmesh-style units)


def upstream_stage(root: Path, stage: str, tables: dict[str, dict[str, list]]) -> None:
    """A tiny upstream stage file: table name -> column -> values."""
    with wh.write_stage(stage, warehouse=root) as con:
        for name, columns in tables.items():
            wh.write_table(con, name, pa.table(columns))


def write_models(sql_dir: Path, models: dict[str, str], schema: str | None = None) -> Path:
    sql_dir.mkdir(parents=True, exist_ok=True)
    for name, sql in models.items():
        (sql_dir / f"{name}.sql").write_text(dedent(sql).lstrip(), encoding="utf-8")
    if schema is not None:
        (sql_dir / "schema.yml").write_text(dedent(schema).lstrip(), encoding="utf-8")
    return sql_dir


def rows(root: Path, table: str, stage: str = "triples") -> list[tuple]:
    con = duckdb.connect(str(wh.stage_path(stage, root)), read_only=True)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
    finally:
        con.close()


@pytest.fixture()
def project(tmp_path):
    """An upstream `queries` stage with ids 1..3 and task types, plus an empty sql folder."""
    warehouse = tmp_path / "warehouse"
    upstream_stage(
        warehouse,
        "queries",
        {"queries": {"query_id": [1, 2, 3], "task_type": ["qa", "fact", "qa"], "score": [0.9, 0.2, 0.5]}},
    )
    return tmp_path / "sql", warehouse


# ---------------------------------------------------------------- dependencies


def test_dependencies_exclude_ctes_and_include_subqueries_and_joins():
    sql = """
        -- purpose
        with recent as (select * from queries where query_id in (select query_id from keep)),
             joined as (select * from recent join passages using (passage_id) left join labels l on true)
        select * from joined
        where exists (select 1 from blocked b where b.id = joined.query_id)
        union all
        select * from (select * from archive) as a
    """
    assert find_dependencies(sql) == ("archive", "blocked", "keep", "labels", "passages", "queries")


def test_table_functions_are_not_dependencies():
    sql = """
        select r.i, u.x, p.*
        from range(3) r(i), unnest([1, 2]) u(x), read_parquet('f.parquet') p, read_csv('a.csv') c
        join queries q on true
    """
    assert find_dependencies(sql) == ("queries",)


def test_cte_name_shadows_only_inside_its_scope():
    # `t` is a CTE in the subquery only; the outer query reads the real table `t`.
    sql = "select * from t where id in (with t as (select 1 as id) select id from t)"
    assert find_dependencies(sql) == ("t",)


# ---------------------------------------------------------------- DAG and ordering


def test_dag_order_is_deterministic_and_dependencies_first():
    dag = DAG({"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": [], "z": []})
    assert dag.sorted() == ["a", "b", "c", "d", "z"]


def test_dag_names_the_cycle_path():
    dag = DAG({"a": ["b"], "b": ["c"], "c": ["a"], "x": []})
    with pytest.raises(CycleError, match=r"a -> b -> c -> a"):
        dag.sorted()


def test_models_load_in_dependency_order(tmp_path):
    sql_dir = write_models(
        tmp_path / "sql",
        {
            "a_final": "-- last\nselect * from m_mid\n",
            "m_mid": "-- middle\nselect * from z_first join queries using (query_id)\n",
            "z_first": "-- first\nselect 1 as query_id\n",
        },
    )
    models = load_models(sql_dir)
    assert [m.name for m in models] == ["z_first", "m_mid", "a_final"]
    assert models[1].deps == ("queries", "z_first")
    assert models[0].description == "first"


def test_cycle_error_names_path_and_files(tmp_path):
    sql_dir = write_models(tmp_path / "sql", {"a": "-- a\nselect * from b\n", "b": "-- b\nselect * from a\n"})
    with pytest.raises(ModelError, match=r"a -> b -> a") as err:
        load_models(sql_dir)
    assert "a.sql" in str(err.value) and "b.sql" in str(err.value)


def test_syntax_error_names_file_and_line(tmp_path):
    sql_dir = write_models(tmp_path / "sql", {"broken": "-- oops\nselect *\nfrom where (\n"})
    with pytest.raises(ModelError, match=r"broken\.sql:3: SQL does not parse"):
        load_models(sql_dir)


def test_model_must_be_one_select_with_a_purpose_comment(tmp_path):
    write_models(tmp_path / "one", {"two": "-- two\nselect 1; select 2\n"})
    with pytest.raises(ModelError, match=r"two\.sql.*exactly one SELECT"):
        load_models(tmp_path / "one")
    write_models(tmp_path / "bare", {"bare": "select 1\n"})
    with pytest.raises(ModelError, match=r"bare\.sql:1: .*purpose comment"):
        load_models(tmp_path / "bare")


# ---------------------------------------------------------------- building


def test_builds_from_upstream_rows_to_expected_rows(project):
    sql_dir, warehouse = project
    write_models(
        sql_dir,
        {
            "qa_queries": """
                -- question-answering queries only
                with source as (select * from queries), final as (
                    select query_id, score from source where task_type = 'qa'
                )
                select * from final
            """,
            "ranked": """
                -- qa queries ranked by score
                select query_id, row_number() over (order by score desc) as rank from qa_queries
            """,
        },
    )
    result = build_models(sql_dir, warehouse=warehouse)
    assert rows(warehouse, "qa_queries") == [(1, 0.9), (3, 0.5)]
    assert rows(warehouse, "ranked") == [(1, 1), (3, 2)]
    summary = result.summary()
    assert "qa_queries" in summary and "2 rows" in summary and "data tests: 0 passed" in summary


def test_variables_reach_sql(project):
    sql_dir, warehouse = project
    write_models(
        sql_dir,
        {
            "picked": """
                -- queries above a threshold, if enabled, of listed task types
                select query_id, getvariable('select_note') as note from queries
                where score >= getvariable('select_min_score') and getvariable('select_enabled')
                  and list_contains(getvariable('select_types'), task_type)
                  and getvariable('select_nothing') is null
            """
        },
    )
    variables = {
        "select_min_score": 0.4,
        "select_enabled": True,
        "select_types": ["qa"],
        "select_note": "it's",
        "select_nothing": None,
    }
    build_models(sql_dir, variables=variables, warehouse=warehouse)
    assert rows(warehouse, "picked") == [(1, "it's"), (3, "it's")]


def test_unset_variable_is_an_error_not_a_silent_null(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {"picked": "-- p\nselect * from queries where score > getvariable('select_typo')\n"})
    with pytest.raises(ModelError, match=r"picked\.sql: getvariable\('select_typo'\)"):
        build_models(sql_dir, variables={"select_min": 1}, warehouse=warehouse)


def test_unknown_table_names_model_file_and_table(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {"lonely": "-- l\nwith x as (select * from nowhere) select * from x\n"})
    with pytest.raises(ModelError, match=r"lonely\.sql: reads unknown table 'nowhere'"):
        build_models(sql_dir, warehouse=warehouse)


def test_explicit_upstream_limits_visible_tables(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {"copy": "-- c\nselect * from queries\n"})
    with pytest.raises(ModelError, match=r"unknown table 'queries'"):
        build_models(sql_dir, warehouse=warehouse, upstream=[])


def test_model_may_not_shadow_an_upstream_table(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {"queries": "-- shadow\nselect 1 as query_id\n"})
    with pytest.raises(ModelError, match=r"queries\.sql: model queries has the name of an upstream table"):
        build_models(sql_dir, warehouse=warehouse)


def test_runtime_sql_error_names_file(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {"bad": "-- b\nselect no_such_column from queries\n"})
    with pytest.raises(ModelError, match=r"bad\.sql: DuckDB failed"):
        build_models(sql_dir, warehouse=warehouse)


def test_empty_sql_folder_builds_nothing(project):
    sql_dir, warehouse = project
    write_models(sql_dir, {}, schema="models: []\n")
    result = build_models(sql_dir, warehouse=warehouse)
    assert result.models == [] and "no SQL models" in result.summary()
    assert wh.stage_path("triples", warehouse).is_file()


def test_repo_sql_folder_loads():
    # The committed sql/ folder must always be loadable, whatever models it holds.
    root = Path(__file__).resolve().parents[1] / "sql"
    for model in load_models(root):
        assert model.description


# ---------------------------------------------------------------- data tests


QUERIES_MODEL = {"q": "-- copy of queries\nselect * from queries\n"}

# test snippet, matched text in the failure; each fails on the fixture's rows
FAILING = {
    "unique": (
        "      - name: task_type\n        tests: [unique]",
        r"FAIL unique on q\.task_type.*task_type='qa', n_rows=2",
    ),
    "not_null": (
        "      - name: score\n        tests: [not_null]",
        r"FAIL not_null on q\.score: 1 offending row.*query_id=2",
    ),
    "accepted_values": (
        "      - name: task_type\n        tests:\n          - accepted_values: {values: [qa, search]}",
        r"FAIL accepted_values on q\.task_type.*task_type='fact'",
    ),
    "relationships": (
        "      - name: query_id\n        tests:\n          - relationships: {to: parents, field: id}",
        r"FAIL relationships on q\.query_id -> parents\.id: 1 offending.*query_id=3",
    ),
}
PASSING = {
    "unique": "      - name: query_id\n        tests: [unique]",
    "not_null": "      - name: query_id\n        tests: [not_null]",
    "accepted_values": "      - name: task_type\n        tests:\n          - accepted_values: {values: [qa, fact]}",
    "relationships": "      - name: query_id\n        tests:\n          - relationships: {to: parents, field: id}",
}


def schema_for(columns: str = "", model_tests: str = "") -> str:
    return f"models:\n  - name: q\n    description: queries\n    columns:\n{columns}\n{model_tests}\n"


@pytest.fixture()
def testable(tmp_path):
    """Upstream queries with one NULL score, duplicate task types, and parents missing id 3."""
    warehouse = tmp_path / "warehouse"
    upstream_stage(
        warehouse,
        "queries",
        {
            "queries": {"query_id": [1, 2, 3], "task_type": ["qa", "fact", "qa"], "score": [0.9, None, 0.5]},
            "parents": {"id": [1, 2]},
        },
    )
    return tmp_path / "sql", warehouse


@pytest.mark.parametrize("kind", sorted(FAILING))
def test_column_data_test_fails_on_bad_rows(testable, kind):
    sql_dir, warehouse = testable
    columns, expected = FAILING[kind]
    write_models(sql_dir, QUERIES_MODEL, schema=schema_for(columns))
    with pytest.raises(ModelError, match=expected.replace(".*", r"[\s\S]*")):
        build_models(sql_dir, warehouse=warehouse)


@pytest.mark.parametrize("kind", sorted(PASSING))
def test_column_data_test_passes_on_good_rows(testable, kind):
    sql_dir, warehouse = testable
    # parents lacks id 3, so the relationships model keeps only ids that have one
    model = {"q": "-- ids with parents\nselect * from queries where query_id < 3\n"}
    write_models(sql_dir, model if kind == "relationships" else QUERIES_MODEL, schema=schema_for(PASSING[kind]))
    assert build_models(sql_dir, warehouse=warehouse).tests_passed == 1


def test_relationships_counts_each_missing_key_once_and_ignores_nulls(tmp_path):
    """A child key repeated is one offending row with its count; a NULL child key is not checked, and a
    NULL parent key matches nothing (NOT EXISTS semantics, which the anti join must keep)."""
    warehouse = tmp_path / "warehouse"
    upstream_stage(warehouse, "queries", {"queries": {"query_id": [1, 3, 3, None]}, "parents": {"id": [1, None]}})
    columns = "      - name: query_id\n        tests:\n          - relationships: {to: parents, field: id}"
    write_models(tmp_path / "sql", QUERIES_MODEL, schema=schema_for(columns))
    with pytest.raises(ModelError, match=r"1 offending row\(s\)\n    query_id=3, n_rows=2\n?") as err:
        build_models(tmp_path / "sql", warehouse=warehouse)
    assert "None" not in str(err.value)


def test_expect_empty_fails_and_passes(testable):
    sql_dir, warehouse = testable
    test = (
        "    tests:\n      - expect_empty:\n"
        "          sql: select query_id from q where score < {limit};\n"
        "          description: no low scores\n"
    )
    write_models(sql_dir, QUERIES_MODEL, schema=schema_for(model_tests=test.format(limit=0.6)))
    with pytest.raises(ModelError, match=r"FAIL expect_empty on q \(no low scores\): 1 offending[\s\S]*query_id=3"):
        build_models(sql_dir, warehouse=warehouse)
    write_models(sql_dir, QUERIES_MODEL, schema=schema_for(model_tests=test.format(limit=0.1)))
    assert build_models(sql_dir, warehouse=warehouse).tests_passed == 1


def test_failure_shows_at_most_ten_rows(testable):
    sql_dir, warehouse = testable
    write_models(
        sql_dir,
        {"many": "-- 25 nulls\nselect null::int as v from range(25)\n"},
        schema="models:\n  - name: many\n    columns:\n      - name: v\n        tests: [not_null]\n",
    )
    with pytest.raises(ModelError) as err:
        build_models(sql_dir, warehouse=warehouse)
    assert "25 offending" in str(err.value) and "... and 15 more" in str(err.value)
    assert str(err.value).count("v=None") == 10


def test_failing_test_leaves_previous_stage_file_intact(testable):
    sql_dir, warehouse = testable
    write_models(sql_dir, {"q": "-- ok\nselect query_id from queries\n"}, schema=schema_for(PASSING["unique"]))
    build_models(sql_dir, warehouse=warehouse)
    write_models(sql_dir, {"q": "-- dup\nselect 1 as query_id from queries\n"})
    with pytest.raises(ModelError, match="unique on q.query_id"):
        build_models(sql_dir, warehouse=warehouse)
    assert rows(warehouse, "q") == [(1,), (2,), (3,)]
    assert [p.name for p in warehouse.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- schema.yml errors


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("models: [{name: q, columns: [{name: query_id, tests: [uniqe]}]}]", r"unknown column-level test 'uniqe'"),
        ("models: [{name: q, tests: [not_null]}]", r"model q: unknown model-level test 'not_null'"),
        ("models: [{name: ghost}]", r"model ghost: no such model"),
        ("models: [{name: q, colums: []}]", r"unknown key\(s\) colums"),
        (
            "models: [{name: q, columns: [{name: task_type, tests: [accepted_values: {vals: [a]}]}]}]",
            r"accepted_values: unknown key\(s\) vals",
        ),
        (
            "models: [{name: q, columns: [{name: query_id, tests: [relationships: {to: nope, field: id}]}]}]",
            r"relationships on q\.query_id -> nope\.id: unknown table 'nope'",
        ),
        ("models: [{name: q, columns: [{name: no_such_col}]}]", r"model q: unknown column 'no_such_col'"),
        ("models: [{name: q}, {name: q}]", r"model 'q' is described twice"),
    ],
)
def test_schema_errors_name_schema_file(testable, schema, message):
    sql_dir, warehouse = testable
    write_models(sql_dir, QUERIES_MODEL, schema=schema)
    with pytest.raises(ModelError, match=r"schema\.yml: [\s\S]*" + message):
        build_models(sql_dir, warehouse=warehouse)


def test_missing_schema_is_allowed(testable):
    sql_dir, warehouse = testable
    write_models(sql_dir, QUERIES_MODEL)
    assert build_models(sql_dir, warehouse=warehouse).tests_passed == 0


# ---------------------------------------------------------------- CLI


def params_file(tmp_path: Path) -> Path:
    # load_params checks corpus.path exists next to the params file
    (tmp_path / "corpus.jsonl").write_text("{}\n", encoding="utf-8")
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 7\ncorpus:\n  path: corpus.jsonl\n", encoding="utf-8")
    return path


def test_cli_models_lists_order_deps_and_files(tmp_path):
    sql_dir = write_models(
        tmp_path / "sql", {"b": "-- b\nselect * from a join queries using (id)\n", "a": "-- a\nselect 1 as id\n"}
    )
    result = CliRunner().invoke(main, ["models", "--sql-dir", str(sql_dir)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "sql/" in line]
    assert "a.sql" in lines[0] and "b.sql" in lines[1] and "a, queries" in lines[1]


def test_cli_build_uses_params_and_reports_errors(testable, tmp_path):
    sql_dir, warehouse = testable
    write_models(sql_dir, {"seeded": "-- params reach SQL\nselect getvariable('base_seed') as seed\n"})
    args = ["build", "--sql-dir", str(sql_dir), "--warehouse", str(warehouse), "--params", str(params_file(tmp_path))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "seeded" in result.output and "1 rows" in result.output
    assert rows(warehouse, "seeded") == [(7,)]
    write_models(sql_dir, {"seeded": "-- broken\nselect * from nowhere\n"})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "unknown table 'nowhere'" in result.output


def test_build_into_an_in_memory_connection_matches_the_stage_file(testable):
    """bench/triples.py times the SQL without the write through build_into: same rows, same tests."""
    sql_dir, warehouse = testable
    write_models(sql_dir, QUERIES_MODEL, schema=schema_for("      - name: query_id\n        tests: [unique, not_null]"))
    build_models(sql_dir, warehouse=warehouse)
    models = load_models(sql_dir)
    con = duckdb.connect(":memory:")
    try:
        wh.attach_stages(con, {"queries": wh.stage_path("queries", warehouse)})
        built, passed = build_into(con, sql_dir, models, load_schema(sql_dir, models), {})
        assert [(m.name, m.rows) for m in built] == [("q", 3)] and passed == 2
        assert con.execute("SELECT * FROM q ORDER BY ALL").fetchall() == rows(warehouse, "q")
    finally:
        con.close()
    # A failing data test fails build_into as it fails build_models.
    write_models(sql_dir, QUERIES_MODEL, schema=schema_for(FAILING["not_null"][0]))
    models = load_models(sql_dir)
    con = duckdb.connect(":memory:")
    try:
        wh.attach_stages(con, {"queries": wh.stage_path("queries", warehouse)})
        with pytest.raises(ModelError, match="FAIL not_null on q.score"):
            build_into(con, sql_dir, models, load_schema(sql_dir, models), {})
    finally:
        con.close()
