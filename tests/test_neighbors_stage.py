"""python_steps.neighbors end to end on a tiny warehouse, the embedding cache, and the params it reads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from fixtures_encoder import make_texts
from fixtures_encoder import tiny_bert_dir, tiny_encoder  # noqa: F401 - fixtures

from pipeline.params import ParamsError, load_params
from pipeline.retrieval.embedding_cache import EmbeddingCache, encode_cached, open_cache
from pipeline.warehouse import write_stage, write_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def count_forwards(monkeypatch):
    """Counts transformer passes of every Encoder (the work the cache must save)."""
    from pipeline.retrieval.encoder import Encoder

    calls = {"n": 0}
    original = Encoder._forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "_forward", counted)
    return calls


# --- the cache ----------------------------------------------------------------------------------


def test_cache_hits_on_rerun_and_embeds_duplicates_once(tiny_encoder, count_forwards, tmp_path):
    texts = make_texts(12)
    texts = texts + texts[:5]  # duplicates
    with EmbeddingCache(tmp_path / "cache.duckdb") as cache:
        first, stats = encode_cached(tiny_encoder, texts, cache, batch_size=4, chunk_size=5)
        assert (stats.texts, stats.unique, stats.hits, stats.embedded) == (17, 12, 0, 12)
        assert count_forwards["n"] == 2 + 2 + 1  # chunks of 5, 5 and 2 texts, each in batches of up to 4
        np.testing.assert_array_equal(first[12:], first[:5])
        np.testing.assert_allclose(first, tiny_encoder.encode(texts), atol=1e-6)
    count_forwards["n"] = 0
    with EmbeddingCache(tmp_path / "cache.duckdb") as cache:  # a new process would see the same file
        again, stats = encode_cached(tiny_encoder, texts, cache, batch_size=4)
    assert count_forwards["n"] == 0
    assert (stats.hits, stats.embedded) == (12, 0)
    np.testing.assert_array_equal(again, first)


def test_cache_never_mixes_encoders(tiny_bert_dir, tiny_encoder, tmp_path):
    from pipeline.retrieval.encoder import Encoder

    texts = make_texts(6)
    shorter = Encoder.load(tiny_bert_dir, device="cpu", max_length=8)
    with EmbeddingCache(tmp_path / "cache.duckdb") as cache:
        encode_cached(tiny_encoder, texts, cache)
        vectors, stats = encode_cached(shorter, texts, cache)
        assert stats.hits == 0 and cache.count() == 12
    np.testing.assert_allclose(vectors, shorter.encode(texts), atol=1e-6)


FAKE_ENCODER_RUN = """
import os, sys
import numpy as np
from pipeline.retrieval.embedding_cache import EmbeddingCache, encode_cached

class DiesOnThirdChunk:
    dim, fingerprint, calls = 4, "fake", 0
    def encode(self, texts, batch_size, on_batch=None):
        self.calls += 1
        if self.calls == 3:
            os._exit(9)  # like a kill: no close, no checkpoint
        return np.ones((len(texts), 4), np.float32)

cache = EmbeddingCache(sys.argv[1])
encode_cached(DiesOnThirdChunk(), [f"text {i}" for i in range(10)], cache, chunk_size=3)
"""


def test_a_kill_loses_at_most_the_current_chunk(tmp_path):
    path = tmp_path / "cache.duckdb"
    run = subprocess.run([sys.executable, "-c", FAKE_ENCODER_RUN, str(path)], cwd=REPO, capture_output=True)
    assert run.returncode == 9, run.stderr.decode()
    with EmbeddingCache(path) as cache:
        assert cache.count("fake") == 6  # two committed chunks of 3 survive


def test_a_cache_held_by_another_process_is_skipped_not_fatal(tmp_path, capsys):
    path = tmp_path / "cache.duckdb"
    hold = f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('ready', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert open_cache(path) is None
        assert "embedding without it" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert open_cache(None) is None


# --- params -------------------------------------------------------------------------------------


def test_params_defaults_and_template_checks(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    (tmp_path / "params.yaml").write_text("corpus:\n  path: c.jsonl\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.encoder.model == "minilm" and params.neighbors.top_n == 10
    assert params.encoder.query_template == "task: {task} | query: {query}"
    bad = "corpus:\n  path: c.jsonl\nencoder:\n  query_template: 'q: {question}'\nneighbors:\n  top_n: 1\n"
    (tmp_path / "params.yaml").write_text(bad)
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    message = str(err.value)
    assert "params.yaml:4: encoder.query_template: unknown template field(s) ['question']" in message
    assert "neighbors.top_n" in message


# --- the stage ----------------------------------------------------------------------------------


def make_project(root: Path, model: Path) -> None:
    """params.yaml plus `passages` and `queries` stage files, as the upstream stages would write them."""
    (root / "c.jsonl").write_text("")
    (root / "params.yaml").write_text(
        textwrap.dedent(
            f"""\
            corpus:
              path: c.jsonl
            encoder:
              model: {model}
              batch_size: 4
              cache_path: cache/embeddings.duckdb
            neighbors:
              top_n: 3
              block_size: 4
              query_block_size: 2
            """
        )
    )
    texts = make_texts(10)
    passages = pa.table(
        {
            "passage_id": [f"p{i:02d}" for i in range(10)],
            "doc_id": [f"d{i}" for i in range(10)],
            "title": ["", None] + [f"title {i}" for i in range(2, 10)],
            "text": texts,
            "n_words": [len(t.split()) for t in texts],
            "source": ["c.jsonl"] * 10,
        }
    )
    queries = pa.table(
        {
            "query_id": [f"q{i}" for i in range(5)],
            "passage_id": ["p00", "p03", "p05", "p07", "p09"],
            "task_type": ["question answering"] * 5,
            "task": ["Given a question, find the passage that answers it"] * 5,
            "query": [t.split(".")[0] for t in texts[0:10:2]],
            "llm": ["tiny"] * 5,
            "prompt_hash": ["h"] * 5,
            "created_at": pa.array([0] * 5, pa.timestamp("s")),
        }
    )
    with write_stage("passages", warehouse=root / "warehouse") as con:
        write_table(con, "passages", passages)
    with write_stage("queries", upstream=["passages"], warehouse=root / "warehouse") as con:
        write_table(con, "queries", queries)


def test_stage_end_to_end_and_cached_rerun(tiny_bert_dir, count_forwards, tmp_path, monkeypatch, capsys):
    from python_steps import neighbors

    make_project(tmp_path, tiny_bert_dir)
    monkeypatch.chdir(tmp_path)
    neighbors.main()
    out = capsys.readouterr().out
    assert "neighbors: 15 neighbors (5 queries x top 3) over 10 passages" in out
    assert "10 embedded" in out and count_forwards["n"] > 0

    con = duckdb.connect(str(tmp_path / "warehouse" / "neighbors.duckdb"), read_only=True)
    rows = con.execute("SELECT query_id, knn_rank, knn_score FROM neighbors ORDER BY query_id, knn_rank").fetchall()
    assert [r[1] for r in rows] == [1, 2, 3] * 5
    assert all(a[2] >= b[2] for a, b in zip(rows, rows[1:]) if a[0] == b[0])
    assert con.execute("SELECT typeof(embedding) FROM passage_embeddings LIMIT 1").fetchone()[0] == "FLOAT[32]"
    # knn_score is the cosine of the stored embeddings: ad-hoc SQL and the stage agree.
    worst = con.execute(
        """SELECT max(abs(n.knn_score - array_cosine_similarity(q.embedding, p.embedding)))
           FROM neighbors n JOIN query_embeddings q USING (query_id) JOIN passage_embeddings p USING (passage_id)"""
    ).fetchone()[0]
    assert worst < 1e-5
    # seed_rank agrees with where the seed sits in `neighbors`, and is null exactly when it is absent.
    mismatched = con.execute(
        """SELECT count(*) FROM seed_ranks s LEFT JOIN neighbors n
             ON n.query_id = s.query_id AND n.passage_id = s.seed_passage_id
           WHERE s.seed_rank IS DISTINCT FROM n.knn_rank"""
    ).fetchone()[0]
    assert mismatched == 0 and con.execute("SELECT count(*) FROM seed_ranks").fetchone()[0] == 5
    first = con.execute("SELECT * FROM neighbors ORDER BY ALL").fetchall()
    con.close()

    count_forwards["n"] = 0
    neighbors.main()  # nothing changed: every vector comes from the cache
    out = capsys.readouterr().out
    assert count_forwards["n"] == 0 and "10 cached, 0 embedded" in out
    con = duckdb.connect(str(tmp_path / "warehouse" / "neighbors.duckdb"), read_only=True)
    assert con.execute("SELECT * FROM neighbors ORDER BY ALL").fetchall() == first
    con.close()


def test_stage_names_a_missing_upstream(tiny_bert_dir, tmp_path, monkeypatch):
    from python_steps import neighbors

    make_project(tmp_path, tiny_bert_dir)
    (tmp_path / "warehouse" / "queries.duckdb").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="upstream stage 'queries' has not been built"):
        neighbors.main()
