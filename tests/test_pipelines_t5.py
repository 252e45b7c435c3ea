"""T5 text encoders: SD3 (two CLIPs + T5 as text_encoder_3), PixArt-alpha (one T5 whose attention mask the
transformer also takes) and Flux (CLIP pooled + T5). Prompts encoded as diffusers' encode_prompt; PyTorch generate
equal to the diffusers pipelines; ONNX bundles (fp32, fp16, weights as external data) generated torch-free with the
`tokenizers` library, equal to diffusers, verified; an int8 denoiser compressed, bundled, generated and verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_fixtures import build_tiny_flux, build_tiny_pixart, build_tiny_sd3_t5, cli_json, t5_tokenizer

from edgediff.loaders import load_model
from edgediff.testing import cli_without_torch

pytest.importorskip("onnxruntime", reason="bundles run on onnxruntime")

PROMPT = "A red cat on the dog "  # upper case and a trailing space: PixArt lower-cases and strips


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD3 (CLIP x2 + T5) and PixArt-alpha pipeline folders, built once for the module."""
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd3_t5": build_tiny_sd3_t5(root / "sd3-t5"), "pixart": build_tiny_pixart(root / "pixart")}


def _diffusers(folder: Path, prompt: str, steps: int, guidance: float, seed: int, n: int = 1,
               negative: str | None = None) -> np.ndarray:
    import diffusers

    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    kw = {"use_resolution_binning": False, "clean_caption": False} if "PixArt" in cls.__name__ else {}
    if negative is not None:  # PixArt's default is "", SD3's None (both encode "")
        kw["negative_prompt"] = negative
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed), output_type="latent",
                **kw).images.float().numpy()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)


def test_t5_prompts_encode_and_generate_as_diffusers(folders: dict[str, Path], tmp_path: Path) -> None:
    import diffusers

    from edgediff.generate import generate
    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.encode import encode_conditioning
    from edgediff.runtime.tokenizer import BundleTokenizer

    sd3_t5, pixart = folders["sd3_t5"], folders["pixart"]
    prompts, negs = [PROMPT, "the dog " * 200], ["the dog", ""]  # the second is truncated at every length
    m = load_model(sd3_t5)
    assert m.signature.cond_shape == (16 + 256, 48)  # CLIP tokens, then T5's max_sequence_length
    from edgediff.pipelines.encode import component_stats

    row = component_stats(pipeline_of(m))["text_encoder_3"]  # what `info` lists
    assert row["class"] == "T5EncoderModel" and row["sequence_length"] == 256 and row["macs"] > 0
    c, u = encode_conditioning(pipeline_of(m), prompts, negs)
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3_t5))
    pe, ne, pp, npp = ref.encode_prompt(prompts, None, None, negative_prompt=negs)
    for got, want in ((c["encoder_hidden_states"], pe), (u["encoder_hidden_states"], ne),
                      (c["pooled_projections"], pp), (u["pooled_projections"], npp)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert float(pe[:, 16:].abs().sum()) > 0  # the T5 rows are T5's states, not zeros
    m2 = load_model(pixart)
    assert m2.signature.cond_shape == (120, 32) and [s.name for s in m2.signature.extra] == ["encoder_attention_mask"]
    from edgediff.pipelines.components import max_sequence_length

    assert max_sequence_length("PixArtSigmaPipeline") == 300  # each class's own default, read from diffusers
    c, u = encode_conditioning(pipeline_of(m2), prompts)
    pe, pm, ne, nm = diffusers.PixArtAlphaPipeline.from_pretrained(str(pixart)).encode_prompt(prompts, True,
                                                                                               clean_caption=False)
    torch.testing.assert_close(c["encoder_hidden_states"], pe, atol=1e-5, rtol=0)
    torch.testing.assert_close(u["encoder_hidden_states"], ne, atol=1e-5, rtol=0)
    assert torch.equal(c["encoder_attention_mask"], pm.float()) and torch.equal(u["encoder_attention_mask"], nm.float())
    assert pm[0].sum() < 120 and pm[1].sum() == 120  # padding masked; the long prompt fills the sequence
    # the runtime's tokenizer (the `tokenizers` library on tokenizer.json) gives transformers' ids and mask
    tok = t5_tokenizer()
    tok.save_pretrained(str(tmp_path / "tok"))
    ids, mask = BundleTokenizer(tmp_path / "tok" / "tokenizer.json", 120, 0).encode(prompts)
    want = tok(prompts, padding="max_length", max_length=120, truncation=True)
    assert ids.tolist() == want.input_ids and mask.tolist() == want.attention_mask
    # edgediff's PyTorch generate --prompt is the diffusers pipeline (guidance, the mask into the transformer)
    for folder, model, steps, g in ((sd3_t5, m, 3, 5.0), (pixart, m2, 4, 4.5)):
        rep = generate(model, samples=2, seed=1, steps=steps, guidance=g, prompt=PROMPT, negative_prompt="the dog",
                       save_npy=tmp_path / "x.npy")
        assert rep["classifier_free_guidance"]
        _close(np.load(tmp_path / "x.npy"), _diffusers(folder, PROMPT, steps, g, 1, 2, "the dog"))


@pytest.mark.parametrize("which", ["sd3_t5", "pixart"])
def test_t5_bundle_generates_without_torch_as_diffusers_and_verifies(which: str, folders: dict[str, Path],
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = folders[which]
    b = tmp_path / "b"
    rc, rep = cli_json(capsys, "--threads", "1", "export", str(folder), "--target", "onnx", "-o", str(b))
    assert rc == 0 and rep["kind"] == "pipeline"
    mf = json.loads((b / "edgediff_bundle.json").read_text())
    t5 = "text_encoder_3" if which == "sd3_t5" else "text_encoder"
    comp, p = mf["components"][t5], mf["pipeline"]
    assert p["text_encoder_kinds"][t5] == "t5" and comp["outputs"] == ["last_hidden_state"]  # optimum's T5 output
    seq = 256 if which == "sd3_t5" else 120
    assert p["tokenizer_configs"]["tokenizer" + t5[len("text_encoder"):]] == {"max_length": seq, "pad_token_id": 0}
    # PixArt's graph takes the mask (its pipeline feeds one), SD3's does not
    assert set(comp["inputs"]) == ({"input_ids", "attention_mask"} if which == "pixart" else {"input_ids"})
    steps, g = (3, 5.0) if which == "sd3_t5" else (4, 4.5)
    rc, res, torch_mods, err = cli_without_torch(["--threads", "1", "generate", str(b), "--prompt", PROMPT,
                                                  "--samples", "2", "--seed", "1", "--steps", str(steps), "--guidance",
                                                  str(g), "--save-npy", str(tmp_path / "x.npy"), "-o",
                                                  str(tmp_path / "x.png"), "--json"])
    assert rc == 0, err[-2000:]
    assert res["torch_imported"] is False and torch_mods == ["torch"] and res["denoiser_calls"] == 2 * steps
    assert t5 in res["component_ms"] and (tmp_path / "x.png").is_file()
    _close(np.load(tmp_path / "x.npy"), _diffusers(folder, PROMPT, steps, g, 1, 2))
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(folder), str(b), "--samples", "2", "--steps", "3")
    assert rc == 0 and res["verified"], res.get("reason")
    assert res["components"][t5]["psnr_db"] > 80 and res["psnr_images_db"] > 80
    from edgediff.pipelines.profile import profile_bundle

    prof = profile_bundle(b, warmup=0, repeats=1, threads=1)  # the T5 graph at its run shapes (mask included)
    assert prof["components"][t5]["calls_per_image"] == 2 and prof["components"][t5]["total_ms"] > 0


def test_t5_bundle_fp16_with_external_data(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 components, and graphs over the external-data threshold (lowered here: real T5s are GBs) keep their
    weights in model.onnx_data beside model.onnx, as optimum's; the runtime and verify read them."""
    from edgediff.exporters import bundle_onnx

    from edgediff.runtime.pipeline import run_pipeline

    pixart = folders["pixart"]
    monkeypatch.setattr(bundle_onnx, "EXTERNAL_DATA_THRESHOLD", 20_000)
    b = tmp_path / "b16"
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(pixart), "--target", "onnx", "--precision", "fp16",
                     "-o", str(b))
    assert rc == 0
    mf = json.loads((b / "edgediff_bundle.json").read_text())
    assert mf["components"]["text_encoder"]["precision"] == "fp16"
    import onnx

    proto = onnx.load(str(b / "text_encoder" / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx_data"}
    assert mf["components"]["text_encoder"]["size_bytes"] >= (b / "text_encoder" / "model.onnx_data").stat().st_size
    x, img, _ = run_pipeline(b, PROMPT, samples=1, seed=2, steps=3, guidance=4.5, threads=1)
    want = _diffusers(pixart, PROMPT, 3, 4.5, 2)
    assert img is not None and float(np.abs(x - want).max()) < 0.05 * float(np.abs(want).max())
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(pixart), str(b), "--samples", "2", "--steps", "3")
    assert rc == 0 and res["verified"] and res["components"]["text_encoder"]["precision"] == "fp16", res.get("reason")


def test_pixart_int8_t5_part_compressed_bundled_and_verified(folders: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`[[pass]] component = "text_encoder"` quantizes PixArt's T5 (W8A8 on its prompts' token ids): the artifact
    reports the part, the bundle ships an int8 T5 graph (with its attention mask), torch-free generate runs it and
    verify holds it to the int8 tolerance against its simulation."""
    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.compress import mask_pad_id
    from edgediff.pipelines.encode import encoder_inputs, encoder_states
    from edgediff.pipelines.parts import run_part

    # the part is calibrated and scored as PixArt calls it: with the attention mask of its padding
    pipe = pipeline_of(load_model(folders["pixart"]))
    inp, pad = encoder_inputs(pipe, "text_encoder", [PROMPT, ""]), mask_pad_id(pipe, "text_encoder")
    with torch.no_grad():
        torch.testing.assert_close(run_part("text_encoder", pipe.load("text_encoder"), inp["input_ids"], pad),
                                   encoder_states(pipe, "text_encoder", inp))
    assert mask_pad_id(pipeline_of(load_model(folders["sd3_t5"])), "text_encoder_3") is None  # SD3 feeds no mask
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t5"\n[[pass]]\nname = "calib"\ncomponent = "text_encoder"\nn_samples = 4\n'
                      '[[pass]]\nname = "quant"\ncomponent = "text_encoder"\n')
    art = tmp_path / "art"
    rc, man = cli_json(capsys, "--threads", "1", "compress", str(folders["pixart"]), "--recipe", str(recipe), "-o",
                       str(art))
    assert rc == 0
    part = man["components"]["parts"]["text_encoder"]
    assert part["precision"] == "int8" and part["size_bytes_after"] < part["size_bytes_before"] and part["psnr_db"] > 30
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(art), "--target", "onnx", "-o", str(tmp_path / "b"))
    assert rc == 0
    comp = json.loads((tmp_path / "b" / "edgediff_bundle.json").read_text())["components"]["text_encoder"]
    assert comp["precision"] == "int8" and set(comp["inputs"]) == {"input_ids", "attention_mask"}
    rc, res, _, err = cli_without_torch(["--threads", "1", "generate", str(tmp_path / "b"), "--prompt", PROMPT,
                                         "--steps", "3", "-o", str(tmp_path / "x.png"), "--json"])
    assert rc == 0 and res["torch_imported"] is False, err[-2000:]
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(art), str(tmp_path / "b"), "--samples", "2",
                       "--steps", "3")
    assert rc == 0 and res["verified"] and res["components"]["text_encoder"]["precision"] == "int8", res.get("reason")
    assert "psnr_vs_original_db" in res


@pytest.mark.slow
def test_sd3_t5_int8_denoiser_compressed_bundled_and_verified(folders: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A recipe without `component` acts on the denoiser; its calibration samples the pipeline's prompts through
    all three encoders with guidance; the int8 bundle generates torch-free and verifies against its simulation."""
    sd3_t5 = folders["sd3_t5"]
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 2\nsteps = 3\ncount = 8\n'
                      '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\n')
    art = tmp_path / "art"
    rc, _ = cli_json(capsys, "--threads", "1", "compress", str(sd3_t5), "--recipe", str(recipe), "-o", str(art))
    assert rc == 0
    assert (art / "pipeline" / "text_encoder_3" / "config.json").is_file()
    rc, _ = cli_json(capsys, "--threads", "1", "export", str(art), "--target", "onnx", "--precision", "int8",
                     "-o", str(tmp_path / "b8"))
    assert rc == 0
    mf = json.loads((tmp_path / "b8" / "edgediff_bundle.json").read_text())
    assert mf["components"]["transformer"]["precision"] == "int8"
    assert mf["components"]["text_encoder_3"]["precision"] == "fp32"
    rc, res, _, err = cli_without_torch(["--threads", "1", "generate", str(tmp_path / "b8"), "--prompt", PROMPT,
                                         "--steps", "3", "-o", str(tmp_path / "i8.png"), "--json"])
    assert rc == 0 and res["torch_imported"] is False and (tmp_path / "i8.png").is_file(), err[-2000:]
    rc, res = cli_json(capsys, "--threads", "1", "verify", str(art), str(tmp_path / "b8"), "--samples", "2",
                       "--steps", "3")
    assert rc == 0 and res["verified"] and "quantization simulation" in res["reference"], res.get("reason")
    assert "text_encoder_3" in res["components"] and "psnr_vs_original_db" in res


def test_flux_prompts_encode_as_diffusers_and_guidance_is_embedded(tmp_path: Path) -> None:
    """FluxPipeline: the T5's states and the CLIP's pooled output, as its encode_prompt; its guidance_scale feeds the
    guidance embedding, so edgediff runs no classifier-free guidance (true_cfg_scale 1); the whole-pipeline bundle
    has both text encoders and the VAE (for the packed latents' unpacked shape)."""
    import diffusers

    from edgediff.generate import generate
    from edgediff.pipelines import pipeline_of
    from edgediff.pipelines.bundle import component_graphs
    from edgediff.pipelines.encode import encode_conditioning

    folder = build_tiny_flux(tmp_path / "flux")
    m = load_model(folder)
    assert m.signature.cond_shape == (512, 32) and m.extras["pipeline"]["default_guidance"] is None
    prompts = [PROMPT, "the dog " * 200]
    pipe = pipeline_of(m)
    c, _ = encode_conditioning(pipe, prompts)
    pe, pp, text_ids = diffusers.FluxPipeline.from_pretrained(str(folder)).encode_prompt(prompts, None)
    torch.testing.assert_close(c["encoder_hidden_states"], pe, atol=1e-4, rtol=0)
    torch.testing.assert_close(c["pooled_projections"], pp, atol=1e-5, rtol=0)
    assert not text_ids.any()  # txt_ids: zeros, the signature's fill
    rep = generate(m, samples=1, seed=0, steps=1, prompt=PROMPT, save_npy=tmp_path / "x.npy")
    assert not rep["classifier_free_guidance"] and rep["denoiser_calls"] == 1
    graphs = component_graphs(pipe, m, "fp32")  # bundled whole: tests/test_pipelines_flux.py runs it
    assert {"text_encoder", "text_encoder_2", "vae_decoder"} <= set(graphs)
