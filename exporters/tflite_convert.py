"""TFLite conversion through litert-torch: the signature module, GPU-friendly GroupNorm, fp16
weights, float inputs restored, and build_tflite (the .tflite bytes of a model)."""

from __future__ import annotations

import time
from typing import Any

import torch
from edgediff.exporters.base import float_denoiser, input_names
from edgediff.exporters.tflite_int8 import TflQDQLayer, full_integer_ok, insert_tflite_int, insert_tflite_qdq, integerize
from edgediff.exporters.tflite_runtime import OUTPUT_NAME, require
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DenoiserModule, DiffusionModel, InputSignature, float32_tables

# ------------------------------------------------------------------------------------------
# the module that gets converted
# ------------------------------------------------------------------------------------------


class GpuGroupNorm(nn.Module):
    """nn.GroupNorm written with ops the TFLite GPU delegate runs (no BROADCAST_TO).

    Same arithmetic as torch: biased variance over (C/G, *spatial) per group, then affine.
    Works on (B, C, *) inputs of any rank (diffusers' attention applies it to (B, C, S)).
    """

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps, self.affine = gn.num_groups, gn.eps, gn.affine
        self.weight, self.bias = gn.weight, gn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(shape[0], self.num_groups, -1)
        d = y - y.mean(-1, keepdim=True)
        var = (d * d).mean(-1, keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(shape)
        if not self.affine:
            return y
        view = [1, -1] + [1] * (len(shape) - 2)
        return y * self.weight.view(view) + self.bias.view(view)


def gpu_friendly(den: nn.Module) -> int:
    """Replace every nn.GroupNorm by GpuGroupNorm, in place; returns how many."""
    n = 0
    for name, child in list(den.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(den, name, GpuGroupNorm(child))
            n += 1
        else:
            n += gpu_friendly(child)
    return n


class _Signature(DenoiserModule):
    """DenoiserModule's keyword call, output as {"out": tensor}: the .tflite signature's output name.

    Takes every input of the signature by name (sample_kwargs' keys become the .tflite
    signature's input names), extras (SDXL text_embeds/time_ids, SD3/Flux pooled_projections,
    ids, guidance) included; DenoiserModule routes them (added_cond_kwargs, unbatched ids).
    """

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {OUTPUT_NAME: super().forward(**inputs)}


def _example_kwargs(sig: InputSignature, batch: int) -> dict[str, torch.Tensor]:
    ex = sig.example_inputs(batch=batch)
    return {k: ex[k] for k in input_names(sig)}


# ------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------


def fp16_weights(tflite_bytes: bytes) -> bytes:
    """Cast conv/FC weights to float16 with explicit DEQUANTIZE (ai-edge-quantizer float_casting)."""
    import os
    import tempfile

    quantizer = require("ai_edge_quantizer.quantizer")
    recipe = [{"regex": ".*", "operation": "*", "algorithm_key": "float_casting",
               "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                             "compute_precision": "FLOAT", "explicit_dequantize": True}}]
    fd, name = tempfile.mkstemp(suffix=".tflite")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tflite_bytes)
        return bytes(quantizer.Quantizer(name, recipe).quantize().quantized_model)
    finally:
        os.unlink(name)


def float_inputs(data: bytes) -> tuple[bytes, list[str]]:
    """Give int8 graph inputs back a float32 interface (a QUANTIZE op in front); returns their names.

    In STATIC Q/DQ mode the converter folds a quantize that sits right at a graph input into
    the input itself (the first conv's input quantizer makes `sample` int8). Every edgediff
    export takes float32 `sample`, so the float tensor and its QUANTIZE (same scale and zero
    point: the artifact's) are put back in front.
    """
    schema = require("ai_edge_litert.schema_py_generated")
    import flatbuffers

    model = schema.Model.GetRootAsModel(data, 0)
    m = schema.ModelT.InitFromObj(model)
    sg = m.subgraphs[0]
    sg.inputs = [int(i) for i in sg.inputs]  # numpy views of the flatbuffer are read-only
    fixed: list[str] = []
    for pos, ti in enumerate(list(sg.inputs)):
        old = sg.tensors[ti]
        if old.type not in (schema.TensorType.INT8, schema.TensorType.UINT8) or old.quantization is None:
            continue
        name = old.name.decode() if isinstance(old.name, bytes) else str(old.name)
        buf = schema.BufferT()
        m.buffers.append(buf)
        new = schema.TensorT()
        new.shape, new.shapeSignature = old.shape, old.shapeSignature
        new.type, new.name, new.buffer = schema.TensorType.FLOAT32, name, len(m.buffers) - 1
        old.name = name + "_int8"
        sg.tensors.append(new)
        new_idx = len(sg.tensors) - 1
        codes = [i for i, c in enumerate(m.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.QUANTIZE]
        if codes:
            code = codes[0]
        else:
            oc = schema.OperatorCodeT()
            oc.builtinCode = oc.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
            oc.version = 1
            m.operatorCodes.append(oc)
            code = len(m.operatorCodes) - 1
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, [new_idx], [ti]
        op.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
        op.builtinOptions = schema.QuantizeOptionsT()
        sg.operators.insert(0, op)
        sg.inputs[pos] = new_idx
        for sd in m.signatureDefs or []:
            for tm in sd.inputs or []:
                if tm.tensorIndex == ti:
                    tm.tensorIndex = new_idx
        fixed.append(name)
    if not fixed:
        return data, fixed
    b = flatbuffers.Builder(len(data) + 65536)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output()), fixed


def static_qdq_config() -> Any:
    """litert-torch's quant_config that only switches the converter's Q/DQ handling to STATIC: our Q/DQ ops
    already carry the artifact's scales and nothing is observed or re-calibrated by litert-torch."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize import quant_config as qc

    return qc.QuantConfig(pt2e_quantizer=pq.PT2EQuantizer().set_global(
        pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)))


def build_tflite(model: DiffusionModel, precision: str, batch: int = 1,
                 entry: Any = None) -> tuple[bytes, dict[str, Any]]:
    """Convert `model` (never modified) to .tflite bytes; returns (bytes, facts for the report).

    `entry(wrapper, sample_kwargs) -> (module, sample_kwargs)` converts another entry point of the
    same prepared (int8: integer-layer) denoiser instead (DeepCache's full and shallow calls).
    """
    from edgediff.exporters.base import check_batch, check_precision, int8_quant_params

    check_precision("tflite", precision)
    check_batch("tflite", batch)
    qp = int8_quant_params(model, precision)
    litert_torch = require("litert_torch")
    facts: dict[str, Any] = {"batch": batch}
    den = float_denoiser(model)
    facts["groupnorms_rewritten"] = gpu_friendly(den)
    wrapper = _Signature(den, model.signature).eval()
    quant_config = None
    low = None
    if precision == "int8":
        assert qp is not None
        full, why = full_integer_ok(qp)
        if full:
            layers, low = insert_tflite_int(den, qp)
            facts["int8"] = {"layers": layers, "weight_bits": qp.weight_bits, "act_bits": qp.act_bits,
                             "layout": "full-integer",
                             "kernels": "int8-in/int8-out CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (XNNPACK QS8); "
                                        "attention BATCH_MATMUL float on int8-grid operands",
                             "lowering": low.summary()}
            split = low.summary()["split_layers"]
        else:
            facts["int8"] = {"layers": insert_tflite_qdq(den, qp), "weight_bits": qp.weight_bits,
                             "act_bits": qp.act_bits, "layout": "qdq",
                             "kernels": f"float kernels between int8 Q/DQ ({why})"}
            split = sorted(m.name for m in den.modules() if isinstance(m, TflQDQLayer) and m.split)
        # shortcut-split layers: run as two layers (one per input half, each with its own
        # input scale) plus ADD, since an int8 CONCATENATION needs one scale for both halves
        facts["int8"]["split_layers"] = {
            "layers": split, "as": "layer(x[:, :C1], W[:, :C1]) + layer(x[:, C1:], W[:, C1:]) + bias"}
        quant_config = static_qdq_config()
    kwargs = _example_kwargs(model.signature, batch)
    if entry is not None:
        wrapper, kwargs = entry(wrapper, kwargs)
    t0 = time.perf_counter()
    try:
        with float32_tables():  # no float64 kernels on LiteRT (Flux's rotary table)
            edge = litert_torch.convert(wrapper, sample_kwargs=kwargs, quant_config=quant_config)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise BadInput(f"litert-torch could not convert this denoiser ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None
    data = bytes(edge.model_content())
    facts["convert_seconds"] = round(time.perf_counter() - t0, 2)
    if precision == "fp16":
        data = fp16_weights(data)
    if precision == "int8":
        if low is not None:
            data, facts["int8"]["integerized"] = integerize(data, low)
        data, facts["int8"]["float_inputs_restored"] = float_inputs(data)
    return data, facts
