"""`load_llm`: the one loading path, the backend `llm.backend` names.

A new backend is a module implementing `pipeline.llm.base.LLM` (and its `Scorer`), a branch here,
and its name among the `llm.backend` choices in pipeline/params/llm.py.
"""

from __future__ import annotations

from pipeline.llm.base import LLM
from pipeline.params import BaseParams, LLMParams


def load_llm(params: LLMParams, base: BaseParams) -> LLM:
    """The LLM named by `params`: in-process (`transformers`, on the device and threads of
    `params`/`base`) or behind OpenAI-compatible servers (`openai`).

    Raises:
        pipeline.llm.base.LLMError: the model or a server cannot be found or loaded.
    """
    if params.backend == "openai":
        from pipeline.llm.openai_backend import load_server_llm

        return load_server_llm(params)
    from pipeline.llm.transformers_backend import load_transformers_llm

    return load_transformers_llm(params, base)
