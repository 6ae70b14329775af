"""Benchmark: fret's `triples` SQL stage against what a user would otherwise write.

The peer is the pandas version: merge llm_scores with neighbors, the same exact-fraction fusion and
tie-breakers, groupby for p1, the same positive-aware guards and negative strategy, then merges
for the texts; and the other tables the stage writes that cost real work: `query_filters`'
measures (words per query, copy rate against the seed's words, the normalised text) and, with
`--distill` (train.distill_weight > 0, the only case in which fret fills it), `distill_candidates`
(every scored candidate of each training query with its teacher score and texts, sorted).

Both do the stage's whole job, timed the same way: read the upstream tables from the stage files
(the peer with `duckdb ... .df()`, as a pandas user of fret's warehouse would), select, and write
what training needs to disk (fret: every model of sql/ into `triples.duckdb`, after schema.yml's data
tests; the peer: its tables as Parquet files with pandas' defaults, `DataFrame.to_parquet`). Two lines
before the ratio split the times: fret's models and tests built into an in-memory DuckDB (no write),
and the peer's selection alone on DataFrames already in memory (no read, no write). Both must select
identical (query, positive, negative) rows, identical distillation lists and the same query measures;
each is timed best-of-N after a warm-up run. `--triples-only` leaves the peer's extra tables out
(fret still builds everything).

    .venv/bin/python bench/triples.py [--queries 50000] [--neighbors 20] [--negative lowest] [--distill] [--repeat 3]

The last line printed is `ratio: X.XX` = fret throughput / peer throughput, whole job against whole
job (above 1: fret faster).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from pipeline import warehouse as wh
from pipeline.params import BaseParams, Params, SelectParams, TrainParams, sql_variables
from pipeline.warehouse.models import build_into, build_models, load_models, load_schema

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
TASK_TYPES = ["question answering", "search result", "fact checking", "sentence similarity"]


# ---------------------------------------------------------------- synthetic upstream tables


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based rank of each row's values, ascending; row-wise ties cannot occur (continuous noise)."""
    return np.argsort(np.argsort(values, axis=1), axis=1) + 1


def synthetic_tables(n_queries: int, n_neighbors: int, seed: int = 0) -> dict[str, pa.Table]:
    """Upstream tables shaped like the real stages' output, with Gecko-like statistics.

    The encoder's top N per query are distinct passages; the seed is among them for ~85% of queries
    (often first); the LLM's QL and RC ranks agree with the encoder only partly.
    """
    rng = np.random.default_rng(seed)
    n_passages = 200_003  # prime, so base + j * step (mod P) gives each query distinct neighbors
    words = np.array("the of protein cell study results effect patients risk gene model data".split())
    text_pool = [" ".join(rng.choice(words, 60)) for _ in range(1000)]
    passage_ids = np.array([f"doc{i}#0" for i in range(n_passages)], dtype=object)
    passages = pa.table(
        {
            "passage_id": passage_ids,
            "doc_id": [f"doc{i}" for i in range(n_passages)],
            "title": [f"title {i % 997}" for i in range(n_passages)],
            "text": [text_pool[i % 1000] + f" #{i}" for i in range(n_passages)],
            "n_words": np.full(n_passages, 62),
            "source": ["synthetic"] * n_passages,
        }
    )

    base = rng.integers(0, n_passages, n_queries)
    step = rng.integers(1, n_passages, n_queries)
    neighbor_idx = (base[:, None] + np.arange(n_neighbors)[None, :] * step[:, None]) % n_passages
    knn_score = 0.85 - np.cumsum(rng.uniform(0.0, 0.02, (n_queries, n_neighbors)), axis=1)
    # Seed: one of the mined passages (rank skewed to the top) for 85% of queries, else elsewhere.
    seed_pos = np.minimum(rng.geometric(0.6, n_queries) - 1, n_neighbors - 1)
    in_top = rng.random(n_queries) < 0.85
    seed_idx = np.where(in_top, neighbor_idx[np.arange(n_queries), seed_pos], rng.integers(0, n_passages, n_queries))
    # LLM ranks: the encoder's order plus noise, the seed pushed up (it is usually truly relevant).
    knn_rank = np.tile(np.arange(1, n_neighbors + 1), (n_queries, 1))
    is_seed = neighbor_idx == seed_idx[:, None]
    ql_rank = _ranks(knn_rank + rng.normal(0, 4, knn_rank.shape) - 4 * is_seed)
    rc_rank = _ranks(knn_rank + rng.normal(0, 4, knn_rank.shape) - 4 * is_seed)
    rc_logodds = 3.0 - 0.4 * rc_rank + rng.normal(0, 0.5, rc_rank.shape)

    query_ids = np.array([f"q{i}" for i in range(n_queries)], dtype=object)
    task_type = np.array(TASK_TYPES, dtype=object)[rng.integers(0, 4, n_queries)]
    queries = pa.table(
        {
            "query_id": query_ids,
            "passage_id": passage_ids[seed_idx],
            "task_type": task_type,
            "task": [f"Given a {t} query, retrieve relevant passages" for t in task_type],
            "query": [f"synthetic query number {i}" for i in range(n_queries)],
            "llm": ["synthetic"] * n_queries,
            "prompt_hash": ["0"] * n_queries,
            "created_at": ["2025-01-01T00:00:00"] * n_queries,
        }
    )
    flat_q = np.repeat(query_ids, n_neighbors)
    flat_p = passage_ids[neighbor_idx.ravel()]
    neighbors = pa.table(
        {"query_id": flat_q, "passage_id": flat_p, "knn_rank": knn_rank.ravel().astype(np.int32),
         "knn_score": knn_score.ravel(), "bm25_rank": knn_rank.ravel().astype(np.int32),
         "bm25_score": knn_score.ravel(), "mined_by": np.full(flat_q.shape, "knn")}
    )  # fmt: skip
    llm_scores = pa.table(
        {
            "query_id": flat_q,
            "passage_id": flat_p,
            "knn_rank": knn_rank.ravel().astype(np.int32),
            "ql_sum": -3.0 * ql_rank.ravel(),
            "ql_mean": -0.3 * ql_rank.ravel(),
            "rc_logodds": rc_logodds.ravel(),
            "ql_rank": ql_rank.ravel().astype(np.int32),
            "rc_rank": rc_rank.ravel().astype(np.int32),
        }
    )
    return {"passages": passages, "queries": queries, "neighbors": neighbors, "llm_scores": llm_scores}


# ---------------------------------------------------------------- the two implementations


def run_fret(warehouse: Path, params: Params) -> None:
    build_models(SQL_DIR, stage="triples", variables=sql_variables(params), warehouse=warehouse)


def run_fret_in_memory(warehouse: Path, params: Params) -> None:
    """The same models and data tests built into an in-memory DuckDB: fret's SQL without the write.

    Not a way to run the stage (nothing is kept); it splits fret's time into the SQL and the cost of
    writing the tables users query, which the peer does not do.
    """
    models = load_models(SQL_DIR)
    con = duckdb.connect(":memory:")
    try:
        wh.attach_stages(con, {k: v for k, v in wh.stage_files(warehouse).items() if k != "triples"})
        build_into(con, SQL_DIR, models, load_schema(SQL_DIR, models), sql_variables(params))
    finally:
        con.close()


def run_peer(frames: dict, params: Params, extras: bool = True) -> dict:
    """The pandas version a user might write, selecting exactly what sql/*.sql selects.

    Returns {"triples": ..., and with `extras` "query_filters": ... and, when train.distill_weight > 0
    (fret builds it only then), "distill_candidates": ...}.
    """
    import pandas as pd

    sel, seed = params.select, params.base.seed
    queries, passages = frames["queries"], frames["passages"]
    scores = frames["llm_scores"].merge(
        frames["neighbors"][["query_id", "passage_id", "knn_score"]], on=["query_id", "passage_id"], how="left"
    )
    a, b = scores["ql_rank"].astype("int64") + sel.rrf_k, scores["rc_rank"].astype("int64") + sel.rrf_k
    scores["fused_score"] = (a + b) / (a * b)
    scores = scores.sort_values(
        ["query_id", "fused_score", "rc_rank", "knn_rank", "passage_id"], ascending=[True, False, True, True, True]
    )
    scores["fused_rank"] = scores.groupby("query_id", sort=False).cumcount() + 1

    seeds = queries[["query_id", "passage_id"]].rename(columns={"passage_id": "seed_id"})
    top = scores.loc[scores["fused_rank"] == 1, ["query_id", "passage_id"]].rename(columns={"passage_id": "top_id"})
    pos = seeds.merge(top, on="query_id", how="left")
    pos["positive_id"] = pos["top_id"] if sel.positive == "fused" else pos["seed_id"]
    pos = pos.dropna(subset=["positive_id"])
    pos = pos.merge(
        scores[["query_id", "passage_id", "knn_score"]].rename(
            columns={"passage_id": "positive_id", "knn_score": "positive_knn_score"}
        ),
        on=["query_id", "positive_id"],
        how="left",
    )

    cand = scores.merge(pos[["query_id", "positive_id", "seed_id", "positive_knn_score"]], on="query_id")
    cand = cand[(cand["passage_id"] != cand["positive_id"]) & (cand["passage_id"] != cand["seed_id"])]
    if sel.relative_margin is not None:  # NaN positive score compares False: the guard is off there
        cand = cand[~(cand["knn_score"] > cand["positive_knn_score"] * (1 - sel.relative_margin))]
    if sel.max_negative_rc_logodds is not None:
        cand = cand[~(cand["rc_logodds"] > sel.max_negative_rc_logodds)]
    if sel.negative == "lowest":
        cand = cand.sort_values(["query_id", "fused_rank", "passage_id"], ascending=[True, False, True])
    elif sel.negative == "random":
        cand = cand.assign(
            draw=[
                int.from_bytes(hashlib.md5(f"{seed}|{q}|{p}".encode()).digest(), "little")
                for q, p in zip(cand["query_id"], cand["passage_id"])
            ]
        )
        # 128-bit values: an object column of Python ints, which pandas sorts exactly (slowly)
        cand = cand.sort_values(["query_id", "draw", "passage_id"])
    else:
        upper = sel.range_max if sel.range_max is not None else np.inf
        cand = cand[(cand["fused_rank"] > sel.range_min) & (cand["fused_rank"] <= upper)]
        cand = cand.sort_values(["query_id", "fused_rank", "passage_id"])
    cand = cand.assign(negative_rank=cand.groupby("query_id", sort=False).cumcount() + 1)
    neg = cand[cand["negative_rank"] <= sel.num_negatives]
    neg = neg[["query_id", "passage_id", "negative_rank"]].rename(columns={"passage_id": "negative_id"})

    triples = pos.merge(neg, on="query_id", how="left" if sel.keep_without_negative else "inner")
    triples = triples.merge(queries[["query_id", "task_type", "task", "query"]], on="query_id", how="left")
    texts = passages[["passage_id", "title", "text"]]
    for side in ("positive", "negative"):
        triples = triples.merge(
            texts.rename(columns={"passage_id": f"{side}_id", "title": f"{side}_title", "text": f"{side}_text"}),
            on=f"{side}_id",
            how="left",
        )
    out = {"triples": triples.sort_values(["query_id", "negative_rank"], ignore_index=True)}
    if extras:
        if params.train.distill_weight > 0:
            out["distill_candidates"] = peer_distill_candidates(scores, out["triples"], frames, params)
        out["query_filters"] = peer_query_measures(frames)
    return out


PEER_COLUMNS = {
    "passages": ["passage_id", "title", "text"],
    "queries": ["query_id", "passage_id", "task_type", "task", "query"],
    "neighbors": ["query_id", "passage_id", "knn_score"],
    "llm_scores": ["query_id", "passage_id", "knn_rank", "ql_sum", "ql_mean", "rc_logodds", "ql_rank", "rc_rank"],
}


def run_peer_job(warehouse: Path, out_dir: Path, params: Params, extras: bool = True) -> None:
    """The peer's whole job: read the upstream tables from the stage files, select, write Parquet."""
    frames = {}
    for name, columns in PEER_COLUMNS.items():  # only the columns it uses, as a careful user would
        con = duckdb.connect(str(wh.stage_path(name, warehouse)), read_only=True)
        try:
            frames[name] = con.table(name).select(*columns).df()
        finally:
            con.close()
    for name, frame in run_peer(frames, params, extras=extras).items():
        frame.to_parquet(out_dir / f"{name}.parquet")


def peer_distill_candidates(scores, triples, frames: dict, params: Params):
    """sql/distill_candidates.sql: each training query's scored candidates, teacher score, texts."""
    column = params.train.distill_score
    kept = scores[scores["query_id"].isin(triples["query_id"].unique()) & scores[column].notna()]
    out = kept[["query_id", "passage_id", column, "fused_rank"]].rename(columns={column: "teacher_score"})
    out = out.merge(frames["queries"][["query_id", "task", "query"]], on="query_id", how="left")
    out = out.merge(frames["passages"][["passage_id", "title", "text"]], on="passage_id", how="left")
    return out.sort_values(["query_id", "passage_id"], ignore_index=True)


_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits in any script, as [\pL\pN]+


def peer_query_measures(frames: dict):
    """sql/query_filters.sql's measures (the filters are off): words, copy rate, normalised text."""
    queries = frames["queries"][["query_id", "passage_id", "query"]]
    seeds = queries.merge(frames["passages"][["passage_id", "text"]], on="passage_id", how="left")
    n_words, copy_rate, normalized = [], [], []
    for query, seed in zip(seeds["query"], seeds["text"]):
        words = _WORD.findall(query.lower())
        seed_words = set(_WORD.findall(seed.lower())) if isinstance(seed, str) else set()
        n_words.append(len(words))
        copy_rate.append(sum(w in seed_words for w in words) / len(words) if words else None)
        normalized.append(" ".join(re.sub(r"[^\w\s]|_", "", query.lower()).split()))
    return seeds[["query_id"]].assign(n_words=n_words, copy_rate=copy_rate, normalized_query=normalized)


def check_same(fret, peer, table: str, order: bool) -> None:
    """Same rows (and, where the SQL sorts, the same order), floats to 1e-12."""
    import pandas as pd

    peer = peer[list(fret.columns)]
    if not order:
        fret, peer = (f.sort_values("query_id", ignore_index=True) for f in (fret, peer))
    try:
        pd.testing.assert_frame_equal(fret, peer, check_dtype=False, rtol=1e-12)
    except AssertionError as err:
        raise SystemExit(f"fret and the peer built different {table}: the comparison is void\n{err}") from None


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description="fret triples SQL stage vs pandas")
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--neighbors", type=int, default=20)
    parser.add_argument("--negative", choices=["lowest", "random", "range"], default="lowest")
    parser.add_argument("--num-negatives", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--triples-only", action="store_true", help="peer without distill_candidates, query_filters")
    parser.add_argument("--distill", action="store_true",
                        help="train.distill_weight 1: both also build distill_candidates (empty in fret otherwise)")
    args = parser.parse_args()
    import pandas as pd

    select = SelectParams(negative=args.negative, num_negatives=args.num_negatives)
    if args.negative == "range":
        select = SelectParams(negative="range", num_negatives=args.num_negatives, range_min=5, range_max=15)
    params = Params(base=BaseParams(seed=42), select=select, train=TrainParams(distill_weight=1.0 if args.distill else 0))

    tables = synthetic_tables(args.queries, args.neighbors)
    frames = {name: table.to_pandas() for name, table in tables.items()}
    with tempfile.TemporaryDirectory(prefix="fret-bench-") as tmp:
        warehouse = Path(tmp)
        for name, table in tables.items():
            with wh.write_stage(name, warehouse=warehouse) as con:
                wh.write_table(con, name, table)

        peer_dir = Path(tmp) / "peer"
        peer_dir.mkdir()
        fret_s = best_of(lambda: run_fret(warehouse, params), args.repeat)
        peer_s = best_of(lambda: run_peer_job(warehouse, peer_dir, params, extras=not args.triples_only), args.repeat)
        compute_s = best_of(lambda: run_peer(frames, params, extras=not args.triples_only), args.repeat)

        memory_s = best_of(lambda: run_fret_in_memory(warehouse, params), args.repeat)
        con = duckdb.connect(str(wh.stage_path("triples", warehouse)), read_only=True)
        fret_rows = con.execute(
            "select query_id, positive_id, negative_id, negative_rank, positive_text, negative_text "
            "from triples order by query_id, negative_rank"
        ).fetchall()
        fret_distill = con.execute("select * from distill_candidates").df()
        fret_measures = con.execute("select query_id, n_words, copy_rate, normalized_query from query_filters").df()
        con.close()
        written = {path.stem: pd.read_parquet(path) for path in peer_dir.glob("*.parquet")}
    peers = run_peer(frames, params)
    peer = peers["triples"]
    # The timed job read its frames from the stage files: its Parquet must hold what the in-memory peer selects.
    # (Checked against `peers`, the selection already run here, not a second run of it.)
    expected = ["triples"] if args.triples_only else sorted(peers)
    if sorted(written) != expected:
        raise SystemExit(f"the pandas job wrote {sorted(written)}, expected {expected}")
    for name in expected:
        check_same(written[name], peers[name], f"Parquet {name}", order=True)
    if args.distill:
        check_same(fret_distill, peers["distill_candidates"], "distill_candidates", order=True)
    elif len(fret_distill):
        raise SystemExit(f"fret built {len(fret_distill)} distill_candidates rows with distillation off")
    check_same(fret_measures, peers["query_filters"], "query_filters", order=False)
    cols = ["query_id", "positive_id", "negative_id", "negative_rank", "positive_text", "negative_text"]
    peer_rows = [tuple(None if v != v else v for v in row) for row in peer[cols].itertuples(index=False)]
    peer_rows = [r[:3] + (None if r[3] is None else int(r[3]),) + r[4:] for r in peer_rows]
    if sorted(fret_rows, key=str) != sorted(peer_rows, key=str):
        raise SystemExit(
            f"fret ({len(fret_rows)} rows) and the peer ({len(peer_rows)} rows) selected different triples: "
            "the comparison is void"
        )
    n_in = args.queries * args.neighbors
    print(f"synthetic: {args.queries:,} queries x {args.neighbors} neighbors = {n_in:,} scored pairs, "
          f"negative={args.negative}, num_negatives={args.num_negatives}, {len(fret_rows):,} triples, "
          f"best of {args.repeat}")  # fmt: skip
    n_models = len(list(SQL_DIR.glob("*.sql")))
    peer_work = "triples only" if args.triples_only else (
        "triples + distill_candidates + query measures" if args.distill else "triples + query measures")
    print(f"fret  build_models ({n_models} models + data tests + write): {fret_s:.3f} s  {n_in / fret_s:12,.0f} pairs/s")
    print(f"fret  the same in an in-memory DuckDB (no write, not kept): {memory_s:.3f} s  {n_in / memory_s:12,.0f} pairs/s")
    print(f"peer  pandas, {peer_work}, selection alone (frames in memory, no read, no write): {compute_s:.3f} s"
          f"  {n_in / compute_s:12,.0f} pairs/s  (its time over fret's: whole stage {compute_s / fret_s:.2f}, "
          f"in memory {compute_s / memory_s:.2f})")
    print(f"peer  pandas, {peer_work}, read from the stage files + write Parquet: {peer_s:.3f} s"
          f"  {n_in / peer_s:12,.0f} pairs/s")
    print(f"ratio: {peer_s / fret_s:.2f}")


if __name__ == "__main__":
    main()
