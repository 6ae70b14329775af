"""Per-query scores and paired bootstrap intervals: is a difference between two models real?

mteb reports one number per set. To say whether trained beats base (or the control) beyond the
noise of 300 test queries, every model is also scored item by item, on the very texts mteb
encodes (`format_texts`' rules, through the same embedding cache, so nothing is embedded twice):
nDCG@10 per query for retrieval, the cosine per pair for STS. A paired bootstrap then resamples
the queries (or pairs) with replacement and reads the 2.5th and 97.5th percentiles of the
difference: the mean of per-query differences for nDCG, the difference of Spearman correlations
for STS (a correlation is not a mean of per-pair values, so it is recomputed on each resample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.labelled import RetrievalSet, STSSet

RESAMPLES = 2000
SEED = 42

Embed = Callable[[Sequence[str]], np.ndarray]  # texts -> unit rows


def ndcg_at_10(ranked: Sequence[str], qrels: dict[str, int]) -> float:
    """nDCG@10 as BEIR reports it (pytrec_eval's ndcg_cut_10): gain = the qrels label, discount
    log2(rank + 1), ideal from all of the query's judgements; labels <= 0 gain nothing, and a
    query without a relevant document scores 0."""
    gains = [max(qrels.get(d, 0), 0) for d in ranked[:10]]
    dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def document_texts(data: RetrievalSet, text_format: Any) -> list[str]:
    """The corpus as mteb hands it to the encoder: `title text` raw, or the Gecko passage format."""
    if text_format is None:
        return [f"{d['title']} {d['text']}".strip() if d["title"] else d["text"] for d in data.corpus]
    return text_format.passages([d["title"] for d in data.corpus], [d["text"] for d in data.corpus])


def query_texts(texts: Sequence[str], task: str, text_format: Any) -> list[str]:
    return list(texts) if text_format is None else text_format.queries([task] * len(texts), list(texts))


def retrieval_per_query(embed: Embed, data: RetrievalSet, task: str, text_format: Any) -> dict[str, float]:
    """nDCG@10 of each judged query, ranking the whole corpus by cosine (ties to the lower row)."""
    docs = embed(document_texts(data, text_format))
    queries = embed(query_texts([q["text"] for q in data.queries], task, text_format))
    ids = [d["id"] for d in data.corpus]
    out: dict[str, float] = {}
    for query, row in zip(data.queries, queries @ docs.T):
        top = np.argsort(-row, kind="stable")[:10]
        out[query["id"]] = ndcg_at_10([ids[i] for i in top], data.qrels[query["id"]])
    return out


def sts_per_pair(embed: Embed, data: STSSet, task: str, text_format: Any) -> np.ndarray:
    """The cosine of each pair (both sentences on the query side, as mteb encodes STS)."""
    first = embed(query_texts(data.sentence1, task, text_format))
    second = embed(query_texts(data.sentence2, task, text_format))
    return np.einsum("ij,ij->i", first, second)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


@dataclass(frozen=True)
class Interval:
    diff: float  # b minus a on the full set
    low: float  # 95 % paired bootstrap interval of the difference
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"diff": round(self.diff, 5), "low": round(self.low, 5), "high": round(self.high, 5)}

    def line(self) -> str:
        verdict = "above 0" if self.low > 0 else "below 0" if self.high < 0 else "includes 0"
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({verdict})"


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_mean_diff(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Paired: the same resampled queries for both models; the statistic is mean(b) - mean(a)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired scores must be two equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = (b - a)[_resamples(len(a), resamples, seed)].mean(axis=1)
    return Interval(float((b - a).mean()), *map(float, np.percentile(diffs, [2.5, 97.5])))


def bootstrap_spearman_diff(
    pred_a: np.ndarray, pred_b: np.ndarray, gold: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED
) -> Interval:
    """Paired over pairs: Spearman(b, gold) - Spearman(a, gold) on each resample."""
    gold = np.asarray(gold, float)
    from scipy.stats import rankdata

    diffs = np.empty(resamples)
    for i, rows in enumerate(_resamples(len(gold), resamples, seed)):
        g = rankdata(gold[rows])
        diffs[i] = np.corrcoef(rankdata(pred_b[rows]), g)[0, 1] - np.corrcoef(rankdata(pred_a[rows]), g)[0, 1]
    full = _spearman(pred_b, gold) - _spearman(pred_a, gold)
    return Interval(full, *map(float, np.percentile(diffs, [2.5, 97.5])))


def compare(items: dict[str, dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, dict]]:
    """Intervals for each (a, b) model pair present, per set: {"b_vs_a": {set: interval}}.

    Args:
        items: model -> set name -> per-item scores: a {query id: nDCG} dict (retrieval) or
            {"pred": cosines, "gold": scores} (STS).
    """
    out: dict[str, dict[str, dict]] = {}
    for a, b in pairs:
        if a not in items or b not in items:
            continue
        by_set = {}
        for name, scores_a in items[a].items():
            scores_b = items[b][name]
            if "gold" in scores_a:
                interval = bootstrap_spearman_diff(scores_a["pred"], scores_b["pred"], scores_a["gold"])
            else:
                ids = sorted(scores_a)
                interval = bootstrap_mean_diff([scores_a[i] for i in ids], [scores_b[i] for i in ids])
            by_set[name] = interval
        out[f"{b}_vs_{a}"] = by_set
    return out
