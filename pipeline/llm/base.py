"""What an LLM backend implements, and the types every backend and every LLM step share.

A backend is one module (`transformers_backend.py` in-process, `openai_backend.py` for a server)
with a loader that returns an `LLM`; its `scorer(...)` returns that backend's `Scorer`.
Generation (`generate.py`) and scoring (`scoring.py`) see only these protocols, so a new backend
touches its own module, plus one line in `backends.load_llm` and the `llm.backend` choices.

No heavy import here: `pipeline.llm` is imported by stages before params are checked.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pydantic import BaseModel

# Between JSON tokens: at most one space. The default lets a small model pad with newlines for ever.
JSON_WHITESPACE = r"[ ]?"
QL, RC = "ql", "rc"  # the two scoring methods: query likelihood, relevance classification


class LLMError(RuntimeError):
    """The model cannot be found, converted or loaded."""


class ScoringError(RuntimeError):
    """A prompt or tokenizer that cannot give a score (no query tokens, no single-token yes/no)."""


@dataclass(frozen=True)
class Decoding:
    """Decoding for one row: temperature 0 is greedy; otherwise sampled from a generator seeded by `seed`."""

    seed: int
    temperature: float = 0.0


@dataclass(frozen=True)
class Completion:
    text: str  # the generated text, special tokens removed
    new_tokens: int  # tokens generated, the end-of-sequence token excluded
    finished: bool  # True: ended where the schema allows; False: cut at max_new_tokens (or stopped)
    stopped: bool = False  # True: ended early because `stop` said so (generate_json)


@dataclass(frozen=True)
class ScoreRequest:
    """One prompt to score: a (query, passage) pair and one method."""

    query_id: str
    passage_id: str
    knn_rank: int
    method: str  # QL or RC
    prompt: str
    target_start: int  # QL: character offset of the query in `prompt`; RC: len(prompt)
    key: str  # cache key


class JsonLLM(Protocol):
    """What generation needs from an LLM (every backend's LLM is one; tests script it)."""

    identity: str

    def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...

    def generate_json(
        self,
        prompts: list[str],
        schema: type["BaseModel"],
        decodings: list[Decoding],
        max_new_tokens: int,
        retry: Callable[[int, Completion], Decoding | None] | None = None,
        stop: Callable[[int, str], bool] | None = None,
    ) -> list[Completion]:
        """For each prompt, text held to `schema`'s JSON, all prompts in one batch.

        `retry(i, completion)` is called when row `i` ends an attempt; a `Decoding` it returns
        starts a new attempt of that row, None keeps it. The result is each row's last attempt.
        `stop(i, text)` may be called with row `i`'s text so far while it decodes; True ends the
        attempt there (`Completion.stopped`), which then goes to `retry` like any other. A backend
        that cannot watch a row decode (a server) never calls it: the caller validates the output.
        A row's output depends on its prompt and its `Decoding` only, not on the rest of the batch."""
        ...


class Scorer(Protocol):
    """QL and RC scores of `ScoreRequest`s, as `scoring.score_relevance` drives them.

    Attributes:
        shares_prefixes: True: `score_group` gets prompts that share a prefix worth computing once
            (one passage's, or the pool of passages with few prompts); False: every missing prompt at once.
        forward_rows: prompts scored so far; forward_tokens / prompt_tokens: tokens run / held.
    """

    shares_prefixes: bool
    forward_rows: int
    forward_tokens: int
    prompt_tokens: int

    def tokenize(self, requests: Sequence[ScoreRequest]) -> list[Any]:
        """One row per request, in the backend's own form, ready for `score_group`."""
        ...

    def score_group(
        self, rows: Sequence[Any], batch_size: int, skip: Container[str] = ()
    ) -> Iterator[dict[str, dict[str, float]]]:
        """Scores of the rows whose key is not in `skip`, as {cache key: value} per batch of about
        `batch_size` (the caller caches each batch as it comes). QL values hold sum, mean and
        tokens; RC values logodds, log_p_yes and log_p_no."""
        ...


class LLM(JsonLLM, Protocol):
    """What the LLM steps use: generation, the tokenizer prompts are built and cut with, scoring.

    Attributes:
        identity: who answers (model, weights hash, dtype or server), in every cache key and row.
        tokenizer: a Hugging Face tokenizer (prompts, passage clipping, token counts).
        device: where the model runs (`device.type` is printed by the stages).
    """

    tokenizer: Any
    device: Any

    def scorer(self, yes_words: Sequence[str], no_words: Sequence[str]) -> Scorer:
        """This backend's scorer, reading RC's answer as the spellings of `yes_words` / `no_words`."""
        ...


class ChatPrompts:
    """Prompt text from chat messages with the tokenizer's template; shared by the backends."""

    tokenizer: Any

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat `messages`: the tokenizer's chat template with the assistant turn
        opened, or, for a model without one, the contents joined by blank lines."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; a chat-templated prompt already holds its special tokens."""
        return self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"]


def answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """Token ids of the single-token spellings of `words`, each with and without a leading space."""
    ids = set()
    for word in words:
        for spelling in (word, " " + word):
            tokens = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(tokens) == 1:
                ids.add(tokens[0])
    return sorted(ids)
