"""The judge check: how much do the LLM's scores improve on the encoder, on labelled data?

On a labelled BEIR split (`judge.path`, `judge.split`, never test) a seeded sample of queries is
embedded with the pipeline's encoder in the Gecko format, each query's top N documents are taken
(exact search), and the LLM scores every pair through the same machinery, prompts and cache as the
`llm_scores` stage (`score_relevance`, honouring `score.methods`). Each query's N documents are then
ranked by the encoder (knn), by QL, by RC, by Gecko's fusion R = 1/r_QL + 1/r_RC, and by a grid of
weighted fusions R = w_ql/(k + r_ql) + w_rc/(k + r_rc) + w_knn/(k + r_knn), w in {0, 0.5, 1},
k = `select.rrf_k`; every ranking is scored by nDCG@10 as BEIR computes it (pytrec_eval's
`ndcg_cut_10`), documents outside the top N counting as not retrieved. The grid's best weights are
what `select.weights: judge` reads from the metrics file.

Fused scores are exact fractions, so sums that are equal on paper are true ties; ties go to the
encoder's rank, then the passage id, so every run agrees.

Heavy imports (torch, transformers) happen inside functions: only stages and benches import this.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.labelled import read_beir, stable_int
from pipeline.params import JudgeParams, Params

SIGNALS = ("ql", "rc", "knn")  # the ranks a weighted fusion combines
GRID_VALUES = (0.0, 0.5, 1.0)
GECKO_WEIGHTS = {"ql": 1.0, "rc": 1.0, "knn": 0.0}  # R = 1/r_QL + 1/r_RC
NAMED = {  # the single rankings reported beside the grid
    "knn": {"ql": 0.0, "rc": 0.0, "knn": 1.0},
    "ql": {"ql": 1.0, "rc": 0.0, "knn": 0.0},
    "rc": {"ql": 0.0, "rc": 1.0, "knn": 0.0},
    "fused": GECKO_WEIGHTS,
}

RANKINGS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("passage_id", pa.string()),
        ("knn_rank", pa.int64()),
        ("knn_score", pa.float32()),
        ("ql_rank", pa.int64()),  # NULL when ql is not in score.methods
        ("rc_rank", pa.int64()),  # NULL when rc is not in score.methods
        ("ql_sum", pa.float64()),
        ("rc_logodds", pa.float64()),
        ("relevance", pa.int64()),  # the qrels label; 0 for an unjudged document
    ]
)
REPORT_SCHEMA = pa.schema(
    [
        ("ranking", pa.string()),  # knn | ql | rc | fused | grid
        ("w_ql", pa.float64()),
        ("w_rc", pa.float64()),
        ("w_knn", pa.float64()),
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
    rows = [
        {"query_id": q["id"], "passage_id": judge_set.corpus[i]["id"], "knn_rank": rank, "knn_score": float(score),
         "task": task, "query": q["text"], "title": judge_set.corpus[i]["title"], "text": judge_set.corpus[i]["text"]}
        for q, row_indices, row_scores in zip(judge_set.queries, indices, scores)
        for rank, (i, score) in enumerate(zip(row_indices, row_scores), start=1)
    ]  # fmt: skip
    stats = {"encoder": encoder.identity, "embedded": doc_stats.embedded}
    return pa.Table.from_pylist(rows), {**stats, "embed_seconds": time.perf_counter() - started}


def rerank(pairs: pa.Table, params: Params, progress: bool = False) -> tuple[pa.Table, dict]:
    """QL and/or RC of every pair (`score.methods`), through the LLM cache: `score_relevance`'s ranked table."""
    from pipeline.llm import load_llm
    from pipeline.llm.cache import LLMCache
    from pipeline.llm.scoring import score_relevance

    llm = load_llm(params.llm, params.base)
    with LLMCache(params.llm.cache_path) as cache:
        result = score_relevance(pairs, llm, params.score, cache, progress=progress)
    return result.scores, {**result.stats, "llm": llm.identity}


# --------------------------------------------------------------------------------------------
# Rankings and metrics (pure: the tests call these on hand-made rows)


def ndcg_at_10(ranked: Sequence[str], qrels: dict[str, int]) -> float:
    """nDCG@10 as BEIR reports it (pytrec_eval's ndcg_cut_10): gain = the qrels label, discount
    log2(rank + 1), ideal from all of the query's judgements; labels <= 0 gain nothing, and a
    query without a relevant document scores 0."""
    dcg = sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def fuse(rows: Sequence[dict], weights: dict[str, float], rrf_k: int) -> list[str]:
    """One query's passage ids by R = sum of w_s / (rrf_k + rank_s), best first; ties by knn_rank, then id."""

    def score(row: dict) -> Fraction:
        return sum((Fraction(w) / (rrf_k + row[f"{s}_rank"]) for s, w in weights.items() if w), Fraction(0))

    return [r["passage_id"] for r in sorted(rows, key=lambda r: (-score(r), r["knn_rank"], r["passage_id"]))]


def weight_grid(methods: Sequence[str]) -> list[dict[str, float]]:
    """Every (w_ql, w_rc, w_knn) in {0, 0.5, 1}^3 but all zeros; signals not computed stay at 0."""
    grid = [dict(zip(SIGNALS, values)) for values in itertools.product(GRID_VALUES, repeat=len(SIGNALS))]
    return [w for w in grid if any(w.values()) and computable(w, methods)]


def computable(weights: dict[str, float], methods: Sequence[str]) -> bool:
    """Whether every signal with a weight was computed (knn always is)."""
    return all(s in methods or s == "knn" for s, w in weights.items() if w)


def mean_ndcg(by_query: dict[str, list[dict]], qrels: dict[str, dict[str, int]], weights: dict, rrf_k: int) -> float:
    """Mean nDCG@10 over the queries of one weighted ranking of their top N."""
    values = [ndcg_at_10(fuse(rows, weights, rrf_k), qrels[q]) for q, rows in sorted(by_query.items())]
    return sum(values) / len(values) if values else 0.0


def best_weights(grid: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The grid point with the highest nDCG@10; ties prefer Gecko's default, then fewer non-zero
    weights, then larger ones (1 over 0.5: the same ranking when alone), then grid order."""

    def preference(point: dict[str, Any]) -> tuple:
        w = point["weights"]
        return (round(point["ndcg_at_10"], 12), w == GECKO_WEIGHTS, -sum(1 for v in w.values() if v), sum(w.values()))

    return dict(max(grid, key=preference)["weights"])  # max keeps the first of equal points


def default_weights(methods: Sequence[str]) -> dict[str, float]:
    """Gecko's default, restricted to the computed signals (QL alone when RC is off)."""
    return {s: (w if s in methods else 0.0) for s, w in GECKO_WEIGHTS.items()}


def judge_rankings(
    scores: pa.Table, qrels: dict[str, dict[str, int]], methods: Sequence[str], rrf_k: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """nDCG@10 of the named rankings and of the weight grid, over the queries of `scores`.

    Args:
        scores: query_id, passage_id, knn_rank, ql_rank, rc_rank (one row per query and top-N passage).
        qrels: labels of those queries.

    Returns:
        The metrics' `ndcg_at_10`, `grid`, `best_weights` and `recall_at_top_n` entries, and the
        rows of the report table.
    """
    by_query: dict[str, list[dict]] = {}
    for row in scores.to_pylist():
        by_query.setdefault(row["query_id"], []).append(row)
    named = {n: (mean_ndcg(by_query, qrels, w, rrf_k) if computable(w, methods) else None) for n, w in NAMED.items()}
    grid = [{"weights": w, "ndcg_at_10": mean_ndcg(by_query, qrels, w, rrf_k)} for w in weight_grid(methods)]
    best = best_weights(grid)
    report = [_report_row(name, NAMED[name], value, False) for name, value in named.items()]
    report += [_report_row("grid", p["weights"], p["ndcg_at_10"], p["weights"] == best) for p in grid]
    metrics = {
        "ndcg_at_10": named,
        "grid": grid,
        "best_weights": best,
        "best_ndcg_at_10": max(p["ndcg_at_10"] for p in grid),
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
    return {"ranking": name, "w_ql": weights["ql"], "w_rc": weights["rc"], "w_knn": weights["knn"],
            "ndcg_at_10": value, "is_best": is_best}  # fmt: skip


def rankings_table(pairs: pa.Table, scores: pa.Table, qrels: dict[str, dict[str, int]]) -> pa.Table:
    """One row per query and top-N passage: its ranks, scores and label."""
    knn_scores = {(r["query_id"], r["passage_id"]): r["knn_score"] for r in pairs.to_pylist()}
    rows = []
    for r in scores.to_pylist():
        pair = (r["query_id"], r["passage_id"])
        rows.append({**r, "knn_score": knn_scores[pair], "relevance": qrels[pair[0]].get(pair[1], 0)})
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
    found, report = judge_rankings(scores, judge_set.qrels, methods, params.select.rrf_k)
    metrics = {
        **found,
        "queries": len(judge_set.queries),
        **header,
        "corpus_docs": len(judge_set.corpus),
        "best_from": "grid",
        "encoder": embed_stats["encoder"],
        "llm": score_stats["llm"],
    }
    return JudgeResult(
        metrics=metrics,
        rankings=rankings_table(pairs, scores, judge_set.qrels),
        report=pa.Table.from_pylist(report, schema=REPORT_SCHEMA),
        stats={**embed_stats, **score_stats},
    )


def _disabled(header: dict[str, Any], methods: Sequence[str]) -> JudgeResult:
    metrics = {
        "ndcg_at_10": dict.fromkeys(NAMED),
        "grid": [],
        "best_weights": default_weights(methods),
        "best_ndcg_at_10": None,
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
    """The named rankings and the grid's best, one line each, nDCG@10 beside the weights."""
    lines = [f"  {'ranking':<18}{'w_ql':>6}{'w_rc':>6}{'w_knn':>7}{'nDCG@10':>10}"]
    rows = [(name, NAMED[name], value) for name, value in metrics["ndcg_at_10"].items()]
    if metrics["grid"]:
        rows.append((f"best of {len(metrics['grid'])}", metrics["best_weights"], metrics["best_ndcg_at_10"]))
    for name, w, value in rows:
        shown = f"{value:>10.4f}" if value is not None else f"{'-':>10}"
        lines.append(f"  {name:<18}{w['ql']:>6g}{w['rc']:>6g}{w['knn']:>7g}{shown}")
    return "\n".join(lines)
