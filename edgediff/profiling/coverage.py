"""Op coverage per target, before export: which ops each target's fast path runs, and what
share of the model's MACs would fall back (to the CPU, the host, or a slower path).

Input: the op list of an exported graph (graph.OpWork; ONNX op types or TFLite builtin
names). ONNX ops are mapped to the TFLite builtins litert-torch lowers them to for the
LiteRT GPU delegate. The support tables, with where each comes from, live in
edgediff.exporters.ops (the exporters use the same ones):
- TensorRT: the ONNX parser's operators, per op type (not per attribute).
- LiteRT GPU delegate: the ops with a GPU parser; the delegate also requires float tensors
  (int8 activations stay on the CPU), which `precision` accounts for.
- Core ML Neural Engine: a community-observed set (Apple publishes none): a heuristic.
- OpenCL runtime: `edgediff.kernels.runtime.SUPPORTED_OPS`, the runtime's own list.
- FPGA array: only int8 conv / matmul / linear run on the systolic array; the rest is host-side.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from edgediff.exporters.ops import (
    ANE_OPS,
    FPGA_ARRAY_OPS,
    LITERT_GPU_OPS,
    LITERT_GPU_QUANT_OPS,
    ONNX_TO_TFLITE,
    TENSORRT_PARSER_OPS,
)
from edgediff.kernels.runtime import SUPPORTED_OPS as OPENCL_OPS
from edgediff.profiling.graph import OpWork

_ZERO_COST = {"Constant", "Identity", "Shape"}


def _supported(target: str, op: OpWork) -> tuple[bool, str]:
    name = op.op
    if target == "tensorrt":
        return name in TENSORRT_PARSER_OPS, "" if name in TENSORRT_PARSER_OPS else "no TensorRT ONNX parser support"
    if target == "litert-gpu":
        builtins = (name,) if name.isupper() else ONNX_TO_TFLITE.get(name, (name.upper(),))
        missing = [b for b in builtins if b not in LITERT_GPU_OPS]
        if missing:
            return False, f"no GPU delegate kernel for {', '.join(missing)}"
        if op.precision == "int8" and name not in ("DequantizeLinear", "QuantizeLinear", *LITERT_GPU_QUANT_OPS):
            return False, "GPU delegate needs float tensors (int8 activations run on the CPU)"
        return True, ""
    if target == "coreml-ane":
        if op.precision == "fp32":
            return False, "fp32: Core ML runs it on the GPU/CPU (convert to fp16 for the ANE)"
        return name in ANE_OPS, "" if name in ANE_OPS else "not observed on the ANE (heuristic)"
    if target == "opencl":
        return name in OPENCL_OPS, "" if name in OPENCL_OPS else "no OpenCL kernel"
    if target == "fpga":
        if name not in FPGA_ARRAY_OPS:
            return False, "host-side (not a MAC op)"
        if op.precision != "int8":
            return False, f"{op.precision}: the array is int8 only (quantize first)"
        return True, ""
    raise ValueError(target)


TARGETS = ("tensorrt", "litert-gpu", "coreml-ane", "opencl", "fpga")


def coverage(ops: list[OpWork], assume_precision: dict[str, str] | None = None) -> dict[str, Any]:
    """Per target: supported share of ops and MACs, the fallback ops and layers.

    `assume_precision` maps a target to the precision its export would use (default: ANE fp16,
    FPGA int8, others as in the graph), since coverage is asked before export.
    """
    assume = {"coreml-ane": "fp16", "fpga": "int8", **(assume_precision or {})}
    total_macs = sum(o.macs for o in ops) or 1
    out: dict[str, Any] = {}
    tflite_graph = any(o.op.isupper() for o in ops)
    for target in TARGETS:
        if target == "tensorrt" and tflite_graph:
            out[target] = {"applicable": False, "reason": "TensorRT takes ONNX; run coverage on the ONNX export"}
            continue
        fb_ops: Counter[str] = Counter()
        fb_macs: dict[str, int] = defaultdict(int)
        reasons: dict[str, str] = {}
        n_fb = 0
        macs_fb = 0
        for o in ops:
            if o.op in _ZERO_COST or o.shape_only:
                continue
            # an fp32 graph will be converted at export (fp16 for the ANE, int8 for the array)
            prec = assume[target] if o.precision == "fp32" and target in assume else o.precision
            view = OpWork(o.name, o.node, o.op, o.macs, o.bytes_in, o.bytes_w, o.bytes_out, prec, o.gemm)
            ok, why = _supported(target, view)
            if not ok:
                n_fb += 1
                macs_fb += o.macs
                fb_ops[o.op] += 1
                fb_macs[o.name] += o.macs
                reasons.setdefault(o.op, why)
        counted = sum(1 for o in ops if o.op not in _ZERO_COST and not o.shape_only)
        top = sorted(fb_macs.items(), key=lambda kv: -kv[1])[:10]
        out[target] = {
            "ops": counted, "ops_fallback": n_fb,
            "macs_share_supported": 1 - macs_fb / total_macs, "macs_share_fallback": macs_fb / total_macs,
            "fallback_ops": [{"op": k, "count": v, "reason": reasons[k]} for k, v in fb_ops.most_common()],
            "fallback_layers_by_macs": [{"name": k, "macs": v} for k, v in top if v > 0],
            "precision_assumed": assume.get(target, "as exported"),
        }
    out["opencl"]["support_list"] = "edgediff.kernels.runtime.SUPPORTED_OPS"
    out["coreml-ane"]["note"] = "heuristic: Apple publishes no Neural Engine op list"
    out["fpga"]["note"] = "only int8 conv/matmul/linear run on the array; the rest is host-side by design"
    out["total_macs"] = sum(o.macs for o in ops)
    out["shape_only_ops_ignored"] = sum(1 for o in ops if o.shape_only)
    return out
