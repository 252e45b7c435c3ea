"""verify's int8 protocol: the simulation's own noise floor (edgediff.sim_floor) next to psnr_db."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgediff.model import DiffusionModel
from edgediff.sim_floor import FLOAT_OPS, exact_float_ops, noise_floor, per_sample_psnr


def test_exact_float_ops_rounds_the_float64_result_once() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 16, 16, generator=g) * 0.5 + 1.2  # a large mean: float32 variance loses digits
    w, b = torch.randn(96, generator=g), torch.randn(96, generator=g)
    with exact_float_ops() as mode:
        y = F.group_norm(x, 8, w, b, 1e-5)
        s = F.silu(x)
        p = x.softmax(-1)
        c = F.conv2d(x, torch.ones(1, 96, 1, 1))  # not a listed op: computed as usual
    assert y.dtype == torch.float32 and mode.calls == 3
    assert torch.equal(y, F.group_norm(x.double(), 8, w.double(), b.double(), 1e-5).float())
    assert torch.equal(s, F.silu(x.double()).float())
    assert torch.equal(p, x.double().softmax(-1).float())
    assert torch.equal(c, F.conv2d(x, torch.ones(1, 96, 1, 1)))
    # outside the block torch's own float32 kernels run again (and differ by ulps somewhere)
    assert not torch.equal(F.group_norm(x, 8, w, b, 1e-5), y)
    assert F.group_norm in FLOAT_OPS and F.conv2d not in FLOAT_OPS


def test_noise_floor_compares_the_rerounded_run() -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    want = F.silu(x)  # torch's float32 kernel
    r = noise_floor(lambda: F.silu(x), want)
    assert r["float_ops_rerounded"] == 1 and len(r["noise_floor_per_sample_db"]) == 4
    assert 100 < r["noise_floor_db"] < float("inf")  # ulps apart, not equal
    same = noise_floor(lambda: x * 2, x * 2)  # no float op to reround: identical
    assert same["float_ops_rerounded"] == 0 and same["noise_floor_identical_samples"] == 4
    assert same["noise_floor_db"] == float("inf") and per_sample_psnr(want, want) == [float("inf")] * 4


@pytest.mark.slow
def test_verify_int8_reports_the_noise_floor(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.exporters import get_backend

    from edgediff import verify
    from edgediff.testing import minmax_quantize

    q = minmax_quantize(tiny_unet, symmetric=False)
    out = tmp_path / "q.onnx"
    get_backend("onnx").export(q, out, "int8")
    res = verify.verify(q, out, steps=3, samples=3)
    assert res["precision"] == "int8" and res["verified"] is True
    assert res["float_ops_rerounded"] > 0 and len(res["psnr_per_sample_db"]) == 3
    assert len(res["noise_floor_per_sample_db"]) == 3 and res["noise_floor_db"] > 0
    fp = tmp_path / "f.onnx"
    get_backend("onnx").export(q, fp, "fp32")
    assert "noise_floor_db" not in verify.verify(q, fp, steps=2, samples=2)
