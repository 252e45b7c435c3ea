"""Loading every supported source, and failing with one clear line on bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgediff.cli import main
from edgediff.errors import BadInput
from edgediff.loaders import LoadOptions, load_model


def _same_output(a, b) -> None:
    inp = a.example_inputs(2)
    with torch.no_grad():
        ya, yb = a.module()(**inp), b.module()(**inp)
    torch.testing.assert_close(ya, yb)


def test_diffusers_folder_roundtrip(tmp_path: Path, tiny_unet) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "unet")
    m = load_model(tmp_path / "unet")
    assert m.arch == "UNet2DModel"
    assert m.signature.sample_shape == (1, 16, 16)
    assert m.provenance["source_sha256"]
    _same_output(tiny_unet, m)


def test_pipeline_folder_with_scheduler(tmp_path: Path, tiny_unet) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2"}))
    m = load_model(tmp_path / "pipe")
    assert m.schedule.num_train_timesteps == 500
    assert m.schedule.config["beta_schedule"] == "squaredcos_cap_v2"


def test_cond_unet_and_dit_signatures(tmp_path: Path, tiny_cond_unet, tiny_dit) -> None:
    tiny_cond_unet.denoiser.save_pretrained(tmp_path / "c")
    c = load_model(tmp_path / "c", LoadOptions(cond_shape=(6, 32)))
    assert c.arch == "UNet2DConditionModel" and c.signature.cond_shape == (6, 32)
    assert load_model(tmp_path / "c").signature.cond_shape == (77, 32)  # inferred: CLIP length, config dim
    _same_output(tiny_cond_unet, c)
    tiny_dit.denoiser.save_pretrained(tmp_path / "d")
    d = load_model(tmp_path / "d")
    assert d.arch == "DiTTransformer2DModel" and d.signature.num_classes == 10
    _same_output(tiny_dit, d)


def test_safetensors_with_config(tmp_path: Path, tiny_unet) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "u")
    weights = next((tmp_path / "u").glob("*.safetensors"))
    m = load_model(weights)
    _same_output(tiny_unet, m)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(weights.read_bytes())
    with pytest.raises(BadInput, match="config.json"):
        load_model(lone)
    m2 = load_model(lone, LoadOptions(config=tmp_path / "u" / "config.json"))
    _same_output(tiny_unet, m2)


def test_pt_state_dict_and_pickled_module(tmp_path: Path, tiny_unet) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "u")
    sd = tmp_path / "u" / "weights.pt"
    torch.save(tiny_unet.denoiser.state_dict(), sd)
    _same_output(tiny_unet, load_model(sd))
    whole = tmp_path / "whole.pt"
    torch.save(tiny_unet.denoiser, whole)
    with pytest.raises(BadInput, match="--trust-pickle"):
        load_model(whole)
    m = load_model(whole, LoadOptions(trust_pickle=True))
    assert m.arch == "UNet2DModel"
    _same_output(tiny_unet, m)


def test_torch_export_archive(tmp_path: Path, tiny_unet) -> None:
    mod = tiny_unet.module()
    inp = tiny_unet.example_inputs(1)
    ep = torch.export.export(mod, (inp["sample"], inp["timestep"]))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    m = load_model(path)
    assert m.signature.sample_shape == (1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.denoiser(inp["sample"], inp["timestep"]), mod(**inp))


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "wrong_kind", "garbage_pt", "bad_config", "no_weights"])
def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, tiny_unet, kind: str, capsys) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "u")
    weights = next((tmp_path / "u").glob("*.safetensors"))
    target = {
        "missing": lambda: tmp_path / "nope.safetensors",
        "empty": lambda: _write(tmp_path / "u" / "empty.pt", b""),
        "truncated": lambda: _write(weights, weights.read_bytes()[: len(weights.read_bytes()) // 2]) and weights,
        "wrong_kind": lambda: _write(tmp_path / "img.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64),
        "garbage_pt": lambda: _write(tmp_path / "g.pt", b"not a torch file at all"),
        "bad_config": lambda: (_write(tmp_path / "u" / "config.json", b"{not json"), tmp_path / "u")[1],
        "no_weights": lambda: (weights.unlink(), tmp_path / "u")[1],
    }[kind]()
    rc = main(["info", str(target)])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in captured.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert Path(str(target)).name in lines[0] or str(target) in lines[0]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- checkpoint layouts people have
def _fresh_unet_dir(tiny_unet, d: Path) -> Path:
    tiny_unet.denoiser.save_pretrained(d)
    return d


def test_weight_variants_pick_plain_by_default_and_fp16_on_request(tiny_unet, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = _fresh_unet_dir(tiny_unet, tmp_path / "v")
    state = {k: v.half() for k, v in tiny_unet.denoiser.state_dict().items()}
    save_file(state, str(d / "diffusion_pytorch_model.fp16.safetensors"))
    plain = load_model(d)  # both files present: the plain one, not a "sharded" error
    assert next(plain.denoiser.parameters()).dtype == torch.float32 and "variant" not in plain.provenance
    half = load_model(d, LoadOptions(variant="fp16"))
    assert half.provenance["variant"] == "fp16"
    w = dict(half.denoiser.named_parameters())["conv_in.weight"]
    torch.testing.assert_close(w.float(), state["conv_in.weight"].float())
    with pytest.raises(BadInput, match="variant 'bf16'"):
        load_model(d, LoadOptions(variant="bf16"))
    (d / "diffusion_pytorch_model.safetensors").unlink()
    assert load_model(d).provenance["variant"] == "fp16"  # the only weights there


def test_sharded_checkpoint_with_index(tiny_unet, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "s"
    tiny_unet.denoiser.save_pretrained(d)
    (d / "diffusion_pytorch_model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in tiny_unet.denoiser.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    save_file({k: state[k] for k in keys[:half]}, str(d / names[0]))
    save_file({k: state[k] for k in keys[half:]}, str(d / names[1]))
    index = {"metadata": {}, "weight_map": {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}}
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    m = load_model(d)
    inp = tiny_unet.example_inputs(1)
    torch.testing.assert_close(m.module()(**inp), tiny_unet.module()(**inp))
    (d / names[1]).unlink()
    with pytest.raises(BadInput, match="00002-of-00002"):
        load_model(d)
    (d / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(BadInput, match="index"):
        load_model(d)


def test_single_file_sd_checkpoint_says_convert_first(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    f = tmp_path / "v1-5-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 1, 1)}, str(f))
    with pytest.raises(BadInput, match="convert it with diffusers first"):
        load_model(f)
    d = tmp_path / "dir"
    d.mkdir()
    f.rename(d / f.name)
    with pytest.raises(BadInput, match="convert it with diffusers first"):
        load_model(d)
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, ckpt)
    with pytest.raises(BadInput, match="convert it with diffusers first"):
        load_model(ckpt)
