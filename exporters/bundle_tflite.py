"""TFLite files of a pipeline's non-denoiser components, for `export PIPELINE --target tflite -o DIR`.

    text_encoder/model.tflite   serving_default(input_ids int32 [1, sequence]) -> last_hidden_state, pooler_output
    text_encoder_2/model.tflite (SDXL, SD3: every CLIP) the ONNX bundle's outputs (optimum's names: text_embeds
                                for a projection model), of the hidden states only the penultimate layer's
                                `hidden_states.{L-1}` (the one the runtime combines; the others cost buffers)
    text_encoder_3/model.tflite a T5 (SD3's; PixArt's text_encoder also takes attention_mask) -> last_hidden_state
    vae_decoder/model.tflite    serving_default(latent_sample [1, C, h, w]) -> sample [1, 3, H, W]
                                (post_quant_conv + decoder; the runtime divides by scaling_factor first)
    vae_encoder/model.tflite    serving_default(sample [1, 3, H, W]) -> latent_parameters [1, 2C, h, w]
                                (encoder + quant_conv: the Gaussian's mean and log-variance, as the ONNX bundle's)

The denoiser's file comes from exporters/tflite_deepcache.py (output `out_sample`); the tokenizer,
scheduler, index and manifest record are the same as the ONNX bundle's (edgediff.pipelines.bundle),
so the runtime combines several encoders with the same code (edgediff.runtime.pipeline.encode_named).
Every file has batch 1 (litert-torch cannot lower a dynamic batch; phones run one image per call);
the torch-free runtime (edgediff.runtime.litert) splits and pads. The sequence length is the
tokenizer's, fixed. GroupNorm is rewritten as in the denoiser export (GpuGroupNorm: no BROADCAST_TO,
every op in the GPU delegate's list).

Precision: fp16 exports cast the weights to fp16 (ai-edge-quantizer, as the denoiser's fp16 file),
otherwise fp32; a part a recipe compressed ships at its own precision (fp16, or int8 as the denoiser's
int8 file is made: `int8_part`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
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
    Core ML bundle); `outputs` as exporters/bundle_onnx.text_encoder_outputs names them."""

    def __init__(self, te: nn.Module, outputs: list[str] | None = None) -> None:
        super().__init__()
        from edgediff.exporters.bundle_onnx import TextEncoderOutputs, text_encoder_outputs

        self.names = list(outputs or text_encoder_outputs(te))
        self.call = TextEncoderOutputs(te, self.names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.call(input_ids, attention_mask)))


def encoder_outputs(te: nn.Module, several: bool) -> list[str]:
    """The outputs a bundle's text encoder file has: the ONNX bundle's, of the hidden states only the
    penultimate (optimum's last `hidden_states.N`), which is what SDXL / SD3 combine."""
    from edgediff.exporters.bundle_onnx import text_encoder_outputs

    outs = text_encoder_outputs(te, hidden_states=several)
    hidden = [o for o in outs if o.startswith("hidden_states.")]
    return [o for o in outs if not o.startswith("hidden_states.")] + hidden[-1:]


class _VaeDecoder(nn.Module):
    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, latent_sample: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sample": self.part(latent_sample)}


class _VaeEncoder(nn.Module):
    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latent_parameters": self.part(sample)}


def _convert(module: nn.Module, kwargs: dict[str, torch.Tensor], what: str,
             quant_config: Any = None) -> tuple[bytes, float]:
    litert_torch = require("litert_torch")
    t0 = time.perf_counter()
    try:
        edge = litert_torch.convert(module.eval(), sample_kwargs=kwargs, quant_config=quant_config)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise BadInput(f"litert-torch could not convert the {what} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None
    return bytes(edge.model_content()), round(time.perf_counter() - t0, 2)


def text_encoders(pipe: Any, what: str) -> tuple[str, list[str]]:
    """(encoding kind, text encoder names) a non-ONNX bundle writes: one CLIP, SDXL's / SD3's CLIPs, and for
    TFLite T5 encoders too (SD3's text_encoder_3, PixArt's); Unavailable naming what the target does not hold."""
    from edgediff.pipelines.encode import encoding_of

    names = pipe.names("text_encoder")
    t5 = [n for n in names if is_t5(pipe, n)]
    if t5 and what != "tflite":
        raise Unavailable(f"{pipe.path}: T5 text encoders ({', '.join(t5)}) are not written to {what} bundles; use "
                          "--target onnx or tflite" + (" or save the pipeline without text_encoder_3 (diffusers runs "
                                                       "SD3 with T5 zeros)" if t5 == ["text_encoder_3"] else ""))
    kind = encoding_of(pipe) if names else "clip"
    if kind == "flux":  # as the ONNX bundle (edgediff.pipelines.bundle): no packed-latent Flux loop in the runtime
        raise BadInput(f"{pipe.path}: Flux pipelines are not bundled whole yet (the torch-free runtime has no packed-"
                       "latent Flux loop); export the transformer alone and generate it with --prompt-embeds")
    if len(names) > 1 and kind not in ("sdxl", "sd3"):
        raise BadInput(f"{pipe.path}: pipelines with several text encoders ({', '.join(names)}) other than SDXL's "
                       "and SD3's are not bundled; export the denoiser and pass --prompt-embeds")
    return kind, names


def is_t5(pipe: Any, name: str) -> bool:
    return (pipe.components.get(name) or {}).get("class") == "T5EncoderModel"


def component_files(pipe: Any, model: DiffusionModel, precision: str) -> dict[str, tuple[bytes, str, str, dict]]:
    """{bundle folder: (.tflite bytes, role, precision, facts)} for the text encoder(s) and the VAE's two parts.
    The role of each text encoder is its name (text_encoder, text_encoder_2: the runtime asks by name)."""
    from edgediff.pipelines.bundle import component_precision, example_shapes
    from edgediff.pipelines.parts import VaeDecoderPart, VaeEncoderPart, records

    kind, names = text_encoders(pipe, "tflite")
    shapes = example_shapes(pipe, model)
    # (folder, part module as the recipe's QuantParams name its layers, signature wrapper, example inputs)
    jobs: list[tuple[str, nn.Module, Callable[[nn.Module], nn.Module], dict[str, torch.Tensor]]] = []
    for name in names:
        te = pipe.load(name)
        outputs = encoder_outputs(te, kind in ("sdxl", "sd3"))  # a T5's: last_hidden_state alone
        # input_ids, and PixArt's attention_mask (int32 as the ONNX bundle's), at the pipeline's sequence
        ex = {k: (torch.ones if k == "attention_mask" else torch.zeros)(*v, dtype=torch.int32)
              for k, v in shapes[name].items()}
        jobs.append((name, te, lambda m, o=outputs: TextEncoderCall(m, o), ex))
    if pipe.has("vae"):
        gen = torch.Generator().manual_seed(0)
        jobs.append(("vae_decoder", VaeDecoderPart(copy.deepcopy(pipe.load("vae"))), _VaeDecoder,
                     {"latent_sample": torch.randn(*shapes["vae_decoder"]["latent_sample"], generator=gen)}))
        jobs.append(("vae_encoder", VaeEncoderPart(copy.deepcopy(pipe.load("vae"))), _VaeEncoder,
                     {"sample": torch.rand(*shapes["vae_encoder"]["sample"], generator=gen) * 2 - 1}))
    parts = records(model.extras)
    out: dict[str, tuple[bytes, str, str, dict]] = {}
    for name, part, wrap, kwargs in jobs:
        rec = parts.get(name) or {}
        prec = str(rec.get("precision") or component_precision(precision))
        what = name.replace("_", " ")
        with torch.no_grad():
            if prec == "int8":
                data, facts = int8_part(part, wrap, kwargs, rec["quant"], what)
            else:
                if name.startswith("vae"):
                    gpu_friendly(part)
                data, secs = _convert(wrap(part), kwargs, what)
                facts = {"convert_seconds": secs}
        if prec == "fp16":
            data = fp16_weights(data)
        if name in names:  # how the runtime combines it (runtime.pipeline.encode_named)
            facts["text_kind"] = "t5" if is_t5(pipe, name) else "clip"
        out[name] = (data, name, prec, facts)
    return out


def int8_part(part: nn.Module, wrap: Callable[[nn.Module], nn.Module], kwargs: dict[str, torch.Tensor],
              quant: dict[str, Any], what: str) -> tuple[bytes, dict[str, Any]]:
    """A part a recipe quantized, as the denoiser's int8 .tflite is made (exporters/tflite_convert.build_tflite):
    its float weights (on the grid) with the lowered layers as float twins, converted with static Q/DQ, then
    `integerize` rewrites those ops to int8-in/int8-out kernels; Q/DQ twins where the part's quantization has no
    full-integer form (no output quantization). GroupNorm is left as torch's (the simulation's float op)."""
    from edgediff.exporters.tflite_convert import float_inputs, static_qdq_config
    from edgediff.exporters.tflite_int8 import full_integer_ok, insert_tflite_int, insert_tflite_qdq, integerize

    from edgediff.quant_params import QuantParams, strip_quant_wrappers

    qp = QuantParams.from_extras(quant)
    flat = strip_quant_wrappers(copy.deepcopy(part)).float().eval()
    full, why = full_integer_ok(qp)
    low = None
    if full:
        layers, low = insert_tflite_int(flat, qp)
    else:
        layers = insert_tflite_qdq(flat, qp)
    facts: dict[str, Any] = {"int8": {"layers": layers, "layout": "full-integer" if full else "qdq", "why": why,
                                      "weight_bits": qp.weight_bits, "act_bits": qp.act_bits}}
    data, facts["convert_seconds"] = _convert(wrap(flat), kwargs, what, quant_config=static_qdq_config())
    if low is not None:
        data, facts["int8"]["integerized"] = integerize(data, low)
    data, facts["int8"]["float_inputs_restored"] = float_inputs(data)
    return data, facts


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
