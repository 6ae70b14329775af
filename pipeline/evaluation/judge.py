"""The judge check: how much do the LLM's scores improve on the encoder, on labelled data?

On a labelled BEIR split (`judge.path`, `judge.split`, never test) a seeded sample of queries is
embedded with the pipeline's encoder in the Gecko format, each query's top N documents are taken
(exact search), joined by BM25's top `neighbors.bm25.top_n` as the neighbors stage mines them, and
BM25 ranks them all; the LLM scores every pair through the same machinery, prompts and cache as the
`llm_scores` stage (`score_relevance`, honouring `score.methods`), and each of `judge.models` adds
its own QL (signal `ql@<model>`). Each query's candidates are then ranked by every signal alone
(knn, bm25, ql, rc, ql@<model>), by Gecko's fusion R = 1/r_QL + 1/r_RC, and by a grid of weighted
fusions R = sum of w_s/(k + r_s), w in {0, 0.5, 1}, k = `select.rrf_k`; every ranking is scored by
nDCG@10 as BEIR computes it (pytrec_eval's `ndcg_cut_10`), documents outside the candidates
counting as not retrieved. The best grid point over the signals the selection can fuse (ql, rc,
knn, bm25) is what `select.weights: judge` reads from the metrics file; `best_fusion` is the best
over every signal, extra LLMs included.

Fused scores are exact fractions, so sums that are equal on paper are true ties; ties go to the
encoder's rank, then the passage id, so every run agrees.

Heavy imports (torch, transformers) happen inside functions: only stages and benches import this.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.evaluation.intervals import ndcg_at_10
from pipeline.labelled import read_beir, stable_int
from pipeline.params import JudgeParams, Params

SELECTABLE = ("ql", "rc", "knn", "bm25")  # the signals select.weights can fuse (sql/fused_ranks.sql)
GRID_VALUES = (0.0, 0.5, 1.0)
GECKO_WEIGHTS = {"ql": 1.0, "rc": 1.0, "knn": 0.0, "bm25": 0.0}  # R = 1/r_QL + 1/r_RC


def signals(methods: Sequence[str], models: Sequence[str] = ()) -> list[str]:
    """The rankings of a judge run: the encoder's and BM25's always, the LLM's methods, and the QL
    of every extra model."""
    return ["knn", "bm25", *(m for m in ("ql", "rc") if m in methods), *(f"ql@{m}" for m in models)]


def named_rankings(names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each signal alone, and Gecko's fusion when both QL and RC are there."""
    named = {s: {t: float(t == s) for t in names} for s in names}
    if {"ql", "rc"} <= set(names):
        named["fused"] = {t: GECKO_WEIGHTS.get(t, 0.0) for t in names}
    return named

RANKINGS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("passage_id", pa.string()),
        ("knn_rank", pa.int64()),
        ("knn_score", pa.float32()),
        ("ql_rank", pa.int64()),  # NULL when ql is not in score.methods
        ("rc_rank", pa.int64()),  # NULL when rc is not in score.methods
        ("bm25_rank", pa.int64()),
        ("bm25_score", pa.float32()),
        ("mined_by", pa.string()),  # knn | bm25 (neighbors.bm25.top_n)
        ("extra_ranks", pa.map_(pa.string(), pa.int64())),  # ql@<model> -> rank, one per judge.models
        ("ql_sum", pa.float64()),
        ("rc_logodds", pa.float64()),
        ("relevance", pa.int64()),  # the qrels label; 0 for an unjudged document
    ]
)
REPORT_SCHEMA = pa.schema(
    [
        ("ranking", pa.string()),  # a signal's name | fused | grid
        ("weights", pa.string()),  # JSON: every signal's weight, extra models' included
        ("w_ql", pa.float64()),
        ("w_rc", pa.float64()),
        ("w_knn", pa.float64()),
        ("w_bm25", pa.float64()),
        ("ndcg_at_10", pa.float64()),  # NULL: a signal of the ranking was not computed
        ("is_best", pa.bool_()),  # the grid point written as best_weights
    ]
)


@dataclass
class JudgeSet:
    """The judged part of a BEIR split: sampled queries, their qrels, and the corpus to search."""

    corpus: list[dict[str, str]]  # id, title, text
    queries: list[dict[str, str]]  # id, text
    qrels: dict[str, dict[str, int]]  # query id -> {corpus id: label}, judged queries only


@dataclass
class JudgeResult:
    metrics: dict[str, Any]  # written as `judge.metrics_path`
    rankings: pa.Table  # table judge_rankings
    report: pa.Table  # table judge_report
    stats: dict[str, Any] = field(default_factory=dict)  # timings and cache use: printed, not in metrics


# --------------------------------------------------------------------------------------------
# Data


def sample_ids(ids: Sequence[str], n: int | None, seed: int, salt: str) -> list[str]:
    """The `n` ids with the smallest seeded hash (all when n is None or larger), sorted.

    Hash order rather than a shuffle: growing the set only swaps in newcomers, the rest stay.
    """
    if n is None or n >= len(ids):
        return sorted(ids)
    return sorted(sorted(ids, key=lambda i: stable_int(seed, salt, i))[:n])


def load_judge_set(params: JudgeParams, seed: int) -> JudgeSet:
    """Read the BEIR split, sample `params.queries` judged queries and cut the corpus to `max_corpus`.

    The cut corpus holds every document relevant to a sampled query (even past `max_corpus`) plus a
    seeded sample of the others up to `max_corpus` documents.

    Raises:
        pipeline.labelled.EvalDataError: a missing or malformed file.
    """
    data = read_beir(params.path, params.split)
    chosen = sample_ids(list(data.qrels), params.queries, seed, "judge_queries")
    qrels = {q: data.qrels[q] for q in chosen}
    corpus = data.corpus
    if params.max_corpus is not None and params.max_corpus < len(corpus):
        relevant = {d for judged in qrels.values() for d, label in judged.items() if label > 0}
        others = [d["id"] for d in corpus if d["id"] not in relevant]
        keep = relevant | set(sample_ids(others, max(params.max_corpus - len(relevant), 0), seed, "judge_corpus"))
        corpus = [d for d in corpus if d["id"] in keep]
    queries = [q for q in data.queries if q["id"] in qrels]
    return JudgeSet(corpus=corpus, queries=queries, qrels=qrels)


def retrieve(judge_set: JudgeSet, params: Params, top_n: int, progress: bool = False) -> tuple[pa.Table, dict]:
    """Each query's top N documents by the encoder (`encoder.*` params, Gecko format, embedding cache).

    Returns:
        The pairs `score_relevance` takes (query_id, passage_id, knn_rank, knn_score, task, query,
        title, text), and stats (encoder identity, texts embedded, seconds).
    """
    from pipeline.retrieval.embedding_cache import encode_cached, open_cache
    from pipeline.retrieval.encoder import Encoder, TextFormat, instruction_format
    from pipeline.retrieval.bm25 import hybrid_neighbors
    from pipeline.retrieval.exact import top_n_search

    started = time.perf_counter()
    enc, task = params.encoder, params.judge.task
    encoder = Encoder.load(
        enc.model, device=params.base.device, dtype=enc.dtype, max_length=enc.max_length, threads=params.base.threads
    ).exclude_instruction(instruction_format(enc))
    text_format = TextFormat.from_params(enc)
    cache = open_cache(enc.cache_path)
    try:
        doc_texts = text_format.passages([d["title"] for d in judge_set.corpus], [d["text"] for d in judge_set.corpus])
        docs, doc_stats = encode_cached(
            encoder, doc_texts, cache, batch_size=enc.batch_size, progress=progress, desc="judge: embed corpus"
        )
        query_texts = text_format.queries([task] * len(judge_set.queries), [q["text"] for q in judge_set.queries])
        queries, _ = encode_cached(encoder, query_texts, cache, batch_size=enc.batch_size)
    finally:
        if cache is not None:
            cache.close()
    indices, scores = top_n_search(queries, docs, top_n)
    corpus = judge_set.corpus
    mined = pa.table({
        "query_id": [q["id"] for q in judge_set.queries for _ in range(indices.shape[1])],
        "passage_id": [corpus[i]["id"] for row in indices for i in row],
        "knn_rank": [rank for _ in judge_set.queries for rank in range(1, indices.shape[1] + 1)],
        "knn_score": pa.array(scores.reshape(-1), pa.float32()),
    })  # fmt: skip
    position = {d["id"]: i for i, d in enumerate(corpus)}
    bm = params.neighbors.bm25
    candidates, bm25_stats = hybrid_neighbors(
        mined,
        pa.table({"passage_id": [d["id"] for d in corpus], "title": [d["title"] for d in corpus],
                  "text": [d["text"] for d in corpus]}),
        pa.table({"query_id": [q["id"] for q in judge_set.queries], "query": [q["text"] for q in judge_set.queries]}),
        queries, lambda ids: docs[[position[i] for i in ids]], k1=bm.k1, b=bm.b, top_n=bm.top_n,
    )  # fmt: skip
    texts = {q["id"]: q["text"] for q in judge_set.queries}
    rows = [
        {**r, "task": task, "query": texts[r["query_id"]], "title": corpus[position[r["passage_id"]]]["title"],
         "text": corpus[position[r["passage_id"]]]["text"]}
        for r in candidates.to_pylist()
    ]  # fmt: skip
    stats = {"encoder": encoder.identity, "embedded": doc_stats.embedded, "bm25_extra_pairs": bm25_stats["extra_pairs"]}
    return pa.Table.from_pylist(rows), {**stats, "embed_seconds": time.perf_counter() - started}


def rerank(pairs: pa.Table, params: Params, progress: bool = False) -> tuple[pa.Table, dict]:
    """QL and/or RC of every pair (`score.methods`), through the LLM cache: `score_relevance`'s ranked
    table, with each extra model's (`judge.models`) QL rank in `extra_ranks`. `score.methods: []`
    and no extra model: no LLM is loaded."""
    from pipeline.llm import load_llm
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.scoring import score_relevance, unscored_table

    stats: dict[str, Any] = {"llm": "none", "cached": 0, "computed": 0, "score_seconds": 0.0, "extra": {}}
    with LLMCache(params.llm.cache_path) as cache:
        if params.score.methods:
            llm = load_llm(params.llm, params.base)
            result = score_relevance(pairs, llm, params.score, cache, progress=progress)
            scores = result.scores
            stats |= {**result.stats, "llm": llm.identity}
        else:
            scores = unscored_table(pairs)
        extra: dict[tuple[str, str], dict[str, int]] = {}
        for name in params.judge.models:
            llm = load_llm(params.llm.model_copy(update={"model": name}), params.base)
            ql_only = params.score.model_copy(update={"methods": ["ql"]})
            result = score_relevance(pairs, llm, ql_only, cache, progress=progress)
            for r in result.scores.select(["query_id", "passage_id", "ql_rank"]).to_pylist():
                extra.setdefault((r["query_id"], r["passage_id"]), {})[f"ql@{name}"] = r["ql_rank"]
            stats["extra"][f"ql@{name}"] = {**result.stats, "llm": llm.identity}
    keys = zip(scores["query_id"].to_pylist(), scores["passage_id"].to_pylist())
    ranks = pa.array([extra.get(k, {}) for k in keys], pa.map_(pa.string(), pa.int64()))
    return scores.append_column("extra_ranks", ranks), stats


# --------------------------------------------------------------------------------------------
# Rankings and metrics (pure: the tests call these on hand-made rows)


def fuse(rows: Sequence[dict], weights: dict[str, float], rrf_k: int) -> list[str]:
    """One query's passage ids by R = sum of w_s / (rrf_k + rank_s), best first; ties by knn_rank, then id."""

    def score(row: dict) -> Fraction:
        return sum((Fraction(w) / (rrf_k + row[f"{s}_rank"]) for s, w in weights.items() if w), Fraction(0))

    return [r["passage_id"] for r in sorted(rows, key=lambda r: (-score(r), r["knn_rank"], r["passage_id"]))]


def weight_grid(names: Sequence[str]) -> list[dict[str, float]]:
    """Every weighting of the run's signals in {0, 0.5, 1}^n but all zeros."""
    grid = [dict(zip(names, values)) for values in itertools.product(GRID_VALUES, repeat=len(names))]
    return [w for w in grid if any(w.values())]


def selectable(weights: dict[str, float]) -> bool:
    """Whether select.weights can fuse this weighting: no weight on a signal outside SELECTABLE."""
    return all(s in SELECTABLE for s, w in weights.items() if w)


def as_selection(weights: dict[str, float]) -> dict[str, float]:
    """The weighting as select.weights takes it: every selectable signal, 0 where absent."""
    return {s: float(weights.get(s, 0.0)) for s in SELECTABLE}


def mean_ndcg(by_query: dict[str, list[dict]], qrels: dict[str, dict[str, int]], weights: dict, rrf_k: int) -> float:
    """Mean nDCG@10 over the queries of one weighted ranking of their candidates."""
    values = [ndcg_at_10(fuse(rows, weights, rrf_k), qrels[q]) for q, rows in sorted(by_query.items())]
    return sum(values) / len(values) if values else 0.0


def best_weights(grid: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The grid point with the highest nDCG@10; ties prefer Gecko's default, then fewer non-zero
    weights, then larger ones (1 over 0.5: the same ranking when alone), then grid order."""

    def preference(point: dict[str, Any]) -> tuple:
        w = point["weights"]
        gecko = as_selection(w) == GECKO_WEIGHTS and selectable(w)
        return (round(point["ndcg_at_10"], 12), gecko, -sum(1 for v in w.values() if v), sum(w.values()))

    return dict(max(grid, key=preference)["weights"])  # max keeps the first of equal points


def default_weights(methods: Sequence[str]) -> dict[str, float]:
    """Gecko's default, restricted to the computed signals (QL alone when RC is off)."""
    return {s: (w if s in methods else 0.0) for s, w in GECKO_WEIGHTS.items()}


def _rows_by_query(scores: pa.Table) -> dict[str, list[dict]]:
    """Each query's candidate rows, extra models' ranks flattened to `ql@<model>_rank` keys."""
    by_query: dict[str, list[dict]] = {}
    for row in scores.to_pylist():
        for name, rank in row.pop("extra_ranks", None) or []:
            row[f"{name}_rank"] = rank
        by_query.setdefault(row["query_id"], []).append(row)
    return by_query


def judge_rankings(
    scores: pa.Table, qrels: dict[str, dict[str, int]], names: Sequence[str], rrf_k: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """nDCG@10 of every signal alone, of Gecko's fusion and of the weight grid over `names`.

    Args:
        scores: query_id, passage_id and a `<signal>_rank` per signal in `names` (extra models' in
            `extra_ranks`), one row per query and candidate.
        qrels: labels of those queries.

    Returns:
        The metrics' `ndcg_at_10`, `grid`, `best_weights` (the best select.weights can fuse),
        `best_fusion` (the best of all), and `recall_at_top_n` entries, and the report rows.
    """
    by_query = _rows_by_query(scores)
    named_weights = named_rankings(names)
    named = {n: mean_ndcg(by_query, qrels, w, rrf_k) for n, w in named_weights.items()}
    grid = [{"weights": w, "ndcg_at_10": mean_ndcg(by_query, qrels, w, rrf_k)} for w in weight_grid(names)]
    usable = [p for p in grid if selectable(p["weights"])]
    best, overall = best_weights(usable), best_weights(grid)
    report = [_report_row(name, named_weights[name], value, False) for name, value in named.items()]
    report += [_report_row("grid", p["weights"], p["ndcg_at_10"], p["weights"] == best) for p in grid]
    score_of = {json.dumps(p["weights"], sort_keys=True): p["ndcg_at_10"] for p in grid}
    metrics = {
        "signals": list(names),
        "ndcg_at_10": named,
        "grid": grid,
        "best_weights": as_selection(best),
        "best_ndcg_at_10": score_of[json.dumps(best, sort_keys=True)],
        "best_fusion": {"weights": overall, "ndcg_at_10": score_of[json.dumps(overall, sort_keys=True)]},
        "best_over_knn": score_of[json.dumps(overall, sort_keys=True)] - named["knn"],
        "recall_at_top_n": recall(by_query, qrels),
    }
    return metrics, report


def recall(by_query: dict[str, list[dict]], qrels: dict[str, dict[str, int]]) -> float:
    """Mean share of each query's relevant documents inside its top N: the ceiling of any reranking."""
    shares = []
    for q, rows in by_query.items():
        relevant = {d for d, label in qrels[q].items() if label > 0}
        if relevant:
            shares.append(len(relevant & {r["passage_id"] for r in rows}) / len(relevant))
    return sum(shares) / len(shares) if shares else 0.0


def _report_row(name: str, weights: dict[str, float], value: float | None, is_best: bool) -> dict[str, Any]:
    return {"ranking": name, "weights": json.dumps(weights), **{f"w_{s}": weights.get(s, 0.0) for s in SELECTABLE},
            "ndcg_at_10": value, "is_best": is_best}  # fmt: skip


def rankings_table(pairs: pa.Table, scores: pa.Table, qrels: dict[str, dict[str, int]]) -> pa.Table:
    """One row per query and candidate: its ranks, scores and label."""
    mined = {(r["query_id"], r["passage_id"]): r for r in pairs.to_pylist()}
    rows = []
    for r in scores.to_pylist():
        pair = (r["query_id"], r["passage_id"])
        m = mined[pair]
        rows.append({**r, "knn_score": m["knn_score"], "bm25_rank": m["bm25_rank"], "bm25_score": m["bm25_score"],
                     "mined_by": m["mined_by"], "relevance": qrels[pair[0]].get(pair[1], 0)})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=RANKINGS_SCHEMA)  # the schema keeps its columns only


# --------------------------------------------------------------------------------------------
# The whole check


def run_judge(params: Params, progress: bool = False) -> JudgeResult:
    """Embed, retrieve, rerank with the LLM and score every ranking; see the module docstring.

    `judge.queries: 0` does none of it: empty tables, null scores, and Gecko's default weights.

    Raises:
        pipeline.labelled.EvalDataError, pipeline.retrieval.encoder.EncoderError, pipeline.llm.LLMError,
        pipeline.llm.ScoringError.
    """
    jp, methods = params.judge, list(params.score.methods)
    top_n = jp.top_n or params.neighbors.top_n
    header = {"top_n": top_n, "methods": methods, "rrf_k": params.select.rrf_k, "path": str(jp.path), "split": jp.split}
    if jp.queries == 0:
        return _disabled(header, methods)
    judge_set = load_judge_set(jp, params.base.seed)
    pairs, embed_stats = retrieve(judge_set, params, top_n, progress)
    scores, score_stats = rerank(pairs, params, progress)
    # BM25's rank comes with the candidates (retrieve), the LLMs' with the scores.
    bm25 = {(r["query_id"], r["passage_id"]): r["bm25_rank"] for r in pairs.select(["query_id", "passage_id", "bm25_rank"]).to_pylist()}
    keys = zip(scores["query_id"].to_pylist(), scores["passage_id"].to_pylist())
    scores = scores.append_column("bm25_rank", pa.array([bm25[k] for k in keys], pa.int64()))
    names = signals(methods, jp.models)
    found, report = judge_rankings(scores, judge_set.qrels, names, params.select.rrf_k)
    metrics = {
        **found,
        "queries": len(judge_set.queries),
        **header,
        "corpus_docs": len(judge_set.corpus),
        "best_from": "grid",
        "encoder": embed_stats["encoder"],
        "llm": score_stats["llm"],
        "models": {name: stats["llm"] for name, stats in score_stats["extra"].items()},
    }
    # Cost per scored pair (printed, not in the metrics: a cached re-run must write the same file).
    score_stats["seconds_per_pair"] = {
        "main": score_stats["score_seconds"] / max(score_stats["computed"] / max(len(methods), 1), 1),
        **{name: st["score_seconds"] / max(st["computed"], 1) for name, st in score_stats["extra"].items()},
    }
    return JudgeResult(
        metrics=metrics,
        rankings=rankings_table(pairs, scores, judge_set.qrels),
        report=pa.Table.from_pylist(report, schema=REPORT_SCHEMA),
        stats={**embed_stats, **score_stats},
    )


def _disabled(header: dict[str, Any], methods: Sequence[str]) -> JudgeResult:
    metrics = {
        "signals": [],
        "ndcg_at_10": {},
        "grid": [],
        "best_weights": default_weights(methods),
        "best_ndcg_at_10": None,
        "best_fusion": None,
        "best_over_knn": None,
        "recall_at_top_n": None,
        "queries": 0,
        **header,
        "corpus_docs": 0,
        "best_from": "default (judge.queries is 0)",
    }
    return JudgeResult(metrics, RANKINGS_SCHEMA.empty_table(), REPORT_SCHEMA.empty_table())


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    """The metrics JSON, replaced atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def summary_table(metrics: dict[str, Any]) -> str:
    """Every signal alone, Gecko's fusion, the best selectable fusion and the best of all, one line
    each, nDCG@10 beside the non-zero weights."""

    def shown(weights: dict[str, float]) -> str:
        return " ".join(f"{s}={w:g}" for s, w in weights.items() if w) or "-"

    names = metrics.get("signals") or []
    named = named_rankings(names)
    rows = [(name, shown(named[name]), value) for name, value in metrics["ndcg_at_10"].items()]
    if metrics["grid"]:
        rows.append((f"best of {len(metrics['grid'])} (select)", shown(metrics["best_weights"]), metrics["best_ndcg_at_10"]))
        best = metrics["best_fusion"]
        rows.append(("best fusion (all)", shown(best["weights"]), best["ndcg_at_10"]))
    lines = [f"  {'ranking':<26}{'nDCG@10':>9}  weights"]
    for name, weights, value in rows:
        cell = f"{value:>9.4f}" if value is not None else f"{'-':>9}"
        lines.append(f"  {name:<26}{cell}  {weights}")
    if metrics.get("best_over_knn") is not None:
        lines.append(f"  best fusion - knn alone: {metrics['best_over_knn']:+.4f}")
    return "\n".join(lines)
