"""Passes on a pipeline's other components: `[[pass]] name = "quant"  component = "vae_decoder"`.

The pass manager (edgediff.pipeline) routes a recipe entry with a `component` here; without one a
pass acts on the denoiser, as before. A component takes three passes, in the order rules they
declared (quant before fp16, calib before quant), checked per component:

- calib: the part's own calibration set, from what the deployed pipeline feeds it: a text encoder
  gets the token ids of `n_samples` prompts (built-in or `--prompts`) plus the empty negative
  prompt; the VAE decoder the final latents of the denoiser's own samples (prompts, classifier-
  free guidance at the pipeline's scale, the denoiser as it stands at that point of the recipe,
  `steps` and `sampler` as calib's options), scaled as the pipeline scales them; the VAE encoder
  those latents decoded to images. Cached like the denoiser's set (ctx.cache_dir/calib/).
- quant: the denoiser's quant pass itself, run on the part through a denoiser-shaped shell
  (ComponentCall), so every quantizer option means the same; min_psnr_db and reconstruct
  measure or rebuild denoiser blocks and are refused.
- fp16: weights rounded to half precision (stored half; the bundle's graph computes in fp16).

The result goes into the denoiser's extras (edgediff.pipelines.parts); `report` measures each
compressed part against the original on fixed inputs and the final images of the whole pipeline.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DenoiserModule, DiffusionModel, InputSignature
from edgediff.pipelines.components import Pipeline, pipeline_of
from edgediff.pipelines.parts import KEY, VAE_PARTS, part_module, part_names, records, resolve, run_part

COMPONENT_PASSES = ("calib", "quant", "fp16")
# report's protocol: final images of the whole pipeline, compressed vs original (as verify draws them)
REPORT_PROTOCOL = {"samples": 4, "steps": 10, "seed": 0}
_DENOISER_ONLY_QUANT = {"min_psnr_db": 0.0, "reconstruct": False}


class ComponentCall(DenoiserModule):
    """A part as the quant pass calls a denoiser: forward(sample, timestep, ...) runs the part on `sample`
    (token ids, latents or images); the timestep means nothing to it."""

    def __init__(self, inner: nn.Module, part: str, signature: InputSignature, pad_id: int | None = None) -> None:
        super().__init__(inner, signature)
        self.part, self.pad_id = part, pad_id

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | None = None, *args: Any,  # type: ignore[override]
                **kwargs: Any) -> torch.Tensor:
        return run_part(self.part, self.inner, sample, self.pad_id)


def mask_pad_id(pipe: Pipeline, part: str) -> int | None:
    """The pad id a text encoder part's attention mask zeroes where the pipeline feeds one (PixArt's T5; its
    tokenizer's mask is exactly ids != pad), else None (the part is called on ids alone, as deployed)."""
    from edgediff.pipelines.encode import encoding_of, tokenizer_of

    if part in VAE_PARTS or encoding_of(pipe) != "pixart":
        return None
    pad = pipe.load(tokenizer_of(part)).pad_token_id
    return int(pad) if pad is not None else 0


def targets(model: DiffusionModel, recipe: Any) -> list[list[str] | None]:
    """Per recipe entry: the parts it acts on, or None for the denoiser. BadInput for a component name the
    model does not have, a pass that acts on the denoiser only, or a component's passes out of order."""
    specs = list(recipe.passes)
    if not any(getattr(s, "component", None) for s in specs):
        return [None] * len(specs)
    where = f"recipe {recipe.source if recipe.source != 'builtin' else recipe.name}"
    rec = model.extras.get("pipeline")
    out: list[list[str] | None] = []
    for s in specs:
        comp = getattr(s, "component", None)
        if not comp:
            out.append(None)
            continue
        if not isinstance(rec, dict):
            raise BadInput(f"{where}: pass {s.name!r} names component {comp!r}, but the model is not a pipeline "
                           "(load a diffusers pipeline folder with model_index.json, or an artifact made from one)")
        parts = resolve(comp, rec.get("components") or {}, where)
        if parts is not None:
            if s.name not in COMPONENT_PASSES:
                raise BadInput(f"{where}: pass {s.name!r} acts on the denoiser only; component {comp!r} takes "
                               f"{', '.join(COMPONENT_PASSES)}")
            for k, default in _DENOISER_ONLY_QUANT.items():
                if s.name == "quant" and s.options.get(k, default) != default:
                    raise BadInput(f"{where}: quant option {k} is for the denoiser (it measures or rebuilds denoiser "
                                   f"samples/blocks); component {comp!r} takes the other quant options")
        out.append(parts)
    from edgediff import passes

    done = records(model.extras)
    for part in sorted({p for t in out if t for p in t}):
        names = [s.name for s, t in zip(specs, out) if t and part in t]
        passes.check_order(names, set((done.get(part) or {}).get("passes", [])), f"{where}, component {part!r}")
    return out


def _ids(pipe: Pipeline, part: str, prompts: list[str]) -> torch.Tensor:
    """Token ids as the pipeline feeds text encoder `part` (SDXL/SD3: at each tokenizer's own length, T5 at the
    pipeline's max_sequence_length)."""
    from edgediff.pipelines.encode import encoder_inputs

    return encoder_inputs(pipe, part, prompts)["input_ids"]


def _prompts(model: DiffusionModel, n: int, seed: int) -> list[str]:
    from edgediff.pipelines.prompts import prompts_for

    user = (model.extras.get("pipeline") or {}).get("prompts")
    return prompts_for(n + seed, user)[seed:]


def _guidance(pipe: Pipeline) -> float:
    g = pipe.default_guidance
    return float(g) if g and g > 1.0 else 1.0


def calibration_inputs(model: DiffusionModel, pipe: Pipeline, part: str, opts: Any) -> torch.Tensor:
    """What the deployed pipeline feeds `part` (see the module docstring): token ids, latents or images."""
    from edgediff.pipelines.encode import decode_latents, pipeline_latents

    prompts = _prompts(model, int(opts.n_samples), int(opts.seed))
    if part not in VAE_PARTS:
        return _ids(pipe, part, prompts + [""])
    lat = pipeline_latents(pipe, model, prompts, int(opts.seed), opts.sampler, int(opts.steps), _guidance(pipe),
                           description=f"calib {part}: denoiser samples")
    if part == "vae_decoder":
        return lat.float() / pipe.vae_scaling_factor() + pipe.vae_shift_factor()
    return decode_latents(pipe, lat)


def _shell(pm: nn.Module, part: str, example: torch.Tensor, model: DiffusionModel, pad_id: int | None = None
           ) -> DiffusionModel:
    sig = InputSignature(sample_shape=tuple(int(d) for d in example.shape[1:]))
    return DiffusionModel(ComponentCall(pm, part, sig, pad_id), model.schedule, sig, arch=f"component:{part}",
                          provenance={"component": part})


def _calibrate(model: DiffusionModel, pipe: Pipeline, part: str, pm: nn.Module, opts: Any, ctx: Any) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    from edgediff.artifact import atomic_file
    from edgediff.passes.calib import cache_path, model_hash
    from edgediff.pipelines.conditioning import prompts_key

    opts.validate()
    h = hashlib.sha256(json.dumps({"part": part, "v": 1, **asdict(opts)}, sort_keys=True, default=str).encode())
    h.update(model_hash(_shell(pm, part, torch.zeros(1, 1), model)).encode())
    if part in VAE_PARTS:  # the latents come from the denoiser's own samples
        h.update(model_hash(model).encode())
    h.update(prompts_key(model).encode())
    key = h.hexdigest()[:32]
    path = cache_path(ctx.cache_dir, key)
    generated = not path.is_file()
    if generated:
        x = calibration_inputs(model, pipe, part, opts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            save_file({"x": x.contiguous(), "t": torch.zeros(len(x))}, str(tmp))
    else:
        ctx.log(f"calib {part}: reusing cached calibration set {path}")
        x = load_file(str(path))["x"]
    ctx.metrics.update({"component": part, "count": int(len(x)), "generated": generated, "cache": str(path)})
    return {"key": key, "count": int(len(x)), "shape": list(x.shape[1:]), "options": asdict(opts),
            "source": "token ids of prompts + the empty prompt" if part not in VAE_PARTS
            else "final latents of the denoiser's samples (prompts, guidance)"}


def _strip(prefix: str, qp: dict[str, Any]) -> dict[str, Any]:
    out = dict(qp)
    out["layers"] = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in qp["layers"].items()}
    return out


def run_component_pass(model: DiffusionModel, name: str, opts: Any, parts: list[str], ctx: Any) -> DiffusionModel:
    """Run pass `name` on each of `parts`; the result goes into model.extras (the pass manager's clone)."""
    from edgediff import passes
    from edgediff.serialize import structure_diff

    for part in parts:
        pipe = pipeline_of(model)
        assert pipe is not None
        comp = part_names(pipe.components)[part]
        module = copy.deepcopy(pipe.load(comp))
        pm = part_module(part, module)
        rec = copy.deepcopy(records(model.extras).get(part) or {"component": comp, "part": part, "passes": []})
        if name == "calib":
            rec["calib"] = _calibrate(model, pipe, part, pm, opts, ctx)
        elif name == "quant":
            from safetensors.torch import load_file

            from edgediff.passes.calib import cache_path

            if rec.get("precision") == "fp16":
                raise BadInput(f"quant: component {part!r} is already fp16 (quantize before fp16)")
            x = load_file(str(cache_path(ctx.cache_dir, rec["calib"]["key"])))["x"][:1]
            shell = _shell(pm, part, x, model, mask_pad_id(pipe, part))
            shell.extras["calib"] = rec["calib"]
            run, _ = passes.get("quant")
            shell = run(shell, opts, ctx)
            rec["quant"] = _strip("inner.", shell.extras["quant"])
            rec["precision"] = "int8"
            ctx.metrics["component"] = part
        elif name == "fp16":
            if rec.get("precision") == "int8":
                raise BadInput(f"fp16: component {part!r} is already int8 (its int8 export is what ships)")
            pm.half()
            rec["precision"] = "fp16"
            ctx.metrics.update({"component": part, "dtype": "float16"})
        else:
            raise BadInput(f"pass {name!r} does not act on components (they take {', '.join(COMPONENT_PASSES)})")
        if hasattr(pm, "write_back"):
            pm.write_back(module)
        fresh = part_module(part, copy.deepcopy(pipe.load(comp, original=True)))
        rec["structure"] = json.loads(json.dumps(structure_diff(pm, fresh)))  # as stored: tuples become lists
        rec["state"] = {k: v.detach().clone().contiguous() for k, v in pm.state_dict().items()}
        rec["passes"] = [*rec.get("passes", []), name]
        model.extras.setdefault(KEY, {})[part] = rec
    return model


def deployed_bytes(pm: nn.Module, rec: dict[str, Any]) -> int:
    """Bytes of the part's weights as its bundle stores them (int8 weights of quantized layers, fp16, fp32)."""
    from edgediff.quant_params import strip_quant_wrappers

    flat = strip_quant_wrappers(copy.deepcopy(pm))
    qlayers = {n for n, lq in ((rec.get("quant") or {}).get("layers") or {}).items()
               if lq.get("kind") in ("conv", "linear")}
    fp16 = rec.get("precision") == "fp16"
    total = 0
    for n, p in flat.named_parameters():
        if n.endswith(".weight") and n[: -len(".weight")] in qlayers:
            total += p.numel()
        else:
            total += p.numel() * (2 if fp16 and p.is_floating_point() else 4)
    return int(total)


@torch.no_grad()
def report(original: DiffusionModel, result: DiffusionModel, progress: Any = None) -> dict[str, Any]:
    """Cost and quality of every compressed part: params, bytes before/after, PSNR of the part's outputs vs the
    original part on fixed inputs (the original pipeline's prompts, latents and images), and the PSNR of the
    final images of the whole pipeline (compressed denoiser and parts) vs the original pipeline's."""
    from edgediff import metrics
    from edgediff.pipelines.verify import range_psnr, reference_images

    pipe_o, pipe_c = pipeline_of(original), pipeline_of(result)
    assert pipe_o is not None and pipe_c is not None
    p = REPORT_PROTOCOL
    prompts = _prompts(original, p["samples"], 0)
    g = _guidance(pipe_o)
    lat_o, img_o = reference_images(pipe_o, original, prompts, p["seed"], None, p["steps"], g, progress=progress)
    lat_c, img_c = reference_images(pipe_c, result, prompts, p["seed"], None, p["steps"], g, progress=progress)
    out: dict[str, Any] = {}
    for part, rec in sorted(records(result.extras).items()):
        comp = rec["component"]
        pm_o = part_module(part, pipe_o.load(comp, original=True))
        pm_c = part_module(part, pipe_c.load(comp))
        if part not in VAE_PARTS:
            x = _ids(pipe_o, part, prompts + [""])
        elif part == "vae_decoder":
            x = lat_o.float() / pipe_o.vae_scaling_factor() + pipe_o.vae_shift_factor()
        else:
            assert img_o is not None
            x = img_o
        pad = mask_pad_id(pipe_o, part)
        want, got = run_part(part, pm_o, x, pad).numpy(), run_part(part, pm_c, x, pad).numpy()
        before = metrics.size_bytes(pm_o)
        after = deployed_bytes(pm_c, rec)
        out[part] = {"component": comp, "passes": rec.get("passes", []), "precision": rec.get("precision") or "fp32",
                     "params": metrics.params(pm_o), "size_bytes_before": int(before), "size_bytes_after": after,
                     "size_ratio": round(after / max(before, 1), 4), "psnr_db": range_psnr(got, want),
                     "max_abs_err": float(abs(got - want).max()),
                     "inputs": {"text_encoder": "token ids of the protocol's prompts + the empty prompt",
                                "vae_decoder": "the original pipeline's final latents",
                                "vae_encoder": "the original pipeline's images"}.get(part if part in VAE_PARTS
                                                                                    else "text_encoder")}
    from edgediff.metrics import psnr

    if img_o is not None and img_c is not None:
        final = psnr(img_c, img_o)
        what = "images"
    else:
        final = psnr(lat_c, lat_o, data_range=float(lat_o.max() - lat_o.min()) or 1.0)
        what = "latents"
    return {"parts": out, "final_psnr_db": round(final, 3) if math.isfinite(final) else final, "final_of": what,
            "protocol": {**p, "prompts": prompts, "guidance": g, "reference": "the original pipeline"}}
