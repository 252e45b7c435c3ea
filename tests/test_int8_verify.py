"""verify's int8 protocol: the simulation's own noise floor (edgediff.sim_floor) next to psnr_db, and the
stepwise check along the simulation's trajectory that the pass/fail rule reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgediff.model import DiffusionModel
from edgediff.sim_floor import FLOAT_OPS, Stepwise, exact_float_ops, noise_floor, per_sample_psnr


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
    # written out as reductions (for tracing an export in this mode): the same float32 result
    with exact_float_ops(explicit_group_norm=True) as mode:
        y2 = F.group_norm(x, 8, w, b, 1e-5)
    assert mode.calls == 1 and torch.equal(y2, y)


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


def test_stepwise_gives_the_export_the_references_inputs() -> None:
    """Each call runs both on the same x_t (teacher forcing), returns the reference's output and
    records that call's PSNR; the worst call and sample are reported."""
    seen: list[torch.Tensor] = []

    def ref(x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        return x * 2

    def exp(x: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        seen.append(x)
        out = x * 2
        if float(t[0]) == 500:  # one flip-sized error in one sample of one call
            out = out.clone()
            out[1, 0, 0, 0] += 0.05
        return out

    sw = Stepwise(ref, exp)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    outs = [sw(x + i, torch.full((3,), float(t))) for i, t in enumerate((999, 500, 1))]
    assert all(torch.equal(o, (x + i) * 2) for i, o in enumerate(outs))
    assert all(torch.equal(a, x + i) for i, a in enumerate(seen))
    r = sw.report()
    assert r["stepwise_calls"] == 3 and r["stepwise_worst_t"] == 500
    assert r["stepwise_psnr_per_call_db"][0] == r["stepwise_psnr_per_call_db"][2] == float("inf")
    assert 40 < r["stepwise_psnr_db"] < 100 and r["stepwise_min_sample_psnr_db"] < r["stepwise_psnr_db"]
    assert abs(r["stepwise_max_abs_err"] - 0.05) < 1e-6 and r["stepwise_max_abs_err_per_call"][0] == 0
    assert Stepwise(ref, exp).report() == {"stepwise_calls": 0}


def test_verify_int8_pass_rule_reads_the_stepwise_check(tiny_unet: DiffusionModel, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from edgediff.exporters import get_backend

    from edgediff import verify
    from edgediff.testing import minmax_quantize

    q = minmax_quantize(tiny_unet, symmetric=False)
    out = tmp_path / "q.onnx"
    get_backend("onnx").export(q, out, "int8")
    res = verify.verify(q, out, steps=2, samples=2)
    assert res["stepwise_calls"] == 2 and len(res["stepwise_psnr_per_call_db"]) == 2
    assert res["stepwise_psnr_db"] >= verify.TOLERANCES["int8"]["stepwise_psnr_db"] and res["exit_code"] == 0
    # the same run judged with an unreachable per-call bound fails on that bound, named in the reason
    monkeypatch.setitem(verify.TOLERANCES["int8"], "stepwise_psnr_db", 1e9)
    bad = verify.verify(q, out, steps=2, samples=2)
    assert bad["exit_code"] == 4 and bad["within_tolerance"] is False
    assert "worst call along the simulation's trajectory" in bad["reason"] and "noise floor" in bad["reason"]
