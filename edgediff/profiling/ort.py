"""onnxruntime: total latency from plain runs, per-layer latency from ORT's own profiler.

Two sessions with the same options: one without profiling gives the total latency (so the
profiler's own overhead does not inflate it), one with `enable_profiling` gives per-node
kernel times from ORT's profiling JSON. ORT optimizes the graph before it runs it (fusions,
NCHWc layout), so profiled node names are those of the optimized graph; they are mapped back
to source modules through tensor names: we save the optimized graph, and each optimized node
takes the module of the original node that produced one of its outputs (or, for layout
reorders, of its neighbours).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput
from edgediff.profiling.graph import feeds_for, load_onnx, module_of_onnx_node


def timing_stats(times_s: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in times_s)
    q = np.percentile(ms, [10, 90]) if len(ms) > 1 else [ms[0], ms[0]]
    return {"median_ms": statistics.median(ms), "p10_ms": float(q[0]), "p90_ms": float(q[1]), "min_ms": ms[0],
            "max_ms": ms[-1], "std_ms": statistics.pstdev(ms), "runs": len(ms)}


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int, tick: Callable[[], None] | None = None) -> list[float]:
    for _ in range(warmup):
        fn()
        if tick:
            tick()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if tick:
            tick()
    return out


def _session(path: Path, threads: int | None, profile_prefix: str | None = None, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
        # big models: keep weights out of the saved graph (we only need its topology)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for invalid graphs
        raise BadInput(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


def module_map(original: Any, optimized: Any) -> dict[str, str]:
    """Optimized node name -> source module path (or the node name when unknown)."""
    producer_mod: dict[str, str] = {}
    orig_node_mod: dict[str, str] = {}
    for n in original.graph.node:
        mod = module_of_onnx_node(n)
        if mod is None:
            mod = n.name
        orig_node_mod[n.name] = mod
        for o in n.output:
            producer_mod[o] = mod
    consumers: dict[str, list[Any]] = defaultdict(list)
    producers: dict[str, Any] = {}
    for n in optimized.graph.node:
        for i in n.input:
            consumers[i].append(n)
        for o in n.output:
            producers[o] = n

    def resolve(n: Any, depth: int = 0) -> str | None:
        if n.name in orig_node_mod:
            return orig_node_mod[n.name]
        for o in n.output:
            if o in producer_mod:
                return producer_mod[o]
        if depth < 3:
            # layout reorders and renamed fused nodes: follow the data to a known tensor
            for o in n.output:
                for c in consumers.get(o, []):
                    r = resolve(c, depth + 1)
                    if r is not None:
                        return r
            for i in n.input:
                if i in producer_mod:
                    return producer_mod[i]
        return None

    out = {}
    for n in optimized.graph.node:
        r = resolve(n)
        out[n.name] = r if r is not None else n.name
    return out


def _run_windows(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")


_METADATA_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def parse_profile(events: list[dict[str, Any]], names: dict[str, str], skip_runs: int) -> dict[str, Any]:
    """ORT profiling JSON -> per-node kernel ms over the runs after `skip_runs`, peak arena bytes.

    Per node we take the median over runs (robust to the scheduler preempting one run). ORT's
    profiler adds a fixed cost inside every node's kernel time; we measure it as the median
    kernel time of metadata-only nodes (reshape & co., whose real work is ~0) and report
    `ms` = raw - that floor (>= 0) next to `ms_raw`.
    """
    windows = _run_windows(events)[skip_runs:]
    per_node: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    peak = 0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        ts = e["ts"]
        if not any(a <= ts <= b for a, b in windows):
            continue
        node = e["name"][: -len("_kernel_time")]
        per_node[node].append(e["dur"] / 1000.0)
        ops[node] = e.get("args", {}).get("op_name", "?")
        peak = max(peak, int(e.get("args", {}).get("mem_in_use_peak", 0) or 0))
    raw = {n: statistics.median(v) for n, v in per_node.items()}
    meta = [raw[n] for n in raw if ops[n] in _METADATA_OPS]
    floor = statistics.median(meta) if meta else 0.0
    nodes = [{"node": n, "module": names.get(n, n), "op": ops[n], "ms": max(raw[n] - floor, 0.0), "ms_raw": raw[n]}
             for n in per_node]
    run_ms = [(b - a) / 1000.0 for a, b in windows]
    return {"nodes": nodes, "peak_arena_bytes": peak, "profiled_run_ms": run_ms, "profiler_floor_ms": floor}


def group_layers(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes -> one row per source module: {name, op, ms, share, nodes}; op lists the module's op types
    by time, and ms_raw (when the nodes have it) the uncorrected profiler time."""
    by_mod: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    count: dict[str, int] = defaultdict(int)
    raw: dict[str, float] = defaultdict(float)
    order: list[str] = []
    for n in nodes:
        if n["module"] not in by_mod:
            order.append(n["module"])
        ms = n["ms"] if n["ms"] == n["ms"] else 0.0
        by_mod[n["module"]][n["op"]] += ms
        raw[n["module"]] += n.get("ms_raw", ms)
        count[n["module"]] += 1
    total = sum(sum(v.values()) for v in by_mod.values()) or 1.0
    layers = []
    for mod in order:
        ops = by_mod[mod]
        ms = sum(ops.values())
        row = {"name": mod or "(root)", "op": "+".join(sorted(ops, key=lambda k: -ops[k])), "ms": ms,
               "share": ms / total, "nodes": count[mod]}
        if any("ms_raw" in n for n in nodes):
            row["ms_raw"] = raw[mod]
        layers.append(row)
    return layers


def profile_ort(path: Path, warmup: int = 3, repeats: int = 20, threads: int | None = None,
                tick: Callable[[], None] | None = None) -> dict[str, Any]:
    """Profile an ONNX file on onnxruntime's CPU execution provider."""
    original = load_onnx(path)
    plain = _session(path, threads)
    feeds = feeds_for(plain)
    times = time_calls(lambda: plain.run(None, feeds), warmup, repeats, tick)
    with tempfile.TemporaryDirectory(prefix="edgediff-ort-prof-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        sess = _session(path, threads, profile_prefix=str(Path(tmp) / "ort"), optimized=opt_path)
        names = module_map(original, load_onnx(opt_path))
        prof_runs = max(5, min(repeats, 15))
        time_calls(lambda: sess.run(None, feeds), warmup, prof_runs, tick)
        prof_file = sess.end_profiling()
        events = json.loads(Path(prof_file).read_text())
    parsed = parse_profile(events, names, skip_runs=warmup)
    stats = timing_stats(times)
    layers = group_layers(parsed["nodes"])
    layer_sum = sum(la["ms"] for la in layers)
    prof_median = statistics.median(parsed["profiled_run_ms"]) if parsed["profiled_run_ms"] else float("nan")
    import onnxruntime as ort

    return {
        "runtime": "ort", "runtime_version": ort.__version__, "provider": "CPUExecutionProvider",
        "threads": threads or "default", "total_ms": stats["median_ms"], "total": stats,
        "layers": layers, "nodes": parsed["nodes"], "layer_sum_ms": layer_sum,
        "layer_sum_raw_ms": sum(n["ms_raw"] for n in parsed["nodes"]), "profiler_floor_ms": parsed["profiler_floor_ms"],
        "profiled_run_median_ms": prof_median,
        # how much ORT's profiler slows a run (total of a profiled run vs a plain one)
        "profiler_overhead": prof_median / stats["median_ms"] - 1 if stats["median_ms"] else None,
        "peak_memory_bytes": parsed["peak_arena_bytes"],
        "peak_memory_note": "onnxruntime CPU arena: peak bytes in use during a run (mem_in_use_peak)",
        "layer_timing": ("onnxruntime profiler (enable_profiling): kernel time per node, median over profiled runs, minus "
                         "the profiler's own per-node cost (profiler_floor_ms, the median time of reshape-like nodes)"),
        "estimated": False,
    }
