"""`fret report`: one self-contained HTML page about a pipeline run.

Everything comes from the warehouse (through `open_readonly`, so nothing is written there), the
dvclive loss history and the evaluate stage's metrics JSON. Charts are inline SVG drawn here, so
the page needs no JavaScript, stylesheet, font or network. A section whose inputs are missing
says which stage to run instead of failing. Every string from the data is escaped: queries and
tasks are LLM output.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

import duckdb

from pipeline.warehouse.files import WAREHOUSE_DIR, open_readonly

# Pipeline order and the tables each stage writes (the stage that builds a missing input).
STAGE_TABLES: dict[str, tuple[str, ...]] = {
    "passages": ("passages", "ingest_report", "ingest_errors"),
    "queries": ("queries", "generation_failures", "generation_report"),
    "neighbors": ("neighbors", "seed_ranks", "passage_embeddings", "query_embeddings"),
    "llm_scores": ("llm_scores",),
    "triples": ("fused_ranks", "positives", "negative_candidates", "hard_negatives", "triples", "selection_report"),
}
LOSS_FILE = Path("plots/metrics/train/loss.tsv")  # where dvclive puts log_metric("train/loss"), under its dir
COLORS = ("#3b6ea8", "#e08a2c", "#4c9a5b", "#b8455a", "#7a5fa8")
MAX_LINE_POINTS = 1500  # a longer loss history is thinned to this many points (the SVG stays small)


@dataclass(frozen=True)
class Section:
    title: str
    body: str  # HTML, already escaped


# ---------------------------------------------------------------- formatting


def fmt_num(value: float | int | None) -> str:
    """Integers with thousands separators, floats with 4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An escaped HTML table; numbers are formatted with `fmt_num` and right-aligned."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, (int, float)) and not isinstance(cell, bool) or cell is None:
                cells.append(f'<td class="num">{escape(fmt_num(cell))}</td>')
            else:
                cells.append(f"<td>{escape(str(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def not_built(stage: str, what: str = "") -> str:
    """The note shown in place of a section whose input a stage has not produced yet."""
    lead = f"{escape(what)}: " if what else ""
    return f'<p class="missing">{lead}not built yet: run <code>dvc repro {escape(stage)}</code></p>'


def _short(label: str, limit: int = 26) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
        f'font-family="sans-serif" font-size="12">' + "".join(body) + "</svg>"
    )


# ---------------------------------------------------------------- SVG charts


def bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str = "", width: int = 640) -> str:
    """Horizontal bars, one per label, each with its value written at its end."""
    row, left, right = 24, 180, 70
    height = row * len(labels) + 10
    top = max((v for v in values if v is not None), default=0) or 1
    span = width - left - right
    body = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 5 + i * row
        w = span * max(value or 0, 0) / top
        body.append(
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 8}" fill="{COLORS[0]}">'
            f"<title>{escape(str(label))}: {escape(fmt_num(value))}</title></rect>"
        )
        body.append(_text(left - 6, y + row / 2 + 4, _short(str(label)), "end"))
        body.append(_text(left + w + 4, y + row / 2 + 4, fmt_num(value)))
    return _svg(width, height, body, title or "bar chart")


def histogram(
    edges: Sequence[float], counts: Sequence[int], *, xlabel: str = "", width: int = 640, height: int = 240
) -> str:
    """Vertical bars between consecutive `edges` (len(edges) == len(counts) + 1), count on the y axis."""
    left, right, top_pad, bottom = 50, 15, 15, 45
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    top = max(counts, default=0) or 1
    n = max(len(counts), 1)
    body = [_axes(left, top_pad, plot_w, plot_h)]
    for i, count in enumerate(counts):
        h = plot_h * count / top
        x = left + plot_w * i / n
        body.append(
            f'<rect x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" width="{max(plot_w / n - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{COLORS[0]}"><title>[{escape(fmt_num(edges[i]))}, '
            f"{escape(fmt_num(edges[i + 1]))}): {count:,}</title></rect>"
        )
    step = max(1, math.ceil(len(edges) / 8))  # at most ~8 tick labels
    for i in range(0, len(edges), step):
        x = left + plot_w * i / n
        body.append(_text(x, top_pad + plot_h + 15, fmt_num(edges[i]), "middle"))
    body.append(_text(left - 6, top_pad + 10, f"{top:,}", "end"))
    body.append(_text(left - 6, top_pad + plot_h, "0", "end"))
    body.append(_text(left + plot_w / 2, height - 8, xlabel, "middle"))
    return _svg(width, height, body, xlabel or "histogram")


def line_chart(
    xs: Sequence[float], ys: Sequence[float], *, xlabel: str = "", ylabel: str = "", width: int = 640, height: int = 260
) -> str:
    """A polyline of (x, y) points with min/max labels on both axes; long series are thinned."""
    left, right, top_pad, bottom = 60, 15, 15, 45
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    if len(xs) > MAX_LINE_POINTS:
        stride = math.ceil(len(xs) / MAX_LINE_POINTS)
        keep = list(range(0, len(xs), stride)) + [len(xs) - 1]
        xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xr, yr = (x1 - x0) or 1, (y1 - y0) or 1
    points = " ".join(
        f"{left + plot_w * (x - x0) / xr:.1f},{top_pad + plot_h - plot_h * (y - y0) / yr:.1f}" for x, y in zip(xs, ys)
    )
    body = [
        _axes(left, top_pad, plot_w, plot_h),
        f'<polyline fill="none" stroke="{COLORS[0]}" stroke-width="1.5" points="{points}"/>',
        _text(left, top_pad + plot_h + 15, fmt_num(x0), "middle"),
        _text(left + plot_w, top_pad + plot_h + 15, fmt_num(x1), "end"),
        _text(left - 6, top_pad + 10, fmt_num(y1), "end"),
        _text(left - 6, top_pad + plot_h, fmt_num(y0), "end"),
        _text(left + plot_w / 2, height - 8, xlabel, "middle"),
        _text(14, top_pad + plot_h / 2, ylabel, "middle", f' transform="rotate(-90 14 {top_pad + plot_h / 2:.1f})"'),
    ]
    return _svg(width, height, body, ylabel or "line chart")


def grouped_bar_chart(
    groups: Sequence[str], series: dict[str, Sequence[float | None]], *, width: int = 640, title: str = ""
) -> str:
    """Horizontal bars, one per series within each group (e.g. base vs trained per metric), with a legend."""
    names = list(series)
    bar, gap, left, right = 16, 12, 220, 70
    group_h = bar * len(names) + gap
    height = 30 + group_h * len(groups)
    values = [v for vals in series.values() for v in vals if v is not None]
    top = max(max(values, default=0), 0) or 1
    span = width - left - right
    body = []
    for j, name in enumerate(names):  # legend
        x = left + j * 120
        body.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{COLORS[j % len(COLORS)]}"/>')
        body.append(_text(x + 16, 16, name))
    for i, group in enumerate(groups):
        y = 28 + i * group_h
        body.append(_text(left - 6, y + group_h / 2, _short(group, 34), "end"))
        for j, name in enumerate(names):
            value = series[name][i]
            w = span * max(value or 0, 0) / top
            yb = y + j * bar
            body.append(
                f'<rect x="{left}" y="{yb:.1f}" width="{w:.1f}" height="{bar - 3}" fill="{COLORS[j % len(COLORS)]}">'
                f"<title>{escape(group)} {escape(name)}: {escape(fmt_num(value))}</title></rect>"
            )
            body.append(_text(left + w + 4, yb + bar - 5, fmt_num(value)))
    return _svg(width, height, body, title or "grouped bar chart")


def _axes(left: float, top: float, w: float, h: float) -> str:
    return (
        f'<path d="M{left},{top} V{top + h} H{left + w}" fill="none" stroke="#555" stroke-width="1"/>'
    )


# ---------------------------------------------------------------- data (SQL)


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    return con.execute(sql).fetchall()


def histogram_counts(
    con: duckdb.DuckDBPyConnection, table: str, column: str, bins: int = 20,
    lo: float | None = None, hi: float | None = None, integer: bool = False,
) -> tuple[list[float], list[int]]:
    """Bin `table.column` in SQL (nulls skipped); returns (edges, counts) with len(edges) = len(counts) + 1.

    `lo`/`hi` default to the column's min/max; `integer` makes the bin width a whole number so each
    integer value falls in exactly one labelled bin.
    """
    mn, mx = _rows(con, f"SELECT min({column}), max({column}) FROM {table}")[0]
    if mn is None:
        return [], []
    lo = float(mn if lo is None else lo)
    hi = float(mx if hi is None else hi)
    if integer:
        width = max(1, math.ceil((hi - lo + 1) / bins))
        bins = max(1, math.ceil((hi - lo + 1) / width))
    else:
        width = (hi - lo) / bins or 1.0
    counted = dict(
        _rows(
            con,
            f"SELECT least(greatest(floor(({column} - {lo}) / {width})::bigint, 0), {bins - 1}) AS b, count(*) "
            f"FROM {table} WHERE {column} IS NOT NULL GROUP BY b",
        )
    )
    edges = [lo + i * width for i in range(bins + 1)]
    if integer:
        edges = [int(e) for e in edges]
    return edges, [counted.get(i, 0) for i in range(bins)]


def table_counts(con: duckdb.DuckDBPyConnection, owners: dict[str, str]) -> list[tuple[str, str, int | None]]:
    """(stage, table, rows) for every expected table in pipeline order; rows None where not built."""
    out: list[tuple[str, str, int | None]] = []
    known = {t for tables in STAGE_TABLES.values() for t in tables}
    for stage, tables in STAGE_TABLES.items():
        for table in tables:
            rows = _rows(con, f'SELECT count(*) FROM "{table}"')[0][0] if table in owners else None
            out.append((stage, table, rows))
    for table, stage in sorted(owners.items()):  # tables of stages this report does not know about
        if table not in known:
            out.append((stage, table, _rows(con, f'SELECT count(*) FROM "{table}"')[0][0]))
    return out


def read_loss(live_dir: Path) -> tuple[list[float], list[float]] | None:
    """(steps, losses) from dvclive's train/loss history, or None when the file is missing or empty."""
    path = Path(live_dir) / LOSS_FILE
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as f:
        try:
            rows = [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: expected dvclive's step and loss columns: {err!r}") from None
    if not rows:
        return None
    return [s for s, _ in rows], [v for _, v in rows]


def read_eval(path: Path) -> dict[str, dict[str, dict[str, float]]] | None:
    """The evaluate stage's {model: {set: {metric: score}}}, or None when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


# ---------------------------------------------------------------- sections


def overview_section(con: duckdb.DuckDBPyConnection, owners: dict[str, str], live_dir: Path, metrics: Path) -> Section:
    """Rows per table of every stage, and which stages have not run yet."""
    counts = table_counts(con, owners)
    missing = [s for s, tables in STAGE_TABLES.items() if not any(t in owners for t in tables)]
    # A built stage without one of its tables is an older or partial file, not a stage still to run.
    rows = [
        (stage, table, n if n is not None else "not built yet" if stage in missing else "missing")
        for stage, table, n in counts
    ]
    if read_loss(live_dir) is None:
        missing.append("train")
    if read_eval(metrics) is None:
        missing.append("evaluate")
    note = ""
    if missing:
        note = "<p class=\"missing\">Stages not built yet: " + ", ".join(
            f"<code>dvc repro {escape(s)}</code>" for s in missing
        ) + "</p>"
    return Section("Stages, tables and rows", note + html_table(["stage", "table", "rows"], rows))


def queries_section(con: duckdb.DuckDBPyConnection, owners: dict[str, str]) -> Section:
    """Task-type mix, query length and copy-rate histograms, a few example queries."""
    if "queries" not in owners:
        return Section("Generated queries", not_built("queries"))
    mix = _rows(con, "SELECT task_type, count(*) AS n FROM queries GROUP BY ALL ORDER BY n DESC, task_type")
    total = sum(n for _, n in mix) or 1
    parts = [
        "<h3>Task-type mix</h3>",
        bar_chart([t for t, _ in mix], [n for _, n in mix], title="queries per task type"),
        html_table(["task type", "queries", "share"], [(t, n, f"{100 * n / total:.1f}%") for t, n in mix]),
    ]
    stats = _rows(con, "SELECT avg(query_words), median(query_words), avg(copy_rate), "
                       "count(*) FILTER (WHERE copy_rate = 1) FROM queries")[0]
    parts.append("<h3>Query length</h3>")
    parts.append(f"<p>mean {escape(fmt_num(stats[0]))} words, median {escape(fmt_num(stats[1]))}</p>")
    edges, counts = histogram_counts(con, "queries", "query_words", bins=20, integer=True)
    if counts:
        parts.append(histogram(edges, counts, xlabel="words per query"))
    parts.append("<h3>Copy rate</h3>")
    parts.append(
        f"<p>share of the query's words found in its seed passage: mean {escape(fmt_num(stats[2]))}, "
        f"{escape(fmt_num(stats[3]))} full copies</p>"
    )
    edges, counts = histogram_counts(con, "queries", "copy_rate", bins=10, lo=0.0, hi=1.0)
    if counts:
        parts.append(histogram(edges, counts, xlabel="copy rate (1 = every query word is in the passage)"))
    examples = _rows(con, "SELECT task_type, task, query FROM queries ORDER BY query_id LIMIT 5")
    parts.append("<h3>Examples</h3>" + html_table(["task type", "task", "query"], examples))
    if "generation_report" in owners:
        report = _rows(con, "SELECT metric, value FROM generation_report WHERE metric NOT LIKE 'task_type:%'")
        parts.append("<h3>Generation report</h3>" + html_table(["metric", "value"], report))
    return Section("Generated queries", "".join(parts))


def seed_rank_section(con: duckdb.DuckDBPyConnection, owners: dict[str, str]) -> Section:
    """Where the encoder ranks each query's seed passage among its mined neighbors."""
    if "seed_ranks" not in owners:
        return Section("Seed rank (encoder)", not_built("neighbors"))
    rows = _rows(
        con,
        "SELECT coalesce(seed_rank::varchar, 'not in top N') AS r, count(*) AS n FROM seed_ranks "
        "GROUP BY ALL ORDER BY min(seed_rank) NULLS LAST",
    )
    total = sum(n for _, n in rows) or 1
    at_1 = sum(n for r, n in rows if r == "1")
    body = (
        f"<p>The seed passage is the encoder's top neighbor for {100 * at_1 / total:.1f}% of "
        f"{total:,} queries.</p>"
        + bar_chart([r for r, _ in rows], [n for _, n in rows], title="queries per seed rank")
    )
    return Section("Seed rank (encoder)", body)


def selection_section(con: duckdb.DuckDBPyConnection, owners: dict[str, str]) -> Section:
    """How often the LLM's fused top (p1) differs from the seed, and the hard negatives per strategy."""
    if "positives" not in owners:
        return Section("Positives and hard negatives", not_built("triples"))
    n, differ = _rows(
        con,
        "SELECT count(*), count(*) FILTER (WHERE fused_top_id <> seed_id) FROM positives "
        "WHERE fused_top_id IS NOT NULL",
    )[0]
    share = f"{100 * differ / n:.1f}%" if n else "-"
    parts = [
        "<h3>p1 vs seed</h3>",
        f'<p class="big">{escape(share)}</p><p>of {n:,} queries with a fused ranking have a top passage (p1) '
        f"other than their seed ({differ:,} {'query' if differ == 1 else 'queries'}; about 15% in the Gecko paper).</p>",
    ]
    ranks = _rows(
        con,
        "SELECT coalesce(seed_fused_rank::varchar, 'not mined') AS r, count(*) AS n FROM positives "
        "GROUP BY ALL ORDER BY min(seed_fused_rank) NULLS LAST",
    )
    parts.append("<h3>Seed's fused rank</h3>")
    parts.append(bar_chart([r for r, _ in ranks], [c for _, c in ranks], title="queries per seed fused rank"))
    parts.append("<h3>Hard negatives per strategy</h3>")
    if "hard_negatives" in owners:
        neg = _rows(
            con,
            "SELECT strategy, count(*) AS negatives, count(DISTINCT query_id) AS queries, avg(fused_rank) "
            "FROM hard_negatives GROUP BY ALL ORDER BY negatives DESC, strategy",
        )
        if neg:
            parts.append(bar_chart([r[0] for r in neg], [r[1] for r in neg], title="negatives per strategy"))
        parts.append(html_table(["strategy", "negatives", "queries", "mean fused rank"], neg))
    else:
        parts.append(not_built("triples", "hard_negatives"))
    if "selection_report" in owners:
        cur = con.execute("SELECT * FROM selection_report")
        names = [d[0] for d in cur.description]
        row = cur.fetchone()
        if row is not None:
            parts.append("<h3>Selection report</h3>" + html_table(["count", "value"], list(zip(names, row))))
    return Section("Positives and hard negatives", "".join(parts))


def training_section(live_dir: Path) -> Section:
    """The training loss per step, from dvclive."""
    loss = read_loss(live_dir)
    if loss is None:
        return Section("Training loss", not_built("train", f"{Path(live_dir) / LOSS_FILE}"))
    steps, values = loss
    tail = values[-10:]
    body = (
        f"<p>{len(values):,} steps: loss {escape(fmt_num(values[0]))} at the first step, "
        f"{escape(fmt_num(sum(tail) / len(tail)))} over the last {len(tail)}.</p>"
        + line_chart(steps, values, xlabel="step", ylabel="loss")
    )
    return Section("Training loss", body)


def eval_section(metrics: Path) -> Section:
    """Base vs trained scores per eval set and metric: a table with the difference and a bar chart."""
    results = read_eval(metrics)
    if results is None:
        return Section("Evaluation: base vs trained", not_built("evaluate", str(metrics)))
    models = [m for m in ("base", "trained") if m in results] + sorted(set(results) - {"base", "trained"})
    keys = sorted({(task, metric) for m in models for task, ms in results[m].items() for metric in ms})
    table = []
    for task, metric in keys:
        scores = [results[m].get(task, {}).get(metric) for m in models]
        delta = scores[1] - scores[0] if len(scores) > 1 and None not in scores[:2] else None
        table.append((task, metric, *scores, *([f"{delta:+.4f}"] if len(models) > 1 else [])))
    header = ["set", "metric", *models, *(["trained - base"] if len(models) > 1 else [])]
    parts = [html_table(header, table)]
    from pipeline.evaluation.mteb_eval import versatility_line  # numpy only: mteb loads lazily

    line = versatility_line(results)
    if line:  # Gecko's claim is one model good at every category: the per-category means side by side
        parts.insert(0, f"<p><b>{escape(line)}</b> (mean main metric per category, and their mean)</p>")
    if "trained" not in results:
        parts.insert(0, not_built("train", "trained model"))
    if keys:
        series = {m: [results[m].get(t, {}).get(k) for t, k in keys] for m in models}
        parts.append(grouped_bar_chart([f"{t} {k}" for t, k in keys], series, title="eval scores"))
    return Section("Evaluation: base vs trained", "".join(parts))


# ---------------------------------------------------------------- page

CSS = """
body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top;max-width:520px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.missing{background:#fff6e0;border-left:4px solid #e0a800;padding:.5em .8em}
.big{font-size:2em;margin:.2em 0}svg{display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 .2em}
"""


def render_page(sections: Sequence[Section], subtitle: str) -> str:
    """Assemble the sections into one HTML document with inline CSS and a table of contents."""
    toc = "".join(f'<li><a href="#s{i}">{escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body = "".join(f'<section id="s{i}"><h2>{escape(s.title)}</h2>{s.body}</section>' for i, s in enumerate(sections))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>fret report</title>"
        f"<style>{CSS}</style></head><body><h1>fret report</h1><p>{escape(subtitle)}</p>"
        f"<ul>{toc}</ul>{body}</body></html>\n"
    )


def build_report(
    warehouse: Path = WAREHOUSE_DIR, metrics: Path = Path("metrics/eval.json"), live_dir: Path | None = None
) -> str:
    """The whole report as an HTML string.

    Args:
        warehouse: folder of stage DuckDB files (attached read-only).
        metrics: the evaluate stage's JSON.
        live_dir: dvclive's folder; default `dvclive` next to the warehouse folder.
    """
    warehouse = Path(warehouse)
    live_dir = warehouse.parent / "dvclive" if live_dir is None else Path(live_dir)
    con, owners = open_readonly(warehouse)
    try:
        sections = [
            overview_section(con, owners, live_dir, metrics),
            queries_section(con, owners),
            seed_rank_section(con, owners),
            selection_section(con, owners),
            training_section(live_dir),
            eval_section(metrics),
        ]
    finally:
        con.close()
    return render_page(sections, f"warehouse {warehouse}, metrics {metrics}, dvclive {live_dir}")


def write_report(output: Path, **kwargs) -> Path:
    """Build the report (`build_report` arguments) and write it to `output` atomically."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(build_report(**kwargs), encoding="utf-8")
    tmp.replace(output)
    return output
