"""Section `select`: the fusion of the rankings and Gecko's positive and hard-negative selection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from pipeline.params.base import ParamsError, Section


class FusionWeights(Section):
    """Weights of the rankings fused by sql/fused_ranks.sql: R = sum of w / (k + rank).

    Kept to the millionth (rounded here), so SQL computes R as an exact fraction over integers.
    """

    ql: float = Field(1.0, ge=0, allow_inf_nan=False, description="Query likelihood: log P(query | passage).")
    rc: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Relevance classification: P(relevant | query, passage)."
    )
    knn: float = Field(0.0, ge=0, allow_inf_nan=False, description="The encoder's own cosine order (neighbors).")
    bm25: float = Field(0.0, ge=0, allow_inf_nan=False, description="BM25's order (neighbors: bm25_rank).")

    @field_validator("ql", "rc", "knn", "bm25")
    @classmethod
    def _to_the_millionth(cls, value: float) -> float:
        return round(value, 6)

    @model_validator(mode="after")
    def _not_all_zero(self) -> "FusionWeights":
        if not (self.ql or self.rc or self.knn or self.bm25):
            raise ValueError("at least one of ql, rc, knn, bm25 must be above 0 (weights count to the millionth)")
        return self

    @classmethod
    def parse(cls, value: Any) -> "FusionWeights":
        """Validate a `{ql, rc, knn, bm25}` mapping; ValueError with one line per problem."""
        try:
            return cls.model_validate(value)
        except ValidationError as err:
            problems = (f"{'.'.join(map(str, e['loc']))}: {e['msg']}".removeprefix(": ") for e in err.errors())
            raise ValueError("; ".join(p.replace("Value error, ", "") for p in problems)) from None


class SelectParams(Section):
    """SQL stage `triples` (sql/*.sql): Gecko's positive and hard-negative selection.

    The negative options keep the names and meanings of sentence-transformers' `mine_hard_negatives`.
    """

    rrf_k: int = Field(
        0,
        ge=0,
        description="k of the fusion R = w_ql/(k + r_QL) + w_rc/(k + r_RC) + w_knn/(k + r_knn). Gecko uses 0; "
        "classic RRF uses 60, which flattens the top.",
    )  # an integer keeps R an exact fraction, so equal sums are true ties
    weights: Annotated[
        Annotated[FusionWeights, Tag("<numbers>")] | Annotated[Literal["judge"], Tag("<judge>")],
        Discriminator(lambda v: "<judge>" if v == "judge" else "<numbers>"),
    ] = Field(
        FusionWeights(),
        description="The rankings' weights in the fusion, {ql, rc, knn, bm25} (Gecko's: {ql: 1, rc: 1, knn: 0}; "
        "bm25 is fret's lexical teacher); a ranking of weight 0 is not read, so score.methods may skip it (knn "
        "and bm25 alone need no LLM scores: score.methods []). judge: the judge stage's best_weights "
        "(read from judge.metrics_path; run that stage first).",
    )
    positive: Literal["fused", "seed"] = Field(
        "fused",
        description="fused: the top passage after fusion (Gecko's p1); seed: the passage the query was generated "
        "from (the paper's p_seed ablation).",
    )
    negative: Literal["lowest", "random", "range"] = Field(
        "lowest",
        description="lowest: the bottom of the fused ranking (Gecko's p_N); random: a draw from the other "
        "candidates, seeded by base.seed; range: the best-ranked candidates inside (range_min, range_max], "
        "the hardest eligible ones.",
    )
    num_negatives: int = Field(1, ge=1, description="Hard negatives per query.")
    range_min: int = Field(
        0, ge=0, description="range: skip the range_min best fused ranks (the positive's among them)."
    )
    range_max: int | None = Field(
        None, ge=1, description="range: look no deeper than this fused rank; null: to the end of the list."
    )
    relative_margin: float | None = Field(
        0.05,
        ge=0,
        lt=1,
        description="False-negative guard (NV-Retriever's TopK-PercPos, as in sentence-transformers): drop a "
        "candidate whose encoder score is above (1 - relative_margin) x the positive's; 0.05 (95 %) is "
        "NV-Retriever's best setting. It binds hard when the positive is a passage the encoder ranks low: "
        "selection_report counts the queries it leaves without a negative (queries_all_above_relative_margin). "
        "null: off.",
    )
    max_negative_rc_logodds: float | None = Field(
        None,
        description="Drop a candidate the LLM itself rates relevant, RC log-odds above this. null: off, as "
        "log-odds are not calibrated across LLMs and a small one says yes to most pairs.",
    )
    keep_without_negative: bool = Field(
        False,
        description="A query left without a negative: true keeps it (negative columns null; it still trains "
        "against the in-batch negatives), false drops it, so every triples row is a full triple (either way "
        "counted in selection_report).",
    )
    # The query filters below live in sql/query_filters.sql; a query they drop gets no positive.
    round_trip_top_k: int | None = Field(
        None,
        ge=1,
        description="Round-trip filter (Promptagator): keep a query only if the encoder ranks its seed passage "
        "in this top k; a seed outside the mined top N fails, so values above neighbors.top_n act as top_n. "
        "null: off.",
    )
    max_copy_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Drop a query sharing more than this share of its words (lowercased runs of letters and "
        "digits) with its seed passage's text: a copied query teaches the encoder string matching. null: off.",
    )
    min_query_words: int | None = Field(None, ge=1, description="Drop queries of fewer words than this; null: off.")
    max_query_words: int | None = Field(None, ge=1, description="Drop queries of more words than this; null: off.")
    drop_duplicate_queries: bool = Field(
        False,
        description="true: keep only the first (smallest query_id) of queries equal once lowercased, stripped "
        "of punctuation and whitespace-collapsed; a query another filter drops does not count as first.",
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _numbers_or_judge(cls, value: Any) -> Any:
        # One message naming the problem, instead of pydantic's one per member of the union. A mapping
        # goes on to the tagged union, so a bad weight is reported at its own key (select.weights.ql).
        if value == "judge" or isinstance(value, (dict, FusionWeights)):
            return value
        raise ValueError(f"expected a mapping {{ql, rc, knn}} of weights or 'judge', got {value!r}")

    @model_validator(mode="after")
    def _range_not_empty(self) -> "SelectParams":
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must exceed range_min ({self.range_min}): "
                "the window is the fused ranks range_min+1 .. range_max"
            )
        if None not in (self.min_query_words, self.max_query_words) and self.max_query_words < self.min_query_words:
            raise ValueError(
                f"max_query_words ({self.max_query_words}) must not be below min_query_words ({self.min_query_words})"
            )
        return self

    def fusion_weights(self, judge_metrics: Path) -> FusionWeights:
        """`weights` as numbers: as written, or when `judge` the `best_weights` of `judge_metrics`
        (the judge stage's JSON, `judge.metrics_path`).

        Raises:
            ParamsError: `judge`, but the file is missing or unreadable, or its `best_weights` is
                not an object of ql, rc and knn weights.
        """
        if isinstance(self.weights, FusionWeights):
            return self.weights
        hint = "run the judge stage first (dvc repro judge) or give select.weights as numbers"
        problem = f"select.weights is 'judge' but {judge_metrics}"
        try:
            data = json.loads(Path(judge_metrics).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ParamsError(f"{problem} does not exist: {hint}") from None
        except (OSError, ValueError) as err:
            raise ParamsError(f"{problem} is not readable JSON ({err}): {hint}") from None
        best = data.get("best_weights") if isinstance(data, dict) else None
        # A judge file from before BM25 was a signal has no bm25 key: a missing weight is 0.
        if not isinstance(best, dict) or not best or not set(best) <= set(FusionWeights.model_fields):
            raise ParamsError(
                f"{problem} has no best_weights object with keys among ql, rc, knn, bm25 (got {best!r}): {hint}"
            )
        best = {name: best.get(name, 0.0) for name in FusionWeights.model_fields}
        try:
            return FusionWeights.parse(best)
        except ValueError as err:
            raise ParamsError(f"{problem}: best_weights is not usable: {err}") from None
