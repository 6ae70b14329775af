"""pipeline/llm.py: loading, identity, and batched constrained generation on a tiny GPT-2."""

from __future__ import annotations

import shutil

import pytest
from fixtures_llm import tiny_llm, tiny_llm_dir  # noqa: F401  (pytest fixtures)

from pipeline.generate import GeneratedQuery, PromptTemplate
from pipeline.llm import Decoding, LLMError, load_llm, resolve_model
from pipeline.params import BaseParams, LLMParams

MAX_NEW = 400  # the random model fills strings to their length limit: ~300 tokens at most


def _prompts(llm, n):
    template = PromptTemplate()
    types = ["question answering", "fact checking"]
    return [
        llm.chat_prompt(template.messages(types[i % 2], f"Title {i}", "The cell membrane controls transport. " * (i + 1)))
        for i in range(n)
    ]


def test_identity_names_model_weights_and_dtype(tiny_llm, tiny_llm_dir, tmp_path):
    name, rest = tiny_llm.identity.split("@")
    sha, dtype = rest.split(":")
    assert name == tiny_llm_dir.name and len(sha) == 16 and dtype == "float32"
    changed = tmp_path / tiny_llm_dir.name
    shutil.copytree(tiny_llm_dir, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text() + "\n")
    assert resolve_model(LLMParams(model=str(changed))).sha256[:16] != sha


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LLMError, match="neither 'smollm2' nor a local transformers model folder"):
        load_llm(LLMParams(model=str(tmp_path / "nope")), BaseParams())


def test_chat_template_renders_roles(tiny_llm):
    prompt = tiny_llm.chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_outputs_are_schema_valid_json(tiny_llm):
    prompts = _prompts(tiny_llm, 6)
    decodings = [Decoding(seed=i, temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    outputs = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW)
    for out in outputs:
        assert out.finished and out.new_tokens > 0
        GeneratedQuery.model_validate_json(out.text)


def test_a_row_does_not_depend_on_its_batch(tiny_llm):
    prompts = _prompts(tiny_llm, 3)
    decodings = [Decoding(seed=7 + i, temperature=0.0 if i == 0 else 1.0) for i in range(3)]
    together = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW)
    alone = [tiny_llm.generate_json([p], GeneratedQuery, [d], MAX_NEW)[0] for p, d in zip(prompts, decodings)]
    assert [o.text for o in together] == [o.text for o in alone]
    other_seed = tiny_llm.generate_json(prompts[1:2], GeneratedQuery, [Decoding(seed=999, temperature=1.0)], MAX_NEW)
    assert other_seed[0].text != together[1].text


def test_shared_prefix_cache_gives_the_plain_forward_logits(tiny_llm):
    import torch

    prompts = _prompts(tiny_llm, 3)
    ids = [tiny_llm.encode(p) for p in prompts]
    with torch.inference_mode():
        cache, prefix_len = tiny_llm._batch_cache(ids)
        logits, _, _ = tiny_llm._prefill(ids, cache, prefix_len)
        assert prefix_len > 32  # the system turn and the first few-shot turns are shared
        for row, got in zip(ids, logits):
            want = tiny_llm.model(input_ids=torch.tensor([row])).logits[0, -1]
            assert torch.allclose(got, want, atol=1e-4)


def test_cut_output_is_reported_unfinished(tiny_llm):
    out = tiny_llm.generate_json(_prompts(tiny_llm, 1), GeneratedQuery, [Decoding(0)], 4)[0]
    assert not out.finished and out.new_tokens == 4


@pytest.mark.slow
def test_smollm2_from_the_wheel_generates_valid_rows(tmp_path):
    """The real default model: converted from the wheel's GGUF (cached), 3 sample passages."""
    import pyarrow as pa

    from pipeline.cache import LLMCache
    from pipeline.generate import generate_queries
    from pipeline.params import GenerateParams

    llm = load_llm(LLMParams(), BaseParams(threads=1))
    assert llm.identity.startswith("SmolLM2-135M-Instruct.Q4_1@")
    passages = pa.table(
        {
            "passage_id": ["a#0", "b#0", "c#0"],
            "title": ["Photosynthesis", "The Eiffel Tower", "Insulin"],
            "text": [
                "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
                "The Eiffel Tower in Paris was completed in 1889 for the World's Fair and is 330 metres tall.",
                "Insulin is a hormone made by the pancreas that lets cells take up glucose from the blood.",
            ],
        }
    )
    result = generate_queries(passages, llm, GenerateParams(), 42, LLMCache(tmp_path / "c.duckdb"), progress=False)
    assert result.queries.num_rows == 3 and result.failures.num_rows == 0
    for row in result.queries.to_pylist():
        GeneratedQuery(task=row["task"], query=row["query"])
