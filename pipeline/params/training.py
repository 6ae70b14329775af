"""Section `train`: contrastive fine-tuning, the labelled sources mixed in, dev sets for model selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.params.base import SAMPLE_TASK, Section, sources_as_list, under_root
from pipeline.params.evaluation import EvalSetParams, RetrievalSetParams


class MixParams(Section):
    """One labelled source mixed into the training batches, as Gecko mixes human-labelled data into FRet."""

    path: Path = Field(description="The source: a TSV file (pairs, classification) or a BEIR folder (retrieval).")
    kind: Literal["pairs", "classification", "retrieval"] = Field(
        "pairs",
        description="pairs: a TSV with header sentence1, sentence2, score (the STS Benchmark layout); the pairs "
        "scoring at least min_score are positives, in both directions. classification: a TSV with header `text "
        "label` (Banking77's layout); each text is a query, another text of its label the positive, a text of "
        "another label the hard negative (seeded). Both TSVs are read unquoted. retrieval: a BEIR folder "
        "(corpus.jsonl, queries.jsonl, qrels/<split>.tsv); each judged query with task is a query, each document "
        "judged relevant (score > 0) a positive formatted as a passage.",
    )
    min_score: float = Field(
        4.0, description="pairs: the pairs scoring at least this are positives (STS Benchmark scores run 0 to 5)."
    )
    split: str = Field("train", description="retrieval: the qrels file read, qrels/<split>.tsv; never a test split.")
    fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of all training examples drawn from this source (a pair gives both directions); "
        "the shares of several sources add up and must stay below 1.",
    )
    task: str = Field(
        "Retrieve semantically similar text", min_length=1, description="The query-side task description."
    )
    symmetric: bool = Field(
        True,
        description="pairs, classification: true formats both sides as queries with task (Gecko's symmetric "
        "format, as evaluate formats STS pairs and classification texts); false formats the other side as a passage.",
    )
    raw: bool = Field(
        False,
        description="true: both sides raw texts, no task and no template (overrides symmetric): what evaluate "
        "reads for a category that eval.prefixes scores raw.",
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="classification, retrieval: leave out the texts (queries) whose content hash falls in this "
        "share: the dev set of an eval set on the same file or split with the same holdout.",
    )
    hard_negative: bool = Field(
        False,
        description="retrieval: give each query the starting encoder's best-ranked non-relevant document of the "
        "folder's corpus as its hard negative (mined as neighbors mines, through the same embedding cache); "
        "false: the batch's other passages are its only negatives.",
    )

    @model_validator(mode="after")
    def _options_of_kind(self, info: ValidationInfo) -> "MixParams":
        # Another kind's option is an error only when it says something: a source dumped with every
        # default written out (fret_training.json) must validate again.
        given = {f for f in self.model_fields_set if getattr(self, f) != type(self).model_fields[f].default}
        if self.kind == "pairs" and self.holdout > 0:
            raise ValueError("holdout applies to kind: classification or retrieval only")
        if self.kind != "pairs" and "min_score" in given:
            raise ValueError("min_score applies to kind: pairs only (labels and relevance judgments are not similarity scores)")
        if self.kind != "retrieval" and "split" in given:
            raise ValueError("split applies to kind: retrieval only (the other kinds read the file at path)")
        if self.kind != "retrieval" and self.hard_negative:
            raise ValueError("hard_negative applies to kind: retrieval only (classification draws its own negatives)")
        if self.kind == "retrieval":
            self._check_retrieval(given | ({"task"} & self.model_fields_set))
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


# The sample's labelled train claims outside a 0.5 holdout, each with the starting encoder's best-ranked
# non-relevant abstract as hard negative: the default mix.
SAMPLE_CLAIMS = MixParams(
    kind="retrieval", path=Path("data/sample"), split="train", holdout=0.5, fraction=0.8, hard_negative=True,
    task=SAMPLE_TASK,
)  # fmt: skip


class DevParams(Section):
    """Dev sets for model selection while training (`train.eval_every`): never a test split."""

    retrieval: dict[str, RetrievalSetParams] = Field(
        {},
        description="Name -> BEIR folder, as eval.retrieval (scored by nDCG@10), e.g. {scifact_dev: {path: "
        "data/sample, split: train, holdout: 0.5, task: Given a scientific claim, ...}}.",
    )
    sts: dict[str, EvalSetParams] = Field(
        {}, description="Name -> folder holding <split>.tsv, as eval.sts (scored by the cosines' Spearman)."
    )

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

    lr: float = Field(2e-5, gt=0, description="AdamW's peak learning rate (in YAML write the dot: 2.0e-5).")
    temperature: float = Field(
        0.05, gt=0, description="Softmax over cosine / temperature; 0.05 is sentence-transformers' scale 20."
    )
    batch_size: int = Field(
        32,
        ge=2,
        description="Examples per step; each one's in-batch negatives are the other examples' positives, "
        "negatives and queries.",
    )
    epochs: int = Field(3, ge=1, description="Passes over the training examples (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Set: exactly this many steps, epochs ignored.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's; biases and LayerNorm weights are not decayed.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping's norm; null: no clipping.")
    attention_dropout: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the attention probabilities while training; null: the model's (MiniLM: 0.1). "
        "0 keeps PyTorch's fused SDPA path: on CPU a non-zero value makes training much slower, for no measured "
        "gain in quality (docs/levers.md). The other dropouts stay the model's.",
    )
    mrl_dims: list[int] = Field(
        [384, 256, 128, 64],
        description="Matryoshka: the loss is averaged over these leading sub-dimensions, largest first (the "
        "model's full dimension always among them); []: the full dimension only.",
    )
    mix: list[MixParams] = Field(
        [SAMPLE_CLAIMS],
        description="Labelled sources mixed into the batches (Gecko mixes human-labelled data into FRet): one "
        "mapping, a list of them, or null (generated triples only), e.g. [{path: data/eval/stsb/train.tsv, "
        "fraction: 0.1}, {path: data/eval/banking77/train.tsv, kind: classification, fraction: 0.1, holdout: "
        "0.2, task: Given a online banking query, find the corresponding intents}]. A holdout keeps a share out "
        "for the eval set (eval.classification, eval.retrieval, train.dev.retrieval) with the same file or "
        "split and holdout. By default the sample's labelled train claims outside a 0.5 holdout "
        "(eval.retrieval.scifact_sample_dev scores the other half).",
    )
    symmetric_task_types: list[str] = Field(
        ["sentence similarity"],
        description="Task types (generate.task_types) whose positive and negative are formatted like the query, "
        "with its task (Gecko's symmetric format); []: every passage is formatted as a passage.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Autocast while training (weights, optimizer and loss stay float32). auto: bfloat16 on a GPU "
        "or CPU that computes it natively (CUDA, AVX512-BF16, AMX), else float32.",
    )
    group_by_length: bool = Field(
        False,
        description="true: batches of similar token length (less padding), drawn from seeded windows of 16 "
        "batches. Copies of a query then share a batch, where one copy's positive is a false negative the mask "
        "does not catch. Either way base.seed fixes the batches.",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Data-parallel processes (one per GPU; on CPU they share the cores). Above 1 the stage "
        "relaunches itself under torchrun; the global batch stays batch_size.",
    )
    output: Path = Field(
        Path("models/fret-encoder"),
        description="The trained model: a sentence-transformers folder (with fret_training.json and a model card).",
    )
    distill_weight: float = Field(
        0.0,
        ge=0,
        description="Above 0: soft-label distillation (GPL / UPR style), the loss adds distill_weight x "
        "KL(teacher || student) over each query's LLM-scored candidates (table distill_candidates); 0: the "
        "contrastive loss alone.",
    )
    distill_score: Literal["ql_sum", "ql_mean", "fused"] = Field(
        "ql_sum",
        description="The teacher: ql_sum = log P(query | passage), whose softmax over the candidates is the LLM's "
        "posterior over them (uniform prior) at distill_temperature 1; ql_mean: the same per query token; fused: "
        "the log of the fused score R (every signal select.weights fuses: knn, bm25, ql, rc), so the teacher's "
        "probabilities are proportional to R at distill_temperature 1 (RRF scores are close together: a "
        "temperature near 0.05 sharpens them).",
    )
    distill_temperature: float = Field(
        1.0,
        gt=0,
        description="Teacher logits = teacher score / distill_temperature (the student's: cosine / temperature).",
    )
    distill_candidates: int = Field(
        4, ge=2, description="Candidates per query in the KL; the positive and hard negative always among them."
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Model selection: score train.dev every N steps (and at step 0 and the end) and save the best "
        "step's weights; null: the last step's weights are saved.",
    )
    checkpoint_every: int | None = Field(
        50,
        ge=1,
        description="Crash recovery: save model, optimizer, RNG and data position every N steps under "
        ".fret/checkpoints/train/ (outside the DVC outs); a re-run with the same params, seed and data continues "
        "there and ends with the uninterrupted run's weights. null: off.",
    )
    dev: DevParams = DevParams()
    control: bool = Field(
        True,
        description="The control: after the model, train a second one on the train.mix examples alone (the very "
        "examples the model mixed in, same settings and seed: the recipe without the LLM's data) and save it at "
        "control_output; evaluate scores it beside base and trained, with paired bootstrap intervals. Without "
        "train.mix there is nothing to train it on: control_output then holds only fret_control.json saying so.",
    )
    control_output: Path = Field(Path("models/fret-control"), description="The control model's folder.")

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
