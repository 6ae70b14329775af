"""Contrastive fine-tuning of the encoder on the `triples` table (Gecko's recipe).

`read_triples` / `read_pairs` turn rows into `Example`s in the unified format, `read_candidates`
reads the LLM-scored candidate lists of the optional distillation term, `train` runs AdamW with
warmup + linear decay on `GeckoLoss` (+ `DistillLoss`), optionally keeping the best step on dev
sets (`pipeline.training.model_selection`) and saving a resumable `Checkpoint` every few steps, and
`write_model` saves a sentence-transformers folder with a model card and the training config beside
the weights (as nanoGPT keeps its config in the checkpoint). Same params and seed give identical
weights on CPU in float32, whether the run went through in one go or was killed and resumed.

Imported only by the train stage and the bench (torch loads at import time).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training.checkpoint import Checkpoint, agreed_state, rng_state, set_rng_state
from pipeline.training.distributed import World, broadcast_weights, gather_rows, sum_gradients
from pipeline.training.losses import Candidate, DistillLoss, Example, GeckoLoss, candidate_mask, mrl_dims
from pipeline.training.model_selection import ModelSelector, Scorer

TRIPLES_COLUMNS = [
    "query_id", "task_type", "task", "query", "positive_id", "positive_title", "positive_text",
    "negative_id", "negative_title", "negative_text",
]  # fmt: skip
# group_by_length sorts this many batches' worth of examples at a time: wide enough that batches
# pad little, narrow enough that batch composition stays random (HF's Trainer takes 50).
LENGTH_WINDOW = 16


@dataclass(frozen=True)
class DataCounts:
    """What the model was trained on, for the summary and the model card."""

    triples: int
    queries: int
    with_negative: int
    without_negative: int
    mix_examples: int = 0
    mix_with_negative: int = 0  # of the mixed-in examples, those with a hard negative


@dataclass
class TrainResult:
    steps: int
    examples: int  # examples seen, repeats across epochs included
    seconds: float  # the optimisation loop only (no loading or saving)
    losses: list[float] = field(repr=False)
    world_size: int = 1  # processes that trained together (torchrun); examples counts them all
    distill_losses: list[float] = field(default_factory=list, repr=False)  # the KL term per step, when on
    # Model selection (train.eval_every): ModelSelector.summary(), with best_step (0 = the base won).
    selection: dict[str, Any] | None = None
    resumed_from: int = 0  # the checkpoint's step this run started from (0: from scratch)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean of the last 10 steps' losses: one step's loss is too noisy to compare runs by."""
        return _tail_mean(self.losses)

    @property
    def final_distill_loss(self) -> float | None:
        """Mean of the last 10 steps' distillation terms; None when distillation was off."""
        return _tail_mean(self.distill_losses) if self.distill_losses else None


def _tail_mean(values: Sequence[float], n: int = 10) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail) if tail else float("nan")


# --- data -----------------------------------------------------------------------------------------


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


# --- schedule -------------------------------------------------------------------------------------


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Batches per epoch; a last batch of a single example is dropped (it has no in-batch negatives)."""
    full, rest = divmod(n_examples, batch_size)
    return full + (rest >= 2)


def plan_steps(n_examples: int, epochs: int, max_steps: int | None, batch_size: int, warmup_ratio: float) -> tuple[int, int]:
    """(total steps, warmup steps): max_steps when set, else epochs x batches per epoch."""
    if n_examples < 2:
        raise ValueError(f"need at least 2 training examples, got {n_examples}")
    total = max_steps or epochs * steps_per_epoch(n_examples, batch_size)
    return total, math.ceil(warmup_ratio * total)


def get_lr(step: int, total_steps: int, warmup_steps: int, lr: float) -> float:
    """Learning rate for `step` (0-based)."""
    # 1) linear warmup: small first steps while Adam's moment estimates are still noisy
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    # 2) linear decay to zero at the last step, so the final updates barely move the weights
    return lr * (total_steps - step) / max(1, total_steps - warmup_steps)


def planned_examples(n_examples: int, batch_size: int, total_steps: int) -> int:
    """Examples that `batches` yields over `total_steps` steps (for the progress bar's total)."""
    sizes = [batch_size] * (n_examples // batch_size) + ([n_examples % batch_size] if n_examples % batch_size >= 2 else [])
    epochs, rest = divmod(total_steps, len(sizes))
    return epochs * sum(sizes) + sum(sizes[:rest])


def batches(
    n_examples: int,
    batch_size: int,
    total_steps: int,
    generator: torch.Generator,
    lengths: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """Index batches for `total_steps` steps: a fresh seeded permutation per epoch.

    With `lengths` (token counts per example), batches group examples of similar length, so each
    pads to less (see `_group_by_length`); without, they are plain slices of the permutation.
    """
    done = 0
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        if lengths is not None:
            chunks = _group_by_length(order, batch_size, lengths, generator)
        else:
            chunks = [order[start : start + batch_size] for start in range(0, n_examples, batch_size)]
        for chunk in chunks:
            if len(chunk) < 2:
                continue
            yield chunk
            done += 1
            if done == total_steps:
                return


def _group_by_length(
    order: list[int], batch_size: int, lengths: Sequence[int], generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches of similar-length examples, still random (the recipe of HF's group_by_length).

    The permutation is cut into windows of LENGTH_WINDOW batches, each window is sorted by length
    and cut into batches, and the full batches are shuffled over the whole epoch (the short last
    one stays last, as without grouping). Windows differ every epoch, so which examples meet as
    in-batch negatives still changes between epochs, but within a window they meet by length (so
    copies of one query, being equally long, meet too: see `TrainParams.group_by_length`).
    """
    span = LENGTH_WINDOW * batch_size
    # sorted() is stable: equal lengths keep their random order, so ties do not repeat across epochs.
    windows = [order[start : start + span] for start in range(0, len(order), span)]
    grouped = [i for window in windows for i in sorted(window, key=lengths.__getitem__)]
    chunks = [grouped[start : start + batch_size] for start in range(0, len(grouped), batch_size)]
    full = len(order) // batch_size
    shuffled = torch.randperm(full, generator=generator).tolist()
    return [chunks[i] for i in shuffled] + chunks[full:]


def example_lengths(encoder, examples: Sequence[Example]) -> list[int]:
    """Tokens per example (query + positive + negative, after truncation): the batch-grouping key.

    Each batch pads its queries to their longest and its passages to theirs, so examples of similar
    total length waste little padding together.
    """
    queries = encoder.tokenize([e.query for e in examples])
    positives = encoder.tokenize([e.positive for e in examples])
    negatives = encoder.tokenize([e.negative or "" for e in examples])
    return [
        len(q) + len(p) + (len(n) if e.negative is not None else 0)
        for e, q, p, n in zip(examples, queries, positives, negatives, strict=True)
    ]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (init, dropout) so that a run repeats exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays matrices only: decaying biases and LayerNorm gains only shrinks them.

    The fused kernel (one pass over each tensor, on CPU and CUDA) is what HF's Trainer uses by
    default; it is deterministic too, and about twice as fast as the for-each one on CPU.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class _LiveLog:
    """A dvclive `Live` that keeps what it was given, so that a resumed run writes the same files.

    Live starts its files afresh; a resumed run replays the checkpoint's events into it first, so
    its plots and summary equal an uninterrupted run's (rows for steps a killed run logged after its
    checkpoint are not kept: those steps are done again).
    """

    def __init__(self, live, events: Sequence[tuple[str, float] | None] = ()) -> None:
        self.live = live
        self.events: list[tuple[str, float] | None] = []
        for event in events:
            if event is None:
                self.next_step()
            else:
                self.log_metric(*event)

    def log_metric(self, name: str, value: float) -> None:
        self.events.append((name, value))
        self.live.log_metric(name, value)

    def next_step(self) -> None:
        self.events.append(None)
        self.live.next_step()


# --- training -------------------------------------------------------------------------------------


def batch_loss(loss_fn: GeckoLoss, encoder, batch: Sequence[Example], world: World) -> torch.Tensor:
    """The loss of a global batch; with several ranks each embeds only its share of the rows.

    The embeddings are gathered before the loss, so every query still sees the whole global batch
    as in-batch negatives, and the false-negative mask covers it all.
    """
    if world.size == 1:
        return loss_fn(encoder, batch)
    local = loss_fn.embed(encoder, batch[world.own(len(batch))])
    q, p, n = (gather_rows(t, world.shares(len(batch)), world.rank) for t in local)
    return loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(batch).to(q.device))


@dataclass(frozen=True)
class Distillation:
    """The soft-label term as `train` adds it: weight x `DistillLoss` over each query's candidates."""

    loss: DistillLoss
    weight: float
    pools: Mapping[str, Sequence[Candidate]]  # `read_candidates`: formatted query -> candidates
    seed: int

    def rng(self, step: int) -> random.Random:
        """The candidate draws of `step`, fixed by base.seed and the step alone.

        `random.Random` hashes a string seed with SHA-512, the same in every process and Python
        version; a private generator leaves torch's dropout and data-order draws untouched.
        """
        return random.Random(f"distill:{self.seed}:{step}")


def distillation(params, pools: Mapping[str, Sequence[Candidate]] | None, seed: int, world: World) -> Distillation | None:
    """The term for `params` (`TrainParams`); None at distill_weight 0, so training stays bit for bit the contrastive one.

    Raises:
        ValueError: distillation asked for without candidate lists, or under data parallelism.
    """
    if params.distill_weight == 0:
        return None
    if world.size > 1:
        raise ValueError("train.distill_weight > 0 trains in one process only: run without torchrun (nproc_per_node: 1)")
    if not pools:
        raise ValueError("train.distill_weight > 0 needs the candidate lists of table distill_candidates")
    loss = DistillLoss(params.temperature, params.distill_temperature, params.distill_candidates, params.mrl_dims)
    return Distillation(loss, params.distill_weight, pools, seed)


def distilled_loss(
    loss_fn: GeckoLoss, distill: Distillation, encoder, batch: Sequence[Example], step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, KL term) of a batch: contrastive + weight x distillation on one set of q, p, n embeddings."""
    q, p, n = loss_fn.embed(encoder, batch)
    contrastive = loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(batch).to(q.device))
    term = distill.loss(encoder, batch, distill.pools, (q, p, n), distill.rng(step))
    return contrastive + distill.weight * term, term


def train(
    encoder,
    examples: Sequence[Example],
    params,
    *,
    seed: int,
    live=None,
    progress: bool = False,
    candidates: Mapping[str, Sequence[Candidate]] | None = None,
    dev: Scorer | None = None,
    checkpoint: Checkpoint | None = None,
) -> TrainResult:
    """Fine-tune `encoder.module` in place on `examples` with Gecko's loss.

    Under torchrun (inside `distributed`) every rank draws the same global batches from the same
    seeded generator and embeds its own share of each; the embeddings are gathered for the loss
    and the gradients summed, so K processes train like one with the same `batch_size` (equal
    weights up to float rounding when dropout is off; each rank draws its own dropout masks).

    Args:
        encoder: a `pipeline.retrieval.encoder.Encoder`; its `dtype` decides bfloat16 autocast.
        params: the `train` section (`TrainParams`).
        seed: `base.seed`; it fixes dropout and the data order.
        live: a dvclive `Live` (or None); gets train/loss, train/lr, train/grad_norm per step.
        progress: show a tqdm bar (examples/s) on stderr.
        candidates: `read_candidates`' lists; needed when params.distill_weight > 0.
        dev: encoder -> {dev set: score} (a `DevScorer`); with params.eval_every set, the weights of
            the best-scoring step (0 = before training) are left in `encoder` instead of the last.
        checkpoint: where to save the run's state every `checkpoint.every` steps; a run that finds
            its own checkpoint there continues from it and ends with the weights (and dvclive
            files) of an uninterrupted run. The caller removes it once the model is saved.
    """
    mrl_dims(encoder.dim, params.mrl_dims)  # fail before any work when a dimension is too large
    world = World.current()
    distill = distillation(params, candidates, seed, world)
    total, warmup = plan_steps(len(examples), params.epochs, params.max_steps, params.batch_size, params.warmup_ratio)
    seed_everything(seed + world.rank)  # only dropout differs by rank; rank 0 matches one process
    lengths = example_lengths(encoder, examples) if params.group_by_length else None
    order = batches(len(examples), params.batch_size, total, torch.Generator().manual_seed(seed), lengths)
    loss_fn = GeckoLoss(params.temperature, params.mrl_dims)
    if world.size > 1:
        broadcast_weights(encoder.module)
    optimizer = make_optimizer(encoder.module, params.lr, params.weight_decay)
    bar = _progress_bar(planned_examples(len(examples), params.batch_size, total), encoder.name) if progress else None
    state = agreed_state(checkpoint.load(total) if checkpoint is not None else None, world, encoder.device)
    # Replayed from a checkpoint's events, or recorded for the checkpoints to come.
    live = _LiveLog(live, state["live"] if state is not None else ()) if live is not None else None
    selector = ModelSelector(dev, params.eval_every, total, live) if dev is not None and params.eval_every else None
    losses: list[float] = []
    distill_losses: list[float] = []
    seen, start, before = 0, 0, 0.0
    if state is not None:
        start, seen, before = state["step"], state["seen"], state["seconds"]
        losses, distill_losses = list(state["losses"]), list(state["distill_losses"])
        encoder.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if selector is not None:
            selector.load_state_dict(state["selection"])
        set_rng_state(state["rng"])
        if progress:
            print(f"train: resuming from step {start} of {total} ({checkpoint.path})", file=sys.stderr)
        if bar is not None:
            bar.update(seen)
        del state  # the checkpoint's tensors: a model's worth of memory, and more
    encoder.module.train()  # dropout on, as in BERT's and sentence-transformers' fine-tuning
    started = time.perf_counter()
    saving = 0.0  # seconds spent writing checkpoints, left out of the throughput like evaluation

    def elapsed() -> float:
        return before + time.perf_counter() - started - saving - (selector.seconds if selector is not None else 0.0)

    try:
        if selector is not None and start == 0:
            selector.evaluate(encoder, 0)  # the base is a candidate: training may never beat it
        for step, rows in enumerate(order):
            if step < start:
                continue  # drawing the done steps' batches again puts the data order where it was
            lr = get_lr(step, total, warmup, params.lr)
            batch = [examples[i] for i in rows]
            loss, grad_norm, term = _step(encoder, loss_fn, optimizer, batch, lr, params.max_grad_norm, world, distill, step)
            losses.append(loss)
            if not math.isfinite(loss):
                raise ValueError(f"loss is {loss} at step {step + 1}: lower train.lr or raise train.temperature")
            if term is not None:
                distill_losses.append(term)
            seen += len(rows)
            _log_step(live, loss, lr, grad_norm, term)
            if selector is not None and selector.due(step + 1):
                selector.evaluate(encoder, step + 1)  # logged at dvclive step = updates done
            if checkpoint is not None and checkpoint.due(step + 1, total):
                saving_started = time.perf_counter()
                checkpoint.save({
                    "step": step + 1, "total": total, "model": encoder.module.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": rng_state(), "losses": losses,
                    "distill_losses": distill_losses, "seen": seen, "seconds": elapsed(),
                    "selection": selector.state_dict() if selector is not None else None,
                    "live": live.events if live is not None else None,
                })  # fmt: skip
                saving += time.perf_counter() - saving_started
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if selector is not None:
            selector.restore(encoder, len(losses))
    finally:
        encoder.module.eval()
        if bar is not None:
            bar.close()
    # Throughput is the optimisation's: dev evaluations and checkpoints are left out of the time, and
    # a resumed run adds the time its checkpoint had taken.
    return TrainResult(
        steps=len(losses), examples=seen, seconds=elapsed(), losses=losses, world_size=world.size,
        distill_losses=distill_losses, selection=selector.summary() if selector is not None else None,
        resumed_from=start,
    )  # fmt: skip


def _log_step(live, loss: float, lr: float, grad_norm: float, distill_loss: float | None) -> None:
    """One step's numbers to dvclive, then its next step."""
    if live is None:
        return
    live.log_metric("train/loss", loss)
    live.log_metric("train/lr", lr)
    live.log_metric("train/grad_norm", grad_norm)
    if distill_loss is not None:
        live.log_metric("train/distill_loss", distill_loss)
    live.next_step()


def _step(
    encoder, loss_fn: GeckoLoss, optimizer, batch: list[Example], lr: float, max_norm: float | None, world: World,
    distill: Distillation | None = None, step: int = 0,
) -> tuple[float, float, float | None]:  # fmt: skip
    """One optimisation step on a global batch; returns (loss, gradient norm before clipping, KL term or None)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if distill is None:
        loss, term = batch_loss(loss_fn, encoder, batch, world), None
    else:
        loss, term = distilled_loss(loss_fn, distill, encoder, batch, step)
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:  # a rank with no share of a tiny last batch has nothing to backpropagate
        loss.backward()
    if world.size > 1:
        sum_gradients(encoder.module)
    grad_norm = _clip(encoder.module, max_norm)
    optimizer.step()
    # One host-device sync per step for all numbers (on CUDA each .item() would wait on its own).
    numbers = [loss.detach(), grad_norm.to(loss.dtype)] + ([term.detach()] if term is not None else [])
    values = torch.stack(numbers).tolist()
    return values[0], values[1], values[2] if term is not None else None


def _clip(module: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip gradients to max_norm (None: no clipping); returns the norm before clipping."""
    limit = max_norm if max_norm is not None else float("inf")
    return torch.nn.utils.clip_grad_norm_(module.parameters(), limit)


def _progress_bar(total_examples: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_examples, unit="ex", desc=f"train {name}", smoothing=0.1)


# --- saving ---------------------------------------------------------------------------------------


def write_model(encoder, path: str | Path, config: dict[str, Any]) -> Path:
    """Save the encoder as a sentence-transformers folder, with `fret_training.json` and a model card.

    Args:
        config: what `training_config` returns; written as JSON and summarised in README.md.
    """
    # Inside the folder before it is swapped in: a crash never leaves new weights without their config.
    extra = {"fret_training.json": json.dumps(config, indent=2) + "\n", "README.md": model_card(config)}
    return encoder.save(path, extra_files=extra)


def training_config(
    *, base_model: str, encoder, params, encoder_params, base_params, counts: DataCounts, result: TrainResult
) -> dict[str, Any]:
    """Everything needed to know how the saved weights were made (JSON-ready).

    Args:
        base_model: the encoder's identity before training; `encoder` is the trained one.
    """
    return {
        "base_model": base_model,
        "model": encoder.identity,
        "mrl_dims": mrl_dims(encoder.dim, params.mrl_dims),
        "train": params.model_dump(mode="json"),
        "encoder": encoder_params.model_dump(mode="json", exclude={"cache_path", "batch_size"}),
        "base": base_params.model_dump(mode="json"),
        "data": asdict(counts),
        "result": {
            "steps": result.steps,
            "examples": result.examples,
            "seconds": round(result.seconds, 3),
            "examples_per_s": round(result.examples_per_s, 3),
            "dtype": encoder.dtype,
            "world_size": result.world_size,
            "final_loss": result.final_loss,
            "first_loss": result.losses[0] if result.losses else None,
            "final_distill_loss": result.final_distill_loss,
        },
        # best_step 0: no step beat the base on the dev sets, so the saved weights are the base's.
        "selection": result.selection,
    }


def _selection_line(selection: dict[str, Any] | None, steps: int) -> str:
    """The model card's sentence on which step's weights were saved."""
    if selection is None:
        return "The weights are those of the last step."
    best = selection["best_step"]
    which = "the base model's (no step beat it)" if best == 0 else f"those of step {best} of {steps}"
    return (
        f"The weights are {which}: the best mean dev score ({selection['best_score']:.4f}) over evaluations "
        f"every {selection['every']} steps (see `selection` in fret_training.json)."
    )


def model_card(config: dict[str, Any]) -> str:
    """A sentence-transformers style README.md; eval scores are left to the evaluate stage's file."""
    data, res, enc = config["data"], config["result"], config["encoder"]
    params_json = json.dumps({"train": config["train"], "encoder": enc, "base": config["base"]}, indent=2)
    example_query = enc["query_template"].format(task="Given a question, retrieve passages that answer it", query="...")
    example_passage = enc["passage_template"].format(title=enc["empty_title"], text="...")
    return f"""---
library_name: sentence-transformers
base_model: {config["base_model"]}
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, fret, gecko]
---

# fret-encoder

A text encoder fine-tuned by fret from `{config["base_model"]}` with Gecko's recipe (Lee et al. 2024,
arXiv 2403.20327): LLM-generated queries, LLM-ranked positives and hard negatives, and a softmax loss
over in-batch positives, hard negatives and same-tower (query) negatives, with Matryoshka dimensions
{config["mrl_dims"]} (the first k coordinates, re-normalised, are an embedding of their own).

Weights: `{config["model"]}` (name@sha256 of weights and tokenizer).

## Use

The model was trained on texts in this unified format:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["{example_query}"])
passages = model.encode(["{example_passage}"])
```

Raw texts work too (`model.encode(["..."])`), and fret's evaluate stage reads them raw by default
(`eval.prefixes: false`): on the dev splits fret measured (SciFact, STS Benchmark, Banking77) a
model trained this way scored as well or better on raw texts. Choose per task on your own dev data.

## Training data

| | count |
|---|---|
| triples (training rows) | {data["triples"]} |
| distinct queries | {data["queries"]} |
| rows with a hard negative | {data["with_negative"]} |
| rows without a hard negative | {data["without_negative"]} |
| labelled examples mixed in (train.mix) | {data["mix_examples"]} |

## Training

{res["steps"]} steps, {res["examples"]} examples in {res["seconds"]:.1f} s ({res["examples_per_s"]:.1f} examples/s);
loss {res["first_loss"]:.4f} at the first step, {res["final_loss"]:.4f} over the last steps.
{_selection_line(config.get("selection"), res["steps"])}

Parameters (also in `fret_training.json`):

```json
{params_json}
```

## Evaluation

Scores are written by fret's evaluate stage to `metrics/eval.json` in the project that trained this
model (they are computed after training, so this card does not repeat them).
"""
