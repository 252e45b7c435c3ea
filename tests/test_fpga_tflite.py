"""fpga/sim.py's TFLite conventions against LiteRT's own int8 kernels, bit for bit.

A small torch model -> litert-torch (float .tflite) -> ai-edge-quantizer static W8A8 -> LiteRT
interpreter. Measured here: the reference kernels (BUILTIN_REF) follow TFLite's double rounding
("tflite"); the default XNNPACK delegate follows single rounding ("tflite_single").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.fpga.sim import ConvGeom, QLayer

litert_torch = pytest.importorskip("litert_torch")
aq = pytest.importorskip("ai_edge_quantizer")
litert = pytest.importorskip("ai_edge_litert.interpreter")


class TwoConvs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.b = torch.nn.Conv2d(12, 16, 3, stride=2, padding=1)  # odd input: TFLite SAME == torch pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.fixture(scope="module")
def int8_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ai_edge_quantizer import recipe

    d = tmp_path_factory.mktemp("tflite")
    torch.manual_seed(0)
    fp = d / "float.tflite"
    litert_torch.convert(TwoConvs().eval(), (torch.randn(1, 8, 9, 9),)).export(str(fp))
    q = aq.Quantizer(str(fp), recipe.static_wi8_ai8())
    sig = litert.Interpreter(str(fp)).get_signature_list()
    name = next(iter(sig))
    rng = np.random.default_rng(0)
    cal = {name: [{sig[name]["inputs"][0]: rng.standard_normal((1, 8, 9, 9)).astype(np.float32)} for _ in range(8)]}
    out = d / "int8.tflite"
    q.quantize(q.calibrate(cal), serialize_to_path=str(out))
    return out


def _mismatches(path: Path, resolver: object, rounding: str) -> tuple[int, int]:
    it = litert.Interpreter(str(path), experimental_op_resolver_type=resolver, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    det = {d["index"]: d for d in it.get_tensor_details()}
    convs = [o for o in it._get_ops_details() if o["op_name"] == "CONV_2D"]
    assert len(convs) == 2
    inp = it.get_input_details()[0]
    rng = np.random.default_rng(1)
    bad = total = 0
    for _ in range(5):
        it.set_tensor(inp["index"], rng.integers(-128, 128, inp["shape"]).astype(np.int8))
        it.invoke()
        for op, stride in zip(convs, (1, 2)):
            xi, wi, bi = op["inputs"]
            yi = op["outputs"][0]
            qx, qw, qy = (det[i]["quantization_parameters"] for i in (xi, wi, yi))
            x = it.get_tensor(xi).astype(np.int64).transpose(0, 3, 1, 2)  # NHWC -> NCHW
            w = it.get_tensor(wi).astype(np.int64).transpose(0, 3, 1, 2)  # OHWI -> OIHW
            y = it.get_tensor(yi).astype(np.int64).transpose(0, 3, 1, 2)
            layer = QLayer("conv", "conv", float(qx["scales"][0]), int(qx["zero_points"][0]), qw["scales"].astype(np.float32),
                           w=w, bias=it.get_tensor(bi).astype(np.int64), geom=ConvGeom((stride, stride), (1, 1, 1, 1)),
                           out_scale=float(qy["scales"][0]), out_zp=int(qy["zero_points"][0]), out_signed=True,
                           x_signed=True)
            got = layer.run(x, rounding=rounding)  # type: ignore[arg-type]
            assert got.shape == y.shape
            bad += int((got != y).sum())
            total += y.size
    return bad, total


def test_litert_reference_kernels_use_double_rounding(int8_tflite: Path) -> None:
    bad, total = _mismatches(int8_tflite, litert.OpResolverType.BUILTIN_REF, "tflite")
    assert total > 5000 and bad == 0


def test_litert_xnnpack_uses_single_rounding(int8_tflite: Path) -> None:
    bad, total = _mismatches(int8_tflite, litert.OpResolverType.AUTO, "tflite_single")
    assert total > 5000 and bad == 0
