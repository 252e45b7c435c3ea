"""Drive the HLS design's C-simulation: write test vectors, compile with g++, run, parse the results.

The testbench (hls/tb.cpp) reads each layer's configuration and integer operands from files,
runs the systolic array, and compares every output with what fpga/sim.py computed. This module
writes those files from QLayer objects and turns the testbench's output into a dict per layer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from edgediff.fpga import sim
from edgediff.fpga.sim import QLayer

from edgediff.errors import Unavailable

HLS_SOURCES = ("systolic.h", "systolic.cpp", "top.cpp", "tb.cpp", "host.h", "nonlinear.h", "nonlinear.cpp")
REQUANT_CODES = {None: 0, "ort": 1, "tflite": 2, "tflite_single": 3}
KIND_CODES = {"conv": 0, "gemm": 1, "matmul": 2}


@dataclass(frozen=True)
class ArrayConfig:
    """Compile-time parameters of the array: ROWS x COLS PEs, K tile (on-chip operand depth)."""

    rows: int = 16
    cols: int = 16
    k_tile: int = 512

    def defines(self) -> list[str]:
        return [f"-DROWS={self.rows}", f"-DCOLS={self.cols}", f"-DKT={self.k_tile}"]


def hls_dir() -> Path:
    return Path(str(resources.files("edgediff.fpga") / "hls"))


def ap_types_dir() -> Path | None:
    """The ap_int/hls_stream headers hls4ml ships (Xilinx's open-source ap_types)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("hls4ml")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        cand = Path(root) / "templates" / "vivado" / "ap_types"
        if (cand / "ap_int.h").is_file():
            return cand
    return None


def toolchain() -> tuple[bool, str]:
    """Can this machine build the C-simulation? (g++ and the ap_types headers)."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return False, "no C++ compiler: install g++ (or set CXX)"
    if ap_types_dir() is None:
        return False, "the ap_int/hls_stream headers are missing: pip install 'edgediff[fpga]' (hls4ml ships them)"
    return True, ""


def compile_csim(src_dir: Path, out_exe: Path, array: ArrayConfig = ArrayConfig()) -> Path:
    """g++ -O2 the testbench + array into `out_exe` (reused when sources and parameters are unchanged)."""
    ok, why = toolchain()
    if not ok:
        raise Unavailable(f"FPGA C-simulation: {why}")
    inc = ap_types_dir()
    assert inc is not None
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-O2", "-std=c++14", "-w", *array.defines(), f"-I{src_dir}", f"-I{inc}",
           str(src_dir / "systolic.cpp"), str(src_dir / "top.cpp"), str(src_dir / "nonlinear.cpp"),
           str(src_dir / "tb.cpp"), "-o", str(out_exe)]
    # the key leaves paths out (every project has its own copy of the sources): compiler, flags, source bytes
    key = " ".join([cxx, *cmd[2:5], *array.defines(), str(inc)]).encode()
    stamp = hashlib.sha256(key + b"".join((src_dir / f).read_bytes() for f in HLS_SOURCES)).hexdigest()
    stamp_file = out_exe.with_suffix(".stamp")
    if out_exe.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return out_exe
    # a per-user cache keyed by sources + flags: the same design is not recompiled for every export
    cached = _cache_dir() / stamp[:24] / "csim"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        cached = out_exe.with_name(out_exe.name + ".build")  # no writable cache: build beside the output
    if not cached.is_file():
        tmp = cached.with_name(f"csim.tmp{os.getpid()}")
        proc = subprocess.run([*cmd[:-1], str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed on the HLS sources:\n{proc.stderr[-4000:]}")
        os.replace(tmp, cached)
    shutil.copy2(cached, out_exe)
    stamp_file.write_text(stamp)
    return out_exe


def _cache_dir() -> Path:
    root = os.environ.get("EDGEDIFF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "edgediff")
    return Path(root) / "fpga-csim"


def _i32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype="<i4")


def layer_config(layer: QLayer, x_shape: tuple[int, ...], x2_shape: tuple[int, ...] | None,
                 rounding: sim.Rounding | None) -> dict[str, int]:
    """The testbench's LayerCfg for one layer (keys match the C struct's fields)."""
    m, k, n, reps = layer.gemm_dims(x_shape, x2_shape)
    cfg = {"kind": KIND_CODES[layer.kind], "M": m, "K": k, "N": n, "reps": reps, "zp_a": layer.zp_x,
           "zp_b": layer.zp_w if layer.kind == "matmul" else 0, "has_bias": int(layer.bias is not None),
           "requant": REQUANT_CODES[rounding if layer.out_scale is not None else None], "out_zp": layer.out_zp,
           "a_signed": int(layer.x_signed),
           "b_signed": int(bool(layer.x2_signed if layer.x2_signed is not None else layer.x_signed)
                           if layer.kind == "matmul" else 1)}
    lo, hi = sim.qrange(layer.out_bits, layer.out_signed)
    cfg.update(qmin=lo, qmax=hi, per_channel=int(np.asarray(layer.s_w).size > 1))
    if layer.kind == "conv":
        assert layer.w is not None
        nn_, c, h, w = x_shape
        o, _, kh, kw = layer.w.shape
        g = layer.geom
        ho, wo = g.out_hw(h, w, kh, kw)
        cfg.update(n=nn_, c=c, h=h, w=w, o=o, kh=kh, kw=kw, sh=g.stride[0], sw=g.stride[1], pt=g.pads[0], pl=g.pads[1],
                   pb=g.pads[2], pr=g.pads[3], dh=g.dilation[0], dw=g.dilation[1], groups=g.groups, ho=ho, wo=wo)
    return cfg


def write_layer_vectors(folder: Path, stem: str, layer: QLayer, x: np.ndarray, x2: np.ndarray | None,
                        expect: np.ndarray, rounding: sim.Rounding) -> None:
    """STEM.cfg and STEM.*.bin for one layer; `expect` is the simulator's output for these inputs."""
    x = np.asarray(x)
    if layer.kind == "matmul":
        assert x2 is not None
        batch = np.broadcast_shapes(x.shape[:-2], np.shape(x2)[:-2])
        x = np.broadcast_to(x, batch + x.shape[-2:])
        x2 = np.broadcast_to(np.asarray(x2), batch + np.shape(x2)[-2:])
        b = x2
    elif layer.kind == "gemm":
        x = x.reshape(-1, x.shape[-1])
        b = layer.w
    else:
        assert layer.w is not None
        b = layer.w.reshape(layer.w.shape[0], -1)
    cfg = layer_config(layer, x.shape, None if x2 is None else x2.shape, rounding)
    (folder / f"{stem}.cfg").write_text("".join(f"{k} {int(v)}\n" for k, v in cfg.items()))
    _i32(x).tofile(folder / f"{stem}.x.bin")
    _i32(b).tofile(folder / f"{stem}.b.bin")
    _i32(expect).tofile(folder / f"{stem}.expect.bin")
    if layer.bias is not None:
        _i32(layer.bias).tofile(folder / f"{stem}.bias.bin")
    if layer.out_scale is not None:
        if rounding == "ort":
            mult = np.atleast_1d(sim.ort_multiplier(layer.s_x, layer.s_w, layer.out_scale)).astype("<f4")
            mult.tofile(folder / f"{stem}.multf.bin")
        else:
            q, shift = sim.tflite_multipliers(layer.s_x, layer.s_w, layer.out_scale)
            _i32(q).tofile(folder / f"{stem}.multq.bin")
            _i32(shift).tofile(folder / f"{stem}.shift.bin")


_LINE = re.compile(r"^(\S+) mismatches=(\d+) total=(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(-?\d+)")


def run_csim(exe: Path, vec_dir: Path, timeout: float | None = None) -> tuple[int, dict[str, dict[str, int]]]:
    """Run the testbench; returns (exit status, {layer name: {mismatches, total, cycles, load, compute, drain,
    params, jobs, tiles, words_read, words_written}}): the stages' counted clocks (see hls/tb.cpp)."""
    proc = subprocess.run([str(exe), str(vec_dir)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 4:
        raise RuntimeError(f"C-simulation refused a layer: {proc.stderr.strip()}")
    if proc.returncode == 3:
        raise RuntimeError(f"C-simulation could not read its vectors: {proc.stderr.strip()}")
    results: dict[str, dict[str, int]] = {}
    for line in proc.stdout.splitlines():
        mt = _LINE.match(line.strip())
        if mt:
            rec = {"mismatches": int(mt.group(2)), "total": int(mt.group(3))}
            rec.update({k: int(v) for k, v in _FIELD.findall(mt.group(4))})
            results[mt.group(1)] = rec
    return proc.returncode, results


def csim_layers(work: Path, items: list[tuple[QLayer, np.ndarray, np.ndarray | None]], rounding: sim.Rounding = "ort",
                array: ArrayConfig = ArrayConfig(), exe: Path | None = None) -> tuple[int, dict[str, dict[str, int]]]:
    """Simulate `items` (layer, input, second input) with sim.py, run them through the C-sim, compare.

    Convenience for tests and the benchmark: vectors and the binary go under `work`.
    """
    work.mkdir(parents=True, exist_ok=True)
    vec = work / "vectors"
    vec.mkdir(exist_ok=True)
    lines = []
    for i, (layer, x, x2) in enumerate(items):
        stem = f"L{i:04d}"
        expect = layer.run(x, x2, rounding)
        write_layer_vectors(vec, stem, layer, x, x2, expect, rounding)
        lines.append(f"{stem} {layer.name}\n")
    (vec / "layers.txt").write_text("".join(lines))
    exe = exe or compile_csim(hls_dir(), work / "csim", array)
    return run_csim(exe, vec)


def read_outputs(vec_dir: Path, stem: str, shape: tuple[int, ...]) -> np.ndarray:
    """The outputs the C-simulation computed for layer STEM (tb.cpp writes STEM.y.bin), as int64 of `shape`."""
    return np.fromfile(Path(vec_dir) / f"{stem}.y.bin", "<i4").astype(np.int64).reshape(shape)
