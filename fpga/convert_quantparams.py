"""Converter: an edgediff artifact's QuantParams -> the array's layers (fpga.graph.Extracted).

The float model runs once on its example inputs; each quantized conv/linear layer's input is quantized
with its own input quantizer (the integers the quantized model feeds it), weights are recovered on
their grid; attention matmuls take the operands the quantized attention forms. Unquantized MAC modules
and float attention stay on the host with their MACs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from edgediff.fpga.graph import HOST_SIDE_HINT, Extracted, ExtractedLayer
from edgediff.fpga.sim import ConvGeom, QLayer

from edgediff.errors import BadInput


def extract_quantparams(model: Any, seed: int = 0) -> Extracted:
    """Layers of a DiffusionModel quantized by the edgediff quant pass (QuantParams + on-grid float weights).

    The float model (wrappers stripped) runs once on the model's example inputs; each quantized
    layer's input is quantized with its own input TensorQuant (the exact integers the quantized
    model feeds that layer), weights recovered as round(w / scale). QuantParams carry no output
    scale, so the array emits the int32 accumulators and the host dequantizes (`requant: false`).
    """
    import copy

    import torch

    from edgediff.quant_params import QuantParams, strip_quant_wrappers

    qp = QuantParams.of(model)
    if qp is None:
        raise BadInput("the model carries no quantization parameters: run a recipe with the quant pass "
                       "(e.g. edgediff compress MODEL --recipe w8a8) or pass a QDQ-quantized .onnx")
    module = strip_quant_wrappers(copy.deepcopy(model.denoiser)).eval()
    mods = dict(module.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    # attention matmuls: capture Q, K, V (the projections' outputs) of every quantized attention module
    attn_paths = sorted({n.split(":")[0] for n, lq in qp.layers.items() if lq.kind in ("matmul_qk", "matmul_av")})
    qkv: dict[tuple[str, str], torch.Tensor] = {}
    for ap in attn_paths:
        amod = mods.get(ap)
        if amod is None or not all(hasattr(amod, p) for p in ("to_q", "to_k", "to_v", "head_to_batch_dim")):
            continue
        for proj in ("to_q", "to_k", "to_v"):
            hooks.append(getattr(amod, proj).register_forward_hook(
                lambda _m, _a, o, _k=(ap, proj): qkv.__setitem__(_k, o.detach().clone())))
    for name, lq in qp.layers.items():
        if lq.kind not in ("conv", "linear"):
            continue  # attention matmuls: their operands are not module inputs (see the report's `skipped`)
        if name not in mods:
            raise BadInput(f"quantization parameters name layer {name!r}, which the denoiser does not have")
        hooks.append(mods[name].register_forward_pre_hook(
            lambda _m, args, _n=name: inputs.__setitem__(_n, args[0].detach().clone())))
    # the ops that stay on the host (GroupNorm, SiLU, LayerNorm...): listed with the elements they process
    host_elems: dict[str, tuple[str, int]] = {}
    for n, mod in mods.items():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.SiLU, torch.nn.LayerNorm, torch.nn.GELU, torch.nn.Mish)):
            hooks.append(mod.register_forward_hook(
                lambda m, _a, o, _n=n: host_elems.__setitem__(_n, (type(m).__name__, int(o.numel())))))
    # float MAC ops left on the host: unquantized Conv2d/Linear, and the matmuls of unquantized attention
    quantized = {n for n, lq in qp.layers.items() if lq.kind in ("conv", "linear")}
    host_macs: dict[str, tuple[str, int]] = {}

    def _mac_hook(m: Any, _a: Any, o: Any, _n: str) -> None:
        per_out = m.in_features if isinstance(m, torch.nn.Linear) else (m.in_channels // m.groups) * int(
            np.prod(m.kernel_size))
        host_macs[_n] = (type(m).__name__, int(o.numel()) * int(per_out))

    attn_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for n, mod in mods.items():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and n not in quantized:
            hooks.append(mod.register_forward_hook(lambda m, a, o, _n=n: _mac_hook(m, a, o, _n)))
        if n not in attn_paths and all(hasattr(mod, p) for p in ("to_q", "to_k", "heads")):
            for proj in ("to_q", "to_k"):
                hooks.append(getattr(mod, proj).register_forward_hook(
                    lambda _m, _a, o, _k=(n, proj): attn_shapes.__setitem__(_k, tuple(o.shape))))
    from edgediff.model import DenoiserModule

    wrapped = DenoiserModule(module, model.signature)
    with torch.no_grad():
        wrapped(**model.example_inputs(batch=1, seed=seed))
    for h in hooks:
        h.remove()
    out = Extracted("artifact")
    for name, lq in qp.layers.items():
        if lq.kind in ("matmul_qk", "matmul_av"):
            _attention_layer(out, name, lq, qp, mods, qkv)
            continue
        if lq.kind not in ("conv", "linear") or name not in inputs:
            continue
        if lq.weight is None or lq.input is None:
            raise BadInput(f"layer {name!r}: quantization parameters lack a weight or input quantizer")
        if lq.weight.bits > 8 or lq.input.bits > 8:
            raise BadInput(f"layer {name!r}: {lq.weight.bits}-bit weights / {lq.input.bits}-bit activations; the array "
                           "takes at most 8 bits")
        if not lq.weight.symmetric:
            raise BadInput(f"layer {name!r}: per-channel zero points other than zero are not supported")
        lq.refuse_split_weight("the FPGA array")
        if lq.input.scale.numel() != 1:
            raise BadInput(f"layer {name!r}: per-channel activation quantization is not supported")
        mod = mods[name]
        if not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            out.host_ops.append({"name": name, "op": type(mod).__name__, "what": "quantized module the array does not "
                                 "run (Conv2d and Linear run on it)", "macs": 0, "elements": 0})
            continue
        x = inputs[name]
        wq = lq.weight.quantize(mod.weight.detach()).numpy().astype(np.int64)
        s_w = lq.weight.scale.numpy().astype(np.float32).reshape(-1)
        b_float = mod.bias.detach().double().numpy() if getattr(mod, "bias", None) is not None else None
        split = lq.meta.get("split_at") if isinstance(mod, torch.nn.Conv2d) else None
        # Q-Diffusion's shortcut splitting: channels [:split] and [split:] of a concatenated input have their own
        # activation scales, so the conv runs as two GEMMs over the two channel ranges (the host adds the two
        # dequantized int32 results); the bias goes with the first part.
        parts = [(lq.input, slice(None), name)]
        if split and lq.input2 is not None and x.shape[1] > split:
            if mod.groups != 1:
                raise BadInput(f"layer {name!r}: a split input on a grouped conv is not supported")
            parts = [(lq.input, slice(0, split), f"{name}[:{split}]"), (lq.input2, slice(split, None), f"{name}[{split}:]")]
        for i, (tq, sl, lname) in enumerate(parts):
            xq = tq.quantize(x[:, sl] if len(parts) > 1 else x).numpy().astype(np.int64)
            s_x = float(tq.scale)
            bias = None
            if b_float is not None and i == 0:
                bias = np.rint(b_float / (np.float64(np.float32(s_x)) * s_w.astype(np.float64))).astype(np.int64)
            common = {"s_x": s_x, "zp_x": int(tq.zero_point), "s_w": s_w, "bias": bias, "x_signed": tq.signed,
                      "w_bits": lq.weight.bits}
            if isinstance(mod, torch.nn.Conv2d):
                pad = mod.padding if isinstance(mod.padding, tuple) else (0, 0)
                if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                    raise BadInput(f"layer {name!r}: padding {mod.padding!r}/{mod.padding_mode} is not supported")
                geom = ConvGeom(tuple(mod.stride), (pad[0], pad[1], pad[0], pad[1]), tuple(mod.dilation), mod.groups)
                w_part = wq[:, sl] if len(parts) > 1 else wq
                layer = QLayer(lname, "conv", w=w_part, geom=geom, op_type="Conv2d", **common)
            else:
                layer = QLayer(lname, "gemm", w=wq.T.copy(), op_type="Linear", **common)
            out.layers.append(ExtractedLayer(layer, name, layer.op_type, xq, None, tuple(xq.shape)))
    if not out.layers:
        raise BadInput("no quantized conv/linear layer found in the model's quantization parameters")
    for n, (op, elems) in host_elems.items():
        out.host_ops.append({"name": n, "op": op, "what": HOST_SIDE_HINT.get(op, op), "macs": 0, "elements": elems})
    for n, (op, macs) in host_macs.items():
        out.host_ops.append({"name": n, "op": op, "what": f"float {op} (not quantized)", "macs": macs, "elements": 0})
    for ap in sorted({k[0] for k in attn_shapes}):
        q, k = attn_shapes.get((ap, "to_q")), attn_shapes.get((ap, "to_k"))
        if q is None or k is None or len(q) != 3:
            continue
        # QK^T and softmax.V in float: B x Sq x Sk x inner multiply-adds each
        out.host_ops.append({"name": f"{ap}:attention", "op": "MatMul", "what": "float attention matmuls (not "
                             "quantized)", "macs": 2 * q[0] * q[1] * k[1] * q[2], "elements": 0})
    for ap in attn_paths:
        if (ap, "to_q") in qkv:
            out.host_ops.append({"name": f"{ap}:softmax", "op": "Softmax", "what": "softmax", "macs": 0,
                                 "elements": int(qkv[(ap, "to_q")].shape[0] * qkv[(ap, "to_q")].shape[1] ** 2
                                                 * mods[ap].heads) if hasattr(mods[ap], "heads") else 0})
    return out


def _attention_layer(out: Extracted, name: str, lq: Any, qp: Any, mods: dict[str, Any], qkv: dict[Any, Any]) -> None:
    """QK^T or softmax(.)V of a quantized attention module as a matmul layer on the array.

    Operands as the quantized model forms them (edgediff.quant's attention processor): heads folded
    into the batch, Q/K/V quantized with the layer's input/input2 quantizers, the softmax computed
    from the dequantized Q and K and quantized with the softmax quantizer.
    """
    import torch

    ap = name.split(":")[0]
    if (ap, "to_q") not in qkv or lq.input is None or lq.input2 is None:
        out.host_ops.append({"name": name, "op": lq.kind, "what": "attention matmul whose operands could not be "
                             "captured (not a diffusers Attention)", "macs": 0, "elements": 0})
        return
    attn = mods[ap]
    q, k, v = (attn.head_to_batch_dim(qkv[(ap, p)]) for p in ("to_q", "to_k", "to_v"))
    if lq.kind == "matmul_qk":
        a_int, b_int = lq.input.quantize(q), lq.input2.quantize(k).transpose(-1, -2)
    else:
        qk = qp.layers.get(f"{ap}:qk")
        if qk is not None and qk.input is not None and qk.input2 is not None:
            q, k = qk.input.dequantize(qk.input.quantize(q)), qk.input2.dequantize(qk.input2.quantize(k))
        probs = (torch.bmm(q, k.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1)
        a_int, b_int = lq.input.quantize(probs), lq.input2.quantize(v)
    for tq in (lq.input, lq.input2):
        if tq.bits > 8 or tq.scale.numel() != 1:
            raise BadInput(f"layer {name!r}: {tq.bits}-bit / per-channel matmul operands are not supported by the array")
    a_np, b_np = a_int.numpy().astype(np.int64), b_int.contiguous().numpy().astype(np.int64)
    layer = QLayer(name, "matmul", float(lq.input.scale), int(lq.input.zero_point), np.asarray(float(lq.input2.scale),
                   np.float32), zp_w=int(lq.input2.zero_point), x_signed=lq.input.signed, x2_signed=lq.input2.signed,
                   op_type="MatMul")
    out.layers.append(ExtractedLayer(layer, name, "MatMul", a_np, b_np, tuple(a_np.shape), tuple(b_np.shape)))
