"""`fret`: the command line.

Heavy libraries (torch, transformers, outlines, mteb) are imported only inside the commands that
need them, so `fret --help`, `fret sql`, `fret tables` and `fret explain` start in a fraction of a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.warehouse import WAREHOUSE_DIR

warehouse_option = click.option(
    "--warehouse",
    type=click.Path(file_okay=False, path_type=Path),
    default=WAREHOUSE_DIR,
    show_default=True,
    help="Folder of stage DuckDB files.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fret: distil an LLM into a text-embedding model (Gecko / FRet) with DVC + DuckDB."""


@main.command("sql")
@click.argument("query")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not stdout.")
@click.option("--max-rows", type=int, default=50, show_default=True, help="Rows printed by --format table.")
@warehouse_option
def sql_command(query: str, fmt: str, output: Path | None, max_rows: int, warehouse: Path) -> None:
    """Run a read-only QUERY over every warehouse table, by bare name."""
    from pipeline.warehouse import sqlshell

    try:
        result = sqlshell.run_query(query, warehouse)
    except sqlshell.QueryRefused as err:
        raise click.ClickException(str(err)) from None
    except sqlshell.duckdb.Error as err:
        raise click.ClickException(f"query failed: {err}") from None
    if fmt == "parquet" and output is None:
        raise click.ClickException("--format parquet needs --output FILE")
    sqlshell.emit(result, fmt, output, max_rows)


@main.command("explain")
@click.argument("query_id")
@warehouse_option
def explain_command(query_id: str, warehouse: Path) -> None:
    """Show one query's way through the pipeline: seed, filters, neighbors' ranks, positive, negatives."""
    from pipeline.warehouse import WarehouseError
    from pipeline.warehouse.explain import ExplainError, explain_query, render

    try:
        click.echo(render(explain_query(query_id, warehouse)))
    except (ExplainError, WarehouseError) as err:
        raise click.ClickException(str(err)) from None


@main.command("tables")
@warehouse_option
def tables_command(warehouse: Path) -> None:
    """List every warehouse table with its row count and the stage that wrote it."""
    from pipeline.warehouse import sqlshell
    from pipeline.warehouse import list_tables

    infos = list_tables(warehouse)
    if not infos:
        click.echo(f"no stage files in {warehouse}/ yet: run `dvc repro`")
        return
    rows = [(t.name, t.stage, t.rows) for t in infos]
    click.echo(sqlshell.format_table(["table", "stage", "rows"], rows, max_rows=len(rows)))


@main.command("models")
@click.option("--sql-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sql"), show_default=True)
def models_command(sql_dir: Path) -> None:
    """List the SQL models in build order with their dependencies."""
    from pipeline.warehouse import sqlshell
    from pipeline.warehouse.models import ModelError, load_models

    try:
        models = load_models(sql_dir)
    except ModelError as err:
        raise click.ClickException(str(err)) from None
    rows = [(m.name, ", ".join(m.deps) or "-", m.path.as_posix()) for m in models]
    click.echo(sqlshell.format_table(["model", "depends on", "file"], rows, max_rows=len(rows)))


@main.command("build")
@click.option("--sql-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("sql"), show_default=True)
@click.option("--stage", default="triples", show_default=True, help="Stage file the models are built into.")
@click.option("--params", "params_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("params.yaml"))
@warehouse_option
def build_command(sql_dir: Path, stage: str, params_file: Path, warehouse: Path) -> None:
    """Build every SQL model into warehouse/<stage>.duckdb and run the schema.yml data tests."""
    from pipeline.params import ParamsError, load_params, sql_variables
    from pipeline.warehouse import WarehouseError
    from pipeline.warehouse.models import ModelError, build_models

    try:
        params = load_params(params_file)
        result = build_models(sql_dir, stage=stage, variables=sql_variables(params), warehouse=warehouse)
    except (ModelError, ParamsError, WarehouseError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(result.summary())


@main.command("params")
@click.option("--params", "params_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("params.yaml"))
@click.option("--values", "mode", flag_value="values", help="Only the effective values, as YAML.")
@click.option(
    "--markdown", "mode", flag_value="markdown",
    help="The reference of every key, with PARAMS's values where they differ from the defaults: docs/params.md.",
)  # fmt: skip
def params_command(params_file: Path, mode: str | None) -> None:
    """Validate a params file and print every key: its effective value (defaults filled in) and description."""
    from pipeline.params import ParamsError, load_params
    from pipeline.params.docs import describe, markdown

    try:
        params = load_params(params_file)
    except ParamsError as err:
        raise click.ClickException(str(err)) from None
    if mode == "values":
        import yaml

        click.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip())
    elif mode == "markdown":
        click.echo(markdown(params), nl=False)
    else:
        click.echo(describe(params))


@main.command("report")
@warehouse_option
@click.option(
    "--metrics", type=click.Path(dir_okay=False, path_type=Path), default=Path("metrics/eval.json"), show_default=True,
    help="The evaluate stage's metrics JSON.",
)
@click.option(
    "--dvclive", "live_dir", type=click.Path(file_okay=False, path_type=Path),
    help="dvclive folder with the training loss [default: dvclive next to --warehouse].",
)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"), show_default=True,
    help="The HTML file to write.",
)
def report_command(warehouse: Path, metrics: Path, live_dir: Path | None, output: Path) -> None:
    """Write a self-contained HTML report (inline SVG charts) of the warehouse, training and eval."""
    import duckdb

    from pipeline.report import write_report
    from pipeline.warehouse import WarehouseError

    try:
        path = write_report(output, warehouse=warehouse, metrics=metrics, live_dir=live_dir)
    except (WarehouseError, ValueError, duckdb.Error) as err:  # bad JSON / TSV, or an old table layout
        raise click.ClickException(str(err)) from None
    click.echo(f"report: {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
