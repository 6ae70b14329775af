"""A Jinja prompt file under prompts/: its macros and data, and the hash that keys the LLM cache.

Generation (`prompts/generate.jinja`) and scoring (`prompts/score.jinja`) load theirs the same way:
undefined names are errors, and the hash of the source goes into `prompt_hash` and every cache key,
so editing a prompt recomputes what it produced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


class PromptFile:
    """The template's module (`self._module`: its macros and top-level `set` values), its source and hash."""

    def __init__(self, path: str | Path):
        import jinja2

        self.path = Path(path)
        self.source = self.path.read_text(encoding="utf-8")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self._module = env.from_string(self.source).module
        self.hash = hashlib.sha256(self.source.encode()).hexdigest()[:16]
