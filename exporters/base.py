"""The backend contract every export target implements (see docs/architecture.md, "Adding a target").

A target is one subclass of `Backend` in its own module, exposed as the module attribute
`BACKEND` and listed in `edgediff.exporters.TARGETS`. Callers (cli, verify, describe, the
demo, profiling) use only the methods declared here; nothing is probed with `hasattr`.

    target, precisions, suffixes/marker     what it is and which files are its
    available() / runtime_available(path)    can this machine build / run it (and why not)
    export(model, out, precision, options, progress) -> ExportReport
                                             template: the shared preamble, then `_export`
    load_denoiser(path)                      the exported file in its real runtime (a Denoiser)
    info(path) / check(path, reference)      what the file is; a structural check without running it

Also here, because every backend needs them and each had its own copy: `PRECISIONS`,
`input_names`, `float_denoiser`, `FixedBatchDenoiser` (chunk-and-pad for runtimes whose
files have a fixed batch) and the process-wide thread count set by `--threads`.
"""

from __future__ import annotations

import copy
import importlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edgediff.errors import BadInput, Unavailable
from edgediff.model import Cond, DenoiserModule, DiffusionModel, InputSignature
from edgediff.quant_params import QuantParams, strip_quant_wrappers

# every precision a target can be asked for; each backend declares the subset it builds
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
OUTPUT_NAME = "out"
# the common keys of an export report, in the order tables show them
REPORT_KEYS = ("target", "precision", "path", "size_bytes", "seconds")

_threads: int | None = None

# why a target's export of a DeepCache artifact holds only the full call: none today (both entry points:
# onnx/tflite/openvino/tensorrt `-o DIR` bundles, a coreml multifunction package, opencl bundles, fpga
# projects); the single-file onnx/tflite/openvino/tensorrt exports point to their bundle. A new target
# without a shallow entry states its reason here (tests/test_deepcache_opencl.py checks every target).
DEEPCACHE_MISSING: dict[str, str] = {}


def deepcache_record(model: DiffusionModel) -> dict[str, Any] | None:
    """What a backend writes beside DeepCache's two entry points for the device's sampler loop: depth,
    interval, the feature's shape, the recorded sampler and which of its steps run the full call
    (edgediff.runtime.cache_schedule); None for a model without a cache schedule."""
    from edgediff.deepcache import cache_config
    from edgediff.passes.sampling import sampling_of
    from edgediff.runtime.bundle import FEATURE_NAME
    from edgediff.runtime.cache_schedule import schedule_record

    cache = cache_config(model)
    if cache is None:
        return None
    samp = sampling_of(model)
    return {"depth": int(cache["depth"]), "interval": int(cache["interval"]), "feature": FEATURE_NAME,
            "feature_shape": cache.get("feature_shape"), "sampler": samp["sampler"],
            **schedule_record(cache, int(samp["steps"]))}


def set_threads(n: int | None) -> None:
    """Threads for every runtime edgediff drives (torch, onnxruntime, LiteRT); None: all cores."""
    global _threads
    if n is not None and n < 1:
        raise BadInput(f"--threads {n}: expected a positive number of threads")
    _threads = n
    if n is not None:
        torch.set_num_threads(n)


def threads() -> int | None:
    """The thread count set by `--threads` (None: the runtime's default, all cores)."""
    return _threads


# Native libraries write to the file descriptors themselves (LiteRT/TF's C++ logs, the XNNPACK
# delegate, litert-torch's converter stages): unless --verbose, exports and runtime loads run with
# fds 1 and 2 pointed at a temporary file whose lines land in NATIVE_LOG (OUTPUT/edgediff.log).
_capture_native = [False]
NATIVE_LOG: list[str] = []


def capture_native_output(on: bool) -> None:
    """Whether `native_output_captured` captures (the CLI turns it on unless --verbose)."""
    _capture_native[0] = on


@contextmanager
def native_output_captured() -> Iterator[None]:
    """Run the block with what native code prints to fds 1/2 captured into NATIVE_LOG (when on)."""
    if not _capture_native[0]:
        yield
        return
    import sys
    import tempfile

    def flush() -> None:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (AttributeError, OSError, ValueError):
                pass

    with tempfile.TemporaryFile() as tmp, open(tmp.fileno(), "w", closefd=False, buffering=1) as text:
        flush()
        saved = os.dup(1), os.dup(2)
        py = sys.stdout, sys.stderr
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            sys.stdout = sys.stderr = text  # Python-level prints too (sys.stdout may not be fd 1)
            yield
        finally:
            flush()
            sys.stdout, sys.stderr = py
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            NATIVE_LOG.extend(ln for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())
            del NATIVE_LOG[:-20_000]


def input_names(sig: InputSignature) -> list[str]:
    """The exported inputs in contract order (all targets): sample, timestep[, cond][, class_labels][, extras]."""
    return sig.input_names()


def contract_feed(inputs: list[str], x: torch.Tensor, t: torch.Tensor, cond: Any, where: Path) -> dict[str, Any]:
    """numpy feeds by the exported-file contract for a runtime whose file declares `inputs`.

    `cond` is a tensor (encoder_hidden_states or class_labels, whichever the file takes) or a dict
    of named inputs (multi-input models); integer tensors and class_labels go in as int64.
    """
    feed = {"sample": x.detach().float().cpu().numpy(), "timestep": t.detach().float().cpu().numpy()}
    if isinstance(cond, dict):
        for name in inputs:
            if name in ("sample", "timestep"):
                continue
            if name not in cond:
                raise BadInput(f"{where}: the model needs {name}")
            v = cond[name].detach().cpu()
            feed[name] = (v.long() if name == "class_labels" or not v.is_floating_point() else v.float()).numpy()
        return feed
    if "encoder_hidden_states" in inputs:
        if cond is None:
            raise BadInput(f"{where}: the model needs encoder_hidden_states")
        feed["encoder_hidden_states"] = cond.detach().float().cpu().numpy()
    if "class_labels" in inputs:
        if cond is None:
            raise BadInput(f"{where}: the model needs class_labels")
        feed["class_labels"] = cond.detach().long().cpu().numpy()
    return feed


def float_denoiser(model: DiffusionModel) -> nn.Module:
    """A float32 copy of the denoiser without quantization wrappers or fp16 hooks (the caller's model is untouched).

    The wrappers' weights already lie on the quantization grid, so the float graph is what an
    exporter traces; int8 exporters then insert their own Q/DQ from QuantParams.
    """
    den = copy.deepcopy(model.denoiser)
    if isinstance(den, DenoiserModule):
        den = den.inner
    strip_quant_wrappers(den)
    for m in den.modules():
        # the fp16 pass keeps norms in fp32 through hooks; an exported graph is uniformly typed
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return den.float().eval()


@dataclass
class ExportReport(Mapping[str, Any]):
    """What an export wrote: the common keys plus whatever the target adds in `extra`.

    It reads like the flat dict the CLI prints (`report["ops"]`, `report.get("exit_code")`):
    common keys first, then `extra`; `to_dict()` gives exactly that dict.
    """

    target: str
    precision: str
    path: str
    size_bytes: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in REPORT_KEYS}, **{k: v for k, v in self.extra.items()
                                                                 if k not in REPORT_KEYS}}

    def __getitem__(self, key: str) -> Any:
        if key in REPORT_KEYS:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def check_precision(target: str, precision: str) -> None:
    """BadInput unless `precision` is one edgediff knows (the backend's own list is checked by export)."""
    if precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r} for {target}; expected one of {', '.join(PRECISIONS)}")


def check_batch(target: str, batch: Any) -> None:
    """BadInput unless the fixed batch option is a positive integer."""
    if not isinstance(batch, int) or batch < 1:
        raise BadInput(f"{target} option batch={batch!r}: expected a positive integer")


def int8_quant_params(model: DiffusionModel, precision: str, other: str = "") -> QuantParams | None:
    """The model's QuantParams; BadInput when int8 is asked of a model without them (`other`: an
    alternative the target offers, said in the message)."""
    qp = QuantParams.of(model)
    if precision == "int8" and qp is None:
        raise BadInput("int8 export needs quantization parameters: compress the model with a quantizing recipe "
                       f"(e.g. --recipe w8a8) and export the artifact{other}")
    return qp


def probe(load: Callable[[], Any], ok: str | Callable[[Any], str]) -> tuple[bool, str]:
    """An `available`/`runtime_available` answer: (True, ok) when load() works, (False, its
    reason) when it raises Unavailable; `ok` may be a function of what load returned (a version)."""
    try:
        got = load()
    except Unavailable as e:
        return False, str(e)
    return True, ok(got) if callable(ok) else ok


def probe_import(module: str, missing: str) -> tuple[bool, str]:
    """(True, "module version") when `module` imports, else (False, `missing`: what to install)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False, missing
    return True, f"{module} {mod.__version__}"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class Backend(ABC):
    """One export target. Subclasses set the class attributes and implement the abstract methods."""

    target: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    # file suffixes this target writes and recognises (lower case); bundles use `marker` instead
    suffixes: ClassVar[tuple[str, ...]] = ()
    marker: ClassVar[str | None] = None  # the file inside a bundle directory that says "this target"
    # option names `export` accepts (e.g. {"batch", "palettize"}); anything else is BadInput
    options: ClassVar[frozenset[str]] = frozenset()
    # a QDQ-quantized .onnx file (not a model) is a valid source (the FPGA flow)
    takes_onnx_source: ClassVar[bool] = False
    # appended to the message for an unsupported precision (what to pass instead)
    precision_hint: ClassVar[str] = ""
    # the runtime computes the non-integer ops of an int8 export (norms, activations, softmax) in float,
    # as the PyTorch simulation does, so verify holds it to the per-call rule (edgediff/verify.py);
    # False where those ops are fixed-point units of their own (the FPGA), checked against their C-simulation
    float_nonlinear_ops: ClassVar[bool] = True

    # ---- capability
    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, what) when this machine can build the target, else (False, what to install)."""

    @abstractmethod
    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        """(True, which runtime) when this machine can run an exported file, else (False, why not)."""

    # ---- export: the template
    def export(self, model: Any, out: Path, precision: str, options: Mapping[str, Any] | None = None,
               progress: Any = None, *, force: bool = False, **more_options: Any) -> ExportReport:
        """Check the request, then `_export`; the report's path, size and seconds are filled in here.

        Options may come as a dict or as keywords (`export(m, out, "fp32", batch=2)`). Outputs are
        written atomically by `_export` (edgediff.artifact.atomic_file/atomic_dir): an interrupted
        export leaves nothing behind.
        """
        out = Path(out)
        opts = {**(options or {}), **more_options}
        if precision not in self.precisions:
            raise BadInput(f"{self.target} target: precision {precision!r} is not supported; expected one of "
                           f"{', '.join(self.precisions)}{self.precision_hint}")
        unknown = set(opts) - set(self.options)
        if unknown:
            takes = f"it takes {', '.join(sorted(self.options))}" if self.options else "it takes none"
            raise BadInput(f"{self.target} target: unknown option(s) {', '.join(sorted(unknown))} ({takes})")
        self.check_output(out)
        if out.exists() and not force:
            raise BadInput(f"{out}: output already exists (pass --force to replace it)")
        onnx_source = self.takes_onnx_source and isinstance(model, (str, Path))
        if onnx_source:
            if Path(model).suffix.lower() != ".onnx":
                raise BadInput(f"{model}: the {self.target} target takes a QDQ-quantized .onnx or an edgediff artifact")
        elif not isinstance(model, DiffusionModel):
            raise BadInput(f"the {self.target} target exports a model or an artifact, not {type(model).__name__}")
        with native_output_captured():  # probing imports the toolchain (TF/absl print at import)
            ok, why = self.available()
        if not ok and self.needs_toolchain_to_export():
            raise Unavailable(f"the {self.target} target cannot be built here: {why}")
        task = progress.add_task(f"export {self.target} {precision}", total=None) if progress is not None else None
        t0 = time.perf_counter()
        try:
            with native_output_captured():
                report = self._export(model, out, precision, opts, progress, force)
        finally:
            if task is not None:
                progress.remove_task(task)
        report.seconds = round(time.perf_counter() - t0, 2)
        report.path = str(out)
        if not report.size_bytes:
            report.size_bytes = _size(out)
        if isinstance(model, DiffusionModel) and model.extras.get("cache"):
            # never a silent drop: this output holds the full UNet; DeepCache's shallow call is in the bundles
            why = DEEPCACHE_MISSING.get(self.target, "use `-o DIR` for the bundle with both entry points")
            report.extra.setdefault("cache", f"not exported: a {self.target} output holds the full UNet only ({why}); "
                                    "the full + shallow entry points are written by `export --target "
                                    "onnx|tflite|openvino|tensorrt -o DIR` and `--target opencl`")
        return report

    def check_output(self, out: Path) -> None:
        """BadInput unless `out` has a suffix this target writes (bundles: any directory name)."""
        if self.suffixes and out.suffix.lower() not in self.suffixes:
            raise BadInput(f"{out}: a {self.target} export must end in {' or '.join(self.suffixes)}")

    def needs_toolchain_to_export(self) -> bool:
        """Whether export itself needs `available()`; targets that write a project without their toolchain say no."""
        return True

    @abstractmethod
    def _export(self, model: Any, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        """Write `out` atomically (the request is already checked) and describe it."""

    # ---- the exported file
    @abstractmethod
    def load_denoiser(self, path: Path) -> Any:
        """The exported file in its real runtime: a callable (x, t, cond) -> eps on torch tensors.

        Unavailable (exit 3) when the runtime is missing here; BadInput for a file it cannot read.
        Thread count: `threads()`.
        """

    @abstractmethod
    def info(self, path: Path) -> dict[str, Any]:
        """What the exported file is: format, precision, params, ops (and macs where the format allows)."""

    @abstractmethod
    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        """A structural check without running the file: {"ok": bool, "problems": [...], ...}.

        With `reference`, the file's inputs/outputs (or schedule) are compared with that model's.
        """

    def owns(self, path: Path) -> bool:
        """Whether `path` is a file or bundle of this target (by suffix or marker)."""
        if self.marker is not None:
            return path.is_dir() and (path / self.marker).is_file()
        return path.suffix.lower() in self.suffixes


class FixedBatchDenoiser(ABC):
    """A runtime whose file has a fixed batch (LiteRT, Core ML): inputs run in chunks of that
    batch, the last chunk padded by repeating its last row, outputs trimmed.

    Subclasses set `path`, `batch`, `cond_name` (the conditioning input's name or None) and
    `inputs` (the file's input names, as keys) and implement `_run(feeds) -> out` for one full chunk.
    `cond` is a tensor (fed as `cond_name`) or a dict name -> tensor (multi-input models: SDXL,
    SD3, Flux), of which every input the file declares is fed, chunked like the sample.
    """

    path: Path
    batch: int
    cond_name: str | None
    inputs: Mapping[str, Any]

    @abstractmethod
    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One call on exactly `batch` rows: {input name: tensor} -> float32 output."""

    def _named(self, cond: Cond) -> dict[str, torch.Tensor]:
        names = [n for n in self.inputs if n not in ("sample", "timestep")]
        if isinstance(cond, dict):
            missing = [n for n in names if n not in cond]
            if missing:
                raise BadInput(f"{self.path}: the model needs {', '.join(missing)}, not given")
            return {n: cond[n] for n in names}
        if set(names) - {self.cond_name}:
            raise BadInput(f"{self.path}: the model takes {', '.join(sorted(names))}: pass them as a dict of named inputs")
        if self.cond_name is None:
            return {}
        if cond is None:
            raise BadInput(f"{self.path}: the model takes {self.cond_name}, none was given")
        return {self.cond_name: cond}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        n, b = x.shape[0], self.batch
        named = {"sample": x.float(), "timestep": t.float(), **self._named(cond)}
        outs = []
        for i in range(0, n, b):
            chunk = {k: v[i:i + b] for k, v in named.items()}
            k = chunk["sample"].shape[0]
            if k < b:
                chunk = {name: torch.cat([v, v[-1:].expand(b - k, *v.shape[1:])]) for name, v in chunk.items()}
            outs.append(self._run(chunk)[:k])
        return torch.cat(outs)


def cpu_count() -> int:
    """Cores this process may use (the default for --threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1
