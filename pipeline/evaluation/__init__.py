"""Evaluation: the trained encoder on MTEB-style tasks, and the judge check of the LLM's scores.

    mteb_eval.py  local eval sets (BEIR, STS, classification, clustering) as mteb tasks
    judge.py      on labelled data: does the LLM rerank the encoder's top N for the better?

The eval sets' readers live below this package, in `pipeline.labelled` (generation and training
read the same files). Only the mteb tasks are imported here (no torch or mteb: they load inside
the functions that run a model), not the judge, which needs the LLM package.
"""

from pipeline.evaluation.mteb_eval import MtebEncoder, build_tasks, evaluate_models, run_tasks

__all__ = ["MtebEncoder", "build_tasks", "evaluate_models", "run_tasks"]
