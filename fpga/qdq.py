"""A QDQ-quantized ONNX model made with onnxruntime.quantization.quantize_static (the peer tool).

The FPGA backend takes any QDQ ONNX; this helper makes one from a DiffusionModel so that tests
and benchmarks have one without the edgediff quant pass: torch.onnx.export of the float
denoiser, then quantize_static in QDQ format (per-channel symmetric int8 weights, uint8 or int8
activations, MinMax calibration on a few inputs drawn like the sampler's: x_t at random steps).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgediff.model import DiffusionModel


def export_float_onnx(model: DiffusionModel, path: Path) -> list[str]:
    """torch.onnx.export of the denoiser (batch axis dynamic); returns the input names."""
    module = model.module().eval()
    ex = model.example_inputs(batch=1)
    names = list(ex)
    args = tuple(ex[n] for n in names)
    kwargs: dict[str, Any] = {}
    import warnings

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # diffusers' shape asserts while tracing
    try:
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in [*names, "out"]}, dynamo=False, **kwargs)
    except TypeError:  # older torch without the `dynamo` switch
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in [*names, "out"]})
    return names


def calibration_inputs(model: DiffusionModel, n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps at random t (x0 ~ N(0, 0.5^2) stands in for data)."""
    g = torch.Generator().manual_seed(seed)
    T = model.schedule.num_train_timesteps
    abar = model.schedule.alphas_cumprod
    feeds = []
    for _ in range(n):
        ex = model.example_inputs(batch=1, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        t = int(torch.randint(0, T, (1,), generator=g))
        x0 = 0.5 * torch.randn(ex["sample"].shape, generator=g)
        a = float(abar[t])
        ex["sample"] = (a**0.5) * x0 + ((1 - a) ** 0.5) * torch.randn(ex["sample"].shape, generator=g)
        ex["timestep"] = torch.full((1,), float(t))
        feeds.append({k: v.numpy() for k, v in ex.items()})
    return feeds


def quantize_qdq(model: DiffusionModel, out: Path, n_calib: int = 8, seed: int = 0, activation: str = "uint8",
                 per_channel: bool = True) -> Path:
    """Write a QDQ int8 ONNX of `model` to `out` with onnxruntime's quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as td:
        fp = Path(td) / "float.onnx"
        export_float_onnx(model, fp)
        quantize_static(str(fp), str(out), Reader(calibration_inputs(model, n_calib, seed)), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8)
    return Path(out)
