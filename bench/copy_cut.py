"""Benchmark: few-shot copies cut while they decode (`generate.copy_prefix_words`) vs checked at the end.

The same seeded sample of SciFact documents (the whole corpus is the pool, as in the full run) goes
through `generate_queries` twice with the project's LLM, each time with an empty LLM cache: first
with `copy_prefix_words: null` (only a word-for-word copy of a few-shot example is rejected, when its
row ends), then with the given K (a query opening with an example's first K words is rejected, and
its row stops as soon as those words are out). Printed per run: rows, failures, calls with retries,
generated tokens, attempts cut, and the kept queries that open like an example (copies that the
null setting lets through).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/copy_cut.py [--passages 400] [--prefix-words 4]

Last line: `ratio: X.XX` = generated tokens without the cut over tokens with it (above 1: the cut
saves work; it also rejects the copies the null setting keeps, whose retries cost tokens).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from _scifact import load_scifact

from pipeline.llm import load_llm
from pipeline.llm.cache import LLMCache
from pipeline.llm.generate import CopyCheck, PromptTemplate, generate_queries
from pipeline.params import load_params


def run(passages: pa.Table, llm, params, prefix_words: int | None, template: PromptTemplate) -> dict:
    generate = params.generate.model_copy(update={"copy_prefix_words": prefix_words, "max_failure_rate": 1.0})
    with tempfile.TemporaryDirectory(prefix="fret-copy-") as tmp, LLMCache(Path(tmp) / "llm.duckdb") as cache:
        started = time.perf_counter()
        result = generate_queries(passages, llm, generate, params.base.seed, cache, template, progress=False)
        seconds = time.perf_counter() - started
    copies = CopyCheck(template.examples, 4)
    kept = [q for q in result.queries.column("query").to_pylist() if copies.reason(q)]
    return {"seconds": seconds, "rows": result.queries.num_rows, "kept_copies": kept, **result.stats}


def main() -> None:
    parser = argparse.ArgumentParser(description="copies cut while decoding vs checked at the end")
    parser.add_argument("--passages", type=int, default=400, help="a seeded sample of SciFact documents")
    parser.add_argument("--prefix-words", type=int, default=4)
    args = parser.parse_args()
    params = load_params(Path("params.yaml"))
    params.generate.limit = args.passages
    corpus, _, _ = load_scifact()
    ids = sorted(corpus)
    passages = pa.table({"passage_id": [f"{d}#0" for d in ids], "title": [corpus[d]["title"] for d in ids],
                         "text": [corpus[d]["text"] for d in ids]})  # fmt: skip
    llm = load_llm(params.llm, params.base)
    template = PromptTemplate()
    results = {}
    for k in (None, args.prefix_words):
        r = results[k] = run(passages, llm, params, k, template)
        print(f"copy_prefix_words {k}: {r['rows']} queries, {int(r['failures'])} failures, {int(r['calls'])} calls, "
              f"{int(r['new_tokens']):,} tokens, {int(r['stopped_copies'])} attempts cut, {r['seconds']:.0f} s; "
              f"{len(r['kept_copies'])} kept queries open like an example {r['kept_copies'][:3]}", flush=True)  # fmt: skip
    print(f"ratio: {results[None]['new_tokens'] / results[args.prefix_words]['new_tokens']:.2f}")


if __name__ == "__main__":
    main()
