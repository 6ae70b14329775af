"""The one place that opens DuckDB files.

One file per stage under `warehouse/` (DVC forbids two stages sharing an out). A stage writes its
own file through `write_stage`: everything goes to a temporary file that replaces the real one only
after a checkpoint, so a crash at any point leaves the previous file whole. Upstream files are
attached READ_ONLY and their tables exposed by bare name through temporary views.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

WAREHOUSE_DIR = Path("warehouse")
SUFFIX = ".duckdb"


class WarehouseError(RuntimeError):
    """A warehouse file is missing, unreadable, or two stages define the same table name."""


@dataclass(frozen=True)
class TableInfo:
    name: str
    stage: str
    rows: int


def stage_path(stage: str, warehouse: Path = WAREHOUSE_DIR) -> Path:
    return Path(warehouse) / f"{stage}{SUFFIX}"


def stage_files(warehouse: Path = WAREHOUSE_DIR) -> dict[str, Path]:
    """Every finished stage file, by stage name (temporary files of running stages excluded)."""
    warehouse = Path(warehouse)
    if not warehouse.is_dir():
        return {}
    return {p.stem: p for p in sorted(warehouse.glob(f"*{SUFFIX}")) if not p.name.startswith(".")}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _alias(stage: str) -> str:
    # Catalog aliases must not collide with bare table names (`passages` is both a stage and a table).
    return f"wh_{stage}"


def attach_stages(con: duckdb.DuckDBPyConnection, files: dict[str, Path]) -> dict[str, str]:
    """Attach stage files read-only and expose their tables as temporary views by bare name.

    Returns:
        table name -> stage that wrote it.

    Raises:
        WarehouseError: a file cannot be opened, or two stages hold a table of the same name.
    """
    owners: dict[str, str] = {}
    for stage, path in files.items():
        alias = _alias(stage)
        try:
            con.execute(f"ATTACH {_literal(str(path))} AS {_quote(alias)} (READ_ONLY)")
        except duckdb.Error as err:
            raise WarehouseError(f"{path}: cannot open stage file read-only: {err}") from None
        tables = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' "
            "ORDER BY table_name",
            [alias],
        ).fetchall()
        for (table,) in tables:
            if table in owners:
                raise WarehouseError(
                    f"table {table!r} is written by two stages: {owners[table]} and {stage}; rename one"
                )
            owners[table] = stage
            con.execute(
                f"CREATE TEMP VIEW {_quote(table)} AS SELECT * FROM {_quote(alias)}.main.{_quote(table)}"
            )
    return owners


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_readonly(warehouse: Path = WAREHOUSE_DIR) -> tuple[duckdb.DuckDBPyConnection, dict[str, str]]:
    """An in-memory connection with every stage file attached read-only (for `fret sql`)."""
    con = duckdb.connect(":memory:")
    owners = attach_stages(con, stage_files(warehouse))
    return con, owners


def list_tables(warehouse: Path = WAREHOUSE_DIR) -> list[TableInfo]:
    con, owners = open_readonly(warehouse)
    try:
        return [
            TableInfo(t, s, con.execute(f"SELECT count(*) FROM {_quote(t)}").fetchall()[0][0])
            for t, s in sorted(owners.items(), key=lambda kv: (kv[1], kv[0]))
        ]
    finally:
        con.close()


@contextmanager
def write_stage(
    stage: str, upstream: Iterable[str] = (), warehouse: Path = WAREHOUSE_DIR
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a fresh file for `stage`, with `upstream` stages attached read-only.

    The file replaces `warehouse/<stage>.duckdb` atomically when the block exits normally; on an
    exception (or a kill) the previous file stays as it was and the partial file is discarded.
    """
    warehouse = Path(warehouse)
    warehouse.mkdir(parents=True, exist_ok=True)
    final = stage_path(stage, warehouse)
    _remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    files = {}
    for name in upstream:
        path = stage_path(name, warehouse)
        if not path.is_file():
            raise WarehouseError(f"{path}: upstream stage {name!r} has not been built (run `dvc repro {name}`)")
        files[name] = path
    con = duckdb.connect(str(tmp))
    try:
        attach_stages(con, files)
        yield con
        for name in files:
            con.execute(f"DETACH {_quote(_alias(name))}")
        con.execute("CHECKPOINT")
        con.close()
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        con.close()
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            leftover.unlink(missing_ok=True)
        raise


def _remove_stale_temporaries(final: Path) -> None:
    """A killed writer leaves `.name.tmp-PID`; remove those whose process is gone."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1].removesuffix(".wal")
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(con: duckdb.DuckDBPyConnection, name: str, data: object) -> int:
    """Materialise a pyarrow table / DataFrame / relation as table `name`; returns its row count."""
    con.register("_fret_incoming", data)
    try:
        con.execute(f"CREATE OR REPLACE TABLE {_quote(name)} AS SELECT * FROM _fret_incoming")
    finally:
        con.unregister("_fret_incoming")
    return con.execute(f"SELECT count(*) FROM {_quote(name)}").fetchall()[0][0]
