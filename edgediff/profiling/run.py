"""`edgediff profile`: per-layer latency in one schema, whatever the runtime.

profile(EXPORTED) -> {runtime, total_ms, total{median_ms, p10_ms, p90_ms, ...}, layers[{name, op, ms, share}],
                      peak_memory_bytes, layer_timing, estimated, ...}

- runtime ort|tflite: measured here (warm-up, repeats; per-layer from the runtime's profiler
  or op by op, see ort.py / tflite.py);
- runtime tensorrt: TensorRT's IProfiler where `tensorrt` and a GPU are present, else exit 3;
- runtime opencl: the kernels engineer's runtime (edgediff.kernels) when it is built, else exit 3;
- device NAME: a roofline estimate for a device that is not attached (estimate.py), labelled
  `estimated: true`; `this-cpu` is fitted to this machine's measurements first;
- adb SERIAL: LiteRT's benchmark_model on a phone (adb.py);
- EXPORTED may also be a model (a diffusers folder, an artifact, `demo`): it is exported to a
  temporary ONNX file and profiled on onnxruntime, with op coverage per target (coverage.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput, Unavailable

RUNTIMES = ("ort", "tflite", "tensorrt", "opencl", "openvino")
_DEFAULT_RUNTIME = {"onnx": "ort", "tflite": "tflite", "tensorrt": "tensorrt", "opencl": "opencl", "openvino": "openvino"}


def profile(exported: Path, runtime: str | None = None, device: str | None = None, html: Path | None = None,
            adb: str | None = None, *, warmup: int = 3, repeats: int = 20, threads: int | None = None,
            progress: Any = None, force: bool = False) -> dict[str, Any]:
    """Profile an exported model (or a model, exported to ONNX on the fly); see the module docstring."""
    if runtime is not None and runtime not in RUNTIMES:
        raise BadInput(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if warmup < 0 or repeats < 1:
        raise BadInput(f"warmup {warmup} / repeats {repeats}: need warmup >= 0 and repeats >= 1")
    if html is not None and Path(html).exists() and not force:
        raise BadInput(f"{html}: output already exists (pass --force to replace it)")
    if device is not None:
        from edgediff.profiling.estimate import device_names

        if device not in device_names():
            raise BadInput(f"--device {device!r}: unknown device; expected one of {', '.join(device_names())}")
    path = Path(exported)
    target = _target(path)
    if target is None:  # not an exported file: a model spec
        return _profile_model(str(exported), runtime, device, html, adb, warmup, repeats, threads, progress, force)
    result = _profile_file(path, target, runtime, device, adb, warmup, repeats, threads, progress)
    if html is not None:
        from edgediff.profiling.html import write_report

        write_report(Path(html), result, force=force)
        result["html"] = str(html)
    return result


def _target(path: Path) -> str | None:
    from edgediff.exporters import target_of

    if not path.exists():
        if str(path) == "demo":
            return None
        raise BadInput(f"{path}: no such file or directory")
    try:
        return target_of(path)
    except BadInput:
        if path.is_dir() or path.suffix in (".safetensors", ".pt", ".pt2", ".json"):
            return None
        raise


def _tick(progress: Any, description: str, total: int) -> Any:
    if progress is None:
        return None
    task = progress.add_task(description, total=total)
    return lambda: progress.advance(task)


def _profile_file(path: Path, target: str, runtime: str | None, device: str | None, adb: str | None, warmup: int,
                  repeats: int, threads: int | None, progress: Any) -> dict[str, Any]:
    if adb is not None:
        if target != "tflite":
            raise BadInput(f"{path}: --adb runs LiteRT's benchmark_model and needs a .tflite file")
        from edgediff.profiling.adb import profile_adb

        return profile_adb(path, adb, warmup=warmup, repeats=repeats, threads=threads)
    if device is not None and runtime is None:
        return _estimate_file(path, target, device, threads, warmup, repeats, progress)
    rt = runtime or _DEFAULT_RUNTIME.get(target)
    if rt is None:
        if target == "coreml":
            raise Unavailable(f"{path}: Core ML models run only on macOS/iOS; profile them with Xcode's Core ML "
                              "performance report, or pass --device a17pro-gpu / a17pro-ane for an estimate")
        raise BadInput(f"{path}: no runtime profiles {target} exports here; pass --device NAME for an estimate")
    result = _measure(path, target, rt, warmup, repeats, threads, progress)
    try:
        attach_work(result, _graph_ops(path, target))
    except BadInput:
        pass  # no op graph to read (an engine file): layers keep their times only
    if device is not None:
        result["estimate"] = _estimate_file(path, target, device, threads, warmup, repeats, progress, measured=result)
    return result


def _measure(path: Path, target: str, rt: str, warmup: int, repeats: int, threads: int | None,
             progress: Any) -> dict[str, Any]:
    if rt == "ort":
        if target not in ("onnx", "tensorrt") or path.suffix.lower() != ".onnx":
            raise BadInput(f"{path}: --runtime ort needs an .onnx file")
        from edgediff.profiling.ort import profile_ort

        return profile_ort(path, warmup, repeats, threads, _tick(progress, "onnxruntime", warmup * 2 + repeats + 15))
    if rt == "tflite":
        if target != "tflite":
            raise BadInput(f"{path}: --runtime tflite needs a .tflite file")
        from edgediff.profiling.tflite import profile_tflite

        return profile_tflite(path, warmup, repeats, threads, _tick(progress, "LiteRT", None))
    if rt == "tensorrt":
        from edgediff.profiling.trt import profile_tensorrt

        return profile_tensorrt(path, warmup, repeats)
    if rt == "opencl":
        return _profile_opencl(path, warmup, repeats)
    if rt == "openvino":
        if target != "openvino":
            raise BadInput(f"{path}: --runtime openvino needs an OpenVINO IR (.xml + .bin)")
        from edgediff.exporters.openvino import profile_openvino

        return profile_openvino(path, warmup, repeats, threads, _tick(progress, "OpenVINO", warmup + repeats))
    raise BadInput(f"--runtime {rt!r}: expected one of {', '.join(RUNTIMES)}")


def _profile_opencl(path: Path, warmup: int, repeats: int) -> dict[str, Any]:
    """The OpenCL runtime profiles itself with OpenCL event timestamps:
    `edgediff.kernels.export.profile(bundle, warmup=, repeats=) -> {total_ms, layers[{name, op, ms}]}`."""
    from edgediff.kernels.export import profile

    res = dict(profile(path, warmup=warmup, repeats=repeats))
    total = sum(la["ms"] for la in res.get("layers", [])) or 1.0
    for la in res.get("layers", []):
        la.setdefault("share", la["ms"] / total)
    res.setdefault("runtime", "opencl")
    res.setdefault("estimated", False)
    return res


def attach_work(result: dict[str, Any], ops: list[Any]) -> None:
    """Add each layer's MACs and bytes (from the op graph, by module name) to a measured profile.

    A runtime's optimizer fuses nodes and names the fused node after one of them (ORT's Conv+Add
    of a resnet's conv2 and residual is named after the Add, i.e. the resnet): an op whose module
    has no measured layer of its own is counted at its nearest measured ancestor, so the layers'
    MACs add up to the model's."""
    names = {la["name"] for la in result.get("layers", [])}

    def home(key: str) -> str:
        k = key
        while k and k not in names:
            k = k.rpartition(".")[0]
        return k if k in names else key

    macs: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for o in ops:
        key = home(o.name or "(root)")
        macs[key] = macs.get(key, 0) + o.macs
        nbytes[key] = nbytes.get(key, 0) + o.bytes
    for la in result.get("layers", []):
        if la["name"] in macs:
            la["macs"] = macs[la["name"]]
            la["bytes"] = nbytes[la["name"]]
    result["macs"] = sum(macs.values())
    # work the measured layers do not account for (ops of modules with no measured ancestor)
    result["macs_unattributed"] = sum(v for k, v in macs.items() if k not in names)


def _graph_ops(path: Path, target: str) -> list[Any]:
    from edgediff.profiling.graph import onnx_ops, tflite_ops

    if path.suffix.lower() == ".onnx":
        return onnx_ops(path)
    if target == "tflite":
        return tflite_ops(path)
    if target == "opencl" and path.is_dir():
        # what the bundle's fused kernels read and write (edgediff.kernels.cost), not an exporter's op graph
        from edgediff.kernels.cost import bundle_work
        from edgediff.profiling.graph import OpWork

        return [OpWork(**w) for w in bundle_work(path)]
    for name in ("model.onnx", "graph.onnx"):  # bundles that carry their source graph
        if path.is_dir() and (path / name).is_file():
            return onnx_ops(path / name)
    raise BadInput(f"{path}: device estimates read the op graph of an .onnx or .tflite file; "
                   f"export the model to ONNX and pass that")


def _estimate_file(path: Path, target: str, device: str, threads: int | None, warmup: int, repeats: int,
                   progress: Any, measured: dict[str, Any] | None = None) -> dict[str, Any]:
    from edgediff.profiling.estimate import calibrate, estimate_profile

    ops = _graph_ops(path, target)
    calib = None
    if device == "this-cpu":
        # fit the CPU model to a measured profile of this very graph, and say how well it fits
        if measured is None or measured.get("runtime") != "ort":
            if path.suffix.lower() != ".onnx":
                raise BadInput(f"{path}: --device this-cpu calibrates on onnxruntime and needs an .onnx file")
            from edgediff.profiling.ort import profile_ort

            measured = profile_ort(path, warmup, repeats, threads, _tick(progress, "calibrating on onnxruntime", None))
        calib = calibrate(ops, measured, threads)
    res = estimate_profile(ops, device, threads)
    if calib is not None:
        res["calibration"] = calib
        res["measured_total_ms"] = measured["total_ms"] if measured else None
    return res


def _profile_model(spec: str, runtime: str | None, device: str | None, html: Path | None, adb: str | None, warmup: int,
                   repeats: int, threads: int | None, progress: Any, force: bool) -> dict[str, Any]:
    """A model (not an exported file): op coverage per target + a profile of a temporary ONNX export."""
    from edgediff.loaders import load_model
    from edgediff.profiling.coverage import coverage

    if adb is not None:
        raise BadInput(f"{spec}: --adb needs a .tflite file (export one with --target tflite)")
    if runtime not in (None, "ort"):
        raise BadInput(f"{spec}: is a model, not an exported file; export it first to profile on {runtime}")
    model = load_model(spec)
    with tempfile.TemporaryDirectory(prefix="edgediff-profile-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        how = export_onnx(model, onnx_path)
        result = _profile_file(onnx_path, "onnx", runtime, device, None, warmup, repeats, threads, progress)
        from edgediff.profiling.graph import onnx_ops

        ops = onnx_ops(onnx_path)
    result["source"] = {"model": spec, "exported_with": how, "arch": model.arch}
    result["coverage"] = coverage(ops)
    if html is not None:
        from edgediff.profiling.html import write_report

        write_report(Path(html), result, force=force)
        result["html"] = str(html)
    return result


def export_onnx(model: Any, out: Path) -> str:
    """`model` as fp32 ONNX through the project's exporter; returns which exporter wrote it."""
    from edgediff.exporters import get_backend

    get_backend("onnx").export(model, out, "fp32")
    return "edgediff.exporters.onnx"


def summary_table(result: dict[str, Any], top: int = 15) -> Any:
    """A human-readable view of a profile for the terminal (the CLI without --json)."""
    from rich.table import Table

    est = bool(result.get("estimated"))
    tot = result.get("total") or {}
    spread = f" (p10-p90 {tot['p10_ms']:.3f}-{tot['p90_ms']:.3f})" if "p10_ms" in tot else ""
    title = (f"{'ESTIMATED ' if est else ''}profile on {result.get('runtime')}: "
             f"{result.get('total_ms', float('nan')):.3f} ms per call{spread}")
    t = Table(title=title)
    for c in ("layer (source module)", "op", "ms", "share", "MACs", "bound" if est else "nodes"):
        t.add_column(c, justify="left" if c.startswith(("layer", "op")) else "right")
    for la in sorted(result.get("layers", []), key=lambda la: -(la["ms"] if la["ms"] == la["ms"] else 0))[:top]:
        t.add_row(la["name"], la["op"][:40], f"{la['ms']:.4f}", f"{la.get('share', 0):.1%}",
                  f"{la['macs']:,}" if "macs" in la else "", str(la.get("bound" if est else "nodes", "")))
    notes = []
    if result.get("peak_memory_bytes"):
        notes.append(f"peak memory {result['peak_memory_bytes']:,} bytes")
    if est and result.get("note"):
        notes.append(result["note"])
    cov = result.get("coverage")
    if isinstance(cov, dict):
        notes.append("MACs falling back: " + ", ".join(
            f"{k} {v['macs_share_fallback']:.1%}" for k, v in cov.items() if isinstance(v, dict) and "macs_share_fallback" in v))
    if result.get("html"):
        notes.append(f"report: {result['html']}")
    t.caption = "; ".join(notes) + (" (--json for every field)" if notes else "--json for every field")
    return t
