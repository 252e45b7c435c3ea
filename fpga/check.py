"""C-simulation check: per-layer comparison of the C-sim with the simulator (and ONNX Runtime), the cycle model
against the stages' counted clocks, and the project report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.fpga import csim, estimate, sim
from edgediff.fpga.graph import Extracted, ExtractedLayer
from edgediff.fpga.writer import copy_sources, vitis_hls_status, write_scripts, write_vectors

from edgediff.artifact import atomic_dir
from edgediff.errors import BadInput

ROUNDING_DEFAULT: sim.Rounding = "ort"


def ort_check(e: ExtractedLayer, expect: np.ndarray, rounding: sim.Rounding) -> dict[str, Any]:
    """The same layer in ONNX Runtime's integer kernels, compared with the simulator (ORT convention only)."""
    from edgediff.fpga.ortref import run_layer

    if rounding != "ort":
        return {"ort_bit_exact": None, "ort_note": f"rounding {rounding!r} is not ONNX Runtime's"}
    layer = e.layer
    try:
        ref = run_layer(layer, e.x, e.x2)
    except Exception as exc:  # noqa: BLE001 - a runtime that rejects a layer is reported, not fatal
        return {"ort_bit_exact": None, "ort_note": f"onnxruntime could not run the layer: {type(exc).__name__}: {exc}"[:200]}
    integer_op = layer.out_scale is None
    sat = sim.ort_pair_saturates(layer, integer_op=integer_op)
    ours = layer.run(e.x, e.x2, "ort", pair_saturate=sat) if sat else expect
    mism = int((np.asarray(ours) != ref).sum())
    rec: dict[str, Any] = {"ort_bit_exact": mism == 0, "ort_mismatches": mism,
                           "ort_accumulation": "int16 pairs, saturating (MLAS u8s8 on AVX2)" if sat else "exact int32"}
    if sat:
        rec["array_vs_ort_differing"] = int((np.asarray(expect) != ref).sum())
    return rec


_STAGE_KEYS = ("cycles", "load", "compute", "drain", "params", "words_read", "words_written")
_MODEL_KEY = {"cycles": "pipeline_cycles", "load": "load_cycles", "compute": "compute_cycles", "drain": "drain_cycles",
              "params": "param_cycles", "words_read": "words_read", "words_written": "words_written"}


def export_project(ext: Extracted, out: Path, force: bool = False, rounding: sim.Rounding = ROUNDING_DEFAULT,
                   rows: int = 16, cols: int = 16, k_tile: int = 512, clock_mhz: float = 200.0,
                   part: str = "xczu7ev-ffvc1156-2-e", compare_ort: bool = True, progress: Any = None,
                   board: str = "zcu104", call: Any = None) -> dict[str, Any]:
    """Write the HLS project for `ext` at `out` (atomically), run the C-simulation, return the report.

    `board` names the DRAM bandwidth of the memory floor (estimate.DEVICES); rows/cols/clock stay as given.
    `call`: (Program, sample codes, temb codes) of the whole denoiser call (fpga/program.py): the program is
    saved under call/ (what `verify` runs) and one image's call runs in the C-simulation against the simulator.
    """
    if rounding not in sim.ROUNDINGS:
        raise BadInput(f"rounding {rounding!r}: expected one of {', '.join(sim.ROUNDINGS)}")
    for v, flag in ((rows, "rows"), (cols, "cols"), (k_tile, "k_tile")):
        if int(v) <= 0:
            raise BadInput(f"{flag} must be positive, got {v}")
    if int(cols) % estimate.VEC or int(k_tile) % estimate.VEC:
        raise BadInput(f"cols ({cols}) and k_tile ({k_tile}) must be multiples of {estimate.VEC}: the array's words "
                       "hold 16 int8 values")
    dram_gbs = estimate.device(board).dram_gbs
    array = csim.ArrayConfig(int(rows), int(cols), int(k_tile))
    ok, why = csim.toolchain()
    t0 = time.perf_counter()
    with atomic_dir(Path(out), force=force) as tmp:
        hdir = tmp / "hls"
        copy_sources(hdir)
        recs = write_vectors(ext, tmp / "vectors", rounding, progress)
        write_scripts(tmp, array, part, clock_mhz)
        layer_dicts = ext.layer_dicts()
        (tmp / "layers.json").write_text(json.dumps({"layers": layer_dicts, "host_ops": ext.host_ops}, indent=1) + "\n")
        est = estimate.estimate_layers(layer_dicts + ext.host_ops, array.rows, array.cols, clock_mhz, array.k_tile,
                                       dram_gbs)
        summary = estimate.summarize(est, array.rows, array.cols, clock_mhz, array.k_tile, dram_gbs,
                                     "ort" if rounding == "ort" else "tflite")
        csim_results: dict[str, dict[str, int]] = {}
        status, csim_s = None, None
        if ok:
            (tmp / "build").mkdir()
            exe = csim.compile_csim(hdir, tmp / "build" / "csim", array)
            t1 = time.perf_counter()
            status, csim_results = csim.run_csim(exe, tmp / "vectors")
            csim_s = time.perf_counter() - t1
        layers_out = []
        for e, rec, d, es in zip(ext.layers, recs, layer_dicts, est):
            r = csim_results.get(rec["stem"])
            row: dict[str, Any] = {**d, "stem": rec["stem"], "outputs": int(np.asarray(rec["expect"]).size),
                                   "bit_exact": (r["mismatches"] == 0 and r["total"] == np.asarray(rec["expect"]).size)
                                   if r else None, "mismatches": r["mismatches"] if r else None,
                                   "csim_cycles": r["cycles"] if r else None,
                                   "csim_stages": {k: r[k] for k in _STAGE_KEYS} if r else None,
                                   "est_pipeline_cycles": es["pipeline_cycles"], "est_cycles": es["cycles"],
                                   "dram_floor_cycles": es["dram_floor_cycles"], "bound": es["bound"],
                                   "load_cycles": es["load_cycles"], "compute_cycles": es["compute_cycles"],
                                   "drain_cycles": es["drain_cycles"], "param_cycles": es["param_cycles"],
                                   "bytes_moved": es["bytes_moved"], "utilisation": es["utilisation"],
                                   "latency_us": es["latency_us"]}
            # the C-simulation's counted clocks per stage against the closed-form model
            row["cycle_model_exact"] = (r is not None and all(r[k] == es[_MODEL_KEY[k]] for k in _STAGE_KEYS)) if r else None
            if compare_ort:
                row.update(ort_check(e, rec["expect"], rounding))
            layers_out.append(row)
        host_macs = sum(h["macs"] for h in ext.host_ops)
        total_macs = summary["array_macs"] + host_macs
        for h in ext.host_ops:
            h["macs_share"] = h["macs"] / total_macs if total_macs else 0.0
        all_exact = bool(layers_out) and all(r["bit_exact"] for r in layers_out)
        if not ok:
            verified, reason, code = False, f"C-simulation not run: {why}", 3
        elif not all_exact:
            bad = [r["name"] for r in layers_out if not r["bit_exact"]]
            verified, reason, code = False, f"C-simulation differs from the simulator on {len(bad)} layer(s): {bad[:3]}", 4
        else:
            verified, reason, code = True, None, 0
        report: dict[str, Any] = {
            "target": "fpga", "precision": "int8", "source": ext.source, "format": "hls-project", "rounding": rounding,
            "array": {"rows": array.rows, "cols": array.cols, "k_tile": array.k_tile, "dataflow": "output-stationary",
                      "clock_mhz": clock_mhz, "part": part},
            "verified": verified, "verification": "g++ C-simulation of the HLS design vs fpga/sim.py, every output, bit "
            "for bit (rung 1); synthesis/co-simulation need Vitis HLS: run_hls.sh runs run_hls.tcl where vitis_hls is "
            "on PATH (exit 3 otherwise)",
            "exit_code": code, "layers_total": len(layers_out),
            "layers_bit_exact": sum(1 for r in layers_out if r["bit_exact"]),
            "ort_layers_bit_exact": sum(1 for r in layers_out if r.get("ort_bit_exact")),
            "ort_layers_compared": sum(1 for r in layers_out if r.get("ort_bit_exact") is not None),
            "csim_seconds": csim_s, "csim_status": status, "csim_cycles": sum(r["csim_cycles"] or 0 for r in layers_out),
            "cycle_model_layers_exact": sum(1 for r in layers_out if r["cycle_model_exact"]), "board": board,
            "latency_note": "estimates from the cycle model (see estimate.assumptions), not measurements",
            "vitis_hls": vitis_hls_status()[1],
            "estimate": {k: v for k, v in summary.items()}, "array_macs": summary["array_macs"], "host_macs": host_macs,
            "array_macs_share": summary["array_macs"] / total_macs if total_macs else 0.0,
            "layers": layers_out, "host_ops": ext.host_ops,
        }
        if call is not None:
            report["whole_call"] = _whole_call(call, tmp / "call", ok, why, array, clock_mhz, dram_gbs)
            if report["whole_call"].get("bit_exact") is False and verified:
                report.update(verified=False, exit_code=4)
                reason = "the whole-call C-simulation differs from the simulator"
        if reason:
            report["reason"] = reason
        report["export_seconds"] = time.perf_counter() - t0
        (tmp / "fpga_project.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        report["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return report


def _whole_call(call: Any, folder: Path, ok: bool, why: str, array: csim.ArrayConfig, clock_mhz: float,
                dram_gbs: float) -> dict[str, Any]:
    """Save the whole-call program and run one image's call in the C-simulation (every buffer compared)."""
    from edgediff.fpga import callsim
    from edgediff.fpga.program import save_program

    if isinstance(call, str):  # the program does not cover this model: say why
        return {"program": None, "bit_exact": None, "reason": call}
    from edgediff.fpga.program import call_estimate

    prog, s_codes, e_codes = call
    save_program(prog, folder)
    est = call_estimate(prog, array.rows, array.cols, clock_mhz, array.k_tile, dram_gbs)
    est.pop("layers")
    rec: dict[str, Any] = {**prog.summary(), "program": "call/program.json", "calibrated_int16": len(prog.calibrated),
                           "estimate": est}
    if not ok:
        rec.update(bit_exact=None, reason=f"C-simulation not run: {why}")
        return rec
    r = callsim.csim_call(prog, folder / "csim", s_codes[:1], e_codes[:1],
                          exe=callsim.compile_call(folder / "csim" / "call_tb", array))
    r.pop("output")
    # the C-simulation's counted array clocks against the model's (the units are modelled, not counted)
    r["array_cycles_model_exact"] = r["array_cycles"] == est["array_pipeline_cycles"]
    shutil.rmtree(folder / "csim" / "buffers", ignore_errors=True)  # every intermediate of the call: not kept
    rec.update(r)
    return rec
