"""OpenVINO IR target: `edgediff export MODEL --target openvino -o NAME.xml` (+ NAME.bin).

The IR is converted from our own ONNX export (`openvino.convert_model` on the .onnx file), so
the float graph, the I/O contract and, for int8, the Q/DQ placement are exactly the ONNX
backend's: one int8 lowering for every backend. OpenVINO's frontend turns each
QuantizeLinear/DequantizeLinear pair into a FakeQuantize and its CPU plugin runs the quantized
convolutions and matmuls in int8 (measured in benchmarks/openvino.py). Converting the torch
module directly (`convert_model(nn.Module, example_input=...)`) was measured too: same graph
size, slower to convert and it loses the module-path node names the profiler maps back.

int8 comes from the artifact's QuantParams (the lowered Q/DQ graph), because that is what the
verifier's simulation computes and what every other int8 backend runs. `nncf.quantize` on the
fp32 IR, fed with our diffusion-aware calibration set, is measured against it in
benchmarks/openvino.py.

Precisions: fp32 runs with INFERENCE_PRECISION_HINT=f32 (OpenVINO's CPU default on
bf16-capable cores is bf16, which would silently cost accuracy); fp16 stores weights as fp16
(`compress_to_fp16`) and computes in f32 on CPU; int8 as above.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.exporters.base import PRECISIONS, Backend, ExportReport, contract_feed, input_names, probe, threads

from edgediff.errors import BadInput, Unavailable
from edgediff.runtime.openvino import compile_ir, read_ir

META_KEY = "edgediff"  # rt_info key carrying our metadata in the .xml


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise Unavailable("the openvino target needs OpenVINO: pip install 'edgediff[openvino]' "
                          "(or pip install openvino)") from None
    return openvino


def _check_out(out: Path) -> None:
    if out.suffix.lower() != ".xml":
        raise BadInput(f"{out}: an OpenVINO export must end in .xml (the weights go to the .bin beside it)")


def convert(onnx_path: Path, precision: str, meta: dict[str, Any]) -> Any:
    """ONNX file -> openvino.Model with our metadata in rt_info (nothing written)."""
    ov = _ov()
    try:
        m = ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise BadInput(f"{onnx_path}: OpenVINO cannot convert it ({str(e).splitlines()[0][:300]})") from None
    m.set_rt_info(json.dumps({**meta, "precision": precision}), [META_KEY, "meta"])
    return m


def export_openvino(model: Any, out: Path, precision: str, force: bool = False) -> dict[str, Any]:
    """Write NAME.xml + NAME.bin atomically (both in one temp dir, renamed at the end)."""
    from edgediff.exporters import get_backend

    ov = _ov()
    out = Path(out)
    _check_out(out)
    bin_path = out.with_suffix(".bin")
    if (out.exists() or bin_path.exists()) and not force:
        raise BadInput(f"{out}: output already exists (pass --force to replace it)")
    t0 = time.perf_counter()
    onnx_precision = "int8" if precision == "int8" else "fp32"
    report: dict[str, Any] = {"target": "openvino", "precision": precision, "openvino": ov.__version__,
                              "converted_from": "edgediff ONNX export (" + onnx_precision + ")"}
    with tempfile.TemporaryDirectory(prefix="edgediff-ov-") as td:
        onnx_path = Path(td) / "model.onnx"
        onnx_report = get_backend("onnx").export(model, onnx_path, onnx_precision)
        report["onnx_nodes"] = onnx_report.get("nodes") if isinstance(onnx_report, dict) else None
        meta = {"arch": getattr(model, "arch", None), "signature": model.signature.to_dict(),
                "source": str(model.provenance.get("source", ""))}
        m = convert(onnx_path, precision, meta)
        _save_pair(ov, m, out, compress_to_fp16=(precision == "fp16"))
    ops = _op_counts(read_ir(out))
    report.update({"path": str(out), "weights": str(bin_path),
                   "size_bytes": out.stat().st_size + bin_path.stat().st_size, "ops": ops,
                   "fake_quantize": ops.get("FakeQuantize", 0), "seconds": round(time.perf_counter() - t0, 2)})
    return report


def _save_pair(ov: Any, m: Any, out: Path, compress_to_fp16: bool) -> None:
    """.xml and .bin written into a temp dir beside `out`, then renamed (.bin first, so a
    reader never sees an .xml without its weights)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.edgediff-tmp-", dir=out.parent))
    try:
        ov.save_model(m, str(tmp / out.name), compress_to_fp16=compress_to_fp16)
        os.replace(tmp / out.with_suffix(".bin").name, out.with_suffix(".bin"))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


IR_NAME = "openvino_model.xml"  # optimum-intel's file name in each component folder


def convert_bundle_components(folder: Path, components: dict[str, dict[str, Any]], precision: str) -> None:
    """Turn every ONNX component of a bundle being written in `folder` into an OpenVINO IR in place.

    The ONNX bundle's graphs (the denoiser, DeepCache's shallow call, a pipeline's text encoder and
    VAE) are converted one by one, so the IRs keep their tensor names (out_sample, cached_feature)
    and the runtime loop (edgediff.runtime.openvino) drives them as it drives the ONNX pair.
    `components` (the manifest's) is updated: path, size, format, op counts.
    """
    ov = _ov()
    for name, comp in components.items():
        src = folder / str(comp["path"])
        if src.suffix != ".onnx":
            continue  # tokenizer files
        m = convert(src, str(comp.get("precision") or precision), {"component": name, "role": comp.get("role")})
        out = src.parent / IR_NAME
        ov.save_model(m, str(out), compress_to_fp16=(precision == "fp16"))
        for f in src.parent.glob(src.name + "*"):  # the graph and any external-data file beside it
            f.unlink()
        ops = _op_counts(read_ir(out))
        comp.update({"path": str(out.relative_to(folder)), "format": "openvino", "converted_from": "onnx",
                     "size_bytes": out.stat().st_size + out.with_suffix(".bin").stat().st_size,
                     "ir_nodes": sum(ops.values()), "fake_quantize": ops.get("FakeQuantize", 0),
                     "openvino": ov.__version__})


def _op_counts(m: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in m.get_ops():
        t = op.get_type_name()
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def read_meta(m: Any) -> dict[str, Any]:
    try:
        return json.loads(m.get_rt_info([META_KEY, "meta"]).astype(str))
    except Exception:  # noqa: BLE001 - an IR from another tool has no metadata
        return {}


def openvino_info(path: Path) -> dict[str, Any]:
    m = read_ir(path)
    meta = read_meta(m)
    ops = _op_counts(m)
    params = 0
    for op in m.get_ops():
        if op.get_type_name() == "Constant":
            et = op.get_output_element_type(0).get_type_name()
            if et in ("f32", "f16", "i8", "u8", "bf16"):
                params += int(np.prod(list(op.get_output_shape(0)) or [1]))
    precision = meta.get("precision")
    if precision is None:
        precision = "int8" if ops.get("FakeQuantize") else (
            "fp16" if any(op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() == "f16"
                          for op in m.get_ops()) else "fp32")

    def io(ports: Any) -> list[dict[str, Any]]:
        return [{"name": port_name(p), "dtype": p.get_element_type().get_type_name(),
                 "shape": str(p.get_partial_shape())} for p in ports]

    return {"format": "openvino", "precision": precision, "params": params, "nodes": sum(ops.values()), "ops": ops,
            "fake_quantize": ops.get("FakeQuantize", 0), "inputs": io(m.inputs), "outputs": io(m.outputs),
            "arch": meta.get("arch"),
            "size_bytes": Path(path).stat().st_size + Path(path).with_suffix(".bin").stat().st_size}


def structural_check(path: Path, reference: Any = None) -> dict[str, Any]:
    info = openvino_info(path)
    problems = []
    names = [i["name"] for i in info["inputs"]]
    if "sample" not in names or "timestep" not in names:
        problems.append(f"inputs {names} lack sample/timestep")
    if reference is not None:
        want = input_names(reference.signature)
        if names != want:
            problems.append(f"inputs {names} != {want}")
    for i in info["inputs"]:
        if not i["shape"].startswith("[?"):
            problems.append(f"input {i['name']} has a fixed batch axis ({i['shape']})")
    return {"ok": not problems, "problems": problems, "ops": info["ops"], "inputs": info["inputs"],
            "outputs": info["outputs"]}


_CONTRACT_NAMES = ("sample", "timestep", "encoder_hidden_states", "class_labels")


def port_name(port: Any) -> str:
    """The contract name of a port (a port can carry several tensor names after conversion)."""
    names = port.get_names()
    return next((n for n in _CONTRACT_NAMES if n in names), port.get_any_name())


class OpenVinoDenoiser:
    """An OpenVINO IR compiled for the CPU plugin, callable like any edgediff Denoiser."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.compiled = compile_ir(self.path, threads)
        self.request = self.compiled.create_infer_request()
        self.inputs = [port_name(p) for p in self.compiled.inputs]

    def feed(self, x: Any, t: Any, cond: Any = None) -> dict[str, np.ndarray]:
        return contract_feed(self.inputs, x, t, cond, self.path)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        res = self.request.infer(feed)
        return np.asarray(next(iter(res.values())))

    def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
        import torch

        return torch.from_numpy(self.run(self.feed(x, t, cond)).copy()).float()


def _node_modules(compiled: Any, module_of: Any) -> dict[str, str]:
    """Executed node -> module path. The CPU plugin keeps, per executed node, the ONNX nodes it
    was fused from (originalLayersNames), which carry our module paths; nodes its own passes
    created (MVN from GroupNorm, layout reorders) are charged to the module of their input."""
    ops = list(compiled.get_runtime_model().get_ops())
    by_name = {op.get_friendly_name(): op for op in ops}
    memo: dict[str, str] = {}

    def resolve(name: str, depth: int = 0) -> str:
        if name in memo:
            return memo[name]
        op = by_name.get(name)
        found = ""
        cands = [name]
        if op is not None:
            rt = op.get_rt_info()
            if "originalLayersNames" in rt:
                cands = [n for n in rt["originalLayersNames"].astype(str).split(",") if n] + cands
        for c in cands:
            if c.startswith("/") and "_abcd_" not in c and "_acdb_" not in c:
                found = module_of(c.replace("/WithoutBiases", ""))
                break
        if not found and op is not None and depth < 8:
            for inp in op.inputs():
                found = resolve(inp.get_source_output().get_node().get_friendly_name(), depth + 1)
                if found:
                    break
        memo[name] = found
        return found

    return {name: resolve(name) for name in by_name}


def profile_openvino(path: Path, warmup: int = 3, repeats: int = 20, threads: int | None = None,
                     tick: Any = None) -> dict[str, Any]:
    """Per-layer times from OpenVINO's performance counters (PERF_COUNT), in the one profile schema.

    OpenVINO fuses nodes and names each executed node after the ONNX node it came from, which
    carries our module path (/down_blocks.0/resnets.0/conv1/Conv), mapped back with module_of.
    """
    import statistics

    from edgediff.exporters.onnx import module_of

    from edgediff.profiling.ort import time_calls, timing_stats

    ov = _ov()
    compiled = compile_ir(path, threads, perf_count=True)
    req = compiled.create_infer_request()
    feed: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for p in compiled.inputs:
        shape = [d.get_length() if d.is_static else 1 for d in p.get_partial_shape()]
        name = port_name(p)
        if name == "timestep":
            feed[name] = np.full(shape, 500.0, np.float32)
        elif p.get_element_type().get_type_name().startswith("i"):
            feed[name] = np.zeros(shape, np.int64)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    times = time_calls(lambda: req.infer(feed), warmup, repeats, tick)
    per_node: dict[str, list[float]] = {}
    kinds: dict[str, str] = {}
    for _ in range(max(3, min(repeats, 10))):
        req.infer(feed)
        for pi in req.get_profiling_info():
            if pi.status != pi.Status.EXECUTED:
                continue
            per_node.setdefault(pi.node_name, []).append(pi.real_time.total_seconds() * 1000.0)
            kinds[pi.node_name] = f"{pi.node_type}:{pi.exec_type}"
    modules = _node_modules(compiled, module_of)
    by_mod: dict[str, dict[str, Any]] = {}
    for node, ms_list in per_node.items():
        mod = modules.get(node, "")
        row = by_mod.setdefault(mod or "(root)", {"name": mod or "(root)", "ops": {}, "ms": 0.0, "nodes": 0})
        ms = statistics.median(ms_list)
        row["ms"] += ms
        row["nodes"] += 1
        row["ops"][kinds[node]] = row["ops"].get(kinds[node], 0.0) + ms
    total = sum(r["ms"] for r in by_mod.values()) or 1.0
    layers = [{"name": r["name"], "op": "+".join(sorted(r["ops"], key=lambda k: -r["ops"][k])), "ms": r["ms"],
               "share": r["ms"] / total, "nodes": r["nodes"]} for r in by_mod.values()]
    stats = timing_stats(times)
    exec_types: dict[str, int] = {}
    for k in kinds.values():
        et = k.split(":", 1)[1]
        exec_types[et] = exec_types.get(et, 0) + 1
    return {"runtime": "openvino", "runtime_version": ov.__version__, "device": "CPU",
            "threads": threads or "default", "total_ms": stats["median_ms"], "total": stats, "layers": layers,
            "layer_sum_ms": sum(la["ms"] for la in layers), "exec_types": exec_types,
            "layer_timing": "OpenVINO performance counters (PERF_COUNT): real time per executed node, median over runs",
            "estimated": False}


class OpenVinoBackend(Backend):
    target = "openvino"
    precisions = PRECISIONS
    suffixes = (".xml",)

    def available(self) -> tuple[bool, str]:
        return probe(_ov, lambda ov: "OpenVINO " + ov.__version__)

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        ok, why = self.available()
        return (True, why + " CPU plugin") if ok else (False, why)

    def _export(self, model: Any, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        rep = export_openvino(model, out, precision, force=force)
        return ExportReport("openvino", precision, str(out), rep.pop("size_bytes"), extra=rep)

    def load_denoiser(self, path: Path) -> OpenVinoDenoiser:
        ok, why = self.runtime_available(path)
        if not ok:
            raise Unavailable(why)
        return OpenVinoDenoiser(Path(path), threads())

    def check(self, path: Path, reference: Any = None) -> dict[str, Any]:
        return structural_check(Path(path), reference)

    def info(self, path: Path) -> dict[str, Any]:
        return openvino_info(Path(path))


BACKEND = OpenVinoBackend()
