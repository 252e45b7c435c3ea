"""Infer a denoiser's full call signature (every input, its shape and dtype) from its diffusers config.

One function per family of classes, each reading only config keys; overrides (--sample-shape,
--cond-shape, --num-classes, --input NAME=SHAPE) replace what was inferred. The order of the
inputs is InputSignature.input_names(): sample, timestep, encoder_hidden_states, class_labels,
then the extras in the order given here. Exporters carry exactly these inputs
(`input_names(sig)`, `example_inputs(sig, batch)`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.model import InputSignature, InputSpec

DENOISER_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                    "PixArtTransformer2DModel", "SD3Transformer2DModel", "SanaTransformer2DModel",
                    "FluxTransformer2DModel")
# default text-sequence lengths of the text encoders these models ship with (override with --cond-shape)
COND_LEN = {"UNet2DConditionModel": 77, "Transformer2DModel": 77, "PixArtTransformer2DModel": 120,
            "SD3Transformer2DModel": 333, "SanaTransformer2DModel": 300, "FluxTransformer2DModel": 512}
FLUX_DEFAULT_TOKENS = 1024  # a 64x64 latent packed 2x2: a 512-pixel image
VAE_SCALE = 8  # pixels per latent pixel of the SD-family VAEs (SDXL time_ids, PixArt resolution)


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (list, tuple)) else v


def _hw(cfg: dict[str, Any], default: int = 32) -> tuple[int, int]:
    size = cfg.get("sample_size") or default
    dims = list(size[:2]) if isinstance(size, (list, tuple)) and len(size) >= 2 else [size, size]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        # the config's own loader names the file; this check runs before any model is built
        raise BadInput(f"config.json: sample_size {size!r} must be a positive integer or [H, W]")
    return int(dims[0]), int(dims[1])


def _unet_cond(cfg: dict[str, Any], hw: tuple[int, int]) -> tuple[int | None, list[InputSpec]]:
    """UNet2DConditionModel: cond width, class labels, SDXL-style added conditioning."""
    extra: list[InputSpec] = []
    kind = cfg.get("addition_embed_type")
    if kind == "text_time":
        # SDXL: time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); the rest of the
        # projection input is the pooled text embedding
        tdim = int(cfg.get("addition_time_embed_dim") or 256)
        total = int(cfg.get("projection_class_embeddings_input_dim") or 0)
        text = total - 6 * tdim
        if text <= 0:
            raise BadInput(f"addition_embed_type 'text_time' with projection_class_embeddings_input_dim {total} "
                           f"leaves no room for text_embeds (6 x addition_time_embed_dim = {6 * tdim})")
        h, w = hw[0] * VAE_SCALE, hw[1] * VAE_SCALE
        extra.append(InputSpec("text_embeds", (text,), route="added_cond"))
        extra.append(InputSpec("time_ids", (6,), route="added_cond", fill="const",
                               value=(h, w, 0, 0, h, w)))
    elif kind == "text":
        dim = int(cfg.get("encoder_hid_dim") or _first(cfg.get("cross_attention_dim")) or 0)
        extra.append(InputSpec("text_embeds", (dim,), route="added_cond"))
    elif kind:
        raise BadInput(f"addition_embed_type {kind!r} (image conditioning) is not supported; "
                       "supported: 'text_time' (SDXL), 'text'")
    return None, extra


def infer(arch: str, cfg: dict[str, Any]) -> InputSignature:
    """The signature of a diffusers denoiser class built from `cfg`."""
    if arch not in DENOISER_CLASSES:
        raise BadInput(f"config names {arch!r}, which is not a denoiser edgediff knows ({', '.join(DENOISER_CLASSES)})")
    c = int(cfg.get("in_channels") or 3)
    num_classes = None
    cond: tuple[int, ...] | None = None
    extra: list[InputSpec] = []
    scale = 1.0
    seq = COND_LEN.get(arch, 77)
    if arch == "UNet2DModel":
        hw = _hw(cfg)
        if cfg.get("num_class_embeds"):
            num_classes = int(cfg["num_class_embeds"])
        return InputSignature((c, *hw), None, num_classes)
    if arch == "UNet2DConditionModel":
        hw = _hw(cfg)
        dim = cfg.get("encoder_hid_dim") if cfg.get("encoder_hid_dim_type") == "text_proj" else None
        dim = dim or _first(cfg.get("cross_attention_dim")) or 1280
        cond = (seq, int(dim))
        if cfg.get("num_class_embeds"):
            num_classes = int(cfg["num_class_embeds"])
        elif cfg.get("class_embed_type") not in (None, "timestep", "identity"):
            raise BadInput(f"class_embed_type {cfg.get('class_embed_type')!r} is not supported")
        _, extra = _unet_cond(cfg, hw)
        return InputSignature((c, *hw), cond, num_classes, tuple(extra))
    if arch in ("DiTTransformer2DModel", "Transformer2DModel"):
        hw = _hw(cfg)
        if arch == "Transformer2DModel" and cfg.get("cross_attention_dim"):
            cond = (seq, int(_first(cfg["cross_attention_dim"])))
        elif cfg.get("num_embeds_ada_norm"):
            num_classes = int(cfg["num_embeds_ada_norm"])
        return InputSignature((c, *hw), cond, num_classes)
    if arch == "PixArtTransformer2DModel":
        hw = _hw(cfg, 128)
        cond = (seq, int(cfg.get("caption_channels") or _first(cfg.get("cross_attention_dim")) or 4096))
        use_add = cfg.get("use_additional_conditions")
        if use_add is None:
            use_add = hw[0] == 128  # diffusers' rule: the 1024-pixel PixArt-alpha checkpoints
        if use_add:
            extra = [InputSpec("resolution", (2,), route="added_cond", fill="const",
                               value=(hw[0] * VAE_SCALE, hw[1] * VAE_SCALE)),
                     InputSpec("aspect_ratio", (1,), route="added_cond", fill="const", value=(1.0,))]
        return InputSignature((c, *hw), cond, None, tuple(extra))
    if arch == "SD3Transformer2DModel":
        hw = _hw(cfg, 128)
        cond = (seq, int(cfg.get("joint_attention_dim") or 4096))
        extra = [InputSpec("pooled_projections", (int(cfg.get("pooled_projection_dim") or 2048),))]
        return InputSignature((c, *hw), cond, None, tuple(extra))
    if arch == "SanaTransformer2DModel":
        hw = _hw(cfg, 32)
        cond = (seq, int(cfg.get("caption_channels") or 2304))
        if cfg.get("guidance_embeds"):
            extra = [InputSpec("guidance", (), fill="const", value=(float(cfg.get("guidance_embeds_scale", 1.0)) * 4.5,))]
        scale = float(cfg.get("timestep_scale") or 1.0)
        return InputSignature((c, *hw), cond, None, tuple(extra), scale)
    # FluxTransformer2DModel: packed 2x2 latent tokens (tokens, in_channels), positions in img_ids
    side = int(FLUX_DEFAULT_TOKENS**0.5)
    cond = (COND_LEN[arch], int(cfg.get("joint_attention_dim") or 4096))
    extra = [InputSpec("pooled_projections", (int(cfg.get("pooled_projection_dim") or 768),)),
             InputSpec("img_ids", (FLUX_DEFAULT_TOKENS, 3), unbatched=True, fill="grid", value=(side, side)),
             InputSpec("txt_ids", (cond[0], 3), unbatched=True, fill="zeros")]
    if cfg.get("guidance_embeds"):
        extra.append(InputSpec("guidance", (), fill="const", value=(3.5,)))
    # FluxPipeline passes timestep / 1000 (the transformer multiplies by 1000 inside)
    return InputSignature((FLUX_DEFAULT_TOKENS, c), cond, None, tuple(extra), 1e-3)


def _grid(tokens: int) -> tuple[int, int]:
    side = int(round(tokens**0.5))
    return (side, side) if side * side == tokens else (1, tokens)


def override(sig: InputSignature, sample_shape: tuple[int, ...] | None = None, cond_shape: tuple[int, ...] | None = None,
             num_classes: int | None = None, inputs: dict[str, tuple[int, ...]] | None = None) -> InputSignature:
    """The signature with shapes replaced; inputs that follow the sample/cond shapes follow them."""
    out = sig
    if sample_shape:
        out = replace(out, sample_shape=tuple(sample_shape))
    if cond_shape:
        out = replace(out, cond_shape=tuple(cond_shape))
    if num_classes is not None:
        out = replace(out, num_classes=num_classes)
    extra = []
    for s in out.extra:
        if s.name == "img_ids" and sample_shape:
            s = replace(s, shape=(out.sample_shape[0], 3), value=_grid(out.sample_shape[0]))
        if s.name == "txt_ids" and cond_shape:
            s = replace(s, shape=(out.cond_shape[0], 3))
        if s.name in ("time_ids", "resolution") and sample_shape and len(out.sample_shape) == 3:
            h, w = out.sample_shape[1] * VAE_SCALE, out.sample_shape[2] * VAE_SCALE
            s = replace(s, value=(h, w, 0, 0, h, w) if s.name == "time_ids" else (h, w))
        extra.append(s)
    out = replace(out, extra=tuple(extra))
    known = set(out.input_names())
    for name, shape in (inputs or {}).items():
        if name not in known:
            raise BadInput(f"--input {name}: the model has no input of that name (inputs: {', '.join(sorted(known))})")
        if name == "sample":
            out = replace(out, sample_shape=tuple(shape))
        elif name == "encoder_hidden_states":
            out = replace(out, cond_shape=tuple(shape))
        elif name in ("timestep", "class_labels"):
            raise BadInput(f"--input {name}: its shape is fixed (B,)")
        else:
            out = replace(out, extra=tuple(replace(s, shape=tuple(shape)) if s.name == name else s for s in out.extra))
    return out


def input_names(sig: InputSignature) -> list[str]:
    """Exported inputs in contract order: sample, timestep[, encoder_hidden_states][, class_labels][, extras]."""
    return sig.input_names()


def example_inputs(sig: InputSignature, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs (batch first for every input, float32 or int64), in input_names order."""
    return sig.example_inputs(batch, seed)


def input_dtypes(sig: InputSignature) -> dict[str, str]:
    """name -> "float32" / "int64" for every input."""
    return {s.name: s.dtype for s in sig.input_specs()}


def supported() -> dict[str, Any]:
    """What `edgediff info` / `edgediff recipes` list: denoiser classes and schedulers."""
    from edgediff import schedulers

    return {"denoisers": list(DENOISER_CLASSES), "schedulers": schedulers.supported(),
            "any_diffusers_scheduler": "other diffusers scheduler classes by name (--sampler ClassName), untested"}
