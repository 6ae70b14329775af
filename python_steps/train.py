"""Stage `train`: fine-tune the encoder on `triples` with Gecko's loss; save it for evaluate.

Reads `warehouse/triples.duckdb` (read-only), writes the sentence-transformers folder
`train.output` (with `fret_training.json` and a model card) and dvclive's metrics and plots under
`dvclive/`. Run from the repository root: `python -m python_steps.train`.
"""

from __future__ import annotations

import dataclasses
import time

from pipeline.params import Params, load_stage_params
from pipeline.warehouse import stage_path

STAGE = "train"
LIVE_DIR = "dvclive"


def main() -> None:
    started = time.perf_counter()
    params = load_stage_params(STAGE)
    # torch, transformers and dvclive only once the params are valid
    from pipeline.encoder import Encoder, EncoderError, TextFormat
    from pipeline.training import mix_in, read_pairs, read_triples, train, training_config, write_model

    enc, tp = params.encoder, params.train
    triples = stage_path("triples")
    if not triples.is_file():
        raise SystemExit(f"{STAGE}: {triples}: upstream stage 'triples' has not been built (run `dvc repro triples`)")
    fmt = TextFormat.from_params(enc)
    try:
        examples, counts = read_triples(triples, fmt)
        if tp.mix is not None:
            pairs = read_pairs(tp.mix.path, tp.mix.min_score, tp.mix.task, fmt)
            mixed = mix_in(examples, pairs, tp.mix.fraction, params.base.seed)
            counts = dataclasses.replace(counts, mix_examples=len(mixed) - len(examples))
            examples = mixed
        encoder = Encoder.load(
            enc.model, device=params.base.device, dtype=enc.dtype, max_length=enc.max_length, threads=params.base.threads
        )
    except (ValueError, EncoderError) as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    base_model = encoder.identity
    live = open_live(params, counts)
    try:
        result = train(encoder, examples, tp, seed=params.base.seed, live=live, progress=True)
        # Summary values only (plot=False): one number per run for `dvc exp show`, no curve.
        live.log_metric("train/examples_per_s", result.examples_per_s, plot=False)
        live.log_metric("train/final_loss", result.final_loss, plot=False)
    except ValueError as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    finally:
        live.end()
    config = training_config(
        base_model=base_model, encoder=encoder, params=tp, encoder_params=enc,
        base_params=params.base, counts=counts, result=result,
    )  # fmt: skip
    path = write_model(encoder, tp.output, config)
    print(summary(config, encoder, str(path), time.perf_counter() - started))


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
            "encoder": params.encoder.model_dump(mode="json", include={"model", "max_length", "dtype"}),
            "base": params.base.model_dump(mode="json"),
            "data": dataclasses.asdict(counts),
        }
    )
    return live


def summary(config: dict, encoder, path: str, total_s: float) -> str:
    """One screen: data, steps, throughput, loss, where the model went."""
    data, res = config["data"], config["result"]
    mix = f" + {data['mix_examples']:,} labelled-pair examples" if data["mix_examples"] else ""
    return "\n".join(
        [
            f"{STAGE}: {res['steps']:,} steps, {res['examples']:,} examples in {res['seconds']:.1f} s "
            f"({res['examples_per_s']:.1f} examples/s); total {total_s:.1f} s",
            f"  data: {data['triples']:,} triples over {data['queries']:,} queries "
            f"({data['with_negative']:,} with a hard negative, {data['without_negative']:,} without){mix}",
            f"  loss: {res['first_loss']:.4f} at step 1 -> {res['final_loss']:.4f} (mean of the last 10 steps)",
            f"  model: {config['base_model']} -> {encoder.identity} on {encoder.device.type}, {encoder.dtype}",
            f"  saved: {path} (sentence-transformers folder, fret_training.json, README.md); "
            f"metrics and plots: {LIVE_DIR}/",
        ]
    )


if __name__ == "__main__":
    main()
