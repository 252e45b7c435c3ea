"""TFLite files of a pipeline's non-denoiser components, for `export PIPELINE --target tflite -o DIR`.

    text_encoder/model.tflite   serving_default(input_ids int32 [1, sequence]) -> last_hidden_state, pooler_output
    vae_decoder/model.tflite    serving_default(latent_sample [1, C, h, w]) -> sample [1, 3, H, W]
                                (post_quant_conv + decoder; the runtime divides by scaling_factor first)

The denoiser's file comes from exporters/tflite_deepcache.py (output `out_sample`); the tokenizer,
scheduler, index and manifest record are the same as the ONNX bundle's (edgediff.pipelines.bundle).
Every file has batch 1 (litert-torch cannot lower a dynamic batch; phones run one image per call);
the torch-free runtime (edgediff.runtime.litert) splits and pads. The sequence length is the
tokenizer's, fixed. GroupNorm is rewritten as in the denoiser export (GpuGroupNorm: no BROADCAST_TO,
every op in the GPU delegate's list).

The VAE encoder is not written: text-to-image never runs it and its conversion costs as much as the
decoder's (img2img bundles: use --target onnx). Precision: fp16 exports cast the weights to fp16
(ai-edge-quantizer, as the denoiser's fp16 file), otherwise fp32; a text encoder or VAE a recipe
quantized to int8 is not written as int8 TFLite yet (Unavailable naming it; the ONNX bundle has it).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from edgediff.exporters.tflite_convert import fp16_weights, gpu_friendly
from edgediff.exporters.tflite_runtime import SIGNATURE, require, tflite_info
from torch import nn

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

SUFFIX = ".tflite"


class TextEncoderCall(nn.Module):
    """The text encoder with the bundle's (optimum's) output names as the signature's (shared with the
    Core ML bundle)."""

    def __init__(self, te: nn.Module) -> None:
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.te(input_ids.long(), return_dict=True)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = getattr(out, "text_embeds", None)
        res = {"last_hidden_state": out.last_hidden_state}
        if pooled is not None:
            res["pooler_output"] = pooled
        return res


class _VaeDecoder(nn.Module):
    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, latent_sample: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sample": self.part(latent_sample)}


def _convert(module: nn.Module, kwargs: dict[str, torch.Tensor], what: str) -> tuple[bytes, float]:
    litert_torch = require("litert_torch")
    t0 = time.perf_counter()
    try:
        edge = litert_torch.convert(module.eval(), sample_kwargs=kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise BadInput(f"litert-torch could not convert the {what} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None
    return bytes(edge.model_content()), round(time.perf_counter() - t0, 2)


def component_files(pipe: Any, model: DiffusionModel, precision: str) -> dict[str, tuple[bytes, str, str, dict]]:
    """{bundle folder: (.tflite bytes, role, precision, facts)} for the text encoder and the VAE decoder."""
    from edgediff.pipelines.bundle import component_precision
    from edgediff.pipelines.parts import VaeDecoderPart, part_precision

    sig = model.signature
    out: dict[str, tuple[bytes, str, str, dict]] = {}
    jobs: list[tuple[str, str, nn.Module, dict[str, torch.Tensor]]] = []
    for name in pipe.names("text_encoder"):
        if name != "text_encoder":
            raise Unavailable(f"{pipe.path}: pipelines with several text encoders ({', '.join(pipe.names('text_encoder'))})"
                              " are not bundled for tflite yet (--target onnx bundles them)")
        seq = int(sig.cond_shape[0]) if sig.cond_shape else 77
        ids = torch.zeros(1, seq, dtype=torch.int32)
        jobs.append((name, "text_encoder", TextEncoderCall(pipe.load(name)), {"input_ids": ids}))
    if pipe.has("vae"):
        part = VaeDecoderPart(copy.deepcopy(pipe.load("vae")))
        gpu_friendly(part)
        z = torch.randn(1, *(int(v) for v in sig.sample_shape[-3:]), generator=torch.Generator().manual_seed(0))
        jobs.append(("vae_decoder", "vae_decoder", _VaeDecoder(part), {"latent_sample": z}))
    for name, role, module, kwargs in jobs:
        prec = part_precision(model.extras, name) or component_precision(precision)
        if prec == "int8":
            raise Unavailable(f"{pipe.path}: the recipe quantized {name} to int8, which the TFLite bundle does not "
                              "write yet (the ONNX bundle does: --target onnx)")
        with torch.no_grad():
            data, secs = _convert(module, kwargs, name.replace("_", " "))
        if prec == "fp16":
            data = fp16_weights(data)
        out[name] = (data, role, prec, {"convert_seconds": secs})
    return out


def write_components(files: dict[str, tuple[bytes, str, str, dict]], folder: Path) -> dict[str, dict[str, Any]]:
    """Write each component as `folder/<name>/model.tflite`; their manifest records."""
    comps: dict[str, dict[str, Any]] = {}
    for name, (data, role, prec, facts) in files.items():
        (folder / name).mkdir()
        f = folder / name / f"model{SUFFIX}"
        f.write_bytes(data)
        info = tflite_info(f)
        comps[name] = {"path": f"{name}/model{SUFFIX}", "role": role, "precision": prec, "signature": SIGNATURE,
                       "inputs": info["inputs"], "outputs": sorted(info["outputs"]), "batch": 1,
                       "size_bytes": f.stat().st_size,
                       "shapes": {k: list(v["shape"]) for k, v in info["inputs"].items()},
                       "ops": info["num_ops"], "weight_dtypes": info["weight_dtypes"], **facts}
    return comps
