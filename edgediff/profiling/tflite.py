"""LiteRT (.tflite): total latency from the interpreter, per-op latency op by op.

The LiteRT Python API (ai-edge-litert 2.x: `Interpreter`, `CompiledModel`) has no op
profiler: op-level timing lives in the C++ `benchmark_model --enable_op_profiling=true`
(see adb.py for phones). Here we time each op honestly in the real runtime another way:
1. run the whole model once with `experimental_preserve_all_tensors=True` to capture every
   intermediate tensor;
2. for each op, cut a one-op .tflite (the op, its constant tensors and buffers, its other
   inputs as graph inputs) with LiteRT's own flatbuffer tools;
3. run that model in the same interpreter (XNNPACK, same thread count) on the op's real
   input values, and take the median of repeated invokes minus the interpreter's per-invoke
   cost (measured on a one-element op).
Isolated ops miss what the whole graph gets (XNNPACK fusing neighbours, one arena, warm
caches), so the per-op sum differs from the whole-model total; both are reported.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput
from edgediff.profiling.graph import module_of_tflite_tensor, tflite_interpreter
from edgediff.profiling.ort import group_layers, time_calls, timing_stats


def _feeds(it: Any, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for d in it.get_input_details():
        shape = [int(x) for x in d["shape"]]
        if "timestep" in d["name"] or (len(shape) == 1 and np.issubdtype(d["dtype"], np.floating) and len(out) == 1):
            out[d["index"]] = np.full(shape, 500.0, dtype=d["dtype"])  # contract: (sample, timestep[, cond])
        elif np.issubdtype(d["dtype"], np.integer):
            out[d["index"]] = np.zeros(shape, dtype=d["dtype"])
        else:
            out[d["index"]] = rng.standard_normal(shape).astype(d["dtype"])
    return out


def _invoke(it: Any, feeds: dict[int, np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        for i, v in feeds.items():
            it.set_tensor(i, v)
        it.invoke()

    return run


def _one_op_model(model: Any, op_index: int) -> tuple[bytes, list[int]]:
    """A .tflite holding only op `op_index` of subgraph 0; returns (bytes, original indices of its inputs)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    sg = model.subgraphs[0]
    op = sg.operators[op_index]
    used = [int(i) for i in list(op.inputs) + list(op.outputs) if int(i) >= 0]
    used = list(dict.fromkeys(used))
    remap = {old: new for new, old in enumerate(used)}
    buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel
    tensors = []
    graph_inputs = []
    for old in used:
        t = copy.copy(sg.tensors[old])
        buf = model.buffers[t.buffer] if t.buffer and t.buffer < len(model.buffers) else None
        if buf is not None and buf.data is not None and len(buf.data):
            buffers.append(buf)
            t.buffer = len(buffers) - 1
        else:
            t.buffer = 0
            if old not in [int(o) for o in op.outputs]:
                graph_inputs.append(old)
        tensors.append(t)
    new_op = copy.copy(op)
    new_op.inputs = [remap[int(i)] if int(i) >= 0 else -1 for i in op.inputs]
    new_op.outputs = [remap[int(i)] for i in op.outputs]
    new_sg = schema.SubGraphT()
    new_sg.tensors = tensors
    new_sg.operators = [new_op]
    new_sg.inputs = [remap[i] for i in graph_inputs]
    new_sg.outputs = list(new_op.outputs)
    new_sg.name = "op"
    m = schema.ModelT()
    m.version = model.version
    m.operatorCodes = model.operatorCodes
    m.subgraphs = [new_sg]
    m.buffers = buffers
    m.description = "edgediff one-op profile"
    return bytes(fbu.convert_object_to_bytearray(m)), graph_inputs


def _median_invoke(it: Any, feeds: dict[int, np.ndarray], warmup: int, repeats: int) -> float:
    for i, v in feeds.items():
        it.set_tensor(i, v)
    for _ in range(warmup):
        it.invoke()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it.invoke()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000.0


def profile_tflite(path: Path, warmup: int = 3, repeats: int = 20, threads: int | None = None,
                   tick: Callable[[], None] | None = None, op_repeats: int = 15) -> dict[str, Any]:
    """Profile a .tflite file in the LiteRT interpreter (XNNPACK on CPU)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    it = tflite_interpreter(path, threads)
    feeds = _feeds(it)
    times = time_calls(_invoke(it, feeds), warmup, repeats, tick)
    stats = timing_stats(times)

    # 1. every intermediate value of one real run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LiteRT warns that preserving all tensors is for debugging: that is our use
        full = Interpreter(model_path=str(path), num_threads=threads, experimental_preserve_all_tensors=True)
    full.allocate_tensors()
    _invoke(full, feeds)()
    ops = full._get_ops_details()  # noqa: SLF001 - the public API has no op list
    tensors = {t["index"]: t for t in full.get_tensor_details()}
    try:
        model = fbu.read_model(path)
    except Exception as e:  # noqa: BLE001 - flatbuffer errors come in several types
        raise BadInput(f"{path}: cannot read the flatbuffer ({e})") from None
    n_ops = len(model.subgraphs[0].operators)

    # 2. the interpreter's own per-invoke cost, on a one-element op of the same kind of model
    baseline = _invoke_baseline(threads)

    nodes: list[dict[str, Any]] = []
    failed: list[str] = []
    for idx in range(n_ops):
        o = ops[idx]
        out_name = tensors[int(o["outputs"][0])]["name"] if len(o["outputs"]) else ""
        mod = module_of_tflite_tensor(out_name)
        name = mod if mod is not None else f"{o['op_name']}_{idx}"
        try:
            blob, inputs = _one_op_model(model, idx)
            one = Interpreter(model_content=blob, num_threads=threads)
            one.allocate_tensors()
            det = one.get_input_details()
            op_feeds = {d["index"]: np.asarray(full.get_tensor(orig)).astype(d["dtype"]).reshape(d["shape"])
                        for d, orig in zip(det, inputs)}
            ms = max(_median_invoke(one, op_feeds, 2, op_repeats) - baseline, 0.0)
        except Exception as e:  # noqa: BLE001 - an op we cannot isolate is reported, not fatal
            failed.append(f"{o['op_name']}_{idx}: {str(e).splitlines()[0][:80]}")
            ms = float("nan")
        nodes.append({"node": f"{o['op_name']}_{idx}", "module": name, "op": o["op_name"], "ms": ms})
        if tick:
            tick()
    layers = group_layers(nodes)
    layer_sum = sum(la["ms"] for la in layers)
    from ai_edge_litert import __version__ as litert_version

    return {
        "runtime": "tflite", "runtime_version": litert_version, "delegate": "XNNPACK (CPU)",
        "threads": threads or "default", "total_ms": stats["median_ms"], "total": stats, "layers": layers, "nodes": nodes,
        "layer_sum_ms": layer_sum, "invoke_overhead_ms": baseline, "ops_not_timed": failed,
        "peak_memory_bytes": None,
        "peak_memory_note": "the LiteRT Python interpreter does not expose its arena size",
        "layer_timing": ("op by op: each op cut into a one-op .tflite and run in the LiteRT interpreter on its real "
                         "inputs (median of repeated invokes minus the per-invoke cost); the Python API has no op "
                         "profiler. Isolated ops miss whole-graph fusion, so layer_sum_ms differs from total_ms."),
        "estimated": False,
    }


def _invoke_baseline(threads: int | None) -> float:
    """Median time of invoking a one-element ADD: what every one-op measurement also pays."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    code = schema.OperatorCodeT()
    code.builtinCode = schema.BuiltinOperator.ADD
    code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    code.version = 1
    tensors = []
    for n in ("a", "b", "y"):
        t = schema.TensorT()
        t.shape = [1]
        t.type = schema.TensorType.FLOAT32
        t.buffer = 0
        t.name = n
        tensors.append(t)
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1]
    op.outputs = [2]
    op.builtinOptionsType = schema.BuiltinOptions.AddOptions
    op.builtinOptions = schema.AddOptionsT()
    sg = schema.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs = tensors, [op], [0, 1], [2]
    m = schema.ModelT()
    m.version = 3
    m.operatorCodes = [code]
    m.subgraphs = [sg]
    m.buffers = [schema.BufferT()]
    it = Interpreter(model_content=bytes(fbu.convert_object_to_bytearray(m)), num_threads=threads)
    it.allocate_tensors()
    one = np.ones([1], np.float32)
    return _median_invoke(it, {0: one, 1: one}, 5, 50)
