"""Typed parameters: `params.yaml` loaded into Pydantic models.

Every section is a strict model (unknown keys are errors), so a typo in `params.yaml` fails before
any work starts, with the dotted key, the file and (when known) the line in the message.
Each pipeline stage reads one section; `base` is shared. One module per group of sections; every
field documents itself (`Field(description=...)`), which `fret params` and docs/params.md print.
"""

from pipeline.params.base import BaseParams, ParamsError, Section
from pipeline.params.corpus import CorpusParams
from pipeline.params.evaluation import (
    EVAL_KINDS, ClassificationSetParams, ClusteringSetParams, EvalParams, EvalSetParams, RetrievalSetParams,
)  # fmt: skip
from pipeline.params.llm import FewShotParams, GenerateParams, JudgeParams, LLMParams, ScoreParams
from pipeline.params.loading import PARAMS_FILE, Params, load_params, load_stage_params, sql_variables
from pipeline.params.retrieval import EncoderParams, HNSWParams, IVFParams, NeighborsParams
from pipeline.params.selection import FusionWeights, SelectParams
from pipeline.params.training import DevParams, MixParams, TrainParams

__all__ = [
    "EVAL_KINDS", "PARAMS_FILE", "BaseParams", "ClassificationSetParams", "ClusteringSetParams", "CorpusParams",
    "DevParams", "EncoderParams", "EvalParams", "EvalSetParams", "FewShotParams", "FusionWeights", "GenerateParams",
    "HNSWParams", "IVFParams", "JudgeParams", "LLMParams", "MixParams", "NeighborsParams", "Params", "ParamsError",
    "RetrievalSetParams", "ScoreParams", "Section", "SelectParams", "TrainParams", "load_params",
    "load_stage_params", "sql_variables",
]  # fmt: skip
