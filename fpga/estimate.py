"""Cycle, latency, utilisation and resource estimates for the systolic array (hls/systolic.cpp).

The cycle model is the schedule the HLS design runs (and its C-simulation counts, clock by clock):
for every output tile of ROWS x COLS outputs (folds = ceil(M/ROWS) * ceil(N/COLS) per GEMM),

    per K tile of kc <= KT columns:  kc + (ROWS - 1) + (COLS - 1)   stream K, plus the skewed fill/drain of the wavefront
    per output tile:                 ROWS                          shift the accumulators out through the requant lanes

Edge tiles (M or N not a multiple of the array) cost a full tile: that waste, the fill/drain and
the drain-out are why utilisation = MACs / (cycles * ROWS * COLS) is below 1. Operand loads are
double-buffered and assumed to overlap compute (the design's DATAFLOW), so memory bandwidth is not
modelled; `bytes_moved` per layer lets a user check that assumption against their board.

Used by `edgediff profile --device <fpga device>` (issue 7): estimate_layers() and estimate_onnx().
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput


@dataclass(frozen=True)
class FpgaDevice:
    """A board's budget: the array size we would place on it, clock, DSP and BRAM18K counts."""

    name: str
    rows: int
    cols: int
    clock_mhz: float
    dsp: int
    bram18k: int


DEVICES: dict[str, FpgaDevice] = {
    # public device tables (AMD/Xilinx product selection guides); array sizes are our choice
    "zcu104": FpgaDevice("zcu104", 16, 16, 200.0, 1728, 624),  # Zynq UltraScale+ XCZU7EV
    "kv260": FpgaDevice("kv260", 16, 16, 200.0, 1248, 288),  # Kria K26 (XCK26)
    "zcu102": FpgaDevice("zcu102", 32, 32, 200.0, 2520, 1824),  # XCZU9EG
    "pynq-z2": FpgaDevice("pynq-z2", 8, 8, 100.0, 220, 280),  # Zynq-7020
    "u250": FpgaDevice("u250", 64, 64, 250.0, 12288, 5376),  # Alveo U250
}


def device(name: str) -> FpgaDevice:
    """An FPGA device by name (`edgediff profile --device NAME`)."""
    key = name.lower()
    if key not in DEVICES:
        raise BadInput(f"--device {name!r}: unknown FPGA device; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def is_fpga_device(name: str | None) -> bool:
    return bool(name) and str(name).lower() in DEVICES


def gemm_cycles(m: int, k: int, n: int, reps: int = 1, rows: int = 16, cols: int = 16, k_tile: int = 512) -> int:
    """Clock cycles of `reps` (M x K) @ (K x N) GEMMs on the array (the C-sim counts exactly this)."""
    if min(m, k, n, reps) <= 0:
        return 0
    folds = math.ceil(m / rows) * math.ceil(n / cols)
    full, rest = divmod(k, k_tile)
    per_tile = full * (k_tile + rows + cols - 2) + (rest + rows + cols - 2 if rest else 0) + rows
    return reps * folds * per_tile


def resources(rows: int = 16, cols: int = 16, k_tile: int = 512, requant: str = "ort") -> dict[str, Any]:
    """DSP and BRAM18K estimates of the design.

    DSP: one DSP48 per PE (a 9x9-bit signed multiply-accumulate into 32 bits fits one DSP48E2),
    plus the requantization lanes (one per column): a float32 multiply is about 3 DSPs ("ort"),
    a 32x32-bit fixed-point multiply about 4 ("tflite"). BRAM: the A buffer (ROWS banks of KT
    9-bit words) and the B buffer (COLS banks), double-buffered; a BRAM18K holds 2048 x 9 bits.
    """
    per_lane = 3 if requant == "ort" else 4
    dsp = rows * cols + cols * per_lane
    banks = 2 * (rows + cols)
    bram = banks * math.ceil(k_tile * 9 / (2048 * 9))
    return {"rows": rows, "cols": cols, "k_tile": k_tile, "dsp": dsp, "bram18k": bram, "pe": rows * cols,
            "requant_lanes": cols}


def estimate_layers(layers: list[dict[str, Any]], rows: int = 16, cols: int = 16, clock_mhz: float = 200.0,
                    k_tile: int = 512) -> list[dict[str, Any]]:
    """Per-layer estimates. Each input dict has `name`, `op` and, for layers on the array, the GEMM
    view `m`, `k`, `n`, `reps` (as in fpga_project.json / layers.json); others pass through as host-side.

    Output dicts: name, op, on_array, macs, cycles, latency_us, utilisation, folds, fill_drain_cycles,
    edge_waste (share of PE slots in padded edge rows/columns), bytes_moved.
    """
    out = []
    for layer in layers:
        rec: dict[str, Any] = {"name": layer.get("name", "?"), "op": layer.get("op", "?")}
        if not all(key in layer for key in ("m", "k", "n")):
            rec.update(on_array=False, macs=int(layer.get("macs", 0)), cycles=0, latency_us=0.0, utilisation=None)
            out.append(rec)
            continue
        m, k, n, reps = int(layer["m"]), int(layer["k"]), int(layer["n"]), int(layer.get("reps", 1))
        cycles = gemm_cycles(m, k, n, reps, rows, cols, k_tile)
        macs = m * k * n * reps
        folds = math.ceil(m / rows) * math.ceil(n / cols) * reps
        k_tiles = math.ceil(k / k_tile)
        fill = folds * (k_tiles * (rows + cols - 2) + rows)
        padded = math.ceil(m / rows) * rows * math.ceil(n / cols) * cols
        rec.update(on_array=True, m=m, k=k, n=n, reps=reps, macs=macs, cycles=cycles,
                   latency_us=cycles / clock_mhz, utilisation=macs / (cycles * rows * cols) if cycles else 0.0,
                   folds=folds, fill_drain_cycles=fill, edge_waste=1.0 - (m * n) / padded,
                   bytes_moved=reps * (m * k * math.ceil(n / cols) + k * n * math.ceil(m / rows) + 4 * m * n))
        out.append(rec)
    return out


def summarize(rows_out: list[dict[str, Any]], rows: int, cols: int, clock_mhz: float, k_tile: int = 512) -> dict[str, Any]:
    """Totals over estimate_layers() output: cycles, latency, utilisation, MACs share on the array."""
    on = [r for r in rows_out if r["on_array"]]
    cycles = sum(r["cycles"] for r in on)
    macs_arr = sum(r["macs"] for r in on)
    macs_all = macs_arr + sum(r["macs"] for r in rows_out if not r["on_array"])
    return {"rows": rows, "cols": cols, "clock_mhz": clock_mhz, "total_cycles": cycles,
            "latency_ms": cycles / clock_mhz / 1000.0, "array_macs": macs_arr,
            "array_macs_share": macs_arr / macs_all if macs_all else 0.0,
            "utilisation": macs_arr / (cycles * rows * cols) if cycles else 0.0,
            "resources": resources(rows, cols, k_tile)}


def estimate_onnx(path: Path | str, rows: int = 16, cols: int = 16, clock_mhz: float = 200.0, k_tile: int = 512,
                  device: str | None = None) -> dict[str, Any]:
    """Estimates for a QDQ-quantized ONNX model or an exported FPGA project directory.

    Returns {"device", "rows", "cols", "clock_mhz", "layers": [...], "total_cycles", "latency_ms",
    "utilisation", "array_macs_share", "resources", "fits"}; `device` overrides rows/cols/clock.
    """
    dev = None
    if device:
        dev = globals()["device"](device) if isinstance(device, str) else device
        rows, cols, clock_mhz = dev.rows, dev.cols, dev.clock_mhz
    p = Path(path)
    if p.is_dir():
        import json

        marker = p / "fpga_project.json"
        if not marker.is_file():
            raise BadInput(f"{p}: not an FPGA project (no fpga_project.json)")
        report = json.loads(marker.read_text())
        layers = report.get("layers", []) + report.get("host_ops", [])
    else:
        from edgediff.fpga.project import extract_onnx

        ext = extract_onnx(p, with_vectors=False)
        layers = ext.layer_dicts() + ext.host_ops
    est = estimate_layers(layers, rows, cols, clock_mhz, k_tile)
    summary = summarize(est, rows, cols, clock_mhz, k_tile)
    fits = None
    if dev is not None:
        res = summary["resources"]
        fits = res["dsp"] <= dev.dsp and res["bram18k"] <= dev.bram18k
    return {"device": asdict(dev) if dev else None, **summary, "fits": fits, "layers": est}
