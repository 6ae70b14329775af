"""Make the bundled sample corpus from BEIR SciFact: `python data/sample/make_sample.py [SOURCE]`.

Keeps every test query, every document judged for them, and other documents drawn with a fixed
seed up to `--docs` in all; then every train query whose judged documents all made it into the
sample, as a dev split (`qrels/train.tsv`) to tune and select models on without touching test.
Lines are copied byte for byte and in source order, so each sample file is a sub-list of its source
file. Writes corpus.jsonl, queries.jsonl, qrels/test.tsv, qrels/train.tsv and SOURCE.md next to
this script; the same source and arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1] / "data" / "eval" / "scifact"  # data/eval/scifact in the repository
# md5 of the source files as listed in data/eval/README.md: a different input is refused,
# since SOURCE.md would then describe data the sample was not made from.
SOURCE_MD5 = {
    "corpus.jsonl": "26537f8ae036fdb77d847ec4f7ac1858",
    "queries.jsonl": "846a4365aec1857489dd3dbc130f2c2e",
    "qrels/test.tsv": "8364b6c0380b0aedd1a0bed94ad3eea2",
    "qrels/train.tsv": "31dae8ae0f1e1f137bb1b802559f6027",
}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def make_sample(source: Path, out: Path, n_docs: int, seed: int) -> dict[str, int]:
    """Write the sample files into `out`; returns the counts for SOURCE.md."""
    for name, expected in SOURCE_MD5.items():
        got = md5(source / name)
        if got != expected:
            raise SystemExit(f"{source / name}: md5 {got}, expected {expected} (not the BEIR SciFact release)")

    qrel_lines = (source / "qrels/test.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    header, judgments = qrel_lines[0], qrel_lines[1:]
    judged = [line.split("\t") for line in judgments]
    test_queries = {q for q, _, _ in judged}
    relevant = {d for _, d, _ in judged}

    corpus_lines = (source / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    ids = [json.loads(line)["_id"] for line in corpus_lines]
    missing = relevant - set(ids)
    if missing:
        raise SystemExit(f"qrels name documents absent from the corpus: {sorted(missing)[:5]}")
    others = sorted(set(ids) - relevant)
    extra = max(0, n_docs - len(relevant))
    # Sorted population + seeded Random: the draw does not depend on set iteration order.
    keep = relevant | set(random.Random(seed).sample(others, min(extra, len(others))))

    out.mkdir(parents=True, exist_ok=True)
    (out / "qrels").mkdir(exist_ok=True)
    (out / "corpus.jsonl").write_bytes(b"".join(line for line, i in zip(corpus_lines, ids) if i in keep))
    # Dev split: a train query is kept only when every document judged for it is in the sample, so
    # its qrels stay complete (a judged document missing from the corpus would lower every score).
    train_lines = (source / "qrels/train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    train_judged = [line.split("\t") for line in train_lines[1:]]
    incomplete = {q for q, d, _ in train_judged if d not in keep}
    train_kept = [line for line, (q, _, _) in zip(train_lines[1:], train_judged) if q not in incomplete]
    train_queries = {line.split("\t")[0] for line in train_kept}
    query_lines = (source / "queries.jsonl").read_bytes().splitlines(keepends=True)
    wanted = test_queries | train_queries
    kept_queries = [line for line in query_lines if json.loads(line)["_id"] in wanted]
    (out / "queries.jsonl").write_bytes(b"".join(kept_queries))
    (out / "qrels/test.tsv").write_text(header + "".join(judgments), encoding="utf-8")
    (out / "qrels/train.tsv").write_text(train_lines[0] + "".join(train_kept), encoding="utf-8")
    return {
        "docs": len(keep),
        "relevant_docs": len(relevant),
        "random_docs": len(keep) - len(relevant),
        "source_docs": len(ids),
        "queries": len(test_queries),
        "judgments": len(judgments),
        "train_queries": len(train_queries),
        "train_judgments": len(train_kept),
        "source_train_queries": len({q for q, _, _ in train_judged}),
    }


def write_source_md(out: Path, counts: dict[str, int], n_docs: int, seed: int) -> None:
    outputs = {name: md5(out / name) for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv")}
    text = f"""# Bundled sample: a subset of BEIR SciFact

The default corpus of `dvc repro` (params `corpus.path: data/sample/corpus.jsonl`) and a small
retrieval eval set that matches it.

## Where it comes from
SciFact (Wadden et al. 2020, "Fact or Fiction: Verifying Scientific Claims", EMNLP;
https://github.com/allenai/scifact), in the BEIR release (Thakur et al. 2021,
https://github.com/beir-cellar/beir). License: CC BY-NC 2.0, see `LICENSE` here.
Read from the repository's copy, `data/eval/scifact/` (md5 as listed in `data/eval/README.md`):

| file | md5 |
|---|---|
""" + "".join(f"| `{name}` | `{digest}` |\n" for name, digest in SOURCE_MD5.items()) + f"""
## How it was made
`python data/sample/make_sample.py data/eval/scifact --docs {n_docs} --seed {seed}`
(the script is beside this file and checks the source md5s first):

- all {counts['queries']} test queries (`qrels/test.tsv`) and all {counts['judgments']} of their judgments;
- every document judged for them: {counts['relevant_docs']} documents;
- {counts['random_docs']} other documents drawn with `random.Random({seed}).sample` from the other documents' ids (sorted);
- {counts['docs']} documents in all, of {counts['source_docs']:,} in the full corpus;
- a dev split, `qrels/train.tsv`: the {counts['train_queries']} of SciFact's {counts['source_train_queries']} train queries whose judged
  documents are all in the sample, with all {counts['train_judgments']} of their judgments. Tune and select on it; report on test.

Lines are copied byte for byte, in the source's order; `queries.jsonl` keeps the test and dev
queries, and both qrels files keep the source header `query-id corpus-id score`.

## Files
| file | rows | md5 |
|---|---|---|
| `corpus.jsonl` | {counts['docs']} | `{outputs['corpus.jsonl']}` |
| `queries.jsonl` | {counts['queries'] + counts['train_queries']} | `{outputs['queries.jsonl']}` |
| `qrels/test.tsv` | {counts['judgments']} (plus header) | `{outputs['qrels/test.tsv']}` |
| `qrels/train.tsv` | {counts['train_judgments']} (plus header) | `{outputs['qrels/train.tsv']}` |

Scores on this sample are not comparable with published full-SciFact scores: the corpus holds
fewer distractors, so retrieval is easier.
"""
    (out / "SOURCE.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="BEIR SciFact folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write (default: beside this script)")
    parser.add_argument("--docs", type=int, default=1000, help="documents in all (default 1000)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    counts = make_sample(args.source, args.out, args.docs, args.seed)
    write_source_md(args.out, counts, args.docs, args.seed)
    print(", ".join(f"{k} {v}" for k, v in counts.items()), f"-> {args.out}")


if __name__ == "__main__":
    main()
