"""SQL model `distill_candidates`: upstream rows in, expected rows out (helpers of test_triples_sql)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.params import BaseParams, Params, SelectParams, TrainParams, sql_variables
from pipeline.warehouse.models import ModelError
from test_triples_sql import SQL_DIR, query, write_upstream


def build(warehouse: Path, distill_score: str = "ql_sum", distill_weight: float = 1.0, **select) -> None:
    from pipeline.warehouse.models import build_models

    params = Params(base=BaseParams(seed=42), select=SelectParams(**select))
    variables = sql_variables(params) | {"train_distill_score": distill_score, "train_distill_weight": distill_weight}
    build_models(SQL_DIR, stage="triples", variables=variables, warehouse=warehouse)


@pytest.fixture()
def warehouse(tmp_path_factory, tmp_path):
    return Path(shutil.copytree(write_upstream(tmp_path_factory.mktemp("up") / "warehouse"), tmp_path / "warehouse"))


def test_rows_are_every_scored_candidate_of_training_queries(warehouse):
    build(warehouse)
    got = query(warehouse, "select query_id, passage_id, teacher_score, title, text, task, query from distill_candidates")
    # write_upstream sets ql_sum = -ql_rank. q3 has no hard negative and is dropped from triples
    # (keep_without_negative false); q4 has no scored candidates.
    trained = {q for (q,) in query(warehouse, "select distinct query_id from triples")}
    assert trained == {"q1", "q2", "q5"}
    assert {r[0] for r in got} == trained
    q1 = sorted(r[:3] for r in got if r[0] == "q1")
    assert q1 == [("q1", "p01", -2.0), ("q1", "p02", -1.0), ("q1", "p03", -3.0), ("q1", "p04", -4.0), ("q1", "p05", -5.0)]
    assert ("q1", "p02", -1.0, "title p02", "text of p02", "task for q1", "query q1") in got
    assert len(got) == 5 + 4 + 8


def test_ql_mean_is_the_other_teacher_and_kept_queries_follow_triples(warehouse):
    build(warehouse, distill_score="ql_mean", keep_without_negative=True)
    got = dict(((q, p), s) for q, p, s in query(warehouse, "select query_id, passage_id, teacher_score from distill_candidates"))
    assert got[("q1", "p03")] == pytest.approx(-1.0)  # ql_mean = -ql_rank / 3
    assert {q for q, _ in got} == {"q1", "q2", "q3", "q5"}  # q3 kept in triples, so listed too


def test_fused_teacher_is_the_log_of_the_fused_score(warehouse):
    import math

    build(warehouse, distill_score="fused", weights={"ql": 1, "rc": 0, "knn": 1})
    got = query(
        warehouse,
        "select d.query_id, d.passage_id, d.teacher_score, f.fused_score from distill_candidates d "
        "join fused_ranks f using (query_id, passage_id)",
    )
    assert got and all(t == pytest.approx(math.log(r)) for _, _, t, r in got)
    # softmax(teacher) within a query is R normalised: the order follows the fusion, knn included.
    q1 = sorted((t, p) for q, p, t, _ in got if q == "q1")
    ranks = dict(query(warehouse, "select passage_id, fused_rank from fused_ranks where query_id = 'q1'"))
    assert [p for _, p in reversed(q1)] == sorted(ranks, key=ranks.get)


def test_empty_without_distillation_and_triples_unchanged(warehouse):
    build(warehouse)
    with_distill = query(warehouse, "select * from triples order by all")
    build(warehouse, distill_weight=0.0)
    assert query(warehouse, "select count(*) from distill_candidates") == [(0,)]
    assert query(warehouse, "select * from triples order by all") == with_distill


def test_unknown_teacher_is_a_build_error(warehouse):
    with pytest.raises(ModelError, match="train_distill_score must be ql_sum, ql_mean or fused"):
        build(warehouse, distill_score="rc_logodds")


def test_param_reaches_sql_under_its_section_name():
    variables = sql_variables(Params(train=TrainParams(distill_score="ql_mean", distill_weight=0.5)))
    assert variables["train_distill_score"] == "ql_mean"
    assert variables["train_distill_weight"] == 0.5
