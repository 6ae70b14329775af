"""Stage `neighbors`: embed passages and queries, mine each query's top N passages.

Tables in `warehouse/neighbors.duckdb`: `neighbors` (query_id, passage_id, knn_rank, knn_score),
`seed_ranks` (query_id, seed_passage_id, seed_rank, seed_score), `passage_embeddings` and
`query_embeddings` (id, embedding FLOAT[d]). Embeddings go through the cache in `encoder.cache_path`;
passages are embedded, searched (`neighbors.method`) and written `neighbors.chunk_size` at a time.
Run from the repository root: `python -m python_steps.neighbors`.
"""

from __future__ import annotations

import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.params import Params, load_stage_params
from pipeline.retrieval.base import IndexParamsError
from pipeline.retrieval.embedding_cache import CacheStats, open_cache
from pipeline.retrieval.knn import MiningResult, embedding_table, mine_neighbors
from pipeline.warehouse import WarehouseError, write_stage, write_table

STAGE = "neighbors"
UPSTREAM = ["passages", "queries"]


def main() -> None:
    started = time.perf_counter()
    params = load_stage_params(STAGE)
    from pipeline.retrieval.encoder import Encoder, EncoderError, TextFormat, instruction_format  # torch: once params are valid

    enc = params.encoder
    try:
        encoder = Encoder.load(
            enc.model,
            device=params.base.device,
            dtype=enc.dtype,
            max_length=enc.max_length,
            threads=params.base.threads,
        ).exclude_instruction(instruction_format(enc))
    except EncoderError as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    load_seconds = time.perf_counter() - started
    cache = open_cache(enc.cache_path)
    try:
        with write_stage(STAGE, upstream=UPSTREAM) as con:
            # Sorted reads make the output independent of upstream row order (ties go to the lower id).
            passages = con.sql("SELECT passage_id, title, text FROM passages ORDER BY passage_id").to_arrow_table()
            queries = con.sql(
                "SELECT query_id, passage_id, task, query FROM queries ORDER BY query_id"
            ).to_arrow_table()
            sink = ChunkWriter(con, "passage_embeddings")
            result = mine_neighbors(
                passages,
                queries,
                encoder,
                TextFormat.from_params(enc),
                cache,
                params.neighbors,
                batch_size=enc.batch_size,
                threads=params.base.threads,
                seed=params.base.seed,
                passage_sink=sink,
                progress=True,
            )
            result.tables["neighbors"], bm25_stats = with_bm25(con, result, passages, queries, params)
            rows = {name: write_table(con, name, table) for name, table in result.tables.items()}
            rows["passage_embeddings"] = sink.finish(encoder.dim)
    except (WarehouseError, IndexParamsError) as err:  # IndexParamsError: FAISS knobs that do not fit the corpus
        raise SystemExit(f"{STAGE}: {err}") from None
    finally:
        if cache is not None:
            cache.close()
    print(summary(result, rows, params, encoder, load_seconds, time.perf_counter() - started))
    print(
        f"  bm25 (k1 {params.neighbors.bm25.k1}, b {params.neighbors.bm25.b}): indexed in "
        f"{bm25_stats['index_seconds']:.2f} s, candidates scored in {bm25_stats['score_seconds']:.2f} s; "
        f"{bm25_stats['extra_pairs']:,} pairs added from BM25's top {params.neighbors.bm25.top_n}"
    )


def with_bm25(con: duckdb.DuckDBPyConnection, result: MiningResult, passages: pa.Table, queries: pa.Table, params: Params):
    """The encoder's neighbors with BM25's rank and score beside each, and BM25's own top passages
    added (neighbors.bm25.top_n); their cosines come from the embeddings this stage just wrote."""
    from pipeline.retrieval.bm25 import hybrid_neighbors

    def passage_vectors(ids: list[str]) -> np.ndarray:
        con.register("_fret_ids", pa.table({"passage_id": ids}))
        try:
            found = con.sql(
                "SELECT e.passage_id, e.embedding FROM passage_embeddings e JOIN _fret_ids USING (passage_id)"
            ).to_arrow_table()
        finally:
            con.unregister("_fret_ids")
        return _in_order(found, ids)

    nb = params.neighbors
    return hybrid_neighbors(
        result.tables["neighbors"], passages, queries, vectors_of(result.tables["query_embeddings"]),
        passage_vectors, k1=nb.bm25.k1, b=nb.bm25.b, top_n=nb.bm25.top_n,
    )  # fmt: skip


def vectors_of(table: pa.Table) -> np.ndarray:
    """The (rows, d) float32 matrix of an (id, embedding FLOAT[d]) table."""
    column = table["embedding"].combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def _in_order(found: pa.Table, ids: list[str]) -> np.ndarray:
    by_id = dict(zip(found["passage_id"].to_pylist(), vectors_of(found)))
    return np.stack([by_id[i] for i in ids])


class ChunkWriter:
    """Writes each chunk of passage embeddings as it comes, so the stage never holds them all."""

    def __init__(self, con: duckdb.DuckDBPyConnection, name: str) -> None:
        self.con, self.name, self.rows = con, name, 0

    def __call__(self, chunk: pa.Table) -> None:
        if self.rows == 0:
            self.rows = write_table(self.con, self.name, chunk)
            return
        self.con.register("_fret_chunk", chunk)
        try:
            self.con.execute(f'INSERT INTO "{self.name}" SELECT * FROM _fret_chunk')
        finally:
            self.con.unregister("_fret_chunk")
        self.rows += chunk.num_rows

    def finish(self, dim: int) -> int:
        """The rows written; an empty corpus still gets its (empty, typed) table."""
        if self.rows == 0:
            empty = embedding_table("passage_id", pa.array([], pa.string()), np.empty((0, dim), np.float32))
            write_table(self.con, self.name, empty)
        return self.rows


def _embed_line(what: str, stats: CacheStats, seconds: float) -> str:
    rate = f"{stats.embedded / seconds:,.0f} {what}/s" if stats.embedded and seconds > 0 else "nothing to embed"
    return (
        f"  embed {what}: {stats.texts:,} texts ({stats.unique:,} distinct), {stats.hits:,} cached, "
        f"{stats.embedded:,} embedded in {seconds:.2f} s: {rate}"
    )


def _method_line(params: Params) -> str:
    nb = params.neighbors
    if nb.method == "exact":
        return f"exact, blocks of {nb.query_block_size} queries x {nb.block_size} passages"
    if nb.method == "faiss_ivf":
        nlist = "4 sqrt(passages)" if nb.ivf.nlist is None else nb.ivf.nlist
        return f"faiss_ivf, nlist {nlist}, nprobe {nb.ivf.nprobe}, trained on up to {nb.ivf.train_size:,}"
    if nb.method == "faiss_hnsw":
        return f"faiss_hnsw, M {nb.hnsw.m}, efConstruction {nb.hnsw.ef_construction}, efSearch {nb.hnsw.ef_search}"
    return "faiss_flat, exhaustive"


def summary(result: MiningResult, rows: dict[str, int], params: Params, encoder, load_s: float, total_s: float) -> str:
    """One screen: rows written, timings, throughput, cache use, and how often the seed comes back."""
    s = result.seconds
    seeds = result.tables["seed_ranks"]["seed_rank"]
    n = max(len(seeds), 1)
    at_1 = pc.sum(pc.equal(seeds, 1)).as_py() or 0
    found = len(seeds) - seeds.null_count
    top_n = params.neighbors.top_n
    return "\n".join(
        [
            f"{STAGE}: {rows['neighbors']:,} neighbors ({rows['seed_ranks']:,} queries x top {top_n}) over "
            f"{rows['passage_embeddings']:,} passages in {total_s:.2f} s",
            f"  encoder {encoder.identity} on {encoder.device.type}, {encoder.dtype}, max_length {encoder.max_length},"
            f" loaded in {load_s:.2f} s",
            _embed_line("passages", result.passage_stats, s["embed_passages"]),
            _embed_line("queries", result.query_stats, s["embed_queries"]),
            f"  search {s['search']:.2f} s ({_method_line(params)}; passages in chunks of "
            f"{params.neighbors.chunk_size:,})",
            f"  seed passage at rank 1 for {at_1 / n:.1%} of queries, in the top {top_n} for {found / n:.1%} "
            f"(table seed_ranks)",
        ]
    )


if __name__ == "__main__":
    main()
