"""Writing a bundle: `edgediff export ARTIFACT --target onnx -o DIR` (DIR without a file suffix).

For a denoiser-only model or artifact (the demo's, a bare UNet) the ONNX bundle is the
denoiser in optimum's layout plus its scheduler, so that onnxruntime-based tools find the
files where they look, and edgediff's numpy runtime (edgediff.runtime) generates from it
without PyTorch:

    DIR/model_index.json                  diffusers/optimum-style index (DDPMPipeline-like)
    DIR/unet/model.onnx                   inputs sample, timestep[, encoder_hidden_states]
                                          [, class_labels] -> out_sample (transformer/ for DiT)
    DIR/unet_shallow/model.onnx           DeepCache only: the shallow call; the full graph then
                                          also outputs `cached_feature`, the shallow one takes it
    DIR/scheduler/scheduler_config.json   the sampler's diffusers scheduler config, complete
    DIR/edgediff_bundle.json              what is there (edgediff.runtime.bundle documents it)

The scheduler config is the one the PyTorch sampler builds for the artifact's sampler
(`extras["sampling"]`, else the model's own scheduler), serialised with every key diffusers
fills in, so the numpy port and diffusers run the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgediff import __version__
from edgediff.artifact import atomic_dir
from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel
from edgediff.runtime.bundle import (
    FEATURE_NAME,
    FORMAT,
    MANIFEST,
    OUTPUT_NAME,
    ROLE_FULL,
    ROLE_SHALLOW,
    VERSION,
)
from edgediff.runtime.cache_schedule import schedule_record
from edgediff.runtime.schedulers import SAMPLER_PRESETS, SCHEDULERS

BUNDLE_TARGETS = ("onnx", "tflite", "coreml", "openvino", "tensorrt")


def is_bundle_output(out: Path) -> bool:
    """`-o DIR` (no file suffix, or an existing directory) asks for a bundle."""
    out = Path(out)
    return out.is_dir() or out.suffix == ""


def scheduler_for(model: DiffusionModel, sampler: str | None, steps: int) -> tuple[dict[str, Any], str]:
    """(complete diffusers scheduler config with _class_name, sampler name) as the PyTorch side builds it."""
    from edgediff.sampling import make_scheduler

    sch = make_scheduler(model.schedule, sampler, steps, tuple(model.signature.sample_shape))
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(sch.config).items()}
    cfg["_class_name"] = type(sch).__name__
    return cfg, (sampler or type(sch).__name__)


def _sampling(model: DiffusionModel, sampler: str | None, steps: int | None) -> dict[str, Any]:
    from edgediff.passes.sampling import sampling_of

    rec = sampling_of(model)
    return {"sampler": sampler if sampler is not None else rec["sampler"],
            "steps": int(steps if steps is not None else rec["steps"]), "eta": float(rec["eta"])}


def rename_output(proto: Any, old: str, new: str) -> None:
    """Rename a graph output (and every reference to it) in place: optimum calls the UNet's output out_sample."""
    if old == new:
        return
    for node in proto.graph.node:
        for i, o in enumerate(node.output):
            if o == old:
                node.output[i] = new
        for i, o in enumerate(node.input):
            if o == old:
                node.input[i] = new
    for v in proto.graph.output:
        if v.name == old:
            v.name = new


def _onnx_entries(model: DiffusionModel, precision: str, cache: dict[str, Any] | None,
                  layout: str = "qlinear") -> dict[str, tuple[Any, dict]]:
    """{role: (ModelProto, exporter facts)} for the denoiser (and its shallow DeepCache call);
    `layout`: the int8 layout (exporters/onnx_int8.py: qlinear for onnxruntime, qdq for TensorRT)."""
    from edgediff.deepcache import FullEntry, ShallowEntry
    from edgediff.exporters.onnx import OUTPUT_NAME as ONNX_OUT
    from edgediff.exporters.onnx import build_onnx

    if cache is None:
        # UNets trace with dynamic H/W (optimum's layout); DiT-class graphs keep their positional tables' size
        proto, facts = build_onnx(model, precision, dynamic_hw="UNet" in model.arch, layout=layout)
        rename_output(proto, ONNX_OUT, OUTPUT_NAME)
        return {ROLE_FULL: (proto, facts)}
    depth = int(cache["depth"])

    def full(wrapper: Any, args: tuple) -> tuple[Any, tuple, list[str], list[str]]:
        names = list(wrapper.names)
        return FullEntry(wrapper, depth).eval(), args, names, [OUTPUT_NAME, FEATURE_NAME]

    def shallow(wrapper: Any, args: tuple) -> tuple[Any, tuple, list[str], list[str]]:
        names = list(wrapper.names)
        with torch.no_grad():
            _, feat = FullEntry(wrapper, depth)(*args)
        entry = _ShallowPositional(ShallowEntry(wrapper, depth)).eval()
        return entry, (*args, feat), [*names, FEATURE_NAME], [OUTPUT_NAME]

    return {ROLE_FULL: build_onnx(model, precision, entry=full, layout=layout),
            ROLE_SHALLOW: build_onnx(model, precision, entry=shallow, layout=layout)}


class _ShallowPositional(torch.nn.Module):
    """The shallow call with the cached feature as the last positional input (what tracing passes)."""

    def __init__(self, entry: torch.nn.Module) -> None:
        super().__init__()
        self.entry = entry

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.entry(*args[:-1], feature=args[-1])


def export_bundle(model: DiffusionModel, out: Path, target: str = "onnx", precision: str = "fp32",
                  force: bool = False, sampler: str | None = None, steps: int | None = None,
                  progress: Any = None, chunk_unet: bool = False) -> dict[str, Any]:
    """Write the bundle directory atomically; returns the export report (JSON-able).

    `chunk_unet`: Core ML only, the UNet as Apple's UnetChunk1/UnetChunk2 (exporters/bundle_coreml.py)."""
    from edgediff.deepcache import cache_config

    out = Path(out)
    if chunk_unet and target != "coreml":
        raise BadInput(f"{out}: --chunk-unet splits a Core ML bundle's UNet (Apple's layout); not for --target {target}")
    if target not in BUNDLE_TARGETS:
        raise Unavailable(f"{out}: bundles are written for {', '.join(BUNDLE_TARGETS)} so far, not {target!r} "
                          f"(export a single file instead: -o model{'.tflite' if target == 'tflite' else '.<suffix>'})")
    if not isinstance(model, DiffusionModel):
        raise BadInput(f"{out}: a bundle is written from a model or an artifact")
    from edgediff.passes import sampling_correction

    if sampling_correction(model) is not None:
        raise Unavailable(f"{out}: bundles do not carry PTQD sampling corrections yet; export a single file "
                          "(-o model.onnx) and drive it with edgediff's PyTorch sampler")
    from edgediff.pipelines import pipeline_of

    pipe = pipeline_of(model)
    if target == "tensorrt" and pipe is not None:
        raise Unavailable(f"{out}: TensorRT bundles hold the denoiser (full and DeepCache shallow engines); a "
                          "text-to-image pipeline's encoders and VAE are written by --target onnx")
    if target == "coreml" and (pipe is None or cache_config(model) is not None):
        # Apple's Resources layout is a text-to-image pipeline's; its Swift package has no DeepCache schedule
        raise Unavailable(f"{out}: Core ML bundles are written for text-to-image pipelines in Apple's "
                          "ml-stable-diffusion layout" + (", without a DeepCache schedule" if pipe is not None else "")
                          + "; export the denoiser alone with -o model.mlpackage")
    if pipe is not None and target == "tflite":  # refuse encoders it does not write before converting the denoiser
        from edgediff.exporters.bundle_tflite import text_encoders

        text_encoders(pipe, target)
    samp = _sampling(model, sampler, steps)
    sched_cfg, sampler_name = scheduler_for(model, samp["sampler"], samp["steps"])
    sampler_note = None
    if sched_cfg["_class_name"] not in SCHEDULERS and samp["sampler"] is None:
        # the model's own scheduler has no numpy port (e.g. SD-1.x's PNDM): the bundle runs DPM-Solver++ 2M,
        # which diffusers users swap in for the same schedule; verify compares under the same sampler
        sampler_note = f"{sched_cfg['_class_name']} has no numpy port; the bundle samples with dpmpp-2m"
        samp["sampler"] = "dpmpp-2m"
        sched_cfg, sampler_name = scheduler_for(model, samp["sampler"], samp["steps"])
    base_cfg = model.schedule.to_config()
    others = {}
    for name in SAMPLER_PRESETS:  # so that `generate BUNDLE --sampler X` runs what PyTorch runs for X
        try:
            others[name] = scheduler_for(model, name, samp["steps"])[0]
        except BadInput:
            continue  # not a sampler for this model's family (e.g. flow-euler on a DDPM model)
    cache = cache_config(model)
    # OpenVINO: the ONNX bundle's graphs (fp32 or Q/DQ int8), each converted to an IR once written
    # (exporters/openvino.py); fp16 IRs are fp32 graphs stored with half weights
    # TensorRT: the same, Q/DQ layout (explicit quantization); --fp16 is TensorRT's job at build time
    graph_precision = ("int8" if precision == "int8" else "fp32") if target in ("openvino", "tensorrt") else precision
    task = progress.add_task(f"bundle {target} {precision}", total=None) if progress is not None else None
    try:
        if target == "tflite":  # full + shallow .tflite files (exporters/tflite_deepcache.py)
            from edgediff.exporters.tflite_deepcache import tflite_entries

            entries: dict[str, Any] = tflite_entries(model, precision, cache)
        elif target == "coreml":  # every package, the UNet included (exporters/bundle_coreml.py)
            from edgediff.exporters.bundle_coreml import build_packages

            entries = build_packages(pipe, model, precision)
        else:
            entries = _onnx_entries(model, graph_precision, cache, "qdq" if target == "tensorrt" else "qlinear")
    finally:
        if task is not None:
            progress.remove_task(task)
    comp_dir = "transformer" if "Transformer" in model.arch or "DiT" in model.arch else "unet"
    if pipe is not None:
        comp_dir = pipe.denoiser_name
    extra_graphs = _pipeline_graphs(pipe, model, target, graph_precision, progress) \
        if pipe is not None and target != "coreml" else {}
    with atomic_dir(out, force=force) as tmp:
        import onnx

        from edgediff.exporters.bundle_onnx import graph_io

        components: dict[str, Any] = {}
        if target == "tflite":
            from edgediff.exporters.tflite_deepcache import write_components

            components = write_components(entries, tmp, comp_dir, precision, model)
            entries = {}
            if extra_graphs:  # the text encoder / VAE decoder .tflite files
                from edgediff.exporters.bundle_tflite import write_components as write_parts

                components.update(write_parts(extra_graphs, tmp))
                extra_graphs = {}
        elif target == "coreml":
            from edgediff.exporters.bundle_coreml import write_packages

            components = write_packages(entries, tmp, chunk_unet=chunk_unet)
            entries = {}
            (tmp / comp_dir).mkdir()  # the denoiser's config.json, as every bundle has it
        for role, (proto, facts) in entries.items():
            name = comp_dir if role == ROLE_FULL else f"{comp_dir}_shallow"
            (tmp / name).mkdir()
            onnx.checker.check_model(proto)
            onnx.save_model(proto, str(tmp / name / "model.onnx"))
            inputs, outputs = graph_io(proto)
            components[name] = {"path": f"{name}/model.onnx", "role": role, "precision": precision,
                                "inputs": inputs, "outputs": outputs,
                                "size_bytes": (tmp / name / "model.onnx").stat().st_size,
                                "shapes": _run_shapes(inputs, model),
                                "nodes": facts.get("nodes"), "qdq_pairs": facts.get("qdq_pairs")}
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2, default=str) + "\n")
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
                 comp_dir: ["diffusers", model.arch], "scheduler": ["diffusers", sched_cfg["_class_name"]]}
        pipeline_rec = None
        if pipe is not None:
            from edgediff.pipelines.bundle import write_pipeline_components

            pipeline_rec = write_pipeline_components(pipe, model, tmp, extra_graphs, components, index, comp_dir)
            if target not in ("onnx", "openvino"):  # optimum-intel reads optimum's index and folders
                _non_onnx_record(pipeline_rec, index, components, target)
            if target == "coreml":
                from edgediff.exporters.bundle_coreml import copy_vocab

                copy_vocab(tmp / "tokenizer", tmp)
        if target == "openvino":
            from edgediff.exporters.openvino import convert_bundle_components

            convert_bundle_components(tmp, components, precision)
        trt_rec = None
        if target == "tensorrt":
            from edgediff.exporters.tensorrt import bundle_engines

            trt_rec = bundle_engines(tmp, components, precision, model.signature)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        cache_rec = None
        if cache is not None:
            cache_rec = {"depth": int(cache["depth"]), "interval": int(cache["interval"]), "feature": FEATURE_NAME,
                         "feature_shape": cache.get("feature_shape"),
                         **schedule_record(cache, int(samp["steps"]))}  # schedule, steps, full_steps
        manifest = {
            "format": FORMAT, "version": VERSION, "target": target, "kind": "pipeline" if pipe else "denoiser",
            "precision": precision, "pipeline": pipeline_rec, "sampler_note": sampler_note,
            "components": components, "signature": model.signature.to_dict(), "arch": model.arch,
            "scheduler": {"path": "scheduler/scheduler_config.json", "class": sched_cfg["_class_name"]},
            "base_schedule": base_cfg, "samplers": others, "sampler": sampler_name, "steps": samp["steps"], "eta": samp["eta"],
            "cache": cache_rec, **({"tensorrt": trt_rec} if trt_rec else {}),
            "source_hash": model.provenance.get("source_sha256"), "source": str(model.provenance.get("source", "")),
            "artifact": model.provenance.get("artifact"), "edgediff_version": __version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = {"target": target, "precision": precision, "path": str(out), "size_bytes": size, "bundle": True,
              "components": {k: {"path": v["path"], "role": v["role"], "size_bytes": v["size_bytes"]}
                             for k, v in components.items()},
              "sampler": sampler_name, "steps": samp["steps"], "cache": cache_rec, "kind": manifest["kind"],
              **({"sampler_note": sampler_note} if sampler_note else {})}
    if trt_rec is not None and not trt_rec["engines_built"]:
        # the bundle is complete but for its engines: exit 3, with the commands that build them on the device
        scripts = [str(out / str(c["trtexec_script"])) for c in components.values() if c.get("trtexec_script")]
        report.update({"tensorrt": trt_rec, "exit_code": 3,
                       "reason": f"wrote the TensorRT-ready ONNX graphs; the engines were not built: {trt_rec['reason']}. "
                                 "On the device run: " + " && ".join(f"sh {s}" for s in scripts)})
    return report


def _pipeline_graphs(pipe: Any, model: DiffusionModel, target: str, precision: str, progress: Any) -> dict[str, Any]:
    """The text encoder / VAE in the target's format: ONNX protos, or .tflite bytes (exporters/bundle_tflite.py)."""
    from edgediff.pipelines.bundle import component_graphs

    task = progress.add_task("bundle: text encoder and VAE", total=None) if progress is not None else None
    try:
        if target == "tflite":
            from edgediff.exporters.bundle_tflite import component_files

            return component_files(pipe, model, precision)
        return component_graphs(pipe, model, precision)
    finally:
        if task is not None:
            progress.remove_task(task)


def _non_onnx_record(rec: dict[str, Any], index: dict[str, Any], components: dict[str, Any], target: str) -> None:
    """The pipeline record and index for components written in another format than ONNX (already in
    `components`): which role each folder holds, and the runtime's name in the index for the split VAE."""
    for role in ("text_encoder", "vae_decoder", "vae_encoder"):
        name = next((n for n, c in components.items() if c.get("role") == role), None)
        rec[role] = name
        if role.startswith("vae"):
            index.pop(role, None)
            if name:
                index[role] = ["edgediff", f"{target}:{role}"]
    if rec.get("encoding"):  # SDXL / SD3: every encoder, in the pipeline's order (the runtime combines them so)
        rec["text_encoders"] = [n for n, c in components.items() if str(c.get("role")).startswith("text_encoder")]
        rec["text_encoder_kinds"] = {n: components[n].get("text_kind", "clip") for n in rec["text_encoders"]}


def _diffusers_version() -> str:
    try:
        import diffusers

        return str(diffusers.__version__)
    except ImportError:
        return ""


def verify_bundle(reference: DiffusionModel, bundle_dir: Path, tolerances: dict[str, dict[str, float]],
                  steps: int | None = None, samples: int = 16, sampler: str | None = None, seed: int = 0,
                  progress: Any = None, return_samples: bool = False, prompts: list[str] | None = None) -> dict[str, Any]:
    """verify for a bundle: the numpy runtime's sampler loop (with the bundle's DeepCache schedule)
    against the reference's PyTorch sampler with the same schedule, seeds and conditioning; plus
    single calls of each graph (full, shallow) on fixed inputs. Keys and exit codes as `verify`,
    `tolerances` its table (per precision: psnr_db, max_abs_err)."""
    import math

    import numpy as np

    from edgediff.deepcache import FullEntry, ShallowEntry
    from edgediff.metrics import psnr
    from edgediff.passes import sampling_correction
    from edgediff.pipelines.verify import reference_model, verify_pipeline_bundle
    from edgediff.runtime.bundle import read_bundle
    from edgediff.runtime.generate import open_entry, run_bundle
    from edgediff.runtime.pipeline import is_text_pipeline
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    b = read_bundle(bundle_dir)
    if b.target == "coreml":  # no Core ML prediction off macOS: say so, with what can be checked here
        from edgediff.exporters.bundle_coreml import check_bundle

        structural = check_bundle(Path(bundle_dir))
        return {"target": "coreml bundle", "kind": b.manifest.get("kind"), "exported": str(bundle_dir),
                "precision": b.manifest.get("precision"), "verified": False, "exit_code": 3,
                "reason": "Core ML predicts on macOS only (Apple's Swift package or coremltools on a Mac); "
                          "the packages were checked structurally" + ("" if structural["ok"] else
                                                                     f" and have problems: {structural['problems']}"),
                "structural": structural}
    if is_text_pipeline(b):  # text encoder / VAE: the whole pipeline with prompts and guidance
        return verify_pipeline_bundle(reference, bundle_dir, tolerances, steps=steps, samples=samples, sampler=sampler,
                                      seed=seed, progress=progress, prompts=prompts)
    precision = str(b.manifest.get("precision", "fp32"))
    tol = tolerances.get(precision, tolerances["int8"])
    use_sampler = sampler or str(b.manifest["sampler"])
    n_steps = int(steps or b.manifest["steps"])
    result: dict[str, Any] = {"target": f"{b.target} bundle", "exported": str(bundle_dir), "samples": samples,
                              "steps": n_steps, "sampler": use_sampler, "seed": seed, "precision": precision,
                              "tolerance": dict(tol), "cache": b.cache}
    if sampling_correction(reference) is not None:
        result.update({"verified": False, "exit_code": 3,
                       "reason": "the bundle runtime does not apply PTQD corrections; verify the single-file export"})
        return result
    try:  # the bundle's own runtime (onnxruntime or LiteRT, by component file)
        full = open_entry(b, ROLE_FULL)
        shallow = open_entry(b, ROLE_SHALLOW) if b.cache else None
    except Unavailable as e:
        result.update({"verified": False, "exit_code": 3, "reason": str(e)})
        return result
    ref_model, what = reference_model(reference, precision)
    result["reference"] = what
    # single calls on fixed inputs: the full graph, and the shallow graph fed the reference's own feature
    mod = ref_model.module().eval()
    err = 0.0
    for t in (999, 500, 50):
        t = min(t, reference.schedule.num_train_timesteps - 1)
        inp = reference.signature.example_inputs(batch=2, seed=seed + t)
        inp["timestep"] = torch.full((2,), float(t))
        feeds = {k: v.numpy() for k, v in inp.items()}
        with torch.inference_mode():
            if b.cache:
                depth = int(b.cache["depth"])
                want, feat = FullEntry(mod, depth)(**inp)
                got, got_feat = full.run([OUTPUT_NAME, FEATURE_NAME], feeds)
                want_s = ShallowEntry(mod, depth)(**inp, feature=feat)
                assert shallow is not None
                got_s = shallow.run([OUTPUT_NAME], {**feeds, FEATURE_NAME: feat.numpy()})[0]
                err = max(err, float(np.abs(got_s - want_s.numpy()).max()))
            else:
                want = mod(**inp)
                got = full.run([OUTPUT_NAME], feeds)[0]
        err = max(err, float(np.abs(got - want.numpy()).max()))
    result["max_abs_err"] = err
    cond = reference.signature.conditioning(samples, seed)
    with torch.inference_mode():
        stats: dict[str, Any] = {}
        want_x = sample(TorchDenoiser(ref_model), reference.schedule, tuple(reference.signature.sample_shape), samples,
                        seed, SamplerConfig(use_sampler, n_steps), cond=cond, progress=progress,
                        description="verify bundle: reference", stats=stats)
    got_x, run_stats = run_bundle(bundle_dir, samples=samples, seed=seed, steps=n_steps, sampler=use_sampler)
    assert isinstance(want_x, torch.Tensor)
    p = psnr(torch.from_numpy(got_x), want_x)
    within = p >= tol["psnr_db"] and err <= tol["max_abs_err"]
    result.update({"psnr_db": round(p, 3) if math.isfinite(p) else p, "verified": True,
                   "runtime": _runtime_version(full.runtime),
                   "denoiser_calls": run_stats["denoiser_calls"],
                   "denoiser_calls_full": run_stats["denoiser_calls_full"],
                   "denoiser_calls_shallow": run_stats["denoiser_calls_shallow"],
                   "reference_calls_shallow": stats.get("denoiser_calls_shallow", 0),
                   "within_tolerance": within, "exit_code": 0 if within else 4})
    if not within:
        result["reason"] = (f"out of tolerance for {precision}: psnr {p:.2f} dB (min {tol['psnr_db']}), "
                            f"max_abs_err {err:.3g} (max {tol['max_abs_err']})")
    if b.target == "tensorrt":
        _tensorrt_verdict(b, result)
    if return_samples:
        result["final_samples"] = torch.from_numpy(got_x)
    return result


def _tensorrt_verdict(b: Any, result: dict[str, Any]) -> None:
    """A TensorRT bundle: its graph pair ran in onnxruntime (the loop above); the engines did not run,
    so the verdict is exit 3 with that run and the structural check of both graphs, unless the
    graphs themselves are out of tolerance (exit 4)."""
    from edgediff.exporters.tensorrt import check_bundle

    result["structural"] = check_bundle(b.path)
    result["onnxruntime"] = {k: result.get(k) for k in ("psnr_db", "max_abs_err", "within_tolerance", "runtime")}
    if result["exit_code"] != 0:
        return
    built = bool((b.manifest.get("tensorrt") or {}).get("engines_built"))
    result.update({"verified": False, "exit_code": 3,
                   "reason": "the TensorRT engines were not run: " + (
                       "the bundle's sampler loop runs the TensorRT-ready ONNX graphs in onnxruntime"
                       if built else "they were not built here (no TensorRT and GPU at export)")
                   + f"; those graphs (full and shallow) ran in onnxruntime with the schedule at "
                     f"{result['psnr_db']} dB vs the PyTorch sampler" + (
                       "" if result["structural"]["ok"] else f"; TensorRT problems: {result['structural']['problems'][:5]}")})


def _runtime_version(runtime: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}.get(runtime, runtime)
    try:
        return f"{runtime} {version(dist)}"
    except PackageNotFoundError:
        return runtime


def describe_bundle(path: Path) -> dict[str, Any]:
    """`edgediff info BUNDLE`: the manifest's components with bytes, precision, I/O and MACs per call from the graph."""
    from edgediff.runtime.bundle import read_bundle

    b = read_bundle(path)
    comps: dict[str, Any] = {}
    for name, c in b.manifest["components"].items():
        keys = ("role", "precision", "path", "size_bytes", "shapes", "inputs", "outputs")
        row = {k: c.get(k) for k in keys if c.get(k) is not None}
        f = b.path / str(c["path"])
        if f.suffix == ".onnx" and f.is_file():
            row["macs"] = _graph_macs(f, c.get("shapes"))
        elif f.suffix == ".tflite" and f.is_file():
            from edgediff.exporters.tflite_runtime import integer_macs

            row["macs"] = integer_macs(f)["macs"]  # the file's shapes are fixed (batch 1)
        comps[name] = row
    size = sum(p.stat().st_size for p in b.path.rglob("*") if p.is_file())
    den = b.component(ROLE_FULL)
    return {"kind": "bundle", "bundle_kind": b.manifest.get("kind"), "target": b.target,
            "precision": b.manifest.get("precision"), "size_bytes": size,
            "macs": comps[den[0]].get("macs") if den else None, "components": comps,
            "pipeline": b.manifest.get("pipeline"), "sampler": b.manifest.get("sampler"), "steps": b.manifest.get("steps"),
            "signature": b.signature, "source_hash": b.manifest.get("source_hash")}


def _run_shapes(inputs: dict[str, Any], model: DiffusionModel) -> dict[str, list[int]]:
    """Each input's shape at batch 1 as the model runs (the graph's H/W may be dynamic)."""
    out = {k: [1 if isinstance(d, str) else int(d) for d in v["shape"]] for k, v in inputs.items()}
    if "sample" in out:
        out["sample"] = [1, *(int(d) for d in model.signature.sample_shape)]
    return out


def _graph_macs(f: Path, shapes: dict[str, list[int]] | None) -> int:
    """MACs of one call of graph `f`, its dynamic input dims set to `shapes` first (counting needs concrete H/W)."""
    from edgediff.profiling.graph import onnx_ops

    if not shapes:
        return int(sum(o.macs for o in onnx_ops(f)))
    import tempfile

    import onnx

    proto = onnx.load(str(f))
    for vi in proto.graph.input:
        for d, v in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name) or []):
            if d.dim_param:
                d.dim_value = int(v)
    with tempfile.TemporaryDirectory(prefix="edgediff-macs-") as td:
        onnx.save_model(proto, str(Path(td) / f.name))
        return int(sum(o.macs for o in onnx_ops(Path(td) / f.name)))
