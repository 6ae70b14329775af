"""pipeline/device.py: the one meaning of "auto" for devices and dtypes, whichever model asks."""

from __future__ import annotations

import pytest
import torch

from pipeline.device import DeviceError, native_bf16, resolve_device, resolve_dtype

CPU_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, mkldnn_bf16: bool) -> None:
    """Fake the CPU's instruction sets, so every branch runs on any machine."""
    monkeypatch.setattr(torch.cpu, CPU_CHECKS[0], lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, CPU_CHECKS[1], lambda: amx, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    # oneDNN says "bf16 supported" on every AVX512 CPU, emulated there and slower than float32:
    # with it true and neither native instruction set, auto stays float32.
    fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, mkldnn_bf16=True)
    assert resolve_dtype("auto", "cpu") == expected
    assert native_bf16("cpu") == (expected == "bfloat16")


def test_explicit_dtypes_are_kept_and_others_refused(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=False, amx=False, mkldnn_bf16=False)
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(DeviceError, match="dtype must be auto, float32 or bfloat16, got 'float16'"):
        resolve_dtype("float16", "cpu")


def test_auto_dtype_on_a_gpu_asks_the_gpu(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True, amx=True, mkldnn_bf16=True)
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_dtype("auto", "cuda") == expected
        assert resolve_dtype("auto", "cuda:1") == expected


def test_auto_device_is_cuda_only_where_torch_sees_a_gpu(monkeypatch):
    for visible, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda visible=visible: visible)
        assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"device is '{device}' but torch sees no GPU"):
            resolve_device(device)
