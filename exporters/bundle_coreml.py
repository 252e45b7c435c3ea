"""Core ML pipeline bundles in the Resources layout of Apple's ml-stable-diffusion Swift package.

`edgediff export PIPELINE_OR_ARTIFACT --target coreml -o DIR` writes

    DIR/Resources/TextEncoder.mlpackage   input_ids float32 [1, S] -> last_hidden_state [1, S, D], pooled_outputs [1, D]
    DIR/Resources/Unet.mlpackage          sample [B, C, h, w], timestep [B], encoder_hidden_states [B, D, 1, S] -> out
    DIR/Resources/VAEDecoder.mlpackage    z [1, C, h, w] -> image [1, 3, H, W]   (post_quant_conv + decoder)
    DIR/Resources/vocab.json, merges.txt  the CLIP BPE files its BPETokenizer reads
    DIR/tokenizer/, scheduler/, model_index.json, edgediff_bundle.json   as in every edgediff bundle

These are what the Swift package reads (StableDiffusionPipeline+Resources.swift: TextEncoder, Unet,
VAEDecoder, vocab.json, merges.txt under one folder; TextEncoder.swift feeds float32 token ids to the
model's only input and reads `last_hidden_state`; Unet.swift feeds `sample`, `timestep`,
`encoder_hidden_states` in the (B, D, 1, S) layout its toHiddenStates transposes to, and reads the first
output; Decoder.swift divides by the scaling factor itself and reads the first output). B is 2 for a
pipeline with classifier-free guidance (the package's batched [uncond; cond] call, Apple's default
export), else 1. Attention is the split-einsum form of the denoiser export (exporters/coreml.py).
The package loads compiled `.mlmodelc` folders: on a Mac, `xcrun coremlcompiler compile
Resources/Unet.mlpackage Resources/` makes each one (compilation needs Xcode; nothing here runs on Linux).
The VAE encoder (image-to-image) is not written.

Precision: the denoiser at the export's (fp32, fp16, int8 from an artifact's QuantParams, as the
single-file export); the text encoder and VAE decoder fp16 for fp16 exports, else fp32 (a part a recipe
quantized to int8 is not written as Core ML int8: Unavailable naming it).
Prediction is macOS-only: generate/verify on this bundle answer exit 3 with the reason; `check_bundle`
is the structural check (every package's inputs, outputs, shapes, dtypes).
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edgediff.exporters.bundle_tflite import TextEncoderCall
from edgediff.exporters.coreml import OUTPUT_NAME, build_mlmodel, coreml_info
from torch import nn

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

RESOURCES = "Resources"
PACKAGES = {"text_encoder": "TextEncoder", "denoiser": "Unet", "vae_decoder": "VAEDecoder"}  # role -> Apple's name


class _TextEncoder(nn.Module):
    """Float32 token ids in (the Swift package builds a Float32 array), Apple's output names out."""

    def __init__(self, te: nn.Module) -> None:
        super().__init__()
        self.call = TextEncoderCall(te)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.call(input_ids)
        return out["last_hidden_state"], out.get("pooler_output", out["last_hidden_state"][:, -1])


class AppleUnet(nn.Module):
    """The denoiser call with encoder_hidden_states as (B, D, 1, S), the layout Apple's package feeds."""

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wrapper(sample, timestep, encoder_hidden_states=encoder_hidden_states.squeeze(2).transpose(1, 2))


def _ct() -> Any:
    try:
        import coremltools as ct
    except ImportError as e:
        raise Unavailable(f"Core ML bundles need coremltools ({e}): pip install coremltools") from None
    return ct


def _convert(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], prec: str, what: str) -> Any:
    """torch.export first, torch.jit.trace where coremltools cannot lower the exported graph (CLIP's alias
    nodes), as the denoiser export does; the forward's argument names become the package's input names."""
    ct = _ct()
    common = {"convert_to": "mlprogram", "outputs": [ct.TensorType(name=o, dtype=np.float32) for o in outputs],
              "compute_precision": ct.precision.FLOAT16 if prec == "fp16" else ct.precision.FLOAT32,
              "minimum_deployment_target": ct.target.iOS17, "skip_model_load": True}
    errors = []
    module = module.eval()
    for frontend in ("torch.export", "torch.jit.trace"):
        try:
            with torch.no_grad():
                if frontend == "torch.export":
                    src = torch.export.export(module, tuple(inputs.values()), strict=False).run_decompositions({})
                    return ct.convert(src, **common)
                src = torch.jit.trace(module, tuple(inputs.values()), check_trace=False)
            types = [ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.float32) for k, v in inputs.items()]
            return ct.convert(src, inputs=types, **common)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            errors.append(f"{frontend}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise BadInput(f"coremltools could not convert the {what} ({'; '.join(errors)})")


def build_packages(pipe: Any, model: DiffusionModel, precision: str) -> dict[str, tuple[Any, str, str, dict]]:
    """{component name: (MLModel, role, precision, facts)} for the text encoder, the UNet and the VAE decoder."""
    from edgediff.pipelines.bundle import component_precision
    from edgediff.pipelines.parts import VaeDecoderPart, part_precision

    sig = model.signature
    names = pipe.names("text_encoder")
    if names != ["text_encoder"] or not sig.cond_shape or sig.num_classes or "UNet" not in model.arch:
        raise Unavailable(f"{pipe.path}: Core ML bundles follow Apple's ml-stable-diffusion layout, written for "
                          "text-to-image pipelines with one text encoder and a UNet (this is "
                          f"{pipe.class_name} with {model.arch}); export the denoiser alone with -o model.mlpackage")
    seq = int(sig.cond_shape[0])
    cfg = float(pipe.default_guidance or 1.0) > 1.0
    out: dict[str, tuple[Any, str, str, dict]] = {}
    for part in ("text_encoder", "vae_decoder"):
        if part_precision(model.extras, part) == "int8":
            raise Unavailable(f"{pipe.path}: the recipe quantized {part} to int8, which the Core ML bundle does not "
                              "write yet (the ONNX bundle does: --target onnx)")
    prec = component_precision(precision)
    t0 = time.perf_counter()
    ids = torch.zeros(1, seq)
    out["text_encoder"] = (_convert(_TextEncoder(pipe.load("text_encoder")), {"input_ids": ids},
                                    ["last_hidden_state", "pooled_outputs"], prec, "text encoder"),
                           "text_encoder", prec, {"convert_seconds": round(time.perf_counter() - t0, 2)})

    def apple(wrapper: nn.Module, ex: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        ex = dict(ex)
        ex["encoder_hidden_states"] = ex["encoder_hidden_states"].transpose(1, 2).unsqueeze(2).contiguous()  # (B, D, 1, S)
        return AppleUnet(wrapper).eval(), ex

    ml, facts = build_mlmodel(model, precision, batch=2 if cfg else 1, entry=apple)
    out[pipe.denoiser_name] = (ml, "denoiser", precision, facts)
    if pipe.has("vae"):
        t0 = time.perf_counter()
        part = VaeDecoderPart(copy.deepcopy(pipe.load("vae")))
        z = torch.randn(1, *(int(v) for v in sig.sample_shape[-3:]), generator=torch.Generator().manual_seed(0))
        out["vae_decoder"] = (_convert(part, {"z": z}, ["image"], prec, "VAE decoder"), "vae_decoder", prec,
                              {"convert_seconds": round(time.perf_counter() - t0, 2)})
    return out


def write_packages(pkgs: dict[str, tuple[Any, str, str, dict]], folder: Path) -> dict[str, dict[str, Any]]:
    """Save each package as folder/Resources/<Apple's name>.mlpackage; their manifest records."""
    res = folder / RESOURCES
    res.mkdir(exist_ok=True)
    comps: dict[str, dict[str, Any]] = {}
    for name, (ml, role, prec, facts) in pkgs.items():
        rel = f"{RESOURCES}/{PACKAGES[role]}.mlpackage"
        ml.save(str(folder / rel))
        info = coreml_info(folder / rel)
        comps[name] = {"path": rel, "role": role, "precision": prec, "format": "mlpackage",
                       "inputs": info["inputs"], "outputs": list(info["outputs"]), "size_bytes": info["size_bytes"],
                       "shapes": {k: v["shape"] for k, v in info["inputs"].items()}, "ops": info["num_ops"],
                       "weight_dtypes": info["weight_dtypes"],
                       **{k: v for k, v in facts.items() if k in ("convert_seconds", "attention", "batch", "int8")}}
    return comps


def copy_vocab(tokenizer_dir: Path, folder: Path) -> None:
    """vocab.json + merges.txt beside the packages, where the Swift package's BPETokenizer reads them."""
    for f in ("vocab.json", "merges.txt"):
        if not (tokenizer_dir / f).is_file():
            raise BadInput(f"{tokenizer_dir}: no {f} (Apple's Swift package reads a CLIP BPE vocab.json + merges.txt)")
        shutil.copyfile(tokenizer_dir / f, folder / RESOURCES / f)


def check_bundle(folder: Path) -> dict[str, Any]:
    """Structural check of a Core ML bundle without Core ML prediction: every package loads as an ML Program
    with the inputs, outputs and shapes Apple's Swift package feeds and reads, and the vocab files are there."""
    from edgediff.runtime.bundle import read_bundle

    b = read_bundle(folder)
    man = b.manifest
    problems: list[str] = []
    pkgs: dict[str, Any] = {}
    by_role = {c["role"]: (n, c) for n, c in man["components"].items()}
    for role, apple_name in PACKAGES.items():
        if role not in by_role:
            problems.append(f"no {role} component")
            continue
        name, comp = by_role[role]
        path = folder / comp["path"]
        if path.name != f"{apple_name}.mlpackage":
            problems.append(f"{name}: {path.name}, Apple's package reads {apple_name}")
        info = coreml_info(path)
        pkgs[name] = {"path": comp["path"], "inputs": info["inputs"], "outputs": info["outputs"],
                      "precision": info["precision"]}
        ins, outs = info["inputs"], info["outputs"]
        if any(d["dtype"] != "float32" for d in {**ins, **outs}.values()):
            problems.append(f"{name}: every input/output must be float32 (the Swift package feeds Float32 arrays)")
        if role == "text_encoder":
            seq = (man.get("pipeline") or {}).get("tokenizer_config", {}).get("max_length")
            if list(ins) != ["input_ids"] or ins["input_ids"]["shape"] != [1, seq]:
                problems.append(f"{name}: inputs {ins}, expected input_ids [1, {seq}]")
            if "last_hidden_state" not in outs:
                problems.append(f"{name}: no last_hidden_state output")
        elif role == "denoiser":
            sig = man["signature"]
            want = {"sample", "timestep", "encoder_hidden_states"}
            if set(ins) != want:
                problems.append(f"{name}: inputs {sorted(ins)}, expected {sorted(want)}")
            else:
                bsz = ins["sample"]["shape"][0]
                seq, dim = sig["cond_shape"]
                if ins["sample"]["shape"][1:] != list(sig["sample_shape"]) or ins["timestep"]["shape"] != [bsz]:
                    problems.append(f"{name}: sample/timestep shapes {ins['sample']['shape']}/{ins['timestep']['shape']}")
                if ins["encoder_hidden_states"]["shape"] != [bsz, dim, 1, seq]:
                    problems.append(f"{name}: encoder_hidden_states {ins['encoder_hidden_states']['shape']}, "
                                    f"expected [{bsz}, {dim}, 1, {seq}] (the package's toHiddenStates layout)")
            if OUTPUT_NAME not in outs:
                problems.append(f"{name}: no {OUTPUT_NAME!r} output")
        elif role == "vae_decoder":
            img = (man.get("pipeline") or {}).get("image_shape")
            if len(ins) != 1 or next(iter(ins.values()))["shape"] != [1, *man["signature"]["sample_shape"]]:
                problems.append(f"{name}: inputs {ins}, expected one latent input [1, C, h, w]")
            if list(outs) != ["image"] or (img and outs["image"]["shape"] != [1, *img]):
                problems.append(f"{name}: outputs {outs}, expected image [1, {img}]")
    for f in ("vocab.json", "merges.txt"):
        if not (folder / RESOURCES / f).is_file():
            problems.append(f"{RESOURCES}/{f} missing")
    return {"ok": not problems, "problems": problems, "packages": pkgs}
