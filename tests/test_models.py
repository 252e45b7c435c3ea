"""The denoiser classes people deploy, built tiny with save_pretrained: signature inferred from the config,
then load / info / generate, and compress -> export onnx -> verify where the exporters carry the class."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from edgediff.cli import main
from edgediff.loaders import LoadOptions, load_model


def _sdxl() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)


def _pixart() -> torch.nn.Module:
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                              num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                              caption_channels=24, norm_num_groups=8)


def _sd3() -> torch.nn.Module:
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                           num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                                           pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16)


def _sana() -> torch.nn.Module:
    return diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                            cross_attention_dim=16, caption_channels=24, sample_size=8, patch_size=1)


def _flux() -> torch.nn.Module:
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                            pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
MODELS = {  # builder, scheduler config, extra CLI args, expected input names
    "sdxl": (_sdxl, {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"}, ["--cond-shape", "8,32"],
             ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]),
    "pixart": (_pixart, {"_class_name": "DPMSolverMultistepScheduler"}, ["--cond-shape", "8,24"],
               ["sample", "timestep", "encoder_hidden_states"]),
    "sd3": (_sd3, FLOW, ["--cond-shape", "8,24"], ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]),
    "sana": (_sana, FLOW, ["--cond-shape", "8,24"], ["sample", "timestep", "encoder_hidden_states"]),
    "flux": (_flux, {**FLOW, "use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 256},
             ["--sample-shape", "16,16", "--cond-shape", "8,24"],
             ["sample", "timestep", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance"]),
}


def _save(tmp_path: Path, key: str) -> Path:
    build, sched, _, _ = MODELS[key]
    torch.manual_seed(0)
    d = tmp_path / key
    build().eval().save_pretrained(d)
    (d / "scheduler_config.json").write_text(json.dumps(sched))
    return d


def test_signatures_inferred_from_configs(tmp_path: Path) -> None:
    sdxl = load_model(_save(tmp_path, "sdxl"))
    assert sdxl.signature.input_names() == MODELS["sdxl"][3]
    assert sdxl.signature.cond_shape == (77, 32)
    spec = {s.name: s for s in sdxl.signature.extra}
    assert spec["text_embeds"].shape == (16,) and spec["time_ids"].shape == (6,)
    assert spec["time_ids"].value == (64, 64, 0, 0, 64, 64)  # 8x8 latents of a 64-pixel image
    pix = load_model(_save(tmp_path, "pixart"))
    assert pix.signature.cond_shape == (120, 24)  # caption_channels, not cross_attention_dim
    sd3 = load_model(_save(tmp_path, "sd3"))
    assert sd3.signature.input_specs()[3].shape == (12,) and sd3.schedule.family == "flow"
    flux = load_model(_save(tmp_path, "flux"), LoadOptions(sample_shape=(16, 16), cond_shape=(8, 24)))
    ids = {s.name: s for s in flux.signature.extra}
    assert ids["img_ids"].shape == (16, 3) and ids["img_ids"].value == (4, 4) and ids["txt_ids"].shape == (8, 3)
    assert flux.signature.timestep_scale == pytest.approx(1e-3)
    ex = flux.example_inputs(2)
    assert list(ex) == MODELS["flux"][3] and all(v.shape[0] == 2 for v in ex.values())
    # the plain-tensor module takes every input by name (exporters zip input_names with their args)
    out = flux.module()(**ex)
    assert out.shape == (2, 16, 16)


@pytest.mark.parametrize("key", list(MODELS))
def test_load_info_generate(tmp_path: Path, key: str, capsys) -> None:
    d = _save(tmp_path, key)
    args = MODELS[key][2]
    assert main(["info", str(d), "--json", *args]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] > 0 and info["macs"] > 0
    npy = tmp_path / "x.npy"
    assert main(["generate", str(d), "--steps", "2", "--samples", "2", "--save-npy", str(npy), "--json", *args]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sampler"] == MODELS[key][1]["_class_name"] and rep["denoiser_calls"] >= 2
    import numpy as np

    x = np.load(npy)
    assert x.shape[0] == 2 and x.ndim == 4 and np.isfinite(x).all()


@pytest.mark.parametrize("key,recipe", [("sdxl", "w8a8"), ("sd3", "w8a8"), ("sana", "none"), ("pixart", "none"),
                                        ("flux", "none")])
def test_compress_export_onnx_verify(tmp_path: Path, key: str, recipe: str, capsys) -> None:
    import onnx

    d = _save(tmp_path, key)
    args = MODELS[key][2]
    art, onx = tmp_path / "art", tmp_path / "m.onnx"
    assert main(["compress", str(d), "--recipe", recipe, "-o", str(art), "--json", *args]) == 0
    capsys.readouterr()
    reloaded = load_model(art)
    assert reloaded.schedule.to_config()["_class_name"] == MODELS[key][1]["_class_name"]
    assert reloaded.signature.input_names() == MODELS[key][3]
    assert main(["export", str(art), "--target", "onnx", "-o", str(onx), "--json"]) == 0
    capsys.readouterr()
    assert [i.name for i in onnx.load(str(onx)).graph.input] == MODELS[key][3]  # every input carried
    assert main(["verify", str(art), str(onx), "--steps", "2", "--samples", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] and res["sampler"] == MODELS[key][1]["_class_name"] and res["psnr_db"] > 60


def test_unknown_denoiser_class_and_image_conditioning_are_bad_input(tmp_path: Path, capsys) -> None:
    d = tmp_path / "vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(d)
    assert main(["info", str(d)]) == 2
    assert "AutoencoderKL" in capsys.readouterr().err
    u = tmp_path / "img"
    cfg = dict(_sdxl().config)
    _sdxl().save_pretrained(u)
    cfg["addition_embed_type"] = "image"
    (u / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModel"}))
    assert main(["info", str(u)]) == 2
    assert "addition_embed_type 'image'" in capsys.readouterr().err


def test_info_and_recipes_list_denoisers_and_schedulers(tmp_path: Path, capsys) -> None:
    assert main(["recipes", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert "FluxTransformer2DModel" in rec["denoisers"] and "SanaTransformer2DModel" in rec["denoisers"]
    names = {s["name"]: s["class"] for s in rec["schedulers"]}
    assert names["flow-euler"] == "FlowMatchEulerDiscreteScheduler" and names["edm-euler"] == "EDMEulerScheduler"
    assert main(["info", str(_save(tmp_path, "sd3")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["scheduler"] == {"class": "FlowMatchEulerDiscreteScheduler", "family": "flow",
                                 "prediction_type": "flow_prediction"}
    assert info["schedule"]["shift"] == 3.0 and "SD3Transformer2DModel" in info["supported"]["denoisers"]


def test_explicit_attention_reproduces_joint_and_leaves_others_alone() -> None:
    """SD3's joint attention through edgediff's explicit processor equals diffusers'; Sana's linear
    attention is not one the explicit body reproduces, so quantization leaves it in place."""
    from edgediff.attention import ExplicitAttnProcessor, explicit_supports
    from edgediff.quant.apply import QuantConfig, quantize_module

    torch.manual_seed(0)
    sd3 = _sd3().eval()
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 24)
    kw = {"timestep": torch.tensor([3.0, 700.0]), "pooled_projections": torch.randn(2, 12), "return_dict": False}
    with torch.no_grad():
        ref = sd3(x, encoder_hidden_states=ehs, **kw)[0]
        attn = sd3.transformer_blocks[0].attn
        assert explicit_supports(attn)
        attn.set_processor(ExplicitAttnProcessor())
        out = sd3(x, encoder_hidden_states=ehs, **kw)[0]
    assert (out - ref).abs().max() < 1e-5
    sana = _sana().eval()
    lin = sana.transformer_blocks[0].attn1
    assert type(lin.processor).__name__ == "SanaLinearAttnProcessor2_0" and not explicit_supports(lin)
    wrapped = quantize_module(sana, {}, QuantConfig())  # attention processors only
    assert type(lin.processor).__name__ == "SanaLinearAttnProcessor2_0"
    assert "transformer_blocks.0.attn2" in wrapped  # Sana's plain cross-attention is quantized


def test_calibration_and_verify_use_the_signature_conditioning(tmp_path: Path) -> None:
    """Calibration draws every named input (SD3's pooled projections, not zeros), stores them per
    name, and the quantizer's batches hand them back to the denoiser; flow timesteps stay fractional."""
    from edgediff import quality
    from edgediff.model import cond_unflatten
    from edgediff.passes.calib import CalibOptions, generate
    from edgediff.quant.apply import batches

    m = load_model(_save(tmp_path, "sd3"), LoadOptions(cond_shape=(8, 24)))
    data = generate(m, CalibOptions(n_samples=2, steps=3, interval=1))
    assert data["cond.pooled_projections"].shape == (6, 12) and data["cond.pooled_projections"].abs().min() > 0
    assert data["cond.encoder_hidden_states"].shape == (6, 8, 24) and "cond" not in data
    want = m.signature.conditioning(2, 7919, labels="random")
    assert torch.equal(cond_unflatten(data, "traj_cond")["pooled_projections"], want["pooled_projections"])
    assert data["traj_t"].dtype == torch.float32 and not all(float(t).is_integer() for t in data["traj_t"])
    _, _, c = next(batches(data, 4))
    assert set(c) == {"encoder_hidden_states", "pooled_projections"} and len(c["pooled_projections"]) == 4
    # verify's conditioning is the same generator (labels cycle through the classes)
    v = quality.conditioning(m, 2, 0)
    assert torch.equal(v["pooled_projections"], m.signature.conditioning(2, 1)["pooled_projections"])
    dit = load_model(_save_dit(tmp_path))
    assert torch.equal(quality.conditioning(dit, 5, 0), torch.arange(5) % 3)


def _save_dit(tmp_path: Path) -> Path:
    d = tmp_path / "dit"
    torch.manual_seed(0)
    diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=3).save_pretrained(d)
    return d


def test_float32_tables_keep_flux_rotary_embedding_float32() -> None:
    """LiteRT has no float64 kernels: while converting, Flux's rotary table (float64 in diffusers)
    is built in float32, equal to the float64 one within float32 rounding; outside, torch is untouched."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from edgediff.model import float32_tables

    pe = FluxPosEmbed(theta=10000, axes_dim=[2, 2, 4])
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(-1, 3)
    ref = pe(ids)
    graph = torch.export.export(pe, (ids,)).graph_module.code
    assert "float64" in graph  # what the converter would see without the rule
    with float32_tables():
        assert torch.arange(0, 4, 2, dtype=torch.float64).dtype == torch.float32
        assert torch.ones(2).double().dtype == torch.float32 and torch.ones(2).to(torch.float64).dtype == torch.float32
        got = pe(ids)
        graph = torch.export.export(pe, (ids,)).graph_module.code
    assert "float64" not in graph
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32 and (r - g).abs().max() < 1e-6
    assert torch.arange(2, dtype=torch.float64).dtype == torch.float64  # restored
    assert torch.ones(2).double().dtype == torch.float64


def test_coreml_prediction_feeds_dict_conditioning() -> None:
    """Core ML's prediction path (FixedBatchDenoiser) takes the named inputs of SDXL / SD3 / Flux as a
    dict, chunked and padded to the file's batch like the sample; a bare tensor for a multi-input file
    and a missing input are bad input. Core ML predicts on macOS only: its MLModel is stood in for."""
    import numpy as np
    from edgediff.exporters.coreml import CoreMLDenoiser

    from edgediff.errors import BadInput

    class Model:
        def __init__(self) -> None:
            self.feeds: list[dict] = []

        def predict(self, feeds: dict) -> dict:
            self.feeds.append(feeds)
            return {"out": feeds["sample"] + feeds["pooled_projections"].sum(-1)[:, None, None, None]}

    den = object.__new__(CoreMLDenoiser)
    den.path, den.batch, den.model = Path("m.mlpackage"), 2, Model()
    den.inputs = {"sample": {}, "timestep": {}, "encoder_hidden_states": {}, "pooled_projections": {}}
    den.cond_name = "encoder_hidden_states"
    x, t = torch.randn(3, 4, 2, 2), torch.full((3,), 500.0)
    cond = {"encoder_hidden_states": torch.randn(3, 8, 24), "pooled_projections": torch.randn(3, 12),
            "unused": torch.zeros(3)}
    out = den(x, t, cond)
    assert torch.allclose(out, x + cond["pooled_projections"].sum(-1)[:, None, None, None])
    assert [sorted(f) for f in den.model.feeds] == [["encoder_hidden_states", "pooled_projections", "sample",
                                                     "timestep"]] * 2
    assert all(v.dtype == np.float32 and v.shape[0] == 2 for f in den.model.feeds for v in f.values())
    with pytest.raises(BadInput, match="pooled_projections"):
        den(x, t, cond["encoder_hidden_states"])
    with pytest.raises(BadInput, match="pooled_projections, not given"):
        den(x, t, {"encoder_hidden_states": cond["encoder_hidden_states"]})
