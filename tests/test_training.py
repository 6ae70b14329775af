"""The train stage: data reading, schedule, determinism, saving, dvclive, params validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_encoder import tiny_bert_dir  # noqa: F401  (session fixture)
from pipeline.params import ParamsError, TrainParams, load_params
from pipeline.retrieval.encoder import Encoder, TextFormat
from pipeline.training.distributed import World
from pipeline.training.data import (
    mix_in,
    mix_sources,
    read_candidates,
    read_labelled_examples,
    read_mix_source,
    read_pairs,
    read_retrieval_examples,
    read_triples,
)
from pipeline.training.loop import batches, get_lr, plan_steps, planned_examples, steps_per_epoch, train
from pipeline.training.model_card import training_config, write_model

TOPICS = ["vaccines", "glaciers", "proteins", "rivers", "embeddings", "membranes", "foxes", "retrieval"]


def write_triples(path: Path, n: int = 8, without_negative: tuple[int, ...] = (3,)) -> Path:
    """A `triples` table shaped like the SQL stage's output, one null negative by default."""
    import duckdb

    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE triples (query_id VARCHAR, task VARCHAR, query VARCHAR, task_type VARCHAR, "
        "positive_id VARCHAR, positive_title VARCHAR, positive_text VARCHAR, negative_id VARCHAR, "
        "negative_title VARCHAR, negative_text VARCHAR, seed_id VARCHAR)"
    )
    for i in range(n):
        topic, other = TOPICS[i % len(TOPICS)], TOPICS[(i + 3) % len(TOPICS)]
        negative = (None, None, None) if i in without_negative else (f"d{i + 100}", "", f"a note on {other} {i}")
        con.execute(
            "INSERT INTO triples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [f"q{i:02d}", "Given a question, retrieve passages that answer it", f"what about {topic} {i}?",
             "question answering", f"d{i}", f"On {topic}", f"{topic} {i} are described in this passage.",
             *negative, f"d{i}"],
        )  # fmt: skip
    con.close()
    return path


def write_candidates(path: Path, n: int = 8, extras: int = 3) -> Path:
    """Table `distill_candidates` beside `write_triples`' rows: positive, negative and a few extras per query."""
    import duckdb

    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE distill_candidates (query_id VARCHAR, task VARCHAR, query VARCHAR, passage_id VARCHAR, "
        "title VARCHAR, text VARCHAR, teacher_score DOUBLE, fused_rank BIGINT)"
    )
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        passages = [(f"d{i}", f"On {topic}", f"{topic} {i} are described in this passage.", -1.0),
                    (f"d{i + 100}", "", f"a note on {TOPICS[(i + 3) % len(TOPICS)]} {i}", -9.0)]  # fmt: skip
        passages += [(f"x{i}_{j}", "", f"{TOPICS[(i + j + 1) % len(TOPICS)]} in passing, part {j}", -3.0 - j) for j in range(extras)]
        for rank, (pid, title, text, score) in enumerate(passages, start=1):
            con.execute(
                "INSERT INTO distill_candidates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [f"q{i:02d}", "Given a question, retrieve passages that answer it", f"what about {topic} {i}?",
                 pid, title, text, score, rank],
            )  # fmt: skip
    con.close()
    return path


def small_params(**overrides) -> TrainParams:
    values = dict(lr=1e-3, batch_size=4, max_steps=3, warmup_ratio=0.0, mrl_dims=[16, 8], temperature=0.05)
    return TrainParams(**(values | overrides))


@pytest.fixture()
def examples(tmp_path):
    return read_triples(write_triples(tmp_path / "triples.duckdb"), TextFormat())[0]


def fresh_encoder(folder: Path) -> Encoder:
    """A private copy of the tiny model: training mutates it, so never use the shared fixture."""
    return Encoder.load(folder, device="cpu")


# --- data -----------------------------------------------------------------------------------------


def test_read_triples_formats_counts_and_orders(tmp_path):
    examples, counts = read_triples(write_triples(tmp_path / "t.duckdb", n=6, without_negative=(1, 4)), TextFormat())
    assert (counts.triples, counts.queries, counts.with_negative, counts.without_negative) == (6, 6, 4, 2)
    first = examples[0]
    assert first.query == "task: Given a question, retrieve passages that answer it | query: what about vaccines 0?"
    assert first.positive == "title: On vaccines | text: vaccines 0 are described in this passage."
    assert first.negative == "title: none | text: a note on rivers 0"  # blank title -> "none"
    assert examples[1].negative is None and examples[1].negative_id is None
    assert [e.positive_id for e in examples] == [f"d{i}" for i in range(6)]


def test_read_triples_names_missing_columns(tmp_path):
    import duckdb

    con = duckdb.connect(str(tmp_path / "bad.duckdb"))
    con.execute("CREATE TABLE triples AS SELECT 'q' AS query_id, 'x' AS query")
    con.close()
    with pytest.raises(ValueError, match="lacks column"):
        read_triples(tmp_path / "bad.duckdb", TextFormat())


def test_read_pairs_unquoted_threshold_both_directions(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "sentence1\tsentence2\tscore\tgenre\tfile\tyear\n"
        'He said "hi.\tHe greeted them.\t4.200\tmain-news\tx\t2012\n'
        "A cat sleeps.\tA dog barks.\t0.500\tmain-news\tx\t2012\n"
        "A man plays a flute.\tA man is playing a flute.\t4.000\tmain-captions\tx\t2012\n"
    )
    pairs = read_pairs(tsv, 4.0, "Retrieve semantically similar text", TextFormat())
    assert len(pairs) == 4  # two pairs over the threshold, each in both directions
    assert pairs[0].query == 'task: Retrieve semantically similar text | query: He said "hi.'
    # Gecko's symmetric format by default: both sides are queries with the same task.
    assert pairs[0].positive == "task: Retrieve semantically similar text | query: He greeted them."
    assert pairs[1].query_text == "He greeted them." and pairs[1].positive_text == 'He said "hi.'
    assert all(p.negative is None for p in pairs)
    asymmetric = read_pairs(tsv, 4.0, "Retrieve semantically similar text", TextFormat(), symmetric=False)
    assert asymmetric[0].positive == "title: none | text: He greeted them."
    assert [e.query for e in asymmetric] == [e.query for e in pairs]


def test_read_triples_symmetric_task_types_format_passages_as_queries(tmp_path):
    import duckdb

    path = write_triples(tmp_path / "t.duckdb", n=4, without_negative=())
    con = duckdb.connect(str(path))
    con.execute("UPDATE triples SET task_type = 'sentence similarity', task = 'Find a paraphrase' WHERE query_id = 'q01'")
    con.close()
    plain, _ = read_triples(path, TextFormat())
    examples, _ = read_triples(path, TextFormat(), ["sentence similarity"])
    sym = examples[1]
    assert sym.positive == "task: Find a paraphrase | query: glaciers 1 are described in this passage."
    assert sym.negative == "task: Find a paraphrase | query: a note on embeddings 1"
    assert sym.positive_text == plain[1].positive_text  # the raw texts, which masking compares, are unchanged
    # Other task types keep the passage format.
    assert [e.positive for i, e in enumerate(examples) if i != 1] == [e.positive for i, e in enumerate(plain) if i != 1]
    assert examples[0].positive.startswith("title: ")


def test_mix_in_fraction_and_seed(examples):
    extra = [examples[0]] * 100
    mixed = mix_in(examples, extra, 0.2, seed=1)
    assert len(mixed) == len(examples) + 2  # 2 / (8 + 2) = 0.2
    assert mixed[: len(examples)] == examples


def test_mix_sources_shares_and_one_source_as_mix_in(examples):
    a, b = [examples[0]] * 100, [examples[1]] * 100
    mixed = mix_sources(examples, [(a, 0.2), (b, 0.4)], seed=1)
    assert len(mixed) == len(examples) + 4 + 8  # 4 / 20 = 0.2 and 8 / 20 = 0.4 of the result
    assert mixed[len(examples) : len(examples) + 4] == [examples[0]] * 4
    extra = [examples[i % 8] for i in range(50)]
    assert mix_sources(examples, [(extra, 0.3)], seed=5) == mix_in(examples, extra, 0.3, seed=5)


def write_intents(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


INTENTS = [(f"card question {i}", "card") for i in range(6)] + [(f"loan question {i}", "loan") for i in range(5)]
INTENTS += [("lonely text", "alone"), ("card question 0", "card")]  # a label of one text; a duplicate row


def test_read_labelled_examples_pairs_same_label_negatives_other_label(tmp_path):
    path = write_intents(tmp_path / "train.tsv", INTENTS)
    examples = read_labelled_examples(path, "Classify the intent", TextFormat(), seed=3)
    label = {t: lab for t, lab in INTENTS}
    assert sorted(e.query_text for e in examples) == sorted({t for t, lab in INTENTS if lab != "alone"})  # once each
    for e in examples:
        assert e.positive_text != e.query_text  # never its own positive
        assert label[e.positive_text] == label[e.query_text] and label[e.negative_text] != label[e.query_text]
        assert e.query == f"task: Classify the intent | query: {e.query_text}"
        assert e.positive == f"task: Classify the intent | query: {e.positive_text}"  # symmetric
        assert e.negative == f"task: Classify the intent | query: {e.negative_text}"
    # Content-derived ids: one per label (and task), so same-label texts in a batch are masked.
    by_label = {}
    for e in examples:
        by_label.setdefault(label[e.query_text], set()).add(e.positive_id)
    assert all(len(ids) == 1 for ids in by_label.values()) and len(set.union(*by_label.values())) == 2
    again = read_labelled_examples(path, "Classify the intent", TextFormat(), seed=3)
    assert again == examples
    assert read_labelled_examples(path, "Classify the intent", TextFormat(), seed=4) != examples
    plain = read_labelled_examples(path, "t", TextFormat(), seed=3, symmetric=False)
    assert plain[0].positive.startswith("title: ")


def test_same_label_examples_mask_each_other(tmp_path):
    from pipeline.training.losses import candidate_mask

    path = write_intents(tmp_path / "train.tsv", INTENTS)
    examples = read_labelled_examples(path, "t", TextFormat(), seed=3)
    card = [e for e in examples if e.query_text.startswith("card")][:2]
    loan = [e for e in examples if e.query_text.startswith("loan")][:1]
    mask = candidate_mask(card + loan)  # columns: positives | negatives | queries
    assert not mask[0, 1] and mask[0, 2]  # the other card example's positive is masked, the loan one's is not
    for j, e in enumerate(card):  # a card example's negative is masked for the loan query iff it is a loan
        assert bool(mask[2, 3 + j]) == (not e.negative_text.startswith("loan"))
    assert {e.negative_text.split()[0] for e in examples if e.query_text.startswith("card")} == {"loan", "lonely"}


def test_mix_holdout_leaves_out_exactly_the_dev_set(tmp_path):
    from pipeline.evaluation.mteb_eval import classification_task

    rows = [(f"intent {lab} text {i}", lab) for lab in ("a", "b", "c") for i in range(60)]
    path = write_intents(tmp_path / "train.tsv", rows)
    trained = read_labelled_examples(path, "t", TextFormat(), seed=0, holdout=0.25)
    dev = classification_task("dev", tmp_path, split="train", holdout=0.25)
    dev.load_data()
    dev_texts = set(dev.dataset["heldout"]["text"])
    seen = {t for e in trained for t in (e.query_text, e.positive_text, e.negative_text)}
    assert dev_texts and not seen & dev_texts  # disjoint
    assert seen | dev_texts == {t for t, _ in rows}  # and together the whole file


def write_judged(folder: Path) -> Path:
    """A BEIR folder: q1 cites d1 and d2, q2 cites d1 (d3 judged 0), q3 has only a 0 judgment."""
    (folder / "qrels").mkdir(parents=True)
    docs = [("d1", "Glaciers", "ice moves slowly"), ("d2", "", "rivers carry sand"), ("d3", "Foxes", "foxes hunt")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    queries = [("q1", "how do glaciers and rivers move?"), ("q2", "what moves ice?"), ("q3", "do foxes swim?")]
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries))
    judged = "q1\td1\t1\nq1\td2\t2\nq2\td1\t1\nq2\td3\t0\nq3\td3\t0\n"
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + judged)
    return folder


def test_read_retrieval_examples_one_per_relevant_document(tmp_path):
    examples = read_retrieval_examples(write_judged(tmp_path / "beir"), "train", "Find", TextFormat())
    assert [(e.query_text, e.positive_text) for e in examples] == [
        ("how do glaciers and rivers move?", "ice moves slowly"),
        ("how do glaciers and rivers move?", "rivers carry sand"),
        ("what moves ice?", "ice moves slowly"),
    ]  # score-0 judgments are not positives
    assert examples[0].query == "task: Find | query: how do glaciers and rivers move?"
    assert [e.positive for e in examples[:2]] == ["title: Glaciers | text: ice moves slowly", "title: none | text: rivers carry sand"]
    # The same abstract cited by two queries has one masking id: never a false in-batch negative.
    assert examples[0].positive_id == examples[2].positive_id != examples[1].positive_id
    assert all(e.negative is None and e.negative_id is None for e in examples)


def word_embed(texts):
    """A toy encoder for mining tests: unit bag-of-words vectors over a fixed vocabulary."""
    vocab = ["ice", "glaciers", "rivers", "sand", "foxes", "move", "moves", "hunt"]
    rows = np.array([[float(w in t.lower().replace("?", " ").split()) for w in vocab] for t in texts]) + 1e-3
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_read_retrieval_examples_mines_the_best_ranked_non_relevant_document(tmp_path):
    folder = write_judged(tmp_path / "beir")
    # A fourth document that shares q2's words but is not judged: the hard negative q2 should get.
    with open(folder / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "d4", "title": "", "text": "what moves ice sheets"}) + "\n")
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return word_embed(texts)

    examples = read_retrieval_examples(folder, "train", "Find", TextFormat(), embed=embed)
    plain = read_retrieval_examples(folder, "train", "Find", TextFormat())
    assert [(e.query, e.positive, e.positive_id) for e in examples] == [(e.query, e.positive, e.positive_id) for e in plain]
    assert calls == [2, 4]  # the two queries with a relevant document, then the whole corpus once
    by_query = {}
    for e in examples:
        by_query.setdefault(e.query_text, set()).add((e.negative_text, e.negative))
    # q1 cites d1 and d2: its best-ranked other document is d3 or d4, never one it cites; one negative per query.
    (q1_neg,) = by_query["how do glaciers and rivers move?"]
    assert q1_neg[0] in {"foxes hunt", "what moves ice sheets"}
    assert by_query["what moves ice?"] == {("what moves ice sheets", "title: none | text: what moves ice sheets")}
    # A negative cited as another query's positive shares its masking id (masked, not pushed away).
    ids = {e.positive_text: e.positive_id for e in examples}
    assert all(e.negative_id not in ids.values() or ids.get(e.negative_text) == e.negative_id for e in examples)
    assert all(e.negative_id.startswith("doc:") for e in examples)


def test_mined_negative_is_never_relevant_even_when_relevant_documents_rank_first(tmp_path):
    from pipeline.training.data import mine_hard_negatives

    corpus = [{"id": f"d{i}", "title": "", "text": f"doc {i}"} for i in range(5)]
    queries = [{"id": "q", "text": "q"}]
    # The encoder ranks d4 > d3 > d2 > d1 > d0; d4 and d3 are relevant: d2 is the negative.
    scores = {f"doc {i}": i for i in range(5)}

    def embed(texts):
        return np.array([[1.0, 0.0] if t == "task: t | query: q" else [scores[t.split("text: ")[1]], 1.0] for t in texts],
                        dtype=np.float32)

    found = mine_hard_negatives(queries, {"q": ["d3", "d4"]}, corpus, "t", TextFormat(), embed)
    assert found["q"]["id"] == "d2"
    # Every document relevant: no negative rather than a relevant one.
    assert mine_hard_negatives(queries, {"q": [d["id"] for d in corpus]}, corpus, "t", TextFormat(), embed) == {}


def test_read_mix_source_retrieval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stage runs from the params file's folder
    write_judged(tmp_path / "beir")
    (tmp_path / "params.yaml").write_text(
        "train:\n  mix:\n    - {path: beir, kind: retrieval, task: Find, fraction: 0.2}\n"
        "eval:\n  retrieval:\n    dev: {path: beir, split: train, holdout: 0.5, task: Find}\n"
    )
    params = load_params(tmp_path / "params.yaml")
    source = params.train.mix[0]
    assert (source.kind, source.split, source.holdout) == ("retrieval", "train", 0.0)
    assert (params.eval.retrieval["dev"].split, params.eval.retrieval["dev"].holdout) == ("train", 0.5)
    assert len(read_mix_source(source, TextFormat(), 0)) == 3
    raw = read_mix_source(source.model_copy(update={"raw": True}), TextFormat(), 0)
    assert (raw[0].query, raw[0].positive) == ("how do glaciers and rivers move?", "Glaciers ice moves slowly")
    mined = source.model_copy(update={"hard_negative": True})
    with pytest.raises(ValueError, match="hard_negative needs the encoder"):
        read_mix_source(mined, TextFormat(), 0)
    assert all(e.negative is not None for e in read_mix_source(mined, TextFormat(), 0, embed=word_embed))
    assert all(e.negative is None for e in read_mix_source(source, TextFormat(), 0, embed=word_embed))  # off by default


def test_retrieval_mix_holdout_leaves_out_exactly_the_dev_set():
    """The mix trains on the queries the eval set with the same split and holdout does not score."""
    from pipeline.labelled import read_beir

    sample = Path(__file__).resolve().parent.parent / "data" / "sample"
    trained = read_retrieval_examples(sample, "train", "Find", TextFormat(), holdout=0.3)
    dev, whole = read_beir(sample, "train", holdout=0.3), read_beir(sample, "train")
    seen, held = {e.query_text for e in trained}, {q["text"] for q in dev.queries}
    assert seen and held and not seen & held  # disjoint
    assert seen | held == {q["text"] for q in whole.queries}  # and together the whole split
    assert set(dev.qrels) == {q["id"] for q in dev.queries}
    relevant = sum(s > 0 for q in whole.queries if q["text"] in seen for s in whole.qrels[q["id"]].values())
    assert len(trained) == relevant


def test_read_mix_source_by_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stage runs from the params file's folder
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t5\n")
    write_intents(tmp_path / "intents.tsv", INTENTS)
    (tmp_path / "params.yaml").write_text(
        "train:\n  mix:\n    - {path: pairs.tsv, fraction: 0.1}\n"
        "    - {path: intents.tsv, kind: classification, fraction: 0.2, task: Classify, holdout: 0.1}\n"
    )
    mix = load_params(tmp_path / "params.yaml").train.mix
    assert [m.kind for m in mix] == ["pairs", "classification"]
    assert len(read_mix_source(mix[0], TextFormat(), 0)) == 2
    assert all(e.query.startswith("task: Classify | query: ") for e in read_mix_source(mix[1], TextFormat(), 0))
    # raw: both sides exactly the file's texts, as evaluate reads STS with eval.prefixes {sts: false}.
    raw = mix[0].model_copy(update={"raw": True})
    assert [(e.query, e.positive) for e in read_mix_source(raw, TextFormat(), 0)] == [("a", "b"), ("b", "a")]
    raw_intents = read_mix_source(mix[1].model_copy(update={"raw": True}), TextFormat(), 0)
    assert all((e.query, e.positive, e.negative) == (e.query_text, e.positive_text, e.negative_text) for e in raw_intents)
    # The original single-mapping form still loads, as a list of one.
    (tmp_path / "params.yaml").write_text("train:\n  mix:\n    path: pairs.tsv\n    min_score: 4.5\n")
    assert load_params(tmp_path / "params.yaml").train.mix[0].min_score == 4.5
    (tmp_path / "params.yaml").write_text("train:\n  mix: null\n")
    assert load_params(tmp_path / "params.yaml").train.mix == []


# --- schedule -------------------------------------------------------------------------------------


def test_get_lr_warmup_then_linear_decay():
    lrs = [get_lr(s, 10, 3, 1.0) for s in range(10)]
    assert lrs[:3] == [0.25, 0.5, 0.75]  # rising, never zero
    assert lrs[3] == 1.0  # peak right after warmup
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] == pytest.approx(1 / 7)  # last step: one decay slice above zero
    assert get_lr(0, 5, 0, 2e-5) == 2e-5  # no warmup


def test_plan_steps_and_batches():
    assert steps_per_epoch(9, 4) == 2  # the single leftover example is dropped
    assert steps_per_epoch(10, 4) == 3
    assert plan_steps(10, 2, None, 4, 0.1) == (6, 1)
    assert plan_steps(10, 2, 7, 4, 0.1) == (7, 1)  # max_steps overrides epochs
    with pytest.raises(ValueError, match="at least 2"):
        plan_steps(1, 1, None, 4, 0.0)
    got = list(batches(10, 4, 6, torch.Generator().manual_seed(0)))
    assert [len(b) for b in got] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(got[:3], [])) == list(range(10))  # each epoch is a permutation
    assert got[:3] != got[3:]  # reshuffled between epochs
    assert planned_examples(10, 4, 6) == 20 and planned_examples(9, 4, 3) == 12


def test_group_by_length_batches_are_seeded_shuffled_and_pad_less():
    lengths = [(i * 37) % 50 + 1 for i in range(100)]
    grouped = list(batches(100, 4, 50, torch.Generator().manual_seed(3), lengths))  # two epochs
    assert grouped == list(batches(100, 4, 50, torch.Generator().manual_seed(3), lengths))
    epochs = grouped[:25], grouped[25:]
    assert all(sorted(sum(epoch, [])) == list(range(100)) for epoch in epochs)
    # Which examples meet as in-batch negatives still changes between epochs.
    assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}

    def padded_tokens(chunks: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in chunks)

    plain = list(batches(100, 4, 50, torch.Generator().manual_seed(3)))
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
    # The short last batch stays last and the single leftover is still dropped, as without grouping.
    short = list(batches(10, 4, 6, torch.Generator().manual_seed(0), [1, 9, 2, 8, 3, 7, 4, 6, 5, 5]))
    assert [len(b) for b in short] == [4, 4, 2, 4, 4, 2]
    assert [len(b) for b in batches(9, 4, 2, torch.Generator().manual_seed(0), [1] * 9)] == [4, 4]


def test_world_shares_split_global_batches_in_rank_order():
    assert World(0, 3).shares(8) == [3, 3, 2] and World(0, 3).shares(2) == [1, 1, 0]
    rows = list(range(8))
    assert sum((rows[World(r, 3).own(8)] for r in range(3)), []) == rows
    assert World().own(5) == slice(0, 5)


# --- training -------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss(tiny_bert_dir, examples):  # noqa: F811
    from pipeline.training.losses import GeckoLoss

    encoder = fresh_encoder(tiny_bert_dir)
    params = small_params(batch_size=len(examples), max_steps=5, max_grad_norm=None)

    def loss_now() -> float:
        with torch.no_grad():  # eval mode: no dropout, so the comparison is exact
            return GeckoLoss(params.temperature, params.mrl_dims)(encoder, examples).item()

    before = loss_now()
    result = train(encoder, examples, params, seed=0)
    assert result.steps == 5 and result.examples == 5 * len(examples)
    assert loss_now() < before - 0.05
    assert not encoder.module.training  # left in eval mode for encoding


def test_same_seed_same_weights_other_seed_differs(tiny_bert_dir, examples):  # noqa: F811
    states = []
    for seed in (7, 7, 8):
        encoder = fresh_encoder(tiny_bert_dir)
        train(encoder, examples, small_params(), seed=seed)
        states.append(encoder.module.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_bfloat16_autocast_training_repeats_and_keeps_float32_weights(tiny_bert_dir, examples):  # noqa: F811
    states = {}
    for run, dtype in (("bf16", "bfloat16"), ("bf16 again", "bfloat16"), ("fp32", "float32")):
        encoder = Encoder.load(tiny_bert_dir, device="cpu", dtype=dtype)
        train(encoder, examples, small_params(), seed=3)
        states[run] = encoder.module.state_dict()
    assert all(torch.equal(states["bf16"][k], states["bf16 again"][k]) for k in states["bf16"])
    assert all(v.dtype == torch.float32 for v in states["bf16"].values() if v.is_floating_point())
    assert not all(torch.equal(states["bf16"][k], states["fp32"][k]) for k in states["bf16"])  # autocast ran


def test_mrl_dims_above_model_dim_fail_before_training(tiny_bert_dir, examples):  # noqa: F811
    encoder = fresh_encoder(tiny_bert_dir)
    with pytest.raises(ValueError, match="exceed the encoder's dimension"):
        train(encoder, examples, small_params(mrl_dims=[384, 16]), seed=0)


def test_saved_model_loads_in_sentence_transformers_with_same_embeddings(tiny_bert_dir, examples, tmp_path):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    from pipeline.params import BaseParams, EncoderParams
    from pipeline.training.data import DataCounts

    encoder = fresh_encoder(tiny_bert_dir)
    params = small_params()
    result = train(encoder, examples, params, seed=0)
    counts = DataCounts(triples=8, queries=8, with_negative=7, without_negative=1)
    config = training_config(
        base_model="tiny", encoder=encoder, params=params, encoder_params=EncoderParams(),
        base_params=BaseParams(), counts=counts, result=result,
    )  # fmt: skip
    path = write_model(encoder, tmp_path / "models" / "fret-encoder", config)

    texts = [e.query for e in examples] + [e.positive for e in examples]
    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, encoder.encode(texts), atol=1e-5)

    saved = json.loads((path / "fret_training.json").read_text())
    assert TrainParams.model_validate(saved["train"]) == params
    assert saved["result"]["steps"] == 3 and saved["data"]["without_negative"] == 1
    card = (path / "README.md").read_text()
    assert "| rows without a hard negative | 1 |" in card and "metrics/eval.json" in card
    assert "base_model: tiny" in card and "[32, 16, 8]" in card  # full dimension + mrl_dims


def test_dvclive_writes_per_step_metrics_and_no_dvc_yaml(tiny_bert_dir, examples, tmp_path, monkeypatch):  # noqa: F811
    from python_steps.train import LIVE_DIR, open_live

    from pipeline.params import Params
    from pipeline.training.data import DataCounts

    monkeypatch.chdir(tmp_path)
    params = Params(train=small_params())
    live = open_live(params, DataCounts(triples=8, queries=8, with_negative=7, without_negative=1))
    train(fresh_encoder(tiny_bert_dir), examples, params.train, seed=0, live=live)
    live.end()

    metrics = json.loads((tmp_path / LIVE_DIR / "metrics.json").read_text())
    assert set(metrics["train"]) == {"loss", "lr", "grad_norm"} and metrics["step"] == 2  # 0-based last step
    loss_rows = (tmp_path / LIVE_DIR / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss_rows[0].split("\t")[:2] == ["step", "loss"] and len(loss_rows) == 1 + 3
    logged = (tmp_path / LIVE_DIR / "params.yaml").read_text()
    assert "lr: 0.001" in logged and "triples: 8" in logged
    assert not list(tmp_path.rglob("dvc.yaml"))  # DVC owns dvc.yaml; dvclive must not write one


def run_stage(folder: Path, bert_dir: Path, n: int, train_yaml: str, monkeypatch) -> None:
    """The train stage's main() in `folder`, on `n` triples, with params.yaml's train section `train_yaml`."""
    from python_steps import train as stage

    (folder / "warehouse").mkdir()
    write_triples(folder / "warehouse" / "triples.duckdb", n=n)
    # No labelled mix unless the test gives one: the default mixes in data/sample's claims, absent here.
    mix = "" if "mix:" in train_yaml else "  mix: null\n"
    (folder / "params.yaml").write_text(f"encoder:\n  model: {bert_dir}\n  cache_path: null\ntrain:\n{train_yaml}{mix}")
    monkeypatch.chdir(folder)
    stage.main()


def test_stage_main_end_to_end(tiny_bert_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    run_stage(tmp_path, tiny_bert_dir, 6, "  batch_size: 3\n  epochs: 2\n  mrl_dims: [16]\n  lr: 1.0e-4\n", monkeypatch)
    out = capsys.readouterr().out
    assert "train: 4 steps, 12 examples" in out
    assert "6 triples over 6 queries (5 with a hard negative, 1 without)" in out
    assert (tmp_path / "models" / "fret-encoder" / "modules.json").is_file()
    assert (tmp_path / "dvclive" / "metrics.json").is_file()


def test_stage_mines_hard_negatives_for_a_retrieval_mix(tiny_bert_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    write_judged(tmp_path / "beir")
    mix = "  mix:\n    - {path: beir, kind: retrieval, task: Find, fraction: 0.5, hard_negative: true}\n"
    run_stage(tmp_path, tiny_bert_dir, 4, "  batch_size: 4\n  max_steps: 1\n  mrl_dims: []\n" + mix, monkeypatch)
    out = capsys.readouterr().out
    assert "+ 3 labelled (train.mix) examples (3 with a hard negative)" in out
    logged = json.loads((tmp_path / "models" / "fret-encoder" / "fret_training.json").read_text())
    assert logged["train"]["mix"][0]["hard_negative"] is True
    assert logged["data"]["mix_with_negative"] == 3


def test_stage_names_the_trained_weights_not_the_base(tiny_bert_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    # The fused AdamW step leaves torch's version counters alone: a cached hash would stay the base's.
    run_stage(tmp_path, tiny_bert_dir, 4, "  batch_size: 4\n  max_steps: 1\n  mrl_dims: []\n  lr: 1.0e-3\n", monkeypatch)
    out = capsys.readouterr().out
    saved = tmp_path / "models" / "fret-encoder"
    config = json.loads((saved / "fret_training.json").read_text())
    base = Encoder.load(tiny_bert_dir, device="cpu")
    assert config["base_model"] == base.identity
    assert config["model"].split("@")[1] == Encoder.load(saved, device="cpu").weights_hash[:12]
    assert config["model"] != config["base_model"]
    assert f"model: {config['base_model']} -> {config['model']} " in out


# --- distillation ---------------------------------------------------------------------------------


@pytest.fixture()
def with_candidates(tmp_path):
    """(examples, candidate lists) from one warehouse file holding both tables."""
    path = write_candidates(write_triples(tmp_path / "triples.duckdb"))
    return read_triples(path, TextFormat())[0], read_candidates(path, TextFormat())


def test_read_candidates_keys_by_formatted_query_in_passage_order(with_candidates):
    examples, pools = with_candidates
    assert set(pools) == {e.query for e in examples}
    first = pools[examples[0].query]
    assert [c.passage_id for c in first] == ["d0", "d100", "x0_0", "x0_1", "x0_2"]
    assert first[0].passage == examples[0].positive and first[1].passage == examples[0].negative
    assert first[0].score == -1.0


def test_read_candidates_missing_table_says_rebuild(tmp_path):
    with pytest.raises(ValueError, match="no table distill_candidates.*dvc repro triples"):
        read_candidates(write_triples(tmp_path / "t.duckdb"), TextFormat())


def test_read_candidates_empty_table_names_the_param(tmp_path):
    path = write_candidates(write_triples(tmp_path / "t.duckdb"), n=0)
    with pytest.raises(ValueError, match="distill_candidates is empty.*train.distill_weight > 0.*dvc repro triples"):
        read_candidates(path, TextFormat())


def test_distill_weight_zero_is_todays_training_bit_for_bit(tiny_bert_dir, with_candidates):  # noqa: F811
    examples, pools = with_candidates
    states, results = {}, {}
    for run, weight, given in (("plain", 0.0, None), ("zero", 0.0, pools), ("on", 0.5, pools), ("on again", 0.5, pools)):
        encoder = fresh_encoder(tiny_bert_dir)
        results[run] = train(encoder, examples, small_params(distill_weight=weight), seed=5, candidates=given)
        states[run] = encoder.module.state_dict()

    def same(a: str, b: str) -> bool:
        return all(torch.equal(states[a][k], states[b][k]) for k in states[a])

    assert same("plain", "zero") and results["plain"].losses == results["zero"].losses
    assert same("on", "on again") and results["on"].distill_losses == results["on again"].distill_losses
    assert not same("plain", "on")
    assert results["zero"].distill_losses == [] and len(results["on"].distill_losses) == 3
    assert all(d > 0 for d in results["on"].distill_losses)


def test_distill_needs_candidates_and_one_process(tiny_bert_dir, examples, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="needs the candidate lists"):
        train(fresh_encoder(tiny_bert_dir), examples, small_params(distill_weight=1.0), seed=0)
    monkeypatch.setattr(World, "current", classmethod(lambda cls: cls(0, 2)))
    with pytest.raises(ValueError, match="one process only"):
        train(fresh_encoder(tiny_bert_dir), examples, small_params(distill_weight=1.0), seed=0, candidates={"q": []})


# --- model selection ------------------------------------------------------------------------------


def selecting(**overrides) -> TrainParams:
    """small_params with model selection on; the dev set is never read (tests pass a FakeScorer)."""
    dev = {"retrieval": {"fake": {"path": "unused", "split": "dev", "task": "t"}}}
    return small_params(**({"eval_every": 1, "dev": dev} | overrides))


class FakeScorer:
    """Scores follow a script by call; records the weights it saw and burns torch RNG like a careless eval."""

    def __init__(self, scores: list[float]):
        self.scores, self.states = scores, []

    def __call__(self, encoder) -> dict[str, float]:
        self.states.append({k: v.clone() for k, v in encoder.module.state_dict().items()})
        torch.rand(100)  # must not shift training's dropout draws
        encoder.encode(["what about vaccines?"])  # a real pass through the model, in eval mode
        assert not encoder.module.training
        score = self.scores[len(self.states) - 1]
        return {"dev_a": score, "dev_b": score}


def test_selection_restores_the_best_step(tiny_bert_dir, examples):  # noqa: F811
    scorer = FakeScorer([0.1, 0.2, 0.9, 0.3, 0.4])  # steps 0..4, best after step 2
    encoder = fresh_encoder(tiny_bert_dir)
    result = train(encoder, examples, selecting(max_steps=4), seed=0, dev=scorer)
    assert result.selection["best_step"] == 2 and result.selection["best_score"] == pytest.approx(0.9)
    assert sorted(result.selection["scores"]) == ["0", "1", "2", "3", "4"]
    final = encoder.module.state_dict()
    assert all(torch.equal(final[k], scorer.states[2][k]) for k in final)
    assert not all(torch.equal(final[k], scorer.states[4][k]) for k in final)


def test_selection_keeps_the_base_when_no_step_beats_it(tiny_bert_dir, examples):  # noqa: F811
    scorer = FakeScorer([0.5, 0.5, 0.4, 0.3])  # a tie with step 0 is not a win
    encoder = fresh_encoder(tiny_bert_dir)
    base = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    result = train(encoder, examples, selecting(max_steps=3, eval_every=2), seed=0, dev=scorer)
    assert sorted(result.selection["scores"]) == ["0", "2", "3"]  # every 2 steps, and the last
    assert result.selection["best_step"] == 0
    assert all(torch.equal(encoder.module.state_dict()[k], base[k]) for k in base)


def test_selection_does_not_disturb_training(tiny_bert_dir, examples):  # noqa: F811
    states = []
    for dev in (None, FakeScorer([0.0, 0.1, 0.2, 0.3])):  # increasing: the last step is kept
        encoder = fresh_encoder(tiny_bert_dir)
        train(encoder, examples, selecting(), seed=11, dev=dev)
        states.append(encoder.module.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_selection_logs_dev_metrics_per_evaluation(tiny_bert_dir, examples, tmp_path, monkeypatch):  # noqa: F811
    from python_steps.train import LIVE_DIR, open_live

    from pipeline.params import Params
    from pipeline.training.data import DataCounts

    monkeypatch.chdir(tmp_path)
    params = Params(train=selecting(eval_every=2))
    live = open_live(params, DataCounts(triples=8, queries=8, with_negative=7, without_negative=1))
    train(fresh_encoder(tiny_bert_dir), examples, params.train, seed=0, live=live, dev=FakeScorer([0.1, 0.3, 0.2]))
    live.end()
    rows = (tmp_path / LIVE_DIR / "plots" / "metrics" / "dev" / "score.tsv").read_text().splitlines()
    assert [r.split("\t")[:2] for r in rows[1:]] == [["0", "0.1"], ["2", "0.3"], ["3", "0.2"]]  # step = updates done
    assert (tmp_path / LIVE_DIR / "plots" / "metrics" / "dev" / "dev_a.tsv").is_file()


def test_stage_with_distillation_and_selection(tiny_bert_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from python_steps import train as stage

    (tmp_path / "warehouse").mkdir()
    write_candidates(write_triples(tmp_path / "warehouse" / "triples.duckdb", n=6), n=6)
    dev = tmp_path / "dev"
    (dev / "qrels").mkdir(parents=True)
    (dev / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"c{i}", "text": f"{t} facts"}) + "\n" for i, t in enumerate(TOPICS)))
    (dev / "queries.jsonl").write_text(json.dumps({"_id": "k1", "text": "tell me about foxes"}) + "\n")
    (dev / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nk1\tc6\t1\n")
    (tmp_path / "params.yaml").write_text(
        f"encoder:\n  model: {tiny_bert_dir}\n  cache_path: null\n"
        "train:\n  batch_size: 3\n  epochs: 2\n  mrl_dims: [16]\n  lr: 1.0e-4\n  distill_weight: 0.5\n  mix: null\n"
        "  eval_every: 2\n  dev:\n    retrieval:\n      tiny_dev: {path: dev, split: dev, task: Find the passage}\n"
    )
    monkeypatch.chdir(tmp_path)
    stage.main()
    out = capsys.readouterr().out
    assert "distillation term" in out and "dev: best mean score" in out
    saved = json.loads((tmp_path / "models" / "fret-encoder" / "fret_training.json").read_text())
    assert saved["selection"]["best_step"] in (0, 2, 4) and saved["result"]["final_distill_loss"] > 0
    metrics = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert "best_step" in metrics["train"] and "tiny_dev" in metrics["dev"] and "distill_loss" in metrics["train"]


# --- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  lr: 0\n", "train.lr"),
        ("train:\n  temperature: -0.1\n", "train.temperature"),
        ("train:\n  batch_size: 1\n", "train.batch_size"),
        ("train:\n  mrl_dims: [64, 128]\n", "sorted largest first"),
        ("train:\n  mrl_dims: [128, 128]\n", "unique"),
        ("train:\n  mrl_dims: [128, 0]\n", "positive"),
        ("train:\n  warmup_ratio: 1.0\n", "train.warmup_ratio"),
        ("train:\n  mix:\n    path: nowhere.tsv\n", "mix file not found"),
        ("train:\n  mix:\n    path: params.yaml\n    fraction: 1.0\n", "train.mix.fraction"),
        ("train:\n  mix:\n    - {path: params.yaml}\n    - {path: params.yaml, fractio: 0.1}\n", r"params\.yaml:4: train\.mix\.1\.fractio: unknown key"),
        ("train:\n  mix:\n    - {path: params.yaml, fraction: 0.5}\n    - {path: params.yaml, fraction: 0.5}\n", "add up to 1"),
        ("train:\n  mix: [params.yaml]\n", "a mapping .one source., a list of mappings, or null"),
        ("train:\n  mix:\n    path: params.yaml\n    holdout: 0.2\n", "holdout applies to kind: classification"),
        ("train:\n  mix:\n    path: .\n    kind: retrieval\n", "kind: retrieval needs task"),
        ("train:\n  mix:\n    path: .\n    kind: retrieval\n    task: t\n", r"mix file not found: .*qrels/train\.tsv"),
        ("train:\n  mix:\n    path: .\n    kind: retrieval\n    task: t\n    split: test\n", "test split"),
        ("train:\n  mix:\n    path: .\n    kind: retrieval\n    task: t\n    symmetric: false\n", "symmetric applies"),
        ("train:\n  mix:\n    path: params.yaml\n    split: dev\n", "split applies to kind: retrieval only"),
        ("train:\n  mix:\n    path: params.yaml\n    hard_negative: true\n", "hard_negative applies to kind: retrieval only"),
        ("train:\n  mix:\n    path: params.yaml\n    kind: classification\n    min_score: 3\n", "min_score applies to kind: pairs"),
        ("train:\n  mix:\n    path: params.yaml\n    kind: labels\n", r"params\.yaml:4: train\.mix\.kind"),
        ("train:\n  learning_rate: 1e-4\n", "unknown key"),
        ("train:\n  nproc_per_node: 0\n", "train.nproc_per_node"),
        ("train:\n  dtype: float16\n", "train.dtype"),
        ("train:\n  distill_score: rc\n", "train.distill_score"),
        ("train:\n  distill_candidates: 1\n", "train.distill_candidates"),
        ("train:\n  distill_weight: 1.0\n  nproc_per_node: 2\n", "one process only"),
        ("train:\n  eval_every: 10\n", "train.dev names no dev set"),
        ("train:\n  dev:\n    retrieval:\n      s: {path: ., task: t}\n", r"train\.dev\.retrieval\.s\.split is 'test'"),
        ("train:\n  dev:\n    sts:\n      s: {path: ., split: dev, task: t}\n", "dev set 's': file not found"),
        ("train:\n  dev:\n    sts:\n      score: {path: ., split: dev, task: t}\n", "'score' is reserved"),
    ],
)
def test_train_params_rejected(tmp_path, yaml_text, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_lr_as_dvc_exp_set_writes_it(tmp_path):
    """`dvc exp run -S train.lr=3e-5` writes `3e-05`, which PyYAML reads as a string: still a float here."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 3e-05\n  mrl_dims: []\n")
    params = load_params(path).train
    assert params.lr == 3e-5 and isinstance(params.lr, float) and params.mrl_dims == []
