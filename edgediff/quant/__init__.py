"""Diffusion-aware post-training quantization: the PyTorch simulation behind the quant/ptqd passes.

core.py: quantizers, Conv2d/Linear wrappers, quantized attention; apply.py: tracing, wrapping,
calibration, reading QuantParams back; reconstruct.py: BRECQ block reconstruction + AdaRound.
"""

from edgediff.quant.core import (
    ActQuantizer,
    FloatAttnProcessor,
    QuantAttnProcessor,
    QuantConv2d,
    QuantLinear,
    WeightQuantizer,
    act_quantizers,
    quant_layers,
    set_act_mode,
    set_bits_override,
)

__all__ = ["ActQuantizer", "FloatAttnProcessor", "QuantAttnProcessor", "QuantConv2d", "QuantLinear", "WeightQuantizer",
           "act_quantizers", "quant_layers", "set_act_mode", "set_bits_override"]
