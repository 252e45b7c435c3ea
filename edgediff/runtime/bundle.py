"""Reading a bundle: the directory `edgediff export ... -o DIR` writes (no torch here).

A bundle holds each component in its runtime's own layout (optimum's for ONNX: the denoiser
at unet/model.onnx or transformer/model.onnx with inputs sample, timestep,
encoder_hidden_states and output out_sample; scheduler/scheduler_config.json) plus
`edgediff_bundle.json`, which says what is there:

    format, version, target, kind ("denoiser" or "pipeline"), precision,
    components: {name: {path, role, precision, inputs: {name: {shape, dtype}}, outputs, size_bytes}}
        role "denoiser" (the full call) and, with DeepCache, "denoiser_shallow";
    signature: the denoiser's input signature (sample_shape, cond_shape, num_classes, ...),
    scheduler: {path, class}, sampler, steps, eta,
    cache: null or {depth, interval, feature, full_steps, steps, schedule},
    source_hash, edgediff_version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput

MANIFEST = "edgediff_bundle.json"
FORMAT = "edgediff-bundle"
VERSION = 1
ROLE_FULL = "denoiser"
ROLE_SHALLOW = "denoiser_shallow"
OUTPUT_NAME = "out_sample"  # optimum's name for the UNet's output
FEATURE_NAME = "cached_feature"  # DeepCache: full call's extra output, shallow call's extra input


def is_bundle(path: Any) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def cache_full_steps(steps: int, cache: Mapping[str, Any] | int) -> list[int]:
    """The sampler steps that run the full UNet under a DeepCache record (its schedule, edgediff.runtime.cache_schedule),
    or under a uniform interval given as an int."""
    from edgediff.runtime.cache_schedule import full_steps_for

    return full_steps_for(cache, steps)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return str(self.manifest.get("target", ""))

    @property
    def signature(self) -> dict[str, Any]:
        return dict(self.manifest.get("signature") or {})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.signature["sample_shape"])

    @property
    def cache(self) -> dict[str, Any] | None:
        c = self.manifest.get("cache")
        return dict(c) if c else None

    def component(self, role: str) -> tuple[str, dict[str, Any]] | None:
        for name, comp in (self.manifest.get("components") or {}).items():
            if comp.get("role") == role:
                return name, comp
        return None

    def file(self, role: str) -> Path:
        hit = self.component(role)
        if hit is None:
            raise BadInput(f"{self.path / MANIFEST}: no component with role {role!r}")
        p = self.path / hit[1]["path"]
        if not p.is_file():
            raise BadInput(f"{p}: listed in {MANIFEST} but missing")
        return p


def read_manifest(folder: Path, name: str, what: str = "a bundle") -> tuple[Path, Any]:
    """(path, parsed JSON) of the manifest `name` in `folder`; BadInput naming the file when the
    folder is not `what` (no manifest) or the manifest is not JSON. Shared with the OpenCL bundle."""
    mf = folder / name
    if not mf.is_file():
        raise BadInput(f"{folder}: not {what} (no {name})")
    try:
        return mf, json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{mf}: not valid JSON ({e})") from None


def read_bundle(path: Path | str) -> Bundle:
    """Parse and check a bundle directory (BadInput naming the file and the problem)."""
    path = Path(path)
    mf, manifest = read_manifest(path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInput(f"{mf}: not an edgediff bundle manifest (format must be {FORMAT!r})")
    if int(manifest.get("version", 0)) > VERSION:
        raise BadInput(f"{mf}: bundle version {manifest.get('version')} is newer than this edgediff reads ({VERSION})")
    for key in ("components", "signature", "scheduler", "steps", "sampler"):
        if key not in manifest:
            raise BadInput(f"{mf}: missing key {key!r}")
    if not isinstance(manifest["components"], dict) or not manifest["components"]:
        raise BadInput(f"{mf}: 'components' must be a non-empty object")
    from edgediff.safety import child_path  # torch-free

    for name, comp in manifest["components"].items():
        if not isinstance(comp, dict):
            raise BadInput(f"{mf}: component {name!r} must be an object")
        rel = str(comp.get("path", ""))
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BadInput(f"{mf}: component {name!r} has a path outside the bundle ({rel!r})")
        child_path(path, rel, str(mf), f"component {name!r} path")  # also: no symlink out of the bundle
    if not isinstance(manifest["scheduler"], dict):
        raise BadInput(f"{mf}: 'scheduler' must be an object")
    sched_rel = str(manifest["scheduler"].get("path", "scheduler/scheduler_config.json"))
    if Path(sched_rel).is_absolute() or ".." in Path(sched_rel).parts:
        raise BadInput(f"{mf}: scheduler path outside the bundle ({sched_rel!r})")
    child_path(path, sched_rel, str(mf), "scheduler path")
    sp = path / sched_rel
    try:
        sched = json.loads(sp.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{sp}: cannot read the scheduler config ({e})") from None
    b = Bundle(path, manifest, sched)
    if b.component(ROLE_FULL) is None:
        raise BadInput(f"{mf}: no denoiser component (role {ROLE_FULL!r})")
    if b.cache and b.component(ROLE_SHALLOW) is None:
        raise BadInput(f"{mf}: a cache schedule without a shallow denoiser (role {ROLE_SHALLOW!r})")
    return b
