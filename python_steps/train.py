"""Stage `train`: fine-tune the encoder on `triples` with Gecko's loss; save it for evaluate.

Reads `warehouse/triples.duckdb` (read-only; table `distill_candidates` too when
`train.distill_weight` > 0) and, with `train.eval_every`, the `train.dev` sets; writes the sentence-transformers folder
`train.output` (with `fret_training.json` and a model card) and dvclive's metrics and plots under
`dvclive/`. Run from the repository root: `python -m python_steps.train`.

Data-parallel on several GPUs: `train.nproc_per_node: K` makes this script relaunch itself as
`torchrun --standalone --nproc_per_node=K -m python_steps.train`, which can also be run directly
(torchrun's own flags then win). Only rank 0 logs, prints and writes the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.params import Params, load_stage_params
from pipeline.warehouse import stage_path

if TYPE_CHECKING:
    from pipeline.training.distributed import World

STAGE = "train"
LIVE_DIR = "dvclive"
# Resumable state of an interrupted run: outside the DVC outs, beside the caches (see TrainParams.checkpoint_every).
CHECKPOINT_DIR = Path(".fret/checkpoints/train")


def main() -> None:
    started = time.perf_counter()
    params = load_stage_params(STAGE)
    if params.train.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(relaunch(params.train.nproc_per_node))
    # torch, transformers and dvclive only once the params are valid
    from pipeline.training.distributed import distributed

    with contextlib.ExitStack() as stack:
        try:
            world = stack.enter_context(distributed(params.base.device))
        except ValueError as err:
            raise SystemExit(f"{STAGE}: {err}") from None
        run(params, world, started)


def relaunch(nproc: int) -> int:
    """Run this stage again under torchrun with `nproc` local processes; returns its exit status."""
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, "-m", "python_steps.train"], check=False).returncode


def run(params: Params, world: World, started: float) -> None:
    """Read the data, train, and (rank 0) log, save and print the summary."""
    from pipeline.retrieval.encoder import Encoder, EncoderError, TextFormat, instruction_format
    from pipeline.training.checkpoint import Checkpoint
    from pipeline.training.data import mix_sources, read_candidates, read_mix_source, read_triples
    from pipeline.training.loop import train
    from pipeline.training.model_card import training_config, write_model
    from pipeline.training.model_selection import DevScorer

    enc, tp = params.encoder, params.train
    lead = world.rank == 0
    triples = stage_path("triples")
    if not triples.is_file():
        raise SystemExit(f"{STAGE}: {triples}: upstream stage 'triples' has not been built (run `dvc repro triples`)")
    fmt = TextFormat.from_params(enc)
    added: list = []  # the train.mix examples: the control trains on these alone
    try:
        examples, counts = read_triples(triples, fmt, tp.symmetric_task_types)
        if tp.mix:
            with mining_encoder(params) as embed:
                sources = [(read_mix_source(source, fmt, params.base.seed, embed), source.fraction) for source in tp.mix]
            mixed = mix_sources(examples, sources, params.base.seed)
            added = mixed[len(examples) :]
            counts = dataclasses.replace(
                counts, mix_examples=len(added), mix_with_negative=sum(e.negative is not None for e in added)
            )
            examples = mixed
        candidates = read_candidates(triples, fmt) if tp.distill_weight > 0 else None
        # Only the rank that saves selects: the others' weights are never written.
        raw = [kind for kind in ("retrieval", "sts") if not params.eval.uses_prefixes(kind)]
        dev = DevScorer.from_params(tp.dev, fmt, Path.cwd(), enc.batch_size, raw) if tp.eval_every and lead else None
        encoder = Encoder.load(
            enc.model, device=params.base.device, dtype=tp.dtype, max_length=enc.max_length, threads=params.base.threads,
            attention_dropout=tp.attention_dropout,
        ).exclude_instruction(instruction_format(enc))
    except (ValueError, EncoderError) as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    base_model = encoder.identity if lead else ""
    checkpoint = Checkpoint.for_run(
        CHECKPOINT_DIR, tp, world=world, seed=params.base.seed, examples=examples, candidates=candidates, dev=dev,
        context=(encoder.fingerprint, enc.model_dump(mode="json", exclude={"cache_path"}), params.base.model_dump(mode="json")),
    )  # fmt: skip
    live = open_live(params, counts) if lead else None
    try:
        result = train(
            encoder, examples, tp, seed=params.base.seed, live=live, progress=lead, candidates=candidates, dev=dev,
            checkpoint=checkpoint,
        )
        if live is not None:
            # Summary values only (plot=False): one number per run for `dvc exp show`, no curve.
            live.log_metric("train/examples_per_s", result.examples_per_s, plot=False)
            live.log_metric("train/final_loss", result.final_loss, plot=False)
            if result.selection is not None:
                live.log_metric("train/best_step", result.selection["best_step"], plot=False)
                live.log_metric("train/best_dev_score", result.selection["best_score"], plot=False)
    except ValueError as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    finally:
        if live is not None:
            live.end()
    if not lead:
        return
    # The fused optimizer updates the weights without bumping torch's version counters, which the
    # cached hash relies on: without this the trained model would carry the base model's identity.
    encoder.forget_weights_hash()
    config = training_config(
        base_model=base_model, encoder=encoder, params=tp, encoder_params=enc,
        base_params=params.base, counts=counts, result=result,
    )  # fmt: skip
    path = write_model(encoder, tp.output, config)
    if checkpoint is not None:
        checkpoint.remove()  # the model is saved: nothing left to resume
    print(summary(config, encoder, str(path), time.perf_counter() - started))
    if result.resumed_from:
        print(f"  resumed from step {result.resumed_from} (the checkpoint of an interrupted run, in {CHECKPOINT_DIR}/)")
    train_control(params, added, dev, base_model)


def train_control(params: Params, added: list, dev, base_model: str) -> None:
    """The control: the same recipe without the LLM's data, i.e. a fresh start trained on the very
    train.mix examples the model mixed in, nothing generated, same settings and seed. Saved at
    train.control_output; without a control (off, or no train.mix) that folder holds only
    fret_control.json saying why, so evaluate knows there is none."""
    import json
    import shutil

    from pipeline.retrieval.encoder import Encoder, instruction_format
    from pipeline.training.data import DataCounts
    from pipeline.training.loop import train
    from pipeline.training.model_card import training_config, write_model

    enc, tp = params.encoder, params.train
    out = Path(tp.control_output)
    if not tp.control or len(added) < 2:
        why = "train.control is false" if not tp.control else "train.mix added fewer than 2 examples"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "fret_control.json").write_text(json.dumps({"trained": False, "why": why}, indent=2) + "\n")
        print(f"  control: none ({why})")
        return
    started = time.perf_counter()
    encoder = Encoder.load(
        enc.model, device=params.base.device, dtype=tp.dtype, max_length=enc.max_length, threads=params.base.threads,
        attention_dropout=tp.attention_dropout,
    ).exclude_instruction(instruction_format(enc))
    result = train(encoder, added, tp, seed=params.base.seed, live=None, progress=True, dev=dev)
    encoder.forget_weights_hash()
    counts = DataCounts(
        triples=0, queries=0, with_negative=0, without_negative=0,
        mix_examples=len(added), mix_with_negative=sum(e.negative is not None for e in added),
    )  # fmt: skip
    config = training_config(
        base_model=base_model, encoder=encoder, params=tp, encoder_params=enc,
        base_params=params.base, counts=counts, result=result,
    )  # fmt: skip
    write_model(encoder, out, {**config, "control": True})
    (out / "fret_control.json").write_text(json.dumps({"trained": True, "examples": len(added)}, indent=2) + "\n")
    print(
        f"  control: {len(added):,} train.mix examples alone, {result.steps} steps in "
        f"{time.perf_counter() - started:.1f} s -> {out}"
    )


@contextlib.contextmanager
def mining_encoder(params: Params):
    """Texts -> unit vectors by the starting encoder, loaded as neighbors loads it, when a `train.mix`
    source mines hard negatives (`hard_negative`); else None. Its embedding cache is the neighbors
    stage's, so a corpus already mined there is not embedded again.
    """
    if not any(source.hard_negative for source in params.train.mix or []):
        yield None
        return
    from pipeline.retrieval.embedding_cache import encode_cached, open_cache
    from pipeline.retrieval.encoder import Encoder, instruction_format

    enc = params.encoder
    encoder = Encoder.load(
        enc.model, device=params.base.device, dtype=enc.dtype, max_length=enc.max_length, threads=params.base.threads
    ).exclude_instruction(instruction_format(enc))
    cache = open_cache(enc.cache_path)
    try:
        yield lambda texts: encode_cached(encoder, texts, cache, batch_size=enc.batch_size, progress=True, desc="mine")[0]
    finally:
        if cache is not None:
            cache.close()


def open_live(params: Params, counts):
    """A dvclive logger that leaves dvc.yaml and experiments to DVC.

    dvcyaml=False: the stage in dvc.yaml declares the metrics and plots, so dvclive must not rewrite
    dvc.yaml while `dvc repro` / `dvc exp run` is reading it. save_dvc_exp=False: `dvc exp run`
    already records the experiment, and a plain `python -m python_steps.train` should not create one.
    """
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    try:
        live = Live(dir=LIVE_DIR, save_dvc_exp=False, dvcyaml=False)
    except SCMError as err:
        # dvclive reads the current commit; a `git init` with no commit yet makes it fail obscurely.
        raise SystemExit(f"train: dvclive cannot read the git repository ({err}); commit once (`git commit`) and re-run") from None
    live.log_params(
        {
            "train": params.train.model_dump(mode="json"),
            "encoder": params.encoder.model_dump(mode="json", include={"model", "max_length"}),  # train.dtype rules training
            "base": params.base.model_dump(mode="json"),
            "data": dataclasses.asdict(counts),
        }
    )
    return live


def summary(config: dict, encoder, path: str, total_s: float) -> str:
    """One screen: data, steps, throughput, loss, where the model went."""
    data, res = config["data"], config["result"]
    mix = f" + {data['mix_examples']:,} labelled (train.mix) examples" if data["mix_examples"] else ""
    if data.get("mix_with_negative"):
        mix += f" ({data['mix_with_negative']:,} with a hard negative)"
    return "\n".join(
        [
            f"{STAGE}: {res['steps']:,} steps, {res['examples']:,} examples in {res['seconds']:.1f} s "
            f"({res['examples_per_s']:.1f} examples/s); total {total_s:.1f} s",
            f"  data: {data['triples']:,} triples over {data['queries']:,} queries "
            f"({data['with_negative']:,} with a hard negative, {data['without_negative']:,} without){mix}",
            f"  loss: {res['first_loss']:.4f} at step 1 -> {res['final_loss']:.4f} (mean of the last 10 steps)"
            + (f"; distillation term {res['final_distill_loss']:.4f}" if res["final_distill_loss"] is not None else ""),
            *_selection_lines(config["selection"], res["steps"]),
            f"  model: {config['base_model']} -> {config['model']} "
            f"on {res['world_size']} x {encoder.device.type}, {encoder.dtype}",
            f"  saved: {path} (sentence-transformers folder, fret_training.json, README.md); "
            f"metrics and plots: {LIVE_DIR}/",
        ]
    )


def _selection_lines(selection: dict | None, steps: int) -> list[str]:
    """The summary's line on model selection (none when train.eval_every is off)."""
    if selection is None:
        return []
    best = selection["best_step"]
    chosen = "step 0: no step beat the base, the base weights are saved" if best == 0 else f"step {best} of {steps}"
    return [f"  dev: best mean score {selection['best_score']:.4f} at {chosen} (every {selection['every']} steps)"]


if __name__ == "__main__":
    main()
