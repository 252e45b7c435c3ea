"""The verifier: sampler in the loop on the real runtime, tolerances, exit codes 0/3/4, PTQD."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from edgediff.exporters import get_backend

from edgediff import verify as verify_mod
from edgediff.testing import minmax_quantize
from edgediff.verify import TOLERANCES, verify

FAST = {"steps": 3, "samples": 2}


@pytest.fixture
def unet_onnx(tiny_unet, tmp_path: Path) -> Path:
    out = tmp_path / "u.onnx"
    get_backend("onnx").export(tiny_unet, out, "fp32")
    return out


def test_fp32_export_verifies(tiny_unet, unet_onnx: Path) -> None:
    r = verify(tiny_unet, unet_onnx, **FAST)
    for key in ("target", "psnr_db", "max_abs_err", "samples", "steps", "verified", "tolerance", "exit_code"):
        assert key in r
    assert r["target"] == "onnx" and r["verified"] is True and r["exit_code"] == 0
    assert r["psnr_db"] >= TOLERANCES["fp32"]["psnr_db"] and r["max_abs_err"] < 1e-4
    assert r["samples"] == 2 and r["steps"] == 3


def test_out_of_tolerance_is_exit_4(tiny_unet, unet_onnx: Path) -> None:
    other = tiny_unet.clone()
    with torch.no_grad():
        other.denoiser.conv_out.weight.mul_(1.5)  # a reference the export does not reproduce
    r = verify(other, unet_onnx, **FAST, return_samples=True)
    assert r["verified"] is True and r["exit_code"] == 4
    assert "out of tolerance" in r["reason"]
    assert r["final_samples"].shape == (2, 1, 16, 16)


def test_runtime_missing_is_exit_3_with_structural_check(tiny_unet, unet_onnx: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("onnx")
    monkeypatch.setattr(type(backend), "runtime_available", lambda self, path=None: (False, "pip install onnxruntime"))
    r = verify(tiny_unet, unet_onnx, **FAST)
    assert r["verified"] is False and r["exit_code"] == 3
    assert "onnxruntime" in r["reason"] and r["check"]["ok"]
    assert "psnr_db" not in r


def test_int8_is_checked_against_the_simulation(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    out = tmp_path / "q.onnx"
    get_backend("onnx").export(q, out, "int8")
    r = verify(q, out, **FAST)
    assert r["precision"] == "int8" and r["verified"]
    assert "simulation" in r["reference"]
    assert r["tolerance"] == TOLERANCES["int8"]
    assert r["exit_code"] == 0 and r["within_tolerance"]
    assert r["psnr_db"] >= TOLERANCES["int8"]["psnr_db"] and r["max_abs_err"] <= TOLERANCES["int8"]["max_abs_err"]


def test_float_export_of_quantized_artifact_uses_its_float_weights(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    out = tmp_path / "f.onnx"
    get_backend("onnx").export(q, out, "fp32")
    r = verify(q, out, **FAST)
    assert "float weights" in r["reference"] and r["exit_code"] == 0 and r["psnr_db"] > 60


class _Scale:
    """A stand-in PTQD correction that changes eps noticeably and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def correct(self, eps: torch.Tensor, t: int) -> torch.Tensor:
        self.calls += 1
        return eps * 0.9

    def variance_offset(self, t: int) -> float:
        return 0.0


def test_ptqd_correction_is_applied_to_both_sides(tiny_unet, unet_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corr = _Scale()
    monkeypatch.setattr(verify_mod, "_correction", lambda model: corr)
    r = verify(tiny_unet, unet_onnx, **FAST, return_samples=True)
    assert corr.calls == 2 * FAST["steps"] and r["ptqd_correction"] and r["exit_code"] == 0
    monkeypatch.setattr(verify_mod, "_correction", lambda model: None)
    plain = verify(copy.deepcopy(tiny_unet), unet_onnx, **FAST, return_samples=True)
    assert not torch.allclose(plain["final_samples"], r["final_samples"])


def test_psnr_is_over_the_reference_samples_range(tiny_unet, unet_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # latent-space samples span far more than [-1, 1]: the same relative error must score the same dB
    g = torch.Generator().manual_seed(0)
    base = torch.rand((2, 3, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(base.shape, generator=g) * 1e-3
    scores = {}
    for scale in (1.0, 150.0):
        calls = iter([base * scale, (base + noise) * scale])
        monkeypatch.setattr(verify_mod, "sample", lambda *a, _c=calls, **k: next(_c))
        r = verify(tiny_unet, unet_onnx, **FAST)
        assert r["psnr_db_data_range"] == pytest.approx(float(base.max() - base.min()) * scale, rel=1e-4)
        scores[scale] = r["psnr_db"]
    assert scores[1.0] == pytest.approx(scores[150.0], abs=1e-3)
    assert 50 < scores[1.0] < 70  # 1e-3 noise on a span of ~2
