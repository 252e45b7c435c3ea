"""Backends: one `Backend` subclass per target (edgediff.exporters.base), found through this registry.

`TARGETS` maps a target name to the module whose `BACKEND` implements it. Adding a target is a
new module with a Backend subclass plus one line here (docs/architecture.md, "Adding a target");
the contract test (tests/test_backends.py) then checks it like every other one.
Backends depend on edgediff.model/artifact/lowering, never on the CLI or each other's private names.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgediff.exporters.base import PRECISIONS, Backend

from edgediff.errors import BadInput

TARGETS: dict[str, str] = {
    "onnx": "edgediff.exporters.onnx",
    "tensorrt": "edgediff.exporters.tensorrt",
    "coreml": "edgediff.exporters.coreml",
    "tflite": "edgediff.exporters.tflite",
    "opencl": "edgediff.kernels.export",
    "fpga": "edgediff.fpga.project",
    "openvino": "edgediff.exporters.openvino",
}

__all__ = ["PRECISIONS", "TARGETS", "Backend", "all_backends", "get_backend", "target_of"]


def get_backend(target: str) -> Backend:
    """The backend for `target` (BadInput for a name that is not a target)."""
    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    backend = importlib.import_module(TARGETS[target]).BACKEND
    if not isinstance(backend, Backend) or backend.target != target:
        raise TypeError(f"{TARGETS[target]}.BACKEND must be a Backend for target {target!r}, got {backend!r}")
    return backend


def all_backends() -> list[Backend]:
    """Every registered backend, in TARGETS order."""
    return [get_backend(t) for t in TARGETS]


def target_of(path: Path) -> str:
    """Which target produced this exported file or bundle (by the suffixes and markers backends declare)."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    for backend in all_backends():
        if backend.owns(path):
            return backend.target
    raise BadInput(f"{path}: not an exported model edgediff knows (.onnx, .tflite, .mlpackage, .engine, "
                   "an OpenCL bundle or an FPGA project)")
