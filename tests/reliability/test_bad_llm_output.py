"""Bad LLM output: invalid JSON, empty strings, endless text, wrong types, exceptions.

A scripted LLM (the `JsonLLM` protocol that pipeline/llm/generate.py uses) answers each passage with one
kind of bad output. Every failure must land in `generation_failures` with its reason, be retried
`max_retries` times, never be cached, and the stage must finish with the count; above
`generate.max_failure_rate` it must fail loudly and leave the stage file as it was.
tests/test_generate.py already covers a schema-valid-but-too-short output, rescue by a retry and
the failure-rate error of generate_queries itself; this file covers the other kinds of bad output,
exceptions, and the stage-level behaviour.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import file_digests, table_digest

from pipeline.llm import Completion
from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import GenerationError, generate_queries
from pipeline.params import GenerateParams

GOOD = '{"task": "Given a question, retrieve passages that answer it", "query": "what do rivers carry %s"}'
ENDLESS = '{"task": "' + "and so on " * 20_000  # 200 kB, never closed: cut at max_new_tokens
BAD = {
    "invalid_json": ("{task: 'single quotes', query: nope}", True, "Invalid JSON"),
    "empty": ("", True, "Invalid JSON"),
    "endless": (ENDLESS, False, "cut at max_new_tokens=64"),
    "wrong_types": ('{"task": 12345678901, "query": ["a", "list"]}', True, "task: Input should be a valid string"),
    "not_an_object": ("[1, 2, 3]", True, "Input should be an object"),
    "extra_key": ('{"task": "Given a question, find it", "query": "rivers carry sand", "x": 1}', True, "x: Extra"),
    "lone_surrogate": ('{"task": "\\ud800 Given a question", "query": "rivers carry sand"}', True, "hex escape"),
    "control_char": ('{"task": "Given a\\nquestion here", "query": "rivers carry sand"}', True, "task: String should match"),
}


class ScriptedLLM:
    """Answers by passage id (found in the prompt): a bad kind from BAD, `raise`, or a valid output."""

    identity = "scripted-llm"

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.calls: Counter = Counter()

    def chat_prompt(self, messages):
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def generate_json(self, prompts, schema, decodings, max_new_tokens, retry=None, stop=None):
        """Both protocols: without `retry` one answer per row; with it, the caller's `retry(i, answer)`
        returns the decoding of a new attempt of row i, or None when the row is done."""
        out = []
        for i, prompt in enumerate(prompts):
            while True:
                answer = self._answer(prompt, max_new_tokens)
                if retry is None or retry(i, answer) is None:
                    out.append(answer)
                    break
        return out

    def _answer(self, prompt, max_new_tokens):
        pid = next(p for p in self.script if f"TITLE-{p}\n" in prompt or prompt.rstrip().endswith(f"TITLE-{p}"))
        self.calls[pid] += 1
        kind = self.script[pid]
        if kind == "raise":
            raise RuntimeError(f"backend crashed on {pid}")
        if kind == "ok":
            return Completion(GOOD % pid, 20, True)
        text, finished, _ = BAD[kind]
        return Completion(text, max_new_tokens if not finished else 20, finished)


def passages(ids) -> pa.Table:
    return pa.table({
        "passage_id": list(ids),
        "title": [f"TITLE-{p}" for p in ids],
        "text": [f"Rivers carry sediment, passage {p}, to the sea." for p in ids],
    })  # fmt: skip


def params(**kw) -> GenerateParams:
    return GenerateParams(**{"max_new_tokens": 64, "batch_size": 3, "max_retries": 2, "max_failure_rate": 1.0, **kw})


def test_every_bad_output_is_recorded_retried_and_never_cached(tmp_path):
    script = {f"bad-{kind}": kind for kind in BAD} | {f"ok-{i}": "ok" for i in range(3)}
    llm = ScriptedLLM(script)
    with LLMCache(tmp_path / "c.duckdb") as cache:
        result = generate_queries(passages(script), llm, params(), 42, cache, progress=False)
        assert cache.count() == 3  # the valid outputs only
    failures = {f["passage_id"]: f for f in result.failures.to_pylist()}
    assert set(failures) == {f"bad-{kind}" for kind in BAD}
    for kind, (text, _, reason) in BAD.items():
        f = failures[f"bad-{kind}"]
        assert f["attempts"] == 3 and llm.calls[f"bad-{kind}"] == 3, kind  # first try + max_retries
        assert reason in f["reason"], (kind, f["reason"])
        assert f["raw_output"] == text  # kept whole, for inspection
    assert sorted(result.queries.column("passage_id").to_pylist()) == ["ok-0", "ok-1", "ok-2"]
    report = dict(zip(result.report.column("metric").to_pylist(), result.report.column("value").to_pylist()))
    assert report["failures"] == len(BAD) and report["queries_written"] == 3
    assert result.stats["failures"] == len(BAD)

    with LLMCache(tmp_path / "c.duckdb") as cache:  # a re-run retries the failures, never the cached ones
        again = generate_queries(passages(script), llm, params(), 42, cache, progress=False)
    assert all(llm.calls[p] == 1 for p in script if p.startswith("ok-"))
    assert all(llm.calls[p] == 6 for p in script if p.startswith("bad-"))
    assert again.failures.num_rows == len(BAD)


def test_failure_rate_is_exact_at_the_threshold(tmp_path):
    script = {"bad": "empty", "ok-1": "ok", "ok-2": "ok", "ok-3": "ok"}
    ok = generate_queries(passages(script), ScriptedLLM(script), params(max_failure_rate=0.25), 42, LLMCache(None),
                          progress=False)  # fmt: skip
    assert ok.failures.num_rows == 1  # 25% is allowed at 0.25
    with pytest.raises(GenerationError, match=r"1 of 4 queries \(25.0%\)"):
        generate_queries(passages(script), ScriptedLLM(script), params(max_failure_rate=0.24), 42, LLMCache(None),
                         progress=False)  # fmt: skip


def test_an_llm_exception_is_recorded_as_a_failure(tmp_path):
    script = {"boom": "raise", "ok-1": "ok", "ok-2": "ok"}
    result = generate_queries(passages(script), ScriptedLLM(script), params(batch_size=1), 42, LLMCache(None),
                              progress=False)  # fmt: skip
    (failure,) = result.failures.to_pylist()
    assert failure["passage_id"] == "boom" and "backend crashed" in failure["reason"]


def test_an_llm_exception_is_retried_never_cached_and_the_other_batches_finish(tmp_path):
    # batch_size 1 makes every passage its own batch.
    script = {"boom": "raise"} | {f"ok-{i}": "ok" for i in range(5)}
    llm = ScriptedLLM(script)
    with LLMCache(tmp_path / "c.duckdb") as cache:
        result = generate_queries(passages(script), llm, params(batch_size=1), 42, cache, progress=False)
    assert [f["passage_id"] for f in result.failures.to_pylist()] == ["boom"]
    assert llm.calls["boom"] == 3  # first try + max_retries
    with LLMCache(tmp_path / "c.duckdb") as cache:
        stored = [json.loads(v)["query"] for (v,) in cache._con.execute("SELECT value FROM llm_cache").fetchall()]
    assert sorted(stored) == sorted(f"what do rivers carry ok-{i}" for i in range(5))  # the failure is not cached


@pytest.mark.parametrize("failing", ["raise", "rate"])
def test_a_failing_queries_stage_leaves_its_file_and_keeps_the_cache(failing, tmp_path, monkeypatch, capsys):
    """The stage fails loudly (message, non-zero exit) and `warehouse/queries.duckdb` is untouched."""
    from pipeline import llm as llm_module
    from pipeline.warehouse import write_stage, write_table
    from python_steps import queries as stage

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        "llm: {model: scripted, cache_path: cache/llm.duckdb}\n"
        "generate: {max_new_tokens: 64, batch_size: 1, max_retries: 1, max_failure_rate: 0.2}\n"
    )
    script = {"bad-1": "raise" if failing == "raise" else "endless", "bad-2": "empty"} | {f"ok-{i}": "ok" for i in range(3)}
    with write_stage("passages") as con:
        write_table(con, "passages", passages(script))
    with write_stage("queries", upstream=["passages"]) as con:
        write_table(con, "queries", pa.table({"query_id": ["previous"]}))
    before = file_digests(Path("warehouse"))
    llm = ScriptedLLM(script)
    monkeypatch.setattr(llm_module, "load_llm", lambda *a: llm)
    with pytest.raises(BaseException) as info:
        stage.main()
    # an exception is a recorded failure like any other: both variants fail on the rate, loudly
    assert info.type is SystemExit and "2 of 5 queries (40.0%) failed validation" in str(info.value)
    assert file_digests(Path("warehouse")) == before
    assert table_digest(Path("warehouse/queries.duckdb"), "queries")[0] == 1
    with LLMCache(Path("cache/llm.duckdb")) as cache:
        cached = cache.count()
    assert cached == sum(llm.calls[p] > 0 for p in script if p.startswith("ok-"))
    assert cached == 3  # the good work survives a failed stage: the re-run reuses it
