"""Writer: the HLS project files (sources, per-layer test vectors, Vitis HLS scripts) and the synthesis runner."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgediff.fpga import csim, sim
from edgediff.fpga.graph import Extracted

from edgediff.errors import BadInput

TCL = """# Vitis HLS script written by edgediff (run_hls.sh runs it where vitis_hls is on PATH).
#   vitis_hls -f run_hls.tcl         C-simulation, synthesis, RTL co-simulation, IP export
# The C-simulation below is the one edgediff already ran with g++ (build/csim); co-simulation of every
# layer is slow: trim vectors/layers.txt to a few layers for cosim_design.
set here [file normalize [file dirname [info script]]]
set flags "-I$here/hls {defines}"
# one Vitis HLS project: the array and the nonlinear units with a testbench, csim -> csynth -> cosim -> IP
proc build {{name top tb argv}} {{
  global here flags
  open_project -reset $name
  set_top $top
  add_files $here/hls/systolic.cpp -cflags $flags
  add_files $here/hls/top.cpp -cflags $flags
  add_files $here/hls/nonlinear.cpp -cflags $flags
  add_files -tb $here/hls/$tb -cflags $flags
  open_solution -reset solution1 -flow_target vivado
  set_part {{{part}}}
  create_clock -period {period_ns} -name default
  csim_design -argv $argv
  csynth_design
  cosim_design -argv $argv
  export_design -format ip_catalog
}}
build edgediff_systolic systolic_top tb.cpp "$here/vectors"
# The whole-call top: the array and the nonlinear units behind one register file, driven op by op through a
# whole denoiser call (call/csim/program, written at export for an int8 UNet2DModel artifact).
if {{[file exists $here/call/csim/program/program.txt]}} {{
  file mkdir $here/call/csim/buffers
  build edgediff_call edgediff_top call_tb.cpp "$here/call/csim/program $here/call/csim/buffers"
}}
exit
"""


RUN_HLS_SH = """#!/bin/sh
# csim_design, csynth_design, cosim_design and export_design of this project (run_hls.tcl) with Vitis HLS.
# Exit 3 with the reason when vitis_hls is not on PATH.
if ! command -v vitis_hls >/dev/null 2>&1; then
  echo "vitis_hls is not on PATH: install AMD Vitis HLS and source its settings64.sh" >&2
  exit 3
fi
cd "$(dirname "$0")" && exec vitis_hls -f run_hls.tcl
"""


def vitis_hls_status() -> tuple[bool, str]:
    """(on PATH, a one-line status) for Vitis HLS, which synthesis and co-simulation need."""
    exe = shutil.which("vitis_hls")
    return (True, f"found: {exe}") if exe else (False, "vitis_hls is not on PATH: csynth/cosim not run")


def synthesize(project: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run run_hls.tcl (csim, csynth, cosim, export) in `project` with Vitis HLS.

    Raises Unavailable (exit 3) with the reason when vitis_hls is not on PATH, BadInput for a folder that
    is not an FPGA project. Returns {"returncode", "log_tail", "csynth_report"} (the report path if written).
    """
    import subprocess

    from edgediff.errors import Unavailable

    project = Path(project)
    if not (project / "run_hls.tcl").is_file():
        raise BadInput(f"{project}: not an FPGA project (no run_hls.tcl)")
    ok, why = vitis_hls_status()
    if not ok:
        raise Unavailable(why)
    proc = subprocess.run(["vitis_hls", "-f", "run_hls.tcl"], cwd=project, capture_output=True, text=True,
                          timeout=timeout)
    reports = sorted(project.glob("edgediff_systolic/solution1/syn/report/*csynth.rpt"))
    return {"returncode": proc.returncode, "log_tail": (proc.stdout + proc.stderr)[-4000:],
            "csynth_report": str(reports[0]) if reports else None}


def write_vectors(ext: Extracted, vec: Path, rounding: sim.Rounding, progress: Any = None) -> list[dict[str, Any]]:
    vec.mkdir(parents=True, exist_ok=True)
    recs = []
    lines = []
    for i, e in enumerate(ext.layers):
        stem = f"L{i:04d}"
        assert e.x is not None
        expect = e.layer.run(e.x, e.x2, rounding)
        csim.write_layer_vectors(vec, stem, e.layer, e.x, e.x2, expect, rounding)
        lines.append(f"{stem} {stem}\n")
        recs.append({"stem": stem, "expect": expect})
        if progress is not None:
            progress(i + 1, len(ext.layers))
    (vec / "layers.txt").write_text("".join(lines))
    return recs




def copy_sources(hdir: Path) -> None:
    """The design's sources into the project's hls/ folder."""
    from edgediff.fpga.nonlinear import NL_SOURCES

    hdir.mkdir(parents=True, exist_ok=True)
    for f in (*csim.HLS_SOURCES, *NL_SOURCES, "call_tb.cpp"):  # the array, the units beside it, the whole call
        shutil.copy2(csim.hls_dir() / f, hdir / f)


def write_scripts(root: Path, array: csim.ArrayConfig, part: str, clock_mhz: float) -> None:
    """run_hls.tcl (csim, csynth, cosim, export) and run_hls.sh (exit 3 without vitis_hls)."""
    (root / "run_hls.tcl").write_text(TCL.format(defines=" ".join(array.defines()), part=part,
                                                 period_ns=f"{1000.0 / clock_mhz:.3f}"))
    (root / "run_hls.sh").write_text(RUN_HLS_SH)
    (root / "run_hls.sh").chmod(0o755)
