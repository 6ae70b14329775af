"""python_steps.passages: params in, warehouse/passages.duckdb out; and the bundled sample it reads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from pipeline.ingest import ingest_corpus
from pipeline.params import CorpusParams
from python_steps import passages

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
GOOD = "alpha beta gamma delta epsilon zeta"


def make_project(root: Path, corpus_lines: list[bytes], on_error: str = "fail") -> None:
    (root / "data").mkdir(parents=True)
    (root / "data" / "c.jsonl").write_bytes(b"".join(line + b"\n" for line in corpus_lines))
    (root / "params.yaml").write_text(
        f"corpus:\n  path: data/c.jsonl\n  max_words: 10\n  overlap_words: 2\n  on_error: {on_error}\n",
        encoding="utf-8",
    )


def read_tables(root: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(root / "warehouse" / "passages.duckdb"), read_only=True)
    try:
        return {
            "passages": con.execute("SELECT passage_id, n_words, source FROM passages ORDER BY passage_id").fetchall(),
            "ingest_report": dict(con.execute("SELECT metric, count FROM ingest_report").fetchall()),
            "ingest_errors": con.execute("SELECT file, line, kind FROM ingest_errors").fetchall(),
        }
    finally:
        con.close()


def test_stage_writes_passages_report_and_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    lines = [
        json.dumps({"_id": "a", "title": "T", "text": " ".join(f"w{i}" for i in range(15))}).encode(),
        b"{not json",
        json.dumps({"_id": "b", "text": GOOD}).encode(),
    ]
    make_project(tmp_path, lines, on_error="skip")
    monkeypatch.chdir(tmp_path)
    passages.main()
    tables = read_tables(tmp_path)
    assert tables["passages"] == [("a#0", 10, "data/c.jsonl:1"), ("a#1", 7, "data/c.jsonl:1"), ("b#0", 6, "data/c.jsonl:3")]
    assert tables["ingest_report"]["passages"] == 3 and tables["ingest_report"]["malformed"] == 1
    assert tables["ingest_errors"] == [("data/c.jsonl", 2, "malformed")]
    out = capsys.readouterr().out
    assert "3 passages from 2 documents" in out and "MB/s" in out and "data/c.jsonl:2: malformed" in out


def test_stage_failure_names_file_and_line_and_keeps_the_old_table(tmp_path: Path, monkeypatch) -> None:
    make_project(tmp_path, [json.dumps({"_id": "a", "text": GOOD}).encode()])
    monkeypatch.chdir(tmp_path)
    passages.main()
    before = read_tables(tmp_path)
    (tmp_path / "data" / "c.jsonl").write_bytes(b'{"_id": "a", "text": 3}\n')
    with pytest.raises(SystemExit, match=r"passages: data/c.jsonl:1: wrong_type: text must be a string"):
        passages.main()
    assert read_tables(tmp_path) == before


def test_stage_runs_as_a_module_like_dvc_does(tmp_path: Path) -> None:
    make_project(tmp_path, [json.dumps({"_id": "a", "text": GOOD}).encode()])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "python_steps.passages"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert read_tables(tmp_path)["passages"] == [("a#0", 6, "data/c.jsonl:1")]


def test_bundled_sample_is_consistent_and_ingests_cleanly() -> None:
    result = ingest_corpus(CorpusParams(), REPO)  # the default corpus.path is the sample
    assert result.report["documents"] == 1000 and result.report["errors"] == 0
    doc_ids = set(result.passages.column("doc_id").to_pylist())
    with (SAMPLE / "qrels" / "test.tsv").open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        assert next(reader) == ["query-id", "corpus-id", "score"]
        qrels = list(reader)
    with (SAMPLE / "qrels" / "train.tsv").open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        assert next(reader) == ["query-id", "corpus-id", "score"]
        dev_qrels = list(reader)
    query_ids = {json.loads(line)["_id"] for line in (SAMPLE / "queries.jsonl").read_text(encoding="utf-8").splitlines()}
    test_ids, dev_ids = {q for q, _, _ in qrels}, {q for q, _, _ in dev_qrels}
    assert len(qrels) == 339 and len(test_ids) == 300 and len(dev_qrels) == 336 and len(dev_ids) == 316
    # The dev split (SciFact train queries) never shares a query with test, and every judged doc is here.
    assert test_ids | dev_ids == query_ids and not test_ids & dev_ids
    assert {d for _, d, _ in qrels + dev_qrels} <= doc_ids
    assert (SAMPLE / "LICENSE").read_text(encoding="utf-8").count("CC BY-NC 2.0") >= 1
