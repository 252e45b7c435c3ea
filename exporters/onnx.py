"""ONNX backend: fp32, fp16 and int8 (QuantizeLinear/DequantizeLinear from the artifact's own scales).

How the file is made
- The float denoiser (quantization wrappers stripped: its weights lie on the quantization
  grid) is traced by torch.onnx's TorchScript exporter. We use that exporter rather than the
  dynamo one on purpose: it is about 10x faster here (1 s vs 15 s for a tiny UNet, which
  matters for tests and for the 35.7M-param cifar model), and its node names are the module
  paths ("/down_blocks.0/resnets.0/conv1/Conv"), which profiling maps back to the model.
- Opset 17: the newest opset that TensorRT 8.6 (JetPack 6.0, still the most common Jetson
  image) parses, while already having native LayerNormalization and per-channel
  QuantizeLinear/DequantizeLinear (opset >= 13). onnxruntime, TensorRT 10, OpenVINO and the
  other edge runtimes all read it.
- int8: every layer named in QuantParams gets Q/DQ pairs placed exactly where the PyTorch
  simulation (edgediff.quant) fake-quantizes: the layer's input activation (per tensor, two
  halves when the quant pass split a skip concatenation), its weight (int8 initializer ->
  DequantizeLinear, per output channel, symmetric: what TensorRT's explicit quantization
  wants), and the operands of the attention matmuls (Q, K, softmax output, V). Nothing is
  re-calibrated: scales and zero points are copied from the artifact.
- fp16: onnxruntime's float16 converter, keeping float32 I/O so that every target has the
  same interface.
- Models over 2 GB are written with external data (`<name>.onnx.data` beside the file).

Exported I/O (all targets): inputs sample float32 [B,C,H,W], timestep float32 [B], optional
encoder_hidden_states float32 [B,S,D] / class_labels int64 [B]; output out float32; B dynamic.

Modules: exporters.onnx (this: the Backend, onnx_info, structural_check), onnx_build (tracing,
build_onnx, write_onnx), onnx_int8 (Q/DQ and QLinear layouts), onnx_runtime (OnnxDenoiser,
integer_macs). The names below are re-exported here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.exporters.base import (
    PRECISIONS,
    Backend,
    ExportReport,
    float_denoiser,
    input_names,
    probe_import,
    threads,
)
from edgediff.exporters.onnx_build import (
    EXTERNAL_DATA_THRESHOLD,
    META_PREFIX,
    OPSET,
    OUTPUT_NAME,
    build_onnx,
    module_of,
    read_meta,
    write_onnx,
)
from edgediff.exporters.onnx_int8 import (
    INT8_LAYOUTS,
    QDQ,
    IntLayer,
    QDQAttnProcessor,
    QDQLayer,
    insert_int_layers,
    insert_qdq,
)
from edgediff.exporters.onnx_runtime import OnnxDenoiser, integer_macs

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

_QDQLayer = QDQLayer  # the name tests and older callers use

__all__ = ["BACKEND", "EXTERNAL_DATA_THRESHOLD", "INT8_LAYOUTS", "META_PREFIX", "OPSET", "OUTPUT_NAME", "QDQ",
           "IntLayer", "OnnxBackend", "OnnxDenoiser", "QDQAttnProcessor", "QDQLayer", "build_onnx", "float_denoiser",
           "input_names", "insert_int_layers", "insert_qdq", "integer_macs", "module_of", "onnx_info", "read_meta",
           "structural_check", "write_onnx"]


def onnx_info(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper  # noqa: F401 - imported for side effects on older onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise BadInput(f"{path}: not a readable ONNX file ({e.__class__.__name__})") from None
    ops = Counter(n.op_type for n in m.graph.node)
    params = sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type in (1, 10, 11, 3, 2))

    def io(vs: Any) -> list[dict[str, Any]]:
        out = []
        for v in vs:
            tt = v.type.tensor_type
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                        "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]})
        return out

    meta = read_meta(m)
    return {"format": "onnx", "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
            "precision": meta.get("precision"), "params": params, "nodes": len(m.graph.node),
            "ops": dict(ops.most_common()), "qdq_pairs": ops.get("DequantizeLinear", 0), "inputs": io(m.graph.input),
            "outputs": io(m.graph.output), "arch": meta.get("arch"), "made_for": meta.get("made_for", "onnx"),
            "external_data": any(i.data_location == 1 for i in m.graph.initializer)}


def structural_check(path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
    """I/O names, dtypes and shapes against the contract (and the reference's signature)."""
    info = onnx_info(path)
    problems = []
    names = [i["name"] for i in info["inputs"]]
    if reference is not None:
        want = input_names(reference.signature)
        if names != want:
            problems.append(f"inputs {names} != {want}")
        s = next((i for i in info["inputs"] if i["name"] == "sample"), None)
        if s and [d for d in s["shape"][1:]] != list(reference.signature.sample_shape):
            problems.append(f"sample shape {s['shape']} does not match {list(reference.signature.sample_shape)}")
    if [o["name"] for o in info["outputs"]] != [OUTPUT_NAME]:
        problems.append(f"outputs {[o['name'] for o in info['outputs']]} != ['{OUTPUT_NAME}']")
    for i in info["inputs"]:
        want_dtype = "int64" if i["name"] == "class_labels" else "float32"
        if i["dtype"] != want_dtype:
            problems.append(f"input {i['name']} is {i['dtype']}, expected {want_dtype}")
        if i["shape"] and isinstance(i["shape"][0], int):
            problems.append(f"input {i['name']} has a fixed batch axis")
    return {"ok": not problems, "problems": problems, "ops": info["ops"], "inputs": info["inputs"],
            "outputs": info["outputs"]}


class OnnxBackend(Backend):
    target = "onnx"
    precisions = PRECISIONS
    suffixes = (".onnx",)

    def available(self) -> tuple[bool, str]:
        return probe_import("onnx", "pip install onnx")

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        return probe_import("onnxruntime", "pip install onnxruntime")

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        proto, facts = build_onnx(model, precision)
        facts.update(write_onnx(proto, out, force=force))
        return ExportReport(self.target, precision, str(out), facts.pop("size_bytes"), extra=facts)

    def load_denoiser(self, path: Path) -> OnnxDenoiser:
        ok, why = self.runtime_available(path)
        if not ok:
            raise Unavailable(f"running {path} needs onnxruntime: {why}")
        return OnnxDenoiser(Path(path), threads=threads())

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        return structural_check(Path(path), reference)

    def info(self, path: Path) -> dict[str, Any]:
        data = onnx_info(Path(path))
        ok, why = self.runtime_available(path)
        if not ok:
            data["macs_reason"] = f"macs and integer_macs_share come from onnxruntime's optimized graph: {why}"
            return data
        im = integer_macs(Path(path))
        data["macs"] = im["macs"]
        if data.get("precision") == "int8" or im["integer_macs"]:
            data.update({k: im[k] for k in ("integer_macs", "integer_macs_share", "macs_by_op", "float_mac_nodes")})
        data["macs_measured_on"] = im["measured_on"]
        return data


BACKEND = OnnxBackend()
