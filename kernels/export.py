"""The "opencl" backend: a bundle directory (op schedule + .cl sources + weights) and its runtime.

Bundle layout (written atomically):
    opencl_bundle.json     marker + format version, precision, signature, the op schedule
    kernels/*.cl           the OpenCL C sources the runtime compiles (the bundle is self-contained)
    weights.safetensors    weights by name (float16 for fp16 bundles, except biases/affines: float32)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgediff.exporters.base import PRECISIONS, Backend, ExportReport

from edgediff.artifact import atomic_dir
from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

MARKER = "opencl_bundle.json"
FORMAT = "edgediff-opencl-bundle"
FORMAT_VERSION = 1


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def read_bundle(path: Path) -> dict[str, Any]:
    from edgediff.runtime.bundle import read_manifest

    path = Path(path)
    mf, meta = read_manifest(path, MARKER, "an OpenCL bundle")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{mf}: unsupported bundle format {meta.get('format')!r} v{meta.get('format_version')!r} "
                       f"(this edgediff reads {FORMAT} v{FORMAT_VERSION})")
    from edgediff.safety import child_path

    # every file the manifest names must stay inside the bundle (no '..', absolute path or symlink out)
    kernels = meta.get("kernels", [])
    if not isinstance(kernels, list):
        raise BadInput(f"{mf}: 'kernels' must be a list of file names")
    for name in kernels:
        if not child_path(path / "kernels", name, str(mf), "kernel file").is_file():
            raise BadInput(f"{path}: bundle is missing kernels/{name}")
    weights = meta.get("weights", "weights.safetensors")
    if not child_path(path, weights, str(mf), "weights file").is_file():
        raise BadInput(f"{path}: bundle is missing {weights}")
    return meta


class OpenCLDenoiser:
    """A bundle on an OpenCL device, callable as denoiser(x, t, cond) -> eps (float32 torch tensors)."""

    def __init__(self, path: Path, device: Any = None, conv_algo: str = "auto", profiling: bool = False,
                 profile: Any = None) -> None:
        from edgediff.kernels.graph import Executor
        from edgediff.kernels.runtime import CLRuntime
        from safetensors.numpy import load_file

        path = Path(path)
        meta = read_bundle(path)
        sources = {n: (path / "kernels" / n).read_text() for n in meta["kernels"]}
        self.meta = meta
        # int8 bundles keep float activations between integer convs: an fp32 runtime
        self.rt = CLRuntime(device, precision="fp16" if meta["precision"] == "fp16" else "fp32", sources=sources,
                            profiling=profiling, profile=profile)
        try:
            weights = load_file(str(path / meta["weights"]))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise BadInput(f"{path / meta['weights']}: unreadable weights ({e})") from None
        self.executor = Executor(meta["schedule"], weights, self.rt, conv_algo=conv_algo)
        self.notes = self.rt.notes

    def describe(self) -> dict[str, Any]:
        return self.rt.describe()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.executor.run(x, t, cond=cond)

    def profile(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> list[tuple[str, str, float]]:
        """Per-op times (ms) of one call, [(module name, op, ms)]: with a profiling queue, the sum of
        the op's kernels' OpenCL event times (CL_PROFILING_COMMAND_END - START), the queue never
        drained in between; otherwise wall time with the queue drained after every op."""
        timings: list[tuple[str, str, float]] = []
        self.executor.run(x, t, timings, cond=cond)
        return timings

    def kernel_times(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> list[tuple[str, str, float]]:
        """Every kernel of one call: [(module name, kernel name, ms)] from event timestamps (profiling=True)."""
        if not self.rt.profiling:
            raise BadInput("opencl bundle: kernel_times needs OpenCLDenoiser(..., profiling=True)")
        self.rt.event_times()
        self.executor.run(x, t, cond=cond)
        return self.rt.event_times()


class OpenCLBackend(Backend):
    target = "opencl"
    precisions = PRECISIONS
    marker = MARKER

    def available(self) -> tuple[bool, str]:
        # writing a bundle needs only torch and safetensors; running it needs a device (runtime_available)
        return True, "bundle export needs no OpenCL device"

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        from edgediff.kernels.runtime import opencl_available

        return opencl_available()

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        from edgediff.kernels.graph import F32_SUFFIXES, build_schedule
        from edgediff.kernels.runtime import kernel_sources
        from safetensors.torch import save_file

        quant = None
        if precision == "int8":
            from edgediff.quant_params import QuantParams

            quant = QuantParams.of(model)
            if quant is None:
                raise BadInput("opencl target: int8 needs a quantized model (an artifact from a quant recipe, with "
                               "QuantParams); this one has none")
        sched, weights = build_schedule(model, quant)
        if precision == "fp16":
            weights = {k: (v if k.endswith(F32_SUFFIXES) else v.half()) for k, v in weights.items()}
        out = Path(out)
        srcs = kernel_sources()
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "precision": precision,
                "signature": model.signature.to_dict(), "arch": model.arch,
                "provenance": {k: v for k, v in model.provenance.items() if isinstance(v, (str, int, float, bool))},
                "quantized_source": bool(model.extras.get("quant")), "kernels": sorted(srcs),
                "integer_layers": sum(op["op"] in ("iconv", "qconv") for op in sched["ops"]),
                "weights": "weights.safetensors", "schedule": sched}
        from edgediff.kernels.deepcache import sampling_record

        meta.update(sampling_record(model))  # so that `generate BUNDLE` samples as the artifact is meant to
        if model.extras.get("cache"):  # DeepCache: a shallow schedule over the same weights (kernels/deepcache.py)
            from edgediff.kernels.deepcache import cached_schedules

            meta["schedule_shallow"], meta["cache"] = cached_schedules(model, sched, model.extras["cache"])
        with atomic_dir(out, force=force) as tmp:
            (tmp / "kernels").mkdir()
            for name, text in srcs.items():
                (tmp / "kernels" / name).write_text(text)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        report: dict[str, Any] = {"ops": len(sched["ops"]), "op_histogram": dict(Counter(op["op"] for op in sched["ops"])),
                  "params": int(sum(v.numel() for k, v in weights.items() if not k.endswith(".freqs")))}
        if precision == "int8":
            report["integer_layers"] = meta["integer_layers"]
        if meta.get("cache"):
            report["cache"] = meta["cache"]
        elif meta["quantized_source"] and precision != "int8":
            report["note"] = ("the model carries quantization parameters; this float bundle uses its on-grid weights "
                              "but does not quantize activations")
        return ExportReport(self.target, precision, str(out), _dir_size(out), extra=report)

    def load_denoiser(self, path: Path) -> OpenCLDenoiser:
        """The bundle on the default device (OpenCLDenoiser takes a device and a conv algorithm)."""
        ok, why = self.runtime_available(path)
        if not ok:
            raise Unavailable(f"cannot run OpenCL bundle {path}: {why}")
        den = OpenCLDenoiser(Path(path))
        if den.meta.get("cache"):  # full + shallow schedules driven per sampler step
            from edgediff.kernels.deepcache import CachedOpenCLDenoiser

            return CachedOpenCLDenoiser(den, Path(path))
        return den

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        """Structural check without a device: the bundle's schedule and weights against the reference's."""
        from edgediff.kernels.graph import build_schedule
        from safetensors import safe_open

        meta = read_bundle(Path(path))
        if reference is None:  # read_bundle has checked the manifest, kernels and weights file exist
            return {"ok": True, "problems": [], "op_histogram": dict(Counter(o["op"] for o in meta["schedule"]["ops"])),
                    "note": "no reference model given: bundle files checked, schedule not compared"}
        quant = None
        if meta["precision"] == "int8":
            from edgediff.quant_params import QuantParams

            quant = QuantParams.of(reference)
        sched, weights = build_schedule(reference, quant)
        problems = []
        if [(o["op"], o["name"]) for o in sched["ops"]] != [(o["op"], o["name"]) for o in meta["schedule"]["ops"]]:
            problems.append("op schedule differs from the reference model's")
        with safe_open(str(Path(path) / meta["weights"]), "np") as f:
            names = set(f.keys())
            for k, v in weights.items():
                if k not in names:
                    problems.append(f"missing weight {k}")
                elif tuple(f.get_slice(k).get_shape()) != tuple(v.shape):
                    problems.append(f"weight {k} has shape {f.get_slice(k).get_shape()}, reference {list(v.shape)}")
        sig = reference.signature
        inputs: dict[str, list[Any]] = {"sample": ["B", *sig.sample_shape], "timestep": ["B"]}
        if "encoder_hidden_states" in meta["schedule"]["inputs"]:
            inputs["encoder_hidden_states"] = ["B", *meta["schedule"]["cond_shape"]]
        if "class_labels" in meta["schedule"]["inputs"]:
            inputs["class_labels"] = ["B"]
        return {"inputs": inputs,
                "outputs": {"out": ["B", meta["schedule"]["out_channels"], *sig.sample_shape[1:]]},
                "dtypes": {"activations": "float16" if meta["precision"] == "fp16" else "float32",
                           "weights": "int8 (integer layers)" if meta["precision"] == "int8" else meta["precision"]},
                "op_histogram": dict(Counter(o["op"] for o in meta["schedule"]["ops"])),
                "ok": not problems, "problems": problems[:10]}

    def info(self, path: Path) -> dict[str, Any]:
        meta = read_bundle(Path(path))
        ops = meta["schedule"]["ops"]
        from safetensors import safe_open

        with safe_open(str(Path(path) / meta["weights"]), "np") as f:
            # the timestep frequencies are a constant table, not a parameter of the model
            params = int(sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if not k.endswith(".freqs")))
        return {"target": self.target, "precision": meta["precision"], "arch": meta.get("arch"),
                "signature": meta["signature"], "ops": len(ops), "op_histogram": dict(Counter(o["op"] for o in ops)),
                "params": params, "size_bytes": _dir_size(Path(path)), "kernels": meta["kernels"],
                "cache": meta.get("cache"), "sampling": meta.get("sampling")}


BACKEND = OpenCLBackend()


def profile(bundle: Any, warmup: int = 3, repeats: int = 20, batch: int = 1, device: Any = None) -> dict[str, Any]:
    """Time an OpenCL bundle on the device: total_ms is the median of `repeats` whole calls (wall
    time, queue drained once per call); layers [{name, op, ms, kernels}] are medians over up to 5
    calls of the op's kernels' OpenCL event times (CL_QUEUE_PROFILING_ENABLE queue,
    CL_PROFILING_COMMAND_END - START per kernel, the queue not drained between ops); names are
    the model's module names. `gpu` says whether the device is a GPU; when it is not, `note`
    says that this profile did not run on one."""
    import statistics
    import time
    from pathlib import Path

    import torch

    den = OpenCLDenoiser(Path(bundle), device=device, profiling=True)
    shape = den.meta["signature"]["sample_shape"]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500.0)
    from edgediff.model import InputSignature

    cond = InputSignature.from_dict(den.meta["signature"]).conditioning(batch)  # None for unconditional UNets
    if isinstance(cond, dict):
        cond = {k: v for k, v in cond.items() if k in den.meta["schedule"]["inputs"]}
    for _ in range(max(warmup, 1)):
        den(x, t, cond)
    totals = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        den(x, t, cond)  # returns after reading the output back, i.e. after the queue drained
        totals.append((time.perf_counter() - t0) * 1e3)
    runs = [den.profile(x, t, cond) for _ in range(max(1, min(repeats, 5)))]
    kern = den.kernel_times(x, t, cond)
    layers = [{"name": name, "op": op, "ms": statistics.median(r[i][2] for r in runs),
               "kernels": [k for lab, k, _ in kern if lab == name]}
              for i, (name, op, _) in enumerate(runs[0])]
    d = den.rt.describe()
    gpu = bool(den.rt.device.type & den.rt.cl.device_type.GPU)
    out = {"runtime": "opencl", "device": d["device"], "platform": d["platform"], "gpu": gpu,
           "precision": den.rt.precision, "total_ms": statistics.median(totals), "batch": batch, "layers": layers,
           "layer_timing": "OpenCL event timestamps (CL_PROFILING_COMMAND_START/END), summed per op, median of "
                           f"{len(runs)} calls", "kernels_per_call": len(kern),
           "variants": d["variants"], "notes": den.notes}
    if not gpu:
        out["note"] = (f"did not run on a GPU: {d['device']} ({d['platform']}) is not a GPU device; "
                       "per-kernel times are that device's")
    if den.meta.get("cache"):  # DeepCache: the shallow schedule's time and the per-image total it gives
        from edgediff.kernels.deepcache import profile_cached

        out["cache"] = profile_cached(den, Path(bundle), x, t, cond, out["total_ms"], warmup, repeats)
    return out
