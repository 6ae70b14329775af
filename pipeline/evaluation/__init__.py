"""Evaluation: the trained encoder on MTEB-style tasks, and the judge check of the LLM's scores.

    mteb_eval.py  local eval sets (BEIR, STS, classification, clustering) as mteb tasks; their readers
    judge.py      on labelled data: does the LLM rerank the encoder's top N for the better?

Only the eval sets and mteb tasks are imported here (no torch or mteb: they load inside the
functions that run a model), not the judge, which needs the LLM package.
"""

from pipeline.evaluation.mteb_eval import (
    EvalDataError,
    MtebEncoder,
    build_tasks,
    evaluate_models,
    read_beir,
    read_labelled,
    read_sts,
    run_tasks,
)

__all__ = [
    "EvalDataError",
    "MtebEncoder",
    "build_tasks",
    "evaluate_models",
    "read_beir",
    "read_labelled",
    "read_sts",
    "run_tasks",
]
