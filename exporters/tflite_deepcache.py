"""TFLite denoiser bundles: the denoiser as .tflite file(s) in a bundle, with DeepCache's two entry points.

A cached artifact (extras["cache"], edgediff.deepcache) exports as two .tflite files:

    unet/model.tflite           serving_default(sample, timestep[, cond...]) -> {out_sample, cached_feature}
    unet_shallow/model.tflite   serving_default(sample, timestep[, cond...], cached_feature) -> {out_sample}

Two files rather than one file with two signatures: the int8 full-integer layout is written into
the converted flatbuffer by `tflite_int8.integerize` and the int8 inputs are given back a float
interface by `float_inputs`, both of which rewrite subgraph 0 of a single-signature model, so
each entry goes through exactly the conversion a single-file export does (fp32, fp16, int8 of
either layout). The shallow file holds only the shallow layers' weights (the outer blocks), so
the weights the two files share are those few layers.

An uncached model exports as unet/model.tflite alone. The output is named `out_sample` and the
feature `cached_feature`, as in the ONNX bundle (edgediff.runtime.bundle), so the torch-free
runtime (edgediff.runtime.litert) drives both with the same names. The batch is fixed at export
(see exporters/tflite.py): the runtime splits and pads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from edgediff.exporters.tflite_convert import build_tflite
from edgediff.exporters.tflite_runtime import OUTPUT_NAME as TFLITE_OUT
from edgediff.exporters.tflite_runtime import SIGNATURE, tflite_info
from torch import nn

from edgediff.deepcache import FullEntry, ShallowEntry
from edgediff.model import DiffusionModel
from edgediff.runtime.bundle import FEATURE_NAME, OUTPUT_NAME, ROLE_FULL, ROLE_SHALLOW

SUFFIX = ".tflite"


class _Plain(nn.Module):
    """The uncached call with the bundle's output name."""

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT_NAME: self.wrapper(**inputs)[TFLITE_OUT]}


class _Full(nn.Module):
    """DeepCache's full call: {out_sample, cached_feature}."""

    def __init__(self, wrapper: nn.Module, depth: int) -> None:
        super().__init__()
        self.entry = FullEntry(wrapper, depth)

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out, feat = self.entry(**inputs)
        return {OUTPUT_NAME: out[TFLITE_OUT], FEATURE_NAME: feat}


class _Shallow(nn.Module):
    """DeepCache's shallow call: the cached feature is one more named input."""

    def __init__(self, wrapper: nn.Module, depth: int) -> None:
        super().__init__()
        self.entry = ShallowEntry(wrapper, depth)

    def forward(self, cached_feature: torch.Tensor, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT_NAME: self.entry(**inputs, feature=cached_feature)[TFLITE_OUT]}


assert FEATURE_NAME == "cached_feature"  # _Shallow's keyword is the signature's input name


def tflite_entries(model: DiffusionModel, precision: str, cache: dict[str, Any] | None,
                   batch: int = 1) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """{role: (.tflite bytes, conversion facts)}: the denoiser, and with a cache schedule its shallow call."""
    if cache is None:
        return {ROLE_FULL: build_tflite(model, precision, batch, entry=lambda w, kw: (_Plain(w).eval(), kw))}
    depth = int(cache["depth"])

    def full(wrapper: nn.Module, kwargs: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        return _Full(wrapper, depth).eval(), kwargs

    def shallow(wrapper: nn.Module, kwargs: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        # the example feature comes from the same prepared denoiser (int8: its integer layers)
        with torch.no_grad():
            feat = _Full(wrapper, depth)(**kwargs)[FEATURE_NAME]
        return _Shallow(wrapper, depth).eval(), {**kwargs, FEATURE_NAME: feat}

    out = {ROLE_FULL: build_tflite(model, precision, batch, entry=full),
           ROLE_SHALLOW: build_tflite(model, precision, batch, entry=shallow)}
    notes = out[ROLE_SHALLOW][1].get("int8", {}).get("integerized")
    if isinstance(notes, dict) and notes.get("not_found"):
        # the deep layers are not in the shallow call by design: say so instead of listing them as missing
        notes["not_in_this_entry"] = notes.pop("not_found")
    return out


def write_components(entries: dict[str, tuple[bytes, dict[str, Any]]], folder: Path, comp_dir: str,
                     precision: str, model: DiffusionModel) -> dict[str, dict[str, Any]]:
    """Write each entry as `folder/<comp_dir>[_shallow]/model.tflite`; their manifest components."""
    components: dict[str, dict[str, Any]] = {}
    for role, (data, facts) in entries.items():
        name = comp_dir if role == ROLE_FULL else f"{comp_dir}_shallow"
        (folder / name).mkdir()
        f = folder / name / f"model{SUFFIX}"
        f.write_bytes(data)
        info = tflite_info(f)
        shapes = {k: list(v["shape"]) for k, v in info["inputs"].items()}
        components[name] = {"path": f"{name}/model{SUFFIX}", "role": role, "precision": precision,
                            "signature": SIGNATURE, "inputs": info["inputs"], "outputs": sorted(info["outputs"]),
                            "batch": int(info["batch"]), "size_bytes": f.stat().st_size, "shapes": shapes,
                            "ops": info["num_ops"], "weight_dtypes": info["weight_dtypes"],
                            "integer_macs_share": info["integer_macs_share"],
                            "sample_shape": list(model.signature.sample_shape),
                            **({"int8": facts["int8"]} if "int8" in facts else {})}
    return components
