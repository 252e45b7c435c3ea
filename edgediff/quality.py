"""Quality against the ORIGINAL model: what a compression cost, measured where it is used.

`verify` compares an export with the artifact it was made from, which shows that the export
computes what the artifact computes, not that the artifact still generates what the user's
model generated: a quantization that ruined the model passes that check. This module
measures the second thing, the PSNR of final samples against the original fp32 model the
artifact came from, under the same sampler, seeds and conditioning, and warns under a floor.

How the original is found (the artifact never needs the original weights beside it):
- `compress` samples the original once with the verification protocol (the model's own
  scheduler, 20 steps, 16 samples, seed 0, the conditioning of `conditioning()`) and stores those final samples in
  the artifact (extras "quality", a few KB), together with the simulation's own figure and the
  source's path and sha256;
- `verify` with that protocol compares the export's samples with the stored ones; with other
  settings it reloads the original from the recorded source path if its sha256 still matches,
  or takes an original handed to it (the demo has it in memory); otherwise it says it cannot
  measure, which is itself a warning (never a silent pass).

The PSNR's data range is the REFERENCE's peak-to-peak (max - min of the original's samples),
not a fixed 2: a latent-space model's samples span several units, and a fixed range of 2 gave
negative dB there. Image-space models sample in [-1, 1]; their references span close to 2,
so their figures stay comparable with fixed-range ones (the demo's: see docs/quantization.md).
Every result carries the range used (`psnr_data_range`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from edgediff.metrics import psnr
from edgediff.model import DiffusionModel

DEFAULT_FLOOR_DB = 25.0  # below this the samples of a digit/CIFAR-scale model show visible damage
# verify's defaults; sampler None = the model's own scheduler
PROTOCOL: dict[str, Any] = {"sampler": None, "steps": 20, "samples": 16, "seed": 0}
EXTRA = "quality"


def conditioning(model: DiffusionModel, n: int, seed: int) -> Any:
    """The conditioning verify uses for n samples (the signature's generator): labels 0, 1, ...,
    seeded random states, or a dict of named inputs for multi-input models; a text pipeline's
    denoiser gets its prompts encoded by its own text encoder (edgediff.pipelines.conditioning)."""
    pc = _prompts(model, n, seed)
    return pc.cond if pc is not None else model.signature.conditioning(n, seed + 1)


def _prompts(model: DiffusionModel, n: int, seed: int) -> Any:
    from edgediff.pipelines.conditioning import prompt_conditioning, takes_prompts

    return prompt_conditioning(model, n, seed) if takes_prompts(model) else None


def guided(model: DiffusionModel, n: int, seed: int) -> Any:
    """`wrap(denoiser)`: a text pipeline's denoiser samples with classifier-free guidance at the pipeline's
    scale (the unconditional rows: the empty prompt), as the deployed pipeline does; others unchanged."""
    pc = _prompts(model, n, seed)
    return pc.wrap if pc is not None else (lambda den: den)


def conditioning_kind(model: DiffusionModel) -> str:
    """What `conditioning` draws, recorded with stored samples (samples under other conditioning do not match)."""
    from edgediff.pipelines.conditioning import takes_prompts

    return "prompts+guidance" if takes_prompts(model) else "signature"


def _cond_key(model: DiffusionModel) -> dict[str, str]:
    # recorded only where it is not the signature's generator, so older stored samples stay valid for other models
    kind = conditioning_kind(model)
    return {"conditioning": kind} if kind != "signature" else {}


def is_quantized(model: DiffusionModel) -> bool:
    from edgediff.onnx_source import graph_module, is_graph_model

    return "quant" in model.extras or (is_graph_model(model) and bool(graph_module(model).quant))


def final_samples(model: DiffusionModel, samples: int, steps: int, sampler: str | None = None, seed: int = 0,
                  with_correction: bool = True) -> torch.Tensor:
    """Final samples of the PyTorch model (quantization simulation included) under the protocol."""
    from edgediff.passes import sampling_correction
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    corr = sampling_correction(model) if with_correction else None
    with torch.inference_mode():
        pc = _prompts(model, samples, seed)  # a text pipeline: its prompts, with guidance
        den = pc.wrap(TorchDenoiser(model)) if pc is not None else TorchDenoiser(model)
        x = sample(den, model.schedule, model.signature.sample_shape, samples, seed, SamplerConfig(sampler, steps),
                   cond=pc.cond if pc is not None else conditioning(model, samples, seed), correction=corr)
    assert isinstance(x, torch.Tensor)
    return x


def data_range(ref: torch.Tensor) -> float:
    """The PSNR data range for a reference: its peak-to-peak (2, the [-1, 1] span, if it is constant)."""
    r = float(ref.double().max() - ref.double().min()) if ref.numel() else 0.0
    return r if r > 0 and math.isfinite(r) else 2.0


def psnr_vs(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of `x` against the reference samples `ref`, over the reference's own range."""
    return psnr(x, ref, data_range(ref))


def _round(p: float) -> float | None:
    return round(p, 3) if math.isfinite(p) else p


def warning_for(p: float | None, floor: float, what: str, reason: str = "") -> str | None:
    """The one-line warning for a measured (or unmeasurable) PSNR vs the original, or None."""
    if p is None:
        return f"{what}: quality against the original fp32 model not measured ({reason})"
    if p < floor:
        return (f"{what}: final samples are {p:.1f} dB PSNR from the original fp32 model's "
                f"(floor {floor:g} dB): quality was lost, look at the samples before shipping")
    return None


def attach(original: DiffusionModel, compressed: DiffusionModel, floor: float = DEFAULT_FLOOR_DB,
           **protocol: Any) -> dict[str, Any]:
    """Measure the simulation against the original and record the original's samples in `compressed`.

    Returns the summary (psnr_vs_original_db, quality_warning, protocol) without the tensors.
    """
    proto = {**PROTOCOL, **protocol, **_cond_key(original)}
    ref = final_samples(original, proto["samples"], proto["steps"], proto["sampler"], proto["seed"],
                        with_correction=False)
    sim = final_samples(compressed, proto["samples"], proto["steps"], proto["sampler"], proto["seed"])
    p = psnr_vs(sim, ref)
    summary = {"psnr_vs_original_db": _round(p), "psnr_data_range": round(data_range(ref), 4),
               "min_quality_db": floor, "protocol": proto, "quality_warning": warning_for(p, floor, "simulation")}
    compressed.extras[EXTRA] = {
        "protocol": proto, "original_samples": ref.contiguous(), "simulation_psnr_db": _round(p),
        "source": original.provenance.get("source"), "source_sha256": original.provenance.get("source_sha256"),
    }
    return summary


def reload_original(model: DiffusionModel) -> tuple[DiffusionModel | None, str]:
    """The original model from the recorded source path, if it is there and unchanged."""
    from edgediff.errors import EdgediffError
    from edgediff.loaders import load_model, sha256_of

    rec = model.extras.get(EXTRA) or {}
    source = rec.get("source") or model.provenance.get("source")
    want = rec.get("source_sha256") or model.provenance.get("source_sha256")
    if not source:
        return None, "the artifact records no source model"
    if source != "demo":
        path = Path(str(source))
        if not path.exists():
            return None, f"the source model {path} is not on this machine"
        if want and sha256_of(path) != want:
            return None, f"the source model {path} changed since compression (sha256 differs)"
    try:
        original = load_model(str(source))
    except EdgediffError as e:
        return None, f"the source model could not be reloaded ({e})"
    if source == "demo" and want and original.provenance.get("source_sha256") not in (None, want):
        return None, "the bundled demo model changed since compression (sha256 differs)"
    # the artifact's signature carries the overrides it was compressed with (--sample-shape, --cond-shape)
    original.signature = model.signature
    return original, f"reloaded from {source}"


def original_samples(model: DiffusionModel, samples: int, steps: int, sampler: str | None, seed: int,
                     original: DiffusionModel | None = None) -> tuple[torch.Tensor | None, str]:
    """The original model's final samples under these settings: (samples or None, where from / why not)."""
    proto = {"sampler": sampler, "steps": int(steps), "samples": int(samples), "seed": int(seed), **_cond_key(model)}
    if original is not None:
        return final_samples(original, samples, steps, sampler, seed, with_correction=False), "original model given"
    rec = model.extras.get(EXTRA) or {}
    stored = rec.get("original_samples")
    if isinstance(stored, torch.Tensor) and {k: rec.get("protocol", {}).get(k) for k in proto} == proto:
        return stored, "original samples stored in the artifact at compression"
    reloaded, how = reload_original(model)
    if reloaded is None:
        extra = " and no stored samples for these settings" if stored is not None else ""
        return None, how + extra
    return final_samples(reloaded, samples, steps, sampler, seed, with_correction=False), how


def vs_original(model: DiffusionModel, got: torch.Tensor, samples: int, steps: int, sampler: str | None, seed: int,
                floor: float = DEFAULT_FLOOR_DB, original: DiffusionModel | None = None,
                what: str = "export") -> dict[str, Any]:
    """psnr_vs_original_db and quality_warning for final samples `got` of a model made from `model`."""
    ref, how = original_samples(model, samples, steps, sampler, seed, original)
    if ref is None:
        return {"psnr_vs_original_db": None, "quality_warning": warning_for(None, floor, what, how),
                "original_reference": how, "min_quality_db": floor, "psnr_data_range": None}
    p = psnr_vs(got, ref)
    return {"psnr_vs_original_db": _round(p), "quality_warning": warning_for(p, floor, what),
            "original_reference": how, "min_quality_db": floor, "psnr_data_range": round(data_range(ref), 4)}


def print_warning(result: dict[str, Any]) -> None:
    """The one stderr line of a quality warning, if there is one."""
    if result.get("quality_warning"):
        print(f"warning: {result['quality_warning']}", file=sys.stderr)
