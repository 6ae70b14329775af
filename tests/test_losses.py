"""GeckoLoss and DistillLoss against hand-written references (explicit loops, softmax by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from fixtures_encoder import tiny_bert_dir, tiny_encoder  # noqa: F401  (session fixtures)
from pipeline.training.losses import Candidate, DistillLoss, Example, GeckoLoss, candidate_mask, mrl_dims, sample_candidates


def example(q: str, p_id: str, p: str, n_id: str | None = None, n: str | None = None) -> Example:
    """An example whose formatted texts are the raw ones with a prefix (enough for the loss)."""
    return Example(
        query=f"query: {q}",
        positive=f"text: {p}",
        negative=None if n is None else f"text: {n}",
        query_text=q,
        positive_text=p,
        negative_text=n,
        positive_id=p_id,
        negative_id=n_id,
    )


DISTINCT = [example(f"q{i}", f"p{i}", f"passage {i}", f"n{i}", f"negative {i}") for i in range(5)]
# Every masking rule fires at least once:
#   row 2 has row 0's positive id; row 3's negative is row 1's positive (by id); row 4 repeats
#   row 0's query text; row 1 has no negative; row 5's negative has row 0's positive text under
#   another id; row 6's own negative is its own positive (a data bug the mask must absorb).
TRICKY = [
    example("q0", "p0", "passage 0", "n0", "negative 0"),
    example("q1", "p1", "passage 1"),
    example("q2", "p0", "passage 0", "n2", "negative 2"),
    example("q3", "p3", "passage 3", "p1", "passage 1"),
    example("q0", "p4", "passage 4", "n4", "negative 4"),
    example("q5", "p5", "passage 5", "copy-of-p0", "passage 0"),
    example("q6", "p6", "passage 6", "p6", "passage 6"),
]


def reference_loss(batch: list[Example], q, p, n, temperature: float, dims: list[int], masking: bool = True) -> float:
    """Gecko's loss written the slow, obvious way: loops over queries and candidates, float64 math."""

    def cosine(a, b, d):
        a, b = a[:d].tolist(), b[:d].tolist()
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    def is_false_negative(i, kind, j):
        """The masking rules, restated per candidate."""
        e, c = batch[i], batch[j]
        if kind == "p":
            return j != i and (c.positive_id == e.positive_id or c.positive_text in (e.query_text, e.positive_text)
                               or c.query_text == e.query_text)
        if kind == "n":
            return c.negative_id == e.positive_id or c.negative_text in (e.query_text, e.positive_text)
        return j == i or c.query_text in (e.query_text, e.positive_text)

    per_dim = []
    for d in dims:
        total = 0.0
        for i in range(len(batch)):
            logits = []
            for kind, vectors in (("p", p), ("n", n), ("q", q)):
                for j in range(len(batch)):
                    if kind == "n" and batch[j].negative is None:
                        continue  # a missing negative is never a candidate
                    if masking and is_false_negative(i, kind, j):
                        continue
                    if not masking and kind == "q" and j == i:
                        continue  # q_i against itself is never a candidate
                    logits.append(cosine(q[i], vectors[j], d) / temperature)
            target = cosine(q[i], p[i], d) / temperature
            peak = max(logits)
            log_sum = peak + math.log(sum(math.exp(x - peak) for x in logits))
            total += -(target - log_sum)
        per_dim.append(total / len(batch))
    return sum(per_dim) / len(per_dim)


def random_embeddings(batch_size: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, dim, generator=generator) for _ in range(3)]


def unmasked(batch: list[Example]) -> torch.Tensor:
    """Only q_i itself and missing negatives excluded: the mask without false-negative rules."""
    b = len(batch)
    has_negative = torch.tensor([e.negative is not None for e in batch])
    return torch.cat([torch.ones(b, b, dtype=torch.bool), has_negative.expand(b, b), ~torch.eye(b, dtype=torch.bool)], 1)


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_loss_without_masking_equals_reference(temperature):
    q, p, n = random_embeddings(len(DISTINCT), 16)
    mask = candidate_mask(DISTINCT)
    assert torch.equal(mask, unmasked(DISTINCT))  # nothing to mask in distinct examples
    loss = GeckoLoss(temperature).compute_loss_from_embeddings(q, p, n, mask)
    assert loss.item() == pytest.approx(reference_loss(DISTINCT, q, p, n, temperature, [16]), rel=1e-5)


def test_loss_with_masking_equals_reference_and_differs_from_unmasked():
    q, p, n = random_embeddings(len(TRICKY), 16, seed=1)
    n[1] = 0  # a missing negative: its row is ignored whatever it holds
    loss = GeckoLoss(0.05).compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY)).item()
    assert loss == pytest.approx(reference_loss(TRICKY, q, p, n, 0.05, [16]), rel=1e-5)
    plain = GeckoLoss(0.05).compute_loss_from_embeddings(q, p, n, unmasked(TRICKY)).item()
    assert plain == pytest.approx(reference_loss(TRICKY, q, p, n, 0.05, [16], masking=False), rel=1e-5)
    assert abs(loss - plain) > 1e-3


def test_mask_entries():
    mask = candidate_mask(TRICKY)
    b = len(TRICKY)
    p_col, n_col, q_col = (lambda j: j), (lambda j: b + j), (lambda j: 2 * b + j)
    assert mask[0, p_col(0)] and mask[2, p_col(2)]  # targets stay even when ids repeat
    assert not mask[0, p_col(2)] and not mask[2, p_col(0)]  # same positive id
    assert not mask[1, n_col(3)]  # row 3's negative is row 1's positive
    assert mask[3, n_col(3)] and mask[0, n_col(3)]  # ...but a fine negative for others
    assert not mask[0, q_col(4)] and not mask[4, q_col(0)]  # repeated query text
    assert not mask[0, p_col(4)] and not mask[4, p_col(0)]  # ...whose positives are both relevant to it
    assert mask[0, n_col(4)] and mask[4, n_col(0)]  # ...while its hard negatives stay negatives
    assert not mask[:, n_col(1)].any()  # no negative at all
    assert not mask[0, n_col(5)] and not mask[2, n_col(5)]  # row 0's positive text under another id
    assert not mask[6, n_col(6)]  # own negative == own positive
    assert not mask[torch.arange(b), q_col(torch.arange(b))].any()  # never q_i against itself
    assert mask[1, p_col(0)] and mask[1, q_col(0)]  # ordinary in-batch and same-tower negatives


def test_masked_candidates_do_not_change_the_loss():
    q, p, n = random_embeddings(len(TRICKY), 16, seed=2)
    loss_fn = GeckoLoss(0.05)
    # n_1 (a missing negative) is masked for every row, so no value placed there may leak in.
    before = loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY))
    n[1] = torch.randn(16) * 10
    after = loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY))
    assert torch.equal(before, after)


def test_matryoshka_equals_reference_average_over_dims():
    q, p, n = random_embeddings(len(TRICKY), 16, seed=3)
    loss = GeckoLoss(0.05, mrl_dims=[8, 4]).compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY))
    assert loss.item() == pytest.approx(reference_loss(TRICKY, q, p, n, 0.05, [16, 8, 4]), rel=1e-5)
    # The full dimension is implied, and listing it again changes nothing.
    again = GeckoLoss(0.05, mrl_dims=[16, 8, 4]).compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY))
    assert torch.equal(loss, again)


def test_mrl_dims_larger_than_model_rejected():
    assert mrl_dims(32, [16, 8]) == [32, 16, 8]
    with pytest.raises(ValueError, match="exceed the encoder's dimension 32"):
        mrl_dims(32, [64, 16])


def test_agrees_with_sentence_transformers_mnrl_query_to_doc_and_query_to_query():
    """With nothing to mask, Gecko's loss is MNRL with directions query->doc and query->query."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    q, p, n = random_embeddings(len(DISTINCT), 16, seed=4)
    ours = GeckoLoss(0.05).compute_loss_from_embeddings(q, p, n, candidate_mask(DISTINCT))
    peer = MultipleNegativesRankingLoss(None, scale=20.0, directions=("query_to_doc", "query_to_query"))
    theirs = peer.compute_loss_from_embeddings([q, p, n], None)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_forward_embeds_and_places_missing_negatives(tiny_bert_dir):  # noqa: F811
    from pipeline.retrieval.encoder import Encoder

    encoder = Encoder.load(tiny_bert_dir, device="cpu")  # eval mode: no dropout, so repeatable
    loss_fn = GeckoLoss(0.05, mrl_dims=[16])
    loss = loss_fn(encoder, TRICKY)
    q = encoder.embed([e.query for e in TRICKY])
    p = encoder.embed([e.positive for e in TRICKY])
    n = torch.stack([encoder.embed([e.negative])[0] if e.negative else torch.zeros(encoder.dim) for e in TRICKY])
    expected = reference_loss(TRICKY, q.detach(), p.detach(), n, 0.05, [encoder.dim, 16])
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()  # gradients reach the weights
    assert encoder.module.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_embed_matches_forward_and_empty_batch_gives_empty_rows(tiny_encoder):  # noqa: F811
    loss_fn = GeckoLoss(0.05)
    with torch.no_grad():
        q, p, n = loss_fn.embed(tiny_encoder, TRICKY)
        assert torch.equal(n[1], torch.zeros_like(n[1]))  # row 1 has no negative
        from_parts = loss_fn.compute_loss_from_embeddings(q, p, n, candidate_mask(TRICKY))
        assert torch.equal(from_parts, loss_fn(tiny_encoder, TRICKY))
        assert all(t.shape == (0, tiny_encoder.dim) for t in loss_fn.embed(tiny_encoder, []))


# --- distillation ---------------------------------------------------------------------------------


def reference_kl(q, c, teacher, counts, temperature, teacher_temperature, dims) -> float:
    """KL(teacher || student) per query over its first counts[i] candidates, by hand, averaged."""

    def cosine(a, b, d):
        a, b = a[:d].tolist(), b[:d].tolist()
        return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    def softmax(xs):
        peak = max(xs)
        exps = [math.exp(x - peak) for x in xs]
        return [e / sum(exps) for e in exps]

    per_dim = []
    for d in dims:
        total = 0.0
        for i, k in enumerate(counts):
            pt = softmax([teacher[i][j].item() / teacher_temperature for j in range(k)])
            ps = softmax([cosine(q[i], c[i][j], d) / temperature for j in range(k)])
            total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        per_dim.append(total / len(counts))
    return sum(per_dim) / len(per_dim)


def distill_inputs(seed: int = 0):
    """3 queries with 4, 2 and 3 real candidates (padding after them holds junk that must not count)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 16, generator=generator)
    c = torch.randn(3, 4, 16, generator=generator)
    teacher = torch.randn(3, 4, generator=generator) * 3
    counts = [4, 2, 3]
    valid = torch.tensor([[j < k for j in range(4)] for k in counts])
    return q, c, teacher, valid, counts


@pytest.mark.parametrize("temperature, teacher_temperature, dims", [(0.05, 1.0, []), (1.0, 0.5, [8, 4])])
def test_distill_kl_equals_reference(temperature, teacher_temperature, dims):
    q, c, teacher, valid, counts = distill_inputs()
    loss = DistillLoss(temperature, teacher_temperature, 4, dims).compute_loss_from_embeddings(q, c, teacher, valid)
    expected = reference_kl(q, c, teacher, counts, temperature, teacher_temperature, [16, *dims])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Padding is ignored whatever it holds; a teacher that agrees with the student gives 0.
    c2, teacher2 = c.clone(), teacher.clone()
    c2[~valid], teacher2[~valid] = 100.0, -100.0
    again = DistillLoss(temperature, teacher_temperature, 4, dims).compute_loss_from_embeddings(q, c2, teacher2, valid)
    assert torch.allclose(loss, again)


def test_distill_kl_is_zero_when_student_matches_teacher_and_gradients_flow():
    q, c, _, valid, _ = distill_inputs(seed=1)
    loss_fn = DistillLoss(0.05, 1.0, 4)
    cosines = torch.einsum("rd,rkd->rk", torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=-1))
    # Teacher logits equal to the student's (up to a per-query shift) define the same distribution.
    assert loss_fn.compute_loss_from_embeddings(q, c, cosines / 0.05 + 7.0, valid).item() == pytest.approx(0, abs=1e-5)
    q.requires_grad_(True)
    c.requires_grad_(True)
    loss = loss_fn.compute_loss_from_embeddings(q, c, torch.randn(3, 4), valid)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert torch.isfinite(c.grad).all() and c.grad[valid].abs().sum() > 0
    assert torch.equal(c.grad[~valid], torch.zeros_like(c.grad[~valid]))  # padding learns nothing


POOL = [Candidate(f"c{i}", f"text: candidate {i}", -float(i)) for i in range(8)]


def test_sample_candidates_keeps_positive_and_negative_and_repeats():
    import random

    picked = sample_candidates(POOL, 4, ("c5", "c2"), random.Random("s"))
    assert [c.passage_id for c in picked[:2]] == ["c2", "c5"] and len(picked) == 4
    assert len({c.passage_id for c in picked}) == 4  # no repeats
    assert picked == sample_candidates(POOL, 4, ("c5", "c2"), random.Random("s"))  # same seed, same draw
    draws = {tuple(c.passage_id for c in sample_candidates(POOL, 4, ("c5", "c2"), random.Random(i))) for i in range(20)}
    assert len(draws) > 1 and all({"c2", "c5"} <= set(d) for d in draws)
    assert [c.passage_id for c in sample_candidates(POOL, 4, ("missing", None), random.Random(0))] != []  # not in the list
    assert sample_candidates(POOL[:3], 4, ("c0",), random.Random(0)) == POOL[:3]  # fewer than k: all of them


class CountingEncoder:
    """Wraps an Encoder and records every text it embeds."""

    def __init__(self, encoder):
        self.encoder, self.texts = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def embed(self, texts):
        self.texts.extend(texts)
        return self.encoder.embed(texts)


def test_distill_forward_reuses_positive_and_negative_embeddings(tiny_encoder):  # noqa: F811
    import random

    batch = DISTINCT[:3]
    # q0's list holds its own positive and negative, q1's another example's positive; q2 has no list.
    pools = {
        batch[0].query: [Candidate("p0", batch[0].positive, 1.0), Candidate("n0", batch[0].negative, -2.0),
                         Candidate("x1", "text: extra one", 0.0), Candidate("x2", "text: extra two", -1.0)],
        batch[1].query: [Candidate("p0", batch[0].positive, 0.5), Candidate("p1", batch[1].positive, 2.0)],
    }  # fmt: skip
    counting = CountingEncoder(tiny_encoder)
    loss_fn = DistillLoss(0.05, 1.0, 3)
    with torch.no_grad():
        q, p, n = GeckoLoss.embed(tiny_encoder, batch)
        rows, lists = loss_fn.sample(batch, pools, random.Random(0))
        loss = loss_fn(counting, batch, pools, (q, p, n), random.Random(0))
    assert rows == [0, 1] and [c.passage_id for c in lists[0][:2]] == ["p0", "n0"]
    extra = lists[0][2:]
    assert counting.texts == [c.passage for c in extra]  # only the one drawn extra was embedded
    vectors = {"p0": p[0], "n0": n[0], "p1": p[1], extra[0].passage_id: tiny_encoder.embed([extra[0].passage])[0]}
    assert [x.passage_id for x in lists[1]] == ["p1", "p0"]  # its own positive first
    c = torch.stack([torch.stack([vectors[x.passage_id] for x in lists[0]]),
                     torch.stack([vectors["p1"], vectors["p0"], torch.zeros(tiny_encoder.dim)])])  # fmt: skip
    teacher = torch.tensor([[x.score for x in lists[0]], [2.0, 0.5, 0.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    expected = loss_fn.compute_loss_from_embeddings(q[:2], c, teacher, valid)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_fn(counting, batch[2:], pools, (q[2:], p[2:], n[2:]), random.Random(0)).item() == 0.0  # no list
