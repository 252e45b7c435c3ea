"""Coverage of every denoiser class edgediff supports, built tiny with save_pretrained, across the
commands: info, compress (w8a8; pruning or exit 2 with the reason), export to every target (written,
or exit 2 naming what is unsupported, or exit 3 where the runtime is absent), verify and profile.

The fast tests cover the refusals and the int8 chain of the classes whose attention is not plain
(SD3 joint attention, Flux); the whole matrix per class is slow (TFLite conversion alone takes
minutes for a UNet on a loaded 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from test_models import MODELS

from edgediff.cli import main

W8A8_TINY = """name = "w8a8-tiny"
description = "W8A8 on 2 trajectories x 3 steps"
[[pass]]
name = "calib"
method = "qdiff"
n_samples = 2
steps = 3
interval = 1
[[pass]]
name = "quant"
calib_limit = 6
batch_size = 6
"""
PRUNE_TINY = """name = "prune-tiny"
description = "magnitude channel pruning, no fine-tune"
[[pass]]
name = "prune.diff"
ratio = 0.25
importance = "magnitude"
batch_size = 2
data = "samples"
sample_steps = 2
"""


def _unet2d() -> torch.nn.Module:
    return diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def _sd1() -> torch.nn.Module:
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                                          cross_attention_dim=32, attention_head_dim=8)


def _dit() -> torch.nn.Module:
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_num_groups=8)


CLASSES = {  # builder, scheduler config, CLI args
    "unet2d": (_unet2d, {"_class_name": "DDPMScheduler"}, []),
    "sd1": (_sd1, {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "steps_offset": 1,
                   "skip_prk_steps": True, "set_alpha_to_one": False}, ["--cond-shape", "8,32"]),
    "dit": (_dit, {"_class_name": "DDIMScheduler"}, []),
    **{k: (b, s, a) for k, (b, s, a, _) in MODELS.items()},
}
# what each command gives per class (measured; see the module docstring): exit code, and for exit 2
# a word the one-line reason must contain
PRUNE = {"unet2d": 0, "sd1": 0, "dit": 0, "sdxl": 0, "pixart": (2, "missed a channel coupling"),
         "sd3": (2, "not supported"), "sana": (2, "not supported"), "flux": (2, "not supported")}
OPENCL = {"unet2d": 0, "sd1": 0, "dit": 0, "sdxl": (2, "extra inputs"),
          "pixart": (2, "PixArtTransformer2DModel"), "sd3": (2, "SD3Transformer2DModel"),
          "sana": (2, "SanaTransformer2DModel"), "flux": (2, "FluxTransformer2DModel")}
TFLITE = {"unet2d": 0, "sd1": 0, "dit": 0, "pixart": 0, "sana": 0, "sdxl": 0, "sd3": 0, "flux": 0}


def _folder(tmp_path: Path, key: str) -> Path:
    build, sched, _ = CLASSES[key]
    torch.manual_seed(0)
    d = tmp_path / key
    build().eval().save_pretrained(d)
    (d / "scheduler_config.json").write_text(json.dumps(sched))
    return d


def _recipes(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "w8a8-tiny.toml").write_text(W8A8_TINY)
    (tmp_path / "prune-tiny.toml").write_text(PRUNE_TINY)
    return tmp_path / "w8a8-tiny.toml", tmp_path / "prune-tiny.toml"


def _expect(rc: int, want: int | tuple[int, str], err: str, what: str) -> None:
    code, word = (want, None) if isinstance(want, int) else want
    assert rc == code, f"{what}: exit {rc}, expected {code}: {err.strip()[-300:]}"
    if word is not None:
        lines = err.strip().splitlines()
        assert word in lines[-1], f"{what}: the reason should name {word!r}: {lines[-1]}"


@pytest.mark.parametrize("key", ["pixart", "sd3", "sana", "flux"])
def test_pruning_refused_with_a_reason(tmp_path: Path, key: str, capsys) -> None:
    d = _folder(tmp_path, key)
    _, prune = _recipes(tmp_path)
    rc = main(["compress", str(d), "--recipe", str(prune), "-o", str(tmp_path / "p"), *CLASSES[key][2]])
    _expect(rc, PRUNE[key], capsys.readouterr().err, f"{key} prune")
    assert not (tmp_path / "p").exists()  # nothing half-written


@pytest.mark.parametrize("key", ["sd3", "flux"])
def test_int8_chain_of_joint_attention_models(tmp_path: Path, key: str, capsys) -> None:
    """w8a8 (SD3's joint attention quantized), int8 ONNX verified against the artifact, FPGA program,
    profile; TensorRT writes its ONNX and exits 3 without the runtime; OpenCL names the class."""
    d = _folder(tmp_path, key)
    w8a8, _ = _recipes(tmp_path)
    art = tmp_path / "art"
    assert main(["compress", str(d), "--recipe", str(w8a8), "-o", str(art), "--json", *CLASSES[key][2]]) == 0
    assert json.loads(capsys.readouterr().out)["quality"]["psnr_vs_original_db"] > 30
    onx = tmp_path / "m.onnx"
    assert main(["export", str(art), "--target", "onnx", "--precision", "int8", "-o", str(onx)]) == 0
    capsys.readouterr()
    assert main(["verify", str(art), str(onx), "--steps", "2", "--samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]
    assert main(["profile", str(onx), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    _expect(main(["export", str(art), "--target", "opencl", "-o", str(tmp_path / "cl")]), OPENCL[key],
            capsys.readouterr().err, f"{key} opencl")
    rc = main(["export", str(art), "--target", "tensorrt", "-o", str(tmp_path / "trt.plan")])
    err = capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert rc == 3 and "TensorRT" in err


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CLASSES))
def test_every_command_on_every_class(tmp_path: Path, key: str, capsys) -> None:
    d = _folder(tmp_path, key)
    args = CLASSES[key][2]
    w8a8, prune = _recipes(tmp_path)
    assert main(["info", str(d), "--json", *args]) == 0
    capsys.readouterr()
    art = tmp_path / "art"
    assert main(["compress", str(d), "--recipe", str(w8a8), "-o", str(art), *args]) == 0
    capsys.readouterr()
    rc = main(["compress", str(d), "--recipe", str(prune), "-o", str(tmp_path / "pruned"), *args])
    _expect(rc, PRUNE[key], capsys.readouterr().err, f"{key} prune")
    for prec in ("fp32", "int8"):
        onx = tmp_path / f"m-{prec}.onnx"
        assert main(["export", str(art), "--target", "onnx", "--precision", prec, "-o", str(onx)]) == 0
        capsys.readouterr()
        assert main(["verify", str(art), str(onx), "--steps", "2", "--samples", "2"]) == 0
        capsys.readouterr()
    assert main(["profile", str(tmp_path / "m-fp32.onnx"), "--device", "rpi5-cpu"]) == 0
    assert main(["export", str(art), "--target", "fpga", "--precision", "int8", "-o", str(tmp_path / "fpga")]) == 0
    capsys.readouterr()
    _expect(main(["export", str(art), "--target", "opencl", "-o", str(tmp_path / "cl")]), OPENCL[key],
            capsys.readouterr().err, f"{key} opencl")
    rc = main(["export", str(art), "--target", "tflite", "-o", str(tmp_path / "m.tflite")])
    _expect(rc, TFLITE[key], capsys.readouterr().err, f"{key} tflite")
    if rc == 0:
        assert main(["verify", str(art), str(tmp_path / "m.tflite"), "--steps", "2", "--samples", "2"]) == 0
    assert main(["export", str(art), "--target", "coreml", "-o", str(tmp_path / "m.mlpackage")]) == 0
    capsys.readouterr()


def test_pixart_tflite_int8_keeps_every_layer_integer(tmp_path: Path) -> None:
    """The converter folded constants through PixArt's float twins (caption_projection.linear_2's bias
    into attn2.to_k/to_v, the blocks' scale_shift_table into adaln_single.linear): those four layers
    stayed float without their activation quantization and verify read 7.2 dB. Every layer is now
    an int8 kernel and a LiteRT call equals the simulation."""
    from edgediff.exporters.tflite import LiteRTDenoiser, build_tflite

    from edgediff.loaders import LoadOptions, load_model
    from edgediff.passes import PassContext, get, make_options
    from edgediff.sampling import TorchDenoiser

    model = load_model(_folder(tmp_path, "pixart"), LoadOptions(cond_shape=(8, 24)))
    ctx = PassContext(cache_dir=tmp_path / "cache")
    for name, opts in (("calib", {"method": "qdiff", "n_samples": 2, "steps": 3, "interval": 1}),
                       ("quant", {"calib_limit": 6, "batch_size": 6})):
        fn, _ = get(name)
        model = fn(model, make_options(name, opts), ctx)
    data, facts = build_tflite(model, "int8")
    done = facts["int8"]["integerized"]
    assert facts["int8"]["layout"] == "full-integer" and done["not_found"] == []
    path = tmp_path / "m.tflite"
    path.write_bytes(data)
    inp = model.signature.example_inputs(batch=1, seed=3)
    cond = model.signature.conditioning(1, 3)
    t = torch.full((1,), 500.0)
    with torch.inference_mode():
        want = TorchDenoiser(model, use_cache=False)(inp["sample"], t, cond)
        got = LiteRTDenoiser(path)(inp["sample"], t, cond)
    assert float((want - got).abs().max()) < 1e-4
