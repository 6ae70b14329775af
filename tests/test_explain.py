"""`fret explain QUERY_ID`: one query's story from tiny warehouse files built with the real `sql/` models.

The upstream rows are test_triples_sql's (its comments give the hand-computed fusion): q1's positive
p02 is not its seed p01 and the margin guard removes p03; q3's only candidate is guarded out, so it has
no negative; q4 was never mined, so it has no positive.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sql_cli import run_light
from test_triples_sql import build, write_upstream

from pipeline.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Upstream files and the triples stage with the default selection."""
    warehouse = write_upstream(tmp_path_factory.mktemp("explain") / "warehouse")
    build(warehouse)
    return warehouse


def explain(warehouse: Path, query_id: str):
    return CliRunner().invoke(main, ["explain", query_id, "--warehouse", str(warehouse)])


def verdicts(output: str) -> dict[str, str]:
    """passage id -> the verdict column of the neighbor table (its last column, after the scores)."""
    table = output.split("best fused rank first:\n", 1)[1].splitlines()
    header = table[0]
    at = header.index("verdict")
    return {line.split()[0]: line[at:].strip() for line in table[2:-1]}


def test_positive_that_is_not_the_seed_guards_and_negative(built):
    res = explain(built, "q1")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "query q1  [question answering]" in out
    assert "task:   task for q1" in out and "query:  query q1" in out
    assert "seed:   p01  title p01: text of p01" in out
    assert "positive: p02 (not the seed p01)" in out
    assert "outcome: 1 training triple(s), negative(s) p05" in out
    assert verdicts(out) == {
        "p02": "POSITIVE (p1, not the seed)",
        "p01": "seed: never a negative (likely a second positive)",
        "p03": "guard: above_relative_margin (knn 0.85 vs positive 0.8)",
        "p04": "eligible, not picked",
        "p05": "NEGATIVE #1 (lowest)",
    }
    # Rows in fused order, with every rank: p02 is fused 1st, kNN 3rd.
    row = next(line for line in out.splitlines() if line.startswith("p02 "))
    assert row.split()[:12] == ["p02", "title", "p02", "3", "0.8", "1", "-1", "1", "4", "1", "2", "POSITIVE"]


def test_query_without_negative_is_dropped_naming_the_guard(built):
    out = explain(built, "q3").output
    assert "outcome: no negative (a guard removed all 1 candidate(s)) -> dropped" in out
    assert verdicts(out)["p11"] == "guard: above_relative_margin (knn 0.6 vs positive 0.5)"


def test_query_never_mined_has_no_positive(built):
    out = explain(built, "q4").output
    assert "outcome: no positive (no scored neighbor, so no fused top) -> dropped" in out
    assert "no neighbors mined for this query" in out


def test_filtered_query_names_each_failed_filter(tmp_path, built):
    warehouse = Path(shutil.copytree(built, tmp_path / "warehouse"))
    build(warehouse, round_trip_top_k=1, min_query_words=3)
    out = explain(warehouse, "q3").output
    assert "filters: FILTERED (2 words, copy rate 0.00, seed at knn rank 2)" in out
    assert "outcome: FILTERED OUT -> dropped: outside_round_trip (seed at knn rank 2), below_min_words (2 words)" in out
    assert "positive:" not in out
    assert verdicts(out) == {"p10": "seed: never a negative", "p11": "-"}


def test_rated_relevant_guard_and_kept_without_negative(tmp_path, built):
    warehouse = Path(shutil.copytree(built, tmp_path / "warehouse"))
    build(warehouse, max_negative_rc_logodds=1.0, keep_without_negative=True)
    assert verdicts(explain(warehouse, "q2").output)["p07"] == "guard: rated_relevant (rc_logodds 2)"
    out = explain(warehouse, "q3").output
    assert "no negative (a guard removed all 1 candidate(s)) -> kept without one" in out


def test_unscored_rc_shows_null(tmp_path):
    warehouse = write_upstream(tmp_path / "warehouse", unscored=("rc_logodds", "rc_rank"))
    build(warehouse, weights={"ql": 1, "rc": 0, "knn": 0})
    out = explain(warehouse, "q1").output
    row = next(line for line in out.splitlines() if line.startswith("p05 "))
    assert row.split()[3:10] == ["5", "0.6", "5", "-5", "NULL", "NULL", "5"]


def test_unknown_id_suggests_ids_by_prefix_or_the_seeds_queries(built):
    res = explain(built, "q1x")
    assert res.exit_code != 0
    assert "no query 'q1x' in table queries; ids beginning with 'q1': q1" in res.output
    assert "p01 is a seed passage, of query q1" in explain(built, "p01").output
    assert "list some with `fret sql" in explain(built, "zz").output


def test_missing_stage_says_run_dvc_repro_triples(tmp_path):
    warehouse = write_upstream(tmp_path / "warehouse", only=("passages", "queries"))
    res = explain(warehouse, "q1")
    assert res.exit_code != 0
    assert "lacks the llm_scores, neighbors, triples stage file(s)" in res.output
    assert "run `dvc repro triples`" in res.output


def test_explain_is_read_only_and_imports_no_torch(built):
    before = {p.name: p.read_bytes() for p in built.iterdir()}
    code = (
        "import sys; from pipeline.cli import main\n"
        "try:\n    main(['explain', 'q1', '--warehouse', sys.argv[1]])\n"
        "except SystemExit as e:\n    assert not e.code, e.code"
    )
    assert "POSITIVE" in run_light(code, str(built)).stdout
    assert {p.name: p.read_bytes() for p in built.iterdir()} == before
