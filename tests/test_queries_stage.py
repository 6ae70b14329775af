"""python_steps/queries.py: the stage end to end on the tiny GPT-2, in a scratch repository."""

from __future__ import annotations

import duckdb
import pytest
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


def _labelled(folder):
    import json

    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "a", "title": "Ice", "text": "glaciers move ice"}) + "\n")
    claims = {"c1": "Glaciers move ice downhill.", "c2": "Ice never moves."}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in claims.items()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nc1\ta\t1\nc2\ta\t1\n")


def test_stage_shows_the_users_labelled_queries_as_examples(tiny_llm_dir, tmp_path, monkeypatch, capsys):
    from pipeline.llm.generate import PromptTemplate
    from pipeline.params import load_params

    monkeypatch.chdir(tmp_path)
    _labelled(tmp_path / "labelled")
    examples = (
        "  task_types: [fact checking]\n  examples:\n"
        "    - {path: labelled, n: 2, task_type: fact checking, task: Find evidence for the claim}\n"
    )
    (tmp_path / "params.yaml").write_text(
        f"base: {{seed: 3, threads: 1, device: cpu}}\n"
        f"llm: {{model: '{tiny_llm_dir}', dtype: float32, cache_path: cache/llm.duckdb}}\n"
        "generate:\n  max_new_tokens: 400\n  batch_size: 4\n  max_passage_words: 20\n  limit: 3\n" + examples
    )
    with write_stage("passages") as con:
        ids = ["d1#0", "d2#0", "d3#0"]
        write_table(con, "passages", pa.table({"passage_id": ids, "title": ids, "text": ["rivers"] * 3}))
    template = step.prompt_template(load_params("params.yaml").generate, 3)
    assert {e["query"] for e in template.examples if e["task_type"] == "fact checking"} == {
        "Glaciers move ice downhill.", "Ice never moves."
    }  # fmt: skip
    step.main()
    assert "queries: 3 queries" in capsys.readouterr().out
    con = duckdb.connect(str(stage_path("queries")), read_only=True)
    try:
        hashes = con.sql("SELECT DISTINCT prompt_hash, task_type FROM queries").fetchall()
    finally:
        con.close()
    assert hashes == [(template.hash, "fact checking")] and template.hash != PromptTemplate().hash
    # Asking for more examples than the file has fails with the file named, before the LLM loads.
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text().replace("n: 2", "n: 3"))
    monkeypatch.setattr(step.LLMStage, "load_llm", lambda self: pytest.fail("the LLM was loaded"))
    with pytest.raises(SystemExit, match=r"queries: generate\.examples: labelled/qrels/train\.tsv has 2 usable queries"):
        step.main()
