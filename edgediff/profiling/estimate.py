"""Roofline latency estimates per layer for a device that is not attached.

For each op of the exported graph (graph.py): time = max(MACs / (peak MACs/s at the op's
precision x compute efficiency), bytes moved / (bandwidth x memory efficiency)) + a fixed
cost per op. Metadata-only ops (reshape, squeeze...) cost only the fixed cost. Ops are
summed per source module so estimates line up with measured profiles.

The device table (devices.toml) cites where each peak figure comes from; the efficiencies
of those devices are assumptions. `this-cpu` is different: its peaks are measured here
(a large MatMul and a large Add in onnxruntime) and its efficiencies are fitted to this
machine's measured per-layer times (`calibrate`), which is how we report the method's error.
Everything here is labelled `estimated: true`.
"""

from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput
from edgediff.profiling.graph import OpWork

CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"}
GEMM_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "FULLY_CONNECTED", "BATCH_MATMUL"}
# ops that only rewrite tensor metadata in every runtime we target: no bytes moved
FREE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Constant", "RESHAPE", "SQUEEZE",
            "EXPAND_DIMS"}
DEFAULT_EFFICIENCY = {"compute": 0.5, "memory": 0.6, "op_overhead_us": 5.0}


@lru_cache(maxsize=1)
def device_table() -> dict[str, dict[str, Any]]:
    with open(Path(__file__).with_name("devices.toml"), "rb") as f:
        return tomllib.load(f)["devices"]


def _fpga_boards() -> dict[str, Any]:
    """The FPGA engineer's board table (edgediff.fpga.estimate.DEVICES) when it is installed."""
    try:
        from edgediff.fpga import estimate as fest
    except ImportError:
        return {}
    return dict(getattr(fest, "DEVICES", {}))


def device_names() -> list[str]:
    return ["this-cpu", *device_table(), *(b for b in _fpga_boards() if b not in device_table())]


def get_device(name: str, threads: int | None = None) -> dict[str, Any]:
    if name == "this-cpu":
        return this_cpu(threads)
    table = device_table()
    boards = _fpga_boards()
    if name not in table and name in boards:
        b = boards[name]
        dev = dict(table["fpga-sa16"])  # host side (memory, per-op cost) as for the reference board
        dev.update(name=name, title=f"{name}: {b.rows}x{b.cols} int8 systolic array at {b.clock_mhz:g} MHz "
                   "(edgediff.fpga.estimate)", array={"rows": b.rows, "cols": b.cols, "clock_mhz": b.clock_mhz},
                   peak_gmacs={p: b.rows * b.cols * b.clock_mhz / 1000 for p in ("fp32", "fp16", "int8")})
        dev["efficiency"] = {**DEFAULT_EFFICIENCY, **dev.get("efficiency", {})}
        dev["calibrated"] = False
        return dev
    if name not in table:
        raise BadInput(f"--device {name!r}: unknown device; expected one of {', '.join(device_names())}")
    dev = dict(table[name])
    dev["name"] = name
    dev["efficiency"] = {**DEFAULT_EFFICIENCY, **dev.get("efficiency", {})}
    dev["calibrated"] = False
    return dev


def _ort_time(model: Any, feeds: dict[str, np.ndarray], threads: int | None, repeats: int = 5) -> float:
    import time

    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return best


@lru_cache(maxsize=4)
def measure_cpu_peaks(threads: int | None = None) -> dict[str, float]:
    """This CPU's datasheet, measured in onnxruntime: MatMul GMAC/s and Add GB/s (best of 5)."""
    from onnx import TensorProto, helper

    n = 512
    mm = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    gmacs = n**3 / _ort_time(mm, {"a": a, "b": a}, threads) / 1e9
    m = 1 << 23  # 32 MiB per operand: well beyond the caches
    add = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [m])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m])]), opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.ones(m, np.float32)
    gbs = 3 * 4 * m / _ort_time(add, {"a": x, "b": x}, threads, repeats=3) / 1e9
    return {"gmacs_fp32": gmacs, "bandwidth_gbs": gbs}


_FITTED: dict[tuple[int | None], dict[str, float]] = {}


def this_cpu(threads: int | None = None) -> dict[str, Any]:
    """The machine we run on, with measured peaks; efficiencies as fitted by `calibrate` if it ran."""
    p = measure_cpu_peaks(threads)
    eff = _FITTED.get((threads,), DEFAULT_EFFICIENCY)
    return {
        "name": "this-cpu", "title": f"this machine's CPU, onnxruntime, threads={threads or 'default'}", "kind": "cpu",
        # fp16 has no faster path in ORT's CPU provider; int8 assumed 2x fp32 (VNNI/dot-product class)
        "peak_gmacs": {"fp32": p["gmacs_fp32"], "fp16": p["gmacs_fp32"], "int8": 2 * p["gmacs_fp32"]},
        "bandwidth_gbs": p["bandwidth_gbs"], "efficiency": dict(eff), "calibrated": (threads,) in _FITTED,
        "sources": ["measured here: 512^3 MatMul and a 3x32 MiB Add in onnxruntime (best of 5)"],
    }


def op_ms(op: OpWork, dev: dict[str, Any], eff: dict[str, float] | None = None) -> tuple[float, str]:
    """Estimated milliseconds of one op on `dev` and what bounds it (compute|memory|overhead)."""
    eff = eff or dev["efficiency"]
    peaks = dev["peak_gmacs"]
    peak = peaks.get(op.precision) or peaks["fp32"]
    ce = eff.get("compute_conv", eff["compute"]) if op.op in CONV_OPS else eff.get("compute_gemm", eff["compute"])
    t_c = op.macs / (peak * 1e9 * ce) if op.macs else 0.0
    t_m = 0.0 if op.op in FREE_OPS else op.bytes / (dev["bandwidth_gbs"] * 1e9 * eff["memory"])
    t_o = eff["op_overhead_us"] * 1e-6
    bound = "compute" if t_c >= t_m and t_c > t_o else "memory" if t_m > t_o else "overhead"
    return (max(t_c, t_m) + t_o) * 1000.0, bound


def _array_ms(ops: list[OpWork], dev: dict[str, Any]) -> dict[int, tuple[float, str]] | None:
    """ms of each MAC op on an FPGA array from edgediff.fpga.estimate's cycle model (None without it)."""
    try:
        from edgediff.fpga import estimate as fest
    except ImportError:
        return None
    arr = dev.get("array") or {}
    rows, cols, clk = int(arr.get("rows", 16)), int(arr.get("cols", 16)), float(arr.get("clock_mhz", 200))
    idx = [i for i, o in enumerate(ops) if o.gemm]
    est = fest.estimate_layers([{"name": ops[i].name, "op": ops[i].op, "m": ops[i].gemm[0], "k": ops[i].gemm[1],
                                 "n": ops[i].gemm[2], "reps": ops[i].gemm[3]} for i in idx], rows, cols, clk)
    return {i: (e["latency_us"] / 1000.0, "array") for i, e in zip(idx, est)}


def estimate(ops: list[OpWork], dev: dict[str, Any], eff: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-module estimates {name, op, ms, share, macs, bytes, bound} and the total.

    On an FPGA device the MAC ops take the array's cycle count (edgediff.fpga.estimate) and the
    other ops run host-side under the roofline; elsewhere every op is a roofline estimate.
    """
    mods: dict[str, dict[str, Any]] = {}
    array = _array_ms(ops, dev) if dev.get("kind") == "fpga" else None
    for i, o in enumerate(ops):
        ms, bound = array[i] if array and i in array else op_ms(o, dev, eff)
        m = mods.setdefault(o.name or "(root)", {"name": o.name or "(root)", "ops": defaultdict(float), "ms": 0.0,
                                                 "macs": 0, "bytes": 0, "bounds": defaultdict(float), "precision": set()})
        m["ops"][o.op] += ms
        m["ms"] += ms
        m["macs"] += o.macs
        m["bytes"] += o.bytes
        m["bounds"][bound] += ms
        m["precision"].add(o.precision)
    total = sum(m["ms"] for m in mods.values()) or 1.0
    layers = []
    for m in mods.values():
        layers.append({"name": m["name"], "op": "+".join(sorted(m["ops"], key=lambda k: -m["ops"][k])), "ms": m["ms"],
                       "share": m["ms"] / total, "macs": m["macs"], "bytes": m["bytes"],
                       "bound": max(m["bounds"], key=lambda k: m["bounds"][k]),
                       "precision": "+".join(sorted(m["precision"]))})
    method = ("MAC ops: cycles of the systolic array (edgediff.fpga.estimate); other ops: host-side roofline"
              if array is not None else "roofline per op: max(MACs/peak, bytes/bandwidth) / efficiency + per-op cost")
    return {"total_ms": sum(la["ms"] for la in layers), "layers": layers, "method": method}


def estimate_profile(ops: list[OpWork], device: str, threads: int | None = None) -> dict[str, Any]:
    """The `profile --device` result: same schema as a measured profile, labelled as an estimate."""
    dev = get_device(device, threads)
    est = estimate(ops, dev)
    return {
        "runtime": f"estimate:{device}", "device": {k: v for k, v in dev.items() if k != "efficiency"},
        "efficiency": dev["efficiency"], "estimated": True, "total_ms": est["total_ms"], "layers": est["layers"],
        "macs": sum(o.macs for o in ops), "bytes": sum(o.bytes for o in ops),
        "method": est["method"],
        "note": ("ESTIMATE, not a measurement: "
                 + ("peaks measured here" if device == "this-cpu" else "peaks from the cited device table")
                 + ("; efficiencies fitted to this machine's measured layers" if dev.get("calibrated")
                    else "; efficiencies assumed, not calibrated on this device")),
    }


# ----------------------------------------------------------------------------- calibration
def align(pred_layers: list[dict[str, Any]], measured_layers: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(module, predicted ms, measured ms) for modules present in both."""
    meas = {la["name"]: la["ms"] for la in measured_layers if la["ms"] == la["ms"]}
    return [(la["name"], la["ms"], meas[la["name"]]) for la in pred_layers if la["name"] in meas]


def error_report(pairs: list[tuple[str, float, float]], total_pred: float, total_meas: float,
                 total_meas_min: float | None = None) -> dict[str, Any]:
    """Per-layer and total error of predictions vs measurements (total: vs the median run, and vs
    the fastest run, which is what an unloaded machine gives when other work shares the CPU)."""
    if not pairs:
        return {"layers_compared": 0}
    p = np.array([x[1] for x in pairs])
    m = np.array([max(x[2], 1e-6) for x in pairs])
    ape = np.abs(p - m) / m
    return {
        "layers_compared": len(pairs),
        "median_abs_pct_err": float(np.median(ape) * 100),
        "p90_abs_pct_err": float(np.percentile(ape, 90) * 100),
        # error weighted by measured time: the layers that matter count most
        "weighted_abs_pct_err": float(np.abs(p - m).sum() / m.sum() * 100),
        "log_rmse": float(np.sqrt(np.mean(np.log(p / m) ** 2))),
        "spearman": float(_spearman(p, m)),
        "total_pred_ms": total_pred, "total_meas_ms": total_meas,
        "total_pct_err": (total_pred - total_meas) / total_meas * 100 if total_meas else None,
        "total_pct_err_vs_fastest": ((total_pred - total_meas_min) / total_meas_min * 100 if total_meas_min else None),
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_efficiency(ops: list[OpWork], measured_layers: list[dict[str, Any]], dev: dict[str, Any]) -> dict[str, float]:
    """Efficiencies (conv, gemm, memory, per-op cost) that best explain measured per-module times.

    Least squares on log(predicted/measured) per module, so small and large layers count alike;
    parameters are searched in log space (they are positive) with Nelder-Mead.
    """
    from scipy.optimize import minimize

    meas = {la["name"]: la["ms"] for la in measured_layers if la["ms"] == la["ms"] and la["ms"] > 0}
    by_mod: dict[str, list[OpWork]] = defaultdict(list)
    for o in ops:
        by_mod[o.name or "(root)"].append(o)
    names = [n for n in by_mod if n in meas]
    if len(names) < 4:
        raise BadInput("calibration needs at least 4 layers whose names match between the graph and the profile")
    # a floor of 5 us keeps near-zero layers (reshapes after the profiler floor) from dominating the log loss
    eps = 0.005
    target = np.log(np.array([meas[n] for n in names]) + eps)

    def unpack(x: np.ndarray) -> dict[str, float]:
        e = np.exp(x)
        return {"compute_conv": float(e[0]), "compute_gemm": float(e[1]), "compute": float(e[0]),
                "memory": float(e[2]), "op_overhead_us": float(e[3])}

    def loss(x: np.ndarray) -> float:
        eff = unpack(x)
        pred = np.array([sum(op_ms(o, dev, eff)[0] for o in by_mod[n]) for n in names])
        return float(np.mean((np.log(pred + eps) - target) ** 2))

    x0 = np.log([0.5, 0.5, 0.5, 5.0])
    res = minimize(loss, x0, method="Nelder-Mead", options={"maxiter": 600, "xatol": 1e-3, "fatol": 1e-6})
    return unpack(res.x)


def calibrate(ops: list[OpWork], measured: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Fit `this-cpu` to a measured profile of the same graph; returns the fit and its error there."""
    dev = this_cpu(threads)
    eff = fit_efficiency(ops, measured["layers"], dev)
    _FITTED[(threads,)] = eff
    dev = this_cpu(threads)
    est = estimate(ops, dev)
    pairs = align(est["layers"], measured["layers"])
    return {"efficiency": eff, "peaks": {"gmacs": dev["peak_gmacs"], "bandwidth_gbs": dev["bandwidth_gbs"]},
            "error_on_fit_set": error_report(pairs, est["total_ms"], measured["total_ms"],
                                             measured.get("total", {}).get("min_ms"))}


def evaluate(ops: list[OpWork], measured: dict[str, Any], eff: dict[str, float], threads: int | None = None) -> dict[str, Any]:
    """Error of `this-cpu` with given efficiencies on another measured profile (held-out check)."""
    dev = this_cpu(threads)
    est = estimate(ops, dev, eff)
    pairs = align(est["layers"], measured["layers"])
    return {**error_report(pairs, est["total_ms"], measured["total_ms"], measured.get("total", {}).get("min_ms")),
            "pairs": pairs}
