"""The Qwen GGUF joined from its chunk packages (pipeline/llm/weights.py: assemble_qwen)."""

from __future__ import annotations

import hashlib
import sys

import pytest

from pipeline.llm.base import LLMError
from pipeline.llm.weights import assemble_qwen

CHUNKS = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]


@pytest.fixture
def packages(tmp_path, monkeypatch):
    names = []
    for number, chunk in enumerate(CHUNKS, start=1):
        name = f"fake_qwen_part{number}"
        data = tmp_path / "site" / name / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{number:02d}.bin").write_bytes(chunk)
        names.append(name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_chunks_join_in_order_once_and_are_checked(packages, tmp_path):
    whole = b"".join(CHUNKS)
    sha = hashlib.sha256(whole).hexdigest()
    path = assemble_qwen(tmp_path / "cache", packages, len(whole), sha)
    assert path.read_bytes() == whole
    assert assemble_qwen(tmp_path / "cache", packages, len(whole), sha) == path  # reused, not joined again
    with pytest.raises(LLMError, match="expected 24 and"):
        assemble_qwen(tmp_path / "other", packages, len(whole), "0" * 64)
    assert list((tmp_path / "other").iterdir()) == []  # a bad join leaves nothing behind


def test_a_missing_package_names_the_setup_target(packages, tmp_path):
    with pytest.raises(LLMError, match="package no_such_part is missing: run `make setup-qwen`"):
        assemble_qwen(tmp_path / "cache", [*packages, "no_such_part"], 1, "0" * 64)
