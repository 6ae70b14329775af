"""Per-query scores and paired bootstrap intervals (pipeline/evaluation/intervals.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.intervals import (
    bootstrap_mean_diff, bootstrap_spearman_diff, compare, retrieval_per_query, sts_per_pair,
)  # fmt: skip
from pipeline.evaluation.mteb_eval import MtebEncoder, retrieval_task, run_tasks
from pipeline.labelled import STSSet, read_beir
from tests.test_evaluation import TASK, TableEncoder, beir, retrieval_vectors  # noqa: F401  (beir: a fixture)


def test_per_query_ndcg_averages_to_mtebs_score(beir):
    """The same texts, the same ranking: the bootstrap bounds the very number mteb reports."""
    encoder = TableEncoder(retrieval_vectors())
    mteb_score = run_tasks(MtebEncoder(encoder, "fake"), [retrieval_task("tiny", beir)])["tiny"]["ndcg_at_10"]
    per_query = retrieval_per_query(lambda t: encoder.encode(t), read_beir(beir, "test"), "", None)
    assert set(per_query) == {"q1", "q2", "q3"}
    assert np.mean(list(per_query.values())) == pytest.approx(mteb_score, abs=1e-5)
    assert per_query["q3"] == 1.0


def test_identical_models_give_a_zero_interval_and_a_clear_gain_an_interval_above_zero():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 300)
    same = bootstrap_mean_diff(a, a)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    better = bootstrap_mean_diff(a, np.clip(a + 0.05 + rng.normal(0, 0.02, 300), 0, None))
    assert better.low > 0 and better.diff == pytest.approx(0.05, abs=0.01)
    noisy = bootstrap_mean_diff(a, rng.uniform(0, 1, 300))  # unrelated scores: the interval is wide
    assert noisy.high - noisy.low > 0.05
    with pytest.raises(ValueError, match="equal, non-empty"):
        bootstrap_mean_diff([1.0], [1.0, 2.0])


def test_spearman_interval_is_paired_and_centred_on_the_full_difference():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, 400)
    weak = gold + rng.normal(0, 3, 400)
    strong = gold + rng.normal(0, 0.5, 400)
    interval = bootstrap_spearman_diff(weak, strong, gold, resamples=500)
    assert interval.low > 0 and interval.low <= interval.diff <= interval.high
    assert interval.line().endswith("(above 0)")


def test_compare_covers_the_models_present_and_sts_pairs():
    data = STSSet(["a", "b", "c"], ["x", "y", "z"], [1.0, 2.0, 3.0])
    vectors = {t: v for t, v in zip("abcxyz", np.eye(6))}
    vectors["x"] = vectors["a"]  # pair 1 identical

    cos = sts_per_pair(lambda texts: np.stack([vectors[t] for t in texts]), data, TASK, None)
    assert cos.tolist() == [1.0, 0.0, 0.0]
    items = {"base": {"ret": {"q1": 0.5, "q2": 0.5}}, "trained": {"ret": {"q1": 1.0, "q2": 0.5}}}
    out = compare(items, [("base", "trained"), ("control", "trained")])
    assert list(out) == ["trained_vs_base"]  # no control trained: no comparison with it
    assert out["trained_vs_base"]["ret"].diff == pytest.approx(0.25)
    json.dumps(out["trained_vs_base"]["ret"].as_dict())
