"""Gecko's contrastive loss, with false-negative masking and Matryoshka sub-dimensions.

For query q_i the candidates are every positive p_j and hard negative n_j in the batch and every
other query q_j (same-tower negatives); the target is p_i. Logits are cosine / temperature and the
loss is the cross-entropy of the softmax over the candidates that are valid for q_i:

    L_i = -log( exp(s(q_i, p_i)) / sum_{c valid for i} exp(s(q_i, c)) ),   s = cos / temperature

Candidate columns are laid out [p_0..p_{B-1} | n_0..n_{B-1} | q_0..q_{B-1}]. A candidate is not a
negative for q_i (masked out) when it is the same passage as p_i (same id), or its underlying text
equals q_i's or p_i's text (the same passage under another id, a repeated query, or the two
directions of a symmetric pair), or it is the positive of another copy of q_i's query text (a
query with several relevant passages), or it is q_i itself, or it is a missing hard negative.

In data-parallel training B is the global batch: `pipeline.training.loop` gathers every rank's
embeddings before `compute_loss_from_embeddings`, so the candidates and the mask span all ranks.

`DistillLoss` is the optional soft-label term (GPL / UPR style): over a few of each query's
LLM-scored candidates it matches the encoder's softmax to the LLM's,

    D_i = KL( softmax(t_i / T_teacher) || softmax(cos(q_i, c_i) / temperature) ),

averaged over queries and, like the contrastive loss, over the Matryoshka dimensions.

Imported only by the train stage (torch loads at import time).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Example:
    """One training example: texts already in the unified format, plus what masking compares.

    Attributes:
        query, positive, negative: the texts the encoder embeds (negative None when there is none).
        query_text, positive_text, negative_text: the raw texts before formatting.
        positive_id, negative_id: passage ids (negative_id None when there is no negative).
    """

    query: str
    positive: str
    negative: str | None
    query_text: str
    positive_text: str
    negative_text: str | None
    positive_id: str
    negative_id: str | None


def _codes(values: Sequence[str | None], vocabulary: dict[str, int]) -> torch.Tensor:
    """Small integers standing for strings, so equality tests run as tensor ops; None -> -1."""
    return torch.tensor([-1 if v is None else vocabulary.setdefault(v, len(vocabulary)) for v in values])


def candidate_mask(batch: Sequence[Example]) -> torch.Tensor:
    """Which candidates count in each query's softmax: bool (B, 3B), columns [p | n | q].

    The target p_i (column i of row i) is always valid.
    """
    ids: dict[str, int] = {}
    texts: dict[str, int] = {}
    pos_id = _codes([e.positive_id for e in batch], ids)
    neg_id = _codes([e.negative_id for e in batch], ids)
    q_text = _codes([e.query_text for e in batch], texts)
    p_text = _codes([e.positive_text for e in batch], texts)
    n_text = _codes([e.negative_text for e in batch], texts)
    own_q, own_p = q_text[:, None], p_text[:, None]  # row i's texts against every column j

    def differs(text: torch.Tensor) -> torch.Tensor:
        return (text[None, :] != own_q) & (text[None, :] != own_p)

    # p_j of another copy of the same query text is relevant to q_i too, not a negative.
    valid_p = (pos_id[None, :] != pos_id[:, None]) & differs(p_text) & (q_text[None, :] != own_q)
    valid_p.fill_diagonal_(True)
    valid_n = (neg_id[None, :] >= 0) & (neg_id[None, :] != pos_id[:, None]) & differs(n_text)
    valid_q = differs(q_text)  # also drops q_i itself, whose text equals its own
    return torch.cat([valid_p, valid_n, valid_q], dim=1)


def mrl_dims(full_dim: int, dims: Sequence[int]) -> list[int]:
    """The sub-dimensions to train, largest first, always including the full dimension.

    Raises:
        ValueError: a dimension exceeds the model's.
    """
    too_big = [d for d in dims if d > full_dim]
    if too_big:
        raise ValueError(f"train.mrl_dims {list(dims)}: {too_big} exceed the encoder's dimension {full_dim}")
    return sorted({full_dim, *dims}, reverse=True)


class GeckoLoss(torch.nn.Module):
    """In-batch + hard-negative + same-tower softmax loss, averaged over Matryoshka dimensions.

    Args:
        temperature: cosine similarities are divided by it.
        mrl_dims: leading sub-dimensions also trained (each re-normalised); the full one is implied.
    """

    def __init__(self, temperature: float = 0.05, mrl_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.mrl_dims = list(mrl_dims)

    def forward(self, encoder, batch: Sequence[Example]) -> torch.Tensor:
        """Embed the batch with `encoder` (an `Encoder`) and return the scalar loss."""
        q, p, n = self.embed(encoder, batch)
        return self.compute_loss_from_embeddings(q, p, n, candidate_mask(batch).to(p.device))

    @staticmethod
    def embed(encoder, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings q, p, n (B, d) of the batch's queries, positives and hard negatives.

        A missing hard negative is a zero row (the mask keeps it out of every softmax). An empty
        batch (a data-parallel rank with no share of a small last batch) gives (0, d) tensors.
        """
        if not batch:
            empty = torch.zeros(0, encoder.dim, device=encoder.device)
            return empty, empty, empty
        q = encoder.embed([e.query for e in batch])
        have_negative = [i for i, e in enumerate(batch) if e.negative is not None]
        # Positives and negatives are both passages: one forward pass pads them together.
        docs = encoder.embed([e.positive for e in batch] + [batch[i].negative for i in have_negative])
        p = docs[: len(batch)]
        n = p.new_zeros(p.shape)
        if have_negative:
            n = n.index_copy(0, torch.tensor(have_negative, device=p.device), docs[len(batch) :])
        return q, p, n

    def compute_loss_from_embeddings(
        self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The loss from embeddings q, p, n (B, d) and the candidate mask (B, 3B) of `candidate_mask`.

        Each Matryoshka dimension k uses the first k coordinates, re-normalised; the losses are averaged.
        """
        batch = q.shape[0]
        candidates = torch.cat([p, n, q], dim=0)
        target = torch.arange(batch, device=q.device)
        losses = []
        for dim in mrl_dims(q.shape[1], self.mrl_dims):
            # Re-normalising after the slice keeps every sub-space a cosine space.
            qk = F.normalize(q[:, :dim], dim=1)
            ck = F.normalize(candidates[:, :dim], dim=1)
            logits = (qk @ ck.T) / self.temperature
            logits = logits.masked_fill(~mask, float("-inf"))
            losses.append(F.cross_entropy(logits, target))
        return torch.stack(losses).mean()


# --- soft-label distillation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One LLM-scored candidate passage of a query (a row of table `distill_candidates`).

    Attributes:
        passage_id: the passage; equal ids share one embedding within a batch.
        passage: the text the encoder embeds (unified format).
        score: the teacher's score (higher = more relevant).
    """

    passage_id: str
    passage: str
    score: float


def sample_candidates(pool: Sequence[Candidate], k: int, keep: Sequence[str | None], rng: random.Random) -> list[Candidate]:
    """k candidates of `pool`: those whose id is in `keep` (when present), the rest drawn uniformly.

    Keeping the positive and the hard negative puts the pairs the contrastive loss already embeds
    into the list, so their embeddings are reused and the list always spans good and bad.

    Args:
        pool: a query's candidates in a fixed order (the draw depends on it).
        keep: ids always taken when in the pool (None entries are ignored).
        rng: drawn from in a fixed pattern, so one seed gives one sample.

    Returns:
        At most k candidates, the kept ones first, then the drawn ones in pool order.
    """
    kept = {pid for pid in keep if pid is not None}
    wanted = [i for i, c in enumerate(pool) if c.passage_id in kept][:k]
    rest = [i for i in range(len(pool)) if i not in wanted]
    drawn = rng.sample(rest, min(len(rest), k - len(wanted)))
    return [pool[i] for i in wanted + sorted(drawn)]


class DistillLoss(torch.nn.Module):
    """Listwise KL from the teacher's softmax over sampled candidates to the encoder's.

    Args:
        temperature: student logits are cosine / temperature (the contrastive loss's).
        teacher_temperature: teacher logits are score / teacher_temperature.
        num_candidates: candidates per query (`train.distill_candidates`).
        mrl_dims: leading sub-dimensions also matched (each re-normalised); the full one is implied.
    """

    def __init__(
        self, temperature: float, teacher_temperature: float, num_candidates: int, mrl_dims: Sequence[int] = ()
    ) -> None:
        super().__init__()
        if temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature} and {teacher_temperature}")
        if num_candidates < 2:
            raise ValueError(f"a distribution needs at least 2 candidates, got {num_candidates}")
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.num_candidates = num_candidates
        self.mrl_dims = list(mrl_dims)

    def forward(
        self,
        encoder,
        batch: Sequence[Example],
        pools: Mapping[str, Sequence[Candidate]],
        embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        rng: random.Random,
    ) -> torch.Tensor:
        """The term for a batch whose q, p, n (`GeckoLoss.embed`) are already computed.

        Only candidates that are no positive or hard negative of the batch are embedded here.

        Args:
            pools: a query's candidates, keyed by the formatted query (`Example.query`).
            rng: draws the candidates (seed it per step for a repeatable run).
        """
        q, p, n = embeddings
        rows, lists = self.sample(batch, pools, rng)
        if not rows:
            return q.new_zeros(())  # no query with a list in this batch: nothing to match
        c, teacher, valid = self._gather(encoder, batch, lists, p, n)
        return self.compute_loss_from_embeddings(q[rows], c, teacher, valid)

    def sample(
        self, batch: Sequence[Example], pools: Mapping[str, Sequence[Candidate]], rng: random.Random
    ) -> tuple[list[int], list[list[Candidate]]]:
        """(batch rows with at least 2 candidates, each one's sampled list), one draw per row in order."""
        rows, lists = [], []
        for i, example in enumerate(batch):
            picked = sample_candidates(
                pools.get(example.query, ()), self.num_candidates, (example.positive_id, example.negative_id), rng
            )
            if len(picked) >= 2:  # one candidate is a certain softmax: it teaches nothing
                rows.append(i)
                lists.append(picked)
        return rows, lists

    @staticmethod
    def _gather(encoder, batch, lists, p, n) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate embeddings (R, k, d), teacher scores (R, k) and validity (R, k), padded to k."""
        vectors = _embeddings_by_id(encoder, batch, lists, p, n)
        width = max(len(cands) for cands in lists)
        zero = p.new_zeros(p.shape[1])
        c = torch.stack([torch.stack([vectors[x.passage_id] for x in cands] + [zero] * (width - len(cands))) for cands in lists])
        teacher = [[x.score for x in cands] + [0.0] * (width - len(cands)) for cands in lists]
        valid = [[True] * len(cands) + [False] * (width - len(cands)) for cands in lists]
        return c, torch.tensor(teacher, device=p.device), torch.tensor(valid, device=p.device)

    def compute_loss_from_embeddings(
        self, q: torch.Tensor, c: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """The mean KL(teacher || student) from queries q (R, d), candidates c (R, k, d), scores (R, k).

        `valid` (R, k) marks real candidates; padding takes no probability on either side.
        """
        target = (teacher.float() / self.teacher_temperature).masked_fill(~valid, float("-inf"))
        log_teacher = F.log_softmax(target, dim=1)
        losses = []
        for dim in mrl_dims(q.shape[1], self.mrl_dims):
            qk = F.normalize(q[:, :dim], dim=1)
            ck = F.normalize(c[..., :dim], dim=-1)
            logits = torch.einsum("rd,rkd->rk", qk, ck) / self.temperature
            log_student = F.log_softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
            # where(), not a product: padding is -inf on both sides, and 0 * (-inf) would be nan.
            pointwise = torch.where(valid, log_teacher.exp() * (log_teacher - log_student), 0.0)
            losses.append(pointwise.sum(dim=1).mean())
        return torch.stack(losses).mean()


def _embeddings_by_id(encoder, batch: Sequence[Example], lists: Sequence[Sequence[Candidate]], p, n) -> dict[str, torch.Tensor]:
    """An embedding for every listed passage id: the batch's own p / n rows where they match.

    Only the candidates that are no positive or hard negative of the batch go through the encoder,
    each once, in one forward pass.
    """
    known: dict[str, torch.Tensor] = {}
    for j, example in enumerate(batch):
        if example.negative_id is not None and example.negative is not None:
            known.setdefault(example.negative_id, n[j])
        known[example.positive_id] = p[j]  # a positive wins over a negative copy: same passage
    extra = {c.passage_id: c.passage for cands in lists for c in cands if c.passage_id not in known}
    if extra:
        embedded = encoder.embed(list(extra.values()))
        known.update(zip(extra, embedded))
    return known
