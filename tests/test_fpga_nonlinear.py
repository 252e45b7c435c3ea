"""The nonlinear units' C++ (g++ C-simulation) against their NumPy twins, bit for bit, and what the fixed point
costs against float (SNR next to ideal int8 rounding)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from edgediff.fpga import nonlinear as nl

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")


def _gn_case(rng: np.random.Generator, c: int, hw: int, groups: int, silu: bool, name: str):
    s_x, zx = 0.04, int(rng.integers(100, 156))
    x = np.clip(np.rint(rng.normal(0, 1.5, (c, hw)) / s_x) + zx + rng.normal(0, 5, (c, 1)).round(), 0, 255).astype(int)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-0.3, 0.3, c)
    lo, hi = (-128, 127)
    p = nl.groupnorm_params(s_x, zx, gamma, beta, 1e-5, groups, (c // groups) * hw, 0.03, 0, lo, hi, silu)
    return nl.groupnorm_case(name, x, p), (s_x, zx, gamma, beta, p)


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    return nl.compile_units(tmp_path_factory.mktemp("nl") / "nl_csim")


@needs_cxx
def test_units_in_csim_equal_their_numpy_twins(tmp_path: Path, exe: Path) -> None:
    rng = np.random.default_rng(0)
    cases = [_gn_case(rng, 32, 64, 8, True, "gn_silu")[0], _gn_case(rng, 16, 49, 4, False, "gn")[0]]
    flat = np.full((4, 25), 120)  # a constant group: zero variance, eps alone
    cases.append(nl.groupnorm_case("gn_flat", flat, nl.groupnorm_params(0.05, 118, np.ones(4), np.zeros(4), 1e-5, 2,
                                                                         50, 0.02, 0, -128, 127, True)))
    logits = rng.integers(-4000, 4000, (24, 24))
    sp = nl.softmax_params(2e-3, 1 / 255, 0, 0, 255)
    cases.append(nl.softmax_case("softmax", logits, sp))
    lut = nl.lut_params(nl.gelu, 0.05, 10, -128, 127, 0.04, -5, -128, 127)
    x8 = rng.integers(-128, 128, 300)
    cases.append(nl.UnitCase("gelu", nl.LUT, {"qmin_in": -128}, x8, nl.lut_int(x8, -128, lut), lut=lut))
    a, b = rng.integers(0, 256, 200), rng.integers(-128, 128, 200)
    ma, mb = nl.add_params(0.05, 0.03, 0.06)
    cases.append(nl.UnitCase("add", nl.ADD, {"za": 128, "zb": 0, "ma": ma, "mb": mb, "zy": 3, "qmin": -128, "qmax": 127},
                             a, nl.add_int(a, b, 128, 0, ma, mb, 3, -128, 127), x2=b))
    img = rng.integers(-128, 128, (3, 4, 5))
    cases.append(nl.UnitCase("upsample", nl.UPSAMPLE, {"c": 3, "h": 4, "w": 5}, img, nl.upsample2x_int(img)))
    status, res = nl.csim_units(tmp_path, cases, exe)
    assert status == 0 and set(res) == {c.name for c in cases}
    for c in cases:
        assert res[c.name]["mismatches"] == 0 and res[c.name]["total"] == c.expect.size, c.name
    assert nl.upsample2x_int(img).shape == (3, 8, 10)
    # the testbench does fail: a wrong expected value is caught
    bad = cases[3]
    bad.expect = bad.expect.copy()
    bad.expect.flat[7] += 1
    status, res = nl.csim_units(tmp_path / "bad", [bad], exe)
    assert status == 1 and res["softmax"]["mismatches"] == 1


def test_fixed_point_accuracy_against_float() -> None:
    rng = np.random.default_rng(1)
    case, (s_x, zx, gamma, beta, p) = _gn_case(rng, 32, 256, 8, True, "gn")
    ref = nl.groupnorm_float(s_x * (case.x - zx), gamma, beta, 8, 1e-5, True)
    got = 0.03 * (nl.groupnorm_int(case.x, p) - p.zy)
    ideal = 0.03 * np.clip(np.rint(ref / 0.03), -128, 127)  # int8 rounding of the exact float result
    snr, floor = nl.snr_db(ref, got), nl.snr_db(ref, ideal)
    # the 1/16 SiLU table step costs a few dB against the int8 floor, and no more
    assert floor - 8.0 < snr < floor + 1e-9 and snr > 25.0
    logits = rng.normal(0, 3, (16, 64))
    s_l = 0.01
    sp = nl.softmax_params(s_l, 1 / 255, 0, 0, 255)
    pr = nl.softmax_int(np.rint(logits / s_l).astype(np.int64), sp) / 255.0
    e = np.exp(logits - logits.max(1, keepdims=True))
    fp = e / e.sum(1, keepdims=True)
    assert nl.snr_db(fp, pr) > 30.0 and np.abs(pr.sum(1) - 1).max() < 0.05


@needs_cxx
def test_a_resnet_block_runs_on_the_array_and_the_units_chained_in_csim(tmp_path: Path, exe: Path) -> None:
    """GN+SiLU -> conv -> GN+SiLU -> conv -> residual add -> upsample, each step fed with the previous step's
    C-simulation output (not the simulator's), equals the NumPy chain bit for bit at the end."""
    from edgediff.fpga import csim
    from edgediff.fpga.sim import ConvGeom, QLayer

    rng = np.random.default_rng(3)
    c, hw = 16, 8
    s0, z0 = 0.05, 128
    x = np.clip(np.rint(rng.normal(0, 1.0, (1, c, hw, hw)) / s0) + z0, 0, 255).astype(np.int64)
    s_h, s_c = 0.03, 0.06  # GN+SiLU outputs (the convs' inputs, int8 zero point 0), conv outputs
    gn = [nl.groupnorm_params(s, 0 if i else z0, rng.uniform(0.8, 1.2, c), rng.uniform(-0.2, 0.2, c), 1e-5, 4,
                              (c // 4) * hw * hw, s_h, 0, -128, 127, True) for i, s in enumerate((s0, s_c))]
    convs = [QLayer(f"conv{i}", "conv", s_x=s_h, zp_x=0, s_w=rng.uniform(0.002, 0.006, c).astype(np.float32),
                    w=rng.integers(-127, 128, (c, c, 3, 3)), bias=rng.integers(-300, 300, c), geom=ConvGeom(
                        (1, 1), (1, 1, 1, 1)), out_scale=s_c, out_zp=0, out_signed=True, x_signed=True) for i in range(2)]
    ma, mb = nl.add_params(s0, s_c, 0.08)
    array = csim.ArrayConfig(rows=16, cols=16, k_tile=512)
    arr_exe = csim.compile_csim(csim.hls_dir(), tmp_path / "csim", array)

    def gn_step(name: str, v: np.ndarray, p: nl.GroupNormParams, use_csim: bool) -> np.ndarray:
        v2 = v.reshape(c, hw * hw)
        if not use_csim:
            return nl.groupnorm_int(v2, p).reshape(1, c, hw, hw)
        case = nl.groupnorm_case(name, v2, p)
        status, _ = nl.csim_units(tmp_path / name, [case], exe)
        assert status == 0
        return np.fromfile(tmp_path / name / "units" / f"{name}.y.bin", "<i4").reshape(1, c, hw, hw)

    def conv_step(layer: QLayer, v: np.ndarray, use_csim: bool) -> np.ndarray:
        if not use_csim:
            return layer.run(v)
        status, _ = csim.csim_layers(tmp_path / layer.name, [(layer, v, None)], "ort", array, exe=arr_exe)
        assert status == 0
        return csim.read_outputs(tmp_path / layer.name / "vectors", "L0000", (1, c, hw, hw))

    outs = {}
    for use in (False, True):
        h = gn_step("gn0", x, gn[0], use)
        h = conv_step(convs[0], h, use)
        h = gn_step("gn1", h, gn[1], use)
        h = conv_step(convs[1], h, use)
        if use:
            add = nl.UnitCase("add", nl.ADD, {"za": z0, "zb": 0, "ma": ma, "mb": mb, "zy": 0, "qmin": -128, "qmax": 127},
                              x.ravel(), nl.add_int(x.ravel(), h.ravel(), z0, 0, ma, mb, 0, -128, 127), x2=h.ravel())
            assert nl.csim_units(tmp_path / "add", [add], exe)[0] == 0
            y = np.fromfile(tmp_path / "add" / "units" / "add.y.bin", "<i4").reshape(c, hw, hw)
            up = nl.UnitCase("up", nl.UPSAMPLE, {"c": c, "h": hw, "w": hw}, y, nl.upsample2x_int(y))
            assert nl.csim_units(tmp_path / "up", [up], exe)[0] == 0
            outs[use] = np.fromfile(tmp_path / "up" / "units" / "up.y.bin", "<i4").reshape(c, 2 * hw, 2 * hw)
        else:
            y = nl.add_int(x.ravel(), h.ravel(), z0, 0, ma, mb, 0, -128, 127).reshape(c, hw, hw)
            outs[use] = nl.upsample2x_int(y)
    assert outs[True].shape == (c, 2 * hw, 2 * hw) and np.array_equal(outs[True], outs[False])
    assert len(np.unique(outs[True])) > 20  # a real signal went through, not a saturated constant
