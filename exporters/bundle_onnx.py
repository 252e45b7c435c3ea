"""ONNX graphs of a pipeline's non-denoiser components, with optimum's names and dynamic axes.

    text_encoder/model.onnx   input_ids int32 [batch_size, sequence_length]
                              -> last_hidden_state [batch_size, sequence_length, hidden], pooler_output
    vae_decoder/model.onnx    latent_sample [batch_size, C, height_latent, width_latent]
                              -> sample [batch_size, 3, height, width]   (post_quant_conv + decoder; the caller
                              divides by scaling_factor first, as optimum's and diffusers' pipelines do)
    vae_encoder/model.onnx    sample -> latent_parameters (the Gaussian's mean and log-variance, quant_conv's output)

A component a recipe quantized (edgediff.pipelines.compress) is traced from int8_module: its
lowered layers as Q/DQ integer kernels, as the denoiser's int8 graph; an fp16 one goes through to_fp16.
input_ids are int32 because diffusers' ONNX pipeline feeds int32 and optimum casts to what the session declares.
The denoiser graph comes from the denoiser exporter (exporters/onnx.py), not from here.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

OPSET = 17  # the denoiser exporter's opset, so one runtime version runs every graph of a bundle
EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's 2 GiB limit, with margin: larger graphs keep weights beside them


class TextEncoderOutputs(nn.Module):
    """The text encoder returning `outputs` (names of text_encoder_outputs) in that order; shared with the
    TFLite / Core ML bundles."""

    def __init__(self, te: nn.Module, outputs: list[str]) -> None:
        super().__init__()
        self.te, self.outputs = te, outputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        hidden = any(o.startswith("hidden_states.") for o in self.outputs)
        mask = {"attention_mask": attention_mask.long()} if attention_mask is not None else {}
        out = self.te(input_ids.long(), **mask, return_dict=True, output_hidden_states=hidden)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = getattr(out, "text_embeds", None)
        values = {"last_hidden_state": out.last_hidden_state, "pooler_output": pooled, "text_embeds": pooled}
        values.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states or ())} if hidden else {})
        return tuple(values[o] for o in self.outputs)


class _VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        h = self.vae.encoder(sample)
        qc = getattr(self.vae, "quant_conv", None)
        return qc(h) if qc is not None else h


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dyn: dict[str, dict[int, str]]) -> Any:
    import onnx

    big = sum(p.numel() * 4 for p in module.parameters()) > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix="edgediff-onnx-") as td, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on python branches over shapes
        target: Any = os.path.join(td, "m.onnx") if big else io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module.eval(), args, target, input_names=inputs, output_names=outputs,
                              opset_version=OPSET, dynamo=False, dynamic_axes=dyn, do_constant_folding=True)
        return onnx.load(target) if big else onnx.load_from_string(target.getvalue())


def text_encoder_graph(te: nn.Module, seq: int, hidden_states: bool = False, attention_mask: bool = False) -> Any:
    """`hidden_states`: optimum's SDXL text encoder outputs: a projection model's `text_embeds` first, then
    last_hidden_state, else last_hidden_state and pooler_output; then hidden_states.0 ... hidden_states.{L-1}
    (the embeddings and every layer but the last, whose place last_hidden_state takes: the last of them is the
    penultimate states SDXL and SD3 use). ORTStableDiffusionXLPipeline reads them in this order. A T5 encoder
    gives last_hidden_state only (optimum's text_encoder_3); `attention_mask`: a second input, int32 like
    input_ids, for pipelines that mask the padding (PixArt)."""
    ids = torch.zeros(2, seq, dtype=torch.int32)
    ids[:, 0] = int(getattr(te.config, "bos_token_id", 0) or 0)
    ids[:, -1] = int(getattr(te.config, "eos_token_id", 0) or 0)
    outputs = text_encoder_outputs(te, hidden_states)
    inputs = ["input_ids", *(["attention_mask"] if attention_mask else [])]
    dyn = {**{i: {0: "batch_size", 1: "sequence_length"} for i in inputs},
           **{o: {0: "batch_size"} if o in ("pooler_output", "text_embeds") else {0: "batch_size", 1: "sequence_length"}
              for o in outputs}}
    args = (ids, torch.ones(2, seq, dtype=torch.int32)) if attention_mask else (ids,)
    return _export(TextEncoderOutputs(te, outputs), args, inputs, outputs, dyn)


T5_TYPES = ("t5", "mt5", "umt5")  # config model_type of encoders without a pooled output


def text_encoder_outputs(te: nn.Module, hidden_states: bool = False) -> list[str]:
    """The output names of a bundle's text encoder, in optimum's order (see text_encoder_graph)."""
    if getattr(te.config, "model_type", "") in T5_TYPES:
        return ["last_hidden_state"]
    outputs = ["last_hidden_state", "pooler_output"]
    if hidden_states:
        layers = int(getattr(te.config, "num_hidden_layers", 0) or getattr(te.config, "num_layers", 0))
        head = ["text_embeds", "last_hidden_state"] if hasattr(te, "text_projection") else outputs
        outputs = [*head, *(f"hidden_states.{i}" for i in range(layers))]
    return outputs


def vae_decoder_graph(vae: nn.Module, latent_shape: tuple[int, int, int]) -> Any:
    z = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    dyn = {"latent_sample": {0: "batch_size", 2: "height_latent", 3: "width_latent"},
           "sample": {0: "batch_size", 2: "height", 3: "width"}}
    return _export(_VaeDecoder(vae), (z,), ["latent_sample"], ["sample"], dyn)


def vae_encoder_graph(vae: nn.Module, image_shape: tuple[int, int, int]) -> Any:
    x = torch.randn(2, *image_shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    dyn = {"sample": {0: "batch_size", 2: "height", 3: "width"},
           "latent_parameters": {0: "batch_size", 2: "height_latent", 3: "width_latent"}}
    return _export(_VaeEncoder(vae), (x,), ["sample"], ["latent_parameters"], dyn)


def int8_module(module: nn.Module, quant: dict[str, Any]) -> nn.Module:
    """A float copy of a quantized component (on-grid weights) with its lowered layers as integer twins
    (onnxruntime's QLinear layout, as the denoiser's int8 export); `quant` is its QuantParams extras."""
    import copy

    from edgediff.exporters.onnx_int8 import insert_int_layers

    from edgediff.lowering import lower
    from edgediff.quant_params import QuantParams, strip_quant_wrappers

    flat = strip_quant_wrappers(copy.deepcopy(module)).float().eval()
    insert_int_layers(flat, lower(flat, QuantParams.from_extras(quant)))
    return flat


def finish_int8(proto: Any) -> Any:
    """int8 weight initializers and int32 biases in a traced graph of an int8_module (exact: weights on the grid)."""
    from edgediff.exporters.onnx_int8 import fold_weight_quantize, int32_bias

    fold_weight_quantize(proto)
    int32_bias(proto)
    return proto


def to_fp16(proto: Any) -> Any:
    """fp16 weights and arithmetic, float32 I/O (the converter casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    big = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD
    if big:  # the converter's in-memory shape inference stops at 2 GiB; without types it casts Resize scales too
        proto = _infer_shapes_on_disk(proto)
    proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
    om = OnnxModel(proto)
    om.topological_sort()
    return om.model


def _infer_shapes_on_disk(proto: Any) -> Any:
    """The graph with value_info from onnx's file-based shape inference (the way for graphs over 2 GiB)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgediff-onnx-") as td:
        src, dst = os.path.join(td, "m.onnx"), os.path.join(td, "inferred.onnx")
        onnx.save_model(proto, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx_data")
        onnx.shape_inference.infer_shapes_path(src, dst)
        return onnx.load(dst)  # reads m.onnx_data beside it into memory before the folder goes


def save(proto: Any, path: str) -> None:
    """Save a graph; weights go to model.onnx_data beside it when the graph is large (optimum's convention)."""
    import onnx

    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + "_data")
    else:
        onnx.save_model(proto, path)


def graph_io(proto: Any) -> tuple[dict[str, Any], list[str]]:
    """({input: {shape, dtype}}, [output names]) of a graph, as the bundle manifest lists them."""
    import onnx

    def shape(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: {"shape": shape(v), "dtype": onnx.helper.tensor_dtype_to_np_dtype(
        v.type.tensor_type.elem_type).name} for v in proto.graph.input}
    return inputs, [v.name for v in proto.graph.output]
