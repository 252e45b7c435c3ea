"""The HLS systolic array's g++ C-simulation against fpga/sim.py, the cycle model against the stages' counted clocks,
and the HLS coding rules the design keeps (DATAFLOW, LOOP_TRIPCOUNT, no divides in pipelined loops)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from edgediff.fpga import csim, estimate
from edgediff.fpga.graph import array_geometry
from edgediff.fpga.sim import ConvGeom, QLayer

needs_cxx = pytest.mark.skipif(not csim.toolchain()[0], reason=f"no C-simulation toolchain: {csim.toolchain()[1]}")
SMALL = csim.ArrayConfig(rows=4, cols=16, k_tile=32)  # small array: edge tiles and K tiles on small layers


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


@needs_cxx
@pytest.mark.parametrize("rounding", ["ort", "tflite", "tflite_single"])
def test_csim_is_bit_exact_and_counts_the_modelled_cycles(tmp_path: Path, exe: Path, rounding: str) -> None:
    items = _layers(np.random.default_rng(0))
    status, res = csim.csim_layers(tmp_path, items, rounding, SMALL, exe=exe)  # type: ignore[arg-type]
    assert status == 0
    assert set(res) == {layer.name for layer, _, _ in items}
    for layer, x, x2 in items:
        r = res[layer.name]
        assert r["mismatches"] == 0 and r["total"] == layer.run(x, x2).size
        m, _, n, reps = layer.gemm_dims(x.shape, None if x2 is None else x2.shape)
        geo = array_geometry(layer, x.shape)
        sch = estimate.layer_schedule(m, n, reps, geo["k_words"], SMALL.rows, SMALL.cols, SMALL.k_tile, geo["groups"],
                                      layer.out_scale is not None, geo.get("conv"))
        # every stage's clock-by-clock count, the pipelined total and the words moved equal the closed-form model
        assert r["cycles"] == sch["pipeline_cycles"]
        for key in ("load", "compute", "drain", "params", "jobs", "tiles", "words_read", "words_written"):
            assert r[key] == sch[key], key
        assert r["load"] > 0 and r["compute"] > 0 and r["drain"] > 0


@needs_cxx
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
    # one output tile, K = 100 -> 7 words in one K tile: load 16 * 7 + 64, compute 112 + 30, drain 16 + 16, params 16 + 64
    sch = estimate.layer_schedule(16, 16, 1, 7)
    assert (sch["load"], sch["compute"], sch["drain"], sch["params"]) == (176, 142, 32, 80)
    assert sch["pipeline_cycles"] == 80 + 176 + 142 + 32  # one job: nothing overlaps
    # many output tiles: the stages overlap, the slowest (load here) sets the pace
    big = estimate.layer_schedule(16 * 50, 16, 1, 7)
    assert big["tiles"] == 50 and big["pipeline_cycles"] < big["load"] + big["compute"] + big["drain"]
    assert big["pipeline_cycles"] >= big["load"] + big["params"]
    # the shortcut for periodic tiles equals the plain recurrence
    e_l1 = e_c1 = e_c2 = e_d = 0
    for _ in range(29):
        for lj, cj in ((176, 142), (100, 300)):
            e_l = max(e_l1, e_c2) + lj
            e_c = max(e_l, e_c1) + cj
            e_l1, e_c2, e_c1 = e_l, e_c1, e_c
        e_c1 = max(e_c1, e_d)
        e_d = e_c1 + 40
    assert estimate.pipeline_cycles([176, 100], [142, 300], 40, 29) == e_d
    # M=17 needs two row folds; the second is almost empty (edge waste)
    rows = estimate.estimate_layers([{"name": "l", "op": "conv", "m": 17, "k": 100, "n": 16}], 16, 16, 200.0)
    assert rows[0]["folds"] == 2 and rows[0]["edge_waste"] == pytest.approx(1 - 17 / 32)
    assert 0 < rows[0]["utilisation"] < 17 * 100 * 16 / (2 * 100 * 256) + 1e-9
    assert rows[0]["latency_us"] == pytest.approx(rows[0]["cycles"] / 200.0)
    with pytest.raises(Exception, match="unknown FPGA device"):
        estimate.device("no-such-board")


def test_dram_floor_bounds_a_layer_on_a_slow_board() -> None:
    layer = {"name": "l", "op": "gemm", "m": 1024, "k": 512, "n": 64}
    fast = estimate.estimate_layers([layer], 16, 16, 200.0, dram_gbs=100.0)[0]
    slow = estimate.estimate_layers([layer], 16, 16, 200.0, dram_gbs=0.5)[0]
    assert fast["bound"] != "dram" and fast["cycles"] == fast["pipeline_cycles"]
    # 0.5 GB/s at 200 MHz is 2.5 bytes per clock: bytes moved / 2.5 is the floor
    assert slow["bound"] == "dram" and slow["cycles"] == slow["dram_floor_cycles"] == -(-slow["bytes_moved"] * 2 // 5)
    assert slow["pipeline_cycles"] == fast["pipeline_cycles"]
    # words: A read once per column tile, B once per row tile, outputs once; 16 bytes a word
    assert fast["words_read"] == 1024 * 32 * 4 + 64 * 32 * 64 + 64 and fast["words_written"] == 1024 * 4
    s = estimate.summarize([fast], 16, 16, 200.0)
    assert s["latency_is"] == "estimate" and "not a board measurement" in s["assumptions"]
    assert s["gops"] == pytest.approx(2 * fast["macs"] / (fast["cycles"] / 200e6) / 1e9)


def test_resources_follow_the_arrays_and_unroll_factors() -> None:
    r16, r32 = estimate.resources(16, 16, 512), estimate.resources(32, 32, 512)
    assert r16["dsp_breakdown"]["pe"] == 256 and r32["dsp_breakdown"]["pe"] == 1024
    assert r16["dsp_breakdown"]["requant_lanes"] == 16 * 3
    assert estimate.resources(16, 16, 512, "tflite")["dsp_breakdown"]["requant_lanes"] == 16 * 4
    # operand FIFOs: ROWS + COLS of them, 4 BRAM18K each (128 bits wide, 64 deep); parameter banks 4 x COLS
    assert r16["bram18k_breakdown"] == {"operand_fifos": 32 * 4, "parameter_banks": 64}
    assert estimate.resources(16, 16, 16384)["bram18k_breakdown"]["operand_fifos"] == 32 * 4 * 4
    assert r32["lut"] > r16["lut"] and r32["ff"] == 4 * r16["ff"] - 3 * 16 * 64 + 16 * 64


def _loops(src: str) -> list[tuple[str, str]]:
    """(for-header, body) of every for loop in C++ source (brace matching)."""
    out = []
    for mt in re.finditer(r"for \(([^;]*);([^;]*);[^)]*\)\s*\{", src):
        depth, i = 1, mt.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(src[i], 0)
            i += 1
        out.append((mt.group(2), src[mt.end():i]))
    return out


@pytest.mark.parametrize("source", ["systolic.cpp", "nonlinear.cpp"])
def test_loops_have_tripcounts_and_pipelined_loops_no_divides(source: str) -> None:
    src = (csim.hls_dir() / source).read_text().split("long long pipeline_cycles(")[0]  # C-sim-only code aside
    constant = re.compile(r"^\s*\w+ < (ROWS|COLS|VEC|4|\d+)\s*$")
    loops = _loops(src)
    assert len(loops) >= 5
    for cond, body in loops:
        first = body.lstrip().split("\n", 1)[0]
        if not constant.match(cond) and not (cond.strip().endswith(">= 0") and "UNROLL" in first):
            assert "LOOP_TRIPCOUNT" in first, f"{source}: loop `{cond}` has a variable bound and no LOOP_TRIPCOUNT"
        if "PIPELINE" in body.split("for (", 1)[0]:
            code = re.sub(r"//[^\n]*|#pragma[^\n]*", "", body)  # comments and pragma constants aside
            assert not re.search(r"[^/*]\s[/%]\s", code), f"{source}: a divide or modulo in the pipelined loop `{cond}`"


def test_the_design_keeps_the_hls_coding_rules() -> None:
    src = (csim.hls_dir() / "systolic.cpp").read_text()
    top = (csim.hls_dir() / "top.cpp").read_text()
    assert "#pragma HLS DATAFLOW" in src
    for stage in ("load_stage", "compute_stage", "drain_stage"):
        assert re.search(rf"static void {stage}\([^)]*\) \{{\n#pragma HLS INLINE off", src), stage
        assert "LayerCfg" not in re.search(rf"static void {stage}\(([^)]*)\)", src).group(1)  # flat arguments
    assert "ap_uint<128>" in (csim.hls_dir() / "systolic.h").read_text()
    array_top, call_top = top.split("int edgediff_top(")
    assert array_top.count("m_axi") == 4 and "max_read_burst_length" in array_top
    # the whole-call top: the array's four ports plus the units' code streams and constants, one register file
    assert call_top.count("m_axi") == 10 and "nl_unit(" in call_top and "systolic_layer(" in call_top


def test_synthesis_needs_vitis_hls_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from edgediff.fpga.writer import RUN_HLS_SH, TCL, synthesize

    from edgediff.errors import Unavailable

    (tmp_path / "run_hls.tcl").write_text(TCL.format(defines="", part="xczu7ev-ffvc1156-2-e", period_ns="5.000"))
    (tmp_path / "run_hls.sh").write_text(RUN_HLS_SH)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(Unavailable, match="vitis_hls is not on PATH"):
        synthesize(tmp_path)
    proc = subprocess.run(["/bin/sh", str(tmp_path / "run_hls.sh")], capture_output=True, text=True,
                          env={"PATH": str(empty)})
    assert proc.returncode == 3 and "vitis_hls is not on PATH" in proc.stderr
    for step in ("csim_design", "csynth_design", "cosim_design"):
        assert step in (tmp_path / "run_hls.tcl").read_text()


def test_nonlinear_unit_cycles_estimate() -> None:
    ops = [{"op": "GroupNorm", "elements": 1000}, {"op": "SiLU", "elements": 1000}, {"op": "Softmax", "elements": 64},
           {"op": "SiLU", "elements": 10}, {"op": "Einsum", "macs": 5, "elements": 0}]
    u = estimate.nonlinear_unit_cycles(ops)
    # GroupNorm 2 passes with its SiLU folded in, softmax 3 passes, a standalone SiLU table 1 pass
    assert u["unit_cycles"] == 2 * 1000 + 3 * 64 + 10 and u["ops_on_units"] == 4 and u["ops_without_unit"] == ["Einsum"]
    s = estimate.summarize(estimate.estimate_layers([{"name": "l", "op": "gemm", "m": 16, "k": 16, "n": 16}, *ops]),
                           16, 16, 200.0)
    assert s["whole_call_cycles_if_units_on_chip"] == s["total_cycles"] + u["unit_cycles"]
