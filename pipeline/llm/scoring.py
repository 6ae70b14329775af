"""Gecko's LLM relabelling: the LLM scores every mined (query, passage) pair two ways.

- Query likelihood, QL = log P(query | passage, task): the log-probabilities of the query's tokens
  when the query is written as the LLM's reply to the QL prompt; summed (`ql_sum`, Gecko's QL) and
  averaged per token (`ql_mean`).
- Relevance classification, RC = log P(yes) - log P(no) at the answer position of the RC prompt,
  read from the next-token logits over the full vocabulary (no sampling, no generation). "yes" is
  the set of single-token spellings of the prompt file's `yes_words`, each with and without a
  leading space (which spelling a model prefers depends on its chat template; summing the set makes
  the score independent of that); "no" likewise.

`score.methods` picks which of the two are computed; a method left out gets NULL scores and ranks.

Prompts come from `prompts/score.jinja` and put the passage first, so all the prompts of one passage
(both methods, every query that retrieved it) start with the same tokens. `PrefixScorer` runs that
shared prefix once per passage, repeats its KV cache across a batch of the passage's prompts and
runs only their differing tails, keeping logits only where a score reads them. This gives the scores
of the plain computation (each full prompt through the model, log-softmax, gather), up to float
rounding; tests/test_scoring.py checks it.

Each prompt is one LLM-cache entry (key: model identity, full prompt, method, `METHOD_VERSION`),
written per forward batch: a re-run, a resume after a crash or a change to selection or training
parameters scores nothing twice, and editing only the RC prompt leaves the QL scores cached. Dropping
a method from `score.methods` (or adding it back) reuses every cached prompt of the other.

Heavy imports (torch, transformers) happen inside functions: only stages import this.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.cache import LLMCache, cache_key
from pipeline.params import ScoreParams

if TYPE_CHECKING:
    import torch

    from pipeline.llm import LLM

PROMPT_FILE = Path(__file__).resolve().parent.parent / "prompts" / "score.jinja"
NAMESPACE = "score"
QL, RC = "ql", "rc"
# Bump when the computation of a score changes for the same prompt (answer-token rule, target span):
# it is part of every cache key, so old entries stop matching.
METHOD_VERSION = 1

SCORES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("passage_id", pa.string()),
        ("knn_rank", pa.int64()),
        ("ql_sum", pa.float64()),
        ("ql_mean", pa.float64()),
        ("rc_logodds", pa.float64()),
        ("ql_tokens", pa.int32()),  # tokens the query likelihood sums over
        ("llm", pa.string()),
        ("prompt_hash", pa.string()),
    ]
)

# Ranks within each query, 1 = best. Sum and mean of QL rank alike (a query has the same tokens
# whatever the passage); ties go to the encoder's order, then the id, so every build agrees.
# A method not computed (`score.methods`) has NULL scores, and so NULL ranks.
RANK_SQL = """
select
    query_id,
    passage_id,
    knn_rank,
    ql_sum,
    ql_mean,
    rc_logodds,
    if(ql_sum is null, null, row_number() over (partition by query_id order by ql_sum desc, knn_rank, passage_id))
        as ql_rank,
    if(rc_logodds is null, null,
        row_number() over (partition by query_id order by rc_logodds desc, knn_rank, passage_id)) as rc_rank,
    ql_tokens,
    llm,
    prompt_hash
from scores
order by query_id, knn_rank, passage_id
"""


class ScoringError(RuntimeError):
    """A prompt or tokenizer that cannot give a score (no query tokens, no single-token yes/no)."""


class ScoreTemplate:
    """The Jinja prompt file: `system`, `passage`, `query_likelihood`, `relevance` macros and the
    `yes_words` / `no_words` the RC answer is read from."""

    def __init__(self, path: str | Path = PROMPT_FILE):
        import jinja2

        self.path = Path(path)
        self.source = self.path.read_text(encoding="utf-8")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self._module = env.from_string(self.source).module
        self.yes_words: list[str] = list(self._module.yes_words)
        self.no_words: list[str] = list(self._module.no_words)
        self.hash = hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def _messages(self, title: str | None, text: str, instruction: str) -> list[dict[str, str]]:
        user = f"{self._module.passage(title, text)}\n\n{instruction}"
        return [{"role": "system", "content": str(self._module.system())}, {"role": "user", "content": user}]

    def query_likelihood(self, llm: "LLM", title: str | None, text: str, task: str, query: str) -> tuple[str, int]:
        """The QL prompt with the query as the assistant's reply, and the offset where the query starts."""
        head = llm.chat_prompt(self._messages(title, text, str(self._module.query_likelihood(task))))
        return head + query, len(head)

    def relevance(self, llm: "LLM", title: str | None, text: str, task: str, query: str) -> str:
        """The RC prompt, ending where the assistant's answer (yes / no) starts."""
        return llm.chat_prompt(self._messages(title, text, str(self._module.relevance(task, query))))


@dataclass(frozen=True)
class ScoreRequest:
    """One prompt to score: a (query, passage) pair and one method."""

    query_id: str
    passage_id: str
    knn_rank: int
    method: str  # QL or RC
    prompt: str
    target_start: int  # QL: character offset of the query in `prompt`; RC: len(prompt)
    key: str  # cache key


@dataclass
class ScoringResult:
    scores: pa.Table  # `llm_scores`, ranked
    stats: dict[str, float] = field(default_factory=dict)


def clip_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` cut after its first `max_tokens` tokens (at a character boundary, so nothing is re-decoded)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return text
    return text[: enc["offset_mapping"][max_tokens - 1][1]]


def build_requests(
    pairs: pa.Table, llm: "LLM", params: ScoreParams, template: ScoreTemplate
) -> list[ScoreRequest]:
    """One request per pair and method of `params.methods` (QL, RC), with its prompt and cache key.

    Args:
        pairs: query_id, passage_id, knn_rank, task, query, title, text (one row per mined pair).
    """
    answers = {"yes": template.yes_words, "no": template.no_words}
    clipped: dict[str, str] = {}
    requests = []
    for row in pairs.select(["query_id", "passage_id", "knn_rank", "task", "query", "title", "text"]).to_pylist():
        pid = row["passage_id"]
        if pid not in clipped:
            clipped[pid] = clip_tokens(llm.tokenizer, row["text"], params.max_passage_tokens)
        args = (llm, row["title"], clipped[pid], row["task"], row["query"])
        ids = (row["query_id"], pid, row["knn_rank"])
        if QL in params.methods:
            ql_prompt, ql_start = template.query_likelihood(*args)
            requests.append(ScoreRequest(*ids, QL, ql_prompt, ql_start, _key(llm, QL, ql_prompt)))
        if RC in params.methods:
            rc_prompt = template.relevance(*args)
            requests.append(ScoreRequest(*ids, RC, rc_prompt, len(rc_prompt), _key(llm, RC, rc_prompt, answers)))
    return requests


def _key(llm: "LLM", method: str, prompt: str, answers: dict | None = None) -> str:
    return cache_key(model=llm.identity, method=method, version=METHOD_VERSION, prompt=prompt, answers=answers)


@dataclass(frozen=True)
class _Row:
    """A tokenized request: its ids and the first position whose logits a score reads."""

    request: ScoreRequest
    ids: list[int]
    first_logit: int  # QL: position before the first query token; RC: the last position


class PrefixScorer:
    """Forward passes for score requests, the passage prefix computed once per passage.

    Attributes:
        forward_rows: prompts scored so far (tests count them to check that a resume redoes nothing).
        forward_tokens: tokens run through the model; `prompt_tokens`: tokens the prompts hold.
    """

    shares_prefixes = True  # score_relevance hands it one passage's prompts at a time

    def __init__(self, llm: "LLM", yes_words: Sequence[str], no_words: Sequence[str]):
        self.llm = llm
        self.yes_ids = answer_token_ids(llm.tokenizer, yes_words)
        self.no_ids = answer_token_ids(llm.tokenizer, no_words)
        if not self.yes_ids or not self.no_ids:
            raise ScoringError(f"no single-token spelling of {list(yes_words)} or {list(no_words)} in the tokenizer")
        if set(self.yes_ids) & set(self.no_ids):
            raise ScoringError("a token counts as both yes and no")
        self._cache_arg = _cache_argument(llm.model)
        self.forward_rows = 0
        self.forward_tokens = 0
        self.prompt_tokens = 0

    def tokenize(self, requests: Sequence[ScoreRequest]) -> list[_Row]:
        """Token ids of each full prompt, and where its score is read (from the tokenizer's offsets)."""
        if not requests:
            return []
        add_special = not self.llm.has_chat_template  # a chat prompt holds its special tokens already
        enc = self.llm.tokenizer(
            [r.prompt for r in requests], add_special_tokens=add_special, return_offsets_mapping=True
        )
        rows = []
        for r, ids, offsets in zip(requests, enc["input_ids"], enc["offset_mapping"]):
            # Drop special tokens a tokenizer appends (an EOS): the prompt's text ends the sequence.
            while offsets and offsets[-1][1] <= offsets[-1][0]:
                ids, offsets = ids[:-1], offsets[:-1]
            if r.method == QL:
                # The query's tokens: those ending inside it (a leading space merged into the first
                # query word belongs to the query; the template text before it does not).
                first = next((i for i, (_, end) in enumerate(offsets) if end > r.target_start), len(ids))
                if first == 0 or first == len(ids):
                    raise ScoringError(f"QL prompt of {r.query_id}/{r.passage_id}: no query tokens to score")
                rows.append(_Row(r, list(ids), first - 1))
            else:
                rows.append(_Row(r, list(ids), len(ids) - 1))
        return rows

    def score_group(
        self, rows: Sequence[_Row], batch_size: int, skip: Container[str] = ()
    ) -> Iterator[dict[str, dict[str, float]]]:
        """Score rows that share a passage; yields {cache key: value} per forward batch.

        The rows' common token prefix (stopping before the first position any row reads logits
        from) runs once; each batch runs only the rows' tails on a copy of its KV cache. A batch
        whose keys are all in `skip` is not run; in a batch that is run, only keys not in `skip`
        are yielded (what is already stored stays as stored).
        """
        # One method per batch (an edited QL or RC prompt then leaves the other method's batches
        # cached whole), similar lengths together (less padding).
        batches = []
        for method in sorted({r.request.method for r in rows}):
            ordered = sorted((r for r in rows if r.request.method == method), key=lambda r: (len(r.ids), r.request.key))
            batches += [ordered[start : start + batch_size] for start in range(0, len(ordered), batch_size)]
        batches = [b for b in batches if any(r.request.key not in skip for r in b)]
        if not batches:
            return
        prefix = _common_prefix([r.ids for r in rows])[: min(r.first_logit for r in rows)]
        base_cache = self._run_prefix(prefix) if prefix else None
        for batch in batches:
            values = self._score_batch(batch, len(prefix), base_cache)
            yield {k: v for k, v in values.items() if k not in skip}

    def _run_prefix(self, prefix: list[int]) -> Any:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.model.config)
        input_ids = torch.tensor([prefix], device=self.llm.device)
        with torch.inference_mode():
            self.llm.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self.forward_tokens += len(prefix)
        return cache

    def _score_batch(self, batch: Sequence[_Row], prefix_len: int, base_cache: Any) -> dict[str, dict[str, float]]:
        import torch

        tails = [r.ids[prefix_len:] for r in batch]
        width = max(len(t) for t in tails)
        # Right padding: a causal model's real tokens never attend to the pads after them, and
        # positions stay those of the unpadded prompt, so no mask or position ids are needed.
        pad = next((t for t in (self.llm.tokenizer.pad_token_id, self.llm.tokenizer.eos_token_id) if t is not None), 0)
        input_ids = torch.tensor([t + [pad] * (width - len(t)) for t in tails], device=self.llm.device)
        kwargs: dict[str, Any] = {}
        if base_cache is not None:
            cache = copy.deepcopy(base_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[self._cache_arg] = cache
        # Logits only from the first position any row reads: the LM head over the whole vocabulary
        # at every position would be a large share of the cost of these short tails.
        first = min(r.first_logit for r in batch) - prefix_len
        keep = width - first
        with torch.inference_mode():
            out = self.llm.model(input_ids=input_ids, use_cache=base_cache is not None, logits_to_keep=keep, **kwargs)
        logits = out.logits  # (batch, keep, vocab): position p of a tail sits at p - first
        self.forward_rows += len(batch)
        self.forward_tokens += sum(len(t) for t in tails)
        self.prompt_tokens += sum(len(r.ids) for r in batch)
        values = {}
        for i, row in enumerate(batch):
            start = row.first_logit - prefix_len - first
            end = len(row.ids) - 1 - prefix_len - first  # the last real token's logits
            if row.request.method == QL:
                values[row.request.key] = self._ql(logits[i, start:end], row.ids[row.first_logit + 1 :])
            else:
                values[row.request.key] = self._rc(logits[i, end])
        return values

    def _ql(self, logits: "torch.Tensor", targets: list[int]) -> dict[str, float]:
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)
        index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
        token_lp = logprobs.gather(1, index).squeeze(1).double()
        total = float(token_lp.sum())
        return {"sum": total, "mean": total / len(targets), "tokens": len(targets)}

    def _rc(self, logits: "torch.Tensor") -> dict[str, float]:
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1).double()
        yes = float(torch.logsumexp(logprobs[self.yes_ids], dim=0))
        no = float(torch.logsumexp(logprobs[self.no_ids], dim=0))
        return {"logodds": yes - no, "log_p_yes": yes, "log_p_no": no}


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Token ids of the single-token spellings of `words`, each with and without a leading space."""
    ids = set()
    for word in words:
        for spelling in (word, " " + word):
            tokens = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(tokens) == 1:
                ids.add(tokens[0])
    return sorted(ids)


def _common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    first = list(rows[0])
    n = len(first)
    for row in rows[1:]:
        n = min(n, len(row))
        for i in range(n):
            if row[i] != first[i]:
                n = i
                break
    return first[:n]


def _cache_argument(model: Any) -> str:
    """transformers 5 renamed the forward argument `past_key_values` to `cache`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def score_relevance(
    pairs: pa.Table,
    llm: "LLM",
    params: ScoreParams,
    cache: LLMCache,
    template: ScoreTemplate | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    scorer: PrefixScorer | None = None,
) -> ScoringResult:
    """QL and/or RC (`params.methods`) for every pair, through the LLM cache, ranked within each query;
    see the module docstring.

    Args:
        pairs: query_id, passage_id, knn_rank, task, query, title, text (one row per mined pair).
        llm: a loaded `pipeline.llm.LLM`.
        cache: finished prompts are read from it and written to it after every forward batch.
        on_batch: called with the number of finished batches after each is cached (tests use it).
        scorer: reuse one (and its counters) across calls; if None, `llm.scorer(...)` with the template's answers.
    """
    template = template or ScoreTemplate()
    scorer = scorer or llm.scorer(template.yes_words, template.no_words)  # in-process or a server's
    started = time.perf_counter()
    requests = build_requests(pairs, llm, params, template)
    done = {k: e.value for k, e in cache.get_many(r.key for r in requests).items()}
    unique = list({r.key: r for r in requests}.values())  # a prompt twice: scored once
    todo = [r for r in unique if r.key not in done]
    # Whole groups (cached prompts included) are tokenized and cut into batches, exactly as in an
    # uninterrupted run; batches already cached are skipped. A resumed run thus computes each missing
    # prompt in the same batch, beside the same prompts, as a run that never stopped, and so gets the
    # same floats (padding and prefix length change the rounding). Batches hold one method each, so
    # a method's batches are the same whether or not the other method is computed; only the shared
    # prefix can grow without it, which changes nothing but rounding.
    groups = _work_units(scorer, unique, todo)
    per_pair = len(params.methods)  # prompts per pair
    bar = _progress_bar(len(todo), progress)
    rows_before, tokens_before, prompt_tokens_before = scorer.forward_rows, scorer.forward_tokens, scorer.prompt_tokens
    score_started = time.perf_counter()
    batches = 0
    for unit in groups:
        for values in scorer.score_group(scorer.tokenize(unit), params.batch_size, skip=done.keys()):
            done.update({k: e.value for k, e in cache.put_many(NAMESPACE, values).items()})  # a crash loses one batch
            batches += 1
            if on_batch is not None:
                on_batch(batches)
            _advance(bar, len(values), per_pair, time.perf_counter() - score_started)
    if bar is not None:
        bar.close()
    score_seconds = time.perf_counter() - score_started
    scores = rank_scores(_scores_table(requests, done, llm.identity, template.hash))
    computed = scorer.forward_rows - rows_before
    stats = {
        "pairs": scores.num_rows,
        "prompts": len(requests),
        "cached": len(requests) - len(todo),
        "computed": computed,
        "passages": len({r.passage_id for r in todo}),
        "batches": batches,
        "prompt_tokens": scorer.prompt_tokens - prompt_tokens_before,  # in the prompts scored
        "forward_tokens": scorer.forward_tokens - tokens_before,  # run through the model
        "score_seconds": score_seconds,
        "seconds": time.perf_counter() - started,
        "pairs_per_s": computed / per_pair / score_seconds if computed and score_seconds > 0 else 0.0,
    }
    return ScoringResult(scores, stats)


def _work_units(scorer: Any, unique: list[ScoreRequest], todo: list[ScoreRequest]) -> list[list[ScoreRequest]]:
    """What each `score_group` call gets.

    A scorer that shares each passage's prompt prefix (in-process) gets one passage's prompts at a
    time, cached ones included (see above), passages in id order. A scorer without that sharing (a
    server, `shares_prefixes = False`) gets every missing prompt at once, so that `llm.concurrency`
    requests can be in flight whatever the number of prompts per passage."""
    if not getattr(scorer, "shares_prefixes", True):
        return [todo] if todo else []
    missing = {r.passage_id for r in todo}
    groups: dict[str, list[ScoreRequest]] = {}
    for r in unique:
        if r.passage_id in missing:
            groups.setdefault(r.passage_id, []).append(r)
    return [groups[pid] for pid in sorted(groups)]


def _scores_table(requests: list[ScoreRequest], done: dict[str, Any], llm: str, prompt_hash: str) -> pa.Table:
    by_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for r in requests:
        row = by_pair.setdefault(
            (r.query_id, r.passage_id), {"query_id": r.query_id, "passage_id": r.passage_id, "knn_rank": r.knn_rank}
        )
        value = done[r.key]
        if r.method == QL:
            row.update(ql_sum=value["sum"], ql_mean=value["mean"], ql_tokens=value["tokens"])
        else:
            row["rc_logodds"] = value["logodds"]
    rows = [{**row, "llm": llm, "prompt_hash": prompt_hash} for row in by_pair.values()]
    return pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)


def rank_scores(scores: pa.Table) -> pa.Table:
    """`scores` with `ql_rank` and `rc_rank` per query (1 = highest score; ties by knn_rank, then id)."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.register("scores", scores)
        return con.sql(RANK_SQL).to_arrow_table()
    finally:
        con.close()


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="llm_scores", unit="prompt", dynamic_ncols=True)


def _advance(bar, n: int, per_pair: int, seconds: float) -> None:
    if bar is None:
        return
    # One refresh per batch: the postfix is set quietly, then update() redraws.
    bar.set_postfix_str(f"{(bar.n + n) / per_pair / max(seconds, 1e-9):.2f} pairs/s", refresh=False)
    bar.update(n)
