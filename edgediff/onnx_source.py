"""Denoisers that arrive as ONNX graphs (a trained UNet shipped only as `model.onnx`).

With an adapter (edgediff/adapter.py) the graph is first *normalized* to the exported-file
contract every backend speaks: inputs renamed to sample, timestep (float32, with the adapter's
time scale or sigma conversion folded in as graph nodes), encoder_hidden_states/class_labels or
the adapter's own names; the output renamed to `out`. After that, the graph is a denoiser like
any other export: the sampler drives it in onnxruntime (`OnnxGraphModule`, a torch module whose
forward runs the session), calibration trajectories come from the model's own scheduler, and the
ONNX/OpenVINO/FPGA backends take the normalized graph as it is.

What cannot be done to a graph: pruning, fusion, fine-tuning and the torch-side quantizer (they
need torch modules); those passes are refused with exit 2. Quantization is done on the graph
itself by onnxruntime's `quantize_static` (QDQ, per-channel int8 weights; ORT fuses it into
integer kernels) or NNCF's ONNX backend, both fed with edgediff's diffusion-aware calibration
set (`quantize_graph`).
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import cond_unflatten

if TYPE_CHECKING:  # the adapter module loads models (loaders -> here): a type only, no import cycle
    from edgediff.adapter import Adapter

# passes that work on a graph (the rest need torch modules)
GRAPH_PASSES = ("calib", "quant", "sampling")
QUANTIZERS = ("ort", "nncf")
# what W8A8 covers, as for torch models: convolutions and matmuls. Letting quantize_static also
# quantize GroupNorm's Mul/Add and the residual Adds (its default: every op type) cost the
# trained demo 33 dB (7 dB vs fp32 where convs+matmuls alone keep ~30).
GRAPH_OPS = ("Conv", "MatMul", "Gemm")
_ONNX_FLOAT = 1
_ONNX_INT64 = 7


def _onnx() -> Any:
    import onnx

    return onnx


def normalize(proto: Any, adapter: Adapter, where: Path) -> Any:
    """The graph with contract I/O names and a float32 timestep (a new ModelProto)."""
    onnx = _onnx()
    from onnx import helper

    m = copy.deepcopy(proto)
    g = m.graph
    inits = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    names = [i.name for i in real_inputs]
    if list(adapter.inputs) != names:
        raise BadInput(f"{adapter.path}: adapter field `inputs` {list(adapter.inputs)} does not match the graph's "
                       f"inputs {names} ({where.name})")
    if len(g.output) != 1:
        raise BadInput(f"{where}: the graph has {len(g.output)} outputs; a denoiser graph has exactly one")
    contract = {v: k for k, v in adapter.feed_names().items()}
    rename: dict[str, str] = {}
    new_nodes = []
    for inp in real_inputs:
        want = contract[inp.name]
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if inp.name == adapter.sample:
            if len(dims) != 1 + len(adapter.sample_shape) or [d for d in dims[1:]] != [
                    d if dims[i + 1] is not None else None for i, d in enumerate(adapter.sample_shape)]:
                raise BadInput(f"{adapter.path}: adapter field `sample_shape` {list(adapter.sample_shape)} does not fit "
                               f"the graph's {inp.name} shape {dims}")
            if tt.elem_type != _ONNX_FLOAT:
                raise BadInput(f"{where}: input {inp.name} must be float32")
        if inp.name == adapter.time:
            # the contract feeds float32 (B,) in scheduler units; fold scale / sigma / dtype into the graph
            x = want
            if adapter.time_kind == "sigma":  # EDM schedulers' timesteps are c_noise = log(sigma) / 4
                new_nodes += [helper.make_node("Mul", [x, "_edgediff_four"], ["_edgediff_t4"]),
                              helper.make_node("Exp", ["_edgediff_t4"], ["_edgediff_sigma"])]
                g.initializer.append(helper.make_tensor("_edgediff_four", _ONNX_FLOAT, [], [4.0]))
                x = "_edgediff_sigma"
            if adapter.time_scale != 1.0:
                g.initializer.append(helper.make_tensor("_edgediff_tscale", _ONNX_FLOAT, [], [adapter.time_scale]))
                new_nodes.append(helper.make_node("Mul", [x, "_edgediff_tscale"], ["_edgediff_tscaled"]))
                x = "_edgediff_tscaled"
            if tt.elem_type != _ONNX_FLOAT:
                new_nodes.append(helper.make_node("Cast", [x], ["_edgediff_tcast"], to=tt.elem_type))
                x = "_edgediff_tcast"
            if len(dims) == 0:  # a scalar time input: the contract's is (B,); take the first
                new_nodes.append(helper.make_node("ReduceMean", [x], ["_edgediff_tscalar"], keepdims=0))
                x = "_edgediff_tscalar"
            new_nodes.append(helper.make_node("Identity", [x], [inp.name]))
            tt.elem_type = _ONNX_FLOAT
            del tt.shape.dim[:]
            tt.shape.dim.add().dim_param = "batch"
            inp.name = want
            continue
        rename[inp.name] = want
        inp.name = want
    for node in g.node:
        for i, n in enumerate(node.input):
            if n in rename:
                node.input[i] = rename[n]
    out_name = g.output[0].name
    if out_name != "out":
        for node in g.node:
            for i, n in enumerate(node.output):
                if n == out_name:
                    node.output[i] = "out"
            for i, n in enumerate(node.input):
                if n == out_name:
                    node.input[i] = "out"
        g.output[0].name = "out"
    for n in reversed(new_nodes):
        g.node.insert(0, n)
    # contract order: sample, timestep, then the rest as the signature lists them
    order = ["sample", "timestep"] + [adapter.contract_name(c) for c in adapter.cond]
    ins = sorted(list(g.input), key=lambda v: order.index(v.name) if v.name in order else len(order))
    del g.input[:]
    g.input.extend(ins)
    try:
        onnx.checker.check_model(m)
    except Exception as e:  # noqa: BLE001 - onnx raises its own checker errors
        raise BadInput(f"{where}: the normalized graph fails onnx's checker ({str(e).splitlines()[0][:200]})") from None
    return m


def signature_of(adapter: Adapter) -> Any:
    from edgediff.model import InputSignature, InputSpec

    cond_shape = num_classes = None
    extra = []
    for c in adapter.cond:
        name = adapter.contract_name(c)
        if name == "encoder_hidden_states":
            cond_shape = c.shape
        elif name == "class_labels":
            num_classes = c.num_classes
        elif c.dtype == "int64":
            extra.append(InputSpec(c.name, c.shape, "int64", fill="randint", value=(c.num_classes or 2,)))
        else:
            extra.append(InputSpec(c.name, c.shape))
    return InputSignature(tuple(adapter.sample_shape), cond_shape, num_classes, tuple(extra),
                          time_input=adapter.time_kind)


class OnnxGraphModule(nn.Module):
    """A normalized ONNX denoiser graph, run by onnxruntime behind a torch forward.

    `graph` is what runs (the source, or its quantized version); `source` is always the
    normalized fp32 original (the reference for quality figures).
    """

    def __init__(self, graph: bytes, source: bytes | None = None, quant: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.graph = graph
        self.source = source if source is not None else graph
        self.quant = quant
        self._session: Any = None
        self._inputs: list[str] = []
        self._stats: dict[str, int] | None = None

    def set_graph(self, graph: bytes, quant: dict[str, Any] | None) -> None:
        """Replace what runs (the quantized graph); the session and the counts follow it."""
        self.graph, self.quant = graph, quant
        self._session = self._stats = None

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxGraphModule:
        return OnnxGraphModule(self.graph, self.source, copy.deepcopy(self.quant, memo))

    def stats(self) -> dict[str, int]:
        """params / size_bytes / macs of the running graph (a graph has no torch parameters to count);
        computed once per graph, since info asks for each of the three."""
        if self._stats is None:
            self._stats = self._count()
        return self._stats

    def _count(self) -> dict[str, int]:
        onnx = _onnx()
        from onnx import numpy_helper

        m = onnx.load_from_string(self.graph)
        params = nbytes = 0
        for init in m.graph.initializer:
            a = numpy_helper.to_array(init)
            if init.data_type in (1, 10, 11, 3, 2, 16) and a.ndim >= 1 and a.size > 1:  # float and int8/uint8 tensors
                params += int(a.size)
            nbytes += int(a.nbytes)
        with tempfile.TemporaryDirectory(prefix="edgediff-graphstats-") as td:
            from edgediff.profiling.graph import onnx_ops

            f = Path(td) / "g.onnx"
            f.write_bytes(self.graph)
            macs = sum(o.macs for o in onnx_ops(f))
        return {"params": params, "size_bytes": nbytes, "macs": int(macs)}

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = max(1, torch.get_num_threads())
            so.log_severity_level = 3
            self._session = ort.InferenceSession(self.graph, so, providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]
        return self._session

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        sess = self.session()
        vals: dict[str, Any] = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                                "class_labels": class_labels, **kwargs}
        extra_names = [n for n in self._inputs if n not in ("sample", "timestep", "encoder_hidden_states", "class_labels")]
        vals.update(dict(zip(extra_names, args)))
        feed = {}
        for i in sess.get_inputs():
            v = vals.get(i.name)
            if v is None:
                raise BadInput(f"the ONNX denoiser needs input {i.name!r}, none was given")
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            feed[i.name] = arr.astype(np.int64 if "int64" in i.type else np.float32)
        if feed["timestep"].ndim == 0:
            feed["timestep"] = np.full((feed["sample"].shape[0],), float(feed["timestep"]), np.float32)
        return torch.from_numpy(sess.run(None, feed)[0]).float()


def is_graph_model(model: Any) -> bool:
    den = getattr(model, "denoiser", model)
    return isinstance(den, OnnxGraphModule) or isinstance(getattr(den, "inner", None), OnnxGraphModule)


def graph_module(model: Any) -> OnnxGraphModule:
    den = getattr(model, "denoiser", model)
    den = getattr(den, "inner", den)
    if not isinstance(den, OnnxGraphModule):
        raise BadInput("not an ONNX-graph model")
    return den


def check_pass(model: Any, pass_name: str) -> None:
    """BadInput for passes that need torch modules, with the reason."""
    if is_graph_model(model) and pass_name not in GRAPH_PASSES:
        raise BadInput(f"pass {pass_name!r} cannot run on an ONNX-only model (it needs torch modules: pruning, fusion, "
                       f"fine-tuning and the torch quantizer edit layers); a graph takes {', '.join(GRAPH_PASSES)}")


def load_onnx_model(path: Path, adapter: Adapter) -> Any:
    """An .onnx denoiser + adapter -> DiffusionModel (its denoiser an OnnxGraphModule)."""
    from edgediff.model import DiffusionModel
    from edgediff.schedule import NoiseSchedule

    onnx = _onnx()
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise BadInput(f"{path}: not a readable ONNX file ({e.__class__.__name__})") from None
    if not proto.graph.node:
        raise BadInput(f"{path}: the ONNX graph has no nodes")
    norm = normalize(proto, adapter, Path(path))
    data = norm.SerializeToString()
    schedule = NoiseSchedule.from_config(adapter.scheduler, where=f"{adapter.path} [scheduler]")
    sig = signature_of(adapter)
    import hashlib

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    model = DiffusionModel(OnnxGraphModule(data), schedule, sig, "OnnxGraph", None,
                           {"source": str(path), "source_sha256": digest, "adapter": adapter.to_dict()})
    # a first call proves the adapter fits: wrong shapes fail here with onnxruntime's reason
    try:
        ex = sig.example_inputs(1)
        model.module()(**ex)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors
        raise BadInput(f"{adapter.path}: the graph {Path(path).name} does not run with the adapter's inputs "
                       f"({str(e).splitlines()[0][:200]})") from None
    return model


# ------------------------------------------------------------------ storage (artifact model/ folder)
GRAPH_FILE = "denoiser.onnx"
SOURCE_FILE = "source.onnx"


def save_graph(module: OnnxGraphModule, folder: Path) -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / GRAPH_FILE).write_bytes(module.graph)
    (folder / SOURCE_FILE).write_bytes(module.source)
    (folder / "graph.json").write_text(json.dumps({"kind": "onnx", "quant": module.quant}, indent=2) + "\n")


def load_graph(folder: Path) -> OnnxGraphModule:
    from edgediff.files import read_json

    meta = read_json(folder / "graph.json")
    for f in (GRAPH_FILE, SOURCE_FILE):
        if not (folder / f).is_file():
            raise BadInput(f"{folder / f}: missing (an ONNX-graph artifact keeps its graph and its source)")
    quant = meta.get("quant")
    if quant is not None and not isinstance(quant, dict):
        raise BadInput(f"{folder / 'graph.json'}: 'quant' must be an object or null")
    return OnnxGraphModule((folder / GRAPH_FILE).read_bytes(), (folder / SOURCE_FILE).read_bytes(), quant)


# ------------------------------------------------------------------ quantization of the graph
def calibration_feeds(data: dict[str, torch.Tensor], sig: Any) -> list[dict[str, np.ndarray]]:
    """The calib pass's points (x, t, cond) as onnxruntime feeds, one point per feed."""
    feeds = []
    n = int(data["x"].shape[0])
    cond = cond_unflatten(data, "cond")
    for i in range(n):
        f = {"sample": data["x"][i:i + 1].float().numpy(), "timestep": data["t"][i:i + 1].float().numpy()}
        for spec in getattr(sig, "extra", ()):
            f[spec.name] = spec.example(1).numpy()
        if isinstance(cond, dict):  # named inputs recorded by calib replace the examples
            f.update({k: v[i:i + 1].numpy() for k, v in cond.items()})
        elif cond is not None:
            f["class_labels" if sig.num_classes and not sig.cond_shape else "encoder_hidden_states"] = \
                cond[i:i + 1].numpy()
        feeds.append(f)
    return feeds


def quantize_graph(model: Any, feeds: list[dict[str, np.ndarray]], quantizer: str = "ort", per_channel: bool = True,
                   ignored: list[str] | None = None, split_shortcut: bool = True,
                   float_time_mlp: bool = True) -> dict[str, Any]:
    """Quantize the model's graph in place with `quantizer` fed with `feeds`; returns a report.

    Before the quantizer runs, the diffusion-aware rewrites of edgediff/graph_quant.py apply:
    convs reading a shortcut concat are split per half (`split_shortcut`) and the
    timestep-embedding MLP stays float (`float_time_mlp`)."""
    from edgediff.graph_quant import split_concat_convs, time_only_nodes

    if quantizer not in QUANTIZERS:
        raise BadInput(f"quant: quantizer {quantizer!r} for an ONNX graph: expected one of {', '.join(QUANTIZERS)}")
    if not feeds:
        raise BadInput("quant: no calibration points for the ONNX graph")
    onnx = _onnx()
    mod = graph_module(model)
    src = onnx.load_from_string(mod.source)
    split = split_concat_convs(src) if split_shortcut else []
    ignored = list(ignored or []) + (time_only_nodes(src) if float_time_mlp else [])
    with tempfile.TemporaryDirectory(prefix="edgediff-onnxq-") as td:
        if quantizer == "ort":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
            from onnxruntime.quantization.shape_inference import quant_pre_process

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(feeds)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self.it, None)

            raw, pre, out = Path(td) / "in.onnx", Path(td) / "pre.onnx", Path(td) / "q.onnx"
            onnx.save(src, str(raw))
            try:
                quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph then
                pre = raw
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(ignored or []), op_types_to_quantize=list(GRAPH_OPS),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            q = onnx.load(str(out))
        else:
            import nncf

            # the same coverage as for torch models (convs and matmuls, asymmetric activations):
            # NNCF's default also quantizes the Adds/Reshapes/Transposes between them and uses
            # symmetric activations; on the trained demo (DDIM 20, 32 samples) that measured
            # 30.3 dB vs fp32, these choices 32.2 dB
            other = sorted({n.op_type for n in src.graph.node} - set(GRAPH_OPS))
            q = nncf.quantize(src, nncf.Dataset(feeds), subset_size=len(feeds), preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(names=list(ignored), types=other, validate=False))
    ops: dict[str, int] = {}
    for n in q.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    report = {"quantizer": quantizer, "points": len(feeds), "per_channel": per_channel,
              "qdq_pairs": ops.get("DequantizeLinear", 0), "ignored": ignored, "split_convs": len(split)}
    mod.set_graph(q.SerializeToString(), report)
    return report


def psnr_vs_source(model: Any, samples: int = 8, steps: int = 20, seed: int = 0) -> float:
    """Final-sample PSNR of the (quantized) graph vs its fp32 source, same seeds and scheduler."""
    from edgediff.metrics import psnr
    from edgediff.sampling import SamplerConfig, TorchDenoiser, sample

    mod = graph_module(model)
    ref_model = copy.copy(model)
    ref_model.denoiser = OnnxGraphModule(mod.source)
    cfg = SamplerConfig(None, steps)
    cond = model.signature.conditioning(samples, seed) if hasattr(model.signature, "conditioning") else None
    a = sample(TorchDenoiser(model), model.schedule, model.signature.sample_shape, samples, seed, cfg, cond=cond)
    b = sample(TorchDenoiser(ref_model), model.schedule, model.signature.sample_shape, samples, seed, cfg, cond=cond)
    p = psnr(a, b)
    return p if math.isfinite(p) else 200.0


def graph_proto(model: Any, precision: str) -> tuple[Any, dict[str, Any]]:
    """What an ONNX export of a graph model holds: the source (fp32, fp16-converted) or the
    quantized graph (int8). Returns (ModelProto, report) like the ONNX exporter's build step."""
    onnx = _onnx()
    mod = graph_module(model)
    if precision == "int8":
        if not mod.quant:
            raise BadInput("--precision int8 needs the ONNX graph quantized first (compress it with a recipe "
                           "that has calib + quant, e.g. `edgediff compress model.onnx --adapter A.toml --recipe w8a8`)")
        proto = onnx.load_from_string(mod.graph)
    else:
        proto = onnx.load_from_string(mod.source)
        if precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            proto = convert_float_to_float16(proto, keep_io_types=True)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return proto, {"target": "onnx", "precision": precision, "source": "ONNX graph (adapter-normalized)",
                   "nodes": len(proto.graph.node), "ops": ops, "qdq_pairs": ops.get("DequantizeLinear", 0),
                   "inputs": [i.name for i in proto.graph.input if i.name not in {x.name for x in proto.graph.initializer}],
                   "outputs": ["out"], **({"quantizer": mod.quant} if precision == "int8" else {})}
