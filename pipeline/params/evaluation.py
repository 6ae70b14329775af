"""Section `eval` and the eval sets it names (also read by `train.dev`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, ValidationInfo, model_validator

from pipeline.params.base import SAMPLE_TASK, Section


class EvalSetParams(Section):
    """One local eval set: a BEIR folder (retrieval) or a folder holding `<split>.tsv` (STS)."""

    path: Path = Field(description="The set's folder (relative paths: from the params file's folder).")
    split: str = Field("test", description="The split scored: qrels/<split>.tsv (retrieval), else <split>.tsv.")
    task: str = Field(
        min_length=1, description="The query-side task description in the Gecko format (`task: {task} | query: ...`)."
    )


class RetrievalSetParams(EvalSetParams):
    """A BEIR folder scored by nDCG@10 on the queries judged in `qrels/<split>.tsv`."""

    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Above 0: only the queries whose text hash falls in this share are scored: the dev set cut "
        "out of a split that a train.mix retrieval source with the same holdout trains on (the rest of it).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_plain_set(cls, data: Any) -> Any:
        # A plain EvalSetParams built in code (as before holdout existed) is a retrieval set without one.
        if isinstance(data, EvalSetParams) and not isinstance(data, cls):
            return data.model_dump()
        return data


class ClassificationSetParams(EvalSetParams):
    """A labelled set (TSV, header `text label`): `<path>/<split>.tsv` is scored, `<path>/train.tsv`
    is the pool the logistic regression's training sample is drawn from (MTEB's protocol)."""

    samples_per_label: int = Field(8, ge=1, description="Training texts per label in each experiment (MTEB: 8).")
    n_experiments: int = Field(
        10, ge=1, description="Seeded training samples, each a fresh classifier; the score is their mean (MTEB: 10)."
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Above 0: a dev set cut from train.tsv (split must be train): the texts whose content hash "
        "falls in this share are scored, the rest are the pool. The same share on a train.mix classification "
        "source leaves exactly these texts out of training, so train and dev stay disjoint.",
    )

    @model_validator(mode="after")
    def _holdout_only_on_train(self) -> "ClassificationSetParams":
        if self.holdout > 0 and self.split != "train":
            raise ValueError(f"holdout cuts a dev set out of train.tsv: set split: train (got {self.split!r})")
        if self.holdout == 0 and self.split == "train":
            raise ValueError("split: train scores the classifier's own pool: set holdout (e.g. 0.2) for a dev set")
        return self


class ClusteringSetParams(EvalSetParams):
    """A labelled set (TSV `<path>/<split>.tsv`, header `text label`) clustered as MTEB does."""

    n_subsets: int = Field(
        10, ge=1, description="Seeded subsets of 1,000 to 10,000 texts (fewer when the set is smaller), each clustered."
    )


EVAL_KINDS = ("retrieval", "sts", "classification", "clustering")


def _prefix_setting(value: Any) -> bool | dict[str, bool]:
    """`eval.prefixes` / `eval.base_prefixes`: a bool, or a mapping of eval category to bool.

    One plain validator instead of a Union type, so a bad value is reported at the key itself
    (with its line), not at a union member's name.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, dict):
        unknown = [k for k in value if k not in EVAL_KINDS]
        if unknown:
            raise ValueError(f"unknown eval category {unknown[0]!r} (categories: {', '.join(EVAL_KINDS)})")
        not_bool = [k for k, v in value.items() if not isinstance(v, bool)]
        if not_bool:
            raise ValueError(f"{not_bool[0]}: expected true or false, got {value[not_bool[0]]!r}")
        return dict(value)
    raise ValueError(f"expected true, false or a mapping of eval category to true/false, got {value!r}")


PrefixSetting = Annotated[bool | dict[str, bool], PlainValidator(_prefix_setting)]


class EvalParams(Section):
    """Stage `evaluate`: mteb on local eval sets, the base encoder and the trained one -> metrics/eval.json (which
    also holds each model's `versatility`: the mean main metric per category, and their mean)."""

    # Every category: set name -> set; the names become the task keys in metrics/eval.json.
    retrieval: dict[str, RetrievalSetParams] = Field(
        {
            # The dev set: the sample's train claims that the default train.mix leaves out (same split and holdout).
            "scifact_sample_dev": RetrievalSetParams(
                path=Path("data/sample"), split="train", holdout=0.5, task=SAMPLE_TASK
            ),
            "scifact_sample": RetrievalSetParams(path=Path("data/sample"), task=SAMPLE_TASK),
        },
        description="Name -> BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), scored by nDCG@10.",
    )
    sts: dict[str, EvalSetParams] = Field(
        {},
        description="Name -> folder holding <split>.tsv (sentence1, sentence2, score 0-5), scored by the cosines' "
        "Spearman correlation, e.g. {stsb: {path: data/eval/stsb, task: Retrieve semantically similar text}}.",
    )
    classification: dict[str, ClassificationSetParams] = Field(
        {},
        description="Name -> folder holding <split>.tsv and train.tsv (`text label`), MTEB's protocol: a logistic "
        "regression on samples_per_label train texts per label, n_experiments times, e.g. {banking77: {path: "
        "data/eval/banking77, task: Given a online banking query, find the corresponding intents}}; a dev set: "
        "{split: train, holdout: 0.2} scores the held-out texts of train.tsv (the same holdout as the train.mix "
        "source's).",
    )
    clustering: dict[str, ClusteringSetParams] = Field(
        {},
        description="Name -> folder holding <split>.tsv (`text label`): MiniBatchKMeans on n_subsets seeded "
        "subsets, scored by V-measure, e.g. {twentynewsgroups: {path: data/eval/twentynewsgroups, task: Identify "
        "the topic or theme of the given news articles}}.",
    )
    prefixes: PrefixSetting = Field(
        False,
        description="The trained model (train.output, scored when the folder exists; and train.dev): true reads "
        "the Gecko format (encoder.*_template), false raw texts; or one value per category, e.g. {retrieval: "
        "true, sts: false} (a category left out: true). It trains in the Gecko format, yet scored best on raw "
        "texts on every dev split measured (docs/levers.md).",
    )
    base_prefixes: PrefixSetting = Field(
        False,
        description="The base model, as prefixes: false reads raw texts, as MTEB's leaderboard runs it (its best "
        "score: it never saw the Gecko format).",
    )
    metrics_path: Path = Field(Path("metrics/eval.json"), description="The scores, per model and set (a DVC metric).")
    plot_path: Path = Field(Path("metrics/eval_plot.json"), description="The same scores as rows for `dvc plots`.")

    def uses_prefixes(self, kind: str, model: Literal["trained", "base"] = "trained") -> bool:
        """Whether `model` sees the Gecko format on eval sets of category `kind` (EVAL_KINDS)."""
        setting = self.prefixes if model == "trained" else self.base_prefixes
        return setting if isinstance(setting, bool) else setting.get(kind, True)

    @model_validator(mode="after")
    def _sets_named_and_present(self, info: ValidationInfo) -> "EvalParams":
        names = [name for kind in EVAL_KINDS for name in getattr(self, kind)]
        bad = [n for n in names if not n.replace("_", "").isalnum() or not n[:1].isalpha() or n != n.lower()]
        if bad:
            raise ValueError(f"eval set names must be lowercase letters, digits and _: {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique across {', '.join(EVAL_KINDS)}: {names}")
        if "versatility" in names:  # metrics/eval.json keeps the per-category means under that key
            raise ValueError("'versatility' is reserved (the per-category means in metrics): rename that eval set")
        if not names:
            raise ValueError(f"no eval sets: give at least one under {', '.join(EVAL_KINDS)}")
        root = (info.context or {}).get("root")
        if root is not None:
            needed = [(n, s.path / "qrels" / f"{s.split}.tsv") for n, s in self.retrieval.items()]
            needed += [(n, s.path / f"{s.split}.tsv") for n, s in (self.sts | self.classification | self.clustering).items()]
            needed += [(n, s.path / "train.tsv") for n, s in self.classification.items()]
            for name, rel in needed:
                full = rel if rel.is_absolute() else Path(root) / rel
                if not full.is_file():
                    raise ValueError(f"eval set {name!r}: file not found: {full}")
        return self
