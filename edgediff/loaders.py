"""Frontend: turn what a user points at into a DiffusionModel, or fail with one clear line.

Accepted: the word `demo`; an edgediff artifact directory; a diffusers model folder
(config.json + safetensors) or pipeline folder (model_index.json); a `.safetensors` file with
a config.json beside it or given by --config; a `torch.export` `.pt2` archive; a `.pt`/`.pth`
state dict (with a config), or a pickled module only with trust_pickle=True, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.adapter import register_source_loader
from edgediff.errors import BadInput
from edgediff.files import build_diffusers, load_safetensors, read_json, sha256_of
from edgediff.model import DenoiserModule, DiffusionModel, InputSignature
from edgediff.schedule import NoiseSchedule
from edgediff.signature import DENOISER_CLASSES, infer, override

DEMO_DIR = Path(__file__).parent / "demo" / "weights"
DEFAULT_COND_LEN = 77
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")
# keys that mark an original (CompVis / Stability) single-file checkpoint rather than a diffusers layout
_SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


@dataclass
class LoadOptions:
    """Overrides for what the loader would otherwise infer."""

    config: Path | None = None
    scheduler_config: Path | None = None
    sample_shape: tuple[int, ...] | None = None
    cond_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    trust_pickle: bool = False
    variant: str | None = None  # diffusers weight variant: diffusion_pytorch_model.<variant>.safetensors
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --input NAME=SHAPE overrides
    adapter: Path | None = None  # --adapter FILE.toml for a non-diffusers module


def signature_from_config(arch: str, cfg: dict[str, Any], opts: LoadOptions) -> InputSignature:
    """Infer the call signature of a diffusers denoiser from its config, then apply overrides."""
    return apply_overrides(infer(arch, cfg), opts)


def apply_overrides(sig: InputSignature, opts: LoadOptions) -> InputSignature:
    return override(sig, opts.sample_shape, opts.cond_shape, opts.num_classes, opts.inputs)


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise BadInput(f"{where}: weights do not fit the config ({first[-1].strip() if first else e})") from None
    if missing or unexpected:
        raise BadInput(f"{where}: weights do not fit the config ({len(missing)} missing, {len(unexpected)} unexpected "
                       f"tensors, e.g. {(missing or unexpected)[0]!r})")


def _schedule_near(folder: Path, opts: LoadOptions) -> NoiseSchedule:
    """The model's own scheduler config: --scheduler-config, else the one shipped beside the model."""
    if opts.scheduler_config:
        return NoiseSchedule.from_config(read_json(opts.scheduler_config), str(opts.scheduler_config))
    for cand in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json",
                 folder.parent / "scheduler_config.json"):
        if cand.is_file():
            return NoiseSchedule.from_config(read_json(cand), str(cand))
    return NoiseSchedule.from_config({})


def _variant_of(f: Path) -> tuple[str | None, bool]:
    """(variant, is_shard) of a diffusers weight file name: model[.fp16][-00001-of-00002].safetensors."""
    stem = f.name[: -len(".safetensors")]
    shard = bool(_SHARD.search(stem))
    stem = _SHARD.sub("", stem)
    return (stem.rsplit(".", 1)[1] if "." in stem else None), shard


def _index_variant(f: Path) -> str | None:
    # diffusion_pytorch_model.safetensors.index.json / ...index.fp16.json
    parts = f.name.split(".safetensors.index.", 1)[1].split(".")
    return parts[0] if len(parts) == 2 else None


def single_file_check(path: Path, keys: Any) -> None:
    """Refuse an original single-file Stable Diffusion checkpoint with the conversion to do."""
    if any(str(k).startswith(_SINGLE_FILE_PREFIXES) for k in keys):
        raise BadInput(f"{path}: a single-file (original layout) Stable Diffusion checkpoint; convert it with diffusers "
                       "first, e.g. StableDiffusionPipeline.from_single_file(PATH).save_pretrained(DIR) "
                       "(StableDiffusionXLPipeline for SDXL), then pass DIR")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return list(fh.keys())
    except Exception:  # noqa: BLE001 - a corrupt file is reported by load_safetensors
        return []


def _pick_weights(path: Path, variant: str | None) -> tuple[list[Path], str | None]:
    """The weight files of one variant in a diffusers model folder (several when sharded)."""
    files = sorted(path.glob("*.safetensors"))
    groups: dict[str | None, list[Path]] = {}
    for f in files:
        groups.setdefault(_variant_of(f)[0], []).append(f)
    indexes = {_index_variant(i): i for i in sorted(path.glob("*.safetensors.index*.json"))}
    if not files:
        bins = sorted(path.glob("*.bin"))
        if len(bins) > 1:
            raise BadInput(f"{path}: several .bin weight files ({', '.join(b.name for b in bins)}); "
                           "save the model with safetensors (save_pretrained(..., safe_serialization=True))")
        return bins, None
    chosen = variant
    if variant is not None and variant not in groups:
        have = ", ".join(sorted(v or "(none)" for v in groups))
        raise BadInput(f"{path}: no weights of variant {variant!r} (variants here: {have})")
    if variant is None and None not in groups:
        if len(groups) > 1:
            raise BadInput(f"{path}: only variant weights here ({', '.join(sorted(map(str, groups)))}); "
                           "pick one with --variant NAME")
        chosen = next(iter(groups))  # e.g. only diffusion_pytorch_model.fp16.safetensors: the one there is
    picked = groups[chosen]
    if len(picked) > 1 or any(_variant_of(f)[1] for f in picked):
        idx = indexes.get(chosen)
        if idx is None:
            raise BadInput(f"{path}: sharded weights ({', '.join(f.name for f in picked)}) without their "
                           f"*.safetensors.index{'.' + chosen if chosen else ''}.json")
        wm = read_json(idx).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise BadInput(f"{idx}: no weight_map")
        names = sorted(set(map(str, wm.values())))
        from edgediff.safety import child_path

        for n in names:  # shard names come from the file: plain names inside the folder
            child_path(path, n, str(idx), "shard")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise BadInput(f"{idx}: names shard {missing[0]!r}, which is not in {path}")
        picked = [path / n for n in names]
    return picked, chosen


def _load_weights(files: list[Path], opts: LoadOptions) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_safetensors(f))
        else:
            state.update(_torch_load_state(f, opts.trust_pickle))  # --trust-pickle covers a folder's .bin
    return state


def _from_config_and_weights(cfg_path: Path, weights: Path | list[Path], opts: LoadOptions, source: Path,
                             variant: str | None = None) -> DiffusionModel:
    cfg = read_json(cfg_path)
    arch = cfg.get("_class_name")
    if not arch:
        raise BadInput(f"{cfg_path}: config has no _class_name; is this a diffusers model config?")
    try:
        sig = signature_from_config(arch, cfg, opts)
    except BadInput as e:
        raise BadInput(f"{cfg_path}: {e}") from None
    module = build_diffusers(arch, cfg, cfg_path)
    files = weights if isinstance(weights, list) else [weights]
    state = _load_weights(files, opts)
    load_state_into(module, state, files[0] if len(files) == 1 else cfg_path.parent)
    module.eval()
    prov: dict[str, Any] = {"source": str(source), "source_sha256": sha256_of(source)}
    if variant:
        prov["variant"] = variant
    return DiffusionModel(
        denoiser=module, schedule=_schedule_near(cfg_path.parent, opts), signature=sig,
        arch=arch, config=dict(module.config), provenance=prov,
    )


def _load_folder(path: Path, opts: LoadOptions) -> DiffusionModel:
    if (path / "manifest.json").is_file():
        from edgediff.artifact import load_artifact

        return load_artifact(path, trust_pickle=opts.trust_pickle)
    if (path / "model_index.json").is_file():
        for sub in ("unet", "transformer"):
            if (path / sub / "config.json").is_file():
                from edgediff.pipelines.components import attach  # the other components, read when asked for

                return attach(_load_folder(path / sub, opts), path, sha256_of, cond_override=opts.cond_shape is not None)
        raise BadInput(f"{path}: pipeline folder has neither unet/ nor transformer/ with a config.json")
    cfg = path / "config.json"
    if not cfg.is_file():
        lone = sorted(path.glob("*.safetensors"))
        if len(lone) == 1:
            single_file_check(lone[0], _safetensors_keys(lone[0]))
        raise BadInput(f"{path}: folder has no config.json, model_index.json or manifest.json")
    weights, variant = _pick_weights(path, opts.variant)
    if not weights:
        raise BadInput(f"{path}: folder has a config.json but no .safetensors weights")
    return _from_config_and_weights(cfg, weights, opts, path, variant)


def _torch_load_state(path: Path, trust_pickle: bool = False) -> Any:
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip (PK..) or, in the legacy format, a pickle (protocol marker 0x80)
    if not head.startswith(b"PK") and head[:1] != b"\x80":
        raise BadInput(f"{path}: not a PyTorch file (neither torch.save's zip nor its legacy pickle format)")
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - unpickling can raise anything
            raise BadInput(f"{path}: cannot unpickle ({e.__class__.__name__}: {e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise BadInput(f"{path}: holds pickled Python objects (a whole module?); loading it runs code from the file. "
                           "Rerun with --trust-pickle if you trust its source, or save a state_dict / .pt2 instead") from None
        raise BadInput(f"{path}: not a readable PyTorch file (truncated or corrupt: {e.__class__.__name__})") from None


def _load_pt(path: Path, opts: LoadOptions) -> DiffusionModel:
    obj = _torch_load_state(path, opts.trust_pickle)
    prov = {"source": str(path), "source_sha256": sha256_of(path)}
    if isinstance(obj, nn.Module):
        cfg = dict(obj.config) if hasattr(obj, "config") and isinstance(obj.config, dict) else None
        arch = type(obj).__name__
        if cfg is not None and arch in DENOISER_CLASSES:
            sig = signature_from_config(arch, cfg, opts)
        elif opts.sample_shape:
            sig = apply_overrides(InputSignature(tuple(opts.sample_shape)), opts)
        else:
            raise BadInput(f"{path}: a pickled {arch} has no diffusers config to infer the input from; pass --sample-shape C,H,W")
        obj.eval()
        return DiffusionModel(obj, _schedule_near(path.parent, opts), sig, arch, cfg, prov)
    if isinstance(obj, dict):
        single_file_check(path, obj["state_dict"].keys() if isinstance(obj.get("state_dict"), dict) else obj.keys())
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        cfg_path = opts.config or path.parent / "config.json"
        if not cfg_path.is_file():
            raise BadInput(f"{path}: holds a state_dict but no config.json is beside it; pass --config CONFIG.json")
        return _from_config_and_weights(cfg_path, path, opts, path)
    raise BadInput(f"{path}: holds a {type(obj).__name__}, not a state_dict or module")


def _load_pt2(path: Path, opts: LoadOptions, default_call: bool = True) -> DiffusionModel:
    from edgediff.safe_load import ExportedDenoiser, load_exported_program

    ep = load_exported_program(path, opts.trust_pickle)  # runs nothing from the file unless trusted
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    shapes = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in {s.arg.name for s in user_inputs}:
            val = node.meta.get("val")
            shapes[node.name] = tuple(int(d) if isinstance(d, int) else -1 for d in val.shape) if val is not None else None
    names = [s.arg.name for s in user_inputs]
    if default_call:
        _pt2_fits_statically(path, names, shapes)
    if opts.sample_shape:
        sample = tuple(opts.sample_shape)
    elif names and shapes.get(names[0]) and len(shapes[names[0]]) == 4 and min(shapes[names[0]][1:]) > 0:
        sample = shapes[names[0]][1:]
    else:
        raise BadInput(f"{path}: cannot infer the sample shape from the archive; pass --sample-shape C,H,W")
    cond = None
    if len(names) >= 3 and shapes.get(names[2]) and len(shapes[names[2]]) == 3:
        cond = shapes[names[2]][1:]
    sig = apply_overrides(InputSignature(sample, cond), opts)
    den = ExportedDenoiser(ep)
    if default_call:
        _pt2_probe(path, den, sig, names)
    return DiffusionModel(den, _schedule_near(path.parent, opts), sig, "ExportedProgram", None,
                          {"source": str(path), "source_sha256": sha256_of(path)})


# without an adapter a .pt2 is called as forward(sample, timestep[, encoder_hidden_states=...])
_PT2_CALL = "forward(sample (B,C,H,W), timestep (B,)[, encoder_hidden_states (B,S,D)])"
_ADAPTER_HINT = "describe its inputs with --adapter FILE.toml (docs/onnx_in.md, edgediff/adapter.py)"


def _pt2_fits_statically(path: Path, names: list[str], shapes: dict[str, tuple[int, ...] | None]) -> None:
    """Exit 2 naming the first archive input that the default call cannot fill."""
    if len(names) < 2:
        raise BadInput(f"{path}: the archive takes {len(names)} input(s) {names}; without an adapter edgediff calls "
                       f"{_PT2_CALL}: no input for the timestep; {_ADAPTER_HINT}")
    rank = {n: len(shapes[n]) if shapes.get(n) is not None else None for n in names}  # type: ignore[arg-type]
    if rank[names[0]] not in (None, 4):
        raise BadInput(f"{path}: input {names[0]!r} (1st, where edgediff passes the sample, rank 4) has rank "
                       f"{rank[names[0]]}; without an adapter edgediff calls {_PT2_CALL}; {_ADAPTER_HINT}")
    if rank[names[1]] not in (None, 0, 1):
        raise BadInput(f"{path}: input {names[1]!r} (2nd, where edgediff passes the timestep, shape (B,)) has rank "
                       f"{rank[names[1]]}; without an adapter edgediff calls {_PT2_CALL}; {_ADAPTER_HINT}")
    if len(names) >= 3 and (names[2] != "encoder_hidden_states" or rank[names[2]] not in (None, 3)):
        raise BadInput(f"{path}: input {names[2]!r} (3rd) does not fit: without an adapter the 3rd input is "
                       f"encoder_hidden_states (B,S,D), passed by that name; {_ADAPTER_HINT}")
    if len(names) > 3:
        raise BadInput(f"{path}: input {names[3]!r} (4th) has no place in the default call {_PT2_CALL}; {_ADAPTER_HINT}")


def _pt2_probe(path: Path, den: nn.Module, sig: InputSignature, names: list[str]) -> None:
    """One call with example inputs: a forward that rejects them is exit 2 naming the argument."""
    import re

    batch = getattr(den, "fixed_batch", None) or 2
    ex = sig.example_inputs(batch)
    try:
        with torch.no_grad():
            DenoiserModule(den, sig)(**ex)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export's guards raise several exception types
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]
        m = re.search(r"args\[0\]\[(\d+)\]|\*args\[(\d+)\]|args\[(\d+)\]", str(e))
        idx = next((int(g) for g in m.groups() if g is not None), None) if m else None
        hit = [n for n in names if re.search(rf"\b{re.escape(n)}\b", str(e))]
        arg = names[idx] if idx is not None and idx < len(names) else hit[0] if hit else names[0]
        shape = tuple(ex[list(ex)[names.index(arg)]].shape) if names.index(arg) < len(ex) else None
        raise BadInput(f"{path}: the archive's forward rejects argument {arg!r} of the default call {_PT2_CALL}"
                       f"{f' (given shape {shape})' if shape else ''}: {msg}; {_ADAPTER_HINT}") from None


def load_model(spec: str | Path, opts: LoadOptions | None = None) -> DiffusionModel:
    """Load a denoiser from any supported source; raises BadInput with one clear line."""
    opts = opts or LoadOptions()
    if str(spec) == "demo":
        m = _load_folder(DEMO_DIR / "unet", opts)
        m.provenance["source"] = "demo"
        return m
    path = Path(spec)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_folder(path, opts)
    suffix = path.suffix.lower()
    if opts.adapter is not None and suffix in (".pt2", ".pt", ".pth"):
        # a plain torch module described by an adapter: load it as it is, then wrap its call
        from dataclasses import replace

        from edgediff.adapter import apply_adapter, load_adapter

        ad = load_adapter(opts.adapter)
        bare = replace(opts, adapter=None, sample_shape=opts.sample_shape or ad.sample_shape)
        # the adapter says how to call an archive: the default-call checks do not apply
        base = _load_pt2(path, bare, default_call=False) if suffix == ".pt2" else load_model(path, bare)
        return apply_adapter(base, ad, opts.adapter, path, opts.trust_pickle)
    if suffix == ".safetensors":
        cfg = opts.config or path.parent / "config.json"
        if not cfg.is_file():
            single_file_check(path, _safetensors_keys(path))
            raise BadInput(f"{path}: a .safetensors file needs its config.json beside it or --config CONFIG.json")
        return _from_config_and_weights(cfg, path, opts, path)
    if suffix == ".pt2":
        return _load_pt2(path, opts)
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _load_pt(path, opts)
    if suffix == ".onnx":
        if opts.adapter is None:
            raise BadInput(f"{path}: an ONNX denoiser needs --adapter FILE.toml (its input names, which is the "
                           "sample and the time, conditioning shapes, the scheduler; see docs/onnx_in.md)")
        from edgediff.adapter import load_adapter
        from edgediff.onnx_source import load_onnx_model

        return load_onnx_model(path, load_adapter(opts.adapter))
    raise BadInput(f"{path}: unknown model format {suffix or '(no extension)'!r}; expected a diffusers folder, "
                   ".safetensors, .pt2, .pt, an edgediff artifact or 'demo'")


# an adapted artifact rebuilds its module from the source file through this layer (adapter.py
# never imports the loaders: no import cycle, docs/architecture.md "Dependency rules")
register_source_loader(lambda path, shape, trust: load_model(path, LoadOptions(sample_shape=shape, trust_pickle=trust)))
