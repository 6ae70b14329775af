"""SciFact train-split workloads for the LLM-scoring benches: queries, qrels, MiniLM top-k pairs.

Shared by bench/llm_scores.py and bench/llm_rerank_check.py (run as scripts, so `bench/` is on sys.path).
Raw texts, no prefixes (title + " " + text for documents), as MTEB embeds SciFact for MiniLM;
document embeddings go through fret's embedding cache, so the full corpus is embedded once.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import pyarrow as pa

SCIFACT = Path(__file__).resolve().parents[1] / "data/eval/scifact"
TASK = "Given a scientific claim, retrieve documents that support or refute the claim"
EMBEDDING_CACHE = Path(".fret/cache/embeddings.duckdb")


def load_scifact(split: str = "train") -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus id -> {title, text}, query id -> text of queries with qrels in `split`, qrels)."""
    corpus = {}
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            corpus[str(row["_id"])] = {"title": row.get("title") or "", "text": row["text"]}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (SCIFACT / "qrels" / f"{split}.tsv").open(encoding="utf-8") as f:
        next(f)
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            qrels[qid][did] = int(score)
    queries = {}
    with (SCIFACT / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if str(row["_id"]) in qrels:
                queries[str(row["_id"])] = row["text"]
    return corpus, queries, dict(qrels)


def sample_queries(queries: dict[str, str], n: int, seed: int) -> list[str]:
    ids = sorted(queries, key=int)
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))), key=int)


def minilm_top_k(
    corpus: dict[str, dict], doc_ids: list[str], queries: dict[str, str], query_ids: list[str], k: int, threads: int
) -> dict[str, list[tuple[str, float]]]:
    """Each query's top-k of `doc_ids` by all-MiniLM-L6-v2 cosine: query id -> [(doc id, score)]."""
    import numpy as np

    from pipeline.retrieval.embedding_cache import encode_cached, open_cache
    from pipeline.retrieval.encoder import Encoder

    encoder = Encoder.load("minilm", device="cpu", threads=threads)
    cache = open_cache(EMBEDDING_CACHE)
    try:
        docs, _ = encode_cached(encoder, [(corpus[d]["title"] + " " + corpus[d]["text"]).strip() for d in doc_ids],
                                cache, progress=True, desc="embed corpus")  # fmt: skip
        qs, _ = encode_cached(encoder, [queries[q] for q in query_ids], cache)
    finally:
        if cache is not None:
            cache.close()
    scores = qs @ docs.T
    out = {}
    for qid, row in zip(query_ids, scores):
        top = np.argsort(-row, kind="stable")[:k]
        out[qid] = [(doc_ids[i], float(row[i])) for i in top]
    return out


def pairs_table(corpus: dict[str, dict], queries: dict[str, str], top: dict[str, list[tuple[str, float]]]) -> pa.Table:
    """The `llm_scores` stage's input: one row per (query, retrieved doc), fixed task description."""
    rows = [
        {"query_id": qid, "passage_id": did, "knn_rank": rank, "task": TASK, "query": queries[qid],
         "title": corpus[did]["title"], "text": corpus[did]["text"]}
        for qid, docs in top.items() for rank, (did, _) in enumerate(docs, 1)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)
