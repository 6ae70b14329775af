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
(both methods, every query that retrieved it) start with the same tokens. The forward passes are
the backend's `Scorer` (`llm.scorer(...)`): in-process, `PrefixScorer` runs that shared prefix once
per passage (pipeline/llm/transformers_backend.py); a server scores each prompt on its own.

Each prompt is one LLM-cache entry (key: model identity, full prompt, method, `METHOD_VERSION`),
written per forward batch: a re-run, a resume after a crash or a change to selection or training
parameters scores nothing twice, and editing only the RC prompt leaves the QL scores cached. Dropping
a method from `score.methods` (or adding it back) reuses every cached prompt of the other.

Heavy imports (torch, transformers) happen inside functions: only stages import this.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.llm.base import LLM, QL, RC, Scorer, ScoreRequest
from pipeline.llm.cache import LLMCache, cache_key
from pipeline.llm.prompt_file import PROMPTS_DIR, PromptFile
from pipeline.params import ScoreParams
from pipeline.progress import progress_bar

PROMPT_FILE = PROMPTS_DIR / "score.jinja"
NAMESPACE = "score"
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


class ScoreTemplate(PromptFile):
    """The Jinja prompt file: `system`, `passage`, `query_likelihood`, `relevance` macros and the
    `yes_words` / `no_words` the RC answer is read from."""

    def __init__(self, path: str | Path = PROMPT_FILE):
        super().__init__(path)
        self.yes_words: list[str] = list(self._module.yes_words)
        self.no_words: list[str] = list(self._module.no_words)

    def _messages(self, title: str | None, text: str, instruction: str) -> list[dict[str, str]]:
        user = f"{self._module.passage(title, text)}\n\n{instruction}"
        return [{"role": "system", "content": str(self._module.system())}, {"role": "user", "content": user}]

    def query_likelihood(self, llm: LLM, title: str | None, text: str, task: str, query: str) -> tuple[str, int]:
        """The QL prompt with the query as the assistant's reply, and the offset where the query starts."""
        head = llm.chat_prompt(self._messages(title, text, str(self._module.query_likelihood(task))))
        return head + query, len(head)

    def relevance(self, llm: LLM, title: str | None, text: str, task: str, query: str) -> str:
        """The RC prompt, ending where the assistant's answer (yes / no) starts."""
        return llm.chat_prompt(self._messages(title, text, str(self._module.relevance(task, query))))


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
    pairs: pa.Table, llm: LLM, params: ScoreParams, template: ScoreTemplate
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


def _key(llm: LLM, method: str, prompt: str, answers: dict | None = None) -> str:
    return cache_key(model=llm.identity, method=method, version=METHOD_VERSION, prompt=prompt, answers=answers)


def score_relevance(
    pairs: pa.Table,
    llm: LLM,
    params: ScoreParams,
    cache: LLMCache,
    template: ScoreTemplate | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    scorer: Scorer | None = None,
) -> ScoringResult:
    """QL and/or RC (`params.methods`) for every pair, through the LLM cache, ranked within each query;
    see the module docstring.

    Args:
        pairs: query_id, passage_id, knn_rank, task, query, title, text (one row per mined pair).
        llm: a loaded `pipeline.llm.base.LLM` (any backend).
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
    # Whole groups (cached prompts included) are tokenized, so each group's shared prefix is the same
    # in every run over these pairs; only the missing prompts are cut into batches, in a fixed order.
    # A resumed run thus computes each missing prompt in the same batch, beside the same prompts, as
    # a run that never stopped from the same cache, and so gets the same floats (padding and prefix
    # length change the rounding). Batches hold one method each, so a method's batches are the same
    # whether or not the other method is computed; only the shared prefix can grow without it, which
    # changes nothing but rounding.
    groups = _work_units(scorer, unique, todo, params.min_shared_prompts)
    per_pair = len(params.methods)  # prompts per pair
    bar = progress_bar(len(todo), "llm_scores", "prompt", progress)
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


def _work_units(
    scorer: Scorer, unique: list[ScoreRequest], todo: list[ScoreRequest], min_shared: int = 1
) -> list[list[ScoreRequest]]:
    """What each `score_group` call gets.

    A scorer that shares prompt prefixes (in-process) gets, in passage id order, each passage with
    at least `min_shared` prompts as one group (its passage prefix then runs once), and last all
    the passages with fewer as one pooled group, scored whole in batches across passages (the
    `score.min_shared_prompts` param). Groups hold cached prompts too (they are not run), and the
    pool holds every small passage of the run, missing prompts or not: a resumed run thus runs the
    same shared prefix as an uninterrupted one (a pool left with one passage would share its whole
    text; see above). A scorer without that sharing (a server, `shares_prefixes = False`) gets
    every missing prompt at once, so that `llm.concurrency` requests can be in flight whatever the
    number of prompts per passage."""
    if not todo:
        return []
    if not getattr(scorer, "shares_prefixes", True):
        return [todo]
    missing = {r.passage_id for r in todo}
    by_passage: dict[str, list[ScoreRequest]] = {}
    for r in unique:
        by_passage.setdefault(r.passage_id, []).append(r)
    small = {pid for pid, group in by_passage.items() if len(group) < min_shared}
    units = [by_passage[pid] for pid in sorted(missing - small)]
    if missing & small:
        units.append([r for pid in sorted(small) for r in by_passage[pid]])
    return units


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


def unscored_table(pairs: pa.Table) -> pa.Table:
    """The `llm_scores` rows of `score.methods: []`: every mined pair, no LLM score (NULL), so the
    selection downstream fuses only the encoder's and BM25's ranks."""
    rows = [
        {"query_id": q, "passage_id": p, "knn_rank": k, "llm": "none"}
        for q, p, k in zip(*(pairs.column(c).to_pylist() for c in ("query_id", "passage_id", "knn_rank")))
    ]
    return rank_scores(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA))


def rank_scores(scores: pa.Table) -> pa.Table:
    """`scores` with `ql_rank` and `rc_rank` per query (1 = highest score; ties by knn_rank, then id)."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.register("scores", scores)
        return con.sql(RANK_SQL).to_arrow_table()
    finally:
        con.close()


def _advance(bar, n: int, per_pair: int, seconds: float) -> None:
    if bar is None:
        return
    # One refresh per batch: the postfix is set quietly, then update() redraws.
    bar.set_postfix_str(f"{(bar.n + n) / per_pair / max(seconds, 1e-9):.2f} pairs/s", refresh=False)
    bar.update(n)
