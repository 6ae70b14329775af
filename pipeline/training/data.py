"""The training data: the `triples` table, `train.mix` sources and distillation candidates as examples.

`read_triples` turns the triples stage's rows into `Example`s in the unified format; `read_pairs`,
`read_labelled_examples` and `read_retrieval_examples` read a `train.mix` source's labelled files
(`read_mix_source` picks by kind), a retrieval source's hard negatives mined by the starting
encoder (`mine_hard_negatives`); `mix_sources` mixes seeded samples of them in; `read_candidates`
reads the LLM-scored candidate lists of the optional distillation term. Every reader returns its
examples in a fixed order, so the upstream row order never changes the training order.

Imported only by the train stage and the benches (torch loads at import time).
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training.losses import Candidate, Example

TRIPLES_COLUMNS = [
    "query_id", "task_type", "task", "query", "positive_id", "positive_title", "positive_text",
    "negative_id", "negative_title", "negative_text",
]  # fmt: skip


@dataclass(frozen=True)
class DataCounts:
    """What the model was trained on, for the summary and the model card."""

    triples: int
    queries: int
    with_negative: int
    without_negative: int
    mix_examples: int = 0
    mix_with_negative: int = 0  # of the mixed-in examples, those with a hard negative


def read_triples(
    path: str | Path, text_format, symmetric_task_types: Sequence[str] = ()
) -> tuple[list[Example], DataCounts]:
    """Read table `triples` from a DuckDB file (read-only) into examples, in a fixed order.

    Args:
        text_format: a `pipeline.retrieval.encoder.TextFormat` (the unified format).
        symmetric_task_types: task types whose passages are formatted like the query, with the same
            task (Gecko's symmetric format for sentence similarity: both sides of such a pair are
            the same kind of text, so they should be embedded the same way).

    Raises:
        ValueError: the table lacks a needed column or has no rows.
    """
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        have = {row[0] for row in con.execute("SELECT column_name FROM (DESCRIBE triples)").fetchall()}
        missing = [c for c in TRIPLES_COLUMNS if c not in have]
        if missing:
            raise ValueError(f"{path}: table triples lacks column(s) {missing}")
        # Sorted so that the row order upstream never changes the training order.
        rows = con.execute(
            f"SELECT {', '.join(TRIPLES_COLUMNS)} FROM triples "
            "ORDER BY query_id, positive_id, negative_id NULLS FIRST"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        raise ValueError(f"{path}: table triples is empty")
    symmetric = set(symmetric_task_types)
    examples = [_triple_example(dict(zip(TRIPLES_COLUMNS, row)), text_format, symmetric) for row in rows]
    with_negative = sum(e.negative is not None for e in examples)
    counts = DataCounts(
        triples=len(examples),
        queries=len({row[0] for row in rows}),
        with_negative=with_negative,
        without_negative=len(examples) - with_negative,
    )
    return examples, counts


def _triple_example(row: dict[str, Any], fmt, symmetric: set[str]) -> Example:
    has_negative = row["negative_id"] is not None and row["negative_text"] is not None
    if row["task_type"] in symmetric:
        def side(title, text):  # noqa: ARG001 - a query has no title
            return fmt.query(row["task"], text)
    else:
        side = fmt.passage
    return Example(
        query=fmt.query(row["task"], row["query"]),
        positive=side(row["positive_title"], row["positive_text"]),
        negative=side(row["negative_title"], row["negative_text"]) if has_negative else None,
        query_text=row["query"],
        positive_text=row["positive_text"],
        negative_text=row["negative_text"] if has_negative else None,
        positive_id=str(row["positive_id"]),
        negative_id=str(row["negative_id"]) if has_negative else None,
    )


def read_pairs(path: str | Path, min_score: float, task: str, text_format, symmetric: bool = True) -> list[Example]:
    """Labelled pairs scoring >= min_score as examples, in both directions (similarity is symmetric).

    With `symmetric` (Gecko's format for similarity tasks) both sides are formatted as queries with
    `task`, as the evaluate stage formats STS pairs; otherwise the second side is a passage.

    The file is a TSV with header columns sentence1, sentence2, score (the STS Benchmark layout). It
    has no quoting (sentences contain bare `"`), so it is read with QUOTE_NONE. Pair sides get
    content-derived ids, so the same sentence elsewhere in a batch is masked as a false negative.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence1", "sentence2", "score"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        pairs = [(r["sentence1"], r["sentence2"]) for r in reader if float(r["score"]) >= min_score]
    out = []
    for a, b in pairs:
        for query, passage in ((a, b), (b, a)):
            out.append(
                Example(
                    query=text_format.query(task, query),
                    positive=text_format.query(task, passage) if symmetric else text_format.passage(None, passage),
                    negative=None,
                    query_text=query,
                    positive_text=passage,
                    negative_text=None,
                    positive_id="pair:" + hashlib.sha1(passage.encode()).hexdigest()[:16],
                    negative_id=None,
                )
            )
    return out


def read_labelled_examples(
    path: str | Path, task: str, text_format, seed: int, symmetric: bool = True, holdout: float = 0.0
) -> list[Example]:
    """A labelled classification TSV (header `text label`) as examples, as Gecko mixes in classification data.

    Each distinct text is a query (with `task`); the positive is another distinct text of its label,
    the hard negative a text of another label, both drawn with `seed`. With `symmetric` both sides are
    formatted as queries of the same task (as the evaluate stage encodes classification texts).
    A text is never its own positive; a label with a single distinct text gives no example.

    The masking ids are the label's (hashed with the task): another example's positive or negative of
    the query's own label is the same class, masked like a duplicate rather than pushed away.

    Args:
        holdout: texts whose content hash falls in this share are left out: the dev set that
            `eval.classification` scores with the same holdout (`pipeline.labelled.held_out`).

    Raises:
        pipeline.labelled.EvalDataError (a ValueError): a malformed file (file and line named).
    """
    from pipeline.labelled import held_out, read_labelled

    data = read_labelled(Path(path))
    by_label: dict[str, list[str]] = {}
    for text, label in dict.fromkeys(zip(data.texts, data.labels)):  # distinct (text, label), file order
        if not held_out(text, holdout):
            by_label.setdefault(label, []).append(text)
    labels = list(by_label)
    if len(labels) < 2:
        raise ValueError(f"{path}: fewer than 2 labels left after holdout {holdout:g}: no negatives to draw")

    def label_id(label: str) -> str:
        return "label:" + hashlib.sha1(f"{task}\t{label}".encode()).hexdigest()[:16]

    def side(text: str) -> str:
        return text_format.query(task, text) if symmetric else text_format.passage(None, text)

    rng = random.Random(seed)
    out = []
    for label in labels:
        texts = by_label[label]
        if len(texts) < 2:
            continue
        others = [other for other in labels if other != label]
        for i, text in enumerate(texts):
            positive = texts[(i + rng.randrange(1, len(texts))) % len(texts)]  # any text but this one
            negative_label = rng.choice(others)
            negative = rng.choice(by_label[negative_label])
            # A text filed under two labels: never let it be its own negative.
            usable = negative not in (text, positive)
            out.append(
                Example(
                    query=text_format.query(task, text),
                    positive=side(positive),
                    negative=side(negative) if usable else None,
                    query_text=text,
                    positive_text=positive,
                    negative_text=negative if usable else None,
                    positive_id=label_id(label),
                    negative_id=label_id(negative_label) if usable else None,
                )
            )
    return out


def read_retrieval_examples(
    folder: str | Path,
    split: str,
    task: str,
    text_format,
    holdout: float = 0.0,
    embed: Callable[[list[str]], np.ndarray] | None = None,
) -> list[Example]:
    """A BEIR folder's judged queries as examples: (query with `task`, a relevant document) each.

    One example per document judged relevant (score > 0), formatted as a passage. The masking id is
    the document's content hash: two queries citing the same abstract never push each other's
    positive away, and a negative that is another example's positive is masked, not pushed away.

    Args:
        holdout: queries whose text hash falls in this share are left out: the dev set that
            `eval.retrieval` (or `train.dev.retrieval`) scores with the same split and holdout.
        embed: texts -> unit vectors (the starting encoder). Given, each query's examples get a
            hard negative: the document it ranks highest among those not judged relevant to that
            query (`mine_hard_negatives`). None: no hard negative; the batch's other passages are
            the negatives.

    Raises:
        pipeline.labelled.EvalDataError (a ValueError): missing or malformed files (file
            and line named), or no relevant judgment left to train on.
    """
    from pipeline.labelled import EvalDataError, read_beir, split_queries

    data = read_beir(Path(folder), split)
    if holdout > 0:
        data = split_queries(data, holdout, held=False)
    docs = {d["id"]: d for d in data.corpus}
    relevant = {q["id"]: sorted(d for d, score in data.qrels[q["id"]].items() if score > 0) for q in data.queries}
    queries = [q for q in data.queries if relevant[q["id"]]]
    negatives = mine_hard_negatives(queries, relevant, data.corpus, task, text_format, embed) if embed else {}

    def doc_id(doc: dict) -> str:
        return "doc:" + hashlib.sha1(f"{doc['title']}\t{doc['text']}".encode()).hexdigest()[:16]

    out = []
    for query in queries:
        negative = negatives.get(query["id"])
        for positive in (docs[d] for d in relevant[query["id"]]):
            out.append(
                Example(
                    query=text_format.query(task, query["text"]),
                    positive=text_format.passage(positive["title"], positive["text"]),
                    negative=None if negative is None else text_format.passage(negative["title"], negative["text"]),
                    query_text=query["text"],
                    positive_text=positive["text"],
                    negative_text=None if negative is None else negative["text"],
                    positive_id=doc_id(positive),
                    negative_id=None if negative is None else doc_id(negative),
                )
            )
    if not out:
        qrels = Path(folder) / "qrels" / f"{split}.tsv"
        raise EvalDataError(f"{qrels}: no relevant judgment left to train on (holdout {holdout:g})")
    return out


def mine_hard_negatives(
    queries: Sequence[dict],
    relevant: Mapping[str, Sequence[str]],
    corpus: Sequence[dict],
    task: str,
    text_format,
    embed: Callable[[list[str]], np.ndarray],
) -> dict[str, dict]:
    """Each query's hard negative: the corpus document `embed` ranks highest among its non-relevant ones.

    What the triples stage takes from the LLM's ranking for a generated query, taken here from the
    starting encoder's for a labelled one: the document it would wrongly put first (exact search;
    a query with every document relevant gets none).

    Returns:
        query id -> the negative's corpus record.
    """
    from pipeline.retrieval.exact import top_n_search

    query_vectors = embed(text_format.queries([task] * len(queries), [q["text"] for q in queries]))
    doc_vectors = embed(text_format.passages([d["title"] for d in corpus], [d["text"] for d in corpus]))
    # One more than the most relevant documents of any query: a non-relevant one is always among them.
    depth = 1 + max(len(relevant[q["id"]]) for q in queries)
    ranked, _ = top_n_search(query_vectors, doc_vectors, depth)
    negatives = {}
    for query, row in zip(queries, ranked):
        judged = set(relevant[query["id"]])
        found = next((corpus[i] for i in row if corpus[i]["id"] not in judged), None)
        if found is not None:
            negatives[query["id"]] = found
    return negatives


def read_candidates(path: str | Path, text_format) -> dict[str, list[Candidate]]:
    """Read table `distill_candidates` into each query's candidate list, keyed by the formatted query.

    Keyed by `Example.query` (the text the encoder sees) because examples carry no query id; a
    query text written twice under two ids was mined and scored as the same text, so the first
    id's list serves both. Lists are in passage_id order, which the seeded draws depend on.

    Raises:
        ValueError: the table is missing (triples built before distillation existed) or empty.
    """
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "distill_candidates" not in tables:
            raise ValueError(f"{path}: no table distill_candidates: rebuild it with `dvc repro triples`")
        rows = con.execute(
            "SELECT query_id, task, query, passage_id, teacher_score FROM distill_candidates ORDER BY query_id, passage_id"
        ).fetchall()
        # Each passage's text once, however many queries list it.
        texts = {
            pid: text_format.passage(title, text)
            for pid, title, text in con.execute("SELECT DISTINCT passage_id, title, text FROM distill_candidates").fetchall()
        }
    finally:
        con.close()
    if not rows:
        raise ValueError(
            f"{path}: table distill_candidates is empty: the triples stage builds it only with train.distill_weight > 0"
            " (`dvc repro triples` rebuilds it after the param changed)"
        )
    pools: dict[str, list[Candidate]] = {}
    owner: dict[str, Any] = {}
    for query_id, task, query, passage_id, score in rows:
        key = text_format.query(task, query)
        if owner.setdefault(key, query_id) == query_id:
            pools.setdefault(key, []).append(Candidate(str(passage_id), texts[passage_id], float(score)))
    return pools


def read_mix_source(
    source, text_format, seed: int, embed: Callable[[list[str]], np.ndarray] | None = None
) -> list[Example]:
    """The examples of one `train.mix` source (a `pipeline.params.MixParams`), by its kind.

    `embed` (the starting encoder) mines the hard negatives of a retrieval source with `hard_negative`.
    """
    if source.raw:
        from pipeline.retrieval.encoder import RawFormat

        text_format = RawFormat()
    if source.kind == "classification":
        return read_labelled_examples(source.path, source.task, text_format, seed, source.symmetric, source.holdout)
    if source.kind == "retrieval":
        if source.hard_negative and embed is None:
            raise ValueError(f"train.mix {source.path}: hard_negative needs the encoder to mine with")
        miner = embed if source.hard_negative else None
        return read_retrieval_examples(source.path, source.split, source.task, text_format, source.holdout, miner)
    return read_pairs(source.path, source.min_score, source.task, text_format, source.symmetric)


def mix_in(examples: list[Example], extra: list[Example], fraction: float, seed: int) -> list[Example]:
    """Add a seeded sample of `extra` so that it makes up `fraction` of the result (or all of extra)."""
    return mix_sources(examples, [(extra, fraction)], seed)


def mix_sources(examples: list[Example], sources: Sequence[tuple[list[Example], float]], seed: int) -> list[Example]:
    """Add a seeded sample of each source's examples so that it makes up its fraction of the result.

    Fractions are shares of the final list (they add up below 1); a source with too few examples
    gives all it has. Source i samples with seed + i, so one source mixes exactly as `mix_in`.
    """
    rest = 1 - sum(fraction for _, fraction in sources)
    out = list(examples)
    for i, (extra, fraction) in enumerate(sources):
        wanted = min(len(extra), round(fraction / rest * len(examples)))
        generator = torch.Generator().manual_seed(seed + i)
        picked = torch.randperm(len(extra), generator=generator)[:wanted].tolist()
        out += [extra[j] for j in sorted(picked)]
    return out
