"""The HLS systolic array's g++ C-simulation against fpga/sim.py, and the cycle model against its cycle count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgediff.fpga import csim, estimate
from edgediff.fpga.sim import ConvGeom, QLayer

pytestmark = pytest.mark.skipif(not csim.toolchain()[0], reason=f"no C-simulation toolchain: {csim.toolchain()[1]}")
SMALL = csim.ArrayConfig(rows=4, cols=4, k_tile=16)  # small array: edge tiles and K tiles on small layers


def _layers(rng: np.random.Generator) -> list[tuple[QLayer, np.ndarray, np.ndarray | None]]:
    items: list[tuple[QLayer, np.ndarray, np.ndarray | None]] = []

    def conv(shape: tuple[int, ...], geom: ConvGeom, signed: bool = False, requant: bool = True) -> None:
        n, c, h, w, o, k = shape
        lo, hi = (-128, 127) if signed else (0, 255)
        layer = QLayer(f"conv{len(items)}", "conv", s_x=0.05, zp_x=int(rng.integers(lo, hi + 1)),
                       s_w=rng.uniform(0.001, 0.01, o).astype(np.float32), w=rng.integers(-127, 128, (o, c // geom.groups, k, k)),
                       bias=rng.integers(-5000, 5000, o), geom=geom, out_scale=0.4 if requant else None,
                       out_zp=int(rng.integers(lo, hi + 1)), out_signed=signed, x_signed=signed)
        items.append((layer, rng.integers(lo, hi + 1, (n, c, h, w)), None))

    conv((1, 3, 5, 5, 4, 3), ConvGeom())
    conv((2, 8, 9, 7, 19, 3), ConvGeom((2, 2), (1, 1, 1, 1)))  # N=19: an edge tile; K=72: K tiles
    conv((1, 8, 11, 9, 12, 3), ConvGeom((1, 1), (1, 0, 2, 1), (2, 1), groups=4), signed=True)
    conv((1, 16, 6, 6, 16, 3), ConvGeom((1, 1), (1, 1, 1, 1), groups=16))  # depthwise
    conv((1, 20, 5, 5, 6, 3), ConvGeom((1, 1), (1, 1, 1, 1)), requant=False)  # int32 accumulators out
    fc = QLayer("fc", "gemm", s_x=0.05, zp_x=3, s_w=np.float32(0.004), w=rng.integers(-128, 128, (37, 21)),
                bias=rng.integers(-500, 500, 21), out_scale=0.7, out_zp=-3, out_signed=True, x_signed=True)
    items.append((fc, rng.integers(-128, 128, (5, 37)), None))
    qk = QLayer("attn:qk", "matmul", s_x=0.05, zp_x=100, s_w=np.float32(0.03), zp_w=120, out_scale=3.0, out_zp=7)
    items.append((qk, rng.integers(0, 256, (2, 17, 8)), rng.integers(0, 256, (2, 8, 17))))
    return items


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("csim")
    return csim.compile_csim(csim.hls_dir(), d / "csim", SMALL)


@pytest.mark.parametrize("rounding", ["ort", "tflite", "tflite_single"])
def test_csim_is_bit_exact_and_counts_the_modelled_cycles(tmp_path: Path, exe: Path, rounding: str) -> None:
    items = _layers(np.random.default_rng(0))
    status, res = csim.csim_layers(tmp_path, items, rounding, SMALL, exe=exe)  # type: ignore[arg-type]
    assert status == 0
    assert set(res) == {layer.name for layer, _, _ in items}
    for layer, x, x2 in items:
        r = res[layer.name]
        assert r["mismatches"] == 0 and r["total"] == layer.run(x, x2).size
        m, k, n, reps = layer.gemm_dims(x.shape, None if x2 is None else x2.shape)
        # the Python estimator, the C closed form and the clock-by-clock count agree
        assert r["cycles"] == r["model_cycles"] == estimate.gemm_cycles(m, k, n, reps, SMALL.rows, SMALL.cols, SMALL.k_tile)


def test_testbench_fails_on_a_wrong_expected_output(tmp_path: Path, exe: Path) -> None:
    items = _layers(np.random.default_rng(1))[:2]
    status, _ = csim.csim_layers(tmp_path, items, "ort", SMALL, exe=exe)
    assert status == 0
    f = tmp_path / "vectors" / "L0001.expect.bin"
    data = np.fromfile(f, "<i4")
    data[5] += 1
    data.tofile(f)
    status, res = csim.run_csim(exe, tmp_path / "vectors")
    assert status == 1 and res[items[1][0].name]["mismatches"] == 1 and res[items[0][0].name]["mismatches"] == 0


def test_estimator_terms() -> None:
    # one full tile, K within one K tile: K + fill/drain + drain-out
    assert estimate.gemm_cycles(16, 100, 16, 1, 16, 16, 512) == 100 + 30 + 16
    # M=17 needs two row folds; the second is almost empty (edge waste)
    rows = estimate.estimate_layers([{"name": "l", "op": "conv", "m": 17, "k": 100, "n": 16}], 16, 16, 200.0)
    assert rows[0]["folds"] == 2 and rows[0]["cycles"] == 2 * 146
    assert rows[0]["edge_waste"] == pytest.approx(1 - 17 / 32)
    assert 0 < rows[0]["utilisation"] < 17 * 100 * 16 / (2 * 100 * 256) + 1e-9
    assert rows[0]["latency_us"] == pytest.approx(2 * 146 / 200.0)
    res = estimate.resources(16, 16, 512)
    assert res["dsp"] == 256 + 16 * 3 and res["bram18k"] == 64
    with pytest.raises(Exception, match="unknown FPGA device"):
        estimate.device("no-such-board")
