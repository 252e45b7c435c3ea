"""A real phone: push the .tflite over adb, run LiteRT's `benchmark_model` with op profiling,
parse its output into the common schema.

Needs `adb` (Android platform-tools) here and the benchmark binary on the phone
(`/data/local/tmp/benchmark_model`, from the LiteRT releases for arm64; set
EDGEDIFF_BENCHMARK_MODEL=/path/to/benchmark_model to have it pushed for you).

Output format parsed (benchmark_model --enable_op_profiling=true, per the LiteRT benchmark
tool's README and the profile summarizer's table layout):
  ============================== Run Order ==============================
  \t [node type] \t [first] \t [avg ms] \t [%] \t [cdf%] \t [mem KB] \t [times called] \t [Name]
  \t CONV_2D \t 0.012 \t 0.250 \t 9.7% \t 9.7% \t 0.000 \t 1 \t [tensor name]
and the timing line `Inference timings in us: Init: ..., First inference: ..., Warmup (avg): ...,
Inference (avg): ...`, `Timings (microseconds): count=.. first=.. curr=.. min=.. max=.. avg=.. std=..`
and, with --report_peak_memory_footprint, `Overall peak memory footprint (MB) via periodic monitoring: X`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput, Unavailable
from edgediff.profiling.graph import module_of_tflite_tensor
from edgediff.profiling.ort import group_layers

DEVICE_DIR = "/data/local/tmp/edgediff"
DEVICE_BENCH = "/data/local/tmp/benchmark_model"
_ROW = re.compile(r"^\s*(?P<type>\S.*?)\s+(?P<first>[\d.]+)\s+(?P<avg>[\d.]+)\s+(?P<pct>[\d.]+)%\s+"
                  r"(?P<cdf>[\d.]+)%\s+(?P<mem>[\d.]+)\s+(?P<calls>\d+)\s+\[(?P<name>.*)\]\s*$")


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """benchmark_model's stdout -> {total_ms, total, nodes[{node, module, op, ms}], layers, peak_memory_bytes}."""
    # the op tables of the regular runs (newer builds also print one for initialization first)
    start = text.find("Operator-wise Profiling Info for Regular Benchmark Runs")
    body = text[start:] if start >= 0 else text
    m = re.search(r"=+ Run Order =+\s*\n(.*?)(?:\n\s*\n|\n=+ )", body, re.S)
    if m is None:
        raise BadInput("benchmark_model output has no 'Run Order' op table (was --enable_op_profiling=true passed?)")
    nodes = []
    for line in m.group(1).splitlines():
        r = _ROW.match(line.replace("\t", " "))
        if r is None:
            continue
        name = r.group("name")
        mod = module_of_tflite_tensor(name)
        nodes.append({"node": name, "module": mod if mod is not None else name, "op": r.group("type").strip(),
                      "ms": float(r.group("avg")), "share_reported": float(r.group("pct")) / 100})
    if not nodes:
        raise BadInput("benchmark_model output: the 'Run Order' table has no rows")
    total: dict[str, Any] = {}
    t = re.search(r"Timings \(microseconds\): count=(\d+) first=(\d+) curr=(\d+) min=(\d+) max=(\d+) avg=([\d.e+]+) "
                  r"std=(\d+)", body)
    if t:
        total = {"runs": int(t.group(1)), "min_ms": int(t.group(4)) / 1000, "max_ms": int(t.group(5)) / 1000,
                 "avg_ms": float(t.group(6)) / 1000, "std_ms": int(t.group(7)) / 1000}
    inf = re.search(r"Inference \(avg\): ([\d.e+]+)", text)
    avg_ms = float(inf.group(1)) / 1000 if inf else total.get("avg_ms")
    if avg_ms is None:
        avg_ms = sum(n["ms"] for n in nodes)
    peak = re.search(r"Overall peak memory footprint \(MB\) via periodic monitoring: ([\d.]+)", text)
    return {
        "total_ms": avg_ms, "total": {**total, "mean_ms": avg_ms}, "nodes": nodes, "layers": group_layers(nodes),
        "peak_memory_bytes": int(float(peak.group(1)) * 2**20) if peak else None,
        "total_note": "benchmark_model reports the mean ('Inference (avg)'), not the median",
    }


def _adb(serial: str, *args: str, timeout: int = 600) -> str:
    cmd = ["adb", "-s", serial, *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"adb -s {serial}: '{' '.join(args[:2])}' timed out after {timeout} s") from None
    if res.returncode != 0:
        raise Unavailable(f"adb -s {serial} {' '.join(args[:2])}: {(res.stderr or res.stdout).strip()[:200]}")
    return res.stdout + res.stderr


def profile_adb(path: Path, serial: str, warmup: int = 3, repeats: int = 20, threads: int | None = None,
                use_gpu: bool = False) -> dict[str, Any]:
    """Run benchmark_model on the phone `serial` and parse its op profile."""
    if path.suffix.lower() != ".tflite":
        raise BadInput(f"{path}: --adb needs a .tflite file")
    if shutil.which("adb") is None:
        raise Unavailable("adb is not installed here: install Android platform-tools (apt-get install adb) "
                          "and connect the phone with USB debugging on")
    state = _adb(serial, "get-state", timeout=20).strip()
    if state != "device":
        raise Unavailable(f"adb: phone {serial!r} is {state!r}, not ready (authorize USB debugging on it)")
    bench_local = os.environ.get("EDGEDIFF_BENCHMARK_MODEL")
    if bench_local:
        _adb(serial, "push", bench_local, DEVICE_BENCH)
        _adb(serial, "shell", "chmod", "755", DEVICE_BENCH)
    if "yes" not in _adb(serial, "shell", f"test -x {DEVICE_BENCH} && echo yes || echo no", timeout=20):
        raise Unavailable(f"{DEVICE_BENCH} is not on the phone: download LiteRT's benchmark_model for android_aarch64 "
                          "and set EDGEDIFF_BENCHMARK_MODEL to its path")
    _adb(serial, "shell", "mkdir", "-p", DEVICE_DIR)
    remote = f"{DEVICE_DIR}/{path.name}"
    _adb(serial, "push", str(path), remote)
    flags = [f"--graph={remote}", f"--warmup_runs={warmup}", f"--num_runs={repeats}", "--enable_op_profiling=true",
             "--report_peak_memory_footprint=true", f"--num_threads={threads or 4}"]
    if use_gpu:
        flags.append("--use_gpu=true")
    text = _adb(serial, "shell", " ".join([DEVICE_BENCH, *map(shlex.quote, flags)]))
    res = parse_benchmark_output(text)
    model = _adb(serial, "shell", "getprop", "ro.product.model", timeout=20).strip()
    return {"runtime": "tflite-benchmark_model (adb)", "device": {"serial": serial, "model": model},
            "flags": flags, **res, "estimated": False,
            "layer_timing": "LiteRT benchmark_model --enable_op_profiling=true on the phone, avg ms per op"}
