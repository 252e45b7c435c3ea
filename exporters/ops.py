"""Which operators each target's fast path runs: the one home of these tables.

Used by the exporters (TensorRT's compatibility check, the TFLite GPU-delegate report) and by
profiling/coverage.py (coverage before export). Each table says where it comes from; when a
source changes, change it here and both users follow.
"""

from __future__ import annotations

# ONNX operators the TensorRT ONNX parser implements (onnx-tensorrt docs/operators.md for
# TensorRT 8.6/10.0, opset <= 20), restricted to the ones diffusion denoisers and their exports
# use, plus common neighbours. Checked per op type, not per attribute.
TENSORRT_PARSER_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization
IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max MaxPool Mean Min
Mish Mod Mul Neg NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence Round
ScaledTanh Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze
Upsample Where Xor
""".split())
TENSORRT_SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 8.6 / 10.0); per op type, not per attribute"

# TFLite builtins the LiteRT GPU delegate parses: the cases of NewOperationParser() in
# tensorflow/lite/delegates/gpu/common/model_builder.cc (TensorFlow 2.15-era, which added
# CAST, CUMSUM, GATHER, ONE_HOT, SELECT_V2, TILE and the comparisons to the 2.1x list).
# QUANTIZE/DEQUANTIZE count only for quantized models (allow_quant_ops); fp16 DEQUANTIZE nodes
# are folded into fp16 weights by BuildModel. CUSTOM is left out on purpose: only a few named
# custom ops have GPU parsers, so a CUSTOM node is reported as a CPU fallback.
LITERT_GPU_OPS = frozenset({
    "ABS", "ADD", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CAST", "CONCATENATION", "CONV_2D", "COS", "CUMSUM",
    "DENSIFY", "DEPTHWISE_CONV_2D", "DEPTH_TO_SPACE", "DEQUANTIZE", "DIV", "ELU", "EQUAL", "EXP", "FLOOR",
    "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GELU", "GREATER", "GREATER_EQUAL", "HARD_SWISH",
    "LEAKY_RELU", "LESS", "LESS_EQUAL", "LOG", "LOGICAL_AND", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D", "MEAN",
    "MINIMUM", "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL", "ONE_HOT", "PACK", "PAD", "PADV2", "POW", "PRELU",
    "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SELECT_V2", "SIN", "SLICE", "SOFTMAX",
    "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V", "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "STRIDED_SLICE", "SUB", "SUM",
    "TANH", "TILE", "TRANSPOSE", "TRANSPOSE_CONV",
})
LITERT_GPU_SOURCE = ("tensorflow/lite/delegates/gpu/common/model_builder.cc, NewOperationParser(); "
                     "QUANTIZE/DEQUANTIZE with allow_quant_ops (quantized models); fp16 DEQUANTIZE folded")
# the GPU delegate also needs float tensors: int8 activations stay on the CPU
LITERT_GPU_QUANT_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})

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

# Core ML Neural Engine: Apple publishes no op list; this is the community-observed set
# (github.com/hollance/neural-engine, "Deploying Transformers on the Apple Neural Engine",
# Apple ML research 2022): fp16/int8 conv, matmul, elementwise, norms, softmax, reshape and
# transpose of rank <= 5 run there; gather/scatter, dynamic shapes and int64 math do not.
ANE_OPS = frozenset({
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
})

# FPGA systolic array: only int8 MAC ops run on it; everything else is host-side
FPGA_ARRAY_OPS = frozenset({"Conv", "MatMul", "Gemm", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                            "CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "DEPTHWISE_CONV_2D"})
