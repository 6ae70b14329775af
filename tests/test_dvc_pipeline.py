"""`dvc repro` on a copy of the project: the stages run, and a second repro does nothing."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")


def run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture()
def project(tmp_path):
    """A throwaway git + DVC repo holding the project's code and a tiny corpus."""
    repo = tmp_path / "repo"
    for name in ("pipeline", "python_steps", "sql", "prompts"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    # the eval set of params.yaml must exist: every stage validates the whole file before working
    shutil.copytree(ROOT / "data" / "sample", repo / "data" / "sample")
    lines = [f'{{"_id": "d{i}", "title": "Doc {i}", "text": "word{i} alpha beta gamma delta epsilon"}}' for i in range(5)]
    (repo / "data" / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace(
        "path: data/sample/corpus.jsonl", "path: data/corpus.jsonl"))
    run(["git", "init", "-q"], repo)
    run([str(DVC), "init", "-q"], repo)
    run([str(DVC), "config", "core.analytics", "false"], repo)
    return repo


@pytest.mark.skipif(not DVC.exists(), reason="dvc not installed in this environment")
def test_repro_twice_second_does_nothing(project):
    first = run([str(DVC), "repro", "passages"], project)
    assert "Running stage 'passages'" in first
    assert (project / "warehouse" / "passages.duckdb").is_file()
    second = run([str(DVC), "repro", "passages"], project)
    assert "Running stage" not in second
    assert "didn't change" in second or "up to date" in second
