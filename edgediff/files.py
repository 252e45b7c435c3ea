"""Reading the files a model comes in, with one-line errors naming the file (BadInput, exit 2).

The lowest layer of loading: loaders (what a user points at), serialize (our model/ folder)
and artifact (our artifact directory) all read through these, so none of them imports another
to read a file (docs/architecture.md, "Dependency rules").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.signature import DENOISER_CLASSES


def sha256_of(path: Path) -> str:
    """Hash of a file, or of every file below a directory (sorted by relative path)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not a readable JSON config ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data


def build_diffusers(arch: str, cfg: dict[str, Any], where: Path) -> nn.Module:
    if arch not in DENOISER_CLASSES:
        raise BadInput(f"{where}: config names {arch!r}, which is not a denoiser edgediff knows "
                       f"({', '.join(DENOISER_CLASSES)})")
    import diffusers

    cls = getattr(diffusers, arch)
    from edgediff.safety import check_build_budget

    check_build_budget(cls, arch, cfg, where)  # before anything is allocated
    try:
        return cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds on a bad config
        raise BadInput(f"{where}: cannot build {arch} from its config ({e.__class__.__name__}: {e})") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: file is empty")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BadInput(f"{path}: not a valid safetensors file (truncated or corrupt: {e})") from None
    from edgediff.safety import warn_nonfinite

    warn_nonfinite(state, path)  # loads, but says so: every output of such a model is NaN
    return state
