"""pipeline/llm/ (transformers_backend.py, weights.py): loading, identity, and batched constrained generation on a tiny GPT-2."""

from __future__ import annotations

import shutil

import pytest
from fixtures_llm import tiny_llm, tiny_llm_dir  # noqa: F401  (pytest fixtures)

from pipeline.llm import Decoding, LLMError, load_llm, resolve_model
from pipeline.llm.generate import GeneratedQuery, PromptTemplate
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


def test_auto_dtype_resolves_into_the_identity(tiny_llm_dir, monkeypatch):
    import torch

    monkeypatch.setattr("pipeline.device.native_bf16", lambda device: True)  # the rule is tests/test_device.py's
    llm = load_llm(LLMParams(model=str(tiny_llm_dir), dtype="auto"), BaseParams(threads=1, device="cpu"))
    assert llm.identity.endswith(":bfloat16") and llm.model.dtype == torch.bfloat16


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LLMError, match="neither 'smollm2', 'qwen2.5-coder-0.5b', a .gguf file nor a local transformers model folder"):
        load_llm(LLMParams(model=str(tmp_path / "nope")), BaseParams())


def test_a_gguf_file_converts_once_by_its_hash(tmp_path, monkeypatch):
    from pipeline.llm import weights

    converted = []

    def fake_convert(gguf, folder):  # the real one dequantises with transformers (~20 s for SmolLM2)
        converted.append(gguf)
        folder.mkdir(parents=True)
        (folder / ".complete").write_text(gguf.name)

    monkeypatch.setattr(weights, "_convert_gguf", fake_convert)
    gguf = tmp_path / "models" / "Tiny-Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    cache = tmp_path / "cache"
    source = resolve_model(LLMParams(model=str(gguf), model_cache_dir=cache))
    assert source.name == "Tiny-Q4" and source.gguf == gguf and source.folder == cache / source.sha256
    # The same bytes under another name: the same weights hash and folder, no second conversion.
    copy = tmp_path / "elsewhere.GGUF"
    copy.write_bytes(gguf.read_bytes())
    again = resolve_model(LLMParams(model=str(copy), model_cache_dir=cache))
    assert again.sha256 == source.sha256 and again.folder == source.folder and converted == [gguf]
    assert again.name == "elsewhere"
    with pytest.raises(LLMError, match=r"llm.model: .*missing.gguf: no such GGUF file"):
        resolve_model(LLMParams(model=str(tmp_path / "missing.gguf"), model_cache_dir=cache))


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


def test_stored_prefixes_and_the_padded_batch_give_the_plain_forward_logits(tiny_llm):
    import torch

    from pipeline.llm.transformers_backend import _left_padded_batch

    tiny_llm._prefixes.clear()
    prompts = _prompts(tiny_llm, 4)  # two task types, two passages each
    ids = [tiny_llm.encode(p) for p in prompts]
    with torch.inference_mode():
        caches, logits = tiny_llm._prefill_rows(ids)
        # The system turn that all rows share, extended by each task type's few-shot turns.
        stored = sorted(tiny_llm._prefixes, key=len)
        assert len(stored) == 3 and len(stored[0]) > 32
        assert all(p[: len(stored[0])] == stored[0] for p in stored[1:])
        for row, got in zip(ids, logits):
            want = tiny_llm.model(input_ids=torch.tensor([row])).logits[0, -1]
            assert torch.allclose(got, want, atol=1e-4)
        # One step on the merged left-padded batch, after dropping a row, still sees each row's own prompt.
        cache, attention, positions = _left_padded_batch(caches, [len(i) for i in ids])
        keep = torch.tensor([0, 2, 3])
        cache.batch_select_indices(keep)
        attention, positions = attention[keep], positions[keep]
        step = torch.tensor([[5], [6], [7]])
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = tiny_llm.model(input_ids=step, attention_mask=attention, position_ids=positions + 1, cache=cache, use_cache=True)
        for r, token, got in zip([0, 2, 3], [5, 6, 7], out.logits[:, -1]):
            want = tiny_llm.model(input_ids=torch.tensor([ids[r] + [token]])).logits[0, -1]
            assert torch.allclose(got, want, atol=1e-4)


def test_a_mixed_task_type_batch_gives_the_rows_of_one_at_a_time_greedy(tiny_llm):
    template = PromptTemplate()
    types = ["question answering", "search result", "fact checking", "sentence similarity"]
    prompts = [
        tiny_llm.chat_prompt(template.messages(types[i % 4], f"Title {i}", "Rivers carry sediment. " * (1 + i % 3)))
        for i in range(6)
    ]
    decodings = [Decoding(seed=i) for i in range(6)]
    tiny_llm._prefixes.clear()
    alone = [tiny_llm.generate_json([p], GeneratedQuery, [d], MAX_NEW)[0] for p, d in zip(prompts, decodings)]
    tiny_llm._prefixes.clear()
    together = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW)
    assert [(o.text, o.new_tokens, o.finished) for o in together] == [(o.text, o.new_tokens, o.finished) for o in alone]
    assert len({o.new_tokens for o in together}) > 1  # rows left the batch at different steps


def test_a_retry_restarts_the_row_in_place_as_a_fresh_call(tiny_llm):
    from collections import Counter

    prompts = _prompts(tiny_llm, 3)
    decodings = [Decoding(seed=i) for i in range(3)]
    retry_with = Decoding(seed=11, temperature=1.0)
    ends, first_text = Counter(), {}

    def retry(i, out):  # row 1 gets one more attempt, sampled; every other end is kept
        ends[i] += 1
        first_text.setdefault(i, out.text)
        return retry_with if i == 1 and ends[i] == 1 else None

    outs = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW, retry=retry)
    assert ends == {0: 1, 1: 2, 2: 1}
    plain = [tiny_llm.generate_json([p], GeneratedQuery, [d], MAX_NEW)[0] for p, d in zip(prompts, decodings)]
    fresh = tiny_llm.generate_json(prompts[1:2], GeneratedQuery, [retry_with], MAX_NEW)[0]
    assert first_text[1] == plain[1].text != fresh.text
    assert [o.text for o in outs] == [plain[0].text, fresh.text, plain[2].text]


def test_stop_ends_an_attempt_early_and_hands_it_to_retry(tiny_llm):
    from collections import Counter

    prompts = _prompts(tiny_llm, 3)
    decodings = [Decoding(seed=i) for i in range(3)]
    plain = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW)
    retry_with = Decoding(seed=11, temperature=1.0)
    seen, ends = [], Counter()

    def stop(i, text):  # row 1's first attempt only, once it has written its opening brace and a bit more
        seen.append((i, text))
        return i == 1 and ends[1] == 0 and len(text) >= 12

    def retry(i, out):
        ends[i] += 1
        if i == 1 and ends[i] == 1:
            assert out.stopped and not out.finished and len(out.text) >= 12
            assert plain[1].text.startswith(out.text) and out.new_tokens < plain[1].new_tokens
            return retry_with
        return None

    outs = tiny_llm.generate_json(prompts, GeneratedQuery, decodings, MAX_NEW, retry=retry, stop=stop)
    fresh = tiny_llm.generate_json(prompts[1:2], GeneratedQuery, [retry_with], MAX_NEW)[0]
    assert ends == {0: 1, 1: 2, 2: 1}
    assert [o.text for o in outs] == [plain[0].text, fresh.text, plain[2].text]
    assert not any(o.stopped for o in outs)
    # stop sees each row's whole text so far after every token it writes
    row0 = [t for i, t in seen if i == 0]
    assert row0[-1] == plain[0].text and len(row0) == plain[0].new_tokens


def test_cut_output_is_reported_unfinished(tiny_llm):
    out = tiny_llm.generate_json(_prompts(tiny_llm, 1), GeneratedQuery, [Decoding(0)], 4)[0]
    assert not out.finished and out.new_tokens == 4


@pytest.mark.slow
def test_smollm2_from_the_wheel_generates_valid_rows(tmp_path):
    """The real default model: converted from the wheel's GGUF (cached), 3 sample passages."""
    import pyarrow as pa

    from pipeline.llm.cache import LLMCache
    from pipeline.llm.generate import generate_queries
    from pipeline.params import GenerateParams

    llm = load_llm(LLMParams(dtype="float32"), BaseParams(threads=1))
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
