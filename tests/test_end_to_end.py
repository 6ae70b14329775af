"""The whole pipeline through `dvc repro` in a throwaway git repo, on tiny fixture models.

Checks every stage's tables and the metrics file, that a second repro does nothing, and that an
experiment changing only `train.lr` re-runs train and evaluate and nothing upstream.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml
from fixtures_encoder import tiny_bert_dir  # noqa: F401  (session fixture)
from fixtures_llm import tiny_llm_dir  # noqa: F401  (session fixture)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

TOPICS = ["rivers and floods", "volcanoes and lava", "honey bees", "solar panels", "chess openings",
          "coral reefs", "bread baking", "glaciers melting", "jazz music", "bicycle repair"]


# The README's "commit once" step after the first run: the lock file and the metrics, which DVC
# does not cache (`cache: false`, as in DVC's example-get-started), so the baseline has numbers.
BASELINE_FILES = ["dvc.lock", "metrics"]


def run(cmd: list[str], cwd: Path, with_stderr: bool = True) -> str:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + (out.stderr if with_stderr else "")


def write_sample(folder: Path) -> None:
    """A tiny BEIR folder: the corpus and the eval set of the run."""
    (folder / "qrels").mkdir(parents=True)
    docs = [
        {"_id": f"d{i}", "title": topic.title(), "text": f"This passage is about {topic}. " * 3 + f"Fact number {i}."}
        for i, topic in enumerate(TOPICS)
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"what about {TOPICS[i]}"} for i in range(4)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(4)))
    # The labelled split the judge stage reranks (never test).
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{(i + 1) % len(TOPICS)}\t1\n" for i in range(4)))


def write_params(repo: Path, llm_dir: Path, bert_dir: Path) -> None:
    """The project's own params.yaml (DVC needs every key a stage lists), pointed at tiny models."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = {
        "base": {"seed": 7, "threads": 1, "device": "cpu"},
        "corpus": {"min_words": 3},
        "llm": {"model": str(llm_dir), "dtype": "float32"},
        "generate": {"limit": None, "max_new_tokens": 400, "batch_size": 4, "max_passage_words": 20,
                     "max_failure_rate": 0.5},
        "encoder": {"model": str(bert_dir), "batch_size": 8},
        "neighbors": {"top_n": 4},
        "judge": {"path": "data/sample", "queries": 2, "task": "find the passage about the topic"},
        "score": {"batch_size": 8, "max_passage_tokens": 48},
        "select": {"relative_margin": None, "keep_without_negative": True},
        "train": {"batch_size": 4, "max_steps": 2, "mrl_dims": [], "lr": 1.0e-4},
        "eval": {"retrieval": {"sample": {"path": "data/sample", "split": "test",
                                          "task": "find the passage about the topic"}}},
    }
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture()
def project(tmp_path, tiny_llm_dir, tiny_bert_dir):
    repo = tmp_path / "repo"
    for name in ("pipeline", "python_steps", "sql", "prompts"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    write_sample(repo / "data" / "sample")
    write_params(repo, tiny_llm_dir, tiny_bert_dir)
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "ci@example.invalid"], repo)
    run(["git", "config", "user.name", "ci"], repo)
    run([str(DVC), "init", "-q"], repo)
    run([str(DVC), "config", "core.analytics", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)  # dvclive (train) reads the current commit
    return repo


def count(repo: Path, stage: str, table: str) -> int:
    con = duckdb.connect(str(repo / "warehouse" / f"{stage}.duckdb"), read_only=True)
    try:
        return con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    finally:
        con.close()


def stages_run(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")]


@pytest.mark.skipif(not DVC.exists(), reason="dvc not installed in this environment")
def test_dvc_repro_end_to_end(project):
    log = run([str(DVC), "repro"], project)
    ran = stages_run(log)
    # judge feeds no stage with numeric select.weights, so DVC may schedule it anywhere.
    assert [s for s in ran if s != "judge"] == ["passages", "queries", "neighbors", "llm_scores", "triples", "train", "evaluate"]
    assert "judge" in ran
    judge = json.loads((project / "metrics" / "judge.json").read_text())
    assert judge["queries"] == 2 and set(judge["best_weights"]) == {"ql", "rc", "knn", "bm25"}

    assert count(project, "passages", "passages") == len(TOPICS)
    n_queries = count(project, "queries", "queries")
    assert n_queries + count(project, "queries", "generation_failures") == len(TOPICS)
    assert n_queries >= len(TOPICS) // 2
    assert count(project, "neighbors", "neighbors") == 4 * n_queries
    assert count(project, "llm_scores", "llm_scores") == 4 * n_queries
    assert count(project, "triples", "positives") == n_queries
    assert count(project, "triples", "triples") >= n_queries
    assert (project / "models" / "fret-encoder" / "modules.json").is_file()
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    # The control exists only when train.mix added examples; the intervals compare what was trained.
    models = set(metrics) - {"intervals"}
    assert {"base", "trained"} <= models <= {"base", "trained", "control"}
    assert "trained_vs_base" in metrics["intervals"]
    for name in models:
        assert 0.0 <= metrics[name]["sample"]["ndcg_at_10"] <= 1.0

    # fret explain tells every query's story, whatever became of it.
    con = duckdb.connect(str(project / "warehouse" / "queries.duckdb"), read_only=True)
    query_ids = [q for (q,) in con.execute("SELECT query_id FROM queries ORDER BY query_id").fetchall()]
    con.close()
    for query_id in query_ids:
        assert "outcome: " in run([str(BIN / "fret"), "explain", query_id], project)

    again = run([str(DVC), "repro"], project)
    assert stages_run(again) == []

    # The README's "commit once" step, exactly: the metrics DVC does not cache must be in git.
    run(["git", "add", *BASELINE_FILES], project)
    run(["git", "commit", "-qm", "baseline"], project)
    assert "metrics/" not in run(["git", "status", "--porcelain"], project)
    assert "failed to load" not in run([str(DVC), "metrics", "diff"], project)
    exp = run([str(DVC), "exp", "run", "-S", "train.lr=3e-5"], project)
    assert stages_run(exp) == ["train", "evaluate"]
    rows = json.loads(run([str(DVC), "exp", "show", "--json"], project, with_stderr=False))
    workspace, baseline = rows  # the workspace row, then HEAD with its experiments
    experiments = [rev for exp in baseline["experiments"] or [] for rev in exp["revs"]]
    assert len(experiments) == 1
    for row in (workspace, baseline, experiments[0]):  # numbers in every row, none of them `!`
        got = metric_numbers(row)
        assert set(got) == {"dvclive/metrics.json", "metrics/eval.json", "metrics/judge.json"}
        assert isinstance(got["metrics/eval.json"]["trained"]["sample"]["ndcg_at_10"], float)
        assert isinstance(got["dvclive/metrics.json"]["train"]["final_loss"], float)


def metric_numbers(row: dict) -> dict[str, dict]:
    """Metrics file -> its values in one `exp show` row; fails on a file DVC could not load (shown as `!`)."""
    metrics = row["data"]["metrics"]
    errors = {path: m["error"] for path, m in metrics.items() if m.get("error")}
    assert not errors, f"{row['rev']}: metrics DVC could not load: {errors}"
    return {path: m["data"] for path, m in metrics.items()}
