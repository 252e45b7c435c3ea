"""Cycle, latency, utilisation and resource estimates for the systolic array (hls/systolic.cpp).

Every figure here is an **estimate** from a model of the HLS schedule, not a board measurement.
The model is the schedule the design's DATAFLOW stages run; their C-simulation counts each
stage's clocks and `tests/test_fpga_hls.py` checks that this module reproduces those counts.

A layer is `reps` GEMMs (images x groups, or heads) of M x K x N. The array computes output tiles
of ROWS x COLS; each output tile is a sequence of jobs, one per K tile of up to KT/16 words
(16 int8 operands per 128-bit word; a conv row of A is taps x ceil(C_group/16) words); K is split into
ceil(K_words / (KT/16)) tiles of balanced length, so no short remainder tile breaks the overlap.

    load     per job:          max(ROWS, COLS) * kcw + LOAD_LAT     one word per clock from each of two ports
    compute  per job:          16 * kcw + ROWS + COLS - 2           the wavefront's fill and drain per K tile
    drain    per output tile:  ROWS * words_per_row + DRAIN_LAT      int8 out: COLS/16 words/row, int32: COLS/4
    params   per layer:        groups * N_tiles * COLS + PARAM_LAT  bias/multipliers copied on chip (not overlapped)

The three stages overlap under DATAFLOW with ping-pong buffers (a two-job operand FIFO, one shadow
accumulator bank); `pipeline_cycles` is the recurrence both this module and the testbench evaluate.
Memory: each layer also moves `bytes_moved` (operand words actually read, outputs written,
parameters); at a board's DRAM bandwidth that is a floor, and a layer's estimate is
max(pipeline, DRAM floor). Assumptions (ASSUMPTIONS): II=1 everywhere, LOAD_LAT/DRAIN_LAT/PARAM_LAT
fixed latencies, one 128-bit beat per port per clock whatever the address pattern, DRAM at its
nominal peak; host-side ops (GroupNorm, SiLU, softmax, elementwise...) are not in the figure.

Used by `edgediff profile --device <fpga device>`: estimate_layers() and estimate_onnx().
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgediff.fpga.graph import VEC

from edgediff.errors import BadInput

LOAD_LAT, DRAIN_LAT, PARAM_LAT = 64, 16, 64  # must match hls/systolic.h
DEFAULT_DRAM_GBS = 19.2  # ZCU104's PS DDR4 (64-bit, 2400 MT/s), the default board
ASSUMPTIONS = ("estimate from the cycle model of the HLS schedule (C-simulation counts the same clocks), not a board "
               f"measurement: II=1 loops, one 128-bit word per AXI port per clock, fixed latencies load {LOAD_LAT} / "
               f"drain {DRAIN_LAT} / parameters {PARAM_LAT} clocks, load/compute/drain overlapped under DATAFLOW with "
               "ping-pong buffers, DRAM floor at the board's nominal peak bandwidth, timing closure at the clock "
               "assumed; host-side ops not included")


@dataclass(frozen=True)
class FpgaDevice:
    """A board's budget: the array size we would place on it, clock, DSP/BRAM18K/LUT counts, DRAM bandwidth."""

    name: str
    rows: int
    cols: int
    clock_mhz: float
    dsp: int
    bram18k: int
    lut: int = 0
    dram_gbs: float = DEFAULT_DRAM_GBS


DEVICES: dict[str, FpgaDevice] = {
    # public device tables (AMD/Xilinx product selection guides, board user guides: DRAM width x transfer rate);
    # array sizes are our choice (COLS is a multiple of 16: one output word per accumulator row)
    "zcu104": FpgaDevice("zcu104", 16, 16, 200.0, 1728, 624, 230400, 19.2),  # XCZU7EV, PS DDR4 64-bit 2400
    "kv260": FpgaDevice("kv260", 16, 16, 200.0, 1248, 288, 117120, 19.2),  # Kria K26, DDR4 64-bit 2400
    "zcu102": FpgaDevice("zcu102", 32, 32, 200.0, 2520, 1824, 274080, 21.3),  # XCZU9EG, PS DDR4 64-bit 2666
    "pynq-z2": FpgaDevice("pynq-z2", 8, 16, 100.0, 220, 280, 53200, 4.2),  # Zynq-7020, DDR3 16-bit 1050
    "u250": FpgaDevice("u250", 64, 64, 250.0, 12288, 5376, 1728000, 77.0),  # Alveo U250, 4 x DDR4 64-bit 2400
}


def device(name: str) -> FpgaDevice:
    """An FPGA device by name (`edgediff profile --device NAME`)."""
    key = name.lower()
    if key not in DEVICES:
        raise BadInput(f"--device {name!r}: unknown FPGA device; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def is_fpga_device(name: str | None) -> bool:
    return bool(name) and str(name).lower() in DEVICES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pipeline_cycles(load: list[int], compute: list[int], drain: int, tiles: int) -> int:
    """End of the DATAFLOW pipeline over `tiles` identical output tiles (jobs: one per K tile).

    The recurrence of hls/systolic.cpp's pipeline_cycles: load of job j waits for compute to release
    job j-2's operand bank; compute waits for its operands and its previous job; the accumulator swap
    after a tile's last job waits for the drain of the previous tile. It is max-plus linear, so once
    the state advances by the same amount over a tile it does so for every later tile.
    """
    e_l1 = e_c1 = e_c2 = e_d = 0
    prev: tuple[int, ...] | None = None
    for t in range(tiles):
        before = (e_l1, e_c1, e_c2, e_d)
        for lj, cj in zip(load, compute):
            e_l = max(e_l1, e_c2) + lj
            e_c = max(e_l, e_c1) + cj
            e_l1, e_c2, e_c1 = e_l, e_c1, e_c
        e_c1 = max(e_c1, e_d)  # the accumulator swap
        e_d = e_c1 + drain
        step = tuple(x - y for x, y in zip((e_l1, e_c1, e_c2, e_d), before))
        if t >= 1 and prev == step and len(set(step)) == 1:
            return e_d + step[0] * (tiles - 1 - t)
        prev = step
    return e_d


def _valid_taps(out: int, size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Sum over kernel taps of the output positions whose input tap lies inside the feature map."""
    return sum(1 for ki in range(k) for o in range(out) if 0 <= o * stride - pad + ki * dil < size)


def layer_schedule(m: int, n: int, reps: int, k_words: int, rows: int = 16, cols: int = 16, k_tile: int = 512,
                   groups: int = 1, requant: bool = True, conv: dict[str, int] | None = None) -> dict[str, int]:
    """Per-stage clocks and words moved of one layer on the array (what the C-simulation counts).

    `k_words`: words per GEMM row (conv: kh*kw*ceil(C_group/16), else ceil(K/16)); `groups`: the conv's
    groups (reps = images x groups); `conv`: geometry h, w, ho, wo, kh, kw, sh, sw, pt, pl, dh, dw for the
    exact count of words read (padding taps read nothing); without it A is counted as a dense GEMM operand.
    """
    if cols % VEC or k_tile % VEC:
        raise BadInput(f"cols ({cols}) and k_tile ({k_tile}) must be multiples of {VEC} (one 128-bit word = 16 int8)")
    ktw = k_tile // VEC
    mt, nt, kt = _cdiv(m, rows), _cdiv(n, cols), _cdiv(k_words, ktw)
    khi = _cdiv(k_words, kt)  # balanced K tiles: the first n_hi of khi words, the rest khi - 1
    n_hi = k_words - (khi - 1) * kt
    kcws = [khi if i < n_hi else khi - 1 for i in range(kt)]
    load = [max(rows, cols) * w + LOAD_LAT for w in kcws]
    comp = [VEC * w + rows + cols - 2 for w in kcws]
    wpr = cols // VEC if requant else cols // 4
    drain = rows * wpr + DRAIN_LAT
    tiles = reps * mt * nt
    params = groups * nt * cols + PARAM_LAT
    if conv is not None:
        cgw = k_words // (conv["kh"] * conv["kw"])
        a_words = reps * nt * cgw * (_valid_taps(conv["ho"], conv["h"], conv["kh"], conv["sh"], conv["pt"], conv["dh"])
                                     * _valid_taps(conv["wo"], conv["w"], conv["kw"], conv["sw"], conv["pl"], conv["dw"]))
    else:
        a_words = reps * nt * m * k_words
    nw = _cdiv(n, VEC) if requant else _cdiv(n, 4)
    words_read = a_words + reps * mt * n * k_words + groups * nt * cols
    words_written = reps * m * nw
    return {"pipeline_cycles": params + pipeline_cycles(load, comp, drain, tiles), "load": sum(load) * tiles,
            "compute": sum(comp) * tiles, "drain": drain * tiles, "params": params, "jobs": tiles * kt, "tiles": tiles,
            "words_read": words_read, "words_written": words_written}


def _k_words(layer: dict[str, Any]) -> int:
    if "k_words" in layer:
        return int(layer["k_words"])
    return _cdiv(int(layer["k"]), VEC)


def gemm_cycles(m: int, k: int, n: int, reps: int = 1, rows: int = 16, cols: int = 16, k_tile: int = 512,
                clock_mhz: float = 200.0, dram_gbs: float = DEFAULT_DRAM_GBS) -> int:
    """Estimated clocks of `reps` dense (M x K) @ (K x N) GEMMs with int8 outputs: the pipeline or the DRAM floor."""
    if min(m, k, n, reps) <= 0:
        return 0
    est = estimate_layers([{"name": "gemm", "op": "gemm", "m": m, "k": k, "n": n, "reps": reps}], rows, cols,
                          clock_mhz, k_tile, dram_gbs=dram_gbs)
    return int(est[0]["cycles"])


# rule-of-thumb coefficients for the resource estimate (per UltraScale+ DSP48E2 / LUT6); not csynth figures
_DSP_PER_REQUANT_LANE = {"ort": 3, "tflite": 4}  # float32 multiply / 32x32-bit fixed-point multiply
_ADDR_MULTIPLIES = 9  # runtime multiplies in the address generators (im2col 6, B 1, output 2), ~3 DSP each
_LUT_PER_PE, _LUT_PER_LANE, _LUT_PER_AXI, _LUT_CONTROL = 60, 450, 1800, 3000
_BRAM18K_BITS, _BRAM18K_WIDTH = 18432, 36


def resources(rows: int = 16, cols: int = 16, k_tile: int = 512, requant: str = "ort",
              param_tiles: int = 256) -> dict[str, Any]:
    """DSP, BRAM18K, LUT and FF estimates derived from the HLS code's arrays and unroll factors.

    DSP: the ROWS x COLS unrolled PEs, one 9x9-bit multiply-accumulate each (one DSP48E2); COLS unrolled
    requantization lanes; the address generators' runtime multiplies. BRAM18K: the ROWS + COLS operand
    FIFOs (2 x KT/16 words of 128 bits: width-bound, ceil(128/36) blocks per 512-deep slice), the four
    parameter banks (partitioned by COLS: 4 x COLS banks of PARAM_TILES x 32 bits). FF: the PE accumulators
    plus the shadow bank (2 x ROWS x COLS x 32 bits) and operand registers (2 x 9 bits per PE). LUT:
    per-PE adder/mux, per-lane rounding/clamp, one 128-bit AXI master adapter per port (4), control.
    """
    pe = rows * cols
    dsp_pe, dsp_lanes, dsp_addr = pe, cols * _DSP_PER_REQUANT_LANE.get(requant, 4), 3 * _ADDR_MULTIPLIES
    fifo_depth = 2 * (k_tile // VEC)
    per_fifo = _cdiv(128, _BRAM18K_WIDTH) * _cdiv(fifo_depth, 512)
    bram_fifo = (rows + cols) * per_fifo
    bram_params = 4 * cols * _cdiv(param_tiles * 32, _BRAM18K_BITS)
    ff = 2 * pe * 32 + pe * 2 * 9 + cols * 64
    lut = pe * _LUT_PER_PE + cols * _LUT_PER_LANE + 4 * _LUT_PER_AXI + _LUT_CONTROL
    return {"rows": rows, "cols": cols, "k_tile": k_tile, "pe": pe, "requant_lanes": cols,
            "dsp": dsp_pe + dsp_lanes + dsp_addr, "dsp_breakdown": {"pe": dsp_pe, "requant_lanes": dsp_lanes,
                                                                    "address": dsp_addr},
            "bram18k": bram_fifo + bram_params, "bram18k_breakdown": {"operand_fifos": bram_fifo,
                                                                      "parameter_banks": bram_params},
            "ff": ff, "lut": lut,
            "method": "derived from the HLS arrays and unroll factors with rule-of-thumb per-unit costs; "
                      "not a csynth report (Vitis HLS not run)"}


# multiplies per unit in hls/nonlinear.cpp (operand widths -> DSP48E2 slices, 27x18 each) and the on-chip table
_UNIT_DSP = {"groupnorm": 10,  # q*q (1), n*q (1), (n q - S) * recip 28x30 (4), z * gamma 33x18 (2), t * my (2)
             "softmax": 6,  # d * ms 24x34 (4), e * recip 17x33 (2)
             "add": 4, "add_bcast": 4,  # two 17x33 multiplies
             "requant": 2, "act": 2,  # one 17x33 multiply
             "permute": 4}  # two runtime address multiplies
_UNIT_LUT = {"divider64": 3000, "axi32": 600, "control": 2500}


def unit_resources() -> dict[str, Any]:
    """DSP/BRAM18K/LUT of the nonlinear units beside the array (edgediff_top's nl_unit), from their multiplies
    and arrays: each unit kind is its own hardware (a switch, no sharing); the on-chip table NL_TAB x 32 bits;
    two 64-bit dividers (GroupNorm, softmax) and four 32-bit AXI adapters in LUTs. Rule-of-thumb costs, not csynth."""
    dsp = sum(_UNIT_DSP.values())
    bram = _cdiv(4096 * 32, _BRAM18K_BITS)
    lut = 2 * _UNIT_LUT["divider64"] + 4 * _UNIT_LUT["axi32"] + _UNIT_LUT["control"]
    return {"dsp": dsp, "dsp_breakdown": dict(_UNIT_DSP), "bram18k": bram, "lut": lut,
            "method": "derived from the units' multiplies and table (hls/nonlinear.cpp); not a csynth report"}


def estimate_layers(layers: list[dict[str, Any]], rows: int = 16, cols: int = 16, clock_mhz: float = 200.0,
                    k_tile: int = 512, dram_gbs: float = DEFAULT_DRAM_GBS) -> list[dict[str, Any]]:
    """Per-layer estimates. Each input dict has `name`, `op` and, for layers on the array, the GEMM
    view `m`, `k`, `n`, `reps` (optionally `k_words`, `groups`, `requant`, `conv` geometry, as in
    layers.json); others pass through as host-side with their `macs`.

    Output dicts: name, op, on_array, macs, cycles (max of pipeline and DRAM floor), pipeline_cycles,
    dram_floor_cycles, load/compute/drain/params clocks, bound, latency_us, utilisation, folds,
    edge_waste (share of PE slots in padded edge rows/columns), words_read, words_written, bytes_moved.
    """
    out = []
    bytes_per_clock = dram_gbs * 1e9 / (clock_mhz * 1e6)
    for layer in layers:
        rec: dict[str, Any] = {"name": layer.get("name", "?"), "op": layer.get("op", "?")}
        if not all(key in layer for key in ("m", "k", "n")):
            rec.update(on_array=False, macs=int(layer.get("macs", 0)), elements=int(layer.get("elements", 0)), cycles=0,
                       latency_us=0.0, utilisation=None)
            out.append(rec)
            continue
        m, k, n, reps = int(layer["m"]), int(layer["k"]), int(layer["n"]), int(layer.get("reps", 1))
        sch = layer_schedule(m, n, reps, _k_words(layer), rows, cols, k_tile, int(layer.get("groups", 1)),
                             bool(layer.get("requant", True)), layer.get("conv"))
        moved = VEC * (sch["words_read"] + sch["words_written"])
        floor = math.ceil(moved / bytes_per_clock)
        cycles = max(sch["pipeline_cycles"], floor)
        stage = max(("load", "compute", "drain"), key=lambda s: sch[s])
        macs = m * k * n * reps
        padded = _cdiv(m, rows) * rows * _cdiv(n, cols) * cols
        rec.update(on_array=True, m=m, k=k, n=n, reps=reps, macs=macs, cycles=cycles,
                   pipeline_cycles=sch["pipeline_cycles"], dram_floor_cycles=floor, load_cycles=sch["load"],
                   compute_cycles=sch["compute"], drain_cycles=sch["drain"], param_cycles=sch["params"],
                   jobs=sch["jobs"], bound="dram" if floor > sch["pipeline_cycles"] else stage,
                   latency_us=cycles / clock_mhz, utilisation=macs / (cycles * rows * cols) if cycles else 0.0,
                   folds=sch["tiles"], edge_waste=1.0 - (m * n) / padded, words_read=sch["words_read"],
                   words_written=sch["words_written"], bytes_moved=moved)
        out.append(rec)
    return out


# passes over the data of each nonlinear unit (hls/nonlinear.cpp), one element per clock (II=1)
UNIT_PASSES = {"GroupNorm": 2, "GroupNormalization": 2, "InstanceNormalization": 2, "LayerNorm": 2,
               "LayerNormalization": 2, "Softmax": 3, "SiLU": 1, "Sigmoid": 1, "GELU": 1, "Add": 1, "Mul": 1,
               "Resize": 1}


def nonlinear_unit_cycles(host_ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Clocks the nonlinear units would take for the host-side ops of a per-layer project (an estimate from the
    host-op list; fpga/program.py's call_estimate is the schedule of the whole-call program): GroupNorm 2 passes (statistics,
    normalise), softmax 3 (max, exp-sum, scale), tables / adds / upsample 1, one element per clock; the
    per-group and per-row constants (one square root, one divide) and any overlap with the array are left out;
    a SiLU right after a GroupNorm is folded into its table (counted once). Ops without a unit are listed."""
    cycles, covered, missing = 0, 0, []
    prev = None
    for h in host_ops:
        op = str(h.get("op", ""))
        passes = UNIT_PASSES.get(op)
        if passes is None:
            if int(h.get("elements", 0)) or int(h.get("macs", 0)):
                missing.append(op)
            prev = op
            continue
        if op in ("SiLU", "Sigmoid") and prev in ("GroupNorm", "GroupNormalization"):
            prev = op
            covered += 1
            continue
        cycles += passes * int(h.get("elements", 0))
        covered += 1
        prev = op
    return {"unit_cycles": cycles, "ops_on_units": covered, "ops_without_unit": sorted(set(missing))}


def summarize(rows_out: list[dict[str, Any]], rows: int, cols: int, clock_mhz: float, k_tile: int = 512,
              dram_gbs: float = DEFAULT_DRAM_GBS, requant: str = "ort") -> dict[str, Any]:
    """Totals over estimate_layers() output: cycles, latency, utilisation, GOPS, MACs on the array and the host."""
    on = [r for r in rows_out if r["on_array"]]
    cycles = sum(r["cycles"] for r in on)
    macs_arr = sum(r["macs"] for r in on)
    host_macs = sum(r["macs"] for r in rows_out if not r["on_array"])
    macs_all = macs_arr + host_macs
    res = resources(rows, cols, k_tile, requant)
    secs = cycles / (clock_mhz * 1e6)
    gops = 2 * macs_arr / secs / 1e9 if secs else 0.0
    units = nonlinear_unit_cycles([r for r in rows_out if not r["on_array"]])
    return {"rows": rows, "cols": cols, "clock_mhz": clock_mhz, "dram_gbs": dram_gbs, "total_cycles": cycles,
            "nonlinear_units": units,
            "whole_call_cycles_if_units_on_chip": cycles + units["unit_cycles"],
            "pipeline_cycles": sum(r["pipeline_cycles"] for r in on),
            "compute_cycles": sum(r["compute_cycles"] for r in on), "load_cycles": sum(r["load_cycles"] for r in on),
            "drain_cycles": sum(r["drain_cycles"] for r in on), "param_cycles": sum(r["param_cycles"] for r in on),
            "dram_bound_layers": sum(1 for r in on if r["bound"] == "dram"),
            "bytes_moved": sum(r["bytes_moved"] for r in on),
            "latency_ms": cycles / clock_mhz / 1000.0, "latency_is": "estimate", "assumptions": ASSUMPTIONS,
            "array_macs": macs_arr, "host_macs": host_macs,
            "array_macs_share": macs_arr / macs_all if macs_all else 0.0,
            "utilisation": macs_arr / (cycles * rows * cols) if cycles else 0.0,
            "gops": gops, "gops_per_dsp": gops / res["dsp"] if res["dsp"] else 0.0, "resources": res}


def estimate_onnx(path: Path | str, rows: int = 16, cols: int = 16, clock_mhz: float = 200.0, k_tile: int = 512,
                  device: str | None = None, dram_gbs: float = DEFAULT_DRAM_GBS) -> dict[str, Any]:
    """Estimates for a QDQ-quantized ONNX model or an exported FPGA project directory.

    Returns {"device", "rows", "cols", "clock_mhz", "layers": [...], "total_cycles", "latency_ms",
    "utilisation", "array_macs_share", "resources", "fits"}; `device` overrides rows/cols/clock.
    """
    dev = None
    if device:
        dev = globals()["device"](device) if isinstance(device, str) else device
        rows, cols, clock_mhz, dram_gbs = dev.rows, dev.cols, dev.clock_mhz, dev.dram_gbs
    p = Path(path)
    if p.is_dir():
        marker = p / "fpga_project.json"
        if not marker.is_file():
            raise BadInput(f"{p}: not an FPGA project (no fpga_project.json)")
        from edgediff.files import read_json

        report = read_json(marker)  # BadInput naming the file on damaged JSON
        layers = report.get("layers", []) + report.get("host_ops", [])
    else:
        from edgediff.fpga.convert_onnx import extract_onnx

        ext = extract_onnx(p, with_vectors=False)
        layers = ext.layer_dicts() + ext.host_ops
    est = estimate_layers(layers, rows, cols, clock_mhz, k_tile, dram_gbs)
    summary = summarize(est, rows, cols, clock_mhz, k_tile, dram_gbs)
    fits = None
    if dev is not None:
        res = summary["resources"]
        fits = res["dsp"] <= dev.dsp and res["bram18k"] <= dev.bram18k and (not dev.lut or res["lut"] <= dev.lut)
    return {"device": asdict(dev) if dev else None, **summary, "fits": fits, "layers": est}
