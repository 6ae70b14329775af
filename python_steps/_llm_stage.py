"""What the LLM stages (`queries`, `llm_scores`, `judge`) share: params, the LLM, the clock, and
errors reported as one `stage: message` line for DVC's log instead of a traceback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.params import load_stage_params

if TYPE_CHECKING:
    from pipeline.llm import LLM


class LLMStage:
    """One run of an LLM stage.

    Attributes:
        params: the whole params file, checked (a bad file has already ended the process).
        load_seconds: from the start to the end of `load_llm` (params included).
    """

    def __init__(self, name: str):
        self.name = name
        self.started = time.perf_counter()
        self.params = load_stage_params(name)
        self.load_seconds = 0.0

    def load_llm(self) -> LLM:
        """The LLM `llm` params name; one that cannot load ends the process with `stage: message`."""
        from pipeline.llm import LLMError, load_llm  # torch: only once params are valid

        with self.exits_on(LLMError):
            llm = load_llm(self.params.llm, self.params.base)
        self.load_seconds = time.perf_counter() - self.started
        return llm

    @contextmanager
    def exits_on(self, *errors: type[Exception]) -> Iterator[None]:
        """Inside: any of `errors` ends the process with `stage: message`."""
        try:
            yield
        except errors as err:
            raise SystemExit(f"{self.name}: {err}") from None

    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return time.perf_counter() - self.started
