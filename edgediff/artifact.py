"""The artifact: a directory written atomically that carries a transformed model and its story.

Layout: manifest.json (format version, source hash, recipe, each pass with options, timings
and metrics), model/ (see serialize.py: loads without unpickling), scheduler_config.json,
extras/<name>.json + .safetensors (pass state: quantization parameters, PTQD corrections),
and whatever files the caller adds (report.html, sample grids).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel, InputSignature
from edgediff.safety import check_tree, child_path, clean_debris, plain_name, temp_prefix
from edgediff.schedule import NoiseSchedule

FORMAT_VERSION = 1


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _temp_beside(dest: Path, force: bool, directory: bool) -> tuple[Path, Path]:
    """(parent, temp path) beside `dest`, in the same filesystem so that the final rename is atomic.

    Temp names are `.NAME.edgediff-tmp-PID-*`; debris of earlier runs whose process is gone
    (SIGKILL, power loss) is removed first.
    """
    if dest.exists() and not force:
        raise BadInput(f"{dest}: output already exists (pass --force to replace it)")
    if not directory and dest.is_dir():
        raise BadInput(f"{dest}: output is an existing directory; a single file is written here "
                       "(choose a file name)")
    cwd = Path.cwd().resolve()
    if dest.resolve() == cwd or dest.resolve() in cwd.parents:
        raise BadInput(f"{dest}: output is the current directory or a folder above it; name a new path")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_debris(dest)
        if directory:
            return parent, Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=parent))
        fd, name = tempfile.mkstemp(prefix=temp_prefix(dest), dir=parent)
        os.close(fd)
        return parent, Path(name)
    except OSError as e:
        raise BadInput(f"{dest}: cannot write there ({e.strerror or e})") from None


def _disk_error(dest: Path, e: BaseException) -> BaseException:
    """A full disk or an unwritable place is the user's problem to fix (exit 2), not a bug."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        return BadInput(f"{dest}: cannot write the output ({e.strerror}); nothing was written")
    return e


@contextmanager
def atomic_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success rename it to `dest`, on any failure delete it.

    An interrupted run (Ctrl-C, SIGTERM, exception) leaves neither `dest` nor the temp dir behind.
    """
    dest = Path(dest)
    parent, tmp = _temp_beside(dest, force, directory=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs should look like any other dir
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), dir=parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = _disk_error(dest, e)
        if mapped is not e:
            raise mapped from None
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        mapped = _disk_error(dest, e)
        if mapped is not e:
            raise mapped from None
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
            key = obj["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise KeyError(key)
            return tensors[key]
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
            p = child_path(tmp, name, str(dest), "file name")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return dest


def _check_signature(sig: Any, where: str) -> None:
    if not isinstance(sig, dict):
        raise BadInput(f"{where}: has no 'signature' object (the denoiser's input shapes)")

    def dims(v: Any, key: str, optional: bool) -> None:
        if v is None and optional:
            return
        if (not isinstance(v, list) or not 1 <= len(v) <= 5
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in v)):
            raise BadInput(f"{where}: signature.{key} must be a list of 1-5 positive integers, got {v!r}")

    dims(sig.get("sample_shape"), "sample_shape", optional=False)
    dims(sig.get("cond_shape"), "cond_shape", optional=True)
    nc = sig.get("num_classes")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or not 0 < nc <= 1 << 24):
        raise BadInput(f"{where}: signature.num_classes must be a positive integer or null, got {nc!r}")


def read_manifest(folder: Path) -> dict[str, Any]:
    from edgediff.files import read_json

    where = f"{folder}/manifest.json"
    m = read_json(folder / "manifest.json")
    if m.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{where}: unsupported artifact format_version {m.get('format_version')!r} "
                       f"(this edgediff reads {FORMAT_VERSION})")
    _check_signature(m.get("signature"), where)
    extras = m.get("extras", [])
    if not isinstance(extras, list):
        raise BadInput(f"{where}: 'extras' must be a list of names")
    for name in extras:
        plain_name(name, where, "extras entry")
    for key in ("provenance", "recipe", "metrics"):
        if key in m and not isinstance(m[key], dict):
            raise BadInput(f"{where}: {key!r} must be an object, got {type(m[key]).__name__}")
    if "passes" in m and not isinstance(m["passes"], list):
        raise BadInput(f"{where}: 'passes' must be a list")
    return m


Restorer = Callable[[DiffusionModel], DiffusionModel]
_restorers: list[Restorer] = []


def register_restorer(fn: Restorer) -> Restorer:
    """Called by the pass layer (edgediff.passes registers restore_extras when it is imported): how an
    artifact's pass state (extras) is re-applied on load. Storage never imports the passes."""
    if fn not in _restorers:
        _restorers.append(fn)
    return fn


def load_artifact(folder: Path, trust_pickle: bool = False, restore: Restorer | None = None) -> DiffusionModel:
    """Rebuild the DiffusionModel saved in an artifact (no unpickling unless `trust_pickle`).

    `restore` re-applies the state passes attached; by default the registered restorers
    (edgediff.loaders.load_model makes sure the pass layer is loaded and has registered).

    Every name the manifest gives is a plain name inside the artifact; a symlink that leads out
    of the artifact is refused.
    """
    from edgediff.files import load_safetensors, read_json
    from edgediff.serialize import load_denoiser

    folder = Path(folder)
    check_tree(folder)
    manifest = read_manifest(folder)
    module, arch, cfg = load_denoiser(folder / "model", trust_pickle)
    extras: dict[str, Any] = {}
    for name in manifest.get("extras", []):
        meta_path = child_path(folder, f"extras/{name}.json", f"{folder}/manifest.json", "extras entry")
        meta = read_json(meta_path)
        st = child_path(folder, f"extras/{name}.safetensors", f"{folder}/manifest.json", "extras entry")
        tensors = load_safetensors(st) if st.is_file() else {}
        try:
            extras[name] = _join_tensors(meta, tensors)
        except KeyError as e:
            missing = "" if st.is_file() else f" ({st.name} is missing)"
            raise BadInput(f"{meta_path}: refers to tensor {e.args[0]!r}, which is not in {st.name}{missing}") from None
    try:
        signature = InputSignature.from_dict(manifest["signature"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{folder}/manifest.json: bad signature ({e.__class__.__name__}: {e})") from None
    model = DiffusionModel(
        denoiser=module,
        schedule=NoiseSchedule.from_config(read_json(folder / "scheduler_config.json")),
        signature=signature,
        arch=arch, config=cfg, provenance=dict(manifest.get("provenance", {}), artifact=str(folder)), extras=extras,
    )
    try:
        for fn in [restore] if restore is not None else _restorers:
            model = fn(model)
        return model
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        names = ", ".join(f"extras/{n}.json" for n in sorted(extras)) or "extras"
        raise BadInput(f"{folder}: {names} does not fit the model ({e.__class__.__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:160]})") from None
