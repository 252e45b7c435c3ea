"""ONNX export, the file itself: trace the float (or Q/DQ) denoiser with torch.onnx, post-process, write.

build_onnx traces with the TorchScript exporter (opset 17, node names = module paths, see
exporters.onnx) and returns the ModelProto; write_onnx checks and writes it atomically
(external data over EXTERNAL_DATA_THRESHOLD). The int8 layouts come from exporters.onnx_int8.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from edgediff.exporters.base import (
    PRECISIONS,
    float_denoiser,
    input_names,
)
from edgediff.exporters.onnx_int8 import INT8_LAYOUTS, fold_weight_quantize, insert_int_layers, insert_qdq, int32_bias
from torch import nn

from edgediff.artifact import atomic_file
from edgediff.errors import BadInput
from edgediff.lowering import lower
from edgediff.model import DenoiserModule, DiffusionModel, InputSignature
from edgediff.quant_params import QuantParams

OPSET = 17
# protobuf's hard limit is 2 GiB; stay clear of it (the graph itself also takes space)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
OUTPUT_NAME = "out"
META_PREFIX = "edgediff."


# ------------------------------------------------------------------------------------------
# the module that gets traced
# ------------------------------------------------------------------------------------------


class _ExportWrapper(DenoiserModule):
    """Positional inputs in contract order (what torch.onnx.export passes) -> DenoiserModule's call.

    The float denoiser sits at `.inner`, so node names start with "/inner/"; the exporter
    strips that prefix and names are then module paths of `model.denoiser`.
    """

    def __init__(self, inner: nn.Module, sig: InputSignature) -> None:
        super().__init__(inner, sig)
        self.names = input_names(sig)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(**dict(zip(self.names, args)))


# ------------------------------------------------------------------------------------------
# graph post-processing
# ------------------------------------------------------------------------------------------


def _rename_nodes(graph: Any) -> None:
    """Strip the wrapper's "/inner" scope so node names are paths in model.denoiser."""
    seen: set[str] = set()
    for n in graph.node:
        # nodes of the wrapper itself (I/O casts) go under "/io/" so they cannot collide
        name = n.name[len("/inner"):] if n.name.startswith("/inner/") else "/io/" + n.name.lstrip("/")
        base, i = name, 1
        while name in seen:
            name, i = f"{base}_{i}", i + 1
        seen.add(name)
        n.name = name


def module_of(node_name: str) -> str:
    """The module path a node came from: "/down_blocks.0/resnets.0/conv1/Conv" -> "down_blocks.0.resnets.0.conv1"."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _set_meta(model: Any, meta: dict[str, Any]) -> None:
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = META_PREFIX + k, v if isinstance(v, str) else json.dumps(v)


def read_meta(model: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            k = p.key[len(META_PREFIX):]
            try:
                out[k] = json.loads(p.value)
            except json.JSONDecodeError:
                out[k] = p.value
    return out


# ------------------------------------------------------------------------------------------
# the whole export
# ------------------------------------------------------------------------------------------


def build_onnx(model: DiffusionModel, precision: str, progress: Any = None,
               layout: str = "qlinear", entry: Any = None, dynamic_hw: bool = False) -> tuple[Any, dict[str, Any]]:
    """Trace and post-process; returns (onnx.ModelProto, report). Nothing is written.

    `layout` (int8 only): "qlinear" for onnxruntime's integer kernels, "qdq" for TensorRT.
    `entry(wrapper, args) -> (module, args, input_names, output_names)` traces another entry
    point of the same prepared denoiser instead (DeepCache's full and shallow calls).
    """
    import onnx

    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r} for ONNX; expected one of {', '.join(PRECISIONS)}")
    from edgediff.onnx_source import graph_proto, is_graph_model

    if is_graph_model(model):  # an ONNX-in model: its (quantized) graph is already the export
        return graph_proto(model, precision)
    if not isinstance(model, DiffusionModel):
        raise BadInput("the ONNX exporter takes a model or an artifact")
    qp = QuantParams.of(model)
    if precision == "int8" and qp is None:
        raise BadInput("--precision int8 needs an artifact with quantization parameters (compress it first, "
                       "e.g. `edgediff compress MODEL --recipe w8a8`)")
    t0 = time.perf_counter()
    den = float_denoiser(model)
    report: dict[str, Any] = {"target": "onnx", "precision": precision, "opset": OPSET}
    if precision == "int8":
        assert qp is not None
        if layout not in INT8_LAYOUTS:
            raise BadInput(f"unknown int8 layout {layout!r}; expected one of {', '.join(INT8_LAYOUTS)}")
        report["int8_layout"] = layout
        if layout == "qlinear":
            low = lower(den, qp)
            report["quantized_layers"] = insert_int_layers(den, low)
            report["lowering"] = low.summary()
        else:
            report["quantized_layers"] = insert_qdq(den, qp)
        report["weight_bits"], report["act_bits"] = qp.weight_bits, qp.act_bits
    wrapper = _ExportWrapper(den, model.signature).eval()
    names = input_names(model.signature)
    example = model.signature.example_inputs(batch=2)
    args = tuple(example[n] for n in names)
    outputs = [OUTPUT_NAME]
    if entry is not None:
        wrapper, args, names, outputs = entry(wrapper, args)
    dyn = {n: {0: "batch"} for n in [*names, *outputs]}
    if dynamic_hw and len(model.signature.sample_shape) == 3:  # bundles: optimum's dynamic H/W where it traces
        for n in ("sample", *outputs):
            if n in dyn:
                dyn[n] = {0: "batch", 2: "height", 3: "width"}
    import io
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgediff-onnx-") as td, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches on shapes: batch stays dynamic
        big = sum(p.numel() * 4 for p in den.parameters()) > EXTERNAL_DATA_THRESHOLD
        target: Any = os.path.join(td, "m.onnx") if big else io.BytesIO()
        torch.onnx.export(wrapper, args, target, input_names=names, output_names=outputs, opset_version=OPSET,
                          dynamo=False, dynamic_axes=dyn, do_constant_folding=True)
        proto = onnx.load(target) if big else onnx.load_from_string(target.getvalue())
    _rename_nodes(proto.graph)
    if precision == "int8":
        report["weights_int8"] = fold_weight_quantize(proto)
        if layout == "qlinear":
            report["bias_int32"] = int32_bias(proto)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # I/O stays float32 (contract); the converter casts at the edges
        from onnxruntime.transformers.onnx_model import OnnxModel

        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
        om = OnnxModel(proto)
        om.topological_sort()  # the converter appends its I/O casts at the end of the node list
        proto = om.model
    if precision == "int8":
        _set_meta(proto, {"int8_layout": layout})
    _set_meta(proto, {"precision": precision, "arch": model.arch, "signature": model.signature.to_dict(),
                      "source": str(model.provenance.get("source", "")), "opset_reason": "TensorRT 8.6 parses <= 17"})
    ops = Counter(n.op_type for n in proto.graph.node)
    report.update({"nodes": len(proto.graph.node), "ops": dict(ops.most_common()),
                   "qdq_pairs": ops.get("DequantizeLinear", 0), "inputs": names, "outputs": outputs,
                   "trace_seconds": round(time.perf_counter() - t0, 2)})
    return proto, report


def write_onnx(proto: Any, out: Path, force: bool = False) -> dict[str, Any]:
    """Check and write atomically; external data beside the file when over 2 GB."""
    import onnx

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"{out}: an ONNX export must end in .onnx")
    external = proto.ByteSize() > EXTERNAL_DATA_THRESHOLD if _size_known(proto) else True
    data_name = out.name + ".data"
    with atomic_file(out, force=force) as tmp:
        if external:
            data_path = out.parent / data_name
            try:
                onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                onnx.checker.check_model(str(tmp))
            except BaseException:
                data_path.unlink(missing_ok=True)
                raise
        else:
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(tmp))
    size = out.stat().st_size + ((out.parent / data_name).stat().st_size if external else 0)
    return {"path": str(out), "size_bytes": size, "external_data": external, "checker": "passed"}


def _size_known(proto: Any) -> bool:
    try:
        proto.ByteSize()
        return True
    except ValueError:  # protobuf refuses to size a message over 2 GB
        return False
