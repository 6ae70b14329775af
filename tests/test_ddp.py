"""Data-parallel training under torchrun (gloo on CPU) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures_encoder import tiny_bert_dir  # noqa: F401  (session fixture)
from test_training import write_triples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_dropout_dir(tiny_bert_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny model without dropout: each rank draws its own dropout masks, so only then can the
    weights of K processes and of one process be compared number for number."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny_no_dropout") / "model"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_project(root: Path, model: Path, nproc: int) -> Path:
    """A project folder with 8 triples and params: 3 ranks split batches of 3 rows 1/1/1 and the
    epoch's last batch of 2 rows 1/1/0, so uneven and empty shares both occur."""
    (root / "warehouse").mkdir(parents=True)
    write_triples(root / "warehouse" / "triples.duckdb", n=8)
    (root / "params.yaml").write_text(
        f"base:\n  threads: 1\n  device: cpu\nencoder:\n  model: {model}\n  cache_path: null\n"
        f"train:\n  batch_size: 3\n  epochs: 2\n  mrl_dims: [16]\n  lr: 1.0e-3\n  warmup_ratio: 0.0\n"
        f"  dtype: float32\n  nproc_per_node: {nproc}\n  mix: null\n"
    )
    return root


def weights(model: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model / "model.safetensors")


def test_three_processes_train_like_one(no_dropout_dir, tmp_path, monkeypatch, capsys):
    from python_steps import train as stage

    single = make_project(tmp_path / "single", no_dropout_dir, nproc=1)
    monkeypatch.chdir(single)
    threads = torch.get_num_threads()
    try:
        stage.main()
    finally:
        torch.set_num_threads(threads)  # Encoder.load set it process-wide
    assert "train: 6 steps, 16 examples" in capsys.readouterr().out

    multi = make_project(tmp_path / "multi", no_dropout_dir, nproc=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "python_steps.train"], cwd=multi, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Only rank 0 prints, logs and saves: one summary, one model, one dvclive folder.
    assert done.stdout.count("train: 6 steps, 16 examples") == 1, done.stdout
    assert "on 3 x cpu" in done.stdout
    # fret-control is a dvc out: without train.mix it holds only the file saying there is no control.
    assert sorted(p.name for p in (multi / "models").iterdir()) == ["fret-control", "fret-encoder"]
    assert [p.name for p in (multi / "models" / "fret-control").iterdir()] == ["fret_control.json"]
    assert json.loads((multi / "models" / "fret-encoder" / "fret_training.json").read_text())["result"]["world_size"] == 3

    ours, reference = weights(multi / "models" / "fret-encoder"), weights(single / "models" / "fret-encoder")
    assert ours.keys() == reference.keys()
    # An attention key bias shifts all of a query's logits equally, and softmax ignores that: its
    # gradient is zero in exact arithmetic, so both runs' Adam steps there are rounding noise / lr.
    compared = [k for k in ours if not k.endswith("attention.self.key.bias")]
    diff = {k: (ours[k] - reference[k]).abs().max().item() for k in compared}
    assert max(diff.values()) < 1e-5, sorted(diff.items(), key=lambda kv: -kv[1])[:3]
    moved = max((reference[k] - v).abs().max().item() for k, v in weights(no_dropout_dir).items() if k in reference)
    assert moved > 1e-3  # training did change the weights, so the comparison means something
