"""Op coverage per target, before export: which ops each target's fast path runs, and what
share of the model's MACs would fall back (to the CPU, the host, or a slower path).

Input: the op list of an exported graph (graph.OpWork; ONNX op types or TFLite builtin
names). ONNX ops are mapped to the TFLite builtins litert-torch lowers them to for the
LiteRT GPU delegate. Support lists and where they come from:
- TensorRT: the ONNX operators the TensorRT ONNX parser supports (onnx-tensorrt
  docs/operators.md, TensorRT 10); checked per op type, not per attribute.
- LiteRT GPU delegate: the ops with a parser in tensorflow/lite/delegates/gpu/common/
  model_builder.cc (NewOperationParser); the delegate also requires float tensors
  (int8 activations stay on the CPU), which `precision` accounts for.
- Core ML Neural Engine: Apple publishes no op list; this is the community-observed set
  (github.com/hollance/neural-engine, "Deploying Transformers on the Apple Neural Engine",
  Apple ML research 2022): fp16/int8 conv, matmul, elementwise, norms, softmax, reshape and
  transpose of rank <= 5 run there; gather/scatter, dynamic shapes and int64 math do not.
  Treat it as a heuristic.
- OpenCL runtime (edgediff.kernels): `SUPPORTED_OPS` from the runtime itself when it
  is built, else the kernel set issue 8 specifies.
- FPGA array: only int8 conv / matmul / linear run on the systolic array; everything else is
  host-side (the issue 9 design).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from edgediff.profiling.graph import OpWork

# --- TensorRT (ONNX parser)
TENSORRT = {
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "DequantizeLinear", "Div",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu",
    "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GroupNormalization", "HardSigmoid",
    "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "MatMul",
    "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "PRelu", "QuantizeLinear", "Range",
    "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape",
    "Resize", "ScatterND", "Shape", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Softplus", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
    "Xor", "Attention",
}

# --- LiteRT GPU delegate (TFLite builtins)
LITERT_GPU = {
    "ABS", "ADD", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CAST", "CONCATENATION", "CONV_2D", "COS", "CUMSUM", "DENSIFY",
    "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "DIV", "ELU", "EQUAL", "EXP", "FLOOR", "FLOOR_DIV", "FLOOR_MOD",
    "FULLY_CONNECTED", "GATHER", "GELU", "GREATER", "GREATER_EQUAL", "HARD_SWISH", "LEAKY_RELU", "LESS", "LESS_EQUAL",
    "LOG", "LOGICAL_AND", "LOGISTIC", "LSTM", "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM", "MIRROR_PAD", "MUL", "NEG",
    "NOT_EQUAL", "ONE_HOT", "PACK", "PAD", "PADV2", "POW", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN",
    "REDUCE_PROD", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SELECT_V2", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQRT", "SQUARE",
    "SQUARED_DIFFERENCE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TILE", "TRANSPOSE", "TRANSPOSE_CONV",
}
# how litert-torch lowers each ONNX-level op (the same aten op) to TFLite builtins
ONNX_TO_TFLITE: dict[str, tuple[str, ...]] = {
    "Conv": ("CONV_2D",), "ConvTranspose": ("TRANSPOSE_CONV",), "MatMul": ("BATCH_MATMUL",),
    "Gemm": ("FULLY_CONNECTED",), "Add": ("ADD",), "Sub": ("SUB",), "Mul": ("MUL",), "Div": ("DIV",),
    "Sigmoid": ("LOGISTIC",), "Tanh": ("TANH",), "Relu": ("RELU",), "Softmax": ("SOFTMAX",), "Exp": ("EXP",),
    "Sin": ("SIN",), "Cos": ("COS",), "Sqrt": ("SQRT",), "Pow": ("POW",), "Reshape": ("RESHAPE",),
    "Transpose": ("TRANSPOSE",), "Concat": ("CONCATENATION",), "Split": ("SPLIT",), "Slice": ("STRIDED_SLICE",),
    "Unsqueeze": ("RESHAPE",), "Squeeze": ("RESHAPE",), "Flatten": ("RESHAPE",), "Identity": (),
    "InstanceNormalization": ("MEAN", "SQUARED_DIFFERENCE", "RSQRT", "MUL", "ADD"),
    "GroupNormalization": ("MEAN", "SQUARED_DIFFERENCE", "RSQRT", "MUL", "ADD"),
    "LayerNormalization": ("MEAN", "SQUARED_DIFFERENCE", "RSQRT", "MUL", "ADD"),
    "ReduceMean": ("MEAN",), "ReduceSum": ("SUM",), "Resize": ("RESIZE_NEAREST_NEIGHBOR",),
    "Upsample": ("RESIZE_NEAREST_NEIGHBOR",), "Gelu": ("GELU",), "Erf": ("GELU",), "Cast": ("CAST",),
    "Expand": ("BROADCAST_TO",), "Gather": ("GATHER",), "Where": ("SELECT_V2",), "Neg": ("NEG",), "Pad": ("PAD",),
    "Shape": ("SHAPE",), "Range": ("RANGE",), "ConstantOfShape": ("FILL",), "Equal": ("EQUAL",),
    "QuantizeLinear": ("QUANTIZE",), "DequantizeLinear": ("DEQUANTIZE",), "Einsum": ("BATCH_MATMUL",),
    "Constant": (),
}

# --- Core ML Neural Engine (heuristic, ONNX-level op names)
ANE = {
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Sigmoid", "Tanh", "Relu", "Gelu", "Erf",
    "Softmax", "Exp", "Sqrt", "Pow", "Reshape", "Transpose", "Concat", "Split", "Slice", "Unsqueeze", "Squeeze",
    "Flatten", "Identity", "Constant", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
    "BatchNormalization", "ReduceMean", "ReduceSum", "Resize", "Upsample", "AveragePool", "MaxPool", "Pad", "Clip",
    "LeakyRelu", "QuantizeLinear", "DequantizeLinear", "Einsum",
    # TFLite names of the same ops, for .tflite inputs
    "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "SUB", "MUL", "DIV",
    "LOGISTIC", "TANH", "RELU", "GELU", "SOFTMAX", "EXP", "SQRT", "RSQRT", "POW", "RESHAPE", "TRANSPOSE",
    "CONCATENATION", "SPLIT", "STRIDED_SLICE", "MEAN", "SUM", "SQUARED_DIFFERENCE", "RESIZE_NEAREST_NEIGHBOR",
    "RESIZE_BILINEAR", "PAD", "AVERAGE_POOL_2D", "MAX_POOL_2D",
}

# --- OpenCL runtime: issue 8's kernel set, used until edgediff.kernels publishes SUPPORTED_OPS
OPENCL_PLANNED = {
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Sigmoid", "Softmax", "InstanceNormalization",
    "GroupNormalization", "Concat", "Resize", "Upsample", "Sin", "Cos", "Exp", "Reshape", "Transpose", "Unsqueeze",
    "Squeeze", "Flatten", "Identity", "Constant", "Split", "Slice",
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MUL", "SUB", "LOGISTIC", "SOFTMAX",
    "CONCATENATION", "RESIZE_NEAREST_NEIGHBOR", "SIN", "COS", "EXP", "RESHAPE", "TRANSPOSE", "MEAN",
    "SQUARED_DIFFERENCE", "RSQRT",
}

# --- FPGA systolic array: int8 MAC ops only
FPGA_ARRAY = {"Conv", "MatMul", "Gemm", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "CONV_2D",
              "FULLY_CONNECTED", "BATCH_MATMUL", "DEPTHWISE_CONV_2D"}
_ZERO_COST = {"Constant", "Identity", "Shape"}


def _opencl_ops() -> tuple[set[str], str]:
    try:
        from edgediff.kernels import runtime as clrt

        ops = getattr(clrt, "SUPPORTED_OPS", None)
        if ops:
            return set(ops), "edgediff.kernels.runtime.SUPPORTED_OPS"
    except ImportError:
        pass
    return OPENCL_PLANNED, "issue 8's planned kernel set (edgediff.kernels runtime not built yet)"


def _supported(target: str, op: OpWork, opencl: set[str]) -> tuple[bool, str]:
    name = op.op
    if target == "tensorrt":
        return name in TENSORRT, "" if name in TENSORRT else "no TensorRT ONNX parser support"
    if target == "litert-gpu":
        builtins = (name,) if name.isupper() else ONNX_TO_TFLITE.get(name, (name.upper(),))
        missing = [b for b in builtins if b not in LITERT_GPU]
        if missing:
            return False, f"no GPU delegate kernel for {', '.join(missing)}"
        if op.precision == "int8" and name not in ("DequantizeLinear", "QuantizeLinear", "DEQUANTIZE", "QUANTIZE"):
            return False, "GPU delegate needs float tensors (int8 activations run on the CPU)"
        return True, ""
    if target == "coreml-ane":
        if op.precision == "fp32":
            return False, "fp32: Core ML runs it on the GPU/CPU (convert to fp16 for the ANE)"
        return name in ANE, "" if name in ANE else "not observed on the ANE (heuristic)"
    if target == "opencl":
        return name in opencl, "" if name in opencl else "no OpenCL kernel"
    if target == "fpga":
        if name not in FPGA_ARRAY:
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
    opencl_ops, opencl_src = _opencl_ops()
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
            ok, why = _supported(target, view, opencl_ops)
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
    out["opencl"]["support_list"] = opencl_src
    out["coreml-ane"]["note"] = "heuristic: Apple publishes no Neural Engine op list"
    out["fpga"]["note"] = "only int8 conv/matmul/linear run on the array; the rest is host-side by design"
    out["total_macs"] = sum(o.macs for o in ops)
    out["shape_only_ops_ignored"] = sum(1 for o in ops if o.shape_only)
    return out
