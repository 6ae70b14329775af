"""Stage files: atomic replacement, read-only upstream, bare table names."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline import warehouse as wh


def make_stage(root: Path, stage: str, tables: dict[str, list[int]]) -> None:
    with wh.write_stage(stage, warehouse=root) as con:
        for name, values in tables.items():
            wh.write_table(con, name, pa.table({"v": values}))


def read(root: Path, stage: str, table: str) -> list[int]:
    con = duckdb.connect(str(wh.stage_path(stage, root)), read_only=True)
    try:
        return [r[0] for r in con.execute(f"SELECT v FROM {table} ORDER BY v").fetchall()]
    finally:
        con.close()


def test_upstream_is_attached_read_only_by_bare_name(tmp_path):
    make_stage(tmp_path, "passages", {"passages": [1, 2, 3]})
    with wh.write_stage("down", upstream=["passages"], warehouse=tmp_path) as con:
        con.execute("CREATE TABLE doubled AS SELECT v * 2 AS v FROM passages")
        with pytest.raises(duckdb.Error):
            con.execute("INSERT INTO wh_passages.main.passages VALUES (9)")
    assert read(tmp_path, "down", "doubled") == [2, 4, 6]
    # the downstream file stands alone: no view into an attached catalog was persisted
    con = duckdb.connect(str(wh.stage_path("down", tmp_path)), read_only=True)
    assert [t[0] for t in con.execute("SHOW TABLES").fetchall()] == ["doubled"]


def test_missing_upstream_names_the_stage(tmp_path):
    with pytest.raises(wh.WarehouseError, match="upstream stage 'passages' has not been built"):
        with wh.write_stage("down", upstream=["passages"], warehouse=tmp_path):
            pass


def test_exception_keeps_previous_file(tmp_path):
    make_stage(tmp_path, "s", {"t": [1]})
    with pytest.raises(RuntimeError):
        with wh.write_stage("s", warehouse=tmp_path) as con:
            wh.write_table(con, "t", pa.table({"v": [5, 6]}))
            raise RuntimeError("boom")
    assert read(tmp_path, "s", "t") == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["s.duckdb"]


WRITER = """
import sys, time, pyarrow as pa
from pipeline import warehouse as wh
root = sys.argv[1]
with wh.write_stage("s", warehouse=root) as con:
    for i in range(40):
        wh.write_table(con, f"t{i}", pa.table({"v": list(range(20000))}))
        if i == 0:
            print("writing", flush=True)
    wh.write_table(con, "t", pa.table({"v": [7, 8, 9]}))
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5])
def test_kill_during_write_leaves_old_table(tmp_path, delay):
    make_stage(tmp_path, "s", {"t": [1, 2]})
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout.readline().strip() == b"writing"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # old or (if the writer happened to finish) new, never partial
    assert read(tmp_path, "s", "t") in ([1, 2], [7, 8, 9])
    # the next writer cleans what the killed one left behind
    make_stage(tmp_path, "s", {"t": [3]})
    assert read(tmp_path, "s", "t") == [3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.duckdb"]


def test_duplicate_table_across_stages_is_an_error(tmp_path):
    make_stage(tmp_path, "a", {"t": [1]})
    make_stage(tmp_path, "b", {"t": [2]})
    with pytest.raises(wh.WarehouseError, match="table 't' is written by two stages: a and b"):
        wh.open_readonly(tmp_path)


def test_list_tables_counts_rows(tmp_path):
    make_stage(tmp_path, "a", {"t": [1, 2], "u": []})
    assert [(t.name, t.stage, t.rows) for t in wh.list_tables(tmp_path)] == [("t", "a", 2), ("u", "a", 0)]
    assert wh.list_tables(tmp_path / "none") == []


def test_stale_temporary_of_dead_process_is_removed(tmp_path):
    stale = tmp_path / f".s.duckdb.tmp-{2**22 + 12345}"
    stale.write_bytes(b"junk")
    make_stage(tmp_path, "s", {"t": [1]})
    assert not stale.exists()
    assert os.listdir(tmp_path) == ["s.duckdb"]
