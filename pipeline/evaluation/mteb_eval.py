"""Evaluation the way MTEB measures it, on local files, offline.

Local eval sets become mteb tasks: a BEIR folder (`corpus.jsonl`, `queries.jsonl`,
`qrels/<split>.tsv`) a custom `AbsTaskRetrieval`, an STS TSV (`<folder>/<split>.tsv` with columns
`sentence1`, `sentence2`, `score`) a custom `AbsTaskSTS`, a labelled TSV (header `text label`) an
`AbsTaskClassification` (logistic regression on a few `train.tsv` texts per label) or an
`AbsTaskClusteringLegacy` (MiniBatchKMeans over seeded subsets). Files are parsed when the task is
built (by the readers of `pipeline.labelled`), so a bad row fails before any model loads, with the
file and line in the message.

fret's encoder (anything with `encode(texts, batch_size=...) -> float32 array`, unit length) is
handed to `mteb.evaluate` through `MtebEncoder`, which implements mteb's `EncoderProtocol` and
writes the Gecko unified format: `task: {task} | query: {query}` for queries and both sides of an
STS pair, `title: {title} | text: {text}` for documents. With prefixes off it passes exactly the
texts mteb gives a sentence-transformers model (title and text joined by a space), so plain
all-MiniLM-L6-v2 reproduces the published MTEB scores.

mteb and torch are imported inside the functions that need them (mteb takes seconds to import).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.evaluation.intervals import compare, retrieval_per_query, sts_per_pair
from pipeline.labelled import EvalDataError, held_out, read_beir, read_labelled, read_sts

if TYPE_CHECKING:
    from pipeline.retrieval.encoder import TextFormat

# Reported per task type; every name is a key of mteb's scores dict (f1 is macro F1).
RETRIEVAL_METRICS = ("ndcg_at_10", "recall_at_100", "map_at_100")
STS_METRICS = ("cosine_spearman",)
CLASSIFICATION_METRICS = ("accuracy", "f1")
CLUSTERING_METRICS = ("v_measure",)
# Eval category (params section) -> mteb task type, reported metrics, main metric.
MTEB_TYPE = {"retrieval": "Retrieval", "sts": "STS", "classification": "Classification", "clustering": "Clustering"}
METRICS = {"retrieval": RETRIEVAL_METRICS, "sts": STS_METRICS, "classification": CLASSIFICATION_METRICS, "clustering": CLUSTERING_METRICS}
MAIN_METRIC = {"retrieval": "ndcg_at_10", "sts": "cosine_spearman", "classification": "accuracy", "clustering": "v_measure"}
# metrics/eval.json key of the per-category means (a reserved eval set name).
VERSATILITY = "versatility"
# MTEB's seed for the classifier's training samples and the clustering subsets.
MTEB_SEED = 42
# MTEB's TwentyNewsgroupsClustering holds subsets of 1,000 to 10,000 titles; ours are drawn from the pool.
CLUSTER_SUBSET_SIZES = (1_000, 10_000)


class TextEncoder(Protocol):
    """What evaluation needs from an encoder: `pipeline.retrieval.encoder.Encoder` satisfies it."""

    def encode(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# Sampling eval sets (the readers are in pipeline/labelled.py)


def clustering_subsets(n: int, n_subsets: int, seed: int = MTEB_SEED) -> list[list[int]]:
    """Row indices of `n_subsets` seeded random subsets (no repeats within one), sized evenly from
    1,000 to 10,000 rows as MTEB's TwentyNewsgroupsClustering subsets are, capped at `n`."""
    low, high = (min(size, n) for size in CLUSTER_SUBSET_SIZES)
    sizes = np.linspace(low, high, n_subsets).round().astype(int)
    rng = np.random.RandomState(seed)
    return [rng.choice(n, size=int(size), replace=False).tolist() for size in sizes]


# --------------------------------------------------------------------------------------------
# mteb tasks over local data


def _metadata(name: str, kind: str, path: Path, split: str, task: str, description: str) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name,
        # Never downloaded: load_data below is overridden; the path is kept for the record.
        dataset={"path": str(path), "revision": "local"},
        description=description,
        type=MTEB_TYPE[kind],
        category="t2c" if kind in ("classification", "clustering") else "t2t",
        modalities=["text"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score=MAIN_METRIC[kind],
        # The query-side task description, where mteb keeps per-task prompts; MtebEncoder reads it.
        prompt={"query": task},
    )


def retrieval_task(name: str, folder: Path, split: str = "test", task: str = "", holdout: float = 0.0) -> Any:
    """An mteb `AbsTaskRetrieval` over a local BEIR folder (parsed now, errors name file and line).

    With `holdout` > 0 only the split's held-out queries are scored (`read_beir`).
    """
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    data = read_beir(Path(folder), split, holdout)
    source = f"BEIR folder {folder}, split {split}" + (f", held-out queries ({holdout:g})" if holdout > 0 else "")

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = _metadata(name, "retrieval", Path(folder), split, task, source)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            # mteb unloads data after each model; rebuilding the Datasets from memory is cheap.
            if self.data_loaded:
                return
            self.dataset = {
                "default": {
                    split: {
                        "corpus": Dataset.from_list(data.corpus),
                        "queries": Dataset.from_list(data.queries),
                        "relevant_docs": {q: dict(d) for q, d in data.qrels.items()},
                        "top_ranked": None,
                    }
                }
            }
            self.data_loaded = True

    return LocalRetrieval()


def sts_task(name: str, folder: Path, split: str = "test", task: str = "") -> Any:
    """An mteb `AbsTaskSTS` over `<folder>/<split>.tsv` (scores 0-5)."""
    from datasets import Dataset
    from mteb.abstasks.sts import AbsTaskSTS

    path = Path(folder) / f"{split}.tsv"
    data = read_sts(path)

    class LocalSTS(AbsTaskSTS):
        metadata = _metadata(name, "sts", path, split, task, f"STS pairs {path}")
        min_score = 0
        max_score = 5

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {
                split: Dataset.from_dict({"sentence1": data.sentence1, "sentence2": data.sentence2, "score": data.score})
            }
            self.data_loaded = True

    return LocalSTS()


def classification_task(
    name: str,
    folder: Path,
    split: str = "test",
    task: str = "",
    *,
    samples_per_label: int = 8,
    n_experiments: int = 10,
    holdout: float = 0.0,
) -> Any:
    """An mteb `AbsTaskClassification` over `<folder>/<split>.tsv`, its classifiers fitted on `<folder>/train.tsv`.

    MTEB's protocol: each of `n_experiments` draws `samples_per_label` texts per label from the
    shuffled train split (seed 42), fits LogisticRegression(max_iter=100) on their embeddings and
    scores the full eval split; accuracy and macro F1 are the means over the experiments.
    With `holdout` > 0 (and split "train") the eval split is the held-out share of train.tsv
    (`held_out`) and the classifiers draw from the rest: a dev set that never touches test.
    """
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from sklearn.linear_model import LogisticRegression

    folder = Path(folder)
    train_path = folder / "train.tsv"
    if holdout > 0:
        if split != "train":
            raise EvalDataError(f"{folder}: holdout cuts the dev set out of train.tsv: split must be 'train', got {split!r}")
        pool = read_labelled(train_path)
        dev = [held_out(text, holdout) for text in pool.texts]
        train, scored, eval_split = pool.select([not d for d in dev]), pool.select(dev), "heldout"
        if len(set(scored.labels)) < 2:
            raise EvalDataError(f"{train_path}: holdout {holdout:g} leaves fewer than 2 labels to score")
    elif split == "train":
        raise EvalDataError(f"{train_path}: scoring the classifier's own pool: set a holdout or another split")
    else:
        train, scored, eval_split = read_labelled(train_path), read_labelled(folder / f"{split}.tsv"), split
    source = train_path if holdout > 0 else folder / f"{split}.tsv"

    class LocalClassification(AbsTaskClassification):
        metadata = _metadata(name, "classification", source, eval_split, task, f"labelled texts {source}")
        evaluator_model = LogisticRegression(max_iter=100)  # random_state = the task's seed, set by mteb

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = DatasetDict(
                {
                    "train": Dataset.from_dict({"text": train.texts, "label": train.labels}),
                    eval_split: Dataset.from_dict({"text": scored.texts, "label": scored.labels}),
                }
            )
            self.data_loaded = True

    out = LocalClassification(seed=MTEB_SEED)
    out.samples_per_label, out.n_experiments = samples_per_label, n_experiments
    return out


def clustering_task(name: str, folder: Path, split: str = "test", task: str = "", *, n_subsets: int = 10) -> Any:
    """An mteb `AbsTaskClusteringLegacy` over `<folder>/<split>.tsv`: `n_subsets` seeded subsets
    (`clustering_subsets`), each clustered by MiniBatchKMeans into as many clusters as it has
    labels and scored by V-measure; the score is the mean over the subsets.

    The legacy task (MTEB's TwentyNewsgroupsClustering, whose published scores it reproduces),
    not v2's bootstrap over a 4% sample, which would keep only a few hundred texts of a pool.
    """
    from datasets import Dataset
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy

    path = Path(folder) / f"{split}.tsv"
    data = read_labelled(path)
    subsets = clustering_subsets(len(data.texts), n_subsets)

    class LocalClustering(AbsTaskClusteringLegacy):
        metadata = _metadata(name, "clustering", path, split, task, f"labelled texts {path}")

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {
                split: Dataset.from_dict(
                    {
                        "sentences": [[data.texts[i] for i in rows] for rows in subsets],
                        "labels": [[data.labels[i] for i in rows] for rows in subsets],
                    }
                )
            }
            self.data_loaded = True

    return LocalClustering(seed=MTEB_SEED)


# --------------------------------------------------------------------------------------------
# fret's encoder behind mteb's EncoderProtocol


def format_texts(
    batches: Iterable[dict[str, Any]],
    *,
    side: str,
    task: str,
    text_format: TextFormat | None,
) -> list[str]:
    """The strings the encoder sees for mteb's batches of one side.

    Args:
        batches: mteb DataLoader batches. Documents carry `text` (title and text joined by a
            space, as mteb gives sentence-transformers), `title` and `body` (the text alone).
        side: "document" for the corpus; anything else (queries, both STS sentences) is a query.
        task: the task description for the query side.
        text_format: Gecko templates; None means no prefixes (mteb's own texts, unchanged).
    """
    texts: list[str] = []
    for batch in batches:
        if text_format is None:
            texts.extend(batch["text"])
        elif side == "document":
            titles = batch.get("title") or [""] * len(batch["body"])
            texts.extend(text_format.passages(titles, batch["body"]))
        else:
            texts.extend(text_format.queries([task] * len(batch["text"]), batch["text"]))
    return texts


@dataclass
class MtebEncoder:
    """fret's encoder as an mteb `EncoderProtocol` model.

    Args:
        encoder: has `encode(texts, batch_size=...)` returning unit-length float32 rows.
        name: shown in mteb's results (`fret/<name>`).
        text_format: Gecko templates, or None for no prefixes.
        revision: e.g. the weights hash, for the record.
    """

    encoder: TextEncoder
    name: str
    text_format: TextFormat | None = None
    revision: str = "local"
    # Every text sent to the encoder, when a test wants to see them.
    seen: list[str] | None = field(default=None, repr=False)

    @property
    def mteb_model_meta(self) -> Any:
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        return ModelMeta.create_empty(
            overwrites={
                "name": f"fret/{self.name}",
                "revision": self.revision,
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"],
            }
        )

    def encode(
        self,
        inputs: Iterable[dict[str, Any]],
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Encode one side of a task; mteb passes a DataLoader of dict batches."""
        prompt = task_metadata.prompt if isinstance(task_metadata.prompt, dict) else {}
        side = getattr(prompt_type, "value", prompt_type) or "query"
        texts = format_texts(inputs, side=side, task=prompt.get("query", ""), text_format=self.text_format)
        if self.seen is not None:
            self.seen.extend(texts)
        vectors = self.encoder.encode(texts, batch_size=int(kwargs.get("batch_size", 32)))
        return np.asarray(vectors, dtype=np.float32)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)


@dataclass
class CachedEncoder:
    """An `Encoder` whose `encode` goes through the embedding cache.

    The base model's vectors for an eval set never change, so after the first run only the
    trained model (a new fingerprint) is embedded.
    """

    encoder: Any  # pipeline.retrieval.encoder.Encoder
    cache: Any  # pipeline.retrieval.embedding_cache.EmbeddingCache | None

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        from pipeline.retrieval.embedding_cache import encode_cached

        vectors, _ = encode_cached(self.encoder, texts, self.cache, batch_size=batch_size)
        return vectors


# --------------------------------------------------------------------------------------------
# Running and reporting


def build_tasks(eval_params: Any, root: Path) -> list[Any]:
    """The mteb tasks for the `eval` params section; relative paths are taken from `root`.

    Raises:
        EvalDataError: a file is missing or malformed (file and line in the message).
    """

    def full(path: Path) -> Path:
        return path if path.is_absolute() else root / path

    ev = eval_params
    tasks = [retrieval_task(name, full(s.path), s.split, s.task, s.holdout) for name, s in ev.retrieval.items()]
    tasks += [sts_task(name, full(s.path), s.split, s.task) for name, s in ev.sts.items()]
    tasks += [
        classification_task(
            name, full(s.path), s.split, s.task,
            samples_per_label=s.samples_per_label, n_experiments=s.n_experiments, holdout=s.holdout,
        )  # fmt: skip
        for name, s in ev.classification.items()
    ]
    tasks += [clustering_task(name, full(s.path), s.split, s.task, n_subsets=s.n_subsets) for name, s in ev.clustering.items()]
    return tasks


def task_category(task: Any) -> str:
    """The eval category (params section: retrieval, sts, classification, clustering) of an mteb task."""
    return next(kind for kind, mteb_type in MTEB_TYPE.items() if mteb_type == task.metadata.type)


def run_tasks(
    model: Any,
    tasks: Sequence[Any],
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate one model on tasks with `mteb.evaluate` (no result cache, nothing downloaded).

    Returns:
        {task name: {metric: score}} with the metrics of METRICS[category].
    """
    import mteb

    result = mteb.evaluate(
        model,
        list(tasks),
        cache=None,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress},
        show_progress_bar=show_progress,
        co2_tracker=False,
    )
    by_name = {task.metadata.name: task for task in tasks}
    out: dict[str, dict[str, float]] = {}
    for task_result in result.task_results:
        task = by_name[task_result.task_name]
        split = task.metadata.eval_splits[0]
        scores = task_result.scores[split][0]
        wanted = METRICS[task_category(task)]
        # mteb rounds retrieval scores to 5 places; the others too, so dvc shows one precision.
        out[task_result.task_name] = {metric: round(float(scores[metric]), 5) for metric in wanted}
    return out


def versatility(scores: dict[str, dict[str, float]], tasks: Sequence[Any]) -> dict[str, float]:
    """Gecko's versatility view of one model's scores: the mean main metric per category
    (nDCG@10, cosine Spearman, accuracy, V-measure), then `mean`, the mean of the category means.

    Only categories with a set are listed; `mean` weighs each category once, whatever its set count.
    """
    by_category: dict[str, list[float]] = {}
    for task in tasks:
        category = task_category(task)
        by_category.setdefault(category, []).append(scores[task.metadata.name][MAIN_METRIC[category]])
    out = {c: round(float(np.mean(by_category[c])), 5) for c in MTEB_TYPE if c in by_category}
    if out:
        out["mean"] = round(float(np.mean(list(out.values()))), 5)
    return out


def versatility_line(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One line: each model's per-category means and their mean, e.g. `retrieval 0.64 -> 0.66`."""
    models = [m for m in results if VERSATILITY in results[m]]
    if not models:
        return ""
    keys = list(results[models[0]][VERSATILITY])
    cells = [f"{k} " + " -> ".join(f"{results[m][VERSATILITY].get(k, float('nan')):.4f}" for m in models) for k in keys]
    return f"versatility ({' -> '.join(models)}): " + " | ".join(cells)


def plot_rows(results: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Long-format rows for `dvc plots`: one bar per (task, metric, model), models side by side."""
    rows = []
    for model, tasks in results.items():
        for task, metrics in tasks.items():
            for metric, score in metrics.items():
                rows.append({"label": f"{task} {metric} {model}", "model": model, "task": task, "metric": metric, "score": round(score, 5)})
    order = list(results)
    return sorted(rows, key=lambda r: (r["task"], r["metric"], order.index(r["model"])))


def summary(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A table of every task and metric, one column per model (plus trained - base when both ran)."""
    models = list(results)
    keys = sorted({(t, m) for tasks in results.values() for t, metrics in tasks.items() for m in metrics})
    width = max([len(f"{t} {m}") for t, m in keys] + [10])
    header = f"{'task metric':<{width}}" + "".join(f"{name:>10}" for name in models)
    both = {"base", "trained"} <= set(models)
    lines = [header + (f"{'delta':>10}" if both else "")]
    for task, metric in keys:
        cells = [results[name].get(task, {}).get(metric) for name in models]
        line = f"{f'{task} {metric}':<{width}}" + "".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells)
        if both:
            line += f"{results['trained'][task][metric] - results['base'][task][metric]:>+10.4f}"
        lines.append(line)
    extra = versatility_line(results)
    return "\n".join(lines + ([extra] if extra else []))


def intervals_lines(intervals: dict[str, dict[str, Any]]) -> str:
    """One line per comparison and set: the difference and its paired bootstrap 95 % interval."""
    lines = ["paired bootstrap, 95 % interval of the difference (nDCG@10 per query; STS: Spearman over pairs):"]
    for comparison, by_set in intervals.items():
        a_b = comparison.split("_vs_")
        lines += [f"  {a_b[0]} - {a_b[1]}  {name}: {interval.line()}" for name, interval in by_set.items()]
    return "\n".join(lines) if len(lines) > 1 else ""


def write_outputs(
    results: dict[str, dict[str, dict[str, float]]], metrics_path: Path, plot_path: Path, intervals: dict | None = None
) -> None:
    """Write the metrics JSON (model -> task -> metric, and `intervals`: comparison -> set ->
    {diff, low, high}, the paired bootstrap 95 % interval) and the plot rows JSON."""
    metrics = dict(results)
    if intervals:
        metrics["intervals"] = {k: {name: i.as_dict() for name, i in v.items()} for k, v in intervals.items()}
    for path, content in ((metrics_path, metrics), (plot_path, plot_rows(results))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)



# The differences evaluate bounds with a paired bootstrap (b_vs_a: b minus a).
COMPARISONS = (("base", "trained"), ("control", "trained"), ("base", "control"))


def evaluate_models(
    params: Any, root: Path, tasks: Sequence[Any]
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str], dict[str, dict[str, Any]]]:
    """Score the base encoder (`encoder.model`) and, when their folders exist, the trained one
    (`train.output`) and the control (`train.control_output`: the same recipe without the LLM's data).

    Both use the `encoder` section's settings; the Gecko templates apply to the base model's eval
    categories that `eval.base_prefixes` names and to the trained one's that `eval.prefixes` names.

    Returns:
        ({"base"|"trained"|"control": {task: {metric: score}}}, {model: identity}, intervals); each
        model's scores also hold `versatility` (see `versatility`); intervals: {"trained_vs_base":
        {set: Interval}, ...} over the retrieval and STS sets (pipeline/evaluation/intervals.py).

    Raises:
        pipeline.retrieval.encoder.EncoderError: a model folder that cannot be loaded.
    """
    from pipeline.retrieval.embedding_cache import open_cache
    from pipeline.retrieval.encoder import Encoder, TextFormat, instruction_format

    enc, ev = params.encoder, params.eval

    def full(path: Path) -> Path:
        return path if path.is_absolute() else root / path

    models = {"base": enc.model}
    if full(params.train.output).is_dir():
        models["trained"] = str(full(params.train.output))
    if (full(params.train.control_output) / "config.json").is_file():  # a control folder without one: none trained
        models["control"] = str(full(params.train.control_output))
    cache = open_cache(None if enc.cache_path is None else full(enc.cache_path))
    results, identities, items = {}, {}, {}
    try:
        for label, model in models.items():
            encoder = Encoder.load(
                model, device=params.base.device, dtype=enc.dtype, max_length=enc.max_length, threads=params.base.threads
            ).exclude_instruction(instruction_format(enc))
            identities[label] = encoder.identity
            scores: dict[str, dict[str, float]] = {}
            for prefixes in (True, False):  # one mteb run per text format, over the categories that use it
                subset = [t for t in tasks if ev.uses_prefixes(task_category(t), label) == prefixes]
                if subset:
                    text_format = TextFormat.from_params(enc) if prefixes else None
                    wrapped = MtebEncoder(CachedEncoder(encoder, cache), label, text_format, revision=encoder.identity)
                    scores |= run_tasks(wrapped, subset, batch_size=enc.batch_size)
            results[label] = {t.metadata.name: scores[t.metadata.name] for t in tasks}  # in the params' order
            results[label][VERSATILITY] = versatility(results[label], tasks)
            items[label] = per_item_scores(CachedEncoder(encoder, cache), params, root, label)
    finally:
        if cache is not None:
            cache.close()
    return results, identities, compare(items, COMPARISONS)


def per_item_scores(encoder: "CachedEncoder", params: Any, root: Path, label: str) -> dict[str, Any]:
    """Each retrieval set's nDCG@10 per query and each STS set's cosine per pair, for the bootstrap."""
    from pipeline.retrieval.encoder import TextFormat

    enc, ev = params.encoder, params.eval

    def text_format(kind: str):
        return TextFormat.from_params(enc) if ev.uses_prefixes(kind, label) else None

    def full(path: Path) -> Path:
        return path if path.is_absolute() else root / path

    def embed(texts):
        return encoder.encode(list(texts), batch_size=enc.batch_size)

    out: dict[str, Any] = {}
    for name, s in ev.retrieval.items():
        out[name] = retrieval_per_query(embed, read_beir(full(s.path), s.split, s.holdout), s.task, text_format("retrieval"))
    for name, s in ev.sts.items():
        data = read_sts(full(s.path) / f"{s.split}.tsv")
        out[name] = {"pred": sts_per_pair(embed, data, s.task, text_format("sts")), "gold": data.score}
    return out
