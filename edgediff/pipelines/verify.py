"""`edgediff verify PIPELINE_OR_ARTIFACT BUNDLE` for text-to-image bundles.

The same prompts (the built-in list, cycled), seeds, scheduler, steps and guidance run in
PyTorch (the pipeline's text encoder and VAE, the reference denoiser through edgediff's
sampler with classifier-free guidance) and on the bundle's runtime (edgediff.runtime.pipeline);
reported: PSNR and max error of each component on single calls with fixed inputs, and PSNR of
the final images and latents. The PyTorch loop is tested equal to diffusers' own
StableDiffusionPipeline (tests/test_pipelines_verify.py).

A quantized artifact's reference denoiser is its simulation (int8 bundles) or its float weights
(fp32/fp16 bundles); the images are also compared with the original pipeline's
(`psnr_vs_original_db`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff.model import DiffusionModel
from edgediff.pipelines.components import Pipeline, pipeline_of
from edgediff.pipelines.encode import (
    decode_latents,
    encoder_inputs,
    encoder_states,
    pipeline_latents,
)
from edgediff.pipelines.prompts import prompts_for


def reference_model(reference: DiffusionModel, precision: str) -> tuple[DiffusionModel, str]:
    """What a bundle's denoiser claims to compute: the quantization simulation for int8, else the float weights."""
    from edgediff.quant_params import is_quant_wrapper, strip_quant_wrappers

    wrapped = any(is_quant_wrapper(m) for m in reference.denoiser.modules())
    if precision != "int8" and wrapped:
        den = strip_quant_wrappers(copy.deepcopy(reference.denoiser))
        return (DiffusionModel(den, reference.schedule, reference.signature, reference.arch, reference.config,
                               reference.provenance, reference.extras), "artifact float weights")
    return reference, "artifact in PyTorch" + (" (quantization simulation)" if wrapped else "")


def range_psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR over the reference's own range (components' outputs are not in [-1, 1])."""
    rng = float(want.max() - want.min()) or 1.0
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else round(10 * math.log10(rng * rng / mse), 3)


def _row(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    return {"psnr_db": range_psnr(got, want), "max_abs_err": float(np.abs(got - want).max())}


@torch.no_grad()
def reference_images(pipe: Pipeline, model: DiffusionModel, prompts: list[str], seed: int, sampler: str,
                     steps: int, guidance: float, negative: list[str] | None = None,
                     progress: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(latents, images in [-1, 1] or None) of the PyTorch pipeline with `model` as its denoiser."""
    x = pipeline_latents(pipe, model, prompts, seed, sampler, steps, guidance, negative, progress,
                         "verify pipeline: reference")
    return x, (decode_latents(pipe, x) if pipe.has("vae") else None)


@torch.no_grad()
def component_checks(pipe: Pipeline, model: DiffusionModel, bundle: Any, prompts: list[str], seed: int,
                     threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Single calls of each graph on fixed inputs vs the PyTorch component."""
    from edgediff.runtime.bundle import OUTPUT_NAME, ROLE_FULL
    from edgediff.runtime.generate import open_entry

    out: dict[str, dict[str, Any]] = {}
    man = bundle.manifest["pipeline"]
    g = torch.Generator().manual_seed(seed + 11)
    states = None
    names = (man.get("text_encoders") or []) if man.get("encoding") else (["text_encoder"] if man.get("text_encoder")
                                                                          else [])
    for name in names:  # each at the length and with the inputs the pipeline feeds it (SDXL/SD3/PixArt too)
        inputs = encoder_inputs(pipe, name, prompts[:4])
        want = encoder_states(pipe, name, inputs).numpy()  # last_hidden_state ([0] of a projection model is not)
        got = open_entry(bundle, name, threads).run(["last_hidden_state"], {k: v.numpy() for k, v in inputs.items()})[0]
        out[name] = _row(got, want)
        if not man.get("encoding"):
            states = torch.from_numpy(want)
    mod = model.module().eval()
    sig = model.signature
    n = 2
    x = torch.randn(n, *sig.sample_shape, generator=g)
    ehs = states[:n] if states is not None and states.shape[0] >= n else (
        torch.randn(n, *sig.cond_shape, generator=g) if sig.cond_shape else None)
    named = {k: v for k, v in sig.example_inputs(batch=n, seed=seed + 13).items()
             if k not in ("sample", "timestep", "encoder_hidden_states", "class_labels")}  # SD3's pooled_projections ...
    den = open_entry(bundle, ROLE_FULL, threads)
    errs = []
    for t in (999, 500, 50):
        t = min(t, model.schedule.num_train_timesteps - 1)
        inp: dict[str, torch.Tensor] = {"sample": x, "timestep": torch.full((n,), float(t))}
        if ehs is not None:
            inp["encoder_hidden_states"] = ehs
        if sig.num_classes:
            inp["class_labels"] = torch.arange(n) % int(sig.num_classes)
        inp.update(named)
        want = mod(**inp).numpy()
        got = den.run([OUTPUT_NAME], {k: v.numpy() for k, v in inp.items()})[0]
        errs.append(_row(got, want))
    out[bundle.component(ROLE_FULL)[0]] = {"psnr_db": min(e["psnr_db"] for e in errs),
                                           "max_abs_err": max(e["max_abs_err"] for e in errs)}
    if man.get("vae_decoder"):
        vae = pipe.load("vae")
        from edgediff.pipelines.bundle import latent_chw

        z = torch.randn(n, *latent_chw(model), generator=g)  # packed models (Flux): the unpacked latents
        want = vae.decode(z).sample.numpy()
        got = open_entry(bundle, "vae_decoder", threads).run(["sample"], {"latent_sample": z.numpy()})[0]
        out["vae_decoder"] = _row(got, want)
    if man.get("vae_encoder"):
        vae = pipe.load("vae")
        img = torch.rand(n, *man["image_shape"], generator=g) * 2 - 1
        h = vae.encoder(img)
        want = (vae.quant_conv(h) if vae.quant_conv is not None else h).numpy()
        got = open_entry(bundle, "vae_encoder", threads).run(["latent_parameters"], {"sample": img.numpy()})[0]
        out["vae_encoder"] = _row(got, want)
    return out


def _takes_embeds(bundle: Any, model: DiffusionModel) -> bool:
    man = bundle.manifest.get("pipeline") or {}
    return not man.get("text_encoder") and not man.get("num_classes") and bool(
        model.signature.cond_shape or model.signature.extra)


def embeddings_file(model: DiffusionModel, n: int, seed: int, path: Path) -> Path:
    """An .npz of n rows of the denoiser's conditioning inputs by name (the signature's seeded generator): what
    verify feeds a bundle without a text encoder and the PyTorch pipeline alike."""
    cond = model.signature.conditioning(n, seed + 1)
    values = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in values.items() if isinstance(v, torch.Tensor)})
    return path


def embeds_latents(model: DiffusionModel, embeds: Path, n: int, seed: int, sampler: str, steps: int,
                   guidance: float, tmp: Path) -> torch.Tensor:
    """Final latents of the PyTorch side from precomputed embeddings, as `edgediff generate --prompt-embeds`."""
    from edgediff.generate import generate

    generate(model, samples=n, seed=seed, steps=steps, sampler=sampler, guidance=guidance, prompt_embeds=embeds,
             save_npy=tmp / "want.npy")
    return torch.from_numpy(np.load(tmp / "want.npy"))


_PRECISION_ORDER = ("fp32", "fp16", "int8")


def loosest_precision(precisions: list[str]) -> str:
    """The least precise of `precisions` (an unknown name counts as int8, the loosest tolerance)."""
    return max(precisions, key=lambda p: _PRECISION_ORDER.index(p) if p in _PRECISION_ORDER else len(_PRECISION_ORDER))


def verify_pipeline_bundle(reference: DiffusionModel, bundle_dir: Path, tolerances: dict[str, dict[str, float]],
                           steps: int | None = None, samples: int = 4, sampler: str | None = None, seed: int = 0,
                           progress: Any = None, prompts: list[str] | None = None) -> dict[str, Any]:
    """verify's result for a text-to-image bundle (keys and exit codes as `verify`)."""
    from edgediff.metrics import psnr
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.pipeline import run_pipeline

    b = read_bundle(bundle_dir)
    man = b.manifest["pipeline"]
    precision = str(b.manifest.get("precision", "fp32"))
    # final images pass through every generating component: they are held to the least precise one's
    # tolerance (an int8 VAE decoder behind an fp32 UNet is an int8 image path)
    img_precision = loosest_precision([precision, *(str(c.get("precision") or "fp32") for k, c in
                                                    b.manifest.get("components", {}).items() if k != "vae_encoder")])
    tol = tolerances.get(img_precision, tolerances["int8"])
    use_sampler = sampler or str(b.manifest["sampler"])
    n_steps = int(steps or b.manifest["steps"])
    guidance = float(man.get("default_guidance") or 1.0)
    texts = prompts_for(samples, prompts or (reference.extras.get("pipeline") or {}).get("prompts"))
    if not man.get("text_encoder"):
        texts = [""] * samples  # class-conditional / unconditional: labels 0, 1, ... on both sides
    result: dict[str, Any] = {"target": f"{b.target} bundle", "kind": "pipeline", "exported": str(bundle_dir),
                              "samples": samples, "steps": n_steps, "sampler": use_sampler, "seed": seed,
                              "guidance": guidance, "precision": precision, "tolerance": dict(tol),
                              "tolerance_precision": img_precision,
                              "prompts": texts}
    from edgediff.errors import Unavailable
    from edgediff.runtime.generate import open_entry

    try:  # the bundle's own runtime (onnxruntime, LiteRT); Core ML predicts on macOS only
        runtime = open_entry(b, "denoiser").runtime
    except Unavailable as e:
        result.update({"verified": False, "exit_code": 3, "reason": str(e)})
        return result
    pipe = pipeline_of(reference)
    assert pipe is not None
    ref_model, what = reference_model(reference, precision)
    from edgediff.pipelines.parts import records

    parts = {k: str(v.get("precision") or "fp32") for k, v in sorted(records(reference.extras).items())}
    result["reference"] = what + " with the pipeline's text encoder and VAE" + (
        f" (compressed parts in their simulation: {', '.join(f'{k} {v}' for k, v in parts.items())})" if parts else "")
    comps = component_checks(pipe, ref_model, b, texts, seed)
    for k, row in comps.items():  # each part is held to its own precision's tolerance (below)
        row["precision"] = b.manifest["components"][k].get("precision")
    result["components"] = comps
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgediff-verify-") as td:
        embeds = None
        if _takes_embeds(b, reference):  # no text encoder in the bundle: the same embeddings on both sides
            embeds = embeddings_file(reference, samples, seed, Path(td) / "embeds.npz")
            result.update({"prompts": None, "conditioning": "prompt embeddings (the signature's seeded generator; "
                                                            "negatives zeros, as generate --prompt-embeds)"})
            want_x = embeds_latents(ref_model, embeds, samples, seed, use_sampler, n_steps, guidance, Path(td))
            want_img = decode_latents(pipe, want_x) if pipe.has("vae") else None
        else:
            want_x, want_img = reference_images(pipe, ref_model, texts, seed, use_sampler, n_steps, guidance,
                                                progress=progress)
        # a guidance-embedded denoiser (Flux) keeps its guidance input's value on both sides
        embedded = any(s.name == "guidance" for s in reference.signature.extra)
        # the N rows stepped as edgediff's sampler steps them (DiT: DiTPipeline's 2N only changes stochastic noise)
        got_x, got_img, stats = run_pipeline(bundle_dir, "" if embeds else texts, samples=samples, seed=seed,
                                             steps=n_steps, sampler=use_sampler,
                                             guidance=None if embedded else guidance,
                                             duplicated_rows=False, prompt_embeds=embeds)
    from edgediff.sampling import packed_grid, unpack_latents

    if want_x.dim() == 3 and packed_grid(ref_model) is not None:  # Flux: the runtime returns the unpacked latents
        want_x = unpack_latents(want_x, packed_grid(ref_model))  # type: ignore[arg-type]
    p_lat = psnr(torch.from_numpy(got_x), want_x, data_range=float(want_x.max() - want_x.min()) or 1.0)
    p_img = psnr(torch.from_numpy(got_img), want_img) if got_img is not None and want_img is not None else None
    p = p_img if p_img is not None else p_lat
    den_name = b.component("denoiser")[0]
    err = comps[den_name]["max_abs_err"]
    # every float component against its own precision's floor; the denoiser's error as for single files
    bad = [f"{k} {v['psnr_db']} dB" for k, v in comps.items() if k != den_name
           and v["psnr_db"] < tolerances.get(str(b.manifest["components"][k].get("precision")), tol)["psnr_db"]]
    den_tol = tolerances.get(precision, tolerances["int8"])  # the denoiser's single calls: its own precision's
    within = p >= tol["psnr_db"] and err <= den_tol["max_abs_err"] and not bad
    result.update({"psnr_db": round(p, 3) if math.isfinite(p) else p,
                   "psnr_images_db": (round(p_img, 3) if p_img is not None and math.isfinite(p_img) else p_img),
                   "psnr_latents_db": round(p_lat, 3) if math.isfinite(p_lat) else p_lat,
                   "max_abs_err": err, "verified": True, "runtime": runtime,
                   "denoiser_calls": stats["denoiser_calls"], "ms_per_image": stats["ms_per_image"],
                   "within_tolerance": within, "exit_code": 0 if within else 4})
    if not within:
        result["reason"] = (f"out of tolerance for {img_precision}: images {p:.2f} dB (min {tol['psnr_db']}), denoiser "
                            f"max_abs_err {err:.3g} (max {den_tol['max_abs_err']})" + (f"; {', '.join(bad)}" if bad else ""))
    from edgediff import quality

    src = Path(str((reference.extras.get("pipeline") or {}).get("path", "")))
    from edgediff.pipelines.parts import records

    compressed = quality.is_quantized(reference) or bool(records(reference.extras))
    if compressed and want_img is not None and not (src / pipe.denoiser_name).is_dir():
        result["psnr_vs_original_note"] = f"the original pipeline folder {src} is gone; not compared"
    elif compressed and want_img is not None:
        from edgediff.loaders import load_model

        original = load_model(src)
        orig_pipe = pipeline_of(original)  # the original components too, not the artifact's compressed ones
        assert orig_pipe is not None
        _, orig_img = reference_images(orig_pipe, original, texts, seed, use_sampler, n_steps, guidance)
        assert orig_img is not None and got_img is not None
        po = psnr(torch.from_numpy(got_img), orig_img)
        result["psnr_vs_original_db"] = round(po, 3) if math.isfinite(po) else po
        result["original"] = str(src)
    return result
