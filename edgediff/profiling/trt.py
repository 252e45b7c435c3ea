"""TensorRT: per-layer times from TensorRT's IProfiler, where `tensorrt` and an NVIDIA GPU exist.

Takes a serialized engine (.engine/.plan) or an ONNX file (built into an engine in memory,
FP16 allowed). TensorRT names fused layers after the ONNX nodes they contain
("/inner/conv_in/Conv + /inner/act/Sigmoid"); names are mapped back to source modules the
same way as ONNX node names. Not runnable on this machine (no GPU): exit 3 with the reason.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from edgediff.errors import Unavailable


def available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError:
        return False, "the tensorrt package is not installed (pip install 'edgediff[tensorrt]' on an NVIDIA GPU machine)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    except ModuleNotFoundError:
        return False, "torch is missing"
    return True, ""


def _module_of_layer(name: str) -> str:
    from edgediff.profiling.graph import strip_wrapper

    first = name.split(" + ")[0].strip()
    if first.startswith("/"):
        parts = [p for p in first.split("/") if p][:-1]
        return strip_wrapper(".".join(parts))
    return first


def profile_tensorrt(path: Path, warmup: int = 3, repeats: int = 20) -> dict[str, Any]:
    ok, why = available()
    if not ok:
        raise Unavailable(f"{path}: cannot profile on TensorRT here: {why}")
    import tensorrt as trt  # pragma: no cover - needs an NVIDIA GPU
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    if path.suffix.lower() == ".onnx":
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(path.read_bytes()):
            raise Unavailable(f"{path}: TensorRT's ONNX parser rejected it: {parser.get_error(0)}")
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        blob = builder.build_serialized_network(network, config)
    else:
        blob = path.read_bytes()
    engine = trt.Runtime(logger).deserialize_cuda_engine(blob)
    ctx = engine.create_execution_context()

    class Prof(trt.IProfiler):
        def __init__(self) -> None:
            super().__init__()
            self.times: dict[str, list[float]] = defaultdict(list)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times[layer_name].append(ms)

    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [d if d > 0 else 1 for d in engine.get_tensor_shape(name)]
        dtype = torch.int64 if engine.get_tensor_dtype(name) == trt.int64 else torch.float32
        t = torch.full(shape, 500.0, device="cuda") if name == "timestep" else torch.randn(shape, device="cuda").to(dtype)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ctx.set_input_shape(name, shape)
        buffers[name] = t
        ctx.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    prof = Prof()
    ctx.profiler = prof
    for _ in range(max(5, repeats // 2)):
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
    layers = [{"name": _module_of_layer(n), "op": "trt-layer", "ms": statistics.median(v), "trt_layer": n}
              for n, v in prof.times.items()]
    total = sum(la["ms"] for la in layers) or 1.0
    for la in layers:
        la["share"] = la["ms"] / total
    return {"runtime": "tensorrt", "runtime_version": trt.__version__, "total_ms": statistics.median(times),
            "total": {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
                      "runs": len(times)},
            "layers": layers, "peak_memory_bytes": engine.device_memory_size_v2,
            "peak_memory_note": "TensorRT engine activation memory (device_memory_size_v2)",
            "layer_timing": "TensorRT IProfiler (report_layer_time), median over profiled runs", "estimated": False}
