"""The openai backend against a real llama.cpp server (llama-cpp-python's) serving the SmolLM2 GGUF.

Slow: it starts `python -m llama_cpp.server` (llama-cpp-python, which `make test-server` builds once
and installs) on a free port of 127.0.0.1, and loads the in-process model too. It checks that
generation through the server is schema-valid, and that the server's QL and RC scores agree with
the in-process transformers backend on the same weights: the server runs the Q4_1 GGUF with
llama.cpp's kernels (activations quantized to 8 bits for the matmuls), in-process runs the same
GGUF dequantized to float32, so scores differ by rounding only. Measured here (llama-cpp-python
0.3.36, native CPU build) on 9 SciFact pairs: QL sums (9 to 26 tokens, -59 to -137 nats) at most
1.56 nats apart, per-token means 0.06, RC log-odds 0.34 (on values of -1 to -2.7); Spearman
correlation over the 9 pairs 1.0 for QL and 0.98 for RC; each query ranks its passages the same way
both ways. The tolerances below leave 2x margin or more.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from pipeline.llm import Decoding, load_llm, resolve_model
from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import GeneratedQuery, PromptTemplate, generate_queries, validate
from pipeline.llm.openai_backend import OpenAILLM
from pipeline.llm.scoring import ScoreTemplate, score_relevance
from pipeline.params import BaseParams, GenerateParams, LLMParams, ScoreParams

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
TASK = "Given a scientific claim, retrieve documents that support or refute the claim"
READY_DEADLINE_S = 180  # loading a 100 MB GGUF takes seconds; a loaded CI machine gets slack
QL_SUM_TOLERANCE = 3.0  # nats, per pair
QL_MEAN_TOLERANCE = 0.15  # nats per token
RC_TOLERANCE = 0.75  # log-odds
MIN_SPEARMAN = 0.9  # rank correlation of the 9 pairs' scores, server vs in-process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on the SmolLM2 GGUF; its base URL. Stopped when the module ends."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as err:
        pytest.fail(f"llama-cpp-python[server] is not installed ({err}): `make test-server` builds and installs it")
    gguf = resolve_model(LLMParams()).gguf
    port = _free_port()
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2-q4_1",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
        "--logits_all", "true",  # prompt log-probs (QL) need the logits of every position
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(process, url, log)
        _check_decodes(process, url, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"llama server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"llama server not ready within {READY_DEADLINE_S} s:\n{log.read_text()[-3000:]}")


def _check_decodes(process: subprocess.Popen, url: str, log: Path) -> None:
    """One short completion of a multi-token prompt, so a server that crashes in its kernels fails
    here with its exit status and log, not later as 'connection refused' in every test."""
    try:
        httpx.post(url + "/completions", json={"prompt": "The cell divides", "max_tokens": 2, "temperature": 0},
                   timeout=60)
    except httpx.TransportError:
        pass
    time.sleep(0.2)
    if process.poll() is not None:
        pytest.fail(f"llama server died on a 3-token prompt (exit {process.returncode}; -11 is a segfault: "
                    f"a wheel built with AMX, see the Makefile):\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server_llm(server: str) -> Iterator[OpenAILLM]:
    params = LLMParams(backend="openai", base_urls=[server], json_output="grammar", concurrency=2,
                       timeout_s=300, max_retries=1)
    llm = load_llm(params, BaseParams(threads=2, device="cpu"))
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def local_llm():
    # float32: the GGUF dequantized exactly; the server computes from the same weights with its own kernels.
    return load_llm(LLMParams(dtype="float32"), BaseParams(threads=2, device="cpu"))


def _jsonl(path: Path) -> dict[str, dict]:
    with open(path, encoding="utf-8") as f:
        return {row["_id"]: row for row in map(json.loads, f)}


@pytest.fixture(scope="module")
def sample() -> tuple[pa.Table, pa.Table]:
    """3 SciFact claims with a relevant passage each: the passages, and all 9 (claim, passage) pairs."""
    corpus, claims = _jsonl(SAMPLE / "corpus.jsonl"), _jsonl(SAMPLE / "queries.jsonl")
    qrels = [line.split("\t")[:2] for line in (SAMPLE / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    chosen = [(q, d) for q, d in qrels if d in corpus][:3]
    passages = pa.table({
        "passage_id": [f"{d}#0" for _, d in chosen],
        "title": [corpus[d]["title"] for _, d in chosen],
        "text": [" ".join(corpus[d]["text"].split()[:120]) for _, d in chosen],
    })
    rows = [(f"q{q}", claims[q]["text"], f"{d}#0", k) for q, _ in chosen for k, (_, d) in enumerate(chosen, 1)]
    texts = dict(zip(passages.column("passage_id").to_pylist(), passages.to_pylist()))
    pairs = pa.table({
        "query_id": [r[0] for r in rows], "passage_id": [r[2] for r in rows], "knn_rank": [r[3] for r in rows],
        "task": [TASK] * len(rows), "query": [r[1] for r in rows],
        "title": [texts[r[2]]["title"] for r in rows], "text": [texts[r[2]]["text"] for r in rows],
    })
    return passages, pairs


def test_server_generation_is_schema_valid(server_llm, sample, tmp_path):
    passages, _ = sample
    template = PromptTemplate()
    prompts = [server_llm.chat_prompt(template.messages("fact checking", r["title"], r["text"]))
               for r in passages.to_pylist()]
    completions = server_llm.generate_json(prompts, GeneratedQuery, [Decoding(i) for i in range(3)], 96)
    for c in completions:
        assert c.finished, c  # the grammar ended the JSON before max_new_tokens
        GeneratedQuery.model_validate_json(c.text)  # raises if the server broke the schema
    # The stage's path: every query written is valid; a failure may only be a copied few-shot example
    # (the server cannot be stopped mid-row: its copies are found when they end).
    params = GenerateParams(batch_size=3, max_passage_words=120, max_failure_rate=1.0)
    result = generate_queries(passages, server_llm, params, 42, LLMCache(tmp_path / "llm.duckdb"), template,
                              progress=False)
    print(f"generation through the server: {result.stats['generate_seconds']:.1f} s, "
          f"{result.stats['tokens_per_s']:.1f} tokens/s")
    assert result.queries.num_rows + result.failures.num_rows == 3 and result.queries.num_rows >= 2
    for row in result.queries.to_pylist():
        assert validate(json.dumps({"task": row["task"], "query": row["query"]}))[0] is not None
        assert row["llm"].startswith("openai:smollm2-q4_1|SmolLM2-135M-Instruct.Q4_1@")
    assert all("few-shot example" in f["reason"] for f in result.failures.to_pylist())


def test_server_scores_agree_with_in_process(server_llm, local_llm, sample, tmp_path):
    _, pairs = sample
    template = ScoreTemplate()
    params = ScoreParams(batch_size=9)
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        scorer = server_llm.scorer(template.yes_words, template.no_words)
        remote = score_relevance(pairs, server_llm, params, cache, template, progress=False, scorer=scorer)
        local = score_relevance(pairs, local_llm, params, cache, template, progress=False)
    assert remote.stats["computed"] == local.stats["computed"] == 18  # different identities: no shared entries
    a = {(r["query_id"], r["passage_id"]): r for r in remote.scores.to_pylist()}
    b = {(r["query_id"], r["passage_id"]): r for r in local.scores.to_pylist()}
    assert a.keys() == b.keys() and len(a) == 9
    diffs = {k: {m: abs(a[k][m] - b[k][m]) for m in ("ql_sum", "ql_mean", "rc_logodds")} for k in a}
    print(f"scoring 18 prompts: server {remote.stats['score_seconds']:.1f} s, in-process {local.stats['score_seconds']:.1f} s")
    for k in sorted(a):  # the measured agreement, in the log of a failing run (pytest -s shows it always)
        print(k, {m: (round(a[k][m], 3), round(b[k][m], 3)) for m in ("ql_sum", "ql_mean", "rc_logodds", "ql_tokens")})
    assert scorer.floored == 0  # SmolLM2 puts yes and no in its top 20 for these prompts
    for key in a:
        assert a[key]["ql_tokens"] == b[key]["ql_tokens"], key
        assert diffs[key]["ql_sum"] < QL_SUM_TOLERANCE, (key, a[key], b[key])
        assert diffs[key]["ql_mean"] < QL_MEAN_TOLERANCE, (key, a[key], b[key])
        assert diffs[key]["rc_logodds"] < RC_TOLERANCE, (key, a[key], b[key])
    keys = sorted(a)
    for m in ("ql_sum", "rc_logodds"):
        assert _spearman([a[k][m] for k in keys], [b[k][m] for k in keys]) >= MIN_SPEARMAN, m
    # QL ranks within each query (its scores are nats apart here): the same order both ways.
    assert {k: a[k]["ql_rank"] for k in a} == {k: b[k]["ql_rank"] for k in b}


def _spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (no ties here: the scores are floats of different prompts)."""
    import numpy as np

    rx, ry = (np.argsort(np.argsort(v)).astype(float) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])
