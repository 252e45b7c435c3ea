"""The parts of a pipeline that a recipe may compress besides the denoiser, and how their state is kept.

Parts: every text encoder (`text_encoder`, `text_encoder_2`, ...: the whole module), `vae_decoder`
(post_quant_conv + decoder of the VAE) and `vae_encoder` (encoder + quant_conv); the name `vae`
means both VAE parts. A part module shares its submodules with the VAE it is cut from, and its
attribute names are the VAE's, so module paths (QuantParams layer names) are the same in both.

A compressed part is kept in the denoiser's `extras["components"][part]`: the passes it had, its
precision, its QuantParams, and its module as a structure diff against the freshly loaded part
plus its state dict (edgediff.serialize: safetensors, classes from the closed table, no pickle).
The artifact writer stores extras as JSON + safetensors, so an artifact carries the compressed
parts; `Pipeline.load` re-applies them on the original component (docs/pipelines.md).
fp16 parts are stored in half precision and computed in float32 on the PyTorch side (the same
rounded weights); exported graphs compute in fp16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput

KEY = "components"  # DiffusionModel.extras key
VAE_PARTS = ("vae_decoder", "vae_encoder")


class VaeDecoderPart(nn.Module):
    """AutoencoderKL.decode without tiling: post_quant_conv then decoder (the VAE's own submodules)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def write_back(self, vae: nn.Module) -> None:
        # a pass may replace a direct child (post_quant_conv by its quantized wrapper): the VAE must see it
        vae.post_quant_conv = self.post_quant_conv
        vae.decoder = self.decoder


class VaeEncoderPart(nn.Module):
    """The Gaussian's parameters of AutoencoderKL.encode: encoder then quant_conv."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def write_back(self, vae: nn.Module) -> None:
        vae.encoder = self.encoder
        vae.quant_conv = self.quant_conv


def part_names(components: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{part: the pipeline component it is cut from} for a pipeline's components."""
    out = {n: n for n, c in sorted(components.items()) if c.get("kind") == "text_encoder"}
    if any(c.get("kind") == "vae" for c in components.values()):
        out.update({p: "vae" for p in VAE_PARTS})
    return out


def resolve(name: str, components: dict[str, dict[str, Any]], where: str) -> list[str] | None:
    """The parts a recipe's `component = NAME` means; None for the denoiser. BadInput for unknown names."""
    den = [n for n, c in components.items() if c.get("kind") == "denoiser"]
    if name in ("denoiser", *den):
        return None
    parts = part_names(components)
    if name == "vae" and "vae_decoder" in parts:
        return list(VAE_PARTS)
    if name in parts:
        return [name]
    known = ", ".join(["denoiser", *den, *parts, *(["vae"] if "vae_decoder" in parts else [])])
    raise BadInput(f"{where}: unknown component {name!r}; this pipeline has: {known}")


def part_module(part: str, module: nn.Module) -> nn.Module:
    """The part of a loaded component (a text encoder itself, or a view of the VAE)."""
    if part == "vae_decoder":
        return VaeDecoderPart(module)
    if part == "vae_encoder":
        return VaeEncoderPart(module)
    return module


def run_part(part: str, pm: nn.Module, x: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """One call of a part module on its input: token ids (a text encoder's last hidden state), latents or images.
    `pad_id`: the text encoder also gets the attention mask its pipeline feeds (PixArt's T5): 0 at that id."""
    if part in VAE_PARTS:
        return pm(x.float()).float()
    ids = x.long()
    out = pm(ids) if pad_id is None else pm(ids, attention_mask=(ids != int(pad_id)).long())
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()  # not text_embeds


def records(extras: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rec = extras.get(KEY)
    return rec if isinstance(rec, dict) else {}


def apply_parts(component: str, module: nn.Module, extras: dict[str, Any], where: str) -> nn.Module:
    """Re-apply the compressed parts recorded in `extras` to a freshly loaded component, in place."""
    from edgediff.serialize import apply_structure

    for part, rec in sorted(records(extras).items()):
        if rec.get("component") != component or not rec.get("structure"):
            continue
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in dict(rec.get("state") or {}).items()}
        pm = part_module(part, module)
        try:
            apply_structure(pm, rec["structure"], state, where=f"{where}: extras/{KEY} ({part})")
        except RuntimeError as e:  # load_state_dict: the recorded part does not fit this component
            raise BadInput(f"{where}: the compressed {part} does not fit the pipeline's {component} "
                           f"({str(e).splitlines()[0]})") from None
        if hasattr(pm, "write_back"):
            pm.write_back(module)
    return module


def part_precision(extras: dict[str, Any], part: str) -> str | None:
    """The compressed precision of a part ("int8", "fp16"), or None when no pass touched it."""
    rec = records(extras).get(part)
    return str(rec["precision"]) if rec and rec.get("precision") else None
