"""benchmarks/quantization.py helpers: the peers' float scope and the merging of per-seed runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is not a package: load the script as a module
    spec = importlib.util.spec_from_file_location("bench_quantization", ROOT / "benchmarks" / "quantization.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _graph(path: Path) -> None:
    """sample -> Conv -> Add(time embedding) -> out; timestep broadcast to the batch, t*freq, Sin, Cos, Gemm."""
    f = lambda a: numpy_helper.from_array(np.asarray(a, np.float32))  # noqa: E731
    inits = [f(np.ones((4, 1, 3, 3))), f(np.ones(4)), f(np.ones((4, 8))), f(np.ones(4)), f(np.arange(4))]
    for t, n in zip(inits, ("cw", "cb", "gw", "gb", "freq")):
        t.name = n
    nodes = [
        helper.make_node("Shape", ["sample"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "zero"], ["b"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"], name="batch1"),
        helper.make_node("ConstantOfShape", ["b1"], ["ones"], name="ones",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["timestep", "ones"], ["tb"], name="t_broadcast"),
        helper.make_node("Unsqueeze", ["tb", "ax1"], ["t2"], name="t_col"),
        helper.make_node("Mul", ["t2", "freq"], ["arg"], name="t_freq"),
        helper.make_node("Sin", ["arg"], ["s"], name="sin"),
        helper.make_node("Cos", ["arg"], ["c"], name="cos"),
        helper.make_node("Concat", ["s", "c"], ["emb"], name="concat", axis=1),
        helper.make_node("Gemm", ["emb", "gw", "gb"], ["temb"], name="linear", transB=1),
        helper.make_node("Conv", ["sample", "cw", "cb"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["temb", "ax23"], ["temb4"], name="temb4"),
        helper.make_node("Add", ["h", "temb4"], ["out"], name="add"),
    ]
    consts = [numpy_helper.from_array(np.asarray(v, np.int64), n)
              for n, v in (("zero", 0), ("ax0", [0]), ("ax1", [1]), ("ax23", [2, 3]))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 1, 4, 4]),
                                       helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits + consts)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_timestep_path_is_the_embedding_arithmetic_only(bench, tmp_path: Path) -> None:
    p = tmp_path / "g.onnx"
    _graph(p)
    # up to the first weighted layer; nothing that reads the sample's values (conv, add)
    assert bench.timestep_path_nodes(p) == ["t_broadcast", "t_col", "t_freq", "sin", "cos", "concat"]


def _result(seed: int, rows: list[tuple[str, float]], samples: int = 512) -> dict:
    return {"seed": seed, "samples": samples, "steps": 20,
            "rows": [{"name": n, "psnr_ddim": v, "weight_bytes": 1} for n, v in rows]}


def test_merge_later_rows_replace_and_spread(bench, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"per_seed": [_result(0, [("fp32", 0), ("x", 7.0)]), _result(1, [("x", 7.2)])]}))
    b.write_text(json.dumps({"per_seed": [_result(0, [("x", 30.0), ("fp32", 0)]), _result(1, [("x", 32.0)])]}))
    merged = bench.merge_runs([a, b])
    assert [r["seed"] for r in merged] == [0, 1]
    assert [r["name"] for r in merged[0]["rows"]] == ["fp32", "x"]
    mean, std, n = bench.mean_std(merged)["x"]["psnr_ddim"]
    assert (mean, n) == (31.0, 2) and abs(std - 2 ** 0.5) < 1e-3


def test_merge_refuses_other_protocol(bench, tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result(0, [("x", 1.0)])))
    b.write_text(json.dumps(_result(0, [("y", 1.0)], samples=64)))
    with pytest.raises(SystemExit, match="other samples"):
        bench.merge_runs([a, b])
