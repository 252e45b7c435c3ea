"""A whole denoiser call in the C-simulation: the program of fpga/program.py run by hls/call_tb.cpp.

`write_call(prog, folder)` writes the program as the testbench reads it (program.txt, one cfg and the
constants per op); `csim_call(prog, folder, sample_codes, temb_codes)` runs one image through the C++ (the
array's systolic_top and the nonlinear units), reads back every buffer and compares each with the NumPy
simulator's (run_program), op by op. The array layers' counted clocks come back too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga import csim, sim
from edgediff.fpga.program import Program, run_program

from edgediff.errors import Unavailable

CALL_SOURCES = ("systolic.h", "systolic.cpp", "top.cpp", "host.h", "nonlinear.h", "nonlinear.cpp", "call_tb.cpp")
_OP = re.compile(r"^OP (\S+) cycles=(\d+) elements=(\d+)$")


def _i32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype="<i4")


def write_call(prog: Program, folder: Path) -> None:
    """program.txt plus STEM.cfg / STEM.*.bin per op (the constants the design holds or reads per layer)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, o in enumerate(prog.ops):
        stem = f"op{i:04d}"
        cfg = dict(o.cfg)
        if o.op == "array":
            lay = o.layer
            assert lay is not None
            cfg = csim.layer_config(lay, o.x_shape, o.x2_shape, "ort")
            if lay.kind != "matmul":
                assert lay.w is not None
                _i32(lay.w.reshape(lay.w.shape[0], -1) if lay.kind == "conv" else lay.w).tofile(folder / f"{stem}.b.bin")
            if lay.bias is not None:
                _i32(lay.bias).tofile(folder / f"{stem}.bias.bin")
            if lay.out_scale is not None:
                np.atleast_1d(sim.ort_multiplier(lay.s_x, lay.s_w, lay.out_scale)).astype("<f4").tofile(
                    folder / f"{stem}.multf.bin")
        for k, v in o.arrays.items():
            np.ascontiguousarray(v, dtype="<i8" if k == "beta" else "<i4").tofile(folder / f"{stem}.{k}.bin")
        (folder / f"{stem}.cfg").write_text("".join(f"{k} {int(v)}\n" for k, v in cfg.items()))
        lines.append(f"{o.op} {stem} {o.out} {prog.sizes[o.out]} {len(o.ins)} {' '.join(map(str, o.ins))}\n")
    (folder / "program.txt").write_text("".join(lines))


def compile_call(out_exe: Path, array: csim.ArrayConfig = csim.ArrayConfig()) -> Path:
    """g++ the array, the nonlinear units and the whole-call testbench (cached by sources and flags)."""
    ok, why = csim.toolchain()
    if not ok:
        raise Unavailable(f"FPGA whole-call C-simulation: {why}")
    inc = csim.ap_types_dir()
    src = csim.hls_dir()
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-O2", "-std=c++14", "-w", *array.defines(), f"-I{src}", f"-I{inc}",
           *(str(src / f) for f in CALL_SOURCES if f.endswith(".cpp"))]
    key = " ".join([cxx, *array.defines(), str(inc)]).encode()
    stamp = hashlib.sha256(key + b"".join((src / f).read_bytes() for f in CALL_SOURCES)).hexdigest()
    cached = csim._cache_dir() / stamp[:24] / "call_tb"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        cached = out_exe.with_name(out_exe.name + ".build")
    if not cached.is_file():
        tmp = cached.with_name(f"call_tb.tmp{os.getpid()}")
        proc = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"g++ failed on the whole-call testbench:\n{proc.stderr[-4000:]}")
        os.replace(tmp, cached)
    out_exe.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cached, out_exe)
    return out_exe


def csim_call(prog: Program, folder: Path, sample_codes: np.ndarray, temb_codes: np.ndarray,
              exe: Path | None = None, timeout: float | None = 600,
              feature_codes: np.ndarray | None = None) -> dict[str, Any]:
    """One image's call in C-simulation, every buffer compared with the NumPy simulator's.
    `feature_codes`: a DeepCache shallow program's cached feature (one more input buffer).

    Returns {bit_exact, buffers_compared, mismatching_ops (first few), array_cycles, csim_seconds, output}.
    """
    folder = Path(folder)
    prog_dir, out_dir = folder / "program", folder / "buffers"
    if not (prog_dir / "program.txt").is_file():
        write_call(prog, prog_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = np.asarray(sample_codes).reshape(1, -1)
    e = np.asarray(temb_codes).reshape(1, -1)
    _i32(s).tofile(prog_dir / "in_sample.bin")
    _i32(e).tofile(prog_dir / "in_temb.bin")
    lines = f"{prog.sample} in_sample.bin\n{prog.temb} in_temb.bin\n"
    f = None
    if feature_codes is not None:
        f = np.asarray(feature_codes).reshape(1, -1)
        _i32(f).tofile(prog_dir / "in_feature.bin")
        lines += f"{prog.feature} in_feature.bin\n"
    (prog_dir / "inputs.txt").write_text(lines)
    exe = exe or compile_call(folder / "call_tb")
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), str(prog_dir), str(out_dir)], capture_output=True, text=True, timeout=timeout)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"whole-call C-simulation failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    cycles: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        mt = _OP.match(line.strip())
        if mt:
            cycles[mt.group(1)] = int(mt.group(2))
    want = run_program(prog, s, e, keep=True, feature_codes=f)
    bad = []
    for i, o in enumerate(prog.ops):
        got = np.fromfile(out_dir / f"{o.out}.bin", "<i4").astype(np.int64)
        ref = want[o.out].reshape(-1)
        if got.shape != ref.shape or not np.array_equal(got, ref):
            bad.append({"op": i, "kind": o.op, "name": o.name,
                        "mismatches": int((got != ref).sum()) if got.shape == ref.shape else -1})
    out = np.fromfile(out_dir / f"{prog.output}.bin", "<i4").astype(np.int64)
    array_ops = [f"op{i:04d}" for i, o in enumerate(prog.ops) if o.op == "array"]
    return {"bit_exact": not bad, "buffers_compared": len(prog.ops), "mismatching_ops": bad[:5],
            "mismatching_total": len(bad), "array_cycles": sum(cycles.get(k, 0) for k in array_ops),
            "csim_seconds": round(secs, 3), "output": out.reshape(1, *prog.output_shape)}
