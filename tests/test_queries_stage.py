"""python_steps/queries.py: the stage end to end on the tiny GPT-2, in a scratch repository."""

from __future__ import annotations

import duckdb
import pyarrow as pa
from fixtures_llm import tiny_llm_dir  # noqa: F401  (pytest fixture)

from pipeline.warehouse import stage_path, write_stage, write_table
from python_steps import queries as step


def test_stage_writes_tables_and_reuses_the_cache(tiny_llm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"base: {{seed: 3, threads: 1, device: cpu}}\n"
        f"llm: {{model: '{tiny_llm_dir}', dtype: float32, cache_path: cache/llm.duckdb}}\n"
        "generate: {max_new_tokens: 400, batch_size: 4, max_passage_words: 20, limit: 5}\n"
    )
    ids = [f"d{i}#0" for i in range(7)]
    with write_stage("passages") as con:
        write_table(con, "passages", pa.table({"passage_id": ids, "title": ids, "text": [f"text of {i} about rivers" for i in ids]}))
    step.main()
    first = capsys.readouterr().out
    assert "queries: 5 queries, 0 failures" in first and "5 generated" in first
    con = duckdb.connect(str(stage_path("queries")), read_only=True)
    try:
        assert con.execute("SELECT count(DISTINCT passage_id), count(*) FROM queries").fetchall()[0] == (5, 5)
        assert con.execute("SELECT count(*) FROM generation_failures").fetchall()[0] == (0,)
        assert con.execute("SELECT value FROM generation_report WHERE metric = 'queries_written'").fetchall()[0] == (5.0,)
        before = con.sql("SELECT * FROM queries ORDER BY query_id").fetchall()
    finally:
        con.close()
    step.main()
    assert "5 from the LLM cache, 0 generated" in capsys.readouterr().out
    con = duckdb.connect(str(stage_path("queries")), read_only=True)
    try:
        assert con.sql("SELECT * FROM queries ORDER BY query_id").fetchall() == before  # same table, created_at too
    finally:
        con.close()
