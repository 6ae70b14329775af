"""Tiny BERT encoders built locally in seconds (no downloads), shared by the encoder tests.

Test modules import the fixtures by name (`from fixtures_encoder import tiny_encoder`); pytest puts
`tests/` on sys.path, and no shared conftest.py is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SENTENCES = [
    "The cell membrane controls what enters and leaves the cell.",
    "Proteins fold into shapes that decide their function.",
    "A vaccine trains the immune system to recognise a virus.",
    "Rivers carry sediment from the mountains to the sea.",
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval finds passages that answer a question.",
    "Embeddings map text to vectors; similar texts lie close together.",
    "task: question answering | query: what does a vaccine do?",
    "title: none | text: glaciers move slowly downhill under their own weight.",
]
MAX_POSITIONS = 64


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain transformers folder: random-init 2-layer BERT (hidden 32) + a trained WordPiece tokenizer."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(SENTENCES * 3, vocab_size=300, min_frequency=1, show_progress=False)
    wordpiece.save_model(str(folder))
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=MAX_POSITIONS)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        # A wider init than BERT's 0.02 so that different texts get clearly different vectors.
        initializer_range=0.5,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder(tiny_bert_dir: Path):
    from pipeline.retrieval.encoder import Encoder

    return Encoder.load(tiny_bert_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_st_dir(tiny_encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved by fret in the sentence-transformers folder format."""
    return tiny_encoder.save(tmp_path_factory.mktemp("tiny_st") / "model")


def make_texts(n: int) -> list[str]:
    """n distinct texts of varied length, some past MAX_POSITIONS tokens (truncation is exercised)."""
    out = []
    for i in range(n):
        words = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 8))
        out.append(f"{i} {words}")
    return out
