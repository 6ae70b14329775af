"""The `triples` SQL models (sql/*.sql), sqlmesh-style: upstream rows in, expected rows out.

Every test writes tiny upstream stage files (passages, queries, neighbors, llm_scores) into a temporary
warehouse and builds the real `sql/` folder with the real params classes, so schema.yml's data tests
run too. Hand-computed expectations are in the comments next to the data.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline import warehouse as wh
from pipeline.params import BaseParams, Params, ParamsError, SelectParams, load_params, sql_variables
from pipeline.warehouse.models import ModelError, build_models
from pipeline.warehouse.sqlshell import run_query

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# query_id -> (seed passage, task type)
QUERIES = {
    "q1": ("p01", "question answering"),
    "q2": ("p06", "fact checking"),
    "q3": ("p10", "search result"),
    "q4": ("p12", "sentence similarity"),  # never mined or scored: no fused ranking at all
    "q5": ("p13", "question answering"),
}

# query_id -> [(passage_id, knn_score, ql_rank, rc_rank, rc_logodds)]; knn_rank follows knn_score.
CANDIDATES = {
    # Fused (k = 0): p02 = 1/1 + 1/1 = 2, p01 = 1, p03 = 2/3, p04 = 1/2, p05 = 2/5, so p1 = p02, not
    # the seed p01. relative_margin 0.05 against p02's 0.80: p03 (0.85 > 0.76) is guarded out.
    "q1": [
        ("p01", 0.90, 2, 2, 3.0),
        ("p02", 0.80, 1, 1, 4.0),
        ("p03", 0.85, 3, 3, -1.0),
        ("p04", 0.70, 4, 4, -2.0),
        ("p05", 0.60, 5, 5, -3.0),
    ],
    # p06 (the seed) is p1. p08 = 1/3 + 1/2 and p07 = 1/2 + 1/3 tie; p08 wins on rc_rank 2 < 3.
    # p07 has rc log-odds 2.0: the LLM calls it relevant.
    "q2": [
        ("p06", 0.90, 1, 1, 5.0),
        ("p07", 0.50, 2, 3, 2.0),
        ("p08", 0.40, 3, 2, -1.0),
        ("p09", 0.30, 4, 4, -2.0),
    ],
    # The only candidate p11 scores 0.60 > 0.95 x 0.50 for the positive p10: no negative survives.
    "q3": [
        ("p10", 0.50, 1, 1, 1.0),
        ("p11", 0.60, 2, 2, -1.0),
    ],
    # Ranks agree: fused order p13 .. p20; every candidate far below the positive's 0.90.
    "q5": [(f"p{13 + i}", 0.90 if i == 0 else 0.50 - 0.01 * i, i + 1, i + 1, -1.0 - i) for i in range(8)],
}

PASSAGE_IDS = sorted({f"p{i:02d}" for i in range(1, 21)})


# ---------------------------------------------------------------- helpers


def write_upstream(
    warehouse: Path,
    queries: dict = QUERIES,
    candidates: dict = CANDIDATES,
    passage_ids: list[str] = PASSAGE_IDS,
    only: tuple[str, ...] = ("passages", "queries", "neighbors", "llm_scores"),
    query_texts: dict[str, str] | None = None,
    passage_texts: dict[str, str] | None = None,
    unscored: tuple[str, ...] = (),
) -> Path:
    """One stage file per upstream table, as the real pipeline writes them (`only`: just those).

    `query_texts` / `passage_texts` override the default `query q1` / `text of p01`; `unscored`
    names llm_scores columns left NULL, as `score.methods` leaves a method it did not compute.
    """
    query_texts = query_texts or {}
    passage_texts = passage_texts or {}
    tables = {
        "passages": {
            "passage_id": passage_ids,
            "doc_id": [f"d{p}" for p in passage_ids],
            "title": [f"title {p}" for p in passage_ids],
            "text": [passage_texts.get(p, f"text of {p}") for p in passage_ids],
            "n_words": [3] * len(passage_ids),
            "source": ["test"] * len(passage_ids),
        },
        "queries": {
            "query_id": list(queries),
            "passage_id": [seed for seed, _ in queries.values()],
            "task_type": [task_type for _, task_type in queries.values()],
            "task": [f"task for {q}" for q in queries],
            "query": [query_texts.get(q, f"query {q}") for q in queries],
            "llm": ["tiny"] * len(queries),
            "prompt_hash": ["h"] * len(queries),
            "created_at": ["2025-01-01"] * len(queries),
        },
    }
    neighbors: dict[str, list] = {
        k: [] for k in ("query_id", "passage_id", "knn_rank", "knn_score", "bm25_rank", "bm25_score", "mined_by")
    }
    scores: dict[str, list] = {
        k: [] for k in ("query_id", "passage_id", "knn_rank", "ql_sum", "ql_mean", "rc_logodds", "ql_rank", "rc_rank")
    }
    for query_id, rows in candidates.items():
        by_knn = sorted(rows, key=lambda r: -r[1])
        for knn_rank, (passage_id, knn_score, ql_rank, rc_rank, rc_logodds) in enumerate(by_knn, start=1):
            neighbors["query_id"].append(query_id)
            neighbors["passage_id"].append(passage_id)
            neighbors["knn_rank"].append(knn_rank)
            neighbors["knn_score"].append(knn_score)
            # BM25 ranks the candidates in the reverse of the encoder's order: a bm25 weight shows.
            neighbors["bm25_rank"].append(len(by_knn) + 1 - knn_rank)
            neighbors["bm25_score"].append(float(knn_rank))
            neighbors["mined_by"].append("knn")
            for key, value in (
                ("query_id", query_id),
                ("passage_id", passage_id),
                ("knn_rank", knn_rank),
                ("ql_sum", -float(ql_rank)),
                ("ql_mean", -float(ql_rank) / 3),
                ("rc_logodds", rc_logodds),
                ("ql_rank", ql_rank),
                ("rc_rank", rc_rank),
            ):
                scores[key].append(value)
    tables["neighbors"] = neighbors
    for column in unscored:
        scores[column] = pa.array([None] * len(scores[column]), type=pa.int64() if "rank" in column else pa.float64())
    tables["llm_scores"] = scores
    for name in only:
        columns = tables[name]
        with wh.write_stage(name, warehouse=warehouse) as con:
            wh.write_table(con, name, pa.table(columns))
    return warehouse


def build(warehouse: Path, seed: int = 42, task_types: list[str] | None = None, **select) -> None:
    params = Params(base=BaseParams(seed=seed), select=SelectParams(**select))
    if task_types is not None:
        params.generate.task_types = task_types
    build_models(SQL_DIR, stage="triples", variables=sql_variables(params), warehouse=warehouse)


def query(warehouse: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(wh.stage_path("triples", warehouse)), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def negatives(warehouse: Path) -> dict[str, list[str]]:
    """query_id -> negative ids in pick order."""
    out: dict[str, list[str]] = {}
    for query_id, negative_id in query(
        warehouse, "select query_id, negative_id from hard_negatives order by query_id, negative_rank"
    ):
        out.setdefault(query_id, []).append(negative_id)
    return out


def report(warehouse: Path) -> dict:
    con = duckdb.connect(str(wh.stage_path("triples", warehouse)), read_only=True)
    try:
        cursor = con.execute("select * from selection_report")
        (row,) = cursor.fetchall()
        return dict(zip([d[0] for d in cursor.description], row))
    finally:
        con.close()


@pytest.fixture(scope="module")
def default_upstream(tmp_path_factory):
    return write_upstream(tmp_path_factory.mktemp("upstream") / "warehouse")


@pytest.fixture()
def warehouse(default_upstream, tmp_path):
    """The default upstream files, copied: writing them takes a second, copying a few milliseconds."""
    return Path(shutil.copytree(default_upstream, tmp_path / "warehouse"))


# ---------------------------------------------------------------- fusion


def test_fusion_with_k0_and_k60_matches_hand_computed_scores(tmp_path):
    # ql ranks A1 B2 C3 D4 E5, rc ranks C1 B2 D3 E4 A5.
    # k = 0:  A = 1 + 1/5 = 1.2, B = 1/2 + 1/2 = 1, C = 1/3 + 1 = 4/3, D = 1/4 + 1/3, E = 1/5 + 1/4
    #         -> C, A, B, D, E.
    # k = 60: A = 1/61 + 1/65 = .031778, B = 2/62 = .032258, C = 1/63 + 1/61 = .032266
    #         -> C, B, A, D, E: a large k flattens A's single first place below B's two seconds.
    cands = {"q1": [("p01", 0.9, 1, 5, 0.0), ("p02", 0.8, 2, 2, 0.0), ("p03", 0.7, 3, 1, 0.0),
                    ("p04", 0.6, 4, 3, 0.0), ("p05", 0.5, 5, 4, 0.0)]}  # fmt: skip
    wh_dir = write_upstream(tmp_path / "w", {"q1": ("p01", "question answering")}, cands)
    sql = "select passage_id, fused_rank, fused_score from fused_ranks order by fused_rank"

    build(wh_dir, rrf_k=0)
    got = query(wh_dir, sql)
    assert [(p, r) for p, r, _ in got] == [("p03", 1), ("p01", 2), ("p02", 3), ("p04", 4), ("p05", 5)]
    assert [s for _, _, s in got] == pytest.approx([4 / 3, 1.2, 1.0, 1 / 4 + 1 / 3, 1 / 5 + 1 / 4])

    build(wh_dir, rrf_k=60)
    got = query(wh_dir, sql)
    assert [p for p, _, _ in got] == ["p03", "p02", "p01", "p04", "p05"]
    assert [s for _, _, s in got] == pytest.approx(
        [1 / 63 + 1 / 61, 2 / 62, 1 / 61 + 1 / 65, 1 / 64 + 1 / 63, 1 / 65 + 1 / 64], rel=1e-12
    )


def test_equal_fractions_tie_exactly_and_break_on_rc_rank(tmp_path):
    # 1/3 + 1/4 and 1/2 + 1/12 are both 7/12, but summed in floating point the second comes out one
    # ulp larger and would win. As a true tie, the better rc_rank (4 < 12) must win.
    ql = [3, 2, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    rc = [4, 12, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    ids = [f"p{i:02d}" for i in range(1, 13)]
    cands = {"q1": [(p, 0.9 - 0.01 * i, a, b, 0.0) for i, (p, a, b) in enumerate(zip(ids, ql, rc))]}
    wh_dir = write_upstream(tmp_path / "w", {"q1": ("p01", "question answering")}, cands)
    build(wh_dir)
    got = dict(query(wh_dir, "select passage_id, fused_rank from fused_ranks"))

    # The reference: exact fractions, then rc_rank, knn_rank (= list order here), passage_id.
    expected = sorted(zip(ids, ql, rc), key=lambda t: (-(Fraction(1, t[1]) + Fraction(1, t[2])), t[2], t[0]))
    assert got == {p: rank for rank, (p, _, _) in enumerate(expected, start=1)}
    assert got["p01"] < got["p02"]  # (3, 4) before (2, 12)


def test_fused_ranks_carry_seed_flag_and_knn_score(warehouse):
    build(warehouse)
    got = query(
        warehouse,
        "select query_id, passage_id, fused_rank, knn_rank, knn_score, is_seed from fused_ranks "
        "where query_id = 'q2' order by fused_rank",
    )
    assert got == [
        ("q2", "p06", 1, 1, 0.90, True),
        ("q2", "p08", 2, 3, 0.40, False),  # ties p07 on R; rc_rank 2 < 3
        ("q2", "p07", 3, 2, 0.50, False),
        ("q2", "p09", 4, 4, 0.30, False),
    ]


# ---------------------------------------------------------------- fusion weights

# The fusion before select.weights existed, written out: the reference Gecko's weights must match.
TWO_SIGNAL_FUSION = """
    select query_id, passage_id,
        row_number() over (partition by query_id order by r desc, rc_rank, knn_rank, passage_id) as fused_rank, r
    from (select *, (2 * {k} + ql_rank + rc_rank) / (({k} + ql_rank) * ({k} + rc_rank)) as r from fused_ranks)
    order by all
"""
FUSED = "select query_id, passage_id, fused_rank, fused_score from fused_ranks order by all"
LLM_SCORES = ("ql_sum", "ql_mean", "ql_rank", "rc_logodds", "rc_rank")


@pytest.mark.parametrize("rrf_k", [0, 60])
def test_gecko_weights_reproduce_the_two_signal_fusion_exactly(warehouse, rrf_k):
    build(warehouse, rrf_k=rrf_k)  # the default weights
    reference = query(warehouse, TWO_SIGNAL_FUSION.format(k=rrf_k))
    assert query(warehouse, FUSED) == reference  # the same ranks and the very same doubles
    build(warehouse, rrf_k=rrf_k, weights={"ql": 2, "rc": 2, "knn": 0})  # only the ratio ranks
    doubled = query(warehouse, FUSED)
    assert [r[:3] for r in doubled] == [r[:3] for r in reference]
    assert [r[3] for r in doubled] == pytest.approx([2 * r[3] for r in reference])


def test_equal_weighted_sums_tie_exactly(tmp_path):
    # 0.3/2 + 0.6/6 and 0.3/6 + 0.6/3 are both 1/4, but in floating point the first is 0.25 and the
    # second one ulp less, so p01 would win. As a true tie, the better rc_rank (p02's 3 < 6) wins.
    ranks = {"p01": (2, 6), "p02": (6, 3), "p03": (1, 1), "p04": (3, 2), "p05": (4, 4), "p06": (5, 5)}
    cands = {"q1": [(p, 0.9 - 0.01 * i, ql, rc, 0.0) for i, (p, (ql, rc)) in enumerate(ranks.items())]}
    wh_dir = write_upstream(tmp_path / "w", {"q1": ("p01", "question answering")}, cands)
    build(wh_dir, weights={"ql": 0.3, "rc": 0.6, "knn": 0})
    got = query(wh_dir, "select passage_id from fused_ranks order by fused_rank")
    exact = {p: Fraction(3, 10 * ql) + Fraction(6, 10 * rc) for p, (ql, rc) in ranks.items()}
    expected = sorted(ranks, key=lambda p: (-exact[p], ranks[p][1], p))
    assert [p for (p,) in got] == expected
    assert expected[:4] == ["p03", "p04", "p02", "p01"]


def test_fractions_beyond_double_precision_take_the_exact_path(tmp_path):
    # k = 10^6 with three fused signals puts the denominator near 10^24, far past 2^53: the fraction
    # is then redone in 128-bit integers. Ranks, order and scores must still follow exact arithmetic.
    k = 10**6
    ql = [3, 2, 1, 4, 5, 6]
    rc = [4, 6, 1, 2, 3, 5]
    ids = [f"p{i:02d}" for i in range(1, 7)]
    cands = {"q1": [(p, 0.9 - 0.01 * i, a, b, 0.0) for i, (p, a, b) in enumerate(zip(ids, ql, rc))]}
    wh_dir = write_upstream(tmp_path / "w", {"q1": ("p01", "question answering")}, cands)
    build(wh_dir, rrf_k=k, weights={"ql": 1, "rc": 0.5, "knn": 1})
    got = query(wh_dir, "select passage_id, fused_rank, fused_score, knn_rank from fused_ranks order by fused_rank")
    knn = {p: knn_rank for p, _, _, knn_rank in got}
    exact = {
        p: Fraction(1, k + a) + Fraction(1, 2 * (k + b)) + Fraction(1, k + knn[p]) for p, a, b in zip(ids, ql, rc)
    }
    rc_of = dict(zip(ids, rc))
    expected = sorted(ids, key=lambda p: (-exact[p], rc_of[p], knn[p], p))
    assert [p for p, *_ in got] == expected
    assert [s for _, _, s, _ in got] == [float(exact[p]) for p in expected]


def test_knn_only_weights_reproduce_the_encoder_order_without_llm_scores(tmp_path):
    wh_dir = write_upstream(tmp_path / "w", unscored=LLM_SCORES)  # no LLM score at all: none is read
    build(wh_dir, weights={"ql": 0, "rc": 0, "knn": 1})
    got = query(wh_dir, "select fused_rank, knn_rank, fused_score, ql_rank, rc_rank from fused_ranks")
    assert got and all(fused == knn and score == 1 / knn for fused, knn, score, _, _ in got)
    assert {(ql, rc) for *_, ql, rc in got} == {(None, None)}


def test_bm25_only_weights_rank_by_bm25_without_llm_scores(tmp_path):
    wh_dir = write_upstream(tmp_path / "w", unscored=LLM_SCORES)
    build(wh_dir, weights={"ql": 0, "rc": 0, "knn": 0, "bm25": 1})
    got = query(wh_dir, "select fused_rank, bm25_rank, fused_score, bm25_score from fused_ranks")
    assert got and all(fused == bm25 and score == 1 / bm25 for fused, bm25, score, _ in got)
    assert all(s is not None for *_, s in got)


def test_knn_and_bm25_fuse_as_hand_computed(tmp_path):
    wh_dir = write_upstream(tmp_path / "w", unscored=LLM_SCORES)
    build(wh_dir, weights={"ql": 0, "rc": 0, "knn": 1, "bm25": 2}, rrf_k=1)
    got = query(wh_dir, "select query_id, passage_id, knn_rank, bm25_rank, fused_score, fused_rank from fused_ranks")
    for *_, knn, bm25, score, _ in got:
        assert score == pytest.approx(1 / (1 + knn) + 2 / (1 + bm25), rel=1e-12)
    by_query: dict[str, list] = {}
    for q, p, knn, _, score, rank in got:
        by_query.setdefault(q, []).append((rank, -score, knn))
    assert all(sorted(rows) == sorted(rows, key=lambda r: (r[1], r[2])) for rows in by_query.values())


def test_ql_only_weights_rank_by_ql_and_leave_rc_unread(tmp_path):
    wh_dir = write_upstream(tmp_path / "w", unscored=("rc_logodds", "rc_rank"))
    build(wh_dir, weights={"ql": 1, "rc": 0, "knn": 0})
    got = query(wh_dir, "select fused_rank, ql_rank from fused_ranks")
    assert got and all(fused == ql for fused, ql in got)
    assert negatives(wh_dir) == {"q1": ["p05"], "q2": ["p09"], "q5": ["p20"]}  # the rest of the stage runs


def test_a_weighted_signal_without_ranks_fails_naming_its_weight(tmp_path):
    wh_dir = write_upstream(tmp_path / "w", unscored=("rc_logodds", "rc_rank"))
    with pytest.raises(ModelError, match=r"select\.weights\.rc is above 0 but there is no rc_rank for query q\d"):
        build(wh_dir)  # Gecko's default fuses RC
    assert not wh.stage_path("triples", wh_dir).exists()
    # The RC guard would pass every candidate without RC scores: it fails too instead of doing nothing.
    with pytest.raises(ModelError, match=r"select\.max_negative_rc_logodds is set but llm_scores has no rc_logodds"):
        build(wh_dir, weights={"ql": 1, "rc": 0, "knn": 0}, max_negative_rc_logodds=0.0)


def test_rc_breaks_ties_only_when_fused(tmp_path):
    # ql + knn: p01 = 1/2 + 1/1 and p02 = 1/1 + 1/2 tie. RC prefers p02, but RC is not fused, so the
    # encoder's order (p01 first) breaks the tie.
    cands = {"q1": [("p01", 0.9, 2, 2, 0.0), ("p02", 0.8, 1, 1, 0.0), ("p03", 0.7, 3, 3, 0.0)]}
    wh_dir = write_upstream(tmp_path / "w", {"q1": ("p01", "question answering")}, cands)
    build(wh_dir, weights={"ql": 1, "rc": 0, "knn": 1})
    assert query(wh_dir, "select passage_id from fused_ranks order by fused_rank") == [("p01",), ("p02",), ("p03",)]


def test_judge_weights_come_from_the_judge_metrics(warehouse, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # judge.metrics_path defaults to metrics/judge.json, relative
    missing = r"select\.weights is 'judge' but metrics/judge\.json does not exist: run the judge stage"
    with pytest.raises(ParamsError, match=missing):
        build(warehouse, weights="judge")
    metrics = tmp_path / "metrics" / "judge.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"ndcg_at_10": {"ql": 0.5}}))
    with pytest.raises(ParamsError, match=r"metrics/judge\.json has no best_weights object with keys among ql, rc, knn"):
        build(warehouse, weights="judge")
    metrics.write_text(json.dumps({"best_weights": {"ql": 1.0, "rc": 0.0, "bm25@x": 1.0}}))
    with pytest.raises(ParamsError, match=r"has no best_weights object with keys among ql, rc, knn, bm25"):
        build(warehouse, weights="judge")
    metrics.write_text(json.dumps({"best_weights": {"ql": 0.0, "rc": 0.0, "knn": 0.0}}))
    with pytest.raises(ParamsError, match=r"best_weights is not usable: .*at least one of ql, rc, knn"):
        build(warehouse, weights="judge")

    metrics.write_text(json.dumps({"best_weights": {"ql": 0.0, "rc": 0.0, "knn": 0.5}}))
    build(warehouse, weights="judge")
    assert {fused == knn for fused, knn in query(warehouse, "select fused_rank, knn_rank from fused_ranks")} == {True}
    metrics.write_text(json.dumps({"best_weights": {"ql": 1.0, "rc": 1.0, "knn": 0.0}}))
    build(warehouse, weights="judge")
    assert query(warehouse, FUSED) == query(warehouse, TWO_SIGNAL_FUSION.format(k=0))
    metrics.write_text(json.dumps({"best_weights": {"ql": 0.0, "rc": 0.0, "knn": 0.0, "bm25": 1.0}}))
    build(warehouse, weights="judge")
    assert {fused == bm25 for fused, bm25 in query(warehouse, "select fused_rank, bm25_rank from fused_ranks")} == {True}


# ---------------------------------------------------------------- positives


def test_positive_is_fused_top_or_seed(warehouse):
    sql = "select query_id, positive_id, seed_id, differs_from_seed, fused_top_id, seed_fused_rank from positives"
    build(warehouse, positive="fused")
    assert sorted(query(warehouse, sql)) == [
        ("q1", "p02", "p01", True, "p02", 2),
        ("q2", "p06", "p06", False, "p06", 1),
        ("q3", "p10", "p10", False, "p10", 1),
        ("q5", "p13", "p13", False, "p13", 1),
        # q4 has no scored neighbors, so no p1 and no positive
    ]
    assert report(warehouse)["fused_top_differing_from_seed"] == 1

    build(warehouse, positive="seed")
    assert sorted(query(warehouse, sql)) == [
        ("q1", "p01", "p01", False, "p02", 2),
        ("q2", "p06", "p06", False, "p06", 1),
        ("q3", "p10", "p10", False, "p10", 1),
        ("q4", "p12", "p12", False, None, None),  # the seed is a positive even when never mined
        ("q5", "p13", "p13", False, "p13", 1),
    ]
    rep = report(warehouse)
    assert (rep["positives_differing_from_seed"], rep["fused_top_differing_from_seed"]) == (0, 1)


def test_seed_is_never_a_negative_when_p1_differs(warehouse):
    # q1 with the guards off: candidates are every mined passage but p02 (positive) and p01 (seed).
    build(warehouse, relative_margin=None, num_negatives=10)
    assert sorted(negatives(warehouse)["q1"]) == ["p03", "p04", "p05"]


# ---------------------------------------------------------------- negative strategies


def test_lowest_takes_the_bottom_of_the_fused_ranking(warehouse):
    build(warehouse, negative="lowest")
    assert negatives(warehouse) == {"q1": ["p05"], "q2": ["p09"], "q5": ["p20"]}

    build(warehouse, negative="lowest", num_negatives=2)
    assert negatives(warehouse) == {"q1": ["p05", "p04"], "q2": ["p09", "p07"], "q5": ["p20", "p19"]}


def test_random_is_a_seeded_draw_reproducible_from_md5(warehouse):
    def expected(seed: int, n: int) -> list[str]:
        # md5_number reads the digest little-endian; ties (never, in practice) would go to passage_id.
        pool = [f"p{i}" for i in range(14, 21)]  # q5's eligible candidates
        key = lambda p: (int.from_bytes(hashlib.md5(f"{seed}|q5|{p}".encode()).digest(), "little"), p)  # noqa: E731
        return sorted(pool, key=key)[:n]

    assert expected(1, 3) != expected(2, 3)  # the data can tell the seeds apart
    for seed in (1, 2):
        build(warehouse, seed=seed, negative="random", num_negatives=3)
        assert negatives(warehouse)["q5"] == expected(seed, 3)
        first = query(warehouse, "select * from hard_negatives order by all")
        build(warehouse, seed=seed, negative="random", num_negatives=3)
        assert query(warehouse, "select * from hard_negatives order by all") == first


def test_range_takes_the_hardest_inside_the_window(warehouse):
    # (range_min, range_max] = fused ranks 2..3. q5: p14, p15. q1: rank 2 is the seed and rank 3
    # (p03) is guarded out, so nothing. q2: p08 (2), p07 (3).
    build(warehouse, negative="range", range_min=1, range_max=3, num_negatives=1)
    assert negatives(warehouse) == {"q2": ["p08"], "q5": ["p14"]}
    build(warehouse, negative="range", range_min=1, range_max=3, num_negatives=5)
    assert negatives(warehouse) == {"q2": ["p08", "p07"], "q5": ["p14", "p15"]}
    # No upper bound: the window runs to the end of the ranking.
    build(warehouse, negative="range", range_min=6, num_negatives=5)
    assert negatives(warehouse) == {"q5": ["p19", "p20"]}


# ---------------------------------------------------------------- false-negative guards


def test_relative_margin_guard_is_positive_aware(warehouse):
    # 0.05: drop knn_score > 0.95 x positive's. q1 positive p02 (0.80): p03 (0.85) dropped.
    build(warehouse, relative_margin=0.05, num_negatives=10)
    assert sorted(negatives(warehouse)["q1"]) == ["p04", "p05"]
    # 0.20: threshold 0.64 also drops p04 (0.70); q2 (positive 0.90, threshold 0.72) keeps all.
    build(warehouse, relative_margin=0.20, num_negatives=10)
    got = negatives(warehouse)
    assert got["q1"] == ["p05"] and sorted(got["q2"]) == ["p07", "p08", "p09"]
    assert report(warehouse)["candidates_above_relative_margin"] == 3  # q1: p03, p04; q3: p11
    # null: off.
    build(warehouse, relative_margin=None, num_negatives=10)
    assert sorted(negatives(warehouse)["q1"]) == ["p03", "p04", "p05"]
    assert report(warehouse)["candidates_above_relative_margin"] == 0


def test_relative_margin_uses_the_seed_score_with_seed_positives(warehouse):
    # Seed positive p01 (0.90): threshold 0.855 keeps p03 (0.85) and p02 (0.80, p1 but not positive).
    build(warehouse, positive="seed", relative_margin=0.05, num_negatives=10)
    assert sorted(negatives(warehouse)["q1"]) == ["p02", "p03", "p04", "p05"]


def test_llm_relevance_guard_drops_candidates_rated_relevant(warehouse):
    # q2's p07 has rc log-odds 2.0: above 1.0 it is excluded, so the second lowest becomes p08.
    build(warehouse, max_negative_rc_logodds=1.0, num_negatives=2)
    assert negatives(warehouse)["q2"] == ["p09", "p08"]
    assert report(warehouse)["candidates_rated_relevant"] == 1
    build(warehouse, max_negative_rc_logodds=None, num_negatives=2)
    assert negatives(warehouse)["q2"] == ["p09", "p07"]


def test_report_shows_queries_the_guards_leave_without_negative(warehouse):
    # Defaults (relative_margin 0.05): q1 loses p03 but keeps p04, p05; q3's only candidate p11 scores
    # above 0.95 x its positive's, so q3 loses its negative to that guard.
    build(warehouse)
    rep = report(warehouse)
    assert (rep["queries_with_candidates"], rep["queries_with_guarded_candidate"]) == (4, 2)
    assert (rep["queries_without_eligible_candidate"], rep["queries_all_above_relative_margin"]) == (1, 1)
    assert rep["queries_without_negative"] == 1

    # relative_margin null (as params.yaml writes it) turns the guard off: q3 trains with p11.
    params_file = warehouse / "params.yaml"
    params_file.write_text("select:\n  relative_margin: null\n  keep_without_negative: false\n")
    params = load_params(params_file)
    assert params.select.relative_margin is None
    build_models(SQL_DIR, stage="triples", variables=sql_variables(params), warehouse=warehouse)
    rep = report(warehouse)
    assert (rep["queries_with_guarded_candidate"], rep["queries_without_eligible_candidate"]) == (0, 0)
    assert negatives(warehouse)["q3"] == ["p11"] and rep["queries_dropped"] == 1  # q4: no positive

    # keep_without_negative keeps q3 without a negative while the guard is on.
    build(warehouse, keep_without_negative=True)
    assert query(warehouse, "select negative_id from triples where query_id = 'q3'") == [(None,)]


# ---------------------------------------------------------------- query filters

# Words: q1 and q2 are the same text once normalized; q1 copies all its words from its seed p01,
# q2 one of four from p06; q3 has 3 words, q4 10; q5 copies 4 of 4 (repeats count) from p13.
FILTER_QUERIES = {
    "q1": "Who wrote the text?",
    "q2": "  who WROTE the text ",
    "q3": "Is it true?",
    "q4": "a much longer query about nothing in particular at all",
    "q5": "text of p13, text",
}
FILTER_PASSAGES = {"p01": "who wrote the text of p01"}
FILTERS = (
    "select query_id, n_words, seed_knn_rank, copy_rate, normalized_query, duplicate_of, outside_round_trip, "
    "above_max_copy_rate, below_min_words, above_max_words, duplicate, kept from query_filters order by query_id"
)
FILTER_COUNTS = (
    "queries_outside_round_trip", "queries_above_max_copy_rate", "queries_below_min_words",
    "queries_above_max_words", "queries_duplicate", "queries_filtered",
)  # fmt: skip


@pytest.fixture()
def filter_warehouse(tmp_path):
    return write_upstream(tmp_path / "w", query_texts=FILTER_QUERIES, passage_texts=FILTER_PASSAGES)


def filter_counts(warehouse: Path) -> tuple:
    rep = report(warehouse)
    return tuple(rep[k] for k in FILTER_COUNTS)


def kept(warehouse: Path) -> list[str]:
    """The queries that reach positives (and so triples)."""
    return [q for (q,) in query(warehouse, "select query_id from positives order by query_id")]


def test_query_filters_measure_every_query_and_are_off_by_default(filter_warehouse):
    build(filter_warehouse, positive="seed")  # seed positives: every kept query, mined or not, gets one
    off = (False, False, False, False)
    assert query(filter_warehouse, FILTERS) == [
        ("q1", 4, 1, 1.0, "who wrote the text", None, *off, False, True),
        ("q2", 4, 1, 0.25, "who wrote the text", "q1", *off, False, True),  # a duplicate, not dropped while off
        ("q3", 3, 2, 0.0, "is it true", None, *off, False, True),  # p11 outranks the seed p10
        ("q4", 10, None, 0.0, "a much longer query about nothing in particular at all", None, *off, False, True),
        ("q5", 4, 1, 1.0, "text of p13 text", None, *off, False, True),
    ]
    assert kept(filter_warehouse) == ["q1", "q2", "q3", "q4", "q5"]
    assert filter_counts(filter_warehouse) == (0, 0, 0, 0, 0, 0)


def test_round_trip_keeps_queries_whose_seed_the_encoder_ranks_in_its_top_k(filter_warehouse):
    build(filter_warehouse, positive="seed", round_trip_top_k=1)
    assert kept(filter_warehouse) == ["q1", "q2", "q5"]  # q3's seed is 2nd, q4's never mined
    assert filter_counts(filter_warehouse) == (2, 0, 0, 0, 0, 2)
    build(filter_warehouse, positive="seed", round_trip_top_k=2)
    assert kept(filter_warehouse) == ["q1", "q2", "q3", "q5"]
    assert filter_counts(filter_warehouse) == (1, 0, 0, 0, 0, 1)


def test_copy_rate_limit_drops_queries_copied_from_their_seed(filter_warehouse):
    build(filter_warehouse, positive="seed", max_copy_rate=0.5)
    assert kept(filter_warehouse) == ["q2", "q3", "q4"]  # q1 and q5 copy every word
    assert filter_counts(filter_warehouse) == (0, 2, 0, 0, 0, 2)
    build(filter_warehouse, positive="seed", max_copy_rate=1.0)  # the limit itself is allowed
    assert filter_counts(filter_warehouse) == (0, 0, 0, 0, 0, 0)


def test_copy_rate_splits_the_seed_at_every_non_word_character(tmp_path):
    # The SQL turns only punctuation and odd whitespace into spaces and leaves the spaces there:
    # tabs, newlines, no-break spaces, runs of spaces, underscores and hyphens must all still end a
    # word, and letters outside ASCII must stay inside one, as Python's [^\W_]+ reads them.
    seed = "Tab\tsep,new\nline  double\u00a0nbsp café-au-lait naïve x_y (paren) end."
    queries = {
        "q1": "tab sep new line double nbsp",  # every word a whole word of the seed
        "q2": "café au lait naïve x y paren end",
        "q3": "tabsep newline caf lai na ve xy parenend",  # glued or cut words: none is in the seed
        "q4": "Tab, sep? zzz",
    }
    warehouse = write_upstream(tmp_path / "w", query_texts=queries, passage_texts={"p01": seed},
                               queries={q: ("p01", "fact checking") for q in queries},
                               candidates={q: CANDIDATES["q1"] for q in queries})  # fmt: skip
    build(warehouse, positive="seed")
    words = lambda text: re.findall(r"[^\W_]+", text.lower())  # noqa: E731
    expected = [(q, sum(w in set(words(seed)) for w in words(text)) / len(words(text))) for q, text in queries.items()]
    assert expected == [("q1", 1.0), ("q2", 1.0), ("q3", 0.0), ("q4", 2 / 3)]
    assert query(warehouse, "select query_id, copy_rate from query_filters order by query_id") == expected


def test_length_limits_drop_short_and_long_queries(filter_warehouse):
    build(filter_warehouse, positive="seed", min_query_words=4)
    assert kept(filter_warehouse) == ["q1", "q2", "q4", "q5"]
    build(filter_warehouse, positive="seed", min_query_words=4, max_query_words=4)
    assert kept(filter_warehouse) == ["q1", "q2", "q5"]
    assert filter_counts(filter_warehouse) == (0, 0, 1, 1, 0, 2)


def test_duplicates_keep_the_first_query_the_other_filters_keep(filter_warehouse):
    build(filter_warehouse, positive="seed", drop_duplicate_queries=True)
    assert kept(filter_warehouse) == ["q1", "q3", "q4", "q5"]  # q2 repeats q1
    assert filter_counts(filter_warehouse) == (0, 0, 0, 0, 1, 1)
    # q1 copies its seed: once the copy filter drops it, q2 is the first of that text and stays.
    build(filter_warehouse, positive="seed", drop_duplicate_queries=True, max_copy_rate=0.5)
    assert kept(filter_warehouse) == ["q2", "q3", "q4"]
    assert filter_counts(filter_warehouse) == (0, 2, 0, 0, 0, 2)


def test_a_query_failing_several_filters_counts_under_each_and_once_in_total(filter_warehouse):
    # q4: seed never mined and 10 words; q3: seed 2nd and 3 words; q5: copies its seed.
    build(filter_warehouse, positive="seed", round_trip_top_k=1, max_query_words=5, min_query_words=4,
          max_copy_rate=0.5)  # fmt: skip
    assert kept(filter_warehouse) == ["q2"]
    assert filter_counts(filter_warehouse) == (2, 2, 1, 1, 0, 4)
    # Filtered queries reach no downstream model and count as dropped.
    assert query(filter_warehouse, "select distinct query_id from triples") == [("q2",)]
    assert query(filter_warehouse, "select distinct query_id from negative_candidates") == [("q2",)]
    rep = report(filter_warehouse)
    assert (rep["queries"], rep["queries_with_positive"], rep["queries_dropped"]) == (5, 1, 4)


# ---------------------------------------------------------------- triples and the report


def test_queries_without_negative_are_dropped_or_kept_and_counted(warehouse):
    build(warehouse, keep_without_negative=False)
    assert [r[0] for r in query(warehouse, "select query_id from triples")] == ["q1", "q2", "q5"]
    rep = report(warehouse)
    assert (rep["queries"], rep["queries_with_positive"], rep["queries_with_negative"]) == (5, 4, 3)
    assert (rep["queries_without_negative"], rep["queries_dropped"], rep["triples"]) == (1, 2, 3)

    build(warehouse, keep_without_negative=True)
    got = query(warehouse, "select query_id, positive_id, negative_id, negative_text from triples")
    assert got == [("q1", "p02", "p05", "text of p05"), ("q2", "p06", "p09", "text of p09"),
                   ("q3", "p10", None, None), ("q5", "p13", "p20", "text of p20")]  # fmt: skip
    rep = report(warehouse)
    assert (rep["queries_dropped"], rep["triples_without_negative"]) == (1, 1)  # q4: no positive


def test_report_counts_queries_without_positive_and_neighbors_never_scored(warehouse):
    # q4 was never mined, so it has no fused ranking and no p1; add a neighbor of q1 llm_scores lacks.
    con = duckdb.connect(str(wh.stage_path("neighbors", warehouse)), read_only=True)
    rows = con.sql("select * from neighbors").to_arrow_table()
    con.close()
    extra = pa.table({"query_id": ["q1"], "passage_id": ["p19"], "knn_rank": [6], "knn_score": [0.1], "bm25_rank": [6],
                      "bm25_score": [0.0], "mined_by": ["knn"]})
    with wh.write_stage("neighbors", warehouse=warehouse) as con:
        wh.write_table(con, "neighbors", pa.concat_tables([rows, extra.cast(rows.schema)]))
    build(warehouse)
    rep = report(warehouse)
    assert (rep["queries_without_positive"], rep["neighbors_unscored"]) == (1, 1)
    assert query(warehouse, "select count(*) from fused_ranks where query_id = 'q1' and passage_id = 'p19'") == [(0,)]
    build(warehouse, positive="seed")  # a seed positive needs no fused ranking
    assert report(warehouse)["queries_without_positive"] == 0


def test_triples_rows_have_texts_and_lineage(warehouse):
    build(warehouse, num_negatives=2)
    con = duckdb.connect(str(wh.stage_path("triples", warehouse)), read_only=True)
    cursor = con.execute("select * from triples where query_id = 'q1' order by negative_rank")
    cols = [d[0] for d in cursor.description]
    got = [dict(zip(cols, r)) for r in cursor.fetchall()]
    con.close()
    assert len(got) == 2
    first = got[0]
    assert first == first | {
        "query_id": "q1", "task_type": "question answering", "task": "task for q1", "query": "query q1",
        "positive_id": "p02", "positive_title": "title p02", "positive_text": "text of p02",
        "negative_id": "p05", "negative_title": "title p05", "negative_text": "text of p05",
        "negative_rank": 1, "strategy": "lowest", "seed_id": "p01", "differs_from_seed": True,
        "positive_fused_rank": 1, "positive_ql_rank": 1, "positive_rc_rank": 1, "positive_knn_rank": 3,
        "positive_knn_score": 0.80, "negative_fused_rank": 5, "negative_ql_rank": 5, "negative_rc_rank": 5,
        "negative_knn_rank": 5, "negative_knn_score": 0.60, "negative_rc_logodds": -3.0,
    }  # fmt: skip
    assert first["positive_fused_score"] == pytest.approx(2.0)
    assert first["negative_fused_score"] == pytest.approx(0.4)
    assert got[1]["negative_id"] == "p04"


# ---------------------------------------------------------------- data tests and bad params


def test_neighbor_missing_from_passages_fails_relationships(warehouse):
    wh_dir = write_upstream(warehouse, passage_ids=[p for p in PASSAGE_IDS if p != "p04"], only=("passages",))
    with pytest.raises(ModelError, match=r"FAIL relationships on fused_ranks\.passage_id -> passages\.passage_id"):
        build(wh_dir)
    assert not wh.stage_path("triples", wh_dir).exists()  # a failing test writes nothing


def test_task_types_are_checked_against_the_generate_param(warehouse):
    wh_dir = write_upstream(warehouse, queries=dict(QUERIES, q1=("p01", "poetry")), only=("queries",))
    with pytest.raises(ModelError, match=r"(?s)FAIL expect_empty on triples \(task_type is one of generate.*poetry"):
        build(wh_dir)
    # A user's own task type passes once it is configured.
    build(wh_dir, task_types=["poetry", "fact checking", "question answering"])


def test_duplicate_query_ids_fail_unique_positive(warehouse):
    wh_dir = warehouse
    # A second queries row for q2 (another seed) gives q2 two positives.
    with wh.write_stage("queries", warehouse=wh_dir) as con:
        wh.write_table(
            con,
            "queries",
            pa.table({"query_id": ["q1", "q2", "q2"], "passage_id": ["p01", "p06", "p07"],
                      "task_type": ["fact checking"] * 3, "task": ["t"] * 3, "query": ["q"] * 3,
                      "llm": ["x"] * 3, "prompt_hash": ["h"] * 3, "created_at": ["c"] * 3}),
        )  # fmt: skip
    with pytest.raises(ModelError, match=r"FAIL unique on positives\.query_id"):
        build(wh_dir)


def test_unknown_strategy_in_variables_is_a_build_error(warehouse):
    variables = sql_variables(Params()) | {"select_negative": "hardest"}
    with pytest.raises(ModelError, match=r"select_negative must be lowest, random or range, got hardest"):
        build_models(SQL_DIR, stage="triples", variables=variables, warehouse=warehouse)


@pytest.mark.parametrize(
    "bad",
    [{"range_min": -1}, {"range_min": 3, "range_max": 3}, {"num_negatives": 0}, {"relative_margin": 1.0},
     {"relative_margin": -0.1}, {"negative": "hardest"}, {"positive": "p2"}, {"rrf_k": -1},
     {"weights": {"ql": -1}}, {"weights": {"ql": 0, "rc": 0, "knn": 0}}, {"weights": {"ql": 0, "rc": 1e-7}},
     {"weights": {"bm25": -1}}, {"weights": "best"}, {"weights": {"knn": float("inf")}}, {"round_trip_top_k": 0},
     {"max_copy_rate": 1.5}, {"min_query_words": 0}, {"min_query_words": 5, "max_query_words": 4}],
)  # fmt: skip
def test_select_params_reject_out_of_range_values(bad):
    with pytest.raises(ValidationError):
        SelectParams(**bad)


def test_select_defaults_follow_gecko():
    params = SelectParams()
    assert (params.rrf_k, params.positive, params.negative, params.num_negatives) == (0, "fused", "lowest", 1)
    assert params.weights.model_dump() == {"ql": 1.0, "rc": 1.0, "knn": 0.0, "bm25": 0.0}
    filters = (params.round_trip_top_k, params.max_copy_rate, params.min_query_words, params.max_query_words)
    assert filters == (None, None, None, None) and not params.drop_duplicate_queries


def test_select_weights_read_from_params_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("select:\n  weights: {ql: 0.25, knn: 1}\n")
    assert load_params(path).select.weights.model_dump() == {"ql": 0.25, "rc": 1.0, "knn": 1.0, "bm25": 0.0}
    path.write_text("select:\n  weights: judge\n")
    assert load_params(path).select.weights == "judge"
    path.write_text("select:\n  weights: {ql: 0, rc: 0}\n")
    with pytest.raises(ParamsError, match=r"params\.yaml:2: select\.weights"):
        load_params(path)


# ---------------------------------------------------------------- README's "questions you can ask"

README_QUERIES = {
    "how often p1 differs from the seed": """
        select count(*) as queries, count(*) filter (where fused_top_id <> seed_id) as p1_not_seed,
               round(100 * avg((fused_top_id <> seed_id)::int), 1) as pct
        from positives where fused_top_id is not null""",
    "seed's rank distribution": """
        select coalesce(seed_fused_rank::varchar, 'not mined') as seed_rank, count(*) as queries
        from positives group by all order by min(seed_fused_rank) nulls last""",
    "negatives per strategy": """
        select strategy, count(*) as negatives, count(distinct query_id) as queries,
               avg(fused_rank) as mean_fused_rank, avg(knn_score) as mean_knn_score
        from hard_negatives group by all""",
    "QL vs RC agreement": """
        select corr(ql_rank, rc_rank) as rank_corr,
               avg((ql_rank = 1 and rc_rank = 1)::int) filter (where fused_rank = 1) as same_top_share
        from fused_ranks""",
    "task-type mix": """
        select q.task_type, count(distinct q.query_id) as queries, count(t.query_id) as triples
        from queries q left join triples t using (query_id) group by all order by queries desc""",
    "selection report": "from selection_report",
}


@pytest.fixture(scope="module")
def built(default_upstream, tmp_path_factory):
    """The default upstream built once with default params, for read-only queries."""
    warehouse = Path(shutil.copytree(default_upstream, tmp_path_factory.mktemp("built") / "warehouse"))
    build(warehouse)
    return warehouse


@pytest.mark.parametrize("name", list(README_QUERIES))
def test_readme_questions_run(built, name):
    result = run_query(README_QUERIES[name], built)
    assert result.rows, name


def test_readme_p1_share_and_agreement_values(built):
    warehouse = built
    (row,) = run_query(README_QUERIES["how often p1 differs from the seed"], warehouse).rows
    assert row == (4, 1, 25.0)  # q1 of q1, q2, q3, q5
    (row,) = run_query(README_QUERIES["QL vs RC agreement"], warehouse).rows
    assert row[1] == 1.0  # every query's top is first by both QL and RC in this data
