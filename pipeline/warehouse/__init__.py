"""The warehouse: one DuckDB file per stage, and what reads and builds them.

    files.py     the stage files: paths, atomic writes, read-only attach of them all
    sqlshell.py  `fret sql` / `fret tables`: ad-hoc SQL over every stage's tables
    models.py    the SQL model engine: `sql/*.sql`, dependencies parsed with sqlglot, `fret build`
    dag.py       the dependency graph the engine sorts (names a cycle)
    explain.py   `fret explain`: one query's whole story through the stages

DuckDB only: `fret sql` and `fret explain` import this, and must start fast.
"""

from pipeline.warehouse.files import (
    SUFFIX,
    WAREHOUSE_DIR,
    TableInfo,
    WarehouseError,
    attach_stages,
    list_tables,
    open_readonly,
    stage_files,
    stage_path,
    write_stage,
    write_table,
)

__all__ = [
    "SUFFIX",
    "WAREHOUSE_DIR",
    "TableInfo",
    "WarehouseError",
    "attach_stages",
    "list_tables",
    "open_readonly",
    "stage_files",
    "stage_path",
    "write_stage",
    "write_table",
]
