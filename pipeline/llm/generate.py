"""FRet generation (Gecko step 1): for each seed passage the LLM writes a task description and a query.

`generate_queries` is the stage's work: pick passages (all, or a seeded sample), draw a task type
per query, render the few-shot prompt (`prompts/generate.jinja`), look every call up in the LLM
cache, generate the misses in batches (results written to the cache batch by batch, so a killed run
loses at most the batch in flight), retry outputs that fail validation (inside the running batch:
the LLM restarts such a row in place), and return the `queries`,
`generation_failures` and `generation_report` tables.

Every random choice is a hash of (base.seed, passage id, ...) rather than a draw from a shared
stream, so it does not move when the corpus grows or the batch size changes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.labelled import read_beir, split_queries, stable_int
from pipeline.llm.base import Decoding, JsonLLM
from pipeline.llm.cache import CacheEntry, LLMCache, cache_key
from pipeline.llm.prompt_file import PROMPTS_DIR, PromptFile
from pipeline.params import FewShotParams, GenerateParams
from pipeline.progress import progress_bar

# Found from the code, not the working directory (tests and `fret` may run elsewhere).
PROMPT_FILE = PROMPTS_DIR / "generate.jinja"
NAMESPACE = "generate"


class GeneratedQuery(BaseModel):
    """What the LLM must return. Lengths live inside the regexes: outlines_core drops `pattern` when
    `maxLength` is also set. No quote, backslash or control character (newline included): nothing
    that JSON would need to escape, so the decoder cannot write a string JSON rejects."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(pattern=r'^[^"\\\x00-\x1f]{10,120}$')
    query: str = Field(pattern=r'^[^"\\\x00-\x1f]{5,160}$')


class GenerationError(RuntimeError):
    """Too many outputs failed validation after their retries."""


@dataclass(frozen=True)
class Request:
    """One query to write: a seed passage, which of its queries, and everything that fixes the output."""

    passage_id: str
    index: int  # 0 .. queries_per_passage - 1
    task_type: str
    prompt: str
    seed: int
    key: str  # cache key


@dataclass
class GenerationResult:
    queries: pa.Table
    failures: pa.Table
    report: pa.Table
    stats: dict[str, float] = field(default_factory=dict)


def sample_passages(passage_ids: Sequence[str], limit: int | None, seed: int) -> list[str]:
    """The `limit` passages with the smallest seeded hash (all when `limit` is None), in input order.

    Adding passages to the corpus only swaps in newcomers with a smaller hash; the rest stay.
    """
    if limit is None or limit >= len(passage_ids):
        return list(passage_ids)
    chosen = set(sorted(passage_ids, key=lambda pid: stable_int(seed, "limit", pid))[:limit])
    return [pid for pid in passage_ids if pid in chosen]


def draw_task_type(passage_id: str, index: int, task_types: Sequence[str], seed: int) -> str:
    """The task type of query `index` of a passage: uniform over `task_types`, fixed by seed + id."""
    return task_types[stable_int(seed, "task_type", passage_id, index) % len(task_types)]


def query_id(passage_id: str, index: int) -> str:
    """Stable across runs and corpus growth: depends only on the seed passage and the query's index."""
    return "q" + hashlib.sha256(f"{passage_id}\0{index}".encode()).hexdigest()[:16]


class PromptTemplate(PromptFile):
    """The Jinja prompt file: its `system`/`user` macros and `examples` build the chat messages."""

    def __init__(self, path: str | Path = PROMPT_FILE):
        super().__init__(path)
        self.examples: list[dict[str, str]] = list(self._module.examples)

    def with_examples(self, examples: Sequence[dict[str, str]]) -> "PromptTemplate":
        """A copy whose examples of the given examples' task types are these (`generate.examples`).

        The hash covers them, so `prompt_hash` tells the two prompts apart (the cache keys already
        do: the examples are in every prompt's text).
        """
        if not examples:
            return self
        replaced = {e["task_type"] for e in examples}
        out = object.__new__(PromptTemplate)
        out.__dict__.update(self.__dict__)
        out.examples = [e for e in self.examples if e["task_type"] not in replaced] + [dict(e) for e in examples]
        extra = json.dumps(list(examples), sort_keys=True, ensure_ascii=False)
        out.hash = hashlib.sha256((self.source + "\0" + extra).encode()).hexdigest()[:16]
        return out

    def messages(self, task_type: str, title: str | None, text: str) -> list[dict[str, str]]:
        """System turn, the few-shot turns for `task_type`, then the seed passage."""
        shots = [e for e in self.examples if e["task_type"] == task_type]
        if not shots:  # a task type the file has no example for: one example of each known type
            shots = list({e["task_type"]: e for e in reversed(self.examples)}.values())[::-1]
        out = [{"role": "system", "content": str(self._module.system())}]
        for e in shots:
            out.append({"role": "user", "content": str(self._module.user(e["task_type"], e["title"], e["text"]))})
            answer = GeneratedQuery(task=e["task"], query=e["query"])  # examples obey the schema too
            # json.dumps spacing (`{"task": "..."}`) is one the decoder's whitespace rule allows.
            out.append({"role": "assistant", "content": json.dumps(answer.model_dump(), ensure_ascii=False)})
        out.append({"role": "user", "content": str(self._module.user(task_type, title, text))})
        return out


def few_shot_examples(source: FewShotParams, seed: int, max_words: int) -> list[dict[str, str]]:
    """`source.n` judged queries of a BEIR folder as few-shot examples, each with its best-judged document.

    The queries are the `n` with the smallest seeded hash among those outside `source.holdout` whose
    text fits the output schema (an example breaking it would teach the LLM to break it); the
    document is the one judged most relevant (ties: the smallest id), its text cut to `max_words`
    like the seed passages'.

    Raises:
        ValueError: the folder's files are missing or malformed (file named), the task does not fit
            the schema, or fewer than `n` queries are usable.
    """
    folder = source.path  # relative to the working directory, the repository root for the stages
    try:
        GeneratedQuery(task=source.task, query="a query that fits")
    except ValidationError:
        raise ValueError(
            f"generate.examples: task {source.task!r} must be 10-120 characters without quotes, backslashes or newlines"
        ) from None
    data = read_beir(folder, source.split)
    if source.holdout > 0:
        data = split_queries(data, source.holdout, held=False)
    docs = {d["id"]: d for d in data.corpus}
    usable = []
    for q in data.queries:
        judged = [(score, doc_id) for doc_id, score in data.qrels[q["id"]].items() if score > 0]
        if judged and _fits_schema(source.task, q["text"]):
            usable.append((stable_int(seed, "examples", q["id"]), q, min(judged, key=lambda j: (-j[0], j[1]))[1]))
    if len(usable) < source.n:
        raise ValueError(
            f"generate.examples: {folder / 'qrels' / (source.split + '.tsv')} has {len(usable)} usable queries "
            f"(judged relevant, outside the holdout, 5-160 characters without quotes), fewer than n={source.n}"
        )
    out = []
    for _, q, doc_id in sorted(usable, key=lambda u: u[0])[: source.n]:
        doc = docs[doc_id]
        text = clip_words(doc["text"], max_words)
        out.append(
            {"task_type": source.task_type, "title": doc["title"], "text": text, "task": source.task, "query": q["text"]}
        )
    return out


def _fits_schema(task: str, query: str) -> bool:
    try:
        GeneratedQuery(task=task, query=query)
    except ValidationError:
        return False
    return True


def clip_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def build_requests(
    passages: pa.Table, llm: JsonLLM, params: GenerateParams, seed: int, template: PromptTemplate
) -> list[Request]:
    """One request per (selected passage, query index), with its prompt, seed and cache key."""
    schema = json.dumps(GeneratedQuery.model_json_schema(), sort_keys=True)
    rows = {r["passage_id"]: r for r in passages.select(["passage_id", "title", "text"]).to_pylist()}
    requests = []
    for pid in sample_passages(list(rows), params.limit, seed):
        for index in range(params.queries_per_passage):
            task_type = draw_task_type(pid, index, params.task_types, seed)
            text = clip_words(rows[pid]["text"], params.max_passage_words)
            prompt = llm.chat_prompt(template.messages(task_type, rows[pid]["title"], text))
            row_seed = stable_int(seed, "generate", pid, index)
            decoding = {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens, "seed": row_seed}
            key = cache_key(model=llm.identity, prompt=prompt, schema=schema, decoding=decoding)
            requests.append(Request(pid, index, task_type, prompt, row_seed, key))
    return requests


class CopyCheck:
    """Whether a query copies a few-shot example instead of reading its passage.

    A copy is the example's query word for word (case and punctuation aside), or, with
    `prefix_words` = K, any query that starts with the example's first K words (all of them for a
    shorter example): a small model often keeps an example's start and changes only its end ("why
    does monthly compounding earn more than yearly compounding at the same rate" in a SciFact run).
    The examples' openings are topical ("how do bees tell", "the great wall of"), so a query of the
    corpus's own starts like one only by copying it.
    """

    EXACT = "query: copies a few-shot example"

    def __init__(self, examples: Sequence[dict[str, str]] = (), prefix_words: int | None = None):
        self.examples = [words(e["query"]) for e in examples]
        self.prefix_words = prefix_words
        self.prefix_reason = f"query: starts with a few-shot example's first {prefix_words} words"

    def reason(self, query: str) -> str | None:
        """Why `query` is a copy, or None."""
        query_words = words(query)
        if any(query_words == e for e in self.examples):
            return self.EXACT
        return self.prefix_reason if self._starts_like(query_words) else None

    def copying_so_far(self, text: str) -> bool:
        """True once the partial JSON `text` has a query whose finished words already start like an
        example: its final query is bound to be a copy, so its row may stop decoding there."""
        if self.prefix_words is None:
            return False
        found = _QUERY_OPENS.search(text)
        if found is None:
            return False
        # The schema forbids quotes and backslashes inside strings: the value runs to the next quote.
        partial = text[found.end() :].split('"', 1)
        query_words = words(partial[0])
        if len(partial) == 1 and partial[0] and _WORD.match(partial[0][-1]):
            query_words = query_words[:-1]  # the last word may still grow
        return self._starts_like(query_words)

    def _starts_like(self, query_words: list[str]) -> bool:
        if self.prefix_words is None:
            return False
        for example in self.examples:
            n = min(self.prefix_words, len(example))
            if n and len(query_words) >= n and query_words[:n] == example[:n]:
                return True
        return False


_QUERY_OPENS = re.compile(r'"query"\s*:\s*"')


def validate(
    text: str, examples: Sequence[dict[str, str]] = (), prefix_words: int | None = None
) -> tuple[GeneratedQuery | None, str | None]:
    """The parsed output, or None and the reason it is invalid.

    Besides the schema, a query that copies a few-shot example is rejected (`CopyCheck`): a small
    model often repeats an example instead of reading the passage."""
    try:
        parsed = GeneratedQuery.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "output"
        return None, f"{where}: {first['msg']}"
    reason = CopyCheck(examples, prefix_words).reason(parsed.query)
    if reason is not None:
        return None, reason
    return parsed, None


def generate_queries(
    passages: pa.Table,
    llm: JsonLLM,
    params: GenerateParams,
    seed: int,
    cache: LLMCache,
    template: PromptTemplate | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Write a task and a query for every selected passage; see the module docstring.

    Args:
        passages: a table with passage_id, title, text.
        llm: the LLM (anything with `identity`, `chat_prompt`, `generate_json`).
        seed: base.seed.
        cache: finished calls are read from and written to it (a disabled cache recomputes all).
        on_batch: called with the number of finished batches after each is cached (tests use it).

    Raises:
        GenerationError: the share of failed queries exceeds `params.max_failure_rate`.
    """
    template = template or PromptTemplate()
    started = time.perf_counter()
    requests = build_requests(passages, llm, params, seed, template)
    # A cached output is re-checked: validation rules may have tightened since it was stored.
    done = {k: e for k, e in cache.get_many(r.key for r in requests).items() if _still_valid(e.value, template, params)}
    todo = [r for r in requests if r.key not in done]
    batches = _batches(todo, params.batch_size)
    failures: list[dict[str, Any]] = []
    counts = Counter()
    bar = progress_bar(len(todo), "queries", "query", progress)
    gen_started = time.perf_counter()
    for b, batch in enumerate(batches):
        finished, batch_failures = _run_batch(llm, batch, params, template, counts)
        failures.extend(batch_failures)
        done.update(cache.put_many(NAMESPACE, finished))  # per batch: a crash loses this batch at most
        if on_batch is not None:
            on_batch(b + 1)
        _advance(bar, len(batch), counts["new_tokens"], time.perf_counter() - gen_started)
    if bar is not None:
        bar.close()
    gen_seconds = time.perf_counter() - gen_started
    queries = _queries_table(requests, done, passages, llm.identity, template.hash)
    failures_table = pa.Table.from_pylist(failures, schema=FAILURES_SCHEMA)
    report = quality_report(queries, len(requests), len(failures))
    stats = {
        "requests": len(requests),
        "cached": len(requests) - len(todo),
        "generated": len(todo),
        "calls": counts["calls"],
        "failures": len(failures),
        "new_tokens": counts["new_tokens"],
        "stopped_copies": counts["stopped"],  # attempts cut as soon as they started like an example
        "generate_seconds": gen_seconds,
        "seconds": time.perf_counter() - started,
        "passages_per_s": len({r.passage_id for r in todo}) / gen_seconds if todo and gen_seconds > 0 else 0.0,
        "tokens_per_s": counts["new_tokens"] / gen_seconds if todo and gen_seconds > 0 else 0.0,
    }
    rate = len(failures) / max(len(requests), 1)
    if rate > params.max_failure_rate:
        examples = "\n".join(f"  {f['passage_id']}: {f['reason']}: {f['raw_output'][:120]!r}" for f in failures[:5])
        raise GenerationError(
            f"{len(failures)} of {len(requests)} queries ({rate:.1%}) failed validation after "
            f"{params.max_retries} retries, above generate.max_failure_rate={params.max_failure_rate}:\n{examples}"
        )
    return GenerationResult(queries, failures_table, report, stats)


def _run_batch(
    llm: JsonLLM, batch: list[Request], params: GenerateParams, template: PromptTemplate, counts: Counter
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Generate one batch: (finished outputs by cache key, failures).

    An exception from the LLM backend is retried up to `max_retries` times; if it persists, every row
    of the batch is recorded as a failure (never cached, so the next run tries again) and the stage
    goes on: one crashing batch must not cost the work of all the others.
    """
    error: Exception | None = None
    copies = CopyCheck(template.examples, params.copy_prefix_words)
    for _ in range(params.max_retries + 1):
        finished: dict[str, dict[str, Any]] = {}
        failures: list[dict[str, Any]] = []
        check = _checker(batch, params, template, copies, finished, failures, counts)
        decodings = [Decoding(r.seed, params.temperature) for r in batch]
        try:
            llm.generate_json([r.prompt for r in batch], GeneratedQuery, decodings, params.max_new_tokens,
                              retry=check, stop=lambda i, text: copies.copying_so_far(text))
            return finished, failures
        except Exception as err:  # noqa: BLE001 - any backend error becomes a recorded failure
            error = err
    reason = f"llm error: {type(error).__name__}: {error}"
    return {}, [_failure(r, params.max_retries + 1, reason, "") for r in batch]


def _checker(
    batch: list[Request],
    params: GenerateParams,
    template: PromptTemplate,
    copies: CopyCheck,
    finished: dict[str, dict[str, Any]],
    failures: list[dict[str, Any]],
    counts: Counter,
) -> Callable[[int, Any], Any]:
    """The `retry` callback of `generate_json` for `batch`: validate row i's attempt; keep it in
    `finished` (or `failures`, when out of retries), or return the Decoding of its next attempt."""
    attempts = [0] * len(batch)

    def check(i: int, out: Any) -> Decoding | None:
        r, attempt = batch[i], attempts[i]
        counts["calls"] += 1
        counts["new_tokens"] += out.new_tokens
        if out.stopped:  # cut by `copying_so_far`: a copy, the rest of it never written
            counts["stopped"] += 1
            parsed, reason = None, copies.prefix_reason
        else:
            parsed, reason = validate(out.text, template.examples, params.copy_prefix_words)
        if parsed is not None:
            finished[r.key] = {**parsed.model_dump(), "attempt": attempt, "new_tokens": out.new_tokens}
            return None
        if attempt < params.max_retries:
            attempts[i] += 1  # a retry samples (at retry_temperature when greedy: it would repeat itself)
            return Decoding(stable_int(r.seed, attempts[i]), params.temperature or params.retry_temperature)
        if not out.finished and not out.stopped:
            reason = f"cut at max_new_tokens={params.max_new_tokens}; {reason}"
        failures.append(_failure(r, attempt + 1, reason, out.text))
        return None

    return check


def _still_valid(value: Any, template: PromptTemplate, params: GenerateParams) -> bool:
    try:
        text = json.dumps({"task": value["task"], "query": value["query"]})
    except (TypeError, KeyError):
        return False
    return validate(text, template.examples, params.copy_prefix_words)[0] is not None


def _batches(todo: list[Request], size: int) -> list[list[Request]]:
    """Full batches, task types mixed: the LLM reuses each task type's few-shot prefix whatever
    the batch holds, and a full batch decodes all its rows in one step each. Similar prompt
    lengths go together (less padding to attend over)."""
    rows = sorted(todo, key=lambda r: (len(r.prompt), r.key))
    return [rows[i : i + size] for i in range(0, len(rows), size)]


FAILURES_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),
        ("query_index", pa.int32()),
        ("task_type", pa.string()),
        ("attempts", pa.int32()),
        ("reason", pa.string()),
        ("raw_output", pa.string()),
    ]
)

QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("passage_id", pa.string()),  # the seed passage
        ("query_index", pa.int32()),
        ("task_type", pa.string()),
        ("task", pa.string()),
        ("query", pa.string()),
        ("llm", pa.string()),
        ("prompt_hash", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("attempt", pa.int32()),  # 0: first try; k: k-th retry
        ("new_tokens", pa.int32()),
        ("query_words", pa.int32()),
        ("copy_rate", pa.float64()),  # share of the query's words found in the seed passage
    ]
)


def _failure(r: Request, attempts: int, reason: str | None, raw: str) -> dict[str, Any]:
    return {
        "passage_id": r.passage_id,
        "query_index": r.index,
        "task_type": r.task_type,
        "attempts": attempts,
        "reason": reason,
        "raw_output": raw,
    }


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copy_rate(query: str, passage: str) -> float:
    """Share of the query's words that also occur in the passage (1.0: every word copied)."""
    q = words(query)
    if not q:
        return 0.0
    vocab = set(words(passage))
    return sum(w in vocab for w in q) / len(q)


def _queries_table(
    requests: list[Request], done: dict[str, CacheEntry], passages: pa.Table, llm: str, prompt_hash: str
) -> pa.Table:
    texts = dict(zip(passages.column("passage_id").to_pylist(), passages.column("text").to_pylist()))
    rows = []
    for r in sorted(requests, key=lambda r: (r.passage_id, r.index)):
        entry = done.get(r.key)
        if entry is None:
            continue
        v = entry.value
        rows.append(
            {
                "query_id": query_id(r.passage_id, r.index),
                "passage_id": r.passage_id,
                "query_index": r.index,
                "task_type": r.task_type,
                "task": v["task"],
                "query": v["query"],
                "llm": llm,
                "prompt_hash": prompt_hash,
                "created_at": entry.created_at.astimezone(timezone.utc),
                "attempt": v["attempt"],
                "new_tokens": v["new_tokens"],
                "query_words": len(v["query"].split()),
                "copy_rate": copy_rate(v["query"], texts[r.passage_id]),
            }
        )
    return pa.Table.from_pylist(rows, schema=QUERIES_SCHEMA)


def quality_report(queries: pa.Table, requested: int, failed: int) -> pa.Table:
    """(metric, value) rows: counts, failure rate, query length, copy rate, duplicates, task types."""
    rows = queries.to_pylist()
    n = len(rows)
    texts = [" ".join(words(r["query"])) for r in rows]
    metrics: list[tuple[str, float]] = [
        ("queries_requested", requested),
        ("queries_written", n),
        ("failures", failed),
        ("failure_rate", failed / requested if requested else 0.0),
        ("mean_query_words", sum(r["query_words"] for r in rows) / n if n else 0.0),
        ("mean_copy_rate", sum(r["copy_rate"] for r in rows) / n if n else 0.0),
        ("full_copies", sum(r["copy_rate"] == 1.0 for r in rows)),  # every query word is in the passage
        ("duplicate_queries", n - len(set(texts))),  # same words, case and punctuation aside
        ("retried", sum(r["attempt"] > 0 for r in rows)),
    ]
    types = Counter(r["task_type"] for r in rows)
    metrics += [(f"task_type:{t}", c) for t, c in sorted(types.items())]
    return pa.table({"metric": [m for m, _ in metrics], "value": [float(v) for _, v in metrics]})


def _advance(bar, n: int, tokens: int, seconds: float) -> None:
    if bar is None:
        return
    bar.update(n)
    bar.set_postfix_str(f"{bar.n / max(seconds, 1e-9):.2f} passages/s, {tokens / max(seconds, 1e-9):.0f} tok/s")
