"""Model selection while training: score dev sets every few steps and keep the best step's weights.

The dev metrics are MTEB's main scores computed directly on the in-process encoder (no mteb run:
it would rebuild datasets and re-sort on every call): nDCG@10 as pytrec_eval computes it for
retrieval sets, Spearman of cosine similarity against the gold scores for STS sets. Texts are in
the Gecko format the model is trained on (queries and both STS sides as `task: ... | query: ...`
with the set's task, documents as passages), or raw for the categories `eval.prefixes` scores raw.
The selection score is the mean over the sets.

`ModelSelector` evaluates at step 0 (the base, before any update), every `train.eval_every`
steps and at the last step, and keeps a CPU copy of the best weights; a step must beat every
earlier one to be chosen, so step 0 wins when training never helps. Evaluation runs with dropout
off and the torch RNG forked, so training draws the same numbers with selection on or off.

Sets are read with `pipeline.labelled`'s readers, so a dev file fails the way an eval file does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.labelled import read_beir, read_sts

# The cut-off of the retrieval score (BEIR's and MTEB's main metric).
NDCG_K = 10

Scorer = Callable[[Any], dict[str, float]]  # encoder -> {dev set name: main metric}


# --- metrics --------------------------------------------------------------------------------------


def ranked(scores: np.ndarray, doc_ids: Sequence[str], k: int) -> list[int]:
    """Indices of the k best documents for one query, in trec_eval's order.

    trec_eval (and so pytrec_eval, which MTEB calls) sorts by score, then ties by document id in
    descending string order; the same order here keeps tied scores giving the same nDCG.
    """
    if len(scores) > k:
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        pool = np.flatnonzero(scores >= threshold).tolist()
    else:
        pool = list(range(len(scores)))
    pool.sort(key=lambda i: doc_ids[i], reverse=True)
    pool.sort(key=lambda i: -scores[i])  # stable: ties keep the descending-id order
    return pool[:k]


def ndcg(ranking: Sequence[str], relevance: Mapping[str, int], k: int = NDCG_K) -> float:
    """nDCG@k of one ranked list (trec_eval's ndcg_cut: linear gain = the qrel grade, log2 discount).

    A query without a relevant document scores 0, as in trec_eval.
    """
    gains = [max(relevance.get(doc, 0), 0) for doc in ranking[:k]]
    dcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mean_ndcg(
    queries: np.ndarray, docs: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]], k: int = NDCG_K,
) -> float:  # fmt: skip
    """Mean nDCG@k over queries of unit-length embeddings (cosine = dot product).

    Args:
        queries, docs: (Q, d) and (D, d) unit-length rows, in the order of query_ids / doc_ids.
        qrels: query id -> {doc id: grade}.
    """
    scores = queries @ docs.T
    per_query = [
        ndcg([doc_ids[i] for i in ranked(row, doc_ids, k)], qrels.get(qid, {}), k)
        for qid, row in zip(query_ids, scores, strict=True)
    ]
    return float(np.mean(per_query)) if per_query else 0.0


def cosine_spearman(a: np.ndarray, b: np.ndarray, gold: Sequence[float]) -> float:
    """Spearman correlation of the pairs' cosine similarities (unit-length rows) with the gold scores.

    Constant similarities (a collapsed model) have no rank order: 0 here, where mteb reports nan,
    so that such a step loses the selection instead of poisoning the mean.
    """
    from scipy.stats import spearmanr

    sims = (a * b).sum(axis=1)
    if np.ptp(sims) == 0:
        return 0.0
    return float(spearmanr(sims, gold).statistic)


# --- dev sets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalDev:
    """A retrieval dev set with its texts already in the Gecko format."""

    queries: list[str]
    query_ids: list[str]
    docs: list[str]
    doc_ids: list[str]
    qrels: dict[str, dict[str, int]]


@dataclass(frozen=True)
class STSDev:
    """An STS dev set: both sides formatted as queries of the set's task."""

    sentence1: list[str]
    sentence2: list[str]
    score: list[float]


@dataclass
class DevScorer:
    """Scores an encoder on dev sets: {set name: nDCG@10 (retrieval) or cosine Spearman (STS)}."""

    retrieval: dict[str, RetrievalDev] = field(default_factory=dict)
    sts: dict[str, STSDev] = field(default_factory=dict)
    batch_size: int = 64

    @classmethod
    def from_params(
        cls, dev_params: Any, text_format: Any, root: Path, batch_size: int = 64, raw: Collection[str] = ()
    ) -> "DevScorer":
        """Read the `train.dev` sets (paths relative to `root`) and format their texts once.

        `raw` names the categories ("retrieval", "sts") read as raw texts instead of `text_format`,
        as `eval.prefixes` scores them, so the step chosen is the best in the format it is evaluated in.

        Raises:
            pipeline.labelled.EvalDataError: a file is missing or malformed (file and line named).
        """

        def full(path: Path) -> Path:
            return path if path.is_absolute() else root / path

        from pipeline.retrieval.encoder import RawFormat

        def format_of(kind: str) -> Any:
            return RawFormat() if kind in raw else text_format

        retrieval, fmt = {}, format_of("retrieval")
        for name, spec in dev_params.retrieval.items():
            data = read_beir(full(spec.path), spec.split, spec.holdout)
            retrieval[name] = RetrievalDev(
                queries=fmt.queries([spec.task] * len(data.queries), [q["text"] for q in data.queries]),
                query_ids=[q["id"] for q in data.queries],
                docs=fmt.passages([d["title"] for d in data.corpus], [d["text"] for d in data.corpus]),
                doc_ids=[d["id"] for d in data.corpus],
                qrels=data.qrels,
            )
        sts, fmt = {}, format_of("sts")
        for name, spec in dev_params.sts.items():
            data = read_sts(full(spec.path) / f"{spec.split}.tsv")
            tasks = [spec.task] * len(data.score)
            sides = (fmt.queries(tasks, data.sentence1), fmt.queries(tasks, data.sentence2))
            sts[name] = STSDev(*sides, data.score)
        return cls(retrieval, sts, batch_size)

    def __call__(self, encoder: Any) -> dict[str, float]:
        """Main metric per set, for `encoder` (anything with `encode(texts, batch_size=...)`)."""
        out = {}
        for name, data in self.retrieval.items():
            queries = encoder.encode(data.queries, batch_size=self.batch_size)
            docs = encoder.encode(data.docs, batch_size=self.batch_size)
            out[name] = mean_ndcg(queries, docs, data.query_ids, data.doc_ids, data.qrels)
        for name, data in self.sts.items():
            a = encoder.encode(data.sentence1, batch_size=self.batch_size)
            b = encoder.encode(data.sentence2, batch_size=self.batch_size)
            out[name] = cosine_spearman(a, b, data.score)
        return out


# --- selection ------------------------------------------------------------------------------------


class ModelSelector:
    """Evaluates at step 0, every `every` steps and the last; keeps the best step's weights on the CPU.

    Args:
        scorer: encoder -> {set name: score}; higher is better for every set.
        every: steps between evaluations (`train.eval_every`).
        total_steps: the run's last step, always evaluated.
        live: a dvclive `Live` (or None); gets `dev/<set>` and `dev/score` at each evaluation.
    """

    def __init__(self, scorer: Scorer, every: int, total_steps: int, live: Any = None) -> None:
        self.scorer = scorer
        self.every = every
        self.total_steps = total_steps
        self.live = live
        self.history: dict[int, dict[str, float]] = {}  # step -> {set: score, "score": mean}
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.seconds = 0.0  # spent evaluating, so the training throughput can leave it out
        self._best_state: dict[str, Any] | None = None

    def due(self, step: int) -> bool:
        """Whether the weights after `step` updates are evaluated."""
        return step == 0 or step % self.every == 0 or step == self.total_steps

    def evaluate(self, encoder: Any, step: int) -> float:
        """Score the encoder's current weights as those of `step`; returns the selection score."""
        started = time.perf_counter()
        scores = self._scores(encoder)
        score = float(np.mean(list(scores.values())))
        self.history[step] = {**scores, "score": score}
        # Strictly better only: on a tie the earlier (less trained, step 0 = the base) step stays.
        if score > self.best_score:
            self.best_step, self.best_score = step, score
            # A CPU copy: a GPU copy would double the model's device memory for the whole run.
            self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in encoder.module.state_dict().items()}
        if self.live is not None:
            for name, value in self.history[step].items():
                self.live.log_metric(f"dev/{name}", value)
        self.seconds += time.perf_counter() - started
        return score

    def _scores(self, encoder: Any) -> dict[str, float]:
        """The scorer's dict, with dropout off and the torch RNG left as it was found."""
        import torch

        devices = [encoder.device.index or 0] if encoder.device.type == "cuda" else []
        was_training = encoder.module.training
        encoder.module.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                return {name: float(value) for name, value in self.scorer(encoder).items()}
        finally:
            encoder.module.train(was_training)

    def restore(self, encoder: Any, last_step: int) -> None:
        """Load the best step's weights into `encoder`, unless they are the current (`last_step`) ones."""
        if self._best_state is not None and self.best_step != last_step:
            encoder.module.load_state_dict(self._best_state)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to select as an uninterrupted one would (for a training checkpoint)."""
        return {"history": self.history, "best_step": self.best_step, "best_score": self.best_score,
                "best_state": self._best_state}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back `state_dict()`'s evaluations and best weights (time spent evaluating starts at 0)."""
        self.history = {int(step): dict(scores) for step, scores in state["history"].items()}
        self.best_step, self.best_score = state["best_step"], state["best_score"]
        self._best_state = state["best_state"]

    def summary(self) -> dict[str, Any]:
        """JSON-ready record for fret_training.json: best step and score, every evaluation."""
        return {
            "best_step": self.best_step,
            "best_score": self.best_score,
            "every": self.every,
            "scores": {str(step): scores for step, scores in self.history.items()},
        }
