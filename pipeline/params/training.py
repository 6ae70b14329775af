"""Section `train`: contrastive fine-tuning, the labelled sources mixed in, dev sets for model selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import Section, sources_as_list, under_root
from pipeline.params.evaluation import EvalSetParams, RetrievalSetParams


class MixParams(Section):
    """One labelled source mixed into the training batches, as Gecko mixes human-labelled data into FRet.

    kind `pairs`: a TSV with header columns sentence1, sentence2, score (the STS Benchmark layout);
    pairs scoring at least `min_score` are positives, in both directions.
    kind `classification`: a TSV with header `text label` (Banking77's layout); each text is a query,
    another text of its label the positive, a text of another label the hard negative (seeded).
    Both are read unquoted.
    kind `retrieval`: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); each judged
    query with `task` is a query, each document judged relevant (score > 0) a positive formatted as
    a passage; with `hard_negative`, the starting encoder's best-ranked non-relevant document of the
    folder's corpus is the query's hard negative (else the batch's other passages are the negatives).
    """

    path: Path
    kind: Literal["pairs", "classification", "retrieval"] = "pairs"
    min_score: float = 4.0  # pairs: pairs scoring at least this are positives (STSB scores run 0 to 5)
    # retrieval: the qrels file read (qrels/<split>.tsv); never a test split.
    split: str = "train"
    # Share of all training examples drawn from this source (a pair gives both directions); with
    # several sources the shares add up and must stay below 1.
    fraction: float = Field(0.1, gt=0, lt=1)
    task: str = Field("Retrieve semantically similar text", min_length=1)  # query-side task text
    # Gecko's symmetric format: both sides formatted as queries with `task` (as evaluate formats STS
    # pairs and classification texts); false: the other sides are formatted as passages.
    symmetric: bool = True
    # true: both sides raw texts, no task and no template (overrides `symmetric`): what evaluate reads
    # for a category that `eval.prefixes` scores raw (by default every category).
    raw: bool = False
    # classification, retrieval: leave out the texts (queries) whose content hash falls in this share:
    # the dev set of an eval set on the same file or split with the same holdout (never the test split).
    holdout: float = Field(0.0, ge=0, lt=1)
    # retrieval: mine each query a hard negative with the starting encoder (encoder.*, as neighbors
    # mines; its embedding cache serves both): the document it ranks first among the non-relevant.
    hard_negative: bool = False

    @model_validator(mode="after")
    def _options_of_kind(self, info: ValidationInfo) -> "MixParams":
        given = self.model_fields_set
        if self.kind == "pairs" and self.holdout > 0:
            raise ValueError("holdout applies to kind: classification or retrieval only")
        if self.kind != "pairs" and "min_score" in given:
            raise ValueError("min_score applies to kind: pairs only (labels and relevance judgments are not similarity scores)")
        if self.kind != "retrieval" and "split" in given:
            raise ValueError("split applies to kind: retrieval only (the other kinds read the file at path)")
        if self.kind != "retrieval" and self.hard_negative:
            raise ValueError("hard_negative applies to kind: retrieval only (classification draws its own negatives)")
        if self.kind == "retrieval":
            self._check_retrieval(given)
        full = under_root(self.path, info)
        if full is not None:
            needed = full / "qrels" / f"{self.split}.tsv" if self.kind == "retrieval" else full
            if not needed.is_file():
                raise ValueError(f"mix file not found: {needed}")
        return self

    def _check_retrieval(self, given: set[str]) -> None:
        if "task" not in given:
            raise ValueError("kind: retrieval needs task: the query-side instruction its set is evaluated with")
        if "symmetric" in given:
            raise ValueError("symmetric applies to kinds pairs and classification (retrieval positives are passages)")
        if self.split.lower().startswith("test"):
            raise ValueError(f"split {self.split!r}: training on a test split's queries would void its scores")


class DevParams(Section):
    """Dev sets for model selection while training (`train.eval_every`): never a test split."""

    retrieval: dict[str, RetrievalSetParams] = {}  # name -> BEIR folder; scored by nDCG@10
    sts: dict[str, EvalSetParams] = {}  # name -> folder holding <split>.tsv; scored by cosine Spearman

    @model_validator(mode="after")
    def _dev_splits_only(self, info: ValidationInfo) -> "DevParams":
        # Choosing the step by a test split would report a score tuned on the test set.
        for kind, sets in (("retrieval", self.retrieval), ("sts", self.sts)):
            for name, dev_set in sets.items():
                if dev_set.split.lower().startswith("test"):
                    raise ValueError(
                        f"train.dev.{kind}.{name}.split is {dev_set.split!r}: model selection must not see a "
                        "test split; use a dev or train split (e.g. qrels/train.tsv, split: train)"
                    )
        names = list(self.retrieval) + list(self.sts)
        if len(set(names)) != len(names):
            raise ValueError(f"dev set names must be unique across retrieval and sts: {names}")
        if "score" in names:  # dvclive's dev/score is the mean over the sets
            raise ValueError("'score' is reserved (dev/score is the mean over the sets): rename that dev set")
        root = (info.context or {}).get("root")
        needed = [(n, s.path / "qrels" / f"{s.split}.tsv") for n, s in self.retrieval.items()]
        needed += [(n, s.path / f"{s.split}.tsv") for n, s in self.sts.items()]
        for name, rel in needed if root is not None else []:
            full = rel if rel.is_absolute() else Path(root) / rel
            if not full.is_file():
                raise ValueError(f"dev set {name!r}: file not found: {full}")
        return self


class TrainParams(Section):
    """Stage `train`: contrastive fine-tuning of the encoder on `triples` with Gecko's loss."""

    lr: float = Field(2e-5, gt=0)
    temperature: float = Field(0.05, gt=0)  # cosine / temperature; 0.05 = sentence-transformers' scale 20
    batch_size: int = Field(32, ge=2)  # in-batch negatives need at least one other example
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # set: exactly this many steps, epochs ignored
    warmup_ratio: float = Field(0.1, ge=0, lt=1)  # share of the steps spent warming up linearly
    weight_decay: float = Field(0.01, ge=0)  # AdamW; biases and LayerNorm weights are not decayed
    max_grad_norm: float | None = Field(1.0, gt=0)  # null: no clipping
    # Dropout on the attention probabilities while training; null keeps the model's (MiniLM: 0.1).
    # 0 by default: on CPU a non-zero value sends every attention through PyTorch's unfused SDPA
    # path, and training ran 1.8x slower (bench/train.py side by side: 3.28 vs 5.96 examples/s) for
    # no measured quality (README, "Quality levers"). The other dropouts stay the model's.
    attention_dropout: float | None = Field(0.0, ge=0, lt=1)
    # Matryoshka: the loss is averaged over these leading sub-dimensions (strictly decreasing); the
    # model's full dimension is always included. [] trains the full dimension only.
    mrl_dims: list[int] = [384, 256, 128, 64]
    # Labelled sources mixed in: one mapping (the original form), a list of them, or null.
    mix: list[MixParams] = []
    # Task types (generate.task_types) whose positive and negative are formatted like the query, with
    # the same task (Gecko's symmetric format); [] formats every passage as a passage.
    symmetric_task_types: list[str] = ["sentence similarity"]
    # Autocast dtype while training (weights, optimizer and loss stay float32). auto: bfloat16 on a
    # GPU or CPU that computes it natively (CUDA bf16, AVX512-BF16, AMX), else float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Batches of similar token length (less padding), drawn from seeded random windows of 16 batches.
    # Off by default: copies of a query have equal lengths and so share a batch, where the positive
    # of one copy is a false negative for the other that the mask does not catch. Either way the
    # batches (hence the in-batch negatives) are fixed by base.seed.
    group_by_length: bool = False
    # Data-parallel processes (one per GPU; on CPU they share the cores). Above 1 the stage
    # relaunches itself under torchrun; the global batch is still batch_size.
    nproc_per_node: int = Field(1, ge=1)
    output: Path = Path("models/fret-encoder")  # sentence-transformers folder
    # Soft-label distillation (GPL / UPR style): the loss adds distill_weight x KL(teacher || student)
    # over `distill_candidates` of each query's LLM-scored candidates (table distill_candidates).
    # 0 = off: training is then exactly the contrastive one.
    distill_weight: float = Field(0.0, ge=0)
    # The teacher: ql_sum = log P(query | passage), whose softmax over the candidates is the LLM's
    # posterior over them (uniform prior) at distill_temperature 1; ql_mean = the same per query token.
    distill_score: Literal["ql_sum", "ql_mean"] = "ql_sum"
    distill_temperature: float = Field(1.0, gt=0)  # teacher logits = teacher_score / distill_temperature
    # Candidates per query in the KL (positive and hard negative always among them when scored).
    distill_candidates: int = Field(4, ge=2)
    # Model selection: score train.dev every eval_every steps (and at step 0 and the end) and save
    # the best step's weights. null = off: the last step's weights are saved.
    eval_every: int | None = Field(None, ge=1)
    # Crash recovery: save model, optimizer, RNG and data position every checkpoint_every steps under
    # .fret/checkpoints/train/ (outside the DVC outs); a re-run with the same params, seed and data
    # continues from there and ends with the uninterrupted run's weights. null = off.
    checkpoint_every: int | None = Field(50, ge=1)
    dev: DevParams = DevParams()

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_as_list(cls, value: Any) -> Any:
        return sources_as_list(value, "mix")

    @field_validator("mix")
    @classmethod
    def _mix_shares_below_one(cls, value: list[MixParams]) -> list[MixParams]:
        total = sum(source.fraction for source in value)
        if total >= 1:
            raise ValueError(f"the mix sources' fractions add up to {total:g}: they must leave room for the triples (< 1)")
        return value

    @field_validator("mrl_dims")
    @classmethod
    def _dims_decreasing(cls, value: list[int]) -> list[int]:
        if any(d < 1 for d in value):
            raise ValueError(f"dimensions must be positive: {value}")
        if any(a <= b for a, b in zip(value, value[1:])):
            raise ValueError(f"dimensions must be unique and sorted largest first: {value}")
        return value

    @model_validator(mode="after")
    def _distill_and_selection_usable(self) -> "TrainParams":
        if self.distill_weight > 0 and self.nproc_per_node > 1:
            raise ValueError("distill_weight > 0 trains in one process only: set nproc_per_node: 1")
        if self.eval_every is not None and not (self.dev.retrieval or self.dev.sts):
            raise ValueError("eval_every is set but train.dev names no dev set (retrieval or sts)")
        return self
