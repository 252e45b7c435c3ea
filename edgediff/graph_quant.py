"""Diffusion-aware rewrites applied to an ONNX denoiser graph before a generic quantizer runs.

onnxruntime's `quantize_static` and NNCF place one activation scale per tensor and quantize
every Conv/MatMul/Gemm they are allowed to. Two properties of diffusion UNets make that costly,
and both are fixed here on the graph, so any quantizer benefits:

* **Shortcut concatenations** (Q-Diffusion's shortcut splitting). A decoder conv reads
  `concat(upsampled, skip)`; the two halves have ranges that differ by up to an order of
  magnitude, and one scale for both wastes most of the int8 grid on the narrow half. A conv
  whose input is (a channel-wise function of) such a concat is rewritten as
  `Conv(x[:, :a], W[:, :a]) + Conv(x[:, a:], W[:, a:], B)` (exact in float), so each half gets
  its own activation and weight scale.
* **Time-only layers.** The timestep-embedding MLP is a function of t alone: its activations are
  one vector per timestep, its MACs are negligible, and its ranges depend on which timesteps
  calibration happened to visit (a sampler with other steps sees other values). Nodes that do not
  depend on the sample input are left in float.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ops that keep the channel layout of an NCHW tensor (channel c stays channel c): a conv behind
# them still reads the concat's halves at the same channel positions. GroupNorm exports as
# Reshape -> InstanceNormalization -> Reshape -> Mul -> Add.
_CHANNEL_WISE = {"Mul", "Add", "Sigmoid", "Relu", "Silu", "Reshape", "InstanceNormalization", "GroupNormalization",
                 "Cast", "Identity", "Div", "Sub", "Tanh", "Erf", "LeakyRelu", "HardSigmoid", "HardSwish"}


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _concat_split(tensor: str, prod: dict[str, Any], channels: dict[str, list[int]],
                  depth: int = 8) -> list[int] | None:
    """The channel sizes of the axis-1 concat `tensor` is a channel-wise function of, if any.
    Every non-constant input is followed (SiLU exports as x * Sigmoid(x): both reach the concat)."""
    if depth == 0:
        return None
    node = prod.get(tensor)
    if node is None:
        return None
    if node.op_type == "Concat":
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        sizes = [channels.get(i) for i in node.input]
        if axis == 1 and len(sizes) >= 2 and all(s is not None for s in sizes):
            return [s[0] for s in sizes]  # type: ignore[index]
        return None
    if node.op_type not in _CHANNEL_WISE:
        return None
    # per-channel scales/biases and shapes are initializers or Constant nodes
    ins = node.input[:1] if node.op_type == "Reshape" else node.input  # a Reshape's 2nd input is its shape
    dyn = [i for i in ins if i and prod.get(i) is not None and prod[i].op_type != "Constant"]
    found = {tuple(r) if r else None for r in (_concat_split(i, prod, channels, depth - 1) for i in dyn)}
    if len(found) != 1:
        return None
    only = found.pop()
    return list(only) if only else None


def _channel_sizes(model: Any) -> dict[str, list[int]]:
    """tensor -> [channels] for 4-D NCHW tensors with a static channel dim (shape inference)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes nothing is split; the graph stays as it is
        return {}
    out: dict[str, list[int]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            out[vi.name] = [int(dims[1].dim_value)]
    return out


def split_concat_convs(model: Any) -> list[str]:
    """Rewrite, in place, every group-1 Conv reading a shortcut concat as one Conv per half plus
    an Add. Returns the names of the split convs."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    prod = _producers(g)
    channels = _channel_sizes(model)
    inits = {i.name: i for i in g.initializer}
    done: list[str] = []
    new_nodes: list[Any] = []
    for node in g.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        sizes = _concat_split(node.input[0], prod, channels) if group == 1 else None
        w = numpy_helper.to_array(inits[node.input[1]])
        if not sizes or sum(sizes) != w.shape[1]:
            new_nodes.append(node)
            continue
        base = node.name or node.output[0]
        parts = [f"{base}/split_in_{k}" for k in range(len(sizes))]
        split_sizes = f"{base}/split_sizes"
        g.initializer.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), split_sizes))
        new_nodes.append(helper.make_node("Split", [node.input[0], split_sizes], parts, name=f"{base}/split", axis=1))
        outs, start = [], 0
        for k, c in enumerate(sizes):
            wk = f"{base}/w_part{k}"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[:, start:start + c]), wk))
            ins = [parts[k], wk] + ([node.input[2]] if k == len(sizes) - 1 and len(node.input) > 2 else [])
            out = f"{base}/part{k}"
            conv = helper.make_node("Conv", ins, [out], name=f"{base}/part{k}")
            conv.attribute.extend(node.attribute)
            new_nodes.append(conv)
            outs.append(out)
            start += c
        acc = outs[0]
        for k, o in enumerate(outs[1:], 1):
            dst = node.output[0] if k == len(outs) - 1 else f"{base}/sum{k}"
            new_nodes.append(helper.make_node("Add", [acc, o], [dst], name=f"{base}/sum{k}"))
            acc = dst
        done.append(base)
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
        # the original full weights are unused now
        used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.checker.check_model(model)
    return done


def time_only_nodes(model: Any, time_input: str = "timestep", ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm"))\
        -> list[str]:
    """Names of `ops` nodes computed from the timestep (and constants) alone: the timestep-embedding
    MLP. Nodes reached by any other graph input (sample, text states, class labels) are not."""
    inits = {i.name for i in model.graph.initializer}
    data = {i.name for i in model.graph.input if i.name != time_input and i.name not in inits}
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        # a Shape of the sample (diffusers broadcasts t to the batch) carries no values
        if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input):
            data.update(n.output)
    return [n.name for n in model.graph.node if n.op_type in ops and n.name and not any(i in data for i in n.input)]
