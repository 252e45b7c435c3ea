"""The opencl backend: bundle export, the whole-UNet runtime against PyTorch, refusals and fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.exporters import get_backend, target_of

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.sampling import TorchDenoiser

pytest.importorskip("pyopencl")
from edgediff.kernels import runtime as clrt  # noqa: E402
from edgediff.kernels.export import OpenCLDenoiser  # noqa: E402
from edgediff.kernels.export import profile as profile_bundle  # noqa: E402

HAS_CL = clrt.opencl_available()[0]
needs_cl = pytest.mark.skipif(not HAS_CL, reason="no OpenCL device")


def _inputs(model: DiffusionModel, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, *model.signature.sample_shape, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([3.0, 871.0][:batch])


@pytest.fixture
def bundle(tiny_unet: DiffusionModel, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    rep = get_backend("opencl").export(tiny_unet, out, "fp32")
    assert rep["size_bytes"] > 0 and rep["op_histogram"]["flash_attention"] >= 1
    return out


@needs_cl
@pytest.mark.parametrize("algo", ["gemm", "winograd", "auto"])
def test_bundle_matches_pytorch(tiny_unet: DiffusionModel, bundle: Path, algo: str) -> None:
    assert target_of(bundle) == "opencl"
    den = OpenCLDenoiser(bundle, conv_algo=algo)
    x, t = _inputs(tiny_unet)
    want = TorchDenoiser(tiny_unet)(x, t)
    got = den(x, t)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


def test_export_leaves_input_alone_and_is_atomic(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_unet.denoiser.state_dict().items()}
    be = get_backend("opencl")
    out = tmp_path / "b"
    be.export(tiny_unet, out, "fp32")
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.denoiser.state_dict().items())
    with pytest.raises(BadInput, match="already exists"):
        be.export(tiny_unet, out, "fp32")
    be.export(tiny_unet, out, "fp16", force=True)
    assert json.loads((out / "opencl_bundle.json").read_text())["precision"] == "fp16"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dirs left behind
    info = be.info(out)
    assert info["precision"] == "fp16" and info["params"] == sum(p.numel() for p in tiny_unet.denoiser.parameters())
    assert be.check(out, tiny_unet)["ok"]


def test_refuses_what_it_cannot_run(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    be = get_backend("opencl")
    with pytest.raises(BadInput, match="int8 needs a quantized model"):
        be.export(tiny_unet, tmp_path / "a", "int8")
    with pytest.raises(BadInput, match="not supported"):
        be.export(tiny_unet, tmp_path / "a", "int4")
    other = DiffusionModel(torch.nn.Conv2d(1, 1, 1), tiny_unet.schedule, tiny_unet.signature, "module")
    with pytest.raises(BadInput, match="this model is Conv2d"):
        be.export(other, tmp_path / "c", "fp32")
    assert not any(tmp_path.iterdir())  # conditional denoisers: tests/test_opencl_cond.py


@needs_cl
def test_corrupt_bundle_is_bad_input(bundle: Path) -> None:
    (bundle / "weights.safetensors").unlink()
    with pytest.raises(BadInput, match="missing weights.safetensors"):
        get_backend("opencl").load_denoiser(bundle)


@needs_cl
def test_fp16_bundle_runs_and_says_how(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    be = get_backend("opencl")
    r32 = be.export(tiny_unet, tmp_path / "f32", "fp32")
    r16 = be.export(tiny_unet, tmp_path / "f16", "fp16")
    assert r16["size_bytes"] < r32["size_bytes"]
    w32, w16 = ((tmp_path / d / "weights.safetensors").stat().st_size for d in ("f32", "f16"))
    assert w16 < 0.55 * w32  # half-size weights; biases and norm affines stay float32
    den = be.load_denoiser(tmp_path / "f16")
    if not den.rt.native_half:  # PoCL: no cl_khr_fp16, half storage with float arithmetic, and it says so
        assert any("lacks cl_khr_fp16" in n for n in den.notes)
    x, t = _inputs(tiny_unet)
    want = TorchDenoiser(tiny_unet)(x, t)
    err = float((den(x, t) - want).abs().max())
    assert err < 0.05 * max(1.0, float(want.abs().max()))


def test_no_opencl_device_means_unavailable(tiny_unet: DiffusionModel, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No platform: runtime_available is False with the install hint; verify reports exit 3 with a structural check."""
    monkeypatch.setattr(clrt, "list_devices", lambda: [])
    ok, why = get_backend("opencl").runtime_available(bundle)
    assert not ok and "pocl-binary-distribution" in why
    from edgediff import verify
    res = verify.verify(tiny_unet, bundle, steps=2, samples=2)
    assert res["verified"] is False and res["exit_code"] == 3 and res["check"]["ok"]


@needs_cl
def test_verify_drives_the_bundle_with_the_sampler(tiny_unet: DiffusionModel, bundle: Path) -> None:
    from edgediff import verify
    res = verify.verify(tiny_unet, bundle, steps=3, samples=2)
    assert res["verified"] is True and res["exit_code"] == 0, res
    assert res["psnr_db"] > 60 and res["max_abs_err"] < 1e-3


@needs_cl
def test_demo_model_end_to_end(tmp_path: Path) -> None:
    """The bundled demo model through export and verify (skipped until its weights ship)."""
    from edgediff.loaders import load_model

    try:
        demo = load_model("demo")
    except Exception as e:  # noqa: BLE001 - weights not trained yet in this checkout
        pytest.skip(f"demo model not available: {e}")
    from edgediff import verify
    get_backend("opencl").export(demo, tmp_path / "demo", "fp32")
    res = verify.verify(demo, tmp_path / "demo", steps=4, samples=4)
    assert res["verified"] is True and res["exit_code"] == 0, res


@needs_cl
def test_profile_names_layers_by_module(bundle: Path) -> None:
    res = profile_bundle(bundle, warmup=1, repeats=1)
    assert res["runtime"] == "opencl" and res["total_ms"] > 0
    names = {la["name"] for la in res["layers"]}
    assert "conv_in" in names and any(n.endswith("attentions.0.attn") for n in names)
    assert {la["op"] for la in res["layers"]} <= {"conv", "group_norm", "flash_attention", "silu", "concat", "upsample2x",
                                                   "timestep_embedding", "affine"}
    assert {"Conv", "QLinearConv", "GroupNormalization"} <= clrt.SUPPORTED_OPS and "LSTM" not in clrt.SUPPORTED_OPS
    # per-op times are OpenCL event timestamps, with the op's kernels listed
    assert "event timestamps" in res["layer_timing"] and res["kernels_per_call"] >= len(res["layers"])
    gn = next(la for la in res["layers"] if la["op"] == "group_norm")
    assert gn["kernels"] and set(gn["kernels"]) <= {"group_norm", "group_partial_stats", "group_norm_split_apply"}
    conv = next(la for la in res["layers"] if la["name"] == "conv_in")
    assert conv["ms"] > 0 and conv["kernels"] in (["conv2d"], ["winograd_input", "gemm_batched", "winograd_output"])
    if not res["gpu"]:
        assert "did not run on a GPU" in res["note"]


@needs_cl
def test_event_times_come_from_the_profiling_queue() -> None:
    rt = clrt.CLRuntime(profiling=True)
    x = rt.to_device(torch.randn(4, 1000))
    rt.label = "a"
    rt.silu(x)
    rt.label = "b"
    rt.softmax(x)
    rt.finish()
    times = rt.event_times()
    assert [(lab, k) for lab, k, _ in times] == [("a", "silu"), ("b", "softmax_rows")]
    assert all(ms > 0 for _, _, ms in times) and rt.event_times() == []
    assert not clrt.CLRuntime().profiling


@needs_cl
@pytest.mark.slow
def test_cifar_scale_unet_matches_pytorch(tmp_path: Path) -> None:
    """google/ddpm-cifar10-32's UNet2DModel config (35.7M params, random init): downsample padding 0,
    4 levels, one-head attention with head_dim 256, through the bundle vs PyTorch."""
    from diffusers import UNet2DModel

    from edgediff.model import InputSignature
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0).eval()
    model = DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel", dict(m.config))
    be = get_backend("opencl")
    be.export(model, tmp_path / "c", "fp32")
    den = be.load_denoiser(tmp_path / "c")
    x, t = _inputs(model, batch=1)
    want = TorchDenoiser(model)(x, t)
    assert float((den(x, t) - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


@needs_cl
def test_quantized_model_exports_its_on_grid_float_weights(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    """A quantized model (simulation wrappers, quantized attention processor) exports the float
    weights on the grid, says that activations are not quantized, and matches the stripped model."""
    from edgediff.quant.core import QuantAttnProcessor
    from edgediff.quant_params import strip_quant_wrappers
    from edgediff.testing import minmax_quantize

    q = minmax_quantize(tiny_unet)
    for m in q.denoiser.modules():
        if type(m).__name__ == "Attention":
            m.set_processor(QuantAttnProcessor())
    rep = get_backend("opencl").export(q, tmp_path / "q", "fp32")
    assert "does not quantize activations" in rep["note"]
    assert any(getattr(m, "_edgediff_quant_wrapper", False) for m in q.denoiser.modules())  # input untouched
    flo = q.clone()
    strip_quant_wrappers(flo.denoiser)
    x, t = _inputs(tiny_unet)
    want = TorchDenoiser(flo)(x, t)
    got = get_backend("opencl").load_denoiser(tmp_path / "q")(x, t)
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


@needs_cl
def test_bad_inputs_are_one_line_errors(bundle: Path, tiny_unet: DiffusionModel) -> None:
    den = get_backend("opencl").load_denoiser(bundle)
    with pytest.raises(BadInput, match=r"sample must be \(B, 1, 16, 16\)"):
        den(torch.zeros(1, 3, 16, 16), torch.zeros(1))
    with pytest.raises(BadInput, match="no conditioning"):
        den(torch.zeros(1, 1, 16, 16), torch.zeros(1), torch.zeros(1, 2, 3))
    with pytest.raises(BadInput, match="not found"):
        OpenCLDenoiser(bundle, device="no-such-device-xyz")
    meta = json.loads((bundle / "opencl_bundle.json").read_text())
    meta["format_version"] = 99
    (bundle / "opencl_bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="unsupported bundle format"):
        get_backend("opencl").load_denoiser(bundle)


@needs_cl
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_bundle_runs_integer_convs_and_matches_the_simulation(tiny_unet: DiffusionModel, tmp_path: Path,
                                                                   symmetric: bool) -> None:
    """int8: every quantized conv/linear runs as int8 x int8 -> int32 on the device (signed or
    asymmetric uint8 activations); outputs track the PyTorch simulation up to rounding flips where
    float ordering differs at a quantization boundary, and verify accepts it at int8 tolerance."""
    from edgediff.testing import minmax_quantize

    q = minmax_quantize(tiny_unet, symmetric=symmetric)
    be = get_backend("opencl")
    rep = be.export(q, tmp_path / "q8", "int8")
    assert rep["integer_layers"] == len(q.extras["quant"]["layers"]) and rep["op_histogram"]["iconv"] > 0
    assert be.check(tmp_path / "q8", q)["ok"]
    den = be.load_denoiser(tmp_path / "q8")
    x, t = _inputs(tiny_unet)
    want = TorchDenoiser(q)(x, t)
    assert float((den(x, t) - want).abs().max()) < 0.05 * max(1.0, float(want.abs().max()))
    from edgediff import verify
    res = verify.verify(q, tmp_path / "q8", steps=3, samples=2)
    assert res["precision"] == "int8" and res["verified"] is True and res["exit_code"] == 0, res


@needs_cl
def test_int8_conv_with_split_shortcut_matches_float_simulation() -> None:
    """The two-range input quantization of Q-Diffusion's shortcut splitting, one layer, exactly."""
    from edgediff.kernels.runtime import CLRuntime

    rt = CLRuntime()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 7, generator=g)
    x[:, 4:] *= 8  # the second part (the skip) has a much wider range
    s_w = torch.rand(3, generator=g) * 0.02 + 0.005
    wi = torch.randint(-127, 128, (3, 6, 3, 3), generator=g).float()
    bias = torch.randn(3, generator=g)
    s1, z1, s2, z2 = 0.02, 5, 0.11, -3

    def fq(a: torch.Tensor, s: float, z: int) -> torch.Tensor:
        return (torch.clamp(torch.round(a / torch.tensor(s)) + z, -128, 127) - z) * torch.tensor(s)

    xd = torch.cat([fq(x[:, :4], s1, z1), fq(x[:, 4:], s2, z2)], 1)
    want = torch.nn.functional.conv2d(xd, wi * s_w[:, None, None, None], bias, padding=1)
    xq = rt.quantize_split(rt.to_device(x), 4, s1, z1, s2, z2)
    got = rt.conv2d_int8_dq(xq, rt.to_device(wi, np.int8), rt.to_device(s_w), rt.to_device(bias), 4, z1, z2, s1, s2,
                            pad=(1, 1, 1, 1)).get()
    np.testing.assert_allclose(got, want.numpy(), atol=2e-5, rtol=1e-5)
