"""The artifact: a directory written atomically that carries a transformed model and its story.

Layout: manifest.json (format version, source hash, recipe, each pass with options, timings
and metrics), model/ (see serialize.py: loads without unpickling), scheduler_config.json,
extras/<name>.json + .safetensors (pass state: quantization parameters, PTQD corrections),
and whatever files the caller adds (report.html, sample grids).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, InputSignature
from edgediff.schedule import NoiseSchedule

FORMAT_VERSION = 1


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


def _temp_beside(dest: Path, force: bool, directory: bool) -> tuple[Path, Path]:
    """(parent, temp path) beside `dest`, in the same filesystem so that the final rename is atomic."""
    if dest.exists() and not force:
        raise BadInput(f"{dest}: output already exists (pass --force to replace it)")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return parent, Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=parent)
        os.close(fd)
        return parent, Path(name)
    except OSError as e:
        raise BadInput(f"{dest}: cannot write there ({e.strerror or e})") from None


@contextmanager
def atomic_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success rename it to `dest`, on any failure delete it.

    An interrupted run (Ctrl-C, exception) leaves neither `dest` nor the temp dir behind.
    """
    dest = Path(dest)
    parent, tmp = _temp_beside(dest, force, directory=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should look like any other dir
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(dest: Path, force: bool = False) -> Iterator[Path]:
    """Like atomic_dir for a single file: yields a temp path beside `dest`."""
    dest = Path(dest)
    _, tmp = _temp_beside(dest, force, directory=False)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def write_model_files(model: DiffusionModel, folder: Path) -> None:
    """The model part of an artifact: model/, scheduler_config.json, extras/."""
    from safetensors.torch import save_file

    from edgediff.serialize import save_denoiser

    save_denoiser(model.denoiser, model.arch, model.config, folder / "model", model.example_inputs(batch=2))
    (folder / "scheduler_config.json").write_text(json.dumps(model.schedule.to_config(), indent=2) + "\n")
    (folder / "signature.json").write_text(json.dumps(model.signature.to_dict(), indent=2) + "\n")
    if model.extras:
        (folder / "extras").mkdir()
        for name, payload in sorted(model.extras.items()):
            tensors: dict[str, torch.Tensor] = {}
            meta = _split_tensors(payload, tensors, "")
            (folder / "extras" / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if tensors:
                save_file(tensors, str(folder / "extras" / f"{name}.safetensors"))


def write_contents(model: DiffusionModel, folder: Path, manifest: dict[str, Any]) -> None:
    """The model files and manifest.json of an artifact into `folder` (inside an atomic_dir): write_artifact's
    body, for callers that add directories of their own (the demo's exports)."""
    write_model_files(model, folder)
    full = {"format_version": FORMAT_VERSION, "arch": model.arch, "signature": model.signature.to_dict(),
            "provenance": model.provenance, "extras": sorted(model.extras), **manifest}
    (folder / "manifest.json").write_text(json.dumps(full, indent=2, default=str) + "\n")


def write_artifact(model: DiffusionModel, dest: Path, manifest: dict[str, Any], files: dict[str, bytes | str] | None = None,
                   force: bool = False) -> Path:
    """Write a complete artifact atomically; returns `dest`."""
    with atomic_dir(dest, force=force) as tmp:
        write_contents(model, tmp, manifest)
        for name, data in (files or {}).items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return dest


def read_manifest(folder: Path) -> dict[str, Any]:
    from edgediff.loaders import _read_json

    m = _read_json(folder / "manifest.json")
    if m.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{folder}/manifest.json: unsupported artifact format_version {m.get('format_version')!r} "
                       f"(this edgediff reads {FORMAT_VERSION})")
    return m


def load_artifact(folder: Path, trust_pickle: bool = False) -> DiffusionModel:
    """Rebuild the DiffusionModel saved in an artifact (no unpickling unless `trust_pickle`)."""
    from edgediff.loaders import _read_json, load_safetensors
    from edgediff.passes import restore_extras
    from edgediff.serialize import load_denoiser

    folder = Path(folder)
    manifest = read_manifest(folder)
    module, arch, cfg = load_denoiser(folder / "model", trust_pickle)
    extras: dict[str, Any] = {}
    for name in manifest.get("extras", []):
        meta = _read_json(folder / "extras" / f"{name}.json")
        st = folder / "extras" / f"{name}.safetensors"
        extras[name] = _join_tensors(meta, load_safetensors(st) if st.is_file() else {})
    model = DiffusionModel(
        denoiser=module,
        schedule=NoiseSchedule.from_config(_read_json(folder / "scheduler_config.json")),
        signature=InputSignature.from_dict(manifest["signature"]),
        arch=arch, config=cfg, provenance=dict(manifest.get("provenance", {}), artifact=str(folder)), extras=extras,
    )
    return restore_extras(model)
