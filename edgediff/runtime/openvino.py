"""`OpenVinoEntry`: one OpenVINO IR component of a bundle on OpenVINO's CPU plugin (numpy only, no torch).

The same interface as the ONNX runtime's `OrtEntry` (edgediff.runtime.generate): `run(outputs,
feeds)` by name with numpy arrays, `ms` and `calls` counters, so the bundle sampler loop, DeepCache
schedule included, drives the full and the shallow IR as it drives the two ONNX graphs. The IRs
are converted from those graphs (exporters/openvino.py), so they keep their tensor names and the
dynamic batch axis.

Inference precision is forced to f32: OpenVINO's CPU default on bf16-capable cores is bf16, which
would silently cost accuracy (an fp16 IR stores half weights and still computes in f32 on CPU).

The IRs keep a dynamic batch; each new set of input shapes (a sampler run uses one or two: the
batch chunk and the last, smaller one) gets its own copy reshaped to them and compiled once, since
the CPU plugin runs static shapes faster (measured on the demo UNet, batch 16, 1 thread: 6.32 -> 5.35
ms per image per full call, 3.00 -> 2.35 shallow). That compile is counted in `compile_ms`, not `ms`.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput, Unavailable

INSTALL = "pip install openvino"
# OpenVINO element types our graphs use -> numpy (text encoders take int32 ids, optimum's convention)
_NP_OF = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "u8": np.uint8, "boolean": np.bool_}


def openvino_module() -> Any:
    """The `openvino` package, or Unavailable (exit 3) saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise Unavailable(f"running an OpenVINO IR needs OpenVINO: {INSTALL}") from None
    return openvino


class _StackT(ctypes.Structure):  # Linux's stack_t (macOS orders the fields differently)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Give the calling thread its alternate signal stack back after an OpenVINO compile.

    The CPU plugin installs a signal stack of its own on the compiling thread and frees it with the
    plugin, leaving the thread's stack dangling: the next signal handled there (Python runs its
    SIGINT/SIGTERM handlers on it) then segfaults, so Ctrl-C after an OpenVINO run crashed instead
    of cleaning up. Linux only (elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _StackT()
    have = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if have:
            libc.sigaltstack(ctypes.byref(saved), None)


def compile_config(threads: int | None = None, perf_count: bool = False) -> dict[str, Any]:
    """The CPU plugin configuration every edgediff OpenVINO run uses."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    if perf_count:
        cfg["PERF_COUNT"] = "YES"
    return cfg


def read_ir(path: Path) -> Any:
    """The openvino.Model of NAME.xml (+ NAME.bin beside it); BadInput naming the file otherwise."""
    ov = openvino_module()
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise BadInput(f"{path}: an OpenVINO IR needs both {path.name} and {path.with_suffix('.bin').name}")
    try:
        return ov.Core().read_model(str(path))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise BadInput(f"{path}: not a readable OpenVINO IR ({str(e).splitlines()[0][:200]})") from None


def compile_model(model: Any, threads: int | None = None, perf_count: bool = False) -> Any:
    """An openvino.Model compiled for the CPU plugin with `compile_config` (the caller's signal stack kept)."""
    with kept_signal_stack():
        return openvino_module().Core().compile_model(model, "CPU", compile_config(threads, perf_count))


def compile_ir(path: Path, threads: int | None = None, perf_count: bool = False) -> Any:
    """NAME.xml compiled for the CPU plugin with `compile_config`."""
    m = read_ir(path)
    try:
        return compile_model(m, threads, perf_count)
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{path}: OpenVINO cannot compile it for CPU ({str(e).splitlines()[0][:200]})") from None


def openvino_version() -> str:
    try:
        return f"openvino {openvino_module().__version__}"
    except Unavailable:
        return "openvino"


class OpenVinoEntry:
    """A bundle's OpenVINO IR component, fed and read by tensor name."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.compiled = compile_ir(self.path, threads)
        self.request = self.compiled.create_infer_request()
        # a port can carry several tensor names after conversion: each one finds it
        self.input_types: dict[str, Any] = {}
        self.input_port: dict[str, Any] = {}
        for p in self.compiled.inputs:
            for n in p.get_names():
                self.input_port[n] = p
                self.input_types[n] = _NP_OF.get(p.get_element_type().get_type_name(), np.float32)
        self.output_port: dict[str, Any] = {}
        for p in self.compiled.outputs:
            for n in p.get_names():
                self.output_port[n] = p
        self.outputs = sorted(self.output_port)
        self.threads = threads
        self._static: dict[tuple[tuple[str, tuple[int, ...]], ...], tuple[Any, Any]] = {}
        self.ms = 0.0
        self.compile_ms = 0.0
        self.calls = 0

    MAX_SHAPES = 4  # static copies kept; other shapes run on the dynamic model

    def _request(self, by_name: dict[str, np.ndarray]) -> tuple[Any, Any]:
        """(infer request, compiled model) for these input shapes: a static copy, compiled on first use."""
        key = tuple(sorted((k, tuple(v.shape)) for k, v in by_name.items()))
        hit = self._static.get(key)
        if hit is None and len(self._static) < self.MAX_SHAPES:
            t0 = time.perf_counter()
            m = read_ir(self.path)
            try:
                m.reshape({k: list(v.shape) for k, v in by_name.items()})
                compiled = compile_model(m, self.threads)
            except Exception:  # noqa: BLE001 - a graph that cannot take static shapes runs dynamic
                compiled = None
            hit = self._static[key] = (compiled.create_infer_request(), compiled) if compiled is not None else \
                (self.request, self.compiled)
            self.compile_ms += (time.perf_counter() - t0) * 1e3
        return hit or (self.request, self.compiled)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [o for o in outputs if o not in self.output_port]
        if missing:
            raise BadInput(f"{self.path}: the IR has no output(s) {missing} (it has {self.outputs})")
        by_name: dict[str, np.ndarray] = {}
        for k, v in feeds.items():
            port = self.input_port.get(k)
            if port is not None:
                by_name[port.get_any_name()] = np.ascontiguousarray(v, dtype=self.input_types[k])
        absent = [p.get_any_name() for p in self.compiled.inputs if p.get_any_name() not in by_name]
        if absent:
            raise BadInput(f"{self.path}: no value for input(s) {absent}")
        request, compiled = self._request(by_name)
        t0 = time.perf_counter()
        res = request.infer(by_name)
        self.ms += (time.perf_counter() - t0) * 1e3
        self.calls += 1
        # copies: the request's output buffers are reused by the next call
        return [np.array(res[compiled.output(self.output_port[o].get_any_name())], dtype=np.float32) for o in outputs]
