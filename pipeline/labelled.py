"""Labelled data sets on disk, and the seeded hashes that cut and sample them.

The bottom floor under evaluation, training and generation, which all read the same files:
a BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`), an STS TSV (`sentence1`,
`sentence2`, `score`) and a labelled TSV (`text`, `label`). Every reader checks the whole file and
raises `EvalDataError` naming the file and line, so a bad row fails before any model loads.

`held_out` cuts a set by content hash and `stable_int` draws seeded samples by hashing their
parts: the same inputs fall the same way on every machine, whichever stage asks.

Standard library only, and no other pipeline module: anything may import this.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EvalDataError(ValueError):
    """An eval set that cannot be read; the message names the file and, where known, the line."""



@dataclass(frozen=True)
class RetrievalSet:
    """A BEIR split in memory: only the queries judged in the split's qrels are kept."""

    corpus: list[dict[str, str]]  # id, title, text
    queries: list[dict[str, str]]  # id, text
    qrels: dict[str, dict[str, int]]  # query id -> {corpus id: relevance}


@dataclass(frozen=True)
class STSSet:
    sentence1: list[str]
    sentence2: list[str]
    score: list[float]


@dataclass(frozen=True)
class LabelledSet:
    """Texts with a class label each (classification and clustering sets), in file order."""

    texts: list[str]
    labels: list[str]

    def select(self, keep: Sequence[bool]) -> "LabelledSet":
        return LabelledSet(
            [t for t, k in zip(self.texts, keep) if k], [lab for lab, k in zip(self.labels, keep) if k]
        )


def _read_jsonl(path: Path, fields: Sequence[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each non-blank line; `fields` must be present as strings."""
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{number}: not valid JSON: {err.msg}") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{number}: expected a JSON object")
            for name in fields:
                if not isinstance(record.get(name), str):
                    raise EvalDataError(f"{path}:{number}: missing or non-string field {name!r}")
            yield number, record


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (`query-id corpus-id score`, header line first)."""
    if not path.is_file():
        raise EvalDataError(f"{path}: qrels file not found (the split is the file name: qrels/<split>.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise EvalDataError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header!r}")
        for number, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 3:
                raise EvalDataError(f"{path}:{number}: expected 3 tab-separated columns, got {len(row)}")
            try:
                score = int(row[2])
            except ValueError:
                raise EvalDataError(f"{path}:{number}: score {row[2]!r} is not an integer") from None
            qrels.setdefault(row[0], {})[row[1]] = score
    if not qrels:
        raise EvalDataError(f"{path}: no judgments")
    return qrels


def read_beir(folder: Path, split: str, holdout: float = 0.0) -> RetrievalSet:
    """Read a BEIR folder's corpus, queries and `qrels/<split>.tsv`.

    Queries without a judgment in the split are dropped (BEIR ships all splits' queries in one
    file); a judged query or document that the files lack is an error, since silently dropping it
    would change the score. With `holdout` > 0 only the held-out queries are kept (`split_queries`):
    the dev set of a `train.mix` retrieval source that trains on the rest.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalDataError(f"{folder}: BEIR folder not found")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    qrels = read_qrels(qrels_path)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    corpus = [
        {"id": r["_id"], "title": r.get("title") or "", "text": r["text"]}
        for _, r in _read_jsonl(corpus_path, ("_id", "text"))
    ]
    queries = [
        {"id": r["_id"], "text": r["text"]} for _, r in _read_jsonl(queries_path, ("_id", "text")) if r["_id"] in qrels
    ]
    missing_queries = sorted(set(qrels) - {q["id"] for q in queries})
    if missing_queries:
        raise EvalDataError(f"{qrels_path}: query ids not in {queries_path}: {missing_queries[:5]}")
    doc_ids = {d["id"] for d in corpus}
    missing_docs = sorted({d for judged in qrels.values() for d in judged} - doc_ids)
    if missing_docs:
        raise EvalDataError(f"{qrels_path}: corpus ids not in {corpus_path}: {missing_docs[:5]}")
    data = RetrievalSet(corpus=corpus, queries=queries, qrels=qrels)
    if holdout <= 0:
        return data
    dev = split_queries(data, holdout, held=True)
    if not dev.queries:
        raise EvalDataError(f"{qrels_path}: holdout {holdout:g} leaves no query to score")
    return dev


def split_queries(data: RetrievalSet, holdout: float, held: bool) -> RetrievalSet:
    """The queries on one side of a `holdout` cut (`held`: the held-out share), with their judgments.

    The cut is `held_out` on the query text, so a `train.mix` retrieval source (held=False) and the
    eval or dev set with the same holdout (held=True) are disjoint and together the whole split.
    """
    queries = [q for q in data.queries if held_out(q["text"], holdout) == held]
    kept = {q["id"] for q in queries}
    return RetrievalSet(corpus=data.corpus, queries=queries, qrels={q: d for q, d in data.qrels.items() if q in kept})


def read_sts(path: Path) -> STSSet:
    """Read an STS TSV with a header naming `sentence1`, `sentence2` and `score` (extra columns ignored).

    The file is read without quote handling (STS Benchmark has bare `"` inside sentences).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: STS file not found")
    out = STSSet([], [], [])
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) or []
        try:
            cols = [header.index(name) for name in ("sentence1", "sentence2", "score")]
        except ValueError:
            raise EvalDataError(f"{path}:1: header must name sentence1, sentence2 and score, got {header!r}") from None
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise EvalDataError(f"{path}:{number}: expected {len(header)} tab-separated columns, got {len(row)}")
            try:
                score = float(row[cols[2]])
            except ValueError:
                raise EvalDataError(f"{path}:{number}: score {row[cols[2]]!r} is not a number") from None
            if not math.isfinite(score):
                raise EvalDataError(f"{path}:{number}: score {row[cols[2]]!r} is not finite")
            out.sentence1.append(row[cols[0]])
            out.sentence2.append(row[cols[1]])
            out.score.append(score)
    if len(out.score) < 2:
        raise EvalDataError(f"{path}: needs at least 2 pairs for a correlation")
    return out


def read_labelled(path: Path) -> LabelledSet:
    """Read a labelled TSV: header `text<TAB>label`, one text and its label per line.

    Read without quote handling (Banking77 and 20 Newsgroups have bare `"` in texts). A row must
    have exactly two columns and a non-empty text and label; the set needs two labels or more.
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: labelled file not found")
    out = LabelledSet([], [])
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or [h.strip() for h in header] != ["text", "label"]:
            raise EvalDataError(f"{path}:1: expected the header 'text<TAB>label', got {header!r}")
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise EvalDataError(f"{path}:{number}: expected 2 tab-separated columns (text, label), got {len(row)}")
            text, label = row[0].strip(), row[1].strip()
            if not text or not label:
                raise EvalDataError(f"{path}:{number}: empty {'text' if not text else 'label'}")
            out.texts.append(text)
            out.labels.append(label)
    if len(set(out.labels)) < 2:
        raise EvalDataError(f"{path}: needs texts of at least 2 labels, got {sorted(set(out.labels))}")
    return out


def held_out(text: str, fraction: float) -> bool:
    """Whether `text` belongs to the held-out `fraction` of a set: decided by its content hash.

    The same text always falls on the same side (duplicates never straddle train and dev), and
    the dev split of a file is the same wherever it is cut (the train mix, the evaluate stage).
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def stable_int(*parts: Any) -> int:
    """A 63-bit integer from the parts' JSON: the same parts give the same number on every machine."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
