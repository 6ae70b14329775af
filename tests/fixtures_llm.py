"""A tiny GPT-2 built locally in seconds (no downloads), shared by the LLM and generation tests.

Test modules import the fixtures by name (`from fixtures_llm import tiny_llm`); pytest puts
`tests/` on sys.path, so no shared conftest.py is needed. The model is random: its outputs are
gibberish, but constrained decoding must still make them valid JSON for the schema, which is what
the tests check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LINES = [
    '{"task": "Given a question, retrieve passages that answer it", "query": "how do bees find food"}',
    '{"task": "Given a claim, find evidence", "query": "vitamin C prevents colds"}',
    "Passage title: Honey bees\nPassage: Forager bees dance to show where food is.\nTask type: question answering",
    "The cell membrane controls what enters and leaves the cell.",
    "Rivers carry sediment from the mountains to the sea; glaciers move slowly downhill.",
    "You write training data for a search engine. Reply with JSON only.",
    "0123456789 ,.;:!?'()[]{}-_/\\\"",
    # single-token yes/no answers, which relevance classification (llm_scores) reads
    "Does the passage answer the query? yes Yes no No",
]
# ChatML, as SmolLM2 uses: the tests exercise the chat-template path of the real model.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain transformers folder: random 2-layer GPT-2 (n_embd 64) + a byte-level BPE trained here."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(LINES * 4, vocab_size=400, min_frequency=1, special_tokens=SPECIAL, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=2048,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir: Path):
    """The tiny model loaded through the one loading path, `pipeline.llm.load_llm`."""
    from pipeline.llm import load_llm
    from pipeline.params import BaseParams, LLMParams

    return load_llm(LLMParams(model=str(tiny_llm_dir), dtype="float32"), BaseParams(threads=1, device="cpu"))
