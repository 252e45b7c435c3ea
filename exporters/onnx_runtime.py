"""ONNX in onnxruntime: the exported file as a Denoiser, and which of its MACs run in integer kernels."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgediff.exporters.base import (
    contract_feed,
)
from edgediff.exporters.onnx_build import OUTPUT_NAME

from edgediff.errors import BadInput


class OnnxDenoiser:
    """An exported ONNX file in onnxruntime, callable like any edgediff Denoiser."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or _providers())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.path = Path(path)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        feed = contract_feed(self.inputs, x, t, cond, self.path)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feed)[0]).float()


def _providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


# ------------------------------------------------------------------------------------------
# which MACs run in integer kernels after onnxruntime's optimizer
# ------------------------------------------------------------------------------------------

# op -> (index of the weight/right operand, kind); kind "conv" counts numel(out) * prod(w[1:]),
# "matmul" numel(out) * K (K: the left operand's reduced axis)
_MAC_OPS: dict[str, tuple[int, str, bool]] = {
    "Conv": (1, "conv", False), "FusedConv": (1, "conv", False), "NhwcConv": (1, "conv", False),
    "ConvTranspose": (1, "convT", False),
    "QLinearConv": (3, "conv", True), "NhwcQLinearConv": (3, "conv", True), "ConvInteger": (1, "conv", True),
    "MatMul": (0, "matmul", False), "FusedMatMul": (0, "matmul", False), "Gemm": (0, "gemm", False),
    "FusedGemm": (0, "gemm", False),
    "QLinearMatMul": (0, "matmul", True), "MatMulInteger": (0, "matmul", True),
    "MatMulIntegerToFloat": (0, "matmul", True), "DynamicQuantizeMatMul": (0, "matmul", True),
    "QGemm": (0, "gemm", True),
}


def integer_macs(path: Path, threads: int = 1) -> dict[str, Any]:
    """MACs of conv/linear/matmul nodes in onnxruntime's optimized CPU graph, integer vs float.

    The file is optimized by onnxruntime (ORT_ENABLE_ALL, CPU provider) and written out with
    SessionOptions.optimized_model_filepath; that graph is run once at batch 1 with every
    intermediate exposed, to read the shapes, and each node's MACs are counted from them.
    Returns macs (per call, batch 1), integer_macs, integer_macs_share and per-op counts.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="edgediff-ortopt-") as td:
        opt = os.path.join(td, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = opt
        # a model with external data: the optimized copy keeps its own beside it (else it would
        # point at the original's .data name relative to this temp dir)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None
        m = onnx.load(opt)
        inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
        nodes = [n for n in m.graph.node if n.op_type in _MAC_OPS]
        wanted = {o for n in nodes for o in n.output[:1]} | {n.input[_MAC_OPS[n.op_type][0]] for n in nodes}
        wanted |= {n.input[1] for n in nodes if _MAC_OPS[n.op_type][1] == "conv"}
        wanted |= {n.input[3] for n in nodes if n.op_type in ("QLinearMatMul", "QGemm")}
        wanted -= set(inits)
        graph_out = {o.name for o in m.graph.output}
        for name in sorted(wanted - graph_out):
            m.graph.output.append(onnx.ValueInfoProto(name=name))
        so2 = ort.SessionOptions()
        so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so2.intra_op_num_threads = threads
        so2.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so2, providers=["CPUExecutionProvider"])
        feed = _example_feed(sess)
        names = [o.name for o in sess.get_outputs()]
        shapes = {n: tuple(v.shape) for n, v in zip(names, sess.run(names, feed))}
    shapes.update(inits)
    total = integer = 0
    by_op: Counter[str] = Counter()
    float_nodes: list[dict[str, Any]] = []
    for n in nodes:
        idx, kind, is_int = _MAC_OPS[n.op_type]
        out = shapes.get(n.output[0])
        if out is None:
            continue
        numel = int(np.prod(out))
        if kind in ("conv", "convT"):
            w = shapes.get(n.input[3] if n.op_type in ("QLinearConv", "NhwcQLinearConv") else n.input[1])
            if w is None:
                continue
            macs = numel * int(np.prod(w[1:])) if kind == "conv" else int(np.prod(shapes.get(n.input[0], (0,)))) * int(
                np.prod(w[1:]))
        else:
            a = shapes.get(n.input[0])
            if a is None or not a:
                continue
            trans_a = any(x.name == "transA" and x.i for x in n.attribute)
            k = a[0] if (kind == "gemm" and trans_a) else a[-1]
            macs = numel * int(k)
        total += macs
        by_op[n.op_type] += macs
        if is_int:
            integer += macs
        else:
            float_nodes.append({"node": n.name, "op": n.op_type, "macs": macs})
    float_nodes.sort(key=lambda d: -d["macs"])
    return {"macs": total, "integer_macs": integer, "integer_macs_share": round(integer / total, 4) if total else 0.0,
            "macs_by_op": dict(by_op.most_common()), "float_mac_nodes": float_nodes[:10],
            "measured_on": f"onnxruntime {ort.__version__} CPU optimized graph (ORT_ENABLE_ALL), batch 1"}


def _example_feed(sess: Any) -> dict[str, np.ndarray]:
    """Batch-1 inputs for a session: the graph's own shapes, symbolic axes as 1."""
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        if "int" in i.type:
            feed[i.name] = np.zeros(shape, np.int64 if "64" in i.type else np.int32)
        else:
            feed[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * (
                100 if i.name == "timestep" else 1)
    return feed
