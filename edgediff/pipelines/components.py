"""A diffusers pipeline folder (model_index.json) as a set of named components.

The denoiser (unet/ or transformer/) is loaded by edgediff.loaders as a DiffusionModel, which
gets `extras["pipeline"]` (the folder, its class and components: JSON, so it survives the
artifact); the other components are read from the pipeline folder when asked for, each from a
closed table of classes (never an import path taken from the file) and from safetensors only.

Component kinds: denoiser, text_encoder (text_encoder, text_encoder_2, ...), tokenizer
(tokenizer, tokenizer_2, ...), vae, scheduler. Anything else (safety_checker,
feature_extractor, image_encoder) is listed as not bundled.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgediff.errors import BadInput
from edgediff.files import read_json
from edgediff.model import DiffusionModel

KEY = "pipeline"  # DiffusionModel.extras key
DENOISER_DIRS = ("unet", "transformer")
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
VAES = ("AutoencoderKL",)
# kind -> (what the message calls it, supported classes, the library that has them, has weights)
_LOADABLE = {"text_encoder": ("text encoder", TEXT_ENCODERS, "transformers", True),
             "tokenizer": ("tokenizer", TOKENIZERS, "transformers", False),
             "vae": ("VAE", VAES, "diffusers", True)}
T5_SEQUENCE = 256  # diffusers' SD3 max_sequence_length default: T5 tokens after the CLIP tokens
DEFAULT_GUIDANCE = 7.5  # StableDiffusionPipeline's, when the pipeline class is unknown to diffusers here


def kind_of(name: str, entry: Any) -> str | None:
    """The component kind of a model_index.json entry, or None for a missing (null) component."""
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        return None
    if name in DENOISER_DIRS:
        return "denoiser"
    if name == "scheduler":
        return "scheduler"
    if name == "vae":
        return "vae"
    if name.startswith("text_encoder"):
        return "text_encoder"
    if name.startswith("tokenizer"):
        return "tokenizer"
    return "other"


def read_index(folder: Path) -> dict[str, Any]:
    idx = read_json(folder / "model_index.json")
    if not isinstance(idx, dict) or not idx.get("_class_name"):
        raise BadInput(f"{folder / 'model_index.json'}: no _class_name; is this a diffusers pipeline folder?")
    return idx


def _call_default(class_name: str, arg: str) -> tuple[bool, Any]:
    """(whether diffusers has the pipeline class, the default of `arg` in its __call__ or None)."""
    try:
        import diffusers

        cls = getattr(diffusers, class_name, None)
    except ImportError:
        cls = None
    if cls is None:
        return False, None
    p = inspect.signature(cls.__call__).parameters.get(arg)
    return True, (p.default if p is not None and p.default is not inspect.Parameter.empty else None)


def default_guidance(class_name: str) -> float | None:
    """The classifier-free guidance scale the diffusers pipeline class's __call__ applies by default (None: none):
    its guidance_scale, or its true_cfg_scale where it has one (Flux: guidance_scale feeds the guidance embedding
    and true_cfg_scale, 1 by default, is the CFG)."""
    known, cfg = _call_default(class_name, "true_cfg_scale")
    if known and isinstance(cfg, (int, float)):
        return float(cfg) if cfg > 1.0 else None
    known, v = _call_default(class_name, "guidance_scale")
    if not known:
        return None if class_name == "DDPMPipeline" else DEFAULT_GUIDANCE
    return float(v) if isinstance(v, (int, float)) else None


def pipeline_sigmas(class_name: str | None) -> str | None:
    """"linspace" when the diffusers pipeline class's __call__ sets its own sigmas, linspace(1, 1/steps, steps),
    before the scheduler's set_timesteps (FluxPipeline, QwenImage, Chroma, ...), else None: read from the class's
    source, since diffusers records it nowhere else."""
    try:
        import diffusers

        cls = getattr(diffusers, str(class_name), None) if class_name else None
        src = inspect.getsource(cls.__call__) if cls is not None else ""
    except (ImportError, OSError, TypeError):
        return None
    return "linspace" if re.search(r"np\.linspace\(\s*1\.0\s*,\s*1\s*/\s*num_inference_steps", src) else None


def max_sequence_length(class_name: str) -> int:
    """T5 tokens the pipeline class encodes a prompt to (its __call__'s max_sequence_length default: SD3 256,
    PixArt-alpha 120, PixArt-Sigma 300, Flux 512); T5_SEQUENCE for a class diffusers here does not have."""
    v = _call_default(class_name, "max_sequence_length")[1]
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else T5_SEQUENCE


def masked_t5(arch: str, rec: dict[str, Any]) -> bool:
    """A PixArt pipeline: one T5 text encoder whose attention mask the denoiser also takes (encoder_attention_mask),
    as PixArtAlphaPipeline/PixArtSigmaPipeline pass it."""
    te = (rec.get("components") or {}).get("text_encoder") or {}
    return arch == "PixArtTransformer2DModel" and te.get("class") == "T5EncoderModel"


def describe_index(folder: Path, hasher: Callable[[Path], str]) -> dict[str, Any]:
    """The JSON record kept in extras["pipeline"]: folder, class, components {name: {kind, library, class}}."""
    idx = read_index(folder)
    comps: dict[str, Any] = {}
    for name, entry in sorted(idx.items()):
        if name.startswith("_"):
            continue
        kind = kind_of(name, entry)
        if kind is None:
            continue
        comps[name] = {"kind": kind, "library": entry[0], "class": entry[1]}
    hashes = {n: hasher(folder / n) for n in comps if (folder / n).is_dir()}
    return {"path": str(folder.resolve()), "class": str(idx["_class_name"]), "components": comps,
            "default_guidance": default_guidance(str(idx["_class_name"])), "component_sha256": hashes}


def cond_shape_of(folder: Path, rec: dict[str, Any]) -> tuple[int, int] | None:
    """(sequence length, hidden size) the first text encoder gives the denoiser, from the configs."""
    te = folder / "text_encoder" / "config.json"
    if "text_encoder" not in rec["components"] or not te.is_file():
        return None
    cfg = read_json(te)
    hidden = cfg.get("hidden_size") or cfg.get("d_model")
    seq = None
    tok = folder / "tokenizer" / "tokenizer_config.json"
    if tok.is_file():
        m = read_json(tok).get("model_max_length")
        if isinstance(m, int) and 0 < m <= 4096:
            seq = m
    seq = seq or cfg.get("max_position_embeddings")
    if not isinstance(hidden, int) or not isinstance(seq, int):
        return None
    return seq, hidden


def text_widths(folder: Path, rec: dict[str, Any]) -> list[int]:
    """Hidden sizes of the CLIP-style text encoders, in name order (text_encoder, text_encoder_2, ...)."""
    out = []
    for name in sorted(n for n, c in rec["components"].items() if c["kind"] == "text_encoder"
                       and c.get("class") != "T5EncoderModel"):
        p = folder / name / "config.json"
        h = read_json(p).get("hidden_size") if p.is_file() else None
        if isinstance(h, int):
            out.append(h)
    return out


def attach(model: DiffusionModel, folder: Path, hasher: Callable[[Path], str], cond_override: bool = False
           ) -> DiffusionModel:
    """Mark a denoiser loaded from a pipeline folder as that pipeline's; its conditioning shape
    follows the text encoder (sequence length of the tokenizer, hidden size) unless overridden."""
    from dataclasses import replace

    rec = describe_index(folder, hasher)
    model.extras[KEY] = rec
    model.provenance["pipeline"] = rec["path"]
    cs = cond_shape_of(folder, rec)
    if cs is not None and masked_t5(model.arch, rec):
        # T5 pads to the pipeline's max_sequence_length (not the tokenizer's model_max_length), mask beside it
        cs = (max_sequence_length(rec["class"]), cs[1])
    t5 = [n for n, c in sorted(rec["components"].items()) if c.get("class") == "T5EncoderModel"]
    if cs is not None and model.arch == "FluxTransformer2DModel" and t5 and (folder / t5[0] / "config.json").is_file():
        # Flux: the T5's states are encoder_hidden_states, the CLIP gives only the pooled projection
        cs = (max_sequence_length(rec["class"]), int(read_json(folder / t5[0] / "config.json").get("d_model") or 0))
    if cs is not None and not cond_override and model.signature.cond_shape is not None:
        width = model.signature.cond_shape[-1]
        widths = text_widths(folder, rec)
        pooled = any(x.name == "pooled_projections" for x in model.signature.extra)
        if width != cs[1] and len(widths) > 1 and width == sum(widths) and not pooled:
            cs = (cs[0], width)  # SDXL: the encoders' hidden states side by side (encode.encode_conditioning)
        elif pooled and len(widths) > 1 and width >= sum(widths[:2]):
            # SD3: the CLIP states side by side, zero-padded to the joint width, then T5's tokens (zeros without it)
            cs = (cs[0] + max_sequence_length(rec["class"]), width)
        if width != cs[1]:
            raise BadInput(f"{folder}: text_encoder hidden size {cs[1]} does not match the denoiser's "
                           f"conditioning width {model.signature.cond_shape[-1]}")
        model.signature = replace(model.signature, cond_shape=tuple(cs))
    sig = model.signature
    if masked_t5(model.arch, rec) and sig.cond_shape and not any(x.name == "encoder_attention_mask" for x in sig.extra):
        from edgediff.model import InputSpec

        # ones: every token attends (what the transformer does without a mask); prompts give their own
        mask = InputSpec("encoder_attention_mask", (int(sig.cond_shape[0]),), fill="const", value=(1.0,))
        model.signature = replace(sig, extra=(*sig.extra, mask))
    return model


def _safetensors_only(folder: Path, name: str) -> None:
    if not any(folder.glob("*.safetensors")):
        raise BadInput(f"{folder}: component {name!r} has no .safetensors weights (edgediff loads no pickles "
                       "from pipeline folders; save it with safe_serialization=True)")


@dataclass
class Pipeline:
    """A loaded pipeline: the denoiser as a DiffusionModel plus lazily loaded torch components."""

    denoiser: DiffusionModel
    path: Path
    class_name: str
    components: dict[str, dict[str, Any]]
    default_guidance: float | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def denoiser_name(self) -> str:
        return next((n for n, c in self.components.items() if c["kind"] == "denoiser"), "unet")

    def names(self, kind: str) -> list[str]:
        return sorted(n for n, c in self.components.items() if c["kind"] == kind)

    def has(self, kind: str) -> bool:
        return bool(self.names(kind))

    def _dir(self, name: str) -> Path:
        d = self.path / name
        if not d.is_dir():
            raise BadInput(f"{self.path / 'model_index.json'}: lists {name!r} but {d} is missing")
        return d

    def load(self, name: str, original: bool = False) -> Any:
        """The torch module (or tokenizer) of component `name`: with the parts a recipe compressed
        re-applied (edgediff.pipelines.parts), or as the pipeline folder has it with `original`."""
        from edgediff.pipelines.parts import apply_parts, records

        compressed = not original and any(r.get("component") == name for r in records(self.denoiser.extras).values())
        key = f"{name}#compressed" if compressed else name
        if key in self._cache:
            return self._cache[key]
        if compressed:
            import copy

            obj = apply_parts(name, copy.deepcopy(self.load(name, original=True)), self.denoiser.extras,
                              str(self.denoiser.provenance.get("artifact") or self.path))
            self._cache[key] = obj
            return obj
        comp = self.components.get(name)
        if comp is None:
            raise BadInput(f"{self.path}: the pipeline has no component {name!r}")
        cls, kind, d = comp["class"], comp["kind"], self._dir(name)
        if kind == "denoiser":
            obj = self.denoiser.module()
        elif kind in _LOADABLE:
            what, classes, library, weights = _LOADABLE[kind]
            if cls not in classes:
                raise BadInput(f"{d}: {what} class {cls!r} is not supported (supported: {', '.join(classes)})")
            if weights:
                _safetensors_only(d, name)
            import importlib

            loaded = getattr(importlib.import_module(library), cls).from_pretrained(
                str(d), **({"use_safetensors": True} if weights else {}))
            obj = loaded.eval() if weights else loaded
        else:
            raise BadInput(f"{d}: component {name!r} ({cls}) is not one edgediff loads")
        self._cache[name] = obj
        return obj

    def scheduler_config(self) -> dict[str, Any]:
        p = self.path / "scheduler" / "scheduler_config.json"
        return dict(read_json(p)) if p.is_file() else self.denoiser.schedule.to_config()

    def vae_scale_factor(self) -> int:
        cfg = read_json(self._dir("vae") / "config.json")
        return 2 ** (len(cfg.get("block_out_channels") or [1]) - 1)

    def vae_scaling_factor(self) -> float:
        cfg = read_json(self._dir("vae") / "config.json")
        return float(cfg.get("scaling_factor", 0.18215))

    def vae_shift_factor(self) -> float:
        cfg = read_json(self._dir("vae") / "config.json")
        return float(cfg.get("shift_factor") or 0.0)


ARTIFACT_DIR = "pipeline"  # inside an artifact: the components the recipe did not touch


def component_files(model: DiffusionModel) -> dict[str, bytes]:
    """The non-denoiser components (and model_index.json) as artifact files under pipeline/, so an
    artifact made from a pipeline carries its text encoder, tokenizer, VAE and scheduler."""
    rec = model.extras.get(KEY)
    if not isinstance(rec, dict):
        return {}
    src = Path(str(rec["path"]))
    out = {f"{ARTIFACT_DIR}/model_index.json": (src / "model_index.json").read_bytes()}
    for name, comp in (rec.get("components") or {}).items():
        d = src / name
        if comp.get("kind") == "denoiser" or not d.is_dir():
            continue
        for f in sorted(d.rglob("*")):
            if f.is_file() and not f.is_symlink() and (f.suffix != ".bin" or comp.get("kind") == "tokenizer"):
                out[f"{ARTIFACT_DIR}/{name}/{f.relative_to(d)}"] = f.read_bytes()
    return out


def pipeline_of(model: DiffusionModel) -> Pipeline | None:
    """The pipeline a denoiser (or an artifact made from one) belongs to, or None. An artifact's own
    copy of the components (pipeline/) comes first, else the source folder."""
    rec = model.extras.get(KEY)
    if not isinstance(rec, dict):
        return None
    path = Path(str(rec.get("path", "")))
    art = model.provenance.get("artifact")
    if art and (Path(str(art)) / ARTIFACT_DIR / "model_index.json").is_file():
        path = Path(str(art)) / ARTIFACT_DIR
    if not (path / "model_index.json").is_file():
        where = model.provenance.get("artifact") or model.provenance.get("source")
        raise BadInput(f"{where}: made from the pipeline folder {path}, which is gone (its text encoder, tokenizer "
                       "and VAE are read from there)")
    return Pipeline(model, path, str(rec.get("class")), dict(rec.get("components") or {}), rec.get("default_guidance"))
