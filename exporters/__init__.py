"""Backends: one small class per target with export() and a runtime check (edgediff.exporters).

Each target module defines `BACKEND`, an object with:
  target: str; precisions: tuple[str, ...]
  available() -> tuple[bool, str]          can this machine build (and run) the target? why not?
  export(model, out, precision, force=False, **options) -> dict   writes `out` atomically, returns a report
  load_denoiser(path) -> edgediff.sampling.Denoiser                 the exported file in its real runtime
  runtime_available() -> tuple[bool, str]   can this machine *run* what was exported?
Backends depend on edgediff.model/artifact, never on the CLI.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput, NotBuiltYet

TARGETS: dict[str, str] = {
    "onnx": "edgediff.exporters.onnx",
    "tensorrt": "edgediff.exporters.tensorrt",
    "coreml": "edgediff.exporters.coreml",
    "tflite": "edgediff.exporters.tflite",
    "opencl": "edgediff.kernels.export",
    "fpga": "edgediff.fpga.project",
}
PRECISIONS = ("fp32", "fp16", "int8")

# how an exported file's kind is recognised, for verify/profile/info
_SUFFIXES = {".onnx": "onnx", ".engine": "tensorrt", ".plan": "tensorrt", ".mlpackage": "coreml",
             ".mlmodel": "coreml", ".tflite": "tflite"}
_BUNDLE_MARKERS = {"opencl_bundle.json": "opencl", "fpga_project.json": "fpga"}


def get_backend(target: str) -> Any:
    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    try:
        mod = importlib.import_module(TARGETS[target])
    except ModuleNotFoundError as e:
        if e.name == TARGETS[target]:
            raise NotBuiltYet(f"target {target!r} is not built yet") from None
        raise
    backend = getattr(mod, "BACKEND", None)
    if backend is None:
        raise NotBuiltYet(f"target {target!r} is not built yet")
    return backend


def target_of(path: Path) -> str:
    """Which target produced this exported file or bundle."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    if path.is_dir():
        for marker, target in _BUNDLE_MARKERS.items():
            if (path / marker).is_file():
                return target
    raise BadInput(f"{path}: not an exported model edgediff knows (.onnx, .tflite, .mlpackage, .engine, "
                   "an OpenCL bundle or an FPGA project)")
