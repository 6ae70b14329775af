"""`fret report`: numbers and sections from a tiny hand-made warehouse, escaping, missing stages, rendering."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import warehouse as wh
from pipeline.cli import main
from pipeline.report import build_report, histogram_counts

EVIL = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")


def make_project(root: Path) -> Path:
    """warehouse/ with every stage's tables (only the columns the report reads), dvclive/ and metrics/."""
    warehouse = root / "warehouse"
    with wh.write_stage("passages", warehouse=warehouse) as con:
        wh.write_table(con, "passages", pa.table({"passage_id": [f"p{i}" for i in range(6)]}))
        wh.write_table(con, "ingest_report", pa.table({"metric": ["passages"], "count": [6]}))
    with wh.write_stage("queries", warehouse=warehouse) as con:
        wh.write_table(
            con,
            "queries",
            pa.table(
                {
                    "query_id": ["q1", "q2", "q3", "q4"],
                    "passage_id": ["p1", "p2", "p3", "p4"],
                    "task_type": ["question answering", "question answering", "fact checking", "question answering"],
                    "task": ["Answer the question", "Answer the question", "Verify the claim", "Answer"],
                    "query": [EVIL, "what is a fret", "frets are metal", "who made the guitar"],
                    "query_words": pa.array([1, 4, 3, 12], pa.int32()),
                    "copy_rate": [0.0, 0.25, 1.0, 0.55],
                }
            ),
        )
        wh.write_table(con, "generation_report", pa.table({"metric": ["mean_copy_rate"], "value": [0.45]}))
    with wh.write_stage("neighbors", warehouse=warehouse) as con:
        wh.write_table(
            con,
            "seed_ranks",
            pa.table({"query_id": ["q1", "q2", "q3", "q4"], "seed_rank": pa.array([1, 1, 3, None], pa.int64())}),
        )
    with wh.write_stage("triples", warehouse=warehouse) as con:
        wh.write_table(
            con,
            "positives",
            pa.table(
                {
                    "query_id": ["q1", "q2", "q3", "q4"],
                    "seed_id": ["p1", "p2", "p3", "p4"],
                    "fused_top_id": ["p1", "p5", "p3", None],
                    "seed_fused_rank": pa.array([1, 2, 1, None], pa.int64()),
                }
            ),
        )
        wh.write_table(
            con,
            "hard_negatives",
            pa.table(
                {
                    "query_id": ["q1", "q1", "q2"],
                    "strategy": ["lowest", "lowest", "lowest"],
                    "fused_rank": pa.array([9, 8, 10], pa.int64()),
                }
            ),
        )
    loss = root / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    loss.parent.mkdir(parents=True)
    loss.write_text("step\tloss\n0\t2.5\n1\t2.0\n2\t1.25\n3\t0.75\n", encoding="utf-8")
    metrics = root / "metrics" / "eval.json"
    metrics.parent.mkdir()
    metrics.write_text(
        json.dumps(
            {
                "base": {"sample": {"ndcg_at_10": 0.5, "recall_at_100": 0.8}},
                "trained": {"sample": {"ndcg_at_10": 0.625, "recall_at_100": 0.9}},
            }
        ),
        encoding="utf-8",
    )
    return root


@pytest.fixture()
def project(tmp_path):
    return make_project(tmp_path / "proj")


def report_via_cli(root: Path, out: Path) -> str:
    res = CliRunner().invoke(
        main,
        ["report", "--warehouse", str(root / "warehouse"), "--metrics", str(root / "metrics" / "eval.json"),
         "--output", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert f"report: {out}" in res.output
    return out.read_text(encoding="utf-8")


def text_of(html: str) -> str:
    """Visible text, tags stripped, whitespace collapsed (for asserting on numbers)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_full_report_numbers_and_sections(project, tmp_path):
    html = report_via_cli(project, tmp_path / "r.html")
    text = text_of(html)
    for title in ("Stages, tables and rows", "Generated queries", "Seed rank (encoder)",
                  "Positives and hard negatives", "Training loss", "Evaluation: base vs trained"):
        assert title in text
    assert "not built yet: run" not in text  # every input exists (llm_scores' table is merely listed as missing)
    assert "passages passages 6" in text and "queries queries 4" in text and "triples hard_negatives 3" in text
    assert "question answering 3 75.0%" in text and "fact checking 1 25.0%" in text
    assert "mean 5 words" in text and "1 full copies" in text
    # seed_ranks: 2 of 4 at rank 1; positives: q2 has p1 != seed, q4 has no fused ranking
    assert "top neighbor for 50.0% of 4 queries" in text and "not in top N" in text
    assert "33.3%" in text and "of 3 queries with a fused ranking" in text and "not mined" in text
    assert "lowest 3 2 9" in text  # strategy, negatives, queries, mean fused rank
    assert "4 steps: loss 2.5 at the first step, 1.625 over the last 4" in text
    assert "sample ndcg_at_10 0.5 0.625 +0.1250" in text and "sample recall_at_100 0.8 0.9 +0.1000" in text
    assert html.count("<svg") == 8  # task mix, length, copy rate, seed rank, seed fused rank, negatives, loss, eval
    # self-contained: no external script, stylesheet, image or font
    assert not re.search(r"<script|<link|src=|@import|url\(", html, re.I)


def test_query_text_is_escaped(project, tmp_path):
    html = report_via_cli(project, tmp_path / "r.html")
    assert EVIL not in html
    assert escape_once(EVIL) in html


def escape_once(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_only_passages_built(tmp_path):
    root = tmp_path / "proj"
    with wh.write_stage("passages", warehouse=root / "warehouse") as con:
        wh.write_table(con, "passages", pa.table({"passage_id": ["p1", "p2"]}))
    html = report_via_cli(root, tmp_path / "r.html")
    text = text_of(html)
    assert "passages passages 2" in text and "queries queries not built yet" in text
    for stage in ("queries", "neighbors", "triples", "train", "evaluate"):
        assert f"not built yet: run dvc repro {stage}" in text, stage
    assert "<svg" not in html


def test_no_warehouse_at_all(tmp_path):
    html = build_report(tmp_path / "nowhere", tmp_path / "eval.json")
    assert "not built yet: run <code>dvc repro passages</code>" not in html  # overview lists it instead
    assert "dvc repro passages" in html and "dvc repro evaluate" in html


def test_base_only_eval_says_train_missing(project, tmp_path):
    metrics = project / "metrics" / "eval.json"
    metrics.write_text(json.dumps({"base": {"sample": {"ndcg_at_10": 0.5}}}), encoding="utf-8")
    text = text_of(build_report(project / "warehouse", metrics))
    assert "trained model: not built yet: run dvc repro train" in text
    assert "sample ndcg_at_10 0.5" in text


def test_bad_metrics_file_is_a_clear_error(project, tmp_path):
    (project / "metrics" / "eval.json").write_text("{not json", encoding="utf-8")
    res = CliRunner().invoke(main, ["report", "--warehouse", str(project / "warehouse"),
                                    "--metrics", str(project / "metrics" / "eval.json"),
                                    "--output", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "eval.json: not valid JSON" in res.output


def test_histogram_counts_integer_and_fixed_range(project):
    con, _ = wh.open_readonly(project / "warehouse")
    try:
        edges, counts = histogram_counts(con, "queries", "query_words", bins=4, integer=True)
        assert edges == [1, 4, 7, 10, 13] and counts == [2, 1, 0, 1]  # 1, 3 | 4 | - | 12
        edges, counts = histogram_counts(con, "queries", "copy_rate", bins=4, lo=0.0, hi=1.0)
        assert edges == [0.0, 0.25, 0.5, 0.75, 1.0] and counts == [1, 1, 1, 1]  # 1.0 goes in the last bin
    finally:
        con.close()


def screenshot(html_path: Path, png: Path, profile: Path, height: int = 2400) -> None:
    """Render `html_path` with headless Chromium into `png` (no network, throwaway profile)."""
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size=1200,{height}",
         html_path.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )


def test_renders_in_chromium(project, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium) - render check skipped")
    report = tmp_path / "r.html"
    report_via_cli(project, report)
    png = tmp_path / "shot.png"
    screenshot(report, png, tmp_path / "profile")
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if keep := os.environ.get("FRET_REPORT_PNG"):  # a copy to look at: FRET_REPORT_PNG=/tmp/shot.png
        shutil.copyfile(png, keep)
