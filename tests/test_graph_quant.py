"""The diffusion-aware graph rewrites applied before a generic ONNX quantizer (edgediff/graph_quant.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgediff.graph_quant import split_concat_convs, time_only_nodes
from edgediff.loaders import load_model
from edgediff.testing import export_third_party_onnx


def _demo_graph(tmp_path: Path) -> onnx.ModelProto:
    m = load_model("demo")
    path = export_third_party_onnx(m.denoiser, tmp_path / "demo.onnx",
                                   (torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])))
    return onnx.load(str(path))


def _run(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_shortcut_convs_are_split_exactly(tmp_path: Path) -> None:
    proto = _demo_graph(tmp_path)
    before = onnx.ModelProto()
    before.CopyFrom(proto)
    split = split_concat_convs(proto)
    # the demo's decoder reads a skip concat in every up-block resnet (conv1 after GroupNorm+SiLU
    # and the 1x1 conv_shortcut on the concat itself)
    assert len(split) >= 4
    assert any("conv_shortcut" in s for s in split) and any("conv1" in s for s in split)
    assert sum(n.op_type == "Split" for n in proto.graph.node) == len(split)
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 1, 16, 16)).astype(np.float32),
            "timestep": np.array([5.0, 900.0], np.float32)}
    np.testing.assert_allclose(_run(proto, feed), _run(before, feed), atol=2e-5)


def test_time_only_nodes_are_the_timestep_mlp(tmp_path: Path) -> None:
    proto = _demo_graph(tmp_path)
    names = time_only_nodes(proto)
    assert names, "the timestep-embedding Gemms depend on the timestep alone"
    assert all("time_emb" in n for n in names), names
    # every conv reads the sample, none is time-only
    assert not any(n.op_type == "Conv" and n.name in names for n in proto.graph.node)
