"""Conditional denoisers as OpenCL bundles: UNet2DConditionModel (SD-1.x/2.x cross-attention, the
context a runtime input) and DiT (adaLN-Zero, class labels a runtime input), each saved with
save_pretrained, loaded as a user would, exported, run against PyTorch and verified with the
sampler in the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from edgediff.exporters import get_backend

from edgediff.errors import BadInput
from edgediff.loaders import load_model
from edgediff.model import DiffusionModel
from edgediff.sampling import TorchDenoiser

pytest.importorskip("pyopencl")
from edgediff.kernels import runtime as clrt  # noqa: E402
from edgediff.kernels.export import OpenCLDenoiser  # noqa: E402
from edgediff.kernels.export import profile as profile_bundle  # noqa: E402

needs_cl = pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")


def _saved(module: torch.nn.Module, tmp_path: Path, name: str) -> DiffusionModel:
    module.eval().save_pretrained(tmp_path / name)
    return load_model(tmp_path / name)


def _sd_unet(tmp_path: Path, linear_proj: bool = False) -> DiffusionModel:
    """SD-1.x's block schedule at toy size: CrossAttn down/up blocks, a cross-attention mid block,
    GEGLU feed-forward; linear_proj is SD-2.x's Linear proj_in/proj_out (and two transformer layers)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    m = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                             cross_attention_dim=24, attention_head_dim=(2, 4) if linear_proj else 8,
                             use_linear_projection=linear_proj, transformer_layers_per_block=2 if linear_proj else 1)
    return _saved(m, tmp_path, "unet")


def _dit(tmp_path: Path) -> DiffusionModel:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    return _saved(m, tmp_path, "dit")


def _close(den: OpenCLDenoiser, model: DiffusionModel, rel: float) -> None:
    x = torch.randn(3, *model.signature.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1.0, 400.0, 999.0])
    cond = model.signature.conditioning(3, seed=2)
    want = TorchDenoiser(model)(x, t, cond)
    got = den(x, t, cond)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < rel * max(1.0, float(want.abs().max()))


@needs_cl
def test_sd_style_cond_unet_bundle_matches_and_verifies(tmp_path: Path) -> None:
    model = _sd_unet(tmp_path)
    assert model.signature.cond_shape is not None
    be = get_backend("opencl")
    rep = be.export(model, tmp_path / "b", "fp32")
    hist = rep["op_histogram"]
    # the BasicTransformerBlock schedule: 3 LayerNorms, self- and cross-attention, GEGLU per block
    assert hist["cross_attention"] == hist["flash_attention"] == hist["geglu"] == hist["layer_norm"] // 3 > 0
    meta = json.loads((tmp_path / "b" / "opencl_bundle.json").read_text())
    assert meta["schedule"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    chk = be.check(tmp_path / "b", model)
    assert chk["ok"] and chk["inputs"]["encoder_hidden_states"] == ["B", *model.signature.cond_shape]
    den = be.load_denoiser(tmp_path / "b")
    _close(den, model, 1e-4)
    from edgediff import verify

    res = verify.verify(model, tmp_path / "b", steps=3, samples=2)
    assert res["verified"] is True and res["exit_code"] == 0 and res["psnr_db"] > 60, res
    x, t = torch.zeros(1, *model.signature.sample_shape), torch.zeros(1)
    with pytest.raises(BadInput, match="needs encoder_hidden_states"):
        den(x, t)
    with pytest.raises(BadInput, match=r"encoder_hidden_states must be \(B, M, 24\)"):
        den(x, t, torch.zeros(1, 6, 7))
    # the context's length is free (the prompt's token count), its batch broadcasts
    assert den(torch.zeros(2, *model.signature.sample_shape), torch.zeros(2), torch.randn(1, 3, 24)).shape[0] == 2


@needs_cl
def test_dit_bundle_matches_and_verifies(tmp_path: Path) -> None:
    model = _dit(tmp_path)
    assert model.signature.num_classes == 10
    be = get_backend("opencl")
    rep = be.export(model, tmp_path / "d", "fp32")
    assert {"gate_residual", "unpatchify", "embedding", "gelu_tanh", "add_broadcast"} <= set(rep["op_histogram"])
    assert be.check(tmp_path / "d", model)["ok"]
    den = be.load_denoiser(tmp_path / "d")
    _close(den, model, 1e-4)
    from edgediff import verify

    res = verify.verify(model, tmp_path / "d", steps=3, samples=2)
    assert res["verified"] is True and res["exit_code"] == 0 and res["psnr_db"] > 60, res
    with pytest.raises(BadInput, match=r"class_labels must be in \[0, 11\)"):
        den(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.tensor([11]))
    with pytest.raises(BadInput, match="needs class_labels"):
        den(torch.zeros(1, 4, 8, 8), torch.zeros(1))


@needs_cl
def test_cross_attention_kv_computed_once_per_prompt(tmp_path: Path) -> None:
    """K/V of the context do not depend on the step: the second call with the same context launches
    none of the context-only kernels and gives the same result as a fresh runtime; a new context
    recomputes them."""
    model = _sd_unet(tmp_path)
    get_backend("opencl").export(model, tmp_path / "b", "fp32")
    den = OpenCLDenoiser(tmp_path / "b", profiling=True)
    ctx_ops = [den.executor.ops[i]["name"] for i in sorted(den.executor.cond_ops)]
    assert ctx_ops and all(n.endswith("attn2.to_kv") for n in ctx_ops)
    x = torch.randn(2, *model.signature.sample_shape, generator=torch.Generator().manual_seed(1))
    c1, c2 = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(2)), torch.randn(2, 6, 24)
    first = {lab for lab, _, _ in den.kernel_times(x, torch.tensor([999.0, 999.0]), c1)}
    assert set(ctx_ops) <= first
    second = den.kernel_times(x, torch.tensor([500.0, 500.0]), c1)
    assert not set(ctx_ops) & {lab for lab, _, _ in second}
    fresh = OpenCLDenoiser(tmp_path / "b")
    assert torch.equal(den(x, torch.tensor([500.0, 500.0]), c1), fresh(x, torch.tensor([500.0, 500.0]), c1))
    got = den(x, torch.tensor([500.0, 500.0]), c2)
    assert torch.equal(got, fresh(x, torch.tensor([500.0, 500.0]), c2))
    assert not torch.equal(got, fresh(x, torch.tensor([500.0, 500.0]), c1))


def _w8a8(model: DiffusionModel, tmp_path: Path) -> DiffusionModel:
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe

    recipe = Recipe("t", passes=[PassSpec("calib", {"method": "ptq4dm", "n_samples": 4, "steps": 5, "count": 16}),
                                 PassSpec("quant", {"weight_init": "minmax", "act_init": "minmax"})])
    return run_recipe(model, recipe, cache_dir=tmp_path / "cache")[0]


@needs_cl
@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_int8_conditional_bundles_run_integer_layers_and_verify(tmp_path: Path, kind: str) -> None:
    """w8a8 artifacts of the conditional classes (the real calib + quant passes) as int8 bundles:
    every quantized layer an integer conv, self- and cross-attention integer attention (K/V of the
    context int8 written by their projections), per call within float rounding of the simulation,
    verified with the sampler in the loop."""
    q = _w8a8(_sd_unet(tmp_path) if kind == "sd" else _dit(tmp_path), tmp_path)
    be = get_backend("opencl")
    rep = be.export(q, tmp_path / "q8", "int8")
    hist = rep["op_histogram"]
    assert rep["integer_layers"] == hist["iconv"] > 0 and "conv" not in hist
    assert hist["attention_int8"] == (8 if kind == "sd" else 2) and "flash_attention" not in hist
    den = OpenCLDenoiser(tmp_path / "q8")
    ops = den.meta["schedule"]["ops"]
    if kind == "sd":  # the feed-forward stays int8 from its LayerNorm through GEGLU
        assert any(o["op"] == "layer_norm" and o.get("store") for o in ops)
        assert any(o["op"] == "geglu" and o.get("store") for o in ops)
    if kind == "sd":  # the context's K/V projections run once per prompt
        names = {den.executor.ops[i]["name"] for i in den.executor.cond_ops}
        assert any(n.endswith("attn2.to_k") for n in names) and any(n.endswith("attn2.to_v") for n in names)
    _close(den, q, 1e-4)
    from edgediff import verify

    res = verify.verify(q, tmp_path / "q8", steps=3, samples=2)
    assert res["precision"] == "int8" and res["verified"] is True and res["exit_code"] == 0, res


@needs_cl
def test_fp16_dit_bundle_within_fp16_tolerance(tmp_path: Path) -> None:
    model = _dit(tmp_path)
    get_backend("opencl").export(model, tmp_path / "h", "fp16")
    from edgediff import verify

    res = verify.verify(model, tmp_path / "h", steps=3, samples=2)
    assert res["precision"] == "fp16" and res["verified"] is True and res["exit_code"] == 0, res


@needs_cl
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sd2_style_linear_projection_two_layers(tmp_path: Path, precision: str) -> None:
    model = _sd_unet(tmp_path, linear_proj=True)
    get_backend("opencl").export(model, tmp_path / "b", precision)
    den = OpenCLDenoiser(tmp_path / "b")
    _close(den, model, 1e-4 if precision == "fp32" else 0.05)


@needs_cl
def test_profile_of_a_cond_bundle_feeds_the_context(tmp_path: Path) -> None:
    model = _sd_unet(tmp_path)
    get_backend("opencl").export(model, tmp_path / "b", "fp32")
    res = profile_bundle(tmp_path / "b", warmup=1, repeats=1)
    ops = {la["op"] for la in res["layers"]}
    assert {"cross_attention", "layer_norm", "geglu"} <= ops and res["total_ms"] > 0
    ca = next(la for la in res["layers"] if la["op"] == "cross_attention")
    assert ca["kernels"] == ["flash_attention"] and ca["name"].endswith("attn2.attn")


def test_what_the_opencl_target_still_refuses(tiny_cond_unet: DiffusionModel, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    be = get_backend("opencl")
    torch.manual_seed(0)
    sdxl_like = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                     cross_attention_dim=24, attention_head_dim=8, class_embed_type="timestep",
                                     ).eval()
    from edgediff.model import InputSignature

    m = DiffusionModel(sdxl_like, tiny_cond_unet.schedule, InputSignature((4, 8, 8), cond_shape=(6, 24)),
                       "UNet2DConditionModel", dict(sdxl_like.config))
    with pytest.raises(BadInput, match="class-conditional"):
        be.export(m, tmp_path / "b", "fp32")
    assert not any(tmp_path.iterdir())
