"""Stage `passages`: read the corpus named in params.yaml into `warehouse/passages.duckdb`.

Tables: `passages` (one row per passage), `ingest_report` (metric, count) and `ingest_errors`
(file, line, kind, message: every record skipped under `corpus.on_error: skip`).
Run from the repository root: `python -m python_steps.passages`.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.ingest import IngestError, IngestResult, ingest_corpus
from pipeline.params import PARAMS_FILE, ParamsError, load_params
from pipeline.warehouse import write_stage, write_table

STAGE = "passages"


def main() -> None:
    started = time.perf_counter()
    try:
        params = load_params(PARAMS_FILE)
        result = ingest_corpus(params.corpus, Path(PARAMS_FILE).resolve().parent)
    except (ParamsError, IngestError) as err:
        # One clear line for DVC's log instead of a traceback: the message names file and line.
        raise SystemExit(f"{STAGE}: {err}") from None
    with write_stage(STAGE) as con:
        rows = write_table(con, "passages", result.passages)
        write_table(con, "ingest_report", result.report_table())
        write_table(con, "ingest_errors", result.errors_table())
    print(summary(result, rows, time.perf_counter() - started, str(params.corpus.path)))


def summary(result: IngestResult, rows: int, seconds: float, corpus: str) -> str:
    """A one-screen account: rows written, time, throughput, the non-zero counts, a few skipped records."""
    r = result.report
    mb = result.input_bytes / 1e6
    lines = [
        f"{STAGE}: {rows:,} passages from {r['documents']:,} documents of {corpus} "
        f"({mb:.1f} MB, {r['files']} file(s)) in {seconds:.2f} s",
        f"  ingest {result.seconds:.2f} s: {r['records_read'] / max(result.seconds, 1e-9):,.0f} records/s, "
        f"{mb / max(result.seconds, 1e-9):.1f} MB/s",
        "  " + ", ".join(f"{k} {v:,}" for k, v in r.items() if v and k not in ("files", "passages", "documents")),
    ]
    if result.errors:
        lines.append(f"  skipped {len(result.errors):,} record(s) (table ingest_errors); first ones:")
        lines += [f"    {e.file}:{e.line if e.line is not None else '-'}: {e.kind}: {e.message}" for e in result.errors[:5]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
