"""Stage `evaluate`: score the base encoder and the trained one with mteb on the `eval` sets.

Writes `eval.metrics_path` (model -> task -> metric, for `dvc metrics show/diff` and
`dvc exp show`; each model's `versatility` holds its mean main metric per category: retrieval, sts,
classification, clustering, and their `mean`) and `eval.plot_path` (one row per model, task and
metric, for `dvc plots`).
The trained model (`train.output`) and the control (`train.control_output`) are scored only when
their folders hold a model; the metrics also carry paired bootstrap intervals of their differences.
Run from the repository root: `python -m python_steps.evaluate [PARAMS_FILE]`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.evaluation.mteb_eval import build_tasks, intervals_lines, summary, task_category, write_outputs
from pipeline.labelled import EvalDataError
from pipeline.params import PARAMS_FILE, ParamsError, load_params

STAGE = "evaluate"


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = sys.argv[1:] if argv is None else argv
    params_file = Path(args[0] if args else PARAMS_FILE)
    root = params_file.resolve().parent
    try:
        params = load_params(params_file)
        tasks = build_tasks(params.eval, root)  # reads every file now: bad data fails before models load
    except (ParamsError, EvalDataError) as err:
        # One clear line for DVC's log instead of a traceback: the message names file and line.
        raise SystemExit(f"{STAGE}: {err}") from None
    # Everything is local: keep datasets/huggingface_hub from trying the network (and timing out).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from pipeline.evaluation.mteb_eval import evaluate_models
    from pipeline.retrieval.encoder import EncoderError  # torch: only once params and data are valid

    try:
        results, identities, intervals = evaluate_models(params, root, tasks)
    except EncoderError as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    ev = params.eval
    write_outputs(results, root / ev.metrics_path, root / ev.plot_path, intervals)
    print(
        f"{STAGE}: {len(tasks)} task(s), Gecko format base {_formatted(ev, tasks, 'base')} / "
        f"trained {_formatted(ev, tasks, 'trained')}, "
        f"{time.perf_counter() - started:.1f} s -> {ev.metrics_path}, {ev.plot_path}"
    )
    for label, identity in identities.items():
        print(f"  {label}: {identity}")
    print(summary(results))
    if lines := intervals_lines(intervals):
        print(lines)


def _formatted(ev, tasks, model: str) -> str:
    """`on`, `off`, or the categories in the Gecko format, e.g. `retrieval, classification`."""
    kinds = list(dict.fromkeys(task_category(t) for t in tasks))
    on = [k for k in kinds if ev.uses_prefixes(k, model)]
    return "on" if len(on) == len(kinds) else "off" if not on else ", ".join(on)


if __name__ == "__main__":
    main()
