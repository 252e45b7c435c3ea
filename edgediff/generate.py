"""`edgediff generate` in PyTorch: sample a model or artifact with its own (or a chosen) diffusers scheduler.

Writes a PNG grid and, with save_npy, the final samples in model space as (N, C, H, W) float32
(packed-latent models such as Flux are unpacked to (N, C, H, W) first). The initial noise is
`torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)) * init_noise_sigma`, as
diffusers pipelines draw it on CPU.

Conditioning: --prompt-embeds FILE (.safetensors or .npz) holds tensors named like the model's
inputs (encoder_hidden_states, text_embeds, pooled_projections, ...), with or without a batch
axis, optionally `negative_<name>` for classifier-free guidance; without it, conditioning is
the signature's deterministic example (random embeddings: fine for speed, not for images).
--guidance G > 1 runs classifier-free guidance (negatives, or zeros when the file has none);
a model with a `guidance` input (Flux-dev, guidance-distilled Sana) gets G there instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel
from edgediff.sampling import Cond, SamplerConfig, TorchDenoiser, packed_grid, recorded_sampling, sample, unpack_latents

DEFAULT_STEPS = 50
FEW_STEP = {"LCMScheduler": 4, "TCDScheduler": 4}


def load_prompt_embeds(path: Path, model: DiffusionModel, n: int) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, torch.Tensor]]:
    """(conditioning, negative conditioning) by input name, each expanded to n samples."""
    from safetensors.torch import load_file

    from edgediff.runtime.pipeline import embeds_by_input, read_embeds_file

    def npz(p: Path) -> dict[str, torch.Tensor]:
        data = np.load(str(p), allow_pickle=False)
        return {k: torch.from_numpy(data[k]) for k in data.files}

    path = Path(path)
    raw = read_embeds_file(path, {".safetensors": lambda p: load_file(str(p)), ".npz": npz,
                                  ".npy": lambda p: {"encoder_hidden_states": torch.from_numpy(
                                      np.load(str(p), allow_pickle=False))}},
                           ".safetensors, .npz or .npy")
    specs = {s.name: s for s in model.signature.input_specs() if s.name not in ("sample", "timestep")}
    pos: dict[str, torch.Tensor] = {}
    neg: dict[str, torch.Tensor] = {}
    for key, name, v in embeds_by_input(raw, specs, path, "this model"):
        want = tuple(specs[name].shape)
        if tuple(v.shape) == want:
            v = v.unsqueeze(0)
        if tuple(v.shape[1:]) != want or v.shape[0] not in (1, n):
            raise BadInput(f"{path}: {key!r} has shape {tuple(v.shape)}; the model takes {want} "
                           f"(optionally with a batch of 1 or {n} first)")
        v = v.expand(n, *want).clone()
        v = v.long() if specs[name].dtype == "int64" else v.float()
        (neg if key.startswith("negative_") else pos)[name] = v
    return pos, neg


def _as_cond(model: DiffusionModel, values: dict[str, torch.Tensor]) -> Cond:
    sig = model.signature
    if not values:
        return None
    if not sig.extra and len(values) == 1:
        return next(iter(values.values()))
    return values


class Guided:
    """Classifier-free guidance around a denoiser: out = u + g (c - u), both halves in one batch."""

    def __init__(self, inner: Any, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], scale: float) -> None:
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        # `cond` carries the rows of this batch: its index into the full set is in self.cond
        assert isinstance(cond, dict)
        idx = cond["__rows__"]
        both = {k: torch.cat([self.uncond[k][idx], self.cond[k][idx]]) for k in self.cond}
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), both)
        u, c = out.chunk(2)
        return u + self.scale * (c - u)


def _unpack(model: DiffusionModel, x: torch.Tensor) -> torch.Tensor:
    """Packed 2x2 latent tokens (N, h*w, 4C) -> (N, C, 2h, 2w), as FluxPipeline._unpack_latents."""
    if x.dim() != 3:
        return x
    h, w = packed_grid(model) or (1, x.shape[1])
    n, _, c4 = x.shape
    if c4 % 4 or h * w != x.shape[1]:
        return x.view(n, 1, x.shape[1], c4)
    return unpack_latents(x, (h, w))


def write_png_grid(x: np.ndarray, out: Path) -> str:
    """A PNG grid of (N, C, H, W) samples; returns how values were mapped to pixels.

    1 or 3 channels in [-1, 1] are images; any other channel count (latents without their VAE)
    shows channels 0-2 (or 0), each image min-max scaled: a look at the latents, not an image.
    """
    try:
        from PIL import Image
    except ImportError:
        raise Unavailable("writing a PNG needs Pillow: pip install pillow (or use --save-npy)") from None
    n, c, h, w = x.shape
    if c in (1, 3):
        img = (np.clip(x, -1, 1) + 1) / 2
        how = "pixels: [-1, 1] -> [0, 255]"
    else:
        img = x[:, :3] if c >= 3 else x[:, :1]
        lo = img.reshape(n, -1).min(1).reshape(n, 1, 1, 1)
        hi = img.reshape(n, -1).max(1).reshape(n, 1, 1, 1)
        img = (img - lo) / np.maximum(hi - lo, 1e-8)
        how = f"latents: {c} channels, channels 0-{min(c, 3) - 1} min-max scaled per sample (no VAE decode)"
    img = (img * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    ch = img.shape[-1]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2), cols * (w + 2), ch), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, q * (w + 2) + 1: q * (w + 2) + 1 + w] = img[k]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if ch == 1 else grid).save(str(out))
    return how


def generate(model: DiffusionModel, samples: int = 4, seed: int = 0, steps: int | None = None,
             sampler: str | None = None, guidance: float | None = None, prompt_embeds: Path | None = None,
             output: Path | None = None, save_npy: Path | None = None, eta: float = 0.0, batch_size: int = 16,
             progress: Any = None, prompt: str | None = None, negative_prompt: str | None = None) -> dict[str, Any]:
    """Sample `model` in PyTorch; writes the PNG grid / .npy asked for; returns the report.

    `prompt` (a model loaded from a diffusers pipeline folder): encoded by the pipeline's own
    tokenizer and text encoder (edgediff.pipelines), with classifier-free guidance at the
    pipeline's default scale unless `guidance` is given; the PNG is then the VAE-decoded image.
    """
    if samples < 1:
        raise BadInput(f"--samples must be >= 1, got {samples}")
    if guidance is not None and guidance < 0:
        raise BadInput(f"--guidance must be >= 0, got {guidance}")
    sig = model.signature
    own = model.schedule.class_name
    # unset sampler/steps/eta: what the artifact is meant to be run with (the sampling pass)
    sampler, steps, rec_eta = recorded_sampling(model, sampler, steps, None)
    eta = rec_eta if rec_eta is not None and eta == 0.0 else eta
    if steps is None:
        from edgediff import schedulers

        cls = schedulers.resolve(sampler)[0] if sampler else own
        steps = FEW_STEP.get(cls, DEFAULT_STEPS)
    # a pipeline's own sigma spacing (FluxPipeline's linspace) when sampling with its own scheduler
    from edgediff.pipelines.components import pipeline_sigmas

    own_sampler = not sampler or sampler == own
    pipe_class = (model.extras.get("pipeline") or {}).get("class") if own_sampler else None
    cfg = SamplerConfig(sampler, steps, eta, batch_size, sigmas=pipeline_sigmas(pipe_class) if pipe_class else None)
    n = samples
    names = [s.name for s in sig.input_specs() if s.name not in ("sample", "timestep")]
    pipe = None
    if prompt is not None:
        if prompt_embeds is not None:
            raise BadInput("--prompt and --prompt-embeds: give one of them")
        pipe, pos, neg = _encode_prompt(model, prompt, negative_prompt, n)
        if guidance is None:
            guidance = pipe.default_guidance
        source = f"prompt {prompt!r} (the pipeline's text encoder)"
    elif prompt_embeds is not None:
        if not sig.cond_shape and not sig.extra:
            raise BadInput(f"{prompt_embeds}: this model ({model.arch}) takes no text conditioning")
        pos, neg = load_prompt_embeds(prompt_embeds, model, n)
        source = str(prompt_embeds)
    else:
        pos, neg, source = {}, {}, None
    example = sig.conditioning(n, seed)
    ex = example if isinstance(example, dict) else ({names[0]: example} if example is not None else {})
    values = {**ex, **pos}
    report: dict[str, Any] = {"model": model.provenance.get("source", model.arch), "arch": model.arch,
                              "samples": n, "seed": seed, "guidance": guidance}
    if source is None and (sig.cond_shape or any(s.fill == "randn" for s in sig.extra)):
        report["conditioning"] = "example (random embeddings: pass --prompt-embeds for real prompts)"
    elif source:
        report["conditioning"] = source
    den: Any = TorchDenoiser(model)
    cfg_scale = None
    if guidance is not None and "guidance" in names:
        values["guidance"] = torch.full((n,), float(guidance))  # guidance-distilled: one call per step
    elif guidance is not None and guidance != 1.0:
        if not sig.cond_shape and not sig.num_classes:
            raise BadInput("--guidance needs a conditioned model (text or class labels)")
        uncond = {k: neg.get(k, torch.zeros_like(v) if v.is_floating_point() else v) for k, v in values.items()}
        if sig.num_classes and "class_labels" not in neg:
            uncond["class_labels"] = torch.full((n,), sig.num_classes, dtype=torch.long)  # DiT's null class
        den = Guided(den, values, uncond, float(guidance))
        cfg_scale = float(guidance)
        values = {"__rows__": torch.arange(n)}
    cond = values if cfg_scale else _as_cond(model, values)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    x = sample(den, model.schedule, tuple(sig.sample_shape), n, seed, cfg, cond=cond, progress=progress,
               description="generate", stats=stats, packed_grid=packed_grid(model))
    seconds = time.perf_counter() - t0
    assert isinstance(x, torch.Tensor)
    calls = int(stats["denoiser_calls"]) * (2 if cfg_scale else 1)
    report.update({"sampler": stats["sampler"], "steps": steps, "denoiser_calls": calls,
                   "seconds": round(seconds, 4), "ms_per_image": round(seconds * 1000 / n, 3),
                   "classifier_free_guidance": cfg_scale is not None})
    if "denoiser_calls_full" in stats:  # DeepCache: full and shallow calls
        report.update({k: stats[k] for k in ("denoiser_calls_full", "denoiser_calls_shallow")})
    arr = _unpack(model, x.float()).numpy().astype(np.float32)
    report["shape"] = list(arr.shape)
    if save_npy is not None:
        save_npy = Path(save_npy)
        save_npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(str(save_npy), arr)
        report["save_npy"] = str(save_npy)
    if output is not None:
        img = arr
        if pipe is not None and pipe.has("vae"):  # the image, not a look at the latents
            from edgediff.pipelines.encode import decode_latents

            with torch.no_grad():
                img = decode_latents(pipe, torch.from_numpy(arr)).numpy().astype(np.float32)
            report["decoded"] = "vae"
        report["png"] = write_png_grid(img, Path(output))
        report["output"] = str(output)
    return report


def _encode_prompt(model: DiffusionModel, prompt: str, negative: str | None,
                   n: int) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(pipeline, conditional, unconditional) encoder states of the prompt for n samples."""
    from edgediff.pipelines.components import pipeline_of
    from edgediff.pipelines.encode import encode_conditioning

    where = model.provenance.get("source", model.arch)
    pipe = pipeline_of(model)
    if pipe is None:
        raise BadInput(f"{where}: --prompt needs a diffusers pipeline folder (model_index.json with its text encoder "
                       "and tokenizer); for a bare denoiser encode the prompt yourself and pass --prompt-embeds FILE")
    with torch.no_grad():  # every input the pipeline's encode_prompt gives (SDXL: text_embeds, time_ids too)
        c, u = encode_conditioning(pipe, [prompt] * n, [negative] * n if negative is not None else None)
    # inputs with a fixed value (Flux img_ids/txt_ids/guidance, PixArt's mask) take it when the prompt gives none
    missing = [s.name for s in model.signature.extra if s.name not in c and s.fill not in ("const", "grid", "zeros")]
    if missing:
        raise BadInput(f"{where}: --prompt encodes {', '.join(c)}; {model.arch} also takes "
                       f"{', '.join(missing)}: pass them with --prompt-embeds FILE")
    return pipe, c, u
