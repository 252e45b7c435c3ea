"""Core ML backend: ML Program `.mlpackage` (fp32, fp16, int8 weights, palettized weights) via coremltools.

How the package is made
- The float denoiser (quantization wrappers stripped, see exporters.onnx.float_denoiser) is
  exported with `torch.export.export` and converted by `coremltools.convert(...,
  convert_to="mlprogram")` (iOS 17 / macOS 14 deployment target, the first with int8
  `constexpr_blockwise_shift_scale` weights and per-channel scales). If torch.export fails on a
  model, the exporter falls back to `torch.jit.trace`, and the report says which was used
  (`frontend`).
- Attention in the form Apple's Neural Engine prefers (Apple's ml-stable-diffusion,
  "split_einsum"): every diffusers Attention is rewritten to keep activations channels-first
  as (B, C, 1, S), compute the Q/K/V/out projections as 1x1 convolutions, and split heads into
  per-head einsums (no (B, S, heads, d) reshapes or transposes, which the ANE handles badly
  and which push large tensors through the slower 64-byte-aligned last axis). Numerically
  the same attention; `attention="sdpa"` keeps diffusers' own processor.
- fp16: `compute_precision=FLOAT16` (weights and activations fp16, I/O stays float32).
- int8: linear weight compression of the artifact's on-grid weights, per output channel,
  symmetric (coremltools.optimize.coreml.linear_quantize_weights; its torch.export frontend
  cannot lower quantize_per_channel, so the artifact's scales cannot be handed over as such).
  Core ML's scale is max|w| / 127 per channel (/ 7 and int4 storage, iOS 18, for 4-bit
  artifacts): identical to the artifact's min-max scales, so
  the integers are the artifact's; layers whose scale was searched/clipped are re-gridded, and
  the report counts them (`int8.regridded`). Activations stay fp16 (weight compression:
  size and bandwidth, as Core ML runs it on every chip).
- `palettize=BITS` (CLI `--palettize BITS`): k-means palettization of every weight with
  coremltools.optimize.coreml.palettize_weights (a lookup table of 2^BITS fp16 values per
  tensor); works with fp16/fp32 and needs no QuantParams.

Prediction needs macOS (Core ML framework): on Linux `runtime_available` says so, and
`check(path, reference)` loads the package structurally (spec inputs/outputs/shapes/dtypes,
weight dtypes, op histogram of the MIL program) so that the verifier reports
`verified: false` with that reason and exit 3.

Exported I/O: inputs sample float32 [B,C,H,W], timestep float32 [B], optional
encoder_hidden_states float32 [B,S,D] / class_labels (int32: Core ML has no int64 inputs);
output `out` float32 [B,C_out,H,W]. The batch is fixed at export (`batch`, default 1):
Core ML's flexible shapes (RangeDim) stop the ANE from running the model.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from edgediff.exporters.base import (
    PRECISIONS,
    Backend,
    ExportReport,
    FixedBatchDenoiser,
    check_batch,
    check_precision,
    float_denoiser,
    input_names,
    int8_quant_params,
    probe,
)
from torch import nn

from edgediff.artifact import atomic_dir
from edgediff.attention import explicit_supports, is_joint
from edgediff.errors import BadInput, Unavailable
from edgediff.model import DenoiserModule, DiffusionModel
from edgediff.quant_params import QuantParams

PALETTIZE_BITS = (1, 2, 3, 4, 6, 8)
INSTALL = 'pip install -e ".[coreml]"'
OUTPUT_NAME = "out"
NOT_MACOS = "Core ML prediction needs macOS (the Core ML framework); this machine runs {system}"


def _ct() -> Any:
    try:
        import coremltools as ct
    except ImportError as e:
        raise Unavailable(f"the coreml target needs coremltools ({e}); install it with {INSTALL}") from None
    return ct


# ------------------------------------------------------------------------------------------
# attention in the Neural Engine's preferred form (ml-stable-diffusion's split_einsum)
# ------------------------------------------------------------------------------------------


def _conv1x1(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear applied to (B, C, 1, S) as a 1x1 convolution (the ANE's native matmul)."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


class AneAttnProcessor:
    """diffusers Attention, channels-first (B, C, 1, S), heads split into per-head einsums.

    Follows apple/ml-stable-diffusion's `split_einsum` attention: Q (B, d, 1, Sq) per head,
    K transposed to (B, Sk, 1, d), scores (B, Sk, 1, Sq) softmaxed over dim 1, then
    einsum with V (B, d, 1, Sk) back to (B, d, 1, Sq); heads concatenated on channels.
    """

    # a plain class (like diffusers' processors): diffusers inspects __call__'s parameters to
    # decide which keyword arguments (temb) it passes
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None or getattr(attn, "spatial_norm", None) is not None \
                or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise BadInput("coreml attention='ane' supports plain self/cross attention only; "
                           "export with attention='sdpa' for this model")
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states)
            x = hidden_states.reshape(b, c, 1, h * w)
        else:  # tokens (B, S, C) from transformer blocks
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            x = hidden_states.transpose(1, 2).unsqueeze(2)
        if encoder_hidden_states is None:
            ctx = x
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            ctx = encoder_hidden_states.transpose(1, 2).unsqueeze(2)  # (B, D, 1, Sk)
        q, k, v = _conv1x1(attn.to_q, x), _conv1x1(attn.to_k, ctx), _conv1x1(attn.to_v, ctx)
        heads = attn.heads
        d = q.shape[1] // heads
        kt = k.transpose(1, 3)  # (B, Sk, 1, C)
        outs = []
        for i in range(heads):
            if heads == 1:  # a full-range slice exports as `alias`, which coremltools cannot lower
                qi, ki, vi = q, kt, v
            else:
                qi = q[:, i * d:(i + 1) * d]
                ki = kt[:, :, :, i * d:(i + 1) * d]
                vi = v[:, i * d:(i + 1) * d]
            wts = torch.einsum("bchq,bkhc->bkhq", qi, ki) * attn.scale
            wts = wts.softmax(dim=1)
            outs.append(torch.einsum("bkhq,bchk->bchq", wts, vi))
        y = _conv1x1(attn.to_out[0], torch.cat(outs, dim=1))
        y = attn.to_out[1](y)  # dropout (identity in eval)
        if ndim == 4:
            y = y.reshape(b, -1, h, w)
        else:
            y = y.squeeze(2).transpose(1, 2)
        if attn.residual_connection:
            y = y + residual
        return y / attn.rescale_output_factor


def ane_attention(den: nn.Module) -> int:
    """Give every diffusers Attention the ANE processor, in place; returns how many.

    Only where the current processor is plain (softmax) attention: joint attention (SD3), Sana's
    linear attention and Flux's processors compute something else and keep their own.
    """
    n = 0
    for m in den.modules():
        if hasattr(m, "set_processor") and hasattr(m, "to_q") and explicit_supports(m) and not is_joint(m):
            m.set_processor(AneAttnProcessor())
            n += 1
    return n


# ------------------------------------------------------------------------------------------
# int8 weights from the artifact
# ------------------------------------------------------------------------------------------


def weight_dtype_for(qp: QuantParams) -> str:
    """Core ML storage type for the artifact's weights: int4 for grids of 4 bits or fewer, else int8."""
    return "int4" if qp.weight_bits <= 4 else "int8"


def int8_scale_agreement(den: nn.Module, qp: QuantParams) -> dict[str, Any]:
    """How many of the artifact's int8 weight grids Core ML's weight quantizer reproduces exactly.

    coremltools' `torch.export` frontend has no lowering for quantize_per_channel, so int8
    weights are made by coremltools.optimize.coreml.linear_quantize_weights (per output channel,
    symmetric, scale = max|w| / 127). The artifact's weights lie on its grid, so Core ML's
    integers equal the artifact's exactly when the artifact's scale is max|w| / 127 for every
    channel (min-max scales); a layer whose scale was searched or clipped (max|q| < 127 in a
    channel) is re-gridded by Core ML. Returns counts and the layers that differ.
    """
    modules = dict(den.named_modules())
    qmax = 7.0 if weight_dtype_for(qp) == "int4" else 127.0
    same, differ = 0, []
    for name, lq in qp.layers.items():
        if lq.kind in ("matmul_qk", "matmul_av"):
            continue
        m = modules.get(name)
        if m is None:
            raise BadInput(f"quantization parameters name layer {name!r}, which the model does not have")
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or lq.weight is None:
            raise BadInput(f"quantization parameters of {name!r}: expected a Conv2d or Linear with a weight quantizer")
        if lq.weight.bits > 8:
            raise BadInput(f"{name}: {lq.weight.bits}-bit weights cannot be written as int8")
        lq.refuse_split_weight("Core ML")
        if not lq.weight.symmetric:  # Core ML's int8 weights are symmetric: refuse rather than regrid silently
            raise BadInput(f"{name}: asymmetric weights (zero points; quant option weight_symmetric = false) have "
                           "no Core ML int8 export; re-quantize with weight_symmetric = true")
        w = m.weight.detach().float()
        ours = lq.weight.scale.reshape(-1)
        coreml_scale = w.abs().flatten(1).amax(1) / qmax
        if ours.numel() == coreml_scale.numel() and torch.allclose(ours, coreml_scale, rtol=1e-5, atol=0):
            same += 1
        else:
            differ.append(name)
    return {"dtype": weight_dtype_for(qp), "layers": same + len(differ), "scales_as_artifact": same,
            "regridded_by_coreml": differ[:20],
            "regridded": len(differ)}


# ------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------


def build_mlmodel(model: DiffusionModel, precision: str, palettize: int | None = None, batch: int = 1,
                  attention: str = "ane", activations: str | None = None,
                  entry: Any = None, outputs: tuple[str, ...] = (OUTPUT_NAME,),
                  deployment_target: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Convert `model` (never modified) to a coremltools MLModel; returns (mlmodel, facts).

    `entry(wrapper, example_inputs) -> (module, example_inputs)` converts another call of the same prepared
    denoiser (e.g. Apple's Swift package layout of encoder_hidden_states, exporters/bundle_coreml.py;
    DeepCache's full and shallow calls, whose extra example inputs become extra model inputs);
    `outputs`: the names of the module's outputs, in order; `deployment_target` ("iOS18"): at least
    that target (a multifunction package needs iOS 18)."""
    check_precision("coreml", precision)
    if palettize is not None and palettize not in PALETTIZE_BITS:
        raise BadInput(f"--palettize {palettize}: Core ML palettizes to {', '.join(map(str, PALETTIZE_BITS))} bits")
    if palettize is not None and precision == "int8":
        raise BadInput("--palettize and --precision int8 are two different weight compressions; pick one "
                       "(palettize with --precision fp16)")
    if attention not in ("ane", "sdpa"):
        raise BadInput(f"coreml option attention={attention!r}: expected 'ane' or 'sdpa'")
    if activations not in (None, "int8", "fp16"):
        raise BadInput(f"coreml option activations={activations!r}: expected 'int8' (W8A8) or 'fp16' (weights only)")
    if activations == "int8" and precision != "int8":
        raise BadInput("coreml option activations=int8 needs --precision int8")
    check_batch("coreml", batch)
    qp = int8_quant_params(model, precision, ", or use --palettize BITS")
    ct = _ct()
    den = float_denoiser(model)
    facts: dict[str, Any] = {"batch": batch, "attention": attention}
    if attention == "ane":
        facts["attention_rewritten"] = ane_attention(den)
    if precision == "int8":
        assert qp is not None
        facts["int8"] = int8_scale_agreement(den, qp)
        if activations is None:  # W8A8 where the artifact's activations are 8-bit, else weights only
            bits = {t.bits for lq in qp.layers.values() for t in (lq.input, lq.input2) if t is not None}
            activations = "int8" if bits == {8} else "fp16"
        facts["int8"]["activation_dtype"] = activations
    wrapper = DenoiserModule(den, model.signature).eval()  # named inputs become the Core ML input names
    ex = model.signature.example_inputs(batch=batch)
    names = input_names(model.signature)
    if "class_labels" in ex:
        ex["class_labels"] = ex["class_labels"].to(torch.int32)
    if entry is not None:
        wrapper, ex = entry(wrapper, ex)
        names = [*names, *(k for k in ex if k not in names)]
    args = tuple(ex[n] for n in names[:2])
    kwargs = {n: ex[n] for n in names[2:]}
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            src: Any = torch.export.export(wrapper, args, kwargs, strict=False).run_decompositions({})
        facts["frontend"] = "torch.export"
    except Exception as e:  # noqa: BLE001 - any export failure: fall back to tracing, and say so
        facts["frontend"] = "torch.jit.trace"
        facts["export_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        try:
            with torch.no_grad():
                src = torch.jit.trace(wrapper, example_kwarg_inputs={n: ex[n] for n in names}, check_trace=False)
        except Exception as e2:  # noqa: BLE001 - neither frontend takes this model: say why, no traceback
            raise BadInput(f"Core ML: neither torch.export ({facts['export_error']}) nor torch.jit.trace "
                           f"({type(e2).__name__}: {str(e2).strip().splitlines()[-1][:200]}) takes this denoiser") from None
    inputs = []
    for n in names:
        a = ex[n]
        dtype = np.int32 if n == "class_labels" else np.float32
        inputs.append(ct.TensorType(name=n, shape=tuple(a.shape), dtype=dtype))
    cp = ct.precision.FLOAT16 if precision in ("fp16", "int8") else ct.precision.FLOAT32
    # int4 weights (4-bit artifacts) need iOS 18 / macOS 15; everything else runs from iOS 17
    target = ct.target.iOS18 if precision == "int8" and qp is not None and weight_dtype_for(qp) == "int4" \
        else ct.target.iOS17
    if deployment_target is not None:
        target = max(target, getattr(ct.target, deployment_target))
    facts["deployment_target"] = getattr(target, "name", str(target))
    try:
        ml = ct.convert(src, convert_to="mlprogram", inputs=inputs if facts["frontend"] != "torch.export" else None,
                        outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
                        compute_precision=cp, minimum_deployment_target=target, skip_model_load=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise BadInput(f"coremltools could not convert this denoiser ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300]})") from None
    if precision == "int8" and activations == "int8":
        assert qp is not None
        from edgediff.lowering import lower

        ml, facts["int8"]["activations"] = quantize_activations(ml, lower(den, qp))
    if precision == "int8":
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

        # per output channel, symmetric, every weight tensor (weight_threshold=0): see int8_scale_agreement
        cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=weight_dtype_for(qp), granularity="per_channel", weight_threshold=0))
        ml = linear_quantize_weights(ml, cfg)
    if palettize is not None:
        from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

        cfg = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=palettize, weight_threshold=512))
        ml = palettize_weights(ml, cfg)
        facts["palettize_bits"] = palettize
    facts["convert_seconds"] = round(time.perf_counter() - t0, 2)
    return ml, facts


# ------------------------------------------------------------------------------------------
# int8 activations (W8A8): the artifact's activation scales as quantize/dequantize ops
# ------------------------------------------------------------------------------------------
#
# coremltools.optimize.coreml.linear_quantize_activations calibrates by running predictions,
# which needs macOS and would re-derive the ranges from coremltools' own statistics. The
# artifact already has the diffusion-aware calibrated scales (edgediff.lowering), so they are
# placed directly: an iOS 17 `quantize` -> `dequantize` pair (int8) in front of every conv /
# linear whose weights are a lowered layer's, which is the same graph shape
# linear_quantize_activations produces and Core ML fuses with the int8 weights on devices that
# run W8A8. A shortcut-split layer has two input scales on one concatenated input: each half
# gets its own quantize -> dequantize (split, Q/DQ, concat in front of the one conv), which is
# what the simulation computes; the conv keeps its whole-row weight grid (two convs on the halves
# would let coremltools re-derive each half's weight scales and move the weights off the
# artifact's grid), so on device that conv reads fp16 values that lie on the two int8 grids.


def _act_quant_pass(low: Any, report: dict[str, Any]) -> Any:
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    # a layer is recognised by its weights: (O, K) shape, and round(W / s) equal to its int8 weights
    # (the fp16 cast of an on-grid weight keeps the integer: |q| <= 127, fp16 relative error 2^-11)
    # (a split layer: its parts' weights side by side, on one per-channel scale)
    cands: dict[tuple[int, int], list[tuple[Any, np.ndarray]]] = {}
    for lay in low.layers.values():
        if lay.split and not all(np.array_equal(p.weight_scale, lay.parts[0].weight_scale) for p in lay.parts):
            report["split_layers_fp16_input"].append(lay.name)  # split weight scales: no Core ML int8 weights
            continue
        w = np.concatenate([p.weight for p in lay.parts], axis=1) if lay.split else lay.parts[0].weight
        cands.setdefault((w.shape[0], int(w.size // w.shape[0])), []).append((lay, w))

    def match(val: np.ndarray) -> Any:
        w = np.asarray(val, np.float32).reshape(val.shape[0], -1)
        for lay, q in cands.get(w.shape, []):
            s = lay.parts[0].weight_scale
            if np.array_equal(np.rint(w / s[:, None]), q.reshape(w.shape).astype(np.float32)):
                return lay
        return None

    def qdq(x: Any, a: Any, sdt: Any, op: Any, name: str) -> Any:
        q = mb.quantize(input=x, scale=sdt(a.scale), zero_point=np.int8(a.zero_point), output_dtype="int8",
                        before_op=op, name=f"{name}_q")
        if float(sdt(a.scale)) != a.scale:
            report["scales_rounded_to_fp16"] += 1
        return mb.dequantize(input=q, scale=sdt(a.scale), zero_point=np.int8(a.zero_point), before_op=op,
                             name=f"{name}_dq")

    class _InsertActQuant(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for fn in prog.functions.values():
                for op in list(fn.operations):
                    if op.op_type not in ("conv", "linear") or op.weight.val is None:
                        continue
                    lay = match(op.weight.val)
                    if lay is None:
                        continue
                    x = op.x
                    sdt = np.float16 if x.dtype.__name__ == "fp16" else np.float32
                    with fn:
                        if lay.split:
                            c1 = lay.parts[0].channels[1]
                            halves = mb.split(x=x, split_sizes=[c1, lay.parts[1].channels[1] - c1], axis=1,
                                              before_op=op, name=f"{op.name}_act_split")
                            dqs = [qdq(h, p.input.as_int8(), sdt, op, f"{op.name}_act{i}")
                                   for i, (h, p) in enumerate(zip(halves, lay.parts))]
                            dq = mb.concat(values=dqs, axis=1, before_op=op, name=f"{op.name}_act_concat")
                            report["split_layers_qdq_halves"].append(lay.name)
                        else:
                            dq = qdq(x, lay.parts[0].input.as_int8(), sdt, op, f"{op.name}_act")
                    fn.replace_uses_of_var_after_op(anchor_op=dq.op, old_var=x, new_var=dq, end_op=op)
                    report["layers"] += 1

    return _InsertActQuant()


def quantize_activations(ml: Any, low: Any) -> tuple[Any, dict[str, Any]]:
    """Insert int8 quantize/dequantize with the lowering's input scales before the lowered convs
    and linears of `ml` (an ML Program, before weight compression); returns (model, report)."""
    from coremltools.models.utils import _apply_graph_pass

    report: dict[str, Any] = {"layers": 0, "split_layers_fp16_input": [], "split_layers_qdq_halves": [],
                              "scales_rounded_to_fp16": 0,
                              "source": "the artifact's calibrated activation scales (no Core ML calibration run)"}
    ml = _apply_graph_pass(ml, [_act_quant_pass(low, report)], spec_version=8, skip_model_load=True)
    report["not_found"] = len(low.layers) - report["layers"] - len(report["split_layers_fp16_input"])
    return ml, report


def activation_quant_ops(path: Path) -> int:
    """How many activation `quantize` ops (int8/uint8 output, not weight constexprs) the package has."""
    return sum(1 for op in _mil_ops(_load_spec(path)) if op.type == "quantize")


# ------------------------------------------------------------------------------------------
# the package: structure, op histogram, runtime
# ------------------------------------------------------------------------------------------


def _load_spec(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    ct = _ct()
    try:
        return ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as e:  # noqa: BLE001 - coremltools raises many kinds for a bad package
        raise BadInput(f"{path}: not a Core ML package coremltools can read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _walk_ops(block: Any) -> Any:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk_ops(inner)


def _mil_ops(spec: Any) -> list[Any]:
    ops: list[Any] = []
    for fn in spec.mlProgram.functions.values():
        for blk in fn.block_specializations.values():
            ops.extend(_walk_ops(blk))
    return ops


def _dtype_name(value: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(value).lower()


def _array_type_name(value: int) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(value).lower()


def _weight_dtypes(ops: list[Any]) -> dict[str, int]:
    """Element types of the weights: const tensors with > 1 element, plus compressed ones."""
    counts: Counter[str] = Counter()
    for op in ops:
        if op.type == "const":
            t = op.outputs[0].type.tensorType
            n = int(np.prod([d.constant.size for d in t.dimensions])) if t.dimensions else 1
            if n > 16:  # skip scalars and shape constants
                counts[_dtype_name(t.dataType)] += 1
        elif op.type.startswith("constexpr_"):
            counts[op.type] += 1
    return dict(counts)


def coreml_info(path: Path) -> dict[str, Any]:
    spec = _load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise BadInput(f"{path}: a Core ML model but not an ML Program (found {spec.WhichOneof('Type')})")

    def io(features: Any) -> dict[str, Any]:
        return {f.name: {"shape": [int(s) for s in f.type.multiArrayType.shape],
                         "dtype": _array_type_name(f.type.multiArrayType.dataType)} for f in features}

    functions = {f.name: {"inputs": io(f.input), "outputs": io(f.output)} for f in spec.description.functions}
    default = functions.get(spec.description.defaultFunctionName) if functions else None
    ops = _mil_ops(spec)
    hist = dict(Counter(op.type for op in ops if op.type != "const").most_common())
    weights = _weight_dtypes(ops)
    if any(k.startswith("constexpr_lut") for k in weights):
        precision = "palettized"
    elif any(k in ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize") for k in weights):
        precision = "int8"
    elif weights.get("float16"):
        precision = "fp16"
    else:
        precision = "fp32"
    size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    return {"kind": "exported", "target": "coreml", "path": str(path), "size_bytes": size, "format": "mlprogram",
            "spec_version": int(spec.specificationVersion), "precision": precision,
            # a multifunction package (DeepCache's full + shallow calls): the default function's I/O, and each one's
            "inputs": default["inputs"] if default else io(spec.description.input),
            "outputs": default["outputs"] if default else io(spec.description.output), "ops": hist,
            "num_ops": sum(hist.values()), "weight_dtypes": weights,
            **({"functions": functions, "default_function": spec.description.defaultFunctionName} if functions else {})}


def structural_check(path: Path, reference: DiffusionModel | None = None, precision: str | None = None) -> dict[str, Any]:
    """What can be checked without running Core ML: it loads, I/O as expected, weight dtypes."""
    info = coreml_info(path)
    problems: list[str] = []
    if reference is not None:
        sig = reference.signature
        want = input_names(sig)
        if list(info["inputs"]) != want:
            problems.append(f"inputs {list(info['inputs'])} != expected {want}")
        shp = info["inputs"].get("sample", {}).get("shape", [])
        if list(shp[1:]) != list(sig.sample_shape):
            problems.append(f"sample shape {shp} does not match the model's {list(sig.sample_shape)}")
        if sig.cond_shape and list(info["inputs"].get("encoder_hidden_states", {}).get("shape", [])[1:]) != list(
                sig.cond_shape):
            problems.append("encoder_hidden_states shape does not match the model's conditioning")
        out = info["outputs"].get(OUTPUT_NAME)
        if out is None:
            problems.append(f"no output named {OUTPUT_NAME!r}")
        elif out["shape"] and list(out["shape"][2:]) != list(sig.sample_shape[1:]):
            problems.append(f"output shape {out['shape']} does not match the sample's spatial size")
    for name, d in {**info["inputs"], **info["outputs"]}.items():
        if name != "class_labels" and d["dtype"] != "float32":
            problems.append(f"{name} is {d['dtype']}, expected float32")
    want_prec = precision
    if want_prec and want_prec != info["precision"]:
        problems.append(f"weights are {info['precision']}, expected {want_prec}")
    from edgediff.exporters.coreml_deepcache import cache_record, check_cached

    cache = cache_record(path)
    if cache is not None:  # DeepCache's two entry points (exporters/coreml_deepcache.py)
        problems += check_cached(path, cache, coreml_info)
    return {"loads": True, "ok": not problems, "problems": problems, "precision": info["precision"],
            "inputs": info["inputs"], "outputs": info["outputs"], "ops": info["ops"],
            "weight_dtypes": info["weight_dtypes"], "cache": cache,
            **({"functions": info["functions"]} if "functions" in info else {})}


def _is_macos() -> bool:
    return platform.system() == "Darwin"


class CoreMLDenoiser(FixedBatchDenoiser):
    """A .mlpackage run by Core ML (macOS only), called like TorchDenoiser; fixed batch, padded."""

    def __init__(self, path: Path, compute_units: str = "ALL") -> None:
        ok, why = BACKEND.runtime_available(path)
        if not ok:
            raise Unavailable(why)
        ct = _ct()
        self.path = Path(path)
        self.model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        info = coreml_info(path)
        self.inputs = info["inputs"]
        self.batch = int(self.inputs["sample"]["shape"][0])
        self.cond_name = next((n for n in ("encoder_hidden_states", "class_labels") if n in self.inputs), None)

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        res = self.model.predict({name: v.numpy().astype(np.int32 if name == "class_labels" else np.float32)
                                  for name, v in feeds.items()})
        return torch.from_numpy(np.asarray(res[OUTPUT_NAME], dtype=np.float32))


# ------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------


class CoreMLBackend(Backend):
    target = "coreml"
    precisions = PRECISIONS
    suffixes = (".mlpackage",)
    options = frozenset({"palettize", "batch", "attention", "activations", "deployment_target"})

    def available(self) -> tuple[bool, str]:
        try:
            import coremltools  # noqa: F401
        except ImportError as e:
            return False, f"coremltools is not installed ({e}); install it with {INSTALL}"
        return True, "coremltools is installed (converting works on any OS; prediction needs macOS)"

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        if not _is_macos():
            return False, NOT_MACOS.format(system=platform.system() or "an unknown OS")
        return probe(_ct, "Core ML runs .mlpackage files on this Mac")

    def _export(self, model: DiffusionModel, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        from edgediff.deepcache import cache_config

        if cache_config(model) is not None:  # DeepCache: the full and shallow calls (exporters/coreml_deepcache.py)
            from edgediff.exporters.coreml_deepcache import export_cached

            facts = export_cached(model, out, precision, options, force, build_mlmodel)
            info = coreml_info(out)
            runs, why = self.runtime_available(out)
            return ExportReport(self.target, precision, str(out), facts.pop("size_bytes"), extra={
                "converter": "coremltools", **facts, "inputs": info["inputs"], "outputs": info["outputs"],
                "functions": info.get("functions"), "weights": info["precision"], "runs_here": runs, "runtime": why})
        ml, facts = build_mlmodel(model, precision, palettize=options.get("palettize"), batch=options.get("batch", 1),
                                  attention=options.get("attention", "ane"), activations=options.get("activations"))
        with atomic_dir(out, force=force) as tmp:
            pkg = tmp / out.name
            ml.save(str(pkg))
            # atomic_dir renames the temp dir itself: move the package's contents up into it
            for p in pkg.iterdir():
                p.rename(tmp / p.name)
            pkg.rmdir()
        info = coreml_info(out)
        runs, why = self.runtime_available(out)
        return ExportReport(self.target, precision, str(out), info["size_bytes"], extra={
            "converter": "coremltools", **facts, "inputs": info["inputs"], "outputs": info["outputs"],
            "ops": info["ops"], "weight_dtypes": info["weight_dtypes"], "weights": info["precision"],
            "runs_here": runs, "runtime": why})

    def load_denoiser(self, path: Path) -> CoreMLDenoiser:
        return CoreMLDenoiser(path)

    def check(self, path: Path, reference: DiffusionModel | None = None) -> dict[str, Any]:
        return structural_check(path, reference)

    def info(self, path: Path) -> dict[str, Any]:
        return coreml_info(path)


BACKEND = CoreMLBackend()
