"""`fret sql` / `fret tables`: bare names, output formats, refusal of every write path."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import warehouse as wh
from pipeline.cli import main


@pytest.fixture()
def warehouse(tmp_path):
    root = tmp_path / "warehouse"
    with wh.write_stage("passages", warehouse=root) as con:
        wh.write_table(con, "passages", pa.table({"passage_id": ["p1", "p2"], "n_words": [3, 40]}))
    with wh.write_stage("queries", upstream=["passages"], warehouse=root) as con:
        con.execute("CREATE TABLE queries AS SELECT 'q-' || passage_id AS query_id, passage_id FROM passages")
    return root


def fret(*args):
    return CliRunner().invoke(main, list(args))


def test_bare_names_across_stages(warehouse):
    res = fret("sql", "SELECT q.query_id, p.n_words FROM queries q JOIN passages p USING (passage_id) ORDER BY 1",
               "--warehouse", str(warehouse))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["query_id", "n_words"]
    assert lines[2].split() == ["q-p1", "3"] and lines[3].split() == ["q-p2", "40"]
    assert lines[-1] == "(2 rows)"


def test_csv_json_parquet(warehouse, tmp_path):
    q = "SELECT passage_id, n_words FROM passages ORDER BY 1"
    res = fret("sql", q, "--format", "csv", "--warehouse", str(warehouse))
    assert res.output.splitlines() == ["passage_id,n_words", "p1,3", "p2,40"]
    res = fret("sql", q, "--format", "json", "--warehouse", str(warehouse))
    assert json.loads(res.output) == [{"passage_id": "p1", "n_words": 3}, {"passage_id": "p2", "n_words": 40}]
    out = tmp_path / "x.parquet"
    res = fret("sql", q, "--format", "parquet", "-o", str(out), "--warehouse", str(warehouse))
    assert res.exit_code == 0 and pq.read_table(out).to_pydict()["n_words"] == [3, 40]
    assert "needs --output" in fret("sql", q, "--format", "parquet", "--warehouse", str(warehouse)).output


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO passages VALUES ('p3', 1)",
        "UPDATE passages SET n_words = 0",
        "DELETE FROM passages",
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE passages",
        "COPY passages TO '{tmp}/leak.csv'",
        "COPY (SELECT 1) TO '{tmp}/leak.csv'",
        "ATTACH '{tmp}/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 1",
        "EXPORT DATABASE '{tmp}/dump'",
        "SELECT 1; DROP TABLE passages",
        "CHECKPOINT",
    ],
)
def test_writes_are_refused(warehouse, tmp_path, statement):
    before = (warehouse / "passages.duckdb").read_bytes()
    res = fret("sql", statement.format(tmp=tmp_path), "--warehouse", str(warehouse))
    assert res.exit_code != 0
    assert "read-only" in res.output or "exactly one statement" in res.output
    assert (warehouse / "passages.duckdb").read_bytes() == before
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "dump").exists()


def test_bad_query_is_a_clear_error(warehouse):
    res = fret("sql", "SELECT nope FROM passages", "--warehouse", str(warehouse))
    assert res.exit_code == 1 and "query failed" in res.output and "nope" in res.output


def test_tables_lists_rows_and_stage(warehouse, tmp_path):
    res = fret("tables", "--warehouse", str(warehouse))
    rows = [line.split() for line in res.output.splitlines()[2:-1]]
    assert rows == [["passages", "passages", "2"], ["queries", "queries", "2"]]
    assert "no stage files" in fret("tables", "--warehouse", str(tmp_path / "empty")).output


def run_light(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; fail if it errs or imports torch or transformers."""
    check = "\nimport sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    out = subprocess.run([sys.executable, "-c", code + check, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out


def test_sql_starts_without_torch(warehouse):
    code = (
        "import sys, time; t = time.perf_counter(); from pipeline.cli import main; "
        "from pipeline.warehouse import sqlshell; sqlshell.run_query('SELECT 1', sys.argv[1]); "
        "print(time.perf_counter() - t)"
    )
    assert float(run_light(code, str(warehouse)).stdout) < 2.0
