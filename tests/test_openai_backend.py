"""pipeline/llm/openai_backend.py against real sockets on 127.0.0.1: a port that never answers, and small
HTTP servers (http.server, one thread each) that answer in the OpenAI completions format.

The canned servers tokenize with the same local tokenizer the client uses, so the QL answers have
real token texts and offsets; their log-probs are made up (-0.1 x (position % 7 + 1)), which lets
the tests compute the expected sums.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from fixtures_llm import tiny_llm_dir  # noqa: F401  (pytest fixture)

from pipeline.llm import LLMError, load_llm
from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import GeneratedQuery, generate_queries
from pipeline.llm.openai_backend import OpenAILLM, ServerError, ServerPool, structured_output
from pipeline.llm.scoring import ScoreTemplate, score_relevance
from pipeline.params import BaseParams, GenerateParams, LLMParams, ParamsError, ScoreParams, load_params

MODEL = "stub-model"


def _fake_logprob(position: int) -> float:
    return -0.1 * (position % 7 + 1)


class Gauge:
    """Requests being answered at once, over all the stubs that share it, and the most seen."""

    def __init__(self) -> None:
        self.now = self.max = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


class Stub:
    """An OpenAI-format server on a free port: `/models` and `/completions` (generation, QL echo, RC top-k).

    Attributes:
        bodies: every completions request body received.
        gauge: requests in flight (its own, or shared with other stubs).
    """

    def __init__(self, tokenizer: Any, delay: float = 0.0, write: Callable[[str], str] | None = None,
                 status: int = 200, gauge: Gauge | None = None):
        self.tokenizer, self.delay, self.status = tokenizer, delay, status
        self.gauge = gauge or Gauge()
        self.write = write or (lambda prompt: json.dumps(
            {"task": "Find the passage that answers the question", "query": f"what does {_title(prompt)} say"}))
        self.top: dict[str, float] = {" yes": -0.5, "Yes": -1.5, "no": -2.0, "maybe": -3.0}
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def completions(self, body: dict) -> dict:
        prompt = body["prompt"]
        if body.get("echo"):
            return self._echo(prompt)
        if body.get("logprobs"):
            top = dict(sorted(self.top.items(), key=lambda kv: -kv[1])[: body["logprobs"]])
            return _answer("x", {"tokens": ["x"], "token_logprobs": [-1.0], "text_offset": [len(prompt)],
                                 "top_logprobs": [top]}, 1)
        text = self.write(prompt)
        return _answer(text, None, len(text) // 4, "stop")

    def _echo(self, prompt: str) -> dict:
        enc = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        tokens = [prompt[a:b] for a, b in spans] + ["!"]
        values = [None] + [_fake_logprob(i) for i in range(1, len(spans) + 1)]
        offsets = [a for a, _ in spans] + [len(prompt)]
        answer = _answer(prompt + "!", {"tokens": tokens, "token_logprobs": values, "text_offset": offsets,
                                        "top_logprobs": [None] * len(tokens)}, 1)
        answer["usage"]["prompt_tokens"] = len(spans)
        return answer

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.bodies.append(body)
                # The gauge is left before the answer goes out: a client that has its answer may send
                # its next request at once, which must not count as one more in flight.
                with stub.gauge:
                    time.sleep(stub.delay)
                    if stub.status != 200:
                        status, payload = stub.status, {"error": {"message": "refused by the stub"}}
                    else:
                        status, payload = 200, stub.completions(body)
                self._send(status, payload)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _answer(text: str, logprobs: dict | None, completion_tokens: int, finish: str = "length") -> dict:
    return {
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": {"prompt_tokens": 0, "completion_tokens": completion_tokens},
    }


def _title(prompt: str) -> str:
    """The seed passage's title: the last `Title N` in the prompt (the few-shot examples come before it)."""
    return prompt.rsplit("Title ", 1)[-1].split("\n", 1)[0].strip()


@pytest.fixture()
def tokenizer(tiny_llm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llm_dir)


@pytest.fixture()
def stubs(tokenizer) -> Iterator[Callable[..., Stub]]:
    made: list[Stub] = []

    def make(**kw: Any) -> Stub:
        made.append(Stub(tokenizer, **kw))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def _llm(tiny_llm_dir: Path, urls: list[str], **kw: Any) -> OpenAILLM:
    params = LLMParams(backend="openai", model=str(tiny_llm_dir), base_urls=urls, json_output="none",
                       **{"concurrency": 4, "timeout_s": 5.0, "max_retries": 1, "retry_backoff_s": 0.01, **kw})
    return load_llm(params, BaseParams(threads=1, device="cpu"))  # the stages' loading path


def _passages(n: int) -> pa.Table:
    return pa.table({
        "passage_id": [f"doc{i}#0" for i in range(n)],
        "title": [f"Title {i}" for i in range(n)],
        "text": [f"Passage {i} says that rivers carry sediment to the sea." for i in range(n)],
    })


def _generate(**kw: Any) -> GenerateParams:
    return GenerateParams(**{"batch_size": 8, "max_passage_words": 20, "max_retries": 1, **kw})


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel completes the handshake) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_silent_server_times_out_retries_with_backoff_then_names_the_url(silent_port):
    url = f"http://127.0.0.1:{silent_port}/v1"
    pool = ServerPool([url], concurrency=2, timeout_s=0.3, max_retries=2, retry_backoff_s=0.2)
    started = time.perf_counter()
    with pytest.raises(ServerError) as err:
        pool.post("/completions", {"prompt": "hi"})
    elapsed = time.perf_counter() - started
    pool.close()
    # 3 attempts of 0.3 s, backoffs of 0.2 s and 0.4 s: 1.5 s, with slack for a loaded machine.
    assert 1.4 <= elapsed < 6, elapsed
    assert pool.sent[url] == 3
    message = str(err.value)
    assert f"{url}/completions: no answer within 0.3 s" in message and "failed 3 attempts" in message


def test_loading_from_a_silent_server_is_an_llm_error_naming_it(tiny_llm_dir, silent_port):
    url = f"http://127.0.0.1:{silent_port}/v1"
    with pytest.raises(LLMError, match=f"{url}/models"):
        _llm(tiny_llm_dir, [url], timeout_s=0.2, max_retries=0)


def test_refused_request_is_not_retried(tiny_llm_dir, stubs):
    stub = stubs(status=400)
    llm = _llm(tiny_llm_dir, [stub.url], max_retries=3)
    with pytest.raises(ServerError, match="HTTP 400.*refused by the stub"):
        llm.pool.post("/completions", {"prompt": "x"})
    assert len(stub.bodies) == 1


def test_server_errors_are_retried_on_another_url(tiny_llm_dir, stubs):
    broken, healthy = stubs(status=503), stubs()
    llm = _llm(tiny_llm_dir, [broken.url, healthy.url], max_retries=2)
    answers = [llm.pool.post("/completions", {"prompt": "Title 1\n", "max_tokens": 8}) for _ in range(4)]
    assert all(a["choices"][0]["finish_reason"] == "stop" for a in answers)
    assert len(healthy.bodies) == 4 and len(broken.bodies) >= 1


def test_generation_spreads_over_urls_in_parallel_and_reruns_from_the_cache(tiny_llm_dir, stubs, tmp_path):
    both = Gauge()
    servers = [stubs(delay=0.2, gauge=both), stubs(delay=0.2, gauge=both)]
    llm = _llm(tiny_llm_dir, [s.url for s in servers], concurrency=4)
    assert llm.identity.startswith(f"openai:{MODEL}|{tiny_llm_dir.name}@")
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        result = generate_queries(_passages(8), llm, _generate(), 42, cache, progress=False)
    assert result.queries.num_rows == 8 and result.failures.num_rows == 0
    assert set(result.queries.column("llm").to_pylist()) == {llm.identity}
    assert [len(s.bodies) for s in servers] == [4, 4]  # least busy first: an even split
    assert both.max == 4  # requests overlap (each takes 0.2 s), never more than llm.concurrency
    queries = [r["query"] for r in result.queries.to_pylist()]
    assert queries == [f"what does {i} say" for i in range(8)]
    body = servers[0].bodies[0]
    assert body["model"] == MODEL and body["temperature"] == 0.0 and body["max_tokens"] == 96
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        again = generate_queries(_passages(8), llm, _generate(), 42, cache, progress=False)
    assert [len(s.bodies) for s in servers] == [4, 4]  # nothing sent: every call came from the cache
    assert again.queries.column("query").to_pylist() == queries and again.stats["cached"] == 8


def test_invalid_output_is_retried_then_lands_in_generation_failures(tiny_llm_dir, stubs, tmp_path):
    def write(prompt: str) -> str:
        if _title(prompt) in {"1", "5"}:
            return "{not json"
        return json.dumps({"task": "Find the passage that answers it", "query": f"about {_title(prompt)} here"})

    stub = stubs(write=write)
    llm = _llm(tiny_llm_dir, [stub.url])
    result = generate_queries(_passages(8), llm, _generate(max_failure_rate=0.5), 42, LLMCache(None), progress=False)
    assert result.queries.num_rows == 6
    failures = sorted(result.failures.to_pylist(), key=lambda f: f["passage_id"])
    assert [f["passage_id"] for f in failures] == ["doc1#0", "doc5#0"]
    assert all(f["attempts"] == 2 and f["raw_output"] == "{not json" for f in failures)
    assert len(stub.bodies) == 8 + 2  # each bad row retried once (generate.max_retries = 1)
    retried = [b for b in stub.bodies if b["temperature"] > 0]
    assert len(retried) == 2 and all(b["temperature"] == 0.7 for b in retried)  # retry_temperature


_QUERIES = {"q1": "how do bees find food", "q2": "vitamin C prevents colds"}
_TEXTS = {"p1": "Forager bees dance to show where food is.", "p2": "The cell membrane controls what enters.",
          "p3": "Rivers carry sediment from the mountains to the sea."}


def _query(row: dict) -> str:
    return _QUERIES[row["query_id"]]


def _texts(row: dict) -> str:
    return _TEXTS[row["passage_id"]]


def _pairs() -> pa.Table:
    rows = [("q1", "p1", 1), ("q1", "p2", 2), ("q2", "p1", 1), ("q2", "p3", 2)]
    queries, texts = _QUERIES, _TEXTS
    return pa.table({
        "query_id": [q for q, _, _ in rows], "passage_id": [p for _, p, _ in rows],
        "knn_rank": [k for _, _, k in rows], "task": ["Given a question, find evidence"] * len(rows),
        "query": [queries[q] for q, _, _ in rows], "title": [None] * len(rows), "text": [texts[p] for _, p, _ in rows],
    })


def test_scoring_keeps_concurrency_requests_in_flight_across_passages(tiny_llm_dir, stubs):
    gauge = Gauge()
    stub = stubs(delay=0.2, gauge=gauge)
    llm = _llm(tiny_llm_dir, [stub.url], concurrency=8)
    template = ScoreTemplate()
    scorer = llm.scorer(template.yes_words, template.no_words)
    result = score_relevance(_pairs(), llm, ScoreParams(), LLMCache(None), template, progress=False, scorer=scorer)
    assert result.scores.num_rows == 4 and len(stub.bodies) == 8
    # 8 prompts over 3 passages (the largest has 4): all 8 at once, not one passage at a time.
    assert gauge.max == 8


def test_scores_read_the_query_tokens_and_the_answer_top_k(tiny_llm_dir, stubs, tokenizer, tmp_path):
    stub = stubs()
    llm = _llm(tiny_llm_dir, [stub.url])
    template = ScoreTemplate()
    scorer = llm.scorer(template.yes_words, template.no_words)
    (yes,), (no, no_2) = sorted(scorer.yes), sorted(scorer.no)  # the tiny tokenizer's single-token spellings
    stub.top = {yes: -0.5, "maybe": -1.0, no: -2.0, no_2: -2.5, "perhaps": -3.0}
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        result = score_relevance(_pairs(), llm, ScoreParams(), cache, template, progress=False, scorer=scorer)
    rows = result.scores.to_pylist()
    assert len(rows) == 4 and len(stub.bodies) == 8
    checked = set()
    for body in stub.bodies:
        if body.get("echo"):
            row = next(r for r in rows if _texts(r) in body["prompt"] and body["prompt"].endswith(_query(r)))
            assert (row["ql_sum"], row["ql_tokens"]) == pytest.approx(_expected_ql(tokenizer, body["prompt"]))
            checked.add((row["query_id"], row["passage_id"]))
        else:
            assert body["logprobs"] == 20 and body["max_tokens"] == 1
    assert len(checked) == 4  # every QL score matched against its own prompt
    log_p_no = -2.0 + math.log1p(math.exp(-0.5))  # both no spellings, summed
    assert all(r["rc_logodds"] == pytest.approx(-0.5 - log_p_no) for r in rows)
    with LLMCache(tmp_path / "llm.duckdb") as cache:
        again = score_relevance(_pairs(), llm, ScoreParams(), cache, template, progress=False, scorer=scorer)
    assert len(stub.bodies) == 8 and again.stats["cached"] == 8  # a re-run sends nothing


def test_answer_missing_from_the_top_k_gets_the_floor_value(tiny_llm_dir, stubs):
    stub = stubs()
    llm = _llm(tiny_llm_dir, [stub.url])
    template = ScoreTemplate()
    scorer = llm.scorer(template.yes_words, template.no_words)
    stub.top = {sorted(scorer.yes)[0]: -0.1, "maybe": -2.5, "perhaps": -4.0}  # no "no" at all
    result = score_relevance(_pairs(), llm, ScoreParams(), LLMCache(None), template, progress=False, scorer=scorer)
    assert all(r["rc_logodds"] == pytest.approx(-0.1 + 4.0) for r in result.scores.to_pylist())
    assert scorer.floored == 4


def _expected_ql(tokenizer: Any, prompt: str) -> tuple[float, int]:
    """The stub's made-up log-probs summed over the tokens that end inside the query (PrefixScorer's rule)."""
    query = next(q for q in _QUERIES.values() if prompt.endswith(q))
    start = len(prompt) - len(query)
    spans = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    positions = [i for i, (_, end) in enumerate(spans) if end > start]
    return sum(_fake_logprob(i) for i in positions), len(positions)


def test_json_output_modes_hold_the_server_to_the_schema():
    schema = GeneratedQuery.model_json_schema()
    fmt = structured_output(GeneratedQuery, "response_format")["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"] == schema["properties"]
    vllm = structured_output(GeneratedQuery, "structured_outputs")["structured_outputs"]
    assert vllm["json"]["properties"] == schema["properties"] and vllm["whitespace_pattern"] == "[ ]?"
    assert structured_output(GeneratedQuery, "none") == {}


def test_openai_backend_needs_base_urls(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("llm:\n  backend: openai\n")
    with pytest.raises(ParamsError, match="llm.base_urls: required when backend is openai"):
        load_params(path)
    path.write_text("llm:\n  backend: openai\n  base_urls: [localhost:8000]\n")
    with pytest.raises(ParamsError, match="llm.base_urls: not http"):
        load_params(path)



def test_a_model_the_server_does_not_serve_is_named(tiny_llm_dir, stubs):
    stub = stubs()
    with pytest.raises(ServerError, match=rf"{stub.url}/models lists \['{MODEL}'\], not 'other' \(llm.api_model\)"):
        _llm(tiny_llm_dir, [stub.url], api_model="other")
