"""Nonlinear units beside the array in integer fixed point: the bit-accurate twins of hls/nonlinear.cpp.

GroupNorm (+SiLU by a 4096-entry table), softmax over attention logits (exp by a 4096-entry table at 1/256,
one divide per row), GELU (or any function of one int8 code) by a 256-entry table, residual add
of two int8 tensors, 2x nearest upsample. `*_params` turn float parameters (scales, gamma, beta,
eps) into the integer constants the units take; `*_float` are the float references, and
`unit_accuracy` measures what the fixed point costs against them (SNR in dB, next to the SNR of
ideal int8 rounding of the float result, the floor any int8 output has).

Every function here uses int64 NumPy arithmetic with the same shifts, floors and clamps as the
C++ (arithmetic right shift = floor; round = add half, shift); `csim_units` runs the C++ with g++
and returns its outputs so tests can compare them bit for bit.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import Unavailable

GN, SOFTMAX, LUT, ADD, UPSAMPLE = 0, 1, 2, 3, 4
NL_SOURCES = ("nonlinear.h", "nonlinear.cpp", "nl_tb.cpp")
EXP_ENTRIES, SILU_ENTRIES = 4096, 4096


def _rshift_round(v: np.ndarray, s: int) -> np.ndarray:
    return (v + (np.int64(1) << (s - 1))) >> s


def _i64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.int64)


# ------------------------------------------------------------------ GroupNorm (+SiLU)
@dataclass
class GroupNormParams:
    zx: int
    groups: int
    eps_n2: int
    gamma: np.ndarray  # int32, round(gamma * 2^16)
    beta: np.ndarray  # int64, round(beta * 2^32)
    lut: np.ndarray | None  # SiLU + output quantizer folded in, 4096 entries (None: identity)
    my: int
    zy: int
    qmin: int
    qmax: int


def silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def groupnorm_params(s_x: float, zx: int, gamma: np.ndarray, beta: np.ndarray, eps: float, groups: int, n: int,
                     s_y: float, zy: int, qmin: int, qmax: int, with_silu: bool) -> GroupNormParams:
    """Integer constants of a GroupNorm over groups of n elements (inputs at scale s_x, outputs at s_y)."""
    lut = None
    if with_silu:
        centre = ((np.arange(SILU_ENTRIES) - SILU_ENTRIES // 2) * 16 + 8) / 256.0  # the real value of each bucket
        lut = np.clip(np.rint(silu(centre) / s_y) + zy, qmin, qmax).astype(np.int32)
    return GroupNormParams(zx, groups, int(round(eps / (s_x * s_x) * n * n)),
                           np.rint(np.asarray(gamma, np.float64) * 2**16).astype(np.int32),
                           np.rint(np.asarray(beta, np.float64) * 2**32).astype(np.int64), lut,
                           int(round(2**24 / (256.0 * s_y))), zy, qmin, qmax)


def groupnorm_int(x: np.ndarray, p: GroupNormParams) -> np.ndarray:
    """(C, HW) int8 codes -> output codes; the arithmetic of nl_groupnorm."""
    c, hw = x.shape
    n = (c // p.groups) * hw
    xg = (_i64(x) - p.zx).reshape(p.groups, n)
    s, ss = xg.sum(1), (xg * xg).sum(1)
    sn = np.array([math.isqrt(int(v)) for v in n * ss - s * s + p.eps_n2], np.int64)
    recip = np.where(sn > 0, (np.int64(1) << 40) // np.maximum(sn, 1), 0)
    z = ((n * xg - s[:, None]) * recip[:, None]) >> 24
    gam = np.repeat(_i64(p.gamma), hw).reshape(p.groups, n)
    bet = np.repeat(_i64(p.beta), hw).reshape(p.groups, n)
    t = np.clip(_rshift_round(z * gam + bet, 24), -32768, 32767)
    if p.lut is not None:
        out = _i64(p.lut)[(t >> 4) + SILU_ENTRIES // 2]
    else:
        out = np.clip(_rshift_round(t * p.my, 24) + p.zy, p.qmin, p.qmax)
    return out.reshape(c, hw).astype(np.int32)


def groupnorm_float(v: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, eps: float,
                    with_silu: bool) -> np.ndarray:
    c, hw = v.shape
    g = v.reshape(groups, -1).astype(np.float64)
    z = ((g - g.mean(1, keepdims=True)) / np.sqrt(g.var(1, keepdims=True) + eps)).reshape(c, hw)
    y = z * np.asarray(gamma)[:, None] + np.asarray(beta)[:, None]
    return silu(y) if with_silu else y


# ------------------------------------------------------------------ softmax
@dataclass
class SoftmaxParams:
    ms: int
    exp_lut: np.ndarray
    mp: int
    zy: int
    qmin: int
    qmax: int


def softmax_params(s_logit: float, s_p: float, zp: int, qmin: int, qmax: int) -> SoftmaxParams:
    """Integer constants of a softmax of int32 logits at scale s_logit, quantized to (s_p, zp)."""
    if not 1e-6 <= s_logit <= 0.0625:  # d < 2^24 codes must cover the table (16 units) and d * ms fit an int64
        raise ValueError(f"softmax logit scale {s_logit:g} outside [1e-6, 0.0625]")
    lut = np.rint(np.exp(-np.arange(EXP_ENTRIES) / 256.0) * 65536).astype(np.int32)
    return SoftmaxParams(int(round(s_logit * 256 * 2**32)), lut, int(round(2**24 / s_p)), zp, qmin, qmax)


def softmax_int(a: np.ndarray, p: SoftmaxParams) -> np.ndarray:
    """(rows, len) int32 logits -> probability codes; the arithmetic of nl_softmax."""
    a = _i64(a)
    d = np.clip(a.max(1, keepdims=True) - a, 0, 2**24 - 1)
    e = _i64(p.exp_lut)[np.clip((d * p.ms + (np.int64(1) << 31)) >> 32, 0, EXP_ENTRIES - 1)]
    recip = (np.int64(p.mp) << 16) // e.sum(1, keepdims=True)
    return np.clip(_rshift_round(e * recip, 40) + p.zy, p.qmin, p.qmax).astype(np.int32)


# ------------------------------------------------------------------ tables, residual add, upsample
def gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


def lut_params(fn: Any, s_in: float, zp_in: int, qmin_in: int, qmax_in: int, s_out: float, zp_out: int, qmin: int,
               qmax: int) -> np.ndarray:
    """A table of fn over every input code (GELU, SiLU...): out = round(fn(s_in (q - zp_in)) / s_out) + zp_out."""
    q = np.arange(qmin_in, qmax_in + 1)
    return np.clip(np.rint(fn(s_in * (q - zp_in)) / s_out) + zp_out, qmin, qmax).astype(np.int32)


def lut_int(x: np.ndarray, qmin_in: int, lut: np.ndarray) -> np.ndarray:
    return _i64(lut)[_i64(x) - qmin_in].astype(np.int32)


def add_params(s_a: float, s_b: float, s_y: float) -> tuple[int, int]:
    return int(round(s_a / s_y * 2**24)), int(round(s_b / s_y * 2**24))


def add_int(a: np.ndarray, b: np.ndarray, za: int, zb: int, ma: int, mb: int, zy: int, qmin: int,
            qmax: int) -> np.ndarray:
    v = (_i64(a) - za) * ma + (_i64(b) - zb) * mb
    return np.clip(_rshift_round(v, 24) + zy, qmin, qmax).astype(np.int32)


def upsample2x_int(x: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(x), 2, axis=-2), 2, axis=-1).astype(np.int32)


# ------------------------------------------------------------------ the whole-call units (fpga/program.py)
Q8 = 256  # nl_groupnorm's Q8 output: the real value t / 256 (my = 2^24, zy = 0, int16 range)
ACT_HALF = 2048  # nl_act_q8's table covers t in [-2048, 2048): real values in [-8, 8) at the full 1/256 step


def requant_mult(s_x: float, s_y: float) -> int:
    return int(round(s_x / s_y * 2**24))


def requant_int(x: np.ndarray, zx: int, m: int, zy: int, qmin: int, qmax: int) -> np.ndarray:
    """nl_requant: a change of grid, clamp(round((x - zx) * m / 2^24) + zy)."""
    return np.clip(_rshift_round((_i64(x) - zx) * m, 24) + zy, qmin, qmax).astype(np.int32)


def add_bcast_int(a: np.ndarray, b: np.ndarray, za: int, zb: int, ma: int, mb: int, zy: int, qmin: int,
                  qmax: int) -> np.ndarray:
    """nl_add_bcast: a (C, HW) plus b (C,) broadcast over HW."""
    v = (_i64(a) - za) * ma + (_i64(b)[:, None] - zb) * mb
    return np.clip(_rshift_round(v, 24) + zy, qmin, qmax).astype(np.int32)


def act_q8_params(fn: Any, s_y: float, zy: int, qmin: int, qmax: int) -> tuple[np.ndarray, int]:
    """(table, my) of nl_act_q8 for fn (SiLU, GELU, identity) onto the output grid (s_y, zy)."""
    v = (np.arange(2 * ACT_HALF) - ACT_HALF) / Q8
    lut = np.clip(np.rint(fn(v) / s_y) + zy, qmin, qmax).astype(np.int32)
    return lut, int(round(2**24 / (Q8 * s_y)))


def act_q8_int(t: np.ndarray, lut: np.ndarray, my: int, zy: int, qmin: int, qmax: int) -> np.ndarray:
    """nl_act_q8: the table inside [-8, 8), the linear tail above, lut[0] below."""
    t = _i64(t)
    idx = np.clip(t + ACT_HALF, 0, 2 * ACT_HALF - 1)
    tail = np.clip(_rshift_round(t * my, 24) + zy, qmin, qmax)
    return np.where(t >= ACT_HALF, tail, _i64(lut)[idx]).astype(np.int32)


PERMS = {0: (1, 0, 2), 1: (1, 2, 0), 2: (0, 2, 1)}


def permute3_int(x: np.ndarray, d: tuple[int, int, int], perm: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).reshape(d).transpose(PERMS[perm])).astype(np.int32)


# ------------------------------------------------------------------ accuracy of the fixed point
def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(np.mean((np.asarray(ref, np.float64) - np.asarray(got, np.float64)) ** 2))
    sig = float(np.mean(np.asarray(ref, np.float64) ** 2))
    return float("inf") if err == 0 else 10.0 * math.log10(sig / err)


# ------------------------------------------------------------------ C-simulation of the units
@dataclass
class UnitCase:
    """One unit invocation for the testbench: kind, integer config, operand arrays, the expected output."""

    name: str
    kind: int
    cfg: dict[str, int]
    x: np.ndarray
    expect: np.ndarray
    x2: np.ndarray | None = None
    lut: np.ndarray | None = None
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def groupnorm_case(name: str, x: np.ndarray, p: GroupNormParams) -> UnitCase:
    c, hw = x.shape
    cfg = {"zx": p.zx, "c": c, "hw": hw, "groups": p.groups, "eps_n2": p.eps_n2, "my": p.my, "zy": p.zy,
           "qmin": p.qmin, "qmax": p.qmax}
    return UnitCase(name, GN, cfg, x, groupnorm_int(x, p), lut=p.lut, gamma=p.gamma, beta=p.beta)


def softmax_case(name: str, a: np.ndarray, p: SoftmaxParams) -> UnitCase:
    cfg = {"rows": a.shape[0], "len": a.shape[1], "ms": p.ms, "mp": p.mp, "zy": p.zy, "qmin": p.qmin, "qmax": p.qmax}
    return UnitCase(name, SOFTMAX, cfg, a, softmax_int(a, p), lut=p.exp_lut)


def compile_units(out_exe: Path) -> Path:
    """g++ the units and their testbench (plain integer C++: no ap_types needed)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise Unavailable("FPGA C-simulation of the nonlinear units: no C++ compiler (install g++ or set CXX)")
    src = Path(__file__).parent / "hls"
    proc = subprocess.run([cxx, "-O2", "-std=c++14", "-w", f"-I{src}", str(src / "nonlinear.cpp"), str(src / "nl_tb.cpp"),
                           "-o", str(out_exe)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on the nonlinear units:\n{proc.stderr[-4000:]}")
    return out_exe


def csim_units(work: Path, cases: list[UnitCase], exe: Path | None = None) -> tuple[int, dict[str, dict[str, int]]]:
    """Write the cases' vectors, run the C++ testbench, return (status, {name: {mismatches, total}})."""
    vec = work / "units"
    vec.mkdir(parents=True, exist_ok=True)
    for c in cases:
        base = vec / c.name
        (vec / f"{c.name}.cfg").write_text("".join(f"{k} {int(v)}\n" for k, v in {"kind": c.kind, **c.cfg}.items()))
        for suffix, arr, dt in (("x", c.x, "<i4"), ("x2", c.x2, "<i4"), ("lut", c.lut, "<i4"),
                                ("gamma", c.gamma, "<i4"), ("beta", c.beta, "<i8"), ("expect", c.expect, "<i4")):
            if arr is not None:
                np.ascontiguousarray(np.asarray(arr), dtype=dt).tofile(f"{base}.{suffix}.bin")
    (vec / "units.txt").write_text("".join(f"{c.name}\n" for c in cases))
    exe = exe or compile_units(work / "nl_csim")
    proc = subprocess.run([str(exe), str(vec)], capture_output=True, text=True)
    res = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            res[parts[0]] = {k: int(v) for k, v in (p.split("=") for p in parts[1:])}
    return proc.returncode, res
