"""The pipeline part of a bundle (edgediff.bundle writes the denoiser and the manifest):
text_encoder/, vae_decoder/, vae_encoder/ as ONNX graphs with optimum's names, tokenizer/
(tokenizer.json for the `tokenizers` library, vocab.json/merges.txt for Swift/other runtimes),
each component's config.json, and the manifest's `pipeline` record the numpy runtime reads.

Precision per component: the denoiser's is the export's (fp32/fp16/int8 from the artifact);
a text encoder or VAE part a recipe compressed (edgediff.pipelines.compress) ships at its own
precision (int8, fp16); the others follow fp16 when the export is fp16 and stay fp32 otherwise.
The manifest says which each is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.pipelines.components import Pipeline

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "spiece.model", "added_tokens.json")


def latent_chw(model: DiffusionModel) -> tuple[int, int, int]:
    """(C, h, w) of the latents the VAE decodes: the sample shape, or a packed model's tokens unpacked (Flux)."""
    from edgediff.sampling import packed_grid

    shape = tuple(int(v) for v in model.signature.sample_shape)
    grid = packed_grid(model)
    if len(shape) == 2 and grid is not None and shape[1] % 4 == 0:
        return shape[1] // 4, 2 * grid[0], 2 * grid[1]
    c, h, w = shape[-3:]
    return c, h, w


def component_precision(precision: str) -> str:
    return "fp16" if precision == "fp16" else "fp32"


def component_graphs(pipe: Pipeline, model: DiffusionModel, precision: str) -> dict[str, tuple[Any, str, str]]:
    """{bundle folder: (ModelProto, role, precision)} for the text encoder(s) and the VAE.

    A part a recipe compressed ships at its own precision (int8 from its QuantParams, fp16); the others
    follow fp16 when the export is fp16 and stay fp32 otherwise."""
    from edgediff.exporters import bundle_onnx as bo
    from edgediff.pipelines.parts import records

    parts = records(model.extras)

    def graph(part: str, module: Any, trace: Any) -> tuple[Any, str]:
        rec = parts.get(part) or {}
        prec = str(rec.get("precision") or component_precision(precision))
        if prec == "int8":
            return bo.finish_int8(trace(bo.int8_module(module, rec["quant"]))), prec
        proto = trace(module)
        return (bo.to_fp16(proto) if prec == "fp16" else proto), prec

    out: dict[str, tuple[Any, str, str]] = {}
    from edgediff.pipelines.encode import encoding_of, text_sequence

    kind = encoding_of(pipe)
    for name in pipe.names("text_encoder"):
        if kind in ("clip", "pixart") and name != "text_encoder":
            raise BadInput(f"{pipe.path}: pipelines with several text encoders ({', '.join(pipe.names('text_encoder'))}) "
                           "other than SDXL's and SD3's are not bundled; export the denoiser and pass --prompt-embeds")
        seq = text_sequence(pipe, name)
        proto, prec = graph(name, pipe.load(name),
                            lambda m, seq=seq: bo.text_encoder_graph(m, seq, hidden_states=kind in ("sdxl", "sd3"),
                                                                     attention_mask=kind == "pixart"))
        out[name] = (proto, name, prec)  # role text_encoder, text_encoder_2: the runtime asks by name
    if pipe.has("vae"):
        vae = pipe.load("vae")
        f = pipe.vae_scale_factor()
        c, h, w = latent_chw(model)
        proto, prec = graph("vae_decoder", vae, lambda m: bo.vae_decoder_graph(m, (c, h, w)))
        out["vae_decoder"] = (proto, "vae_decoder", prec)
        image = (int(vae.config.in_channels), h * f, w * f)
        proto, prec = graph("vae_encoder", vae, lambda m: bo.vae_encoder_graph(m, image))
        out["vae_encoder"] = (proto, "vae_encoder", prec)
    return out


def example_shapes(pipe: Pipeline, model: DiffusionModel) -> dict[str, dict[str, list[int]]]:
    """{component: {input: shape at batch 1}}: the shapes the pipeline runs (the graphs' H/W are dynamic)."""
    c, h, w = latent_chw(model)
    shapes: dict[str, dict[str, list[int]]] = {}
    from edgediff.pipelines.encode import encoding_of, text_sequence

    for name in pipe.names("text_encoder"):
        seq = text_sequence(pipe, name)
        shapes[name] = {"input_ids": [1, seq], **({"attention_mask": [1, seq]} if encoding_of(pipe) == "pixart" else {})}
    if pipe.has("vae"):
        f = pipe.vae_scale_factor()
        shapes["vae_decoder"] = {"latent_sample": [1, c, h, w]}
        shapes["vae_encoder"] = {"sample": [1, int(pipe.load("vae").config.in_channels), h * f, w * f]}
    return shapes


def _tokenizer_files(pipe: Pipeline, name: str, dest: Path) -> None:
    """Copy the tokenizer's text files; tokenizer.json (the `tokenizers` library's format) is the one transformers
    runs: its loaded backend (transformers rewrites some on load, e.g. T5's pre-tokenizer gains a WhitespaceSplit),
    else the file saved by save_pretrained."""
    src = pipe.path / name
    dest.mkdir()
    for fn in TOKENIZER_FILES:
        if (src / fn).is_file():
            shutil.copyfile(src / fn, dest / fn)
    backend = getattr(pipe.load(name), "backend_tokenizer", None)
    if backend is not None:
        (dest / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    if not (dest / "tokenizer.json").is_file():
        tok = pipe.load(name)
        tmp = dest / "_saved"
        tok.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            shutil.rmtree(tmp)
            raise BadInput(f"{src}: cannot write a tokenizer.json for it (the runtime tokenizes with `tokenizers`)")
        shutil.copyfile(tmp / "tokenizer.json", dest / "tokenizer.json")
        shutil.rmtree(tmp)
    model = json.loads((dest / "tokenizer.json").read_text()).get("model") or {}
    if model.get("type") == "BPE" and not (dest / "vocab.json").is_file():
        # vocab.json + merges.txt: what runtimes without the `tokenizers` library read (Apple's Swift package)
        (dest / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def write_pipeline_components(pipe: Pipeline, model: DiffusionModel, tmp: Path, graphs: dict[str, tuple[Any, str, str]],
                              components: dict[str, Any], index: dict[str, Any], denoiser_dir: str) -> dict[str, Any]:
    """Write the components beside the denoiser; fills `components` and `index`; returns manifest['pipeline']."""
    import onnx

    from edgediff.exporters import bundle_onnx as bo

    for name, (proto, role, prec) in graphs.items():
        (tmp / name).mkdir()
        bo.save(proto, str(tmp / name / "model.onnx"))
        onnx.checker.check_model(str(tmp / name / "model.onnx"))  # by path: a graph with external data checks too
        src_cfg = pipe.path / ("vae" if role.startswith("vae") else name) / "config.json"
        if src_cfg.is_file():
            shutil.copyfile(src_cfg, tmp / name / "config.json")  # optimum's ORT pipeline reads it
        inputs, outputs = bo.graph_io(proto)
        components[name] = {"path": f"{name}/model.onnx", "role": role, "precision": prec, "inputs": inputs,
                            "outputs": outputs,
                            "size_bytes": sum(p.stat().st_size for p in (tmp / name).glob("model.onnx*")),
                            "shapes": example_shapes(pipe, model).get(name)}
    (tmp / denoiser_dir / "config.json").write_text(json.dumps(model.config or {}, indent=2, default=str) + "\n")
    for name in pipe.names("tokenizer"):
        _tokenizer_files(pipe, name, tmp / name)
        components[name] = {"path": f"{name}/tokenizer.json", "role": "tokenizer", "precision": None,
                            "size_bytes": sum(p.stat().st_size for p in (tmp / name).iterdir())}
    src_index = json.loads((pipe.path / "model_index.json").read_text())
    index.clear()
    for k, v in src_index.items():
        if k == "vae" or (not k.startswith("_") and isinstance(v, list) and v and v[0] is None):
            continue  # the VAE ships as vae_decoder/ + vae_encoder/; absent components are left out
        index[k] = v
    index[denoiser_dir] = ["diffusers", model.arch]
    if "vae_decoder" in graphs:
        # what optimum's exported folders list: the split VAE under its ONNX class names
        index["vae_decoder"] = ["optimum", "ORTModelVaeDecoder"]
        index["vae_encoder"] = ["optimum", "ORTModelVaeEncoder"]
    index["scheduler"] = ["diffusers", json.loads((tmp / "scheduler" / "scheduler_config.json").read_text())["_class_name"]]
    rec: dict[str, Any] = {"class": pipe.class_name, "default_guidance": pipe.default_guidance,
                           "denoiser": denoiser_dir, "text_encoder": "text_encoder" if "text_encoder" in graphs else None,
                           "tokenizer": "tokenizer" if pipe.has("tokenizer") else None,
                           "vae_decoder": "vae_decoder" if "vae_decoder" in graphs else None,
                           "vae_encoder": "vae_encoder" if "vae_encoder" in graphs else None,
                           "source_components_sha256": (model.extras.get("pipeline") or {}).get("component_sha256")}
    if model.signature.num_classes:  # class-conditional (DiT): labels, their names, the null class of guidance
        labels = src_index.get("id2label")
        rec.update({"num_classes": int(model.signature.num_classes), "null_class": int(model.signature.num_classes),
                    "id2label": labels if isinstance(labels, dict) else None})
    if pipe.has("vae"):
        c, h, w = latent_chw(model)
        f = pipe.vae_scale_factor()
        rec.update({"vae_scaling_factor": pipe.vae_scaling_factor(), "vae_shift_factor": pipe.vae_shift_factor(),
                    "vae_scale_factor": f, "image_shape": [3, h * f, w * f]})
    from edgediff.pipelines.encode import encoding_of, is_t5, text_sequence

    kind = encoding_of(pipe) if pipe.has("text_encoder") else None
    if pipe.has("tokenizer"):
        configs = {}
        for name in pipe.names("tokenizer"):
            tok = pipe.load(name)
            te = "text_encoder" + name[len("tokenizer"):]
            seq = text_sequence(pipe, te) if te in pipe.components else int(tok.model_max_length)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            configs[name] = {"max_length": seq, "pad_token_id": int(pad) if pad is not None else 0}
        rec["tokenizer_config"] = configs.get("tokenizer")
        rec["tokenizer_configs"] = configs
    from edgediff.pipelines.components import pipeline_sigmas
    from edgediff.sampling import packed_grid

    rec["sigmas"] = pipeline_sigmas(pipe.class_name)  # the class's own sigma spacing (Flux: linspace(1, 1/N, N))
    grid = packed_grid(model)
    if grid is not None and len(model.signature.sample_shape) == 2:
        rec["packed_grid"] = list(grid)  # latents are 2x2-packed tokens: noise drawn unpacked, unpacked to decode
    if kind in ("sdxl", "sd3", "pixart", "flux"):  # how the runtime combines them (edgediff.pipelines.encode.encode_conditioning)
        rec["encoding"] = kind
        rec["text_encoders"] = [n for n in graphs if n.startswith("text_encoder")]
        # "t5": last_hidden_state as it is; "clip": penultimate states + pooled output (SDXL / SD3)
        rec["text_encoder_kinds"] = {n: "t5" if is_t5(pipe, n) else "clip" for n in rec["text_encoders"]}
        rec["hidden_width"] = int(model.signature.cond_shape[-1]) if model.signature.cond_shape else None
        if kind == "pixart":  # PixArt's _text_preprocessing with clean_caption off; the mask goes to the denoiser
            rec["text_preprocessing"] = "lower_strip"
            rec["attention_mask_input"] = "encoder_attention_mask"
        if kind == "sdxl":
            c, h, w = (int(v) for v in model.signature.sample_shape[-3:])
            f = pipe.vae_scale_factor() if pipe.has("vae") else 8
            rec["time_ids"] = [h * f, w * f, 0, 0, h * f, w * f]
            rec["force_zeros_for_empty_prompt"] = bool(src_index.get("force_zeros_for_empty_prompt", True))
        elif kind == "sd3":
            from edgediff.pipelines.components import max_sequence_length

            rec["t5_sequence"] = max_sequence_length(pipe.class_name)
    return rec
