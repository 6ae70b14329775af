"""Crash anywhere, lose nothing: `kill -9` of the LLM and train stages at seeded random points.

Each stage runs as a real subprocess (`python -m python_steps.<stage>`, through `callhook`, which
logs every LLM call and train step) in a scratch project and is killed with SIGKILL a seeded random
delay after it starts working; the next run is killed again, and so on; the last run completes.
After every kill: every warehouse file is readable and byte-identical to before the run (the
stage's own file may instead be the complete new one, when the kill came after its atomic rename),
the only debris is the killed process's own temporary file, and the LLM cache lost no entry.
Every run makes no LLM call that was cached before it started. The final outputs equal those of an
uninterrupted run (`reference`), compared by sorted-row hashes (only `queries.created_at`, the
clock time of each LLM call, is left out) and, for train, tensor by tensor.

Default: 2 kill points per stage, chained (CI). `-m slow`: 12 points per stage (3 during start-up
and model loading, 9 during work and writing).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import duckdb
import pytest
from conftest import (
    file_digests,
    make_project,
    outputs_digest,
    read_log,
    run_and_kill,
    run_stage,
    stage_digest,
)

from pipeline.warehouse import list_tables, write_stage, write_table

STAGES = ["queries", "llm_scores", "train"]
CHECKPOINTS = Path(".fret/checkpoints/train")  # python_steps.train.CHECKPOINT_DIR, relative to the project
NAMESPACE = {"queries": "generate", "llm_scores": "score"}
START_UP_SECONDS = 6.0  # kills "from the start" land in imports and model loading


def kill_points(stage: str, n: int) -> list[tuple[float, bool]]:
    """n seeded (fraction, after_marker) points; in the long variant a quarter fall in start-up.

    The short variant is fixed, not drawn: one kill halfway through the work, one at its end (in the
    writing that follows, or just before). Two draws can both land past the end, and then a fast
    machine finishes every run before its kill and the test checks nothing."""
    if n <= 2:
        return [(0.4, True), (0.85, True)][:n]
    rng = random.Random(f"{stage}:{n}")
    return [(rng.random(), n <= 2 or i % 4 != 0) for i in range(n)]


def cache_keys(project: Path, stage: str) -> set[str]:
    path = project / "cache" / "llm.duckdb"
    if not path.exists():
        return set()
    con = duckdb.connect(str(path), read_only=True)  # replays a WAL left by a kill, writes nothing
    try:
        rows = con.execute("SELECT key FROM llm_cache WHERE namespace = ?", [NAMESPACE[stage]]).fetchall()
    finally:
        con.close()
    return {k for (k,) in rows}


def previous_output(project: Path, stage: str, tiny_bert_dir: Path) -> None:
    """A finished output from an earlier run, which no kill may damage."""
    if stage == "llm_scores":
        import pyarrow as pa

        with write_stage("llm_scores", warehouse=project / "warehouse") as con:
            write_table(con, "llm_scores", pa.table({"query_id": ["old"], "ql_sum": [-1.0]}))
    elif stage == "train":
        from pipeline.retrieval.encoder import Encoder

        folder = Encoder.load(tiny_bert_dir, device="cpu").save(project / "models" / "fret-encoder")
        (folder / "fret_training.json").write_text('{"previous": true}\n')
    # queries: make_project already wrote a queries.duckdb (the neighbors stage's upstream)


def snapshot(project: Path) -> dict[str, dict[str, str]]:
    return {"warehouse": file_digests(project / "warehouse"), "models": file_digests(project / "models")}


def check_after_kill(project: Path, stage: str, before: dict, reference, pid: int) -> None:
    after = snapshot(project)
    own = f"{stage}.duckdb"
    debris = re.compile(rf"\.{re.escape(stage)}\.duckdb\.tmp-{pid}(\.wal)?")
    for name, digest in before["warehouse"].items():
        if name.startswith("."):  # an earlier killed run's temporary: the next writer removes it
            continue
        if name == own and after["warehouse"].get(name) != digest:
            # Replaced: only ever by the complete new file (the kill came after the rename).
            assert stage_digest(project / "warehouse" / own) == reference.digest
        else:
            assert after["warehouse"].get(name) == digest, f"{name} changed or vanished"
    for name in set(after["warehouse"]) - set(before["warehouse"]):
        assert debris.fullmatch(name), f"unexpected file in warehouse/: {name}"
    # Readable: every table of every stage file, through the same path `fret sql` uses.
    assert {t.name for t in list_tables(project / "warehouse")} >= {"passages", "queries", "neighbors", "triples"}
    if stage == "train":
        model = {k[len("fret-encoder/"):]: v for k, v in after["models"].items() if k.startswith("fret-encoder/")}
        old = {k[len("fret-encoder/"):]: v for k, v in before["models"].items() if k.startswith("fret-encoder/")}
        if model != old:  # only a complete new model may replace the old one
            assert outputs_digest(project, "train")["model"] == reference.digest["model"]
        for name in {p.split("/")[0] for p in after["models"]} - {"fret-encoder", "fret-control"}:
            assert re.fullmatch(rf"\.fret-encoder\.(tmp|old)-{pid}", name), f"unexpected in models/: {name}"


def calls(log: Path, kind: str) -> list[tuple[str, ...]]:
    return [line[1:] for line in read_log(log) if line[0] == kind]


@pytest.mark.parametrize(
    "n_points", [pytest.param(2, id="2-points"), pytest.param(12, id="12-points", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("stage", STAGES)
def test_kill_anywhere_then_resume(stage, n_points, reference, rel_llm_dir, tiny_bert_dir, tmp_path):
    ref = reference(stage)
    project = make_project(tmp_path / "project", rel_llm_dir, tiny_bert_dir)
    previous_output(project, stage, tiny_bert_dir)
    prompts: dict[str, str] = {}  # generation cache key -> prompt hash, from the logged requests
    killed = 0
    for i, (fraction, after_marker) in enumerate(kill_points(stage, n_points)):
        before = snapshot(project)
        cached = cache_keys(project, stage) if stage != "train" else set()
        log = tmp_path / f"run{i}.log"
        # Over the work plus a fifth: kills land in the LLM calls / training, and in the writing after.
        delay = fraction * (1.2 * ref.seconds if after_marker else START_UP_SECONDS)
        run = run_and_kill(project, stage, log, delay, after_marker)
        killed += run.killed
        assert run.killed or run.returncode == 0, run.output[-3000:]
        check_after_kill(project, stage, before, ref, run.pid)
        if stage != "train":
            after = cache_keys(project, stage)
            assert after >= cached  # a kill never loses a cached call
            check_no_cached_call_redone(stage, log, cached, prompts)
            check_finished_calls_were_kept(stage, log, after, prompts, ref)
    assert killed >= 1, "every run finished before its kill: the kill points test nothing"

    cached = cache_keys(project, stage) if stage != "train" else set()
    log = tmp_path / "final.log"
    final = run_stage(project, stage, log=log)
    assert final.returncode == 0, final.output[-3000:]
    assert outputs_digest(project, stage) == ref.digest
    # Nothing left behind: the killed runs' temporaries are gone, only finished stage files remain.
    expected = {"passages", "queries", "neighbors", "triples"} | ({stage} if stage != "train" else set())
    assert sorted(p.name for p in (project / "warehouse").iterdir()) == sorted(f"{s}.duckdb" for s in expected)
    if stage == "train":
        assert sorted(p.name for p in (project / "models").iterdir()) == ["fret-control", "fret-encoder"]  # the control: written after the model
        assert not (project / CHECKPOINTS).exists()  # removed once the model is saved
        return
    check_no_cached_call_redone(stage, log, cached, prompts)
    if stage == "queries":
        # ... and the final run generated exactly what was missing, nothing more.
        missing = {sha for key, sha in prompts.items() if key not in cached}
        assert {sha for (sha,) in calls(log, "generate")} == missing
    else:
        assert {k for (k,) in calls(log, "score")} == cache_keys(project, stage) - cached


def check_no_cached_call_redone(stage: str, log: Path, cached: set[str], prompts: dict[str, str]) -> None:
    if stage == "queries":
        prompts.update({key: sha for key, sha in calls(log, "request")})
        done = {prompts[k] for k in cached}
        redone = [sha for (sha,) in calls(log, "generate") if sha in done]
        assert not redone, f"{len(redone)} cached generation call(s) made again"
    else:
        redone = [k for (k,) in calls(log, "score") if k in cached]
        assert not redone, f"{len(redone)} cached scoring call(s) made again"


def _config() -> dict:
    return {
        "base_model": "tiny", "model": "tiny@new", "mrl_dims": [32], "train": {}, "base": {},
        "encoder": {"query_template": "task: {task} | query: {query}", "passage_template": "title: {title} | text: {text}",
                    "empty_title": "none"},
        "data": {"triples": 1, "queries": 1, "with_negative": 1, "without_negative": 0, "mix_examples": 0},
        "result": {"steps": 1, "examples": 2, "seconds": 0.1, "examples_per_s": 20.0, "final_loss": 1.0, "first_loss": 1.0},
    }  # fmt: skip


@pytest.mark.parametrize("crash_on", ["model.safetensors", "fret_training.json", "README.md"])
def test_a_crash_while_saving_the_model_keeps_the_previous_one(crash_on, tiny_bert_dir, tmp_path, monkeypatch):
    """The whole folder (weights, config, card) is swapped in at once, or not at all; debris is collected."""
    import torch

    from pipeline.retrieval.encoder import Encoder
    from pipeline.training.model_card import write_model

    target = tmp_path / "models" / "fret-encoder"
    previous_output(tmp_path, "train", tiny_bert_dir)
    before = file_digests(target)
    encoder = Encoder.load(tiny_bert_dir, device="cpu")
    with torch.no_grad():
        next(encoder.module.parameters()).add_(1.0)  # new weights
    original_write, original_save = Path.write_text, type(encoder.module).save_pretrained

    def write_text(self, *args, **kwargs):
        if self.name == crash_on:
            raise KeyboardInterrupt  # where a kill would stop the process
        return original_write(self, *args, **kwargs)

    def save_pretrained(self, folder, *args, **kwargs):
        original_save(self, folder, *args, **kwargs)
        if crash_on == "model.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(type(encoder.module), "save_pretrained", save_pretrained)
    with pytest.raises(KeyboardInterrupt):
        write_model(encoder, target, _config())
    monkeypatch.undo()
    assert file_digests(target) == before
    # A later save (another process) collects what the interrupted one left beside the folder.
    debris = [p.name for p in target.parent.iterdir() if p.name != "fret-encoder"]
    for name in debris:
        os.rename(target.parent / name, target.parent / name.replace(f"-{os.getpid()}", "-999999999"))
    write_model(encoder, target, _config())
    assert sorted(p.name for p in target.parent.iterdir()) == ["fret-encoder"]
    assert (target / "fret_training.json").is_file() and (target / "README.md").is_file()


BATCH = {"queries": 2, "llm_scores": 3}  # generate.batch_size and score.batch_size in conftest.params_yaml


def check_finished_calls_were_kept(stage: str, log: Path, cached: set[str], prompts: dict[str, str], ref) -> None:
    """Calls answered before the kill are in the cache, but for the one batch between answer and
    write (and, for generation, outputs that failed validation, which are never cached)."""
    if stage == "queries":
        kept = {prompts[k] for k in cached if k in prompts}
        lost = {sha for (sha,) in calls(log, "generated")} - kept
        allowed = BATCH[stage] + ref.digest["generation_failures"][0]
    else:
        lost = {k for (k,) in calls(log, "scored")} - cached
        allowed = BATCH[stage]
    assert len(lost) <= allowed, f"{len(lost)} answered call(s) lost by the kill (at most {allowed} may be)"


# --- train: kills at seeded steps -----------------------------------------------------------------

EVERY, STEPS = 10, 80  # train.checkpoint_every and max_steps in conftest.params_yaml


def train_kill_steps(n: int) -> list[int]:
    """Steps (counted within each run) at which the chained runs are killed.

    The short variant is fixed: 25 steps into the first run (its checkpoint of step 20 is saved), 25
    into the second (resumed from 20 or later, it saves 40 or later). The long one draws 6 seeded
    points of 1 to 35 steps, some landing right at a checkpoint save."""
    if n <= 2:
        return [25, 25][:n]
    rng = random.Random(f"train-steps:{n}")
    return [rng.randint(1, 35) for _ in range(n)]


@pytest.mark.parametrize(
    "n_points", [pytest.param(2, id="2-points"), pytest.param(6, id="6-points", marks=pytest.mark.slow)]
)
def test_train_killed_at_seeded_steps_resumes_to_the_same_weights(n_points, reference, rel_llm_dir, tiny_bert_dir, tmp_path):
    """kill -9 of train at seeded steps, each run resuming the last one's checkpoint: the final run
    resumes too and saves the uninterrupted run's weights, dvclive rows and config, bit for bit."""
    import torch

    ref = reference("train")
    project = make_project(tmp_path / "project", rel_llm_dir, tiny_bert_dir)
    resume = 0  # the step of the checkpoint left behind: where the next run starts
    for i, step in enumerate(train_kill_steps(n_points)):
        # Killed once step `step` of this run has started: a moment later, somewhere in it or a
        # following step (in a checkpoint save, even); `step - 1` steps were done before.
        run = run_and_kill(project, "train", tmp_path / f"run{i}.log", 0.0, True, marker=f"train-step {step}\n")
        if not run.killed:  # the run finished first (a long variant's draws can outlast the steps left)
            assert run.returncode == 0, run.output[-3000:]
            resume = 0
            break
        saved = sorted(p.name for p in (project / CHECKPOINTS).iterdir()) if (project / CHECKPOINTS).exists() else []
        finals = [n for n in saved if not n.startswith(".")]
        # One run's checkpoint, and at most the temporary of a save the kill cut short.
        assert len(finals) <= 1 and len(saved) - len(finals) <= 1, saved
        if finals:
            got = torch.load(project / CHECKPOINTS / finals[0], weights_only=True)["step"]
            # Each checkpoint is written before the next step starts: none of the done steps' is missing.
            assert got >= min((resume + step - 1) // EVERY * EVERY, STEPS - EVERY), (resume, step, got)
            resume = got
        else:  # none reached yet, or the kill came after the model was saved (and the checkpoint removed)
            assert resume + step - 1 < EVERY or outputs_digest(project, "train")["model"] == ref.digest["model"]
            resume = 0
    final = run_stage(project, "train", log=tmp_path / "final.log")
    assert final.returncode == 0, final.output[-3000:]
    assert (f"resumed from step {resume} " in final.output) if resume else ("resumed" not in final.output)
    assert outputs_digest(project, "train") == ref.digest
    assert not (project / CHECKPOINTS).exists()
