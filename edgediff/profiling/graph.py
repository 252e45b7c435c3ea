"""Per-op work of an exported graph: module name, op, MACs, bytes moved, precision.

One list of `OpWork` feeds the device roofline (estimate.py), the op coverage per target
(coverage.py) and the MACs-vs-latency plot. It is read from the exported file itself
(ONNX: shapes from the graph or onnx.shape_inference; TFLite: tensor details from the
LiteRT interpreter), so it describes what will run, after pruning and fusion.

Module names: torch.onnx.export keeps them in two forms, and both are mapped back to
the source model's module path (relative to the float denoiser, i.e. without the
DenoiserModule wrapper's `inner.`):
- dynamo exporter: node metadata `pkg.torch.onnx.name_scopes` (['', 'inner', 'inner.conv_in', 'conv2d']);
- TorchScript exporter: node names like `/inner/down_blocks.0/resnets.0/conv1/Conv`.
litert-torch keeps class/attribute scopes in tensor names
(`...UNet2DModel_inner/...AttnDownBlock2D_1/...Conv2d_conv2;2`); ModuleList names are not
kept there, so list items read `AttnDownBlock2D[1].ResnetBlock2D[0].conv2`.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import BadInput

_WRAPPER = "inner"  # DenoiserModule's attribute holding the user's denoiser


@dataclass
class OpWork:
    """One op of an exported graph and the work it does per denoiser call (batch 1)."""

    name: str  # source module path where the export kept it, else the node name
    node: str  # node name in the exported graph
    op: str  # op type in the exported format (ONNX op_type / TFLite builtin name)
    macs: int
    bytes_in: int  # activations read
    bytes_w: int  # weights/constants read
    bytes_out: int  # activations written
    precision: str  # fp32 | fp16 | int8
    gemm: tuple[int, int, int, int] | None = None  # (M, K, N, reps) GEMM view of a MAC op, for the FPGA array
    # computes only from tensor shapes (Shape -> Gather -> Div -> Cast ...): folded away by any
    # runtime that builds for static shapes (TensorRT, Core ML, LiteRT), so coverage ignores it
    shape_only: bool = False

    @property
    def bytes(self) -> int:
        return self.bytes_in + self.bytes_w + self.bytes_out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes"] = self.bytes
        return d


# ----------------------------------------------------------------------------- names

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


# A graph with dynamic axes (a third-party export: batch, height, width, sequence) is analysed at
# batch 1 and every other dynamic axis at DYNAMIC_DIMS[its name], else DEFAULT_DYNAMIC_DIM; setting
# them all to 1 would shrink a UNet's feature maps below its down/up sampling and lose the shapes.
DEFAULT_DYNAMIC_DIM = 64
DYNAMIC_DIMS: dict[str, int] = {}


def dim_value(dim: Any, axis: int) -> int:
    """A concrete size for an input dimension (an int, or a symbolic name / None)."""
    if isinstance(dim, int) and dim > 0:
        return dim
    if axis == 0:
        return 1
    return DYNAMIC_DIMS.get(str(dim), DEFAULT_DYNAMIC_DIM)


def _fix_input_dims(model: Any) -> None:
    for vi in model.graph.input:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.dim_value = dim_value(d.dim_param or None, axis)


def feeds_for(session: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs per the exported I/O contract: sample/cond float32 randn, timestep 500, class labels 0."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        shape = [dim_value(d, axis) for axis, d in enumerate(i.shape)]
        dt = _NP.get(i.type, np.float32)
        if i.name == "timestep" or "timestep" in i.name:
            feeds[i.name] = np.full(shape, 500.0, dtype=dt)
        elif np.issubdtype(dt, np.integer):
            feeds[i.name] = np.zeros(shape, dtype=dt)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def strip_wrapper(path: str) -> str:
    """`inner.down_blocks.0` -> `down_blocks.0` (module path in the float denoiser)."""
    if path == _WRAPPER:
        return ""
    return path[len(_WRAPPER) + 1:] if path.startswith(_WRAPPER + ".") else path


def module_of_onnx_node(node: Any) -> str | None:
    """Source module path of an ONNX node, or None when the export did not keep it."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            items = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            items = []
        # the last entry is the FX node's own name; the one before it is the innermost module
        mods = [s for s in items[:-1] if s]
        if mods:
            return strip_wrapper(mods[-1])
        return ""
    name = node.name or ""
    if name.startswith("/"):
        parts = [p for p in name.split("/") if p][:-1]  # drop the op part (`Conv`, `Add_1`)
        return strip_wrapper(".".join(parts))
    return None


_TFL_SEG = re.compile(r"^(?:[\w.]+\.)?(?P<cls>[A-Za-z_]\w*?)_(?P<attr>\w+)$")


def module_of_tflite_tensor(name: str) -> str | None:
    """Module path from a litert-torch tensor name (class/attribute scopes joined by '/');
    other names (hand-written graphs, delegate nodes) come back without the `;N` suffix."""
    name = name.split(";")[0]
    if not name:
        return None
    segs = name.split("/")
    if len(segs) < 2 or "." not in segs[0]:  # scopes start with the root module's qualified class name
        return name
    out: list[str] = []
    for seg in segs[1:]:
        m = _TFL_SEG.match(seg.rsplit(".", 1)[-1] if "." in seg else seg)
        if not m:
            continue
        cls, attr = m.group("cls"), m.group("attr")
        out.append(f"{cls}[{attr}]" if attr.isdigit() else attr)
    if out and out[0] == _WRAPPER:
        out = out[1:]
    return ".".join(out)


# ----------------------------------------------------------------------------- ONNX
# ONNX elem_type -> bytes: float, u8, i8, u16, i32, i64, bool, f16, f64, bf16
_ONNX_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}


def load_onnx(path: Path, with_weights: bool = False) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=with_weights)
    except Exception as e:  # noqa: BLE001 - onnx raises several kinds for a damaged file
        raise BadInput(f"{path}: not a readable ONNX model ({e.__class__.__name__}: {str(e)[:120]})") from None


def _onnx_shapes(model: Any) -> dict[str, tuple[list[int], int]]:
    """tensor name -> (shape with symbolic dims set to 1, element bytes)."""
    import onnx

    # batch 1: symbolic dims (a dynamic batch axis) would stop shape propagation through reshapes
    model = copy.deepcopy(model)
    _fix_input_dims(model)
    for vi in model.graph.output:  # outputs follow from the inputs
        vi.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to whatever value_info the exporter wrote
        inferred = model
    g = inferred.graph
    out: dict[str, tuple[list[int], int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        out[vi.name] = (dims, _ONNX_DTYPE_BYTES.get(tt.elem_type, 4))
    for init in g.initializer:
        out[init.name] = (list(init.dims), _ONNX_DTYPE_BYTES.get(init.data_type, 4))
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = (list(a.t.dims), _ONNX_DTYPE_BYTES.get(a.t.data_type, 4))
    return out


def _ort_shapes(model: Any) -> dict[str, tuple[list[int], int]]:
    """Shapes as run: one onnxruntime pass at batch 1 with every intermediate exposed as an output.

    Static shape inference stops at exporter idioms (Shape -> Gather -> Div -> Cast -> Reshape);
    running the graph once has no such gaps. Skipped (empty result) for external-data models
    and anything ORT refuses.
    """
    import onnx

    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return {}
    try:
        import onnxruntime as ort

        m = copy.deepcopy(model)
        _fix_input_dims(m)
        have = {o.name for o in m.graph.output}
        for n in m.graph.node:
            if n.op_type == "Constant":
                continue
            for o in n.output:
                if o and o not in have:
                    m.graph.output.append(onnx.ValueInfoProto(name=o))
                    have.add(o)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        vals = sess.run(names, feeds_for(sess))
    except Exception:  # noqa: BLE001 - fall back to static shape inference
        return {}
    return {n: (list(v.shape), v.dtype.itemsize) for n, v in zip(names, vals) if hasattr(v, "shape")}


def _numel(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _onnx_gemm(node: Any, shapes: dict[str, tuple[list[int], int]]) -> tuple[int, int, int, int] | None:
    """(M, K, N, reps) of a MAC op: MACs = M*K*N*reps; None for other ops or unknown shapes."""
    def shp(i: int) -> list[int] | None:
        if i >= len(node.input) or node.input[i] not in shapes:
            return None
        return shapes[node.input[i]][0]

    out = shapes.get(node.output[0], (None, 4))[0] if node.output else None
    op = node.op_type
    if out is None:
        return None
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        w = shp(3 if op == "QLinearConv" else 1)
        if w is None or len(out) < 3:
            return None
        g = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        return (out[0] * _numel(out[2:]), _numel(w[1:]), out[1] // g, g)
    if op == "ConvTranspose":
        x, w = shp(0), shp(1)
        if x is None or w is None:
            return None
        g = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
        return (x[0] * _numel(x[2:]), x[1] // g, _numel(w[1:]), g)  # scatter form: each input pixel x weights
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"):
        a = shp(0)
        if a is None or len(out) < 2:
            return None
        return (out[-2], a[-1], out[-1], _numel(out[:-2]))
    if op == "Gemm":
        a = shp(0)
        if a is None or len(out) != 2:
            return None
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return (out[0], a[0] if trans_a else a[-1], out[1], 1)
    return None


def einsum_macs(equation: str, operand_shapes: list[list[int]]) -> int:
    """Multiply-adds of an Einsum: the product of every index's size, once per operand pair (0 for one operand)."""
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    if len(lhs) != len(operand_shapes) or len(lhs) < 2:
        return 0
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs, operand_shapes):
        if "..." in term:  # the ellipsis stands for the leading dims the explicit letters leave over
            n_ell = len(shape) - (len(term) - 3)
            term = term.replace("...", "".join(chr(0x100 + i) for i in range(n_ell)))
        if len(term) != len(shape):
            return 0
        for ch, d in zip(term, shape):
            sizes[ch] = max(sizes.get(ch, 1), int(d))
    return int(np.prod(list(sizes.values()))) * (len(lhs) - 1)


def _onnx_macs(node: Any, shapes: dict[str, tuple[list[int], int]]) -> int:
    if node.op_type == "Einsum":
        eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        if not all(i in shapes for i in node.input):
            return 0
        return einsum_macs(eq, [shapes[i][0] for i in node.input])
    g = _onnx_gemm(node, shapes)
    return g[0] * g[1] * g[2] * g[3] if g else 0


def _onnx_precision(node: Any, producers: dict[str, Any], shapes: dict[str, tuple[list[int], int]]) -> str:
    for name in node.input:
        p = producers.get(name)
        if p is not None and p.op_type in ("DequantizeLinear",):
            return "int8"
    if node.op_type.startswith("QLinear") or node.op_type.endswith("Integer") or node.op_type in (
            "QuantizeLinear", "DequantizeLinear"):
        return "int8"
    for name in list(node.input) + list(node.output):
        if name in shapes and shapes[name][1] == 2:
            return "fp16"
    return "fp32"


def onnx_ops(path: Path) -> list[OpWork]:
    """Every compute node of an ONNX file with its module, MACs and bytes (batch 1)."""
    model = load_onnx(path)
    g = model.graph
    shapes = _onnx_shapes(model)
    shapes.update(_ort_shapes(model))
    consts = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    producers = {o: n for n in g.node for o in n.output}
    ops: list[OpWork] = []
    shape_only: set[str] = set()  # tensors computed from shapes and constants only
    for n in g.node:
        if n.op_type == "Constant":
            continue
        from_shapes = n.op_type == "Shape" or (
            bool(n.input) and all((not i) or i in consts or i in shape_only for i in n.input)
            and any(i in shape_only for i in n.input))
        if from_shapes:
            shape_only.update(n.output)
        b_in = b_w = 0
        for i in n.input:
            if not i or i not in shapes:
                continue
            s, eb = shapes[i]
            p = producers.get(i)
            # weights reach the op either directly or through a DequantizeLinear of a constant
            is_w = i in consts or (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in consts)
            if is_w:
                b_w += _numel(s) * (1 if p is not None and p.op_type == "DequantizeLinear" else eb)
            else:
                b_in += _numel(s) * eb
        b_out = sum(_numel(shapes[o][0]) * shapes[o][1] for o in n.output if o in shapes)
        mod = module_of_onnx_node(n)
        ops.append(OpWork(name=mod if mod is not None else n.name, node=n.name, op=n.op_type,
                          macs=_onnx_macs(n, shapes), bytes_in=b_in, bytes_w=b_w, bytes_out=b_out,
                          precision=_onnx_precision(n, producers, shapes), gemm=_onnx_gemm(n, shapes),
                          shape_only=from_shapes))
    return ops


# ----------------------------------------------------------------------------- TFLite
_TFL_BYTES = {np.float32: 4, np.float16: 2, np.int8: 1, np.uint8: 1, np.int16: 2, np.int32: 4, np.int64: 8}


def tflite_interpreter(path: Path, threads: int | None = None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ModuleNotFoundError:
        from edgediff.errors import Unavailable

        raise Unavailable("LiteRT is not installed: pip install 'edgediff[tflite]' (ai-edge-litert)") from None
    try:
        it = Interpreter(model_path=str(path), num_threads=threads)
        it.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise BadInput(f"{path}: not a loadable .tflite model ({str(e).splitlines()[0][:160]})") from None
    return it


def tflite_ops(path: Path, interpreter: Any = None) -> list[OpWork]:
    """Every op of a .tflite file with its module, MACs and bytes (shapes as allocated)."""
    it = interpreter or tflite_interpreter(path)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops: list[OpWork] = []

    def nbytes(i: int) -> int:
        t = tensors.get(int(i))
        if t is None:
            return 0
        return _numel([int(x) for x in t["shape"]]) * _TFL_BYTES.get(t["dtype"], 4)

    for o in it._get_ops_details():  # noqa: SLF001 - the public API has no op list
        if o["op_name"] == "DELEGATE":  # nodes a delegate (XNNPACK) added on top of the model's own ops
            continue
        ins = [int(i) for i in o["inputs"] if int(i) >= 0]
        outs = [int(i) for i in o["outputs"]]
        out_shape = [int(x) for x in tensors[outs[0]]["shape"]] if outs and outs[0] in tensors else []
        name = o["op_name"]
        gemm: tuple[int, int, int, int] | None = None
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL") and len(ins) >= 2:
            w = [int(x) for x in tensors[ins[1]]["shape"]]
            if name == "CONV_2D":  # out [B, Ho, Wo, Cout], filter [Cout, kh, kw, Cin/groups]
                gemm = (_numel(out_shape[:-1]), _numel(w[1:]), out_shape[-1], 1)
            elif name == "DEPTHWISE_CONV_2D":  # filter [1, kh, kw, C*mult]: one tiny GEMM per channel
                gemm = (_numel(out_shape[:-1]), w[1] * w[2], 1, out_shape[-1])
            elif name == "TRANSPOSE_CONV":  # inputs: output_shape, filter [Cout, kh, kw, Cin], input
                x = [int(v) for v in tensors[ins[2]]["shape"]] if len(ins) > 2 else [0]
                gemm = (_numel(x[:-1]), x[-1], w[0] * w[1] * w[2], 1)
            elif name == "FULLY_CONNECTED":  # filter [N, K]
                gemm = (_numel(out_shape[:-1]), w[-1], w[0], 1)
            else:  # BATCH_MATMUL: K is the lhs' last dim
                a = [int(x) for x in tensors[ins[0]]["shape"]]
                gemm = (out_shape[-2], a[-1], out_shape[-1], _numel(out_shape[:-2]))
        macs = gemm[0] * gemm[1] * gemm[2] * gemm[3] if gemm else 0
        consts = [i for i in ins if _is_const(it, tensors.get(i))]
        b_w = sum(nbytes(i) for i in consts)
        b_in = sum(nbytes(i) for i in ins if i not in consts)
        b_out = sum(nbytes(i) for i in outs)
        dtypes = {tensors[i]["dtype"] for i in ins + outs if i in tensors}
        prec = "int8" if (np.int8 in dtypes or np.uint8 in dtypes) else "fp16" if np.float16 in dtypes else "fp32"
        tname = tensors[outs[0]]["name"] if outs and outs[0] in tensors else ""
        mod = module_of_tflite_tensor(tname)
        ops.append(OpWork(name=mod if mod is not None else f"{name}_{o['index']}", node=f"{name}_{o['index']}", op=name,
                          macs=int(macs), bytes_in=b_in, bytes_w=b_w, bytes_out=b_out, precision=prec, gemm=gemm))
    return ops


def _is_const(it: Any, t: dict[str, Any] | None) -> bool:
    # LiteRT marks constant tensors as not variable and with a buffer; the Python API
    # exposes neither, so a tensor that is nobody's output and not a graph input is a constant.
    if t is None:
        return False
    cache = getattr(it, "_edgediff_produced", None)
    if cache is None:
        produced = {int(i) for o in it._get_ops_details() for i in o["outputs"]}  # noqa: SLF001
        produced |= {d["index"] for d in it.get_input_details()}
        it._edgediff_produced = produced
        cache = produced
    return t["index"] not in cache
