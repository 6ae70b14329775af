"""The LLM behind an OpenAI-compatible server (vLLM, llama.cpp, SGLang, ...): `llm.backend: openai`.

`load_server_llm` returns an `OpenAILLM`, this backend's `pipeline.llm.base.LLM` (its scorer is
`ServerScorer`), which the LLM stages use as they use the in-process one: same prompts, same tables,
same LLM cache (pipeline/llm/cache.py).

- Prompts are built here, with the local tokenizer and chat template of `llm.model` (the server's
  own tokenizer must be the same: QL checks the token counts), and sent as plain text to
  `/completions`, so the server applies no template of its own.
- Identity (part of every cache key and every row): `openai:<model the server serves>|<local
  tokenizer source>@<sha>`. For "smollm2" the sha is the GGUF file's, i.e. the weights a llama.cpp
  server loads from that file.
- Generation: the Pydantic schema goes to the server through Outlines' type adapters: Outlines'
  OpenAI adapter writes `response_format` (json_schema), its vLLM adapter writes
  `structured_outputs` (vLLM >= 0.12). Outlines has no adapter for llama-cpp-python's server, which
  takes only a GBNF `grammar` on `/completions`: that grammar comes from llama-cpp-python's own
  JSON-schema converter (`json_output: grammar`, which needs `llama_cpp` importable here). Every
  output is validated by the caller with the schema (pipeline/llm/generate.py), as in-process.
- QL: `/completions` with `echo`, `logprobs` and `max_tokens: 1` returns the log-probability of
  every prompt token, then the completion's `usage.completion_tokens` tokens; the query's tokens
  are the prompt's last n, n counted with the local tokenizer by the in-process rule (tokens ending
  inside the query), after checking that the server cut the prompt into as many tokens. Text offsets
  are not used: llama-cpp-python counts them without the special tokens' text. llama-cpp-python
  0.3.36 aligns echoed log-probs right only when the prompt starts with the BOS token (SmolLM2's
  chat template does: `<|im_start|>`); vLLM has no such condition.
- RC: `/completions` with `max_tokens: 1` and `logprobs: top_logprobs` returns the top-k next
  tokens at the answer position; log P(yes) sums the yes spellings found there (the in-process
  set), log P(no) likewise. A side none of whose spellings is in the top k gets the floor value,
  the k-th best log-prob: an upper bound of each missing spelling. Its log-odds are then a bound,
  not an estimate (`floored` in the cached value says which side).

Requests spread over `llm.base_urls` (least busy URL first, ties in turn), `llm.concurrency` in
flight on a thread pool; each attempt has `timeout_s`, and a timeout, refused connection, HTTP 429
or 5xx is retried `max_retries` times after an exponential backoff, then `ServerError` names every
URL tried and what it answered.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from pipeline.llm.base import (
    JSON_WHITESPACE,
    QL,
    ChatPrompts,
    Completion,
    Decoding,
    LLMError,
    ScoreRequest,
    ScoringError,
    answer_token_ids,
)
from pipeline.llm.weights import resolve_model
from pipeline.params import LLMParams

if TYPE_CHECKING:
    from pydantic import BaseModel

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
API_KEY_ENV = "OPENAI_API_KEY"
# Greedy or plain sampling at the temperature, as in-process: turn off the servers' own defaults
# (llama-cpp-python: top_k 40, min_p 0.05, repeat_penalty 1.1). Keys a server does not know are ignored.
NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "repetition_penalty": 1.0}


class ServerError(LLMError):
    """The server cannot be reached, or answers with an error or something unreadable."""


@dataclass(frozen=True)
class RemoteDevice:
    """Where the model runs, as stage summaries print it (`llm.device.type`)."""

    type: str


class ServerPool:
    """POSTs JSON to several base URLs: least busy first, `concurrency` in flight, retried with backoff.

    Attributes:
        sent: attempts per base URL (tests check the spreading).
    """

    def __init__(self, urls: Sequence[str], concurrency: int, timeout_s: float, max_retries: int,
                 retry_backoff_s: float, api_key: str | None = None):
        if not urls:
            raise ServerError("no base URL to send requests to")
        self.urls = [u.rstrip("/") for u in urls]
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One connection per thread: a request never waits for a free connection.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.Client(timeout=timeout_s, limits=limits, headers=headers)
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="fret-llm")
        self._lock = threading.Lock()
        self._busy = dict.fromkeys(self.urls, 0)
        self._turn = itertools.count()
        self.sent: Counter[str] = Counter()

    def submit(self, path: str, body: dict[str, Any]) -> "Future[dict[str, Any]]":
        """`post` on the thread pool."""
        return self._executor.submit(self.post, path, body)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `<url><path>` and return the decoded JSON answer.

        Raises:
            ServerError: every attempt failed (the message names each URL and its error), or a
                server refused the request itself (HTTP 4xx other than 408/429: retrying cannot help).
        """
        return self._with_retries(path, lambda url: self._client.post(url + path, json=body))

    def get(self, url: str, path: str) -> dict[str, Any]:
        """GET `<url><path>` from one given URL (with retries), e.g. its `/models`."""
        return self._with_retries(path, lambda _: self._client.get(url + path), url)

    def _with_retries(self, path: str, call: Callable[[str], httpx.Response], url: str | None = None) -> Any:
        errors: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            target = url or self._acquire()
            try:
                response = call(target)
            except httpx.TimeoutException:
                errors.append(f"{target}{path}: no answer within {self.timeout_s:g} s")
                continue
            except httpx.TransportError as err:
                errors.append(f"{target}{path}: {type(err).__name__}: {err}")
                continue
            finally:
                if url is None:
                    self._release(target)
            if response.status_code in RETRY_STATUS:
                errors.append(f"{target}{path}: HTTP {response.status_code}: {response.text[:200]}")
                continue
            if response.is_error:
                raise ServerError(f"{target}{path}: HTTP {response.status_code}: {response.text[:500]}")
            try:
                return response.json()
            except ValueError:
                raise ServerError(f"{target}{path}: answer is not JSON: {response.text[:200]!r}") from None
        raise ServerError(f"{path}: failed {len(errors)} attempts (llm.max_retries={self.max_retries}): "
                          + "; ".join(errors))

    def _acquire(self) -> str:
        """The least busy URL, ties in turn (round robin among equals), counted busy until released."""
        with self._lock:
            turn = next(self._turn)
            order = self.urls[turn % len(self.urls):] + self.urls[: turn % len(self.urls)]
            url = min(order, key=self._busy.__getitem__)
            self._busy[url] += 1
            self.sent[url] += 1
            return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._busy[url] -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def load_server_llm(params: LLMParams) -> "OpenAILLM":
    """Connect to the servers of `params.base_urls`, check that each serves the model, load the local tokenizer.

    Raises:
        ServerError: a server does not answer `/models`, or does not list `params.api_model`.
        LLMError: the local tokenizer source `params.model` cannot be found.
    """
    from transformers import AutoTokenizer

    api_key = params.api_key or os.environ.get(API_KEY_ENV)
    pool = ServerPool(params.base_urls, params.concurrency, params.timeout_s, params.max_retries,
                      params.retry_backoff_s, api_key)
    try:
        model, served = _served_model(pool, params.api_model)
        source = resolve_model(params)  # "smollm2": converted once (~20 s) for its tokenizer, as in-process
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except BaseException:
        pool.close()
        raise
    identity = f"openai:{served}|{source.name}@{source.sha256[:16]}"
    return OpenAILLM(pool, tokenizer, identity, params, model)


def _served_model(pool: ServerPool, wanted: str | None) -> tuple[str, str]:
    """The model every URL serves (`wanted`, or the first id the first URL lists), and its name for
    the identity: the id, with vLLM's `root` (the weights it loaded) when that differs."""
    chosen, names = [], []
    for url in pool.urls:
        models = pool.get(url, "/models").get("data") or []
        ids = [m.get("id") for m in models]
        model = wanted or (ids[0] if ids else None)
        if model not in ids:
            raise ServerError(f"{url}/models lists {ids}, not {model!r} (llm.api_model)")
        chosen.append(model)
        root = models[ids.index(model)].get("root")
        names.append(model if not root or root == model else f"{model}={root}")
    if len(set(names)) > 1:
        raise ServerError(f"llm.base_urls serve different models: {dict(zip(pool.urls, names))}")
    return chosen[0], names[0]


class OpenAILLM(ChatPrompts):
    """What the `queries` and `llm_scores` stages need from an LLM, answered by a server.

    Attributes:
        tokenizer: the local Hugging Face tokenizer (prompts, passage clipping, QL token counts).
        identity: `openai:<served model>|<tokenizer source>@<sha>`, in every cache key and row.
        pool: the `ServerPool` requests go through.
    """

    def __init__(self, pool: ServerPool, tokenizer: Any, identity: str, params: LLMParams, model: str):
        self.pool = pool
        self.tokenizer = tokenizer
        self.identity = identity
        self.params = params
        self.device = RemoteDevice(f"server x{len(pool.urls)}")
        self._model_name = model  # the `model` field of every request

    def completion_body(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return {"model": self._model_name, "prompt": prompt, "stream": False, **fields}

    def generate_json(
        self,
        prompts: list[str],
        schema: type["BaseModel"],
        decodings: list[Decoding],
        max_new_tokens: int,
        retry: Callable[[int, Completion], Decoding | None] | None = None,
        stop: Callable[[int, str], bool] | None = None,
    ) -> list[Completion]:
        """As `pipeline.llm.base.JsonLLM.generate_json`, every prompt (and every retry) in flight at once.

        `stop` is never called: the server returns each output whole, and the caller validates it.

        `retry` runs on the calling thread, one completion at a time, so it needs no lock."""
        if len(prompts) != len(decodings):
            raise ValueError(f"{len(prompts)} prompts but {len(decodings)} decodings")
        constraint = structured_output(schema, self.params.json_output)

        def send(i: int, decoding: Decoding) -> "Future[dict[str, Any]]":
            body = self.completion_body(
                prompts[i], max_tokens=max_new_tokens, temperature=decoding.temperature,
                seed=decoding.seed % 2**31,  # servers take 32-bit seeds
                **NEUTRAL_SAMPLING, **constraint,
            )
            return self.pool.submit("/completions", body)

        results: list[Completion | None] = [None] * len(prompts)
        pending = {send(i, d): i for i, d in enumerate(decodings)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    completion = self._completion(future.result())
                    again = retry(i, completion) if retry is not None else None
                    if again is None:
                        results[i] = completion
                    else:
                        pending[send(i, again)] = i
        finally:
            for future in pending:
                future.cancel()
        return results  # type: ignore[return-value]  # every row is filled once `pending` is empty

    def _completion(self, answer: dict[str, Any]) -> Completion:
        try:
            choice = answer["choices"][0]
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise ServerError(f"not a completions answer: {json.dumps(answer)[:200]}") from None
        tokens = (answer.get("usage") or {}).get("completion_tokens")
        if tokens is None:
            tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Completion(text, int(tokens), choice.get("finish_reason") == "stop")

    def scorer(self, yes_words: Sequence[str], no_words: Sequence[str]) -> "ServerScorer":
        """This backend's scorer, which `pipeline.llm.scoring.score_relevance` drives."""
        return ServerScorer(self, yes_words, no_words)

    def close(self) -> None:
        self.pool.close()


def structured_output(schema: type["BaseModel"], mode: str) -> dict[str, Any]:
    """The request fields that hold a server to `schema` (see the module docstring)."""
    if mode == "none":
        return {}
    if mode == "grammar":
        return {"grammar": _gbnf(json.dumps(schema.model_json_schema()))}
    from outlines.types import JsonSchema

    if mode == "structured_outputs":
        from outlines.models.vllm import VLLMTypeAdapter

        return VLLMTypeAdapter().format_output_type(JsonSchema(schema, whitespace_pattern=JSON_WHITESPACE))
    from outlines.models.openai import OpenAITypeAdapter

    return OpenAITypeAdapter().format_output_type(schema)


def _gbnf(schema_json: str) -> str:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as err:
        raise LLMError(f"llm.json_output 'grammar' needs llama-cpp-python installed here: {err}") from None
    return json_schema_to_gbnf(schema_json)


class ServerScorer:
    """QL and RC scores from the server, this backend's `pipeline.llm.base.Scorer`.

    Attributes:
        forward_rows: prompts scored; forward_tokens / prompt_tokens: tokens of those prompts, as the
            server counted them (a server's prefix cache may run fewer).
        floored: RC answers where a side had none of its spellings in the top k.
    """

    # Each prompt is one independent request: `score_relevance` hands over all missing prompts at
    # once (not passage by passage), so the pool keeps `llm.concurrency` requests in flight.
    shares_prefixes = False

    def __init__(self, llm: OpenAILLM, yes_words: Sequence[str], no_words: Sequence[str]):
        self.llm = llm
        self.yes = self._spellings(answer_token_ids(llm.tokenizer, yes_words))
        self.no = self._spellings(answer_token_ids(llm.tokenizer, no_words))
        if not self.yes or not self.no:
            raise ScoringError(f"no single-token spelling of {list(yes_words)} or {list(no_words)} in the tokenizer")
        if self.yes & self.no:
            raise ScoringError("a token counts as both yes and no")
        self.forward_rows = self.forward_tokens = self.prompt_tokens = self.floored = 0

    def _spellings(self, ids: list[int]) -> set[str]:
        # Servers name top tokens by their text, so the ids become texts (" yes", "Yes", ...).
        return {self.llm.tokenizer.decode([i]) for i in ids}

    def tokenize(self, requests: Sequence[ScoreRequest]) -> list[tuple[ScoreRequest, int, int]]:
        """(request, prompt tokens, query tokens), counted locally by PrefixScorer's rule."""
        rows = []
        for r in requests:
            enc = self.llm.tokenizer(r.prompt, add_special_tokens=not self.llm.has_chat_template,
                                     return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            while offsets and offsets[-1][1] <= offsets[-1][0]:  # a special token appended after the text
                offsets = offsets[:-1]
            n_query = 0
            if r.method == QL:
                first = next((i for i, (_, end) in enumerate(offsets) if end > r.target_start), len(offsets))
                n_query = len(offsets) - first
                if first == 0 or n_query == 0:
                    raise ScoringError(f"QL prompt of {r.query_id}/{r.passage_id}: no query tokens to score")
            rows.append((r, len(offsets), n_query))
        return rows

    def score_group(self, rows: Sequence[tuple[ScoreRequest, int, int]], batch_size: int,
                    skip: Container[str] = ()) -> Iterator[dict[str, dict[str, float]]]:
        """All rows not in `skip` in flight at once (up to the pool's concurrency); yields {key: value}
        per `batch_size` finished, so the caller caches as answers arrive. A server scores each prompt
        on its own, so unlike PrefixScorer no cached neighbour needs running again."""
        futures = {}
        for r, n_prompt, n_query in (row for row in rows if row[0].key not in skip):
            if r.method == QL:
                body = self.llm.completion_body(r.prompt, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
            else:
                body = self.llm.completion_body(r.prompt, max_tokens=1, logprobs=self.llm.params.top_logprobs,
                                                temperature=0.0)
            futures[self.llm.pool.submit("/completions", body)] = (r, n_prompt, n_query)
        values: dict[str, dict[str, float]] = {}
        try:
            for future in as_completed(futures):
                r, n_prompt, n_query = futures[future]
                answer = future.result()
                value = self._ql(answer, r, n_prompt, n_query) if r.method == QL else self._rc(answer)
                values[r.key] = value
                self.forward_rows += 1
                used = (answer.get("usage") or {}).get("prompt_tokens", n_prompt)
                self.forward_tokens += used
                self.prompt_tokens += used
                if len(values) >= batch_size:
                    yield values
                    values = {}
        finally:
            for future in futures:
                future.cancel()
        if values:
            yield values

    def _ql(self, answer: dict[str, Any], r: ScoreRequest, n_prompt: int, n_query: int) -> dict[str, float]:
        """Sum and mean log-prob of the prompt's last `n_query` tokens (the query's)."""
        logprobs = _logprobs(answer)
        tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
        usage = answer.get("usage") or {}
        if usage.get("prompt_tokens", n_prompt) != n_prompt:
            raise ScoringError(
                f"QL prompt of {r.query_id}/{r.passage_id}: the server counts {usage['prompt_tokens']} tokens, "
                f"the local tokenizer of llm.model {n_prompt}: llm.model must be the served model's tokenizer"
            )
        # The echoed prompt comes first, then the completion (max_tokens 1: one token, or none when
        # the server stops at an end-of-sequence token it does not list).
        if "completion_tokens" in usage:
            end = len(tokens) - usage["completion_tokens"]
        else:
            end = sum(offset < len(r.prompt) for offset in logprobs["text_offset"])
        query = values[max(end - n_query, 0) : end]
        text = "".join(tokens[max(end - n_query, 0) : end])
        # Token texts may drop the bytes of a character split over two tokens: compare ASCII only.
        if len(query) != n_query or any(v is None for v in query) or not _ascii(r.prompt).endswith(_ascii(text)):
            raise ScoringError(f"QL prompt of {r.query_id}/{r.passage_id}: the server's echoed tokens "
                               f"{tokens[end - n_query : end]!r} are not the query's {n_query} tokens")
        total = math.fsum(query)
        return {"sum": total, "mean": total / n_query, "tokens": n_query}

    def _rc(self, answer: dict[str, Any]) -> dict[str, float]:
        """log P(yes) - log P(no) from the top-k next tokens (floor value for a side not in them)."""
        top = _logprobs(answer)["top_logprobs"][0]
        floor = min(top.values())
        sides = []
        for spellings in (self.yes, self.no):
            found = [lp for token, lp in top.items() if token in spellings]
            sides.append(_logsumexp(found) if found else floor)
        floored = [not any(t in s for t in top) for s in (self.yes, self.no)]
        self.floored += any(floored)
        yes, no = sides
        return {"logodds": yes - no, "log_p_yes": yes, "log_p_no": no, "floored": floored}


def _logprobs(answer: dict[str, Any]) -> dict[str, Any]:
    try:
        logprobs = answer["choices"][0]["logprobs"]
        if logprobs is None or not logprobs.get("tokens") and not logprobs.get("top_logprobs"):
            raise KeyError("logprobs")
        return logprobs
    except (KeyError, IndexError, TypeError):
        raise ServerError(
            "the server returned no logprobs (llama-cpp-python needs logits_all, its server's default): "
            + json.dumps(answer)[:200]
        ) from None


def _ascii(text: str) -> str:
    return text.encode("ascii", "ignore").decode()


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))

