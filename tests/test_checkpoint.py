"""Training checkpoints: a run stopped mid-way and re-run ends with the uninterrupted run's weights.

A crash is simulated in process by making the k-th optimisation step raise (where a kill would stop
the process); the reliability suite kills real stage processes (tests/reliability/test_crash_resume.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import pipeline.training.loop as training
from fixtures_encoder import tiny_bert_dir  # noqa: F401  (session fixture)
from pipeline.retrieval.encoder import TextFormat
from pipeline.training.checkpoint import Checkpoint, run_key
from pipeline.training.data import read_candidates, read_triples
from pipeline.training.loop import train
from test_training import fresh_encoder, small_params, write_candidates, write_triples


class Crash(Exception):
    """Stands for a kill: raised inside a step, it stops the run as a SIGKILL would."""


def crash_at(monkeypatch, step: int) -> None:
    """Make the `step`-th optimisation step (1-based, counted in this run) raise `Crash`."""
    original, calls = training._step, [0]

    def step_or_crash(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Crash(f"killed in step {step}")
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "_step", step_or_crash)


class FakeLive:
    """Records what dvclive would be given, in order."""

    def __init__(self):
        self.events = []

    def log_metric(self, name, value):
        self.events.append((name, value))

    def next_step(self):
        self.events.append("next")


@pytest.fixture()
def data(tmp_path):
    """10 triples at batch 4: 3 batches an epoch, so checkpoints land mid-epoch too; with candidates."""
    path = write_candidates(write_triples(tmp_path / "triples.duckdb", n=10), n=10)
    return read_triples(path, TextFormat())[0], read_candidates(path, TextFormat())


def params(**overrides):
    return small_params(**({"max_steps": 9, "checkpoint_every": 2, "warmup_ratio": 0.2, "dtype": "float32"} | overrides))


def checkpoint_of(folder: Path, p, examples, candidates=None, seed: int = 5, dev=None) -> Checkpoint:
    return Checkpoint.for_run(folder, p, seed=seed, examples=examples, candidates=candidates, dev=dev)


def run(tiny_bert_dir, examples, p, checkpoint=None, candidates=None, dev=None, seed: int = 5):  # noqa: F811
    encoder, live = fresh_encoder(tiny_bert_dir), FakeLive()
    result = train(encoder, examples, p, seed=seed, live=live, candidates=candidates, dev=dev, checkpoint=checkpoint)
    return encoder.module.state_dict(), result, live.events


def crashed_run(tiny_bert_dir, examples, p, checkpoint, at: int, monkeypatch, **kwargs) -> None:  # noqa: F811
    with monkeypatch.context() as patch:
        crash_at(patch, at)
        with pytest.raises(Crash):
            run(tiny_bert_dir, examples, p, checkpoint, **kwargs)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, _ = data
    p = params()
    weights, result, events = run(tiny_bert_dir, examples, p)
    checkpoint = checkpoint_of(tmp_path / "ckpt", p, examples)
    crashed_run(tiny_bert_dir, examples, p, checkpoint, 6, monkeypatch)  # 5 steps done: the checkpoint of step 4
    assert checkpoint.path.is_file() and torch.load(checkpoint.path, weights_only=True)["step"] == 4
    resumed, again, replayed = run(tiny_bert_dir, examples, p, checkpoint)
    assert again.resumed_from == 4 and result.resumed_from == 0
    assert same_weights(resumed, weights)  # bitwise: dropout, data order, AdamW and LR all where they were
    assert again.losses == result.losses and again.examples == result.examples and again.steps == 9
    assert replayed == events  # dvclive gets every step once, as in one run
    assert checkpoint.path.is_file()  # the stage removes it once the model is saved (not train)
    checkpoint.remove()
    assert not (tmp_path / "ckpt").exists()


def test_resume_twice_and_at_an_epoch_boundary(tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, _ = data
    p = params(checkpoint_every=3)  # 3 batches an epoch: each checkpoint ends an epoch
    weights, _, _ = run(tiny_bert_dir, examples, p)
    checkpoint = checkpoint_of(tmp_path, p, examples)
    crashed_run(tiny_bert_dir, examples, p, checkpoint, 5, monkeypatch)  # checkpoint of step 3
    crashed_run(tiny_bert_dir, examples, p, checkpoint, 4, monkeypatch)  # from 3, on to step 6
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 6
    resumed, result, _ = run(tiny_bert_dir, examples, p, checkpoint)
    assert result.resumed_from == 6 and same_weights(resumed, weights)


def test_resume_with_distillation_and_selection(tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, pools = data
    dev = {"retrieval": {"fake": {"path": "unused", "split": "dev", "task": "t"}}}
    p = params(distill_weight=0.5, eval_every=3, dev=dev)

    def scorer(encoder) -> dict[str, float]:  # a function of the weights alone, whatever process asks
        torch.rand(10)  # an evaluation that draws from torch's RNG must not shift training's draws
        first = next(iter(encoder.module.state_dict().values()))
        return {"fake": -float(first.double().sum().abs())}

    weights, result, events = run(tiny_bert_dir, examples, p, candidates=pools, dev=scorer)
    checkpoint = checkpoint_of(tmp_path, p, examples, pools)
    crashed_run(tiny_bert_dir, examples, p, checkpoint, 8, monkeypatch, candidates=pools, dev=scorer)
    resumed, again, replayed = run(tiny_bert_dir, examples, p, checkpoint, candidates=pools, dev=scorer)
    assert again.resumed_from == 6
    assert same_weights(resumed, weights)
    assert again.selection == result.selection and sorted(again.selection["scores"]) == ["0", "3", "6", "9"]
    assert again.distill_losses == result.distill_losses and len(again.distill_losses) == 9
    assert replayed == events


def test_checkpoint_every_param():
    from pipeline.params import TrainParams

    assert TrainParams().checkpoint_every == 50 and TrainParams(checkpoint_every=None).checkpoint_every is None
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainParams(checkpoint_every=0)


def test_run_key_covers_what_decides_the_weights(data):
    examples, pools = data
    key = run_key(params(), seed=5, examples=examples)
    assert run_key(params(checkpoint_every=7), seed=5, examples=examples) == key  # how often to save: not
    assert run_key(params(checkpoint_every=None), seed=5, examples=examples) == key
    assert run_key(params(lr=2e-3), seed=5, examples=examples) != key
    assert run_key(params(), seed=6, examples=examples) != key
    assert run_key(params(), seed=5, examples=examples[:-1]) != key
    assert run_key(params(), seed=5, examples=examples, candidates=pools) != key
    assert run_key(params(), seed=5, examples=examples, context=("other model",)) != key
    assert run_key(params(), seed=5, examples=examples, world_size=2) != key
    assert Checkpoint.for_run("x", params(checkpoint_every=None), seed=5, examples=examples) is None


def test_another_runs_checkpoint_is_ignored_and_replaced(tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, _ = data
    first, other = params(), params(lr=2e-3)
    stale = checkpoint_of(tmp_path, first, examples)
    crashed_run(tiny_bert_dir, examples, first, stale, 6, monkeypatch)
    weights, _, _ = run(tiny_bert_dir, examples, other)
    checkpoint = checkpoint_of(tmp_path, other, examples)
    assert checkpoint.path != stale.path
    resumed, result, _ = run(tiny_bert_dir, examples, other, checkpoint)
    assert result.resumed_from == 0 and same_weights(resumed, weights)
    assert not stale.path.exists()  # saving keeps one run's checkpoint in the folder at most
    # Even a file under the right name is refused when its recorded key is another run's.
    crashed_run(tiny_bert_dir, examples, first, stale, 6, monkeypatch)
    stale.path.rename(checkpoint.path)
    with pytest.warns(UserWarning, match="another version or run"):
        assert checkpoint.load(9) is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "other step count"])
def test_a_damaged_checkpoint_is_ignored_with_a_warning(damage, tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, _ = data
    p = params()
    weights, _, _ = run(tiny_bert_dir, examples, p)
    checkpoint = checkpoint_of(tmp_path, p, examples)
    crashed_run(tiny_bert_dir, examples, p, checkpoint, 6, monkeypatch)
    raw = checkpoint.path.read_bytes()
    if damage == "other step count":  # the same run key with max_steps changed is impossible; a forged file is not
        state = torch.load(checkpoint.path, weights_only=True)
        torch.save(state | {"step": 12}, checkpoint.path)
    else:
        broken = {"truncated": raw[: len(raw) // 2], "empty": b"", "garbage": b"\x80\x04not a zip" * 50}
        checkpoint.path.write_bytes(broken[damage])
    with pytest.warns(UserWarning, match="ignoring checkpoint"):
        resumed, result, _ = run(tiny_bert_dir, examples, p, checkpoint)
    assert result.resumed_from == 0 and same_weights(resumed, weights)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_bert_dir, data, tmp_path, monkeypatch):  # noqa: F811
    examples, _ = data
    p = params()
    weights, _, _ = run(tiny_bert_dir, examples, p)
    checkpoint = checkpoint_of(tmp_path, p, examples)
    original, saves = torch.save, [0]

    def save_then_die(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # the checkpoint of step 4, cut short
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise Crash("killed while saving")
        return original(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_then_die)
        with pytest.raises(Crash):
            run(tiny_bert_dir, examples, p, checkpoint)
    assert sorted(x.name for x in tmp_path.iterdir()) == [checkpoint.path.name]  # no temporary left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the surviving checkpoint loads cleanly
        resumed, result, _ = run(tiny_bert_dir, examples, p, checkpoint)
    assert result.resumed_from == 2 and same_weights(resumed, weights)


def test_stage_resumes_says_so_and_removes_the_checkpoint(tiny_bert_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from safetensors.torch import load_file

    from python_steps import train as stage

    def project(root: Path) -> Path:
        (root / "warehouse").mkdir(parents=True)
        write_triples(root / "warehouse" / "triples.duckdb", n=10)
        (root / "params.yaml").write_text(
            f"base:\n  threads: 1\n  device: cpu\nencoder:\n  model: {tiny_bert_dir}\n  cache_path: null\n"
            "train:\n  batch_size: 4\n  max_steps: 7\n  mrl_dims: [16]\n  lr: 1.0e-3\n  dtype: float32\n"
            "  checkpoint_every: 2\n  mix: null\n"
        )
        return root

    def loss_rows(root: Path) -> list[list[str]]:
        rows = (root / stage.LIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        return [r.split("\t")[:2] for r in rows]

    threads = torch.get_num_threads()
    try:
        monkeypatch.chdir(project(tmp_path / "whole"))
        stage.main()
        assert "resumed" not in capsys.readouterr().out
        monkeypatch.chdir(project(tmp_path / "killed"))
        with monkeypatch.context() as patch:
            crash_at(patch, 6)
            with pytest.raises(Crash):
                stage.main()
        assert len(list((tmp_path / "killed" / stage.CHECKPOINT_DIR).iterdir())) == 1
        stage.main()
    finally:
        torch.set_num_threads(threads)
    assert "resumed from step 4 " in capsys.readouterr().out
    assert not (tmp_path / "killed" / stage.CHECKPOINT_DIR).exists()  # removed once the model is saved
    saved = [tmp_path / run / "models" / "fret-encoder" / "model.safetensors" for run in ("whole", "killed")]
    whole, resumed = (load_file(path) for path in saved)
    assert same_weights(whole, resumed)
    assert loss_rows(tmp_path / "killed") == loss_rows(tmp_path / "whole")
