"""TensorRT backend: a TensorRT-ready ONNX, the engine where TensorRT and a GPU exist, else the trtexec command.

What `export` writes (out = NAME.engine/.plan, or NAME.onnx):
  NAME.onnx            the ONNX TensorRT parses (opset 17, float32 weights for fp32/fp16, int8
                       Q/DQ from the artifact's own scales for int8: explicit quantization);
  NAME.trtexec.sh      the exact trtexec command that builds the engine (always written, so a
                       build on the device can be reproduced), with the compatibility report;
  NAME.engine          the serialized engine, only where the `tensorrt` package imports and a
                       CUDA GPU is present (built with the TensorRT Python API).
Where TensorRT or the GPU is missing it writes the first two and raises Unavailable (exit 3)
saying what is missing and which command to run on the device.

The compatibility check (`trt_compat`) runs before anything is built and lists what TensorRT
would reject: operators its ONNX parser does not implement (e.g. onnxruntime's QLinearConv /
MatMulInteger from QOperator-format quantization), Q/DQ with a non-zero zero point or uint8
type (TensorRT's explicit quantization is symmetric signed int8 only), and per-channel
quantization of activations.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from edgediff.exporters.base import PRECISIONS, Backend, ExportReport, input_names
from edgediff.exporters.onnx import build_onnx, onnx_info, structural_check, write_onnx
from edgediff.exporters.ops import TENSORRT_PARSER_OPS

from edgediff.artifact import atomic_file
from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

DEFAULT_MAX_BATCH = 16
DEFAULT_OPT_BATCH = 1


def trt_compat(model: Any) -> list[dict[str, str]]:
    """What TensorRT would reject in an ONNX model: [{node, op, problem}], empty if nothing."""
    from onnx import numpy_helper

    g = model.graph
    consts = {i.name: i for i in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const(name: str) -> np.ndarray | None:
        if name in consts:
            return numpy_helper.to_array(consts[name])
        if name in const_nodes:
            return numpy_helper.to_array(const_nodes[name].attribute[0].t)
        return None

    issues: list[dict[str, str]] = []
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_PARSER_OPS:
            issues.append({"node": n.name, "op": n.op_type,
                           "problem": f"operator {n.domain + '::' if n.domain else ''}{n.op_type} is not supported "
                                      "by TensorRT's ONNX parser"})
            continue
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and zp.dtype == np.uint8:
            issues.append({"node": n.name, "op": n.op_type,
                           "problem": "uint8 quantization: TensorRT's explicit quantization takes signed int8 only"})
        if zp is not None and np.any(zp != 0):
            issues.append({"node": n.name, "op": n.op_type,
                           "problem": f"asymmetric zero point {int(np.ravel(zp)[0])}: TensorRT requires zero points of 0"})
        scale = const(n.input[1])
        data_is_const = const(n.input[0]) is not None
        if scale is not None and scale.size > 1 and not data_is_const and n.op_type == "QuantizeLinear":
            issues.append({"node": n.name, "op": n.op_type,
                           "problem": "per-channel quantization of an activation: TensorRT quantizes activations per tensor"})
    return issues


def trtexec_command(onnx_path: Path, engine_path: Path, precision: str, sig: Any,
                    max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int = DEFAULT_OPT_BATCH,
                    extra_inputs: dict[str, list[int]] | None = None) -> list[str]:
    """The trtexec call that builds the engine: precision flags and a batch optimisation profile.

    `extra_inputs`: inputs beyond the signature's, {name: shape without the batch axis} (DeepCache's
    shallow call reads `cached_feature`)."""
    def shapes(b: int) -> str:
        dims = {"sample": [b, *sig.sample_shape], "timestep": [b]}
        if sig.cond_shape:
            dims["encoder_hidden_states"] = [b, *sig.cond_shape]
        if sig.num_classes:
            dims["class_labels"] = [b]
        names = [*input_names(sig), *(extra_inputs or {})]
        dims.update({k: [b, *v] for k, v in (extra_inputs or {}).items()})
        return ",".join(f"{k}:{'x'.join(str(d) for d in v)}" for k, v in dims.items() if k in names)

    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", f"--minShapes={shapes(1)}",
           f"--optShapes={shapes(opt_batch)}", f"--maxShapes={shapes(max_batch)}"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        # Q/DQ layers run in int8 (explicit quantization); the rest may use fp16 instead of fp32
        cmd += ["--int8", "--fp16"]
    return cmd


def tag_for_tensorrt(proto: Any, precision: str) -> None:
    """Mark an ONNX graph as TensorRT-ready (verify and info read it back)."""
    for key, value in (("edgediff.made_for", "tensorrt"), ("edgediff.trt_precision", precision)):
        meta = proto.metadata_props.add()
        meta.key, meta.value = key, value


def write_trtexec_script(script: Path, cmd: list[str], precision: str, issues: list[dict[str, str]],
                         opt_batch: int, max_batch: int, force: bool, relative: bool = False) -> None:
    """NAME.trtexec.sh: the build command with the compatibility report as comments.

    `relative`: the command's paths are relative to the script's folder (a bundle, which may be moved)."""
    text = ["#!/bin/sh", "# Builds the TensorRT engine from the TensorRT-ready ONNX written by edgediff.",
            f"# precision: {precision} (flags from the artifact); batch profile 1/{opt_batch}/{max_batch}"]
    text += [f"# compatibility: {len(issues)} problem(s) TensorRT would reject"]
    text += [f"#   {i['node']} ({i['op']}): {i['problem']}" for i in issues[:50]]
    if relative:
        text.append('cd "$(dirname "$0")" || exit 1')
    text.append(" ".join(shlex.quote(c) for c in cmd))
    with atomic_file(script, force=force) as tmp:
        tmp.write_text("\n".join(text) + "\n")
        tmp.chmod(0o755)


def _tensorrt() -> tuple[Any, str]:
    """(the tensorrt module, "") or (None, what is missing)."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the TensorRT Python package (pip install tensorrt)")
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        missing.append("an NVIDIA GPU with CUDA")
    return (trt if not missing else None), " and ".join(missing)


def _paths(out: Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in (".engine", ".plan"):
        engine, onnx_path = out, out.with_suffix(".onnx")
    elif suffix == ".onnx":
        onnx_path, engine = out, out.with_suffix(".engine")
    else:
        raise BadInput(f"{out}: a TensorRT export must end in .engine, .plan or .onnx")
    return onnx_path, engine, out.with_name(out.stem + ".trtexec.sh")


def build_engine(onnx_path: Path, engine_path: Path, precision: str, force: bool,
                 max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int = DEFAULT_OPT_BATCH) -> dict[str, Any]:
    """Build and save the engine with the TensorRT Python API (needs tensorrt and a GPU)."""
    trt, why = _tensorrt()
    if trt is None:
        raise Unavailable(f"building a TensorRT engine needs {why}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implicit in 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInput(f"{onnx_path}: TensorRT cannot parse it ({errors[:400]})")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        rest = tuple(inp.shape)[1:]
        profile.set_shape(inp.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BadInput(f"{onnx_path}: TensorRT failed to build an engine (see its log above)")
    with atomic_file(engine_path, force=force) as tmp:
        tmp.write_bytes(bytes(blob))
    return {"engine": str(engine_path), "engine_bytes": engine_path.stat().st_size, "tensorrt": trt.__version__}


ENGINE_ROLES = ("denoiser", "denoiser_shallow")  # edgediff.runtime.bundle ROLE_FULL, ROLE_SHALLOW


def bundle_engines(folder: Path, components: dict[str, dict[str, Any]], precision: str, sig: Any,
                   max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int = DEFAULT_OPT_BATCH) -> dict[str, Any]:
    """The TensorRT side of a bundle being written in `folder` (its ONNX graphs already there, Q/DQ
    layout for int8): each denoiser graph (the full call and DeepCache's shallow call) is tagged
    TensorRT-ready, checked with `trt_compat` and given its trtexec script (model.trtexec.sh beside
    it, paths relative to it); where TensorRT and a GPU exist its engine (model.engine) is built.
    Updates `components`; returns the manifest's "tensorrt" record."""
    import onnx

    trt, why = _tensorrt()
    compatible = True
    for comp in components.values():
        if comp.get("role") not in ENGINE_ROLES:
            continue
        src = folder / str(comp["path"])
        proto = onnx.load(str(src), load_external_data=False)
        tag_for_tensorrt(proto, precision)
        onnx.save_model(proto, str(src))
        issues = trt_compat(proto)
        compatible = compatible and not issues
        sig_inputs = set(input_names(sig))
        extra = {k: [int(d) for d in v["shape"][1:]] for k, v in (comp.get("inputs") or {}).items()
                 if k not in sig_inputs}
        engine = src.with_suffix(".engine")
        script = src.with_name(src.stem + ".trtexec.sh")
        cmd = trtexec_command(Path(src.name), Path(engine.name), precision, sig, max_batch, opt_batch, extra)
        write_trtexec_script(script, cmd, precision, issues, opt_batch, max_batch, force=True, relative=True)
        comp.update({"trt_compat": issues, "trtexec_script": str(script.relative_to(folder)), "engine": None})
        if trt is not None:
            if issues:
                raise BadInput(f"{src.relative_to(folder)}: TensorRT would reject it: " + "; ".join(
                    f"{i['node']}: {i['problem']}" for i in issues[:5]))
            comp["engine_report"] = build_engine(src, engine, precision, True, max_batch, opt_batch)
            comp["engine"] = str(engine.relative_to(folder))
    built = trt is not None
    return {"engines_built": built, "compatible": compatible, "batch_profile": [1, opt_batch, max_batch],
            "precision": precision, "reason": None if built else f"this machine lacks {why}"}


def check_bundle(folder: Path) -> dict[str, Any]:
    """Structural check of a TensorRT bundle's denoiser graphs without TensorRT: each graph's
    `trt_compat` report and whether its engine and trtexec script are there."""
    import onnx

    from edgediff.runtime.bundle import read_bundle

    b = read_bundle(folder)
    comps: dict[str, Any] = {}
    problems: list[str] = []
    for name, comp in b.manifest["components"].items():
        if comp.get("role") not in ENGINE_ROLES:
            continue
        src = b.path / str(comp["path"])
        if not src.is_file():
            problems.append(f"{name}: {comp['path']} is missing")
            continue
        proto = onnx.load(str(src), load_external_data=False)
        issues = trt_compat(proto)
        tagged = {p.key: p.value for p in proto.metadata_props}.get("edgediff.made_for") == "tensorrt"
        problems += [f"{name}: {i['node']}: {i['problem']}" for i in issues]
        if not tagged:
            problems.append(f"{name}: {comp['path']} is not marked TensorRT-ready")
        script = comp.get("trtexec_script")
        engine = comp.get("engine")
        comps[name] = {"role": comp["role"], "compat_issues": issues, "tensorrt_ready": tagged,
                       "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
                       "trtexec_script": bool(script) and (b.path / str(script)).is_file(),
                       "engine_built": bool(engine) and (b.path / str(engine)).is_file()}
    if not any(c["role"] == ENGINE_ROLES[0] for c in comps.values()):
        problems.append("no denoiser graph")
    if b.cache and not any(c["role"] == ENGINE_ROLES[1] for c in comps.values()):
        problems.append("a DeepCache schedule without the shallow graph")
    return {"ok": not problems, "problems": problems, "components": comps}


class TrtDenoiser:
    """A serialized engine in the TensorRT runtime, called on CUDA tensors (float32 I/O)."""

    def __init__(self, path: Path) -> None:
        trt, why = _tensorrt()
        if trt is None:
            raise Unavailable(f"running {path} needs {why}")
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise BadInput(f"{path}: not an engine this TensorRT ({trt.__version__}) can load")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
        torch = self.torch
        feeds = {"sample": x.float(), "timestep": t.float()}
        if "encoder_hidden_states" in self.names:
            feeds["encoder_hidden_states"] = cond.float()
        if "class_labels" in self.names:
            feeds["class_labels"] = cond.long()
        feeds = {k: v.contiguous().cuda() for k, v in feeds.items()}
        for k, v in feeds.items():
            self.context.set_input_shape(k, tuple(v.shape))
            self.context.set_tensor_address(k, v.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("out")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("out", out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu()


class TensorRTBackend(Backend):
    target = "tensorrt"
    precisions = PRECISIONS
    suffixes = (".engine", ".plan")
    options = frozenset({"max_batch", "opt_batch"})

    def available(self) -> tuple[bool, str]:
        trt, why = _tensorrt()
        return (trt is not None), (f"needs {why}" if trt is None else f"TensorRT {trt.__version__}")

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        trt, why = _tensorrt()
        if trt is None:
            return False, f"running a TensorRT engine needs {why}"
        if path is not None and not Path(path).is_file():
            script = Path(path).with_name(Path(path).stem + ".trtexec.sh")
            return False, f"{path} is not built yet (run sh {script})"
        return True, f"TensorRT {trt.__version__}"

    def check_output(self, out: Path) -> None:
        _paths(out)  # .engine/.plan, or the .onnx the engine is built from

    def needs_toolchain_to_export(self) -> bool:
        return False  # without TensorRT it writes the ONNX and the trtexec script, then says so (exit 3)

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        max_batch = int(options.get("max_batch", DEFAULT_MAX_BATCH))
        opt_batch = int(options.get("opt_batch", DEFAULT_OPT_BATCH))
        if not 1 <= opt_batch <= max_batch:
            raise BadInput(f"TensorRT batch profile: need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
        onnx_path, engine, script = _paths(out)
        for p in {onnx_path, Path(out), script}:
            if p.exists() and not force:
                raise BadInput(f"{p}: output already exists (pass --force to replace it)")
        # fp16 is TensorRT's job (--fp16 picks per-layer kernels), so the ONNX stays float32
        proto, report = build_onnx(model, "int8" if precision == "int8" else "fp32", layout="qdq")
        tag_for_tensorrt(proto, precision)
        issues = trt_compat(proto)
        report.update(write_onnx(proto, onnx_path, force=force))
        cmd = trtexec_command(onnx_path, engine, precision, model.signature, max_batch, opt_batch)
        write_trtexec_script(script, cmd, precision, issues, opt_batch, max_batch, force)
        report.update({"onnx": str(onnx_path), "trtexec": " ".join(cmd), "trtexec_script": str(script),
                       "compat_issues": issues, "compatible": not issues, "onnx_bytes": report["size_bytes"]})
        trt, why = _tensorrt()
        if trt is None:
            problems = f"; {len(issues)} TensorRT compatibility problem(s) listed in {script}" if issues else ""
            raise Unavailable(f"wrote {onnx_path} and {script}; the engine was not built: this machine lacks {why}. "
                              f"On the device run: sh {script}{problems}")
        if issues:
            raise BadInput(f"{onnx_path}: TensorRT would reject it: " + "; ".join(
                f"{i['node']}: {i['problem']}" for i in issues[:5]))
        report.update(build_engine(onnx_path, engine, precision, force, max_batch, opt_batch))
        size = engine.stat().st_size
        report.pop("size_bytes", None)
        report.pop("precision", None)
        report.pop("target", None)
        return ExportReport(self.target, precision, str(engine), size, extra=report)

    def load_denoiser(self, path: Path) -> TrtDenoiser:
        return TrtDenoiser(Path(path))

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        """Structural check of the ONNX the engine is (to be) built from, plus TensorRT compatibility."""
        import onnx

        onnx_path = Path(path) if Path(path).suffix == ".onnx" else Path(path).with_suffix(".onnx")
        if not onnx_path.is_file() and not Path(path).is_file():
            raise BadInput(f"{path}: no such engine, and no {onnx_path.name} beside it")
        if not onnx_path.is_file():
            return {"ok": False, "problems": [f"{onnx_path}: the ONNX beside the engine is missing; cannot check"]}
        res = structural_check(onnx_path, reference)
        issues = trt_compat(onnx.load(str(onnx_path), load_external_data=False))
        res["compat_issues"] = issues
        res["ok"] = res["ok"] and not issues
        return res

    def info(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        data: dict[str, Any] = {"format": "tensorrt engine"}
        onnx_path = path.with_suffix(".onnx")
        if not path.is_file() and not onnx_path.is_file():
            raise BadInput(f"{path}: no such engine, and no {onnx_path.name} beside it")
        if onnx_path.is_file():
            oi = onnx_info(onnx_path)
            data.update({k: oi[k] for k in ("params", "inputs", "outputs", "opset")})
            meta = {}
            import onnx

            for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props:
                meta[p.key] = p.value
            data["precision"] = meta.get("edgediff.trt_precision")
            data["onnx"] = str(onnx_path)
        script = path.with_name(path.stem + ".trtexec.sh")
        if script.is_file():
            data["trtexec_script"] = str(script)
        data["engine_built"] = path.is_file() and path.suffix in (".engine", ".plan")
        return json.loads(json.dumps(data, default=str))


BACKEND = TensorRTBackend()
