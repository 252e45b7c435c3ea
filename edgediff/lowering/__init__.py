"""The int8 lowering: an artifact's QuantParams -> integer layers, once, for every int8 backend.

ONNX (QLinearConv/QGemm/QLinearMatMul layout), TFLite (int8 CONV_2D/FULLY_CONNECTED/
BATCH_MATMUL), Core ML, the OpenCL bundles and the FPGA project read the same `LoweredModel`,
so the simulation, the exports and the FPGA sim agree on the arithmetic. See layers.py for
the data and arith.py for the requantization (float32 vs TFLite fixed point).
"""

from edgediff.lowering.arith import ROUNDINGS, multiplier, quantize_multiplier, quantize_multipliers, requantize
from edgediff.lowering.layers import (
    ActQ,
    IntPart,
    LoweredAttention,
    LoweredLayer,
    LoweredModel,
    lower,
    lower_model,
)
from edgediff.lowering.reference import run_attention, run_layer, run_part

__all__ = ["ROUNDINGS", "ActQ", "IntPart", "LoweredAttention", "LoweredLayer", "LoweredModel", "lower", "lower_model",
           "multiplier", "quantize_multiplier", "quantize_multipliers", "requantize", "run_attention", "run_layer",
           "run_part"]
