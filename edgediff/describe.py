"""`edgediff info`: what a model, an artifact or an exported file is, in numbers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput
from edgediff.exporters import all_backends, get_backend, target_of
from edgediff.model import DiffusionModel
from edgediff.signature import supported


def describe_model(model: DiffusionModel) -> dict[str, Any]:
    from edgediff.pipeline import model_stats

    return {
        "kind": "model",
        "arch": model.arch,
        **model_stats(model),
        "signature": model.signature.to_dict(),
        "schedule": {k: v for k, v in model.schedule.to_config().items() if k != "trained_betas"},
        "scheduler": {"class": model.schedule.class_name, "family": model.schedule.family,
                      "prediction_type": model.schedule.prediction_type},
        "source": model.provenance.get("source"),
        "supported": supported(),
    }


def describe(target: str, load: Callable[[], DiffusionModel]) -> dict[str, Any]:
    path = Path(target)
    from edgediff.runtime import is_bundle

    if is_bundle(path):  # an exported bundle: every component (edgediff.bundle)
        from edgediff.bundle import describe_bundle

        return describe_bundle(path)
    if target != "demo" and path.exists() and not path.is_dir() or (path.is_dir() and _is_exported_dir(path)):
        suffix_kind = None
        try:
            suffix_kind = target_of(path)
        except BadInput:  # not an exported file: fall through to model loading
            pass
        if suffix_kind:
            return describe_exported(path, suffix_kind)
    model = load()
    data = describe_model(model)
    from edgediff.pipelines import pipeline_of

    pipe = pipeline_of(model)
    if pipe is not None:  # a pipeline folder (or an artifact made from one): every component
        from edgediff.pipelines.encode import component_stats

        data.update({"kind": "pipeline", "pipeline": pipe.class_name, "components": component_stats(pipe)})
    if path.is_dir() and (path / "manifest.json").is_file():
        from edgediff.artifact import read_manifest

        m = read_manifest(path)
        data["kind"] = "artifact"
        data["recipe"] = m.get("recipe", {}).get("name")
        data["passes"] = [p["name"] for p in m.get("passes", [])]
        data["before"] = m.get("metrics", {}).get("before")
        data["after"] = m.get("metrics", {}).get("after")
    return data


def _is_exported_dir(path: Path) -> bool:
    return any(b.owns(path) for b in all_backends())


def describe_exported(path: Path, target: str) -> dict[str, Any]:
    """Exported files: the backend describes its own format (Backend.info)."""
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    data: dict[str, Any] = {"kind": "exported", "target": target, "size_bytes": size}
    data.update(get_backend(target).info(path))
    data.update(graph_facts(path, target, data.get("precision")))
    return data


def graph_facts(path: Path, target: str, precision: str | None) -> dict[str, Any]:
    """MACs per denoiser call from the graph itself (conv, gemm, MatMul/Einsum attention) and the
    precision the file computes in when its metadata does not say (a foreign int8 QDQ file).

    The place to add more per-file facts (e.g. the share of MACs in integer kernels)."""
    from edgediff.profiling.graph import onnx_ops, tflite_ops

    if target == "onnx" or path.suffix.lower() == ".onnx":
        ops = onnx_ops(path)
    elif target == "tflite":
        ops = tflite_ops(path)
    else:
        return {}
    facts: dict[str, Any] = {"macs": int(sum(o.macs for o in ops))}
    if not precision:
        kinds = {o.precision for o in ops if o.macs}
        facts["precision"] = next((p for p in ("int8", "fp16", "fp32") if p in kinds), "fp32")
    return facts
