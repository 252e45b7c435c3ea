"""One distribution: edgediff plus exporters/, kernels/, fpga/ mapped in as subpackages."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"edgediff.exporters": "exporters", "edgediff.kernels": "kernels", "edgediff.fpga": "fpga"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_directory_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for init in (ROOT / "edgediff").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for pkg, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((pkg, *init.parent.relative_to(ROOT / folder).parts)))
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"


def test_mapped_subpackages_import_from_top_level_folders() -> None:
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    for pkg, folder in MAPPED.items():
        assert mapping[pkg] == folder
        mod = importlib.import_module(pkg)
        assert Path(mod.__file__).resolve().parent == ROOT / folder


def test_torch_requirement_admits_the_cpu_build() -> None:
    from packaging.requirements import Requirement

    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert torch_req.specifier.contains("2.13.0") and not torch_req.specifier.contains("2.15.0")


def test_extras_cover_every_optional_runtime() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    names = " ".join(extras["all"]).lower()
    for pkg in ("litert-torch", "ai-edge-litert", "coremltools", "nncf", "pyopencl", "pocl-binary-distribution", "hls4ml"):
        assert pkg in names
    assert "test" in extras
