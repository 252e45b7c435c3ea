"""`edgediff profile BUNDLE`: every component profiled on its runtime (or estimated for a device),
and the per-image total at the bundle's steps.

Each graph is profiled at batch 1 at the shapes the pipeline runs (the graphs' H/W are dynamic,
so a copy with those dims fixed is profiled). Per image: one text-encoder call per prompt (and one
per negative prompt with guidance), steps x (2 with guidance) denoiser calls, one VAE decode;
the total is those counts times the batch-1 times (a batched runtime is faster per image).
Layers come back under `component/layer` names, so the table shows where an image's time goes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgediff.runtime.bundle import ROLE_FULL, ROLE_SHALLOW, cache_full_steps, read_bundle


def _fixed(f: Path, shapes: dict[str, list[int]] | None, tmp: Path) -> Path:
    import onnx

    proto = onnx.load(str(f))
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        want = (shapes or {}).get(vi.name)
        for i, d in enumerate(dims):
            if d.dim_param:
                d.dim_value = int(want[i]) if want and i < len(want) else 1
    out = tmp / f.parent.name / f.name
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out))
    return out


def calls_per_image(manifest: dict[str, Any], steps: int | None = None) -> dict[str, int]:
    p = manifest.get("pipeline") or {}
    n = int(steps or manifest["steps"])
    cache = manifest.get("cache")  # DeepCache: full calls on the schedule's steps, shallow calls on the others
    n_full = len(cache_full_steps(n, cache)) if cache else n
    cfg = bool(p.get("text_encoder")) and float(p.get("default_guidance") or 1.0) > 1.0
    calls = {}
    for name, comp in manifest["components"].items():
        role = comp.get("role")
        if role == ROLE_FULL:
            calls[name] = n_full * (2 if cfg else 1)
        elif role == ROLE_SHALLOW and cache:
            calls[name] = (n - n_full) * (2 if cfg else 1)
        elif str(role).startswith("text_encoder"):  # text_encoder_2 ... of SDXL / SD3 bundles too
            calls[name] = 2 if cfg else 1
        elif role == "vae_decoder":
            calls[name] = 1
    return calls


def profile_bundle(path: Path, runtime: str | None = None, device: str | None = None, steps: int | None = None,
                   warmup: int = 3, repeats: int = 20, threads: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Per-component profiles and the per-image total (JSON keys as `profile`, plus components and per_image)."""
    from edgediff.profiling.run import profile

    b = read_bundle(path)
    calls = calls_per_image(b.manifest, steps)
    comps: dict[str, Any] = {}
    layers: list[dict[str, Any]] = []
    per_image = 0.0
    with tempfile.TemporaryDirectory(prefix="edgediff-profile-bundle-") as td:
        for name, comp in b.manifest["components"].items():
            f = b.path / str(comp["path"])
            if f.suffix not in (".onnx", ".tflite", ".xml") or (comp.get("role") == ROLE_SHALLOW and not calls.get(name)):
                continue
            # ONNX graphs have dynamic dims, fixed to the run shapes first; .tflite files are fixed already
            fixed = _fixed(f, comp.get("shapes"), Path(td)) if f.suffix == ".onnx" else f
            res = profile(fixed, runtime=runtime, device=device, warmup=warmup,
                          repeats=repeats, threads=threads, progress=progress)
            k = calls.get(name, 0)
            ms = float(res.get("total_ms") or 0.0)
            row = {"role": comp.get("role"), "precision": comp.get("precision"), "total_ms": ms,
                   "calls_per_image": k, "ms_per_image": round(ms * k, 4), "runtime": res.get("runtime"),
                   "estimated": bool(res.get("estimated")), "macs": res.get("macs"),
                   "peak_memory_bytes": res.get("peak_memory_bytes")}
            if "estimate" in res:
                row["estimate_ms"] = res["estimate"].get("total_ms")
            comps[name] = row
            per_image += ms * k
            for la in res.get("layers", []):
                layers.append({**la, "name": f"{name}/{la['name']}", "ms": la["ms"] * k})
    if not comps:
        from edgediff.errors import Unavailable

        raise Unavailable(f"{b.path}: no component of this {b.target} bundle runs here (profile runs .onnx, "
                          ".tflite and OpenVINO .xml components; Core ML predicts on macOS only)")
    total = sum(la["ms"] for la in layers) or 1.0
    for la in layers:
        la["share"] = la["ms"] / total
    runtimes = {c["runtime"] for c in comps.values()}
    return {"runtime": next(iter(runtimes)) if len(runtimes) == 1 else sorted(map(str, runtimes)),
            "kind": "bundle", "bundle": str(b.path), "steps": int(steps or b.manifest["steps"]),
            "estimated": any(c["estimated"] for c in comps.values()),
            "total_ms": round(per_image, 4), "per_image_ms": round(per_image, 4), "calls_per_image": calls,
            "components": comps, "layers": layers,
            "note": "per image = calls x batch-1 time of each component (layers: ms per image)"}
