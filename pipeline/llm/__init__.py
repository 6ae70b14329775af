"""The LLM: loading (`load_llm`, one backend per module), generation, relevance scoring, the call cache.

    base.py                  the `LLM` and `Scorer` protocols every backend implements, shared types
    backends.py              `load_llm`: the backend `llm.backend` names
    transformers_backend.py  in-process Hugging Face model: constrained decoding, prefix-sharing scorer
    openai_backend.py        OpenAI-compatible servers (vLLM, llama.cpp, ...)
    weights.py               "smollm2" or a model folder: where the weights are, their hash
    generate.py              the `queries` stage's work: task + query per passage (Gecko step 1)
    scoring.py               the `llm_scores` stage's work: QL and RC per (query, passage)
    cache.py                 the persistent cache of every LLM call

Importing this package loads no torch: the backends import it inside their functions.
"""

from pipeline.llm.backends import load_llm
from pipeline.llm.base import (
    JSON_WHITESPACE,
    LLM,
    Completion,
    Decoding,
    JsonLLM,
    LLMError,
    Scorer,
    ScoreRequest,
    ScoringError,
)
from pipeline.llm.weights import resolve_model

__all__ = [
    "JSON_WHITESPACE",
    "LLM",
    "Completion",
    "Decoding",
    "JsonLLM",
    "LLMError",
    "ScoreRequest",
    "Scorer",
    "ScoringError",
    "load_llm",
    "resolve_model",
]
