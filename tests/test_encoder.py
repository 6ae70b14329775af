"""pipeline/retrieval/encoder.py: same vectors as sentence-transformers, saves what it loads, training hooks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures_encoder import MAX_POSITIONS, SENTENCES, make_texts
from fixtures_encoder import tiny_bert_dir, tiny_encoder, tiny_st_dir  # noqa: F401 - fixtures

torch = pytest.importorskip("torch")
from pipeline.retrieval.encoder import Encoder, EncoderError, TextFormat  # noqa: E402


def _st_encode(folder: Path, texts: list[str], batch_size: int = 4) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)


def test_matches_sentence_transformers_on_plain_folder(tiny_bert_dir, tiny_encoder):
    texts = make_texts(23) + ["", "x"]
    assert max(len(ids) for ids in tiny_encoder.tokenize(texts)) == MAX_POSITIONS  # truncation happens
    ours = tiny_encoder.encode(texts, batch_size=5)
    theirs = _st_encode(tiny_bert_dir, texts)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), tiny_encoder.dim)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_saved_folder_round_trips_through_sentence_transformers(tiny_encoder, tiny_st_dir):
    texts = make_texts(11)
    modules = json.loads((tiny_st_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((tiny_st_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_POSITIONS
    ours = tiny_encoder.encode(texts)
    np.testing.assert_allclose(_st_encode(tiny_st_dir, texts), ours, atol=1e-5)
    reloaded = Encoder.load(tiny_st_dir, device="cpu")
    assert reloaded.fingerprint == tiny_encoder.fingerprint
    np.testing.assert_array_equal(reloaded.encode(texts), ours)


def test_save_replaces_an_existing_folder(tiny_encoder, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("from an older save")
    tiny_encoder.save(target)
    assert not (target / "stale.txt").exists()
    assert (target / "modules.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries left behind


def test_saved_files_do_not_depend_on_how_the_tokenizer_was_loaded(tiny_bert_dir, tmp_path):
    # HF_HUB_OFFLINE=1 makes transformers record local_files_only: true on the tokenizer it loads.
    online = Encoder.load(tiny_bert_dir, device="cpu")
    offline = Encoder.load(tiny_bert_dir, device="cpu")
    offline.tokenizer.init_kwargs["local_files_only"] = True
    files = {}
    for name, encoder in (("online", online), ("offline", offline)):
        folder = encoder.save(tmp_path / name)
        files[name] = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert files["online"] == files["offline"]
    assert "local_files_only" not in json.loads(files["offline"]["tokenizer_config.json"])


def test_batching_and_order_do_not_change_vectors(tiny_encoder):
    texts = make_texts(17)
    one_by_one = np.stack([tiny_encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(tiny_encoder.encode(texts, batch_size=4), one_by_one, atol=1e-5)
    assert tiny_encoder.encode([]).shape == (0, tiny_encoder.dim)


def test_embed_has_gradients_and_matches_encode(tiny_encoder):
    texts = make_texts(6)
    vectors = tiny_encoder.embed(texts)
    assert vectors.requires_grad and vectors.dtype == torch.float32
    vectors.sum().backward()
    grads = [p.grad for p in tiny_encoder.module.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tiny_encoder.module.zero_grad(set_to_none=True)
    np.testing.assert_allclose(vectors.detach().numpy(), tiny_encoder.encode(texts), atol=1e-5)


def test_identity_follows_weights_and_settings(tiny_bert_dir):
    encoder = Encoder.load(tiny_bert_dir, device="cpu")
    before, fingerprint = encoder.identity, encoder.fingerprint
    assert before.startswith("tiny_bert") and "@" in before
    assert encoder.identity == before  # stable when nothing changed
    with torch.no_grad():
        next(encoder.module.parameters()).add_(1e-3)  # what an optimizer step does
    assert encoder.identity != before and encoder.fingerprint != fingerprint
    shorter = Encoder.load(tiny_bert_dir, device="cpu", max_length=16)
    assert shorter.identity == before and shorter.fingerprint != fingerprint


def test_bfloat16_autocast_stays_close(tiny_bert_dir, tiny_encoder):
    texts = make_texts(8)
    bf16 = Encoder.load(tiny_bert_dir, device="cpu", dtype="bfloat16")
    cosine = np.sum(bf16.encode(texts) * tiny_encoder.encode(texts), axis=1)
    assert cosine.min() > 0.99
    assert bf16.fingerprint != tiny_encoder.fingerprint  # cached vectors never mix dtypes


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_native(tiny_bert_dir, monkeypatch, native):
    # The CPU checks `train.dtype: auto` reads; faked so both branches run on any machine.
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: native, raising=False)
    auto = Encoder.load(tiny_bert_dir, device="cpu", dtype="auto")
    expected = "bfloat16" if native else "float32"
    assert auto.dtype == expected
    # The resolved name, not "auto", keys the embedding cache: same entries as the explicit dtype.
    assert auto.fingerprint == Encoder.load(tiny_bert_dir, device="cpu", dtype=expected).fingerprint


def test_encoder_params_accept_auto_dtype():
    from pipeline.params import EncoderParams

    assert EncoderParams(dtype="auto").dtype == "auto"
    with pytest.raises(ValueError):
        EncoderParams(dtype="float16")


def test_refuses_other_poolings_and_missing_folders(tiny_st_dir, tmp_path):
    import shutil

    cls_model = tmp_path / "cls"
    shutil.copytree(tiny_st_dir, cls_model)
    config = json.loads((cls_model / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (cls_model / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError, match="mean pooling"):
        Encoder.load(cls_model, device="cpu")
    with pytest.raises(EncoderError, match="not a model folder"):
        Encoder.load(tmp_path / "nowhere")
    with pytest.raises(EncoderError, match="exceeds"):
        Encoder.load(tiny_st_dir, device="cpu", max_length=MAX_POSITIONS + 1)


def test_text_format_is_geckos_unified_format():
    fmt = TextFormat()
    assert fmt.query("fact checking", "is the sky blue?") == "task: fact checking | query: is the sky blue?"
    assert fmt.passage("Sky", "It is blue.") == "title: Sky | text: It is blue."
    assert fmt.passages([None, "  "], ["a", "b"]) == ["title: none | text: a", "title: none | text: b"]
    assert TextFormat(passage_template="{text}").passage("T", "body") == "body"


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    from pipeline.retrieval.encoder import resolve_model_path

    encoder = Encoder.load("minilm", device="cpu")
    assert encoder.name == "all-MiniLM-L6-v2" and encoder.max_length == 256 and encoder.dim == 384
    # Short texts and ones past 256 tokens, so truncation is compared too.
    texts = make_texts(40) + [" ".join(SENTENCES * 6)]
    assert max(len(ids) for ids in encoder.tokenize(texts)) == 256
    theirs = _st_encode(resolve_model_path("minilm")[0], texts, 16)
    np.testing.assert_allclose(encoder.encode(texts, 16), theirs, atol=1e-5)


def test_instruction_end_finds_the_query_templates_instruction():
    fmt = TextFormat()
    text = fmt.query("Find papers | about cells", "do cells divide?")
    assert text[: fmt.instruction_end(text)] == "task: Find papers | about cells | query: "
    assert fmt.instruction_end("title: none | text: a passage") == 0  # passages keep every token
    assert fmt.instruction_end("do cells divide?") == 0  # raw text
    assert TextFormat(query_template="{query}").instruction_end("task: x | query: y") == 0
    assert TextFormat(query_template="{task}: {query} (end)").instruction_end("a: b (end)") == 0


def test_excluded_instruction_pools_like_sentence_transformers_prompts(tiny_bert_dir, tmp_path):
    """Our pooling without the instruction = sentence-transformers' `prompt=` with include_prompt=False."""
    from sentence_transformers import SentenceTransformer

    fmt = TextFormat()
    encoder = Encoder.load(tiny_bert_dir, device="cpu")
    plain_fingerprint = encoder.fingerprint
    encoder.exclude_instruction(fmt)
    assert encoder.fingerprint != plain_fingerprint  # the embedding cache never mixes the two poolings
    texts = make_texts(7)
    prompt = fmt.query("find a passage about proteins", "")
    ours = encoder.encode([prompt + t for t in texts], batch_size=3)
    folder = encoder.save(tmp_path / "model")
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, prompt=prompt, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # It changes the vectors (the instruction is no longer averaged in), and embed agrees with encode.
    pooled_all = Encoder.load(tiny_bert_dir, device="cpu").encode([prompt + t for t in texts])
    assert np.abs(ours - pooled_all).max() > 1e-3
    np.testing.assert_allclose(encoder.embed([prompt + t for t in texts]).detach().numpy(), ours, atol=1e-5)
    # Texts without the instruction (passages, raw queries) pool exactly as before.
    passages = fmt.passages([None] * 3, texts[:3])
    np.testing.assert_allclose(encoder.encode(passages), Encoder.load(tiny_bert_dir, device="cpu").encode(passages), atol=1e-6)


def test_attention_dropout_sets_only_the_attention_probabilities(tiny_bert_dir):  # noqa: F811
    import torch

    def dropouts(encoder: Encoder) -> dict[str, float]:
        return {n: m.p for n, m in encoder.module.named_modules() if isinstance(m, torch.nn.Dropout)}

    default, off = Encoder.load(tiny_bert_dir, device="cpu"), Encoder.load(tiny_bert_dir, device="cpu", attention_dropout=0.0)
    assert set(dropouts(default).values()) == {0.1}  # BertConfig's default for both kinds
    changed = {n for n, p in dropouts(off).items() if p != dropouts(default)[n]}
    assert changed and all(n.endswith("attention.self.dropout") for n in changed)
    assert all(dropouts(off)[n] == 0.0 for n in changed)
    # Same weights: only training-time behaviour differs, so the eval-mode embeddings are equal.
    texts = ["a cell divides", "proteins fold"]
    assert np.array_equal(default.encode(texts), off.encode(texts))


def test_attention_dropout_needs_a_config_that_names_it(tiny_bert_dir, tmp_path):  # noqa: F811
    import shutil

    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    del config["attention_probs_dropout_prob"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError, match="none of attention_probs_dropout_prob, attention_dropout.*train.attention_dropout"):
        Encoder.load(folder, device="cpu", attention_dropout=0.2)
    # 0 (the default) asks for nothing such a model could have on: it loads as it is.
    assert Encoder.load(folder, device="cpu", attention_dropout=0.0).encode(["a cell divides"]).shape == (1, 32)


def test_attention_dropout_reads_the_distilbert_name(tiny_bert_dir, tmp_path):  # noqa: F811
    import shutil

    from pipeline.retrieval.encoder import _dropout_override

    folder = Path(shutil.copytree(tiny_bert_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = config.pop("attention_probs_dropout_prob")
    (folder / "config.json").write_text(json.dumps(config))
    assert _dropout_override(folder, 0.0) == {"attention_dropout": 0.0}
    assert _dropout_override(folder, None) == {}
