"""Core ML pipeline bundles in the Resources layout of Apple's ml-stable-diffusion Swift package.

`edgediff export PIPELINE_OR_ARTIFACT --target coreml -o DIR [--chunk-unet]` writes

    DIR/Resources/TextEncoder.mlpackage   input_ids float32 [1, S] -> last_hidden_state [1, S, D], pooled_outputs [1, D]
                                          (SDXL: hidden_embeds, the penultimate layer's states, and pooled_outputs)
    DIR/Resources/TextEncoder2.mlpackage  SDXL's second encoder: hidden_embeds, pooled_outputs (its projection)
    DIR/Resources/Unet.mlpackage          sample [B, C, h, w], timestep [B], encoder_hidden_states [B, D, 1, S]
                                          (SDXL: + text_embeds [B, P], time_ids [B, 6]) -> out
      or UnetChunk1/UnetChunk2.mlpackage  --chunk-unet: the same UNet in two programs of about half the weights each
    DIR/Resources/VAEDecoder.mlpackage    z [1, C, h, w] -> image [1, 3, H, W]   (post_quant_conv + decoder)
    DIR/Resources/VAEEncoder.mlpackage    x [1, 3, H, W] -> latent [1, 2C, h, w] (encoder + quant_conv: mean, log-variance)
    DIR/Resources/vocab.json, merges.txt  the CLIP BPE files its BPETokenizer reads
    DIR/tokenizer/, scheduler/, model_index.json, edgediff_bundle.json   as in every edgediff bundle

These are what the Swift package reads (StableDiffusionPipeline+Resources.swift and
StableDiffusionXL+Resources.swift: TextEncoder[2], Unet or UnetChunk1 + UnetChunk2, VAEDecoder,
VAEEncoder, vocab.json, merges.txt under one folder; TextEncoder.swift / TextEncoderXL.swift feed float32
token ids to the model's only input and read `last_hidden_state` / `hidden_embeds` + `pooled_outputs`;
Unet.swift feeds `sample`, `timestep`, `encoder_hidden_states` in the (B, D, 1, S) layout its
toHiddenStates transposes to (SDXL: `text_embeds`, `time_ids`), runs the chunks in turn with the inputs
merged into the second's feed, and reads the first output; Decoder.swift divides by the scaling factor
itself; Encoder.swift samples the latent from the mean and log-variance). B is 2 for a pipeline with
classifier-free guidance (the package's batched [uncond; cond] call, Apple's default export), else 1.
Attention is the split-einsum form of the denoiser export (exporters/coreml.py).
The package loads compiled `.mlmodelc` folders: on a Mac, `xcrun coremlcompiler compile
Resources/Unet.mlpackage Resources/` makes each one (compilation needs Xcode; nothing here runs on Linux).

Precision: the denoiser at the export's (fp32, fp16, int8 from an artifact's QuantParams, as the
single-file export); the other packages fp16 for fp16 exports, else fp32, or a part's own fp16 (a part a
recipe quantized to int8 is not written as Core ML int8: Unavailable naming it).
Prediction is macOS-only: generate/verify on this bundle answer exit 3 with the reason; `check_bundle`
is the structural check (every package's inputs, outputs, shapes, dtypes; the chunks' hand-over).
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
# role -> the name Apple's Swift package reads (StableDiffusionPipeline+Resources.swift, StableDiffusionXL+Resources.swift)
PACKAGES = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "denoiser": "Unet",
            "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder"}
CHUNKS = ("UnetChunk1", "UnetChunk2")  # Apple's --chunk-unet: the Swift package runs them in turn when both exist
REQUIRED = ("text_encoder", "denoiser", "vae_decoder")


class _TextEncoder(nn.Module):
    """Float32 token ids in (the Swift package builds a Float32 array), Apple's output names out: SD-1.x/2.x's
    last_hidden_state, or for SDXL the penultimate layer's states as hidden_embeds (TextEncoderXL.swift reads
    hidden_embeds and pooled_outputs); pooled_outputs is the projection (text_embeds) where the model has one."""

    def __init__(self, te: nn.Module, xl: bool) -> None:
        super().__init__()
        from edgediff.exporters.bundle_tflite import encoder_outputs

        self.xl = xl
        self.call = TextEncoderCall(te, encoder_outputs(te, several=xl))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.call(input_ids)
        pooled = out.get("text_embeds", out.get("pooler_output"))
        if self.xl:
            return out[max((k for k in out if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))], pooled
        return out["last_hidden_state"], pooled if pooled is not None else out["last_hidden_state"][:, -1]


class AppleUnet(nn.Module):
    """The denoiser call with encoder_hidden_states as (B, D, 1, S), the layout Apple's package feeds; SDXL's
    text_embeds and time_ids by name as its Unet.swift feeds them."""

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.wrapper = wrapper

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {k: v for k, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is not None}
        return self.wrapper(sample, timestep, encoder_hidden_states=encoder_hidden_states.squeeze(2).transpose(1, 2),
                            **extra)


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
    """{component name: (MLModel, role, precision, facts)} for the text encoder(s), the UNet and the VAE's parts."""
    from edgediff.exporters.bundle_tflite import text_encoders

    from edgediff.pipelines.bundle import component_precision, example_shapes
    from edgediff.pipelines.parts import VaeDecoderPart, VaeEncoderPart, part_precision

    sig = model.signature
    kind, names = text_encoders(pipe, "coreml")
    if not names or kind not in ("clip", "sdxl") or not sig.cond_shape or sig.num_classes or "UNet" not in model.arch:
        raise Unavailable(f"{pipe.path}: Core ML bundles follow Apple's ml-stable-diffusion layout, written for "
                          "text-to-image pipelines with a UNet and one text encoder (SD 1.x/2.x) or SDXL's two (this is "
                          f"{pipe.class_name} with {model.arch}); export the denoiser alone with -o model.mlpackage")
    for part in (*names, "vae_decoder", "vae_encoder"):
        if part_precision(model.extras, part) == "int8":
            raise Unavailable(f"{pipe.path}: the recipe quantized {part} to int8, which the Core ML bundle does not "
                              "write yet (the ONNX bundle does: --target onnx)")
    shapes = example_shapes(pipe, model)
    cfg = float(pipe.default_guidance or 1.0) > 1.0
    out: dict[str, tuple[Any, str, str, dict]] = {}

    def part(name: str, module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], what: str) -> None:
        prec = part_precision(model.extras, name) or component_precision(precision)
        t0 = time.perf_counter()
        out[name] = (_convert(module, inputs, outputs, prec, what), name, prec,
                     {"convert_seconds": round(time.perf_counter() - t0, 2)})

    xl = kind == "sdxl"
    for name in names:
        ids = torch.zeros(*shapes[name]["input_ids"])
        part(name, _TextEncoder(pipe.load(name), xl), {"input_ids": ids},
             ["hidden_embeds" if xl else "last_hidden_state", "pooled_outputs"], name.replace("_", " "))

    def apple(wrapper: nn.Module, ex: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        ex = dict(ex)
        ex["encoder_hidden_states"] = ex["encoder_hidden_states"].transpose(1, 2).unsqueeze(2).contiguous()  # (B, D, 1, S)
        return AppleUnet(wrapper).eval(), ex

    ml, facts = build_mlmodel(model, precision, batch=2 if cfg else 1, entry=apple)
    out[pipe.denoiser_name] = (ml, "denoiser", precision, facts)
    if pipe.has("vae"):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(*shapes["vae_decoder"]["latent_sample"], generator=g)
        part("vae_decoder", VaeDecoderPart(copy.deepcopy(pipe.load("vae"))), {"z": z}, ["image"], "VAE decoder")
        # Apple's VAEEncoder: x [1, 3, H, W] in [-1, 1] -> latent, the Gaussian's mean and log-variance (Encoder.swift
        # samples and scales them itself)
        x = torch.rand(*shapes["vae_encoder"]["sample"], generator=g) * 2 - 1
        part("vae_encoder", VaeEncoderPart(copy.deepcopy(pipe.load("vae"))), {"x": x}, ["latent"], "VAE encoder")
    return out


def write_packages(pkgs: dict[str, tuple[Any, str, str, dict]], folder: Path,
                   chunk_unet: bool = False) -> dict[str, dict[str, Any]]:
    """Save each package as folder/Resources/<Apple's name>.mlpackage; their manifest records.

    `chunk_unet`: the UNet as Resources/UnetChunk1.mlpackage + UnetChunk2.mlpackage (Apple's --chunk-unet, for
    iOS/iPadOS, where one large program does not load on the Neural Engine): coremltools' bisect_model cuts the
    ML Program where the weight bytes are halved; the second chunk takes the first's outputs plus the original
    inputs it uses, as Unet.swift merges them. The manifest's denoiser record lists both (`chunks`)."""
    res = folder / RESOURCES
    res.mkdir(exist_ok=True)
    comps: dict[str, dict[str, Any]] = {}
    for name, (ml, role, prec, facts) in pkgs.items():
        kept = {k: v for k, v in facts.items() if k in ("convert_seconds", "attention", "batch", "int8")}
        if role == "denoiser" and chunk_unet:
            comps[name] = {**_chunked(ml, folder), "role": role, "precision": prec, **kept}
            continue
        rel = f"{RESOURCES}/{PACKAGES[role]}.mlpackage"
        ml.save(str(folder / rel))
        comps[name] = {**_record(folder, rel), "role": role, "precision": prec, **kept}
    return comps


def _record(folder: Path, rel: str) -> dict[str, Any]:
    info = coreml_info(folder / rel)
    return {"path": rel, "format": "mlpackage", "inputs": info["inputs"], "outputs": list(info["outputs"]),
            "size_bytes": info["size_bytes"], "shapes": {k: v["shape"] for k, v in info["inputs"].items()},
            "ops": info["num_ops"], "weight_dtypes": info["weight_dtypes"]}


def _chunked(ml: Any, folder: Path) -> dict[str, Any]:
    """The UNet bisected into Apple's two chunks; the denoiser record: the first chunk's path, the UNet's
    inputs (those the chunks take from outside) and output, both chunks' records under `chunks`."""
    import tempfile

    ct = _ct()
    with tempfile.TemporaryDirectory(prefix="edgediff-chunk-") as td:
        ml.save(str(Path(td) / "whole.mlpackage"))
        t0 = time.perf_counter()
        whole = _consts_at_first_use(Path(td) / "whole.mlpackage", Path(td) / "Unet.mlpackage")
        try:
            ct.models.utils.bisect_model(str(whole), td, check_output_correctness=False)  # prediction: macOS only
        except (RuntimeError, ValueError, AssertionError) as e:
            raise BadInput(f"coremltools could not split the UNet into two chunks ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        secs = round(time.perf_counter() - t0, 2)
        for i, apple_name in enumerate(CHUNKS, 1):
            shutil.move(str(Path(td) / f"Unet_chunk{i}.mlpackage"), str(folder / RESOURCES / f"{apple_name}.mlpackage"))
    chunks = [_record(folder, f"{RESOURCES}/{n}.mlpackage") for n in CHUNKS]
    first_out = set(chunks[0]["outputs"])
    inputs = dict(chunks[0]["inputs"])
    inputs.update({k: v for k, v in chunks[1]["inputs"].items() if k not in first_out})
    return {"path": chunks[0]["path"], "format": "mlpackage", "inputs": inputs, "outputs": chunks[1]["outputs"],
            "size_bytes": sum(c["size_bytes"] for c in chunks), "shapes": {k: v["shape"] for k, v in inputs.items()},
            "ops": sum(c["ops"] for c in chunks), "chunks": chunks,
            "weight_dtypes": {k: sum(c["weight_dtypes"].get(k, 0) for c in chunks)
                              for k in {**chunks[0]["weight_dtypes"], **chunks[1]["weight_dtypes"]}},
            "chunk_seconds": secs}


def _consts_at_first_use(src: Path, dest: Path) -> Path:
    """The ML Program at `src` saved to `dest` with every const op moved to just before its first consumer.

    bisect_model cuts at the first op after which half the const bytes have been seen, in program order; the
    torch.export frontend puts every weight const first, so that cut falls at the program's first op (a chunk
    of ~2 KB and one of all the rest). With the weights next to their ops, the cut halves the weights as on
    Apple's UNets. Reads and rebuilds the program as bisect_model itself does (coremltools' milproto loader
    and mil_convert)."""
    ct = _ct()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.models.utils import _try_get_weights_dir_path

    spec = ct.utils.load_spec(str(src))
    prog = milproto.load(spec, spec.specificationVersion, _try_get_weights_dir_path(str(src)))
    func = prog.functions["main"]
    ops = list(func.operations)
    index = {id(o): i for i, o in enumerate(ops)}
    before: dict[int, list[Any]] = {}
    for o in ops:
        if o.op_type == "const":
            users = [index[id(c)] for v in o.outputs for c in v.child_ops if id(c) in index]
            before.setdefault(min(users, default=len(ops)), []).append(o)
    order: list[Any] = []
    for i, o in enumerate(ops):
        if o.op_type != "const":
            order.extend(before.pop(i, []))
            order.append(o)
    for rest in before.values():  # consts no op reads (the program's outputs)
        order.extend(rest)
    func.operations = order
    mil_convert(prog, convert_to="mlprogram", convert_from="milinternal", specification_version=spec.specificationVersion,
                compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True).save(str(dest))
    return dest


def copy_vocab(tokenizer_dir: Path, folder: Path) -> None:
    """vocab.json + merges.txt beside the packages, where the Swift package's BPETokenizer reads them."""
    for f in ("vocab.json", "merges.txt"):
        if not (tokenizer_dir / f).is_file():
            raise BadInput(f"{tokenizer_dir}: no {f} (Apple's Swift package reads a CLIP BPE vocab.json + merges.txt)")
        shutil.copyfile(tokenizer_dir / f, folder / RESOURCES / f)


def check_bundle(folder: Path) -> dict[str, Any]:
    """Structural check of a Core ML bundle without Core ML prediction: every package loads as an ML Program
    with the inputs, outputs and shapes Apple's Swift package feeds and reads (SD 1.x/2.x or SDXL; the UNet whole
    or as UnetChunk1/2), and the vocab files are there."""
    from edgediff.runtime.bundle import read_bundle

    b = read_bundle(folder)
    man = b.manifest
    pipe = man.get("pipeline") or {}
    problems: list[str] = []
    pkgs: dict[str, Any] = {}
    by_role = {c["role"]: (n, c) for n, c in man["components"].items()}
    xl = pipe.get("encoding") == "sdxl"
    sig = man["signature"]
    for role, apple_name in PACKAGES.items():
        if role not in by_role:
            if role in REQUIRED or (role == "text_encoder_2" and xl):
                problems.append(f"no {role} component")
            continue
        name, comp = by_role[role]
        files = [c["path"] for c in comp["chunks"]] if comp.get("chunks") else [comp["path"]]
        want_names = [f"{n}.mlpackage" for n in (CHUNKS if comp.get("chunks") else (apple_name,))]
        infos = []
        for rel, want in zip(files, want_names):
            path = folder / rel
            if path.name != want:
                problems.append(f"{name}: {path.name}, Apple's package reads {want.split('.')[0]}")
            infos.append(coreml_info(path))
        pkgs[name] = {"path": comp["path"], "precision": infos[0]["precision"],
                      **({"chunks": [{"path": r, "inputs": i["inputs"], "outputs": i["outputs"],
                                      "size_bytes": i["size_bytes"]} for r, i in zip(files, infos)]}
                         if len(infos) > 1 else {})}
        ins, outs = dict(infos[0]["inputs"]), dict(infos[-1]["outputs"])
        if len(infos) > 1:  # chunk 2 takes chunk 1's outputs and any of the UNet's own inputs
            between = set(infos[0]["outputs"])
            missing = [k for k in infos[1]["inputs"] if k not in between and k not in ins]
            if missing:
                problems.append(f"{name}: UnetChunk2 takes {missing}, neither UnetChunk1's outputs nor the UNet's inputs")
            ins.update({k: v for k, v in infos[1]["inputs"].items() if k not in between})
        pkgs[name].update({"inputs": ins, "outputs": outs})
        if any(d["dtype"] != "float32" for d in {**ins, **outs}.values()):
            problems.append(f"{name}: every input/output must be float32 (the Swift package feeds Float32 arrays)")
        if role.startswith("text_encoder"):
            seq = ((pipe.get("tokenizer_configs") or {}).get("tokenizer" + role[len("text_encoder"):])
                   or pipe.get("tokenizer_config") or {}).get("max_length")
            if list(ins) != ["input_ids"] or ins["input_ids"]["shape"] != [1, seq]:
                problems.append(f"{name}: inputs {ins}, expected input_ids [1, {seq}]")
            want_out = ["hidden_embeds", "pooled_outputs"] if xl else ["last_hidden_state"]
            if any(o not in outs for o in want_out):
                problems.append(f"{name}: outputs {sorted(outs)}, Apple's package reads {want_out}")
        elif role == "denoiser":
            want = {"sample", "timestep", "encoder_hidden_states"} | ({"text_embeds", "time_ids"} if xl else set())
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
                if xl and ins["time_ids"]["shape"] != [bsz, 6]:
                    problems.append(f"{name}: time_ids {ins['time_ids']['shape']}, expected [{bsz}, 6] (its baseGeometry)")
                if xl and ins["text_embeds"]["shape"][0] != bsz:
                    problems.append(f"{name}: text_embeds {ins['text_embeds']['shape']}, expected batch {bsz}")
            if list(outs) != [OUTPUT_NAME]:  # Unet.swift reads the last stage's first output
                problems.append(f"{name}: outputs {sorted(outs)}, expected the one {OUTPUT_NAME!r}")
        elif role == "vae_decoder":
            img = pipe.get("image_shape")
            if len(ins) != 1 or next(iter(ins.values()))["shape"] != [1, *sig["sample_shape"]]:
                problems.append(f"{name}: inputs {ins}, expected one latent input [1, C, h, w]")
            if list(outs) != ["image"] or (img and outs["image"]["shape"] != [1, *img]):
                problems.append(f"{name}: outputs {outs}, expected image [1, {img}]")
        elif role == "vae_encoder":  # Encoder.swift: its one input at the image size, mean then log-variance out
            img = pipe.get("image_shape")
            c, h, w = sig["sample_shape"]
            if len(ins) != 1 or (img and next(iter(ins.values()))["shape"] != [1, *img]):
                problems.append(f"{name}: inputs {ins}, expected one image input [1, {img}]")
            if len(outs) != 1 or next(iter(outs.values()))["shape"] != [1, 2 * c, h, w]:
                problems.append(f"{name}: outputs {outs}, expected the latent mean and log-variance [1, {2 * c}, {h}, {w}]")
    for f in ("vocab.json", "merges.txt"):
        if not (folder / RESOURCES / f).is_file():
            problems.append(f"{RESOURCES}/{f} missing")
    return {"ok": not problems, "problems": problems, "packages": pkgs}
