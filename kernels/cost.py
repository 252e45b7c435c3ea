"""Bytes moved and FLOPs per kernel, fused vs unfused, counted from what the .cl kernels read and write.

A model, not a measurement: each function counts global-memory reads and writes of the kernels
at element size `es` (2 for fp16, 4 for fp32), assuming caches hold nothing across kernels and
tiles are read once per work-group as the kernels do. `sd15_block_rows()` applies it to the
SD-1.x UNet shapes (320/640/1280 channels at 64/32/16 latents, 8 heads: head_dim 40/80/160,
77 text tokens), which never need to run.
"""

from __future__ import annotations

import re
from typing import Any

# the attention model lives next to the device rules: the runtime picks its attention path with it
from edgediff.kernels.device import attention_bytes as attention


def group_norm_silu(B: int, C: int, HW: int, es: int = 2) -> dict[str, dict[str, int]]:
    """Fused (norm.cl group_norm / the split pair: read twice, write once) vs unfused (statistics
    kernel reading twice, normalise kernel, SiLU kernel)."""
    n = B * C * HW
    fused = {"reads": 2 * n * es, "writes": n * es, "flops": 12 * n, "launches": 1}
    unfused = {"reads": 2 * n * es + n * es + n * es, "writes": n * es + n * es, "flops": 12 * n, "launches": 3}
    return {"fused": fused, "unfused": unfused}


def total(c: dict[str, int]) -> int:
    return c["reads"] + c["writes"]


def sd15_block_rows(es: int = 2) -> list[dict[str, Any]]:
    """GroupNorm+SiLU, self-attention and cross-attention of each SD-1.x UNet level, batch 1."""
    rows = []
    for C, hw in ((320, 64), (640, 32), (1280, 16)):
        d = C // 8
        for kind, cost in (("GroupNorm+SiLU", group_norm_silu(1, C, hw * hw, es)),
                           (f"self-attention h8 d{d}", attention(1, 8, d, hw * hw, hw * hw, es)),
                           (f"cross-attention h8 d{d} M77", attention(1, 8, d, hw * hw, 77, es))):
            f, u = total(cost["fused"]), total(cost["unfused"])
            rows.append({"kernel": kind, "shape": f"1x{C}x{hw}x{hw}", "fused_bytes": f, "unfused_bytes": u,
                         "ratio": round(u / f, 2), "flops": cost["fused"]["flops"]})
    return rows


# ----------------------------------------------------------------------------- per op of a bundle schedule
def _n(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _c(reads: int, writes: int, weights: int, flops: int, launches: int) -> dict[str, int]:
    return {"reads": reads, "writes": writes, "weights": weights, "flops": flops, "launches": launches}


# our op kinds as the device estimate's op types (its compute efficiency is per conv / GEMM class)
ESTIMATE_OP = {"conv": "Conv", "qconv": "ConvInteger", "iconv": "ConvInteger", "flash_attention": "MatMul",
               "cross_attention": "MatMul", "attention_fq": "MatMul", "attention_int8": "MatMulInteger"}


def op_cost(op: dict[str, Any], ins: list[tuple[int, ...]], out: tuple[int, ...], wshape: dict[str, tuple[int, ...]],
            es: int) -> dict[str, Any]:
    """Global-memory bytes and FLOPs of one schedule op as the runtime runs it (fused) and as an op-by-op
    framework would (unfused: every epilogue term, norm step, gate and activation its own kernel
    writing a tensor; Q, K, V three projections each reading the input). Activations at `es` bytes,
    float weights at `es` (biases, norm affines and frequency tables float32), int8 weights 1 byte;
    each tensor read once per kernel (caches assumed to hold a tile for its work-group: the
    compulsory traffic, what a roofline takes). Returns {fused, unfused, macs}."""
    kind = op["op"]
    n_in = _n(ins[0]) if ins else 0
    n = _n(out)

    def wbytes(name: str | None, elem: int) -> int:
        return _n(wshape[name]) * elem if name else 0

    if kind in ("conv", "qconv"):
        co, ci, kh, kw = wshape[op["weight"]]
        macs = ins[0][0] * co * _n(out[2:]) * ci * kh * kw
        q = kind == "qconv"
        wb = wbytes(op["weight"], 1 if q else es) + wbytes(op.get("bias"), 4)
        xin = n_in * (1 if q else es)
        terms = [t for t in ("chan_add", "res") if op.get(t)] + (["out_scale"] if op.get("out_scale", 1.0) != 1.0 else [])
        extra_in = (out[0] * out[1] * es if op.get("chan_add") else 0) + (n * es if op.get("res") else 0)
        quant = _c(n_in * 4, n_in, 0, 3 * n_in, 1) if q else _c(0, 0, 0, 0, 0)  # the quantize kernel before it
        fused = _c(xin + extra_in + quant["reads"], n * (4 if q else es) + quant["writes"], wb, 2 * macs,
                   1 + quant["launches"])
        # stacked projections (to_qkv, to_kv): unfused, each of the 2-3 reads the input on its own
        stack = 3 if op["name"].endswith(".to_qkv") else 2 if op["name"].endswith(".to_kv") else 1
        un = _c(fused["reads"] + (stack - 1) * xin, fused["writes"], wb, 2 * macs, fused["launches"] + stack - 1)
        for t in terms:  # each epilogue term a separate elementwise kernel over the output
            un["reads"] += 2 * n * es if t != "out_scale" else n * es
            un["writes"] += n * es
            un["launches"] += 1
        return {"fused": fused, "unfused": un, "macs": macs}
    if kind == "quantize":  # float in, one byte out
        c = _c(n * 4, n, 0, 3 * n, 1)
        return {"fused": c, "unfused": c, "macs": 0}
    if kind == "iconv":
        co, ci, kh, kw = wshape[op["weight"]]
        macs = ins[0][0] * co * _n(out[2:]) * ci * kh * kw
        wb = wbytes(op["weight"], 1) + wbytes(op.get("bias"), 4) + 4 * co * sum(1 + (p["mult"] is not None)
                                                                               for p in op["parts"])
        oes = 1 if op.get("store") else 4
        extra_in = (out[0] * out[1] * 4 if op.get("chan_add") else 0) + (n * 4 if op.get("res") else 0)
        fused = _c(n_in + extra_in, n * oes, wb, 2 * macs, 1)
        un = _c(fused["reads"], n * 4, wb, 2 * macs, 1)  # op by op: the conv writes float, each term a kernel
        for t in [t for t in ("chan_add", "res") if op.get(t)] + (["out_scale"] if op["out_scale"] != 1.0 else []):
            un["reads"] += 2 * n * 4 if t != "out_scale" else n * 4
            un["writes"] += n * 4
            un["launches"] += 1
        if op.get("store"):  # and a quantize kernel for the consumer
            un = {**un, "reads": un["reads"] + n * 4, "writes": un["writes"] + n, "launches": un["launches"] + 1}
        return {"fused": fused, "unfused": un, "macs": macs}
    if kind == "attention_int8":
        B, heads, d = out[0], op["heads"], op["head_dim"]
        N, M = _n(out[2:]), _n(ins[1][2:])
        C = heads * d
        oes = 1 if op.get("store") else 4
        macs = B * heads * 2 * N * M * d
        # Q, K, V int8 read once (K re-reads per pass hit the cache: compulsory traffic), no score matrix
        fused = _c(B * C * (N + 2 * M), B * C * N * oes, 0, 2 * macs + 8 * B * heads * N * M, 1)
        s = B * heads * N * M  # op by op: float logits, softmax, quantized P, PV
        un = _c(B * C * (N + 2 * M) + 2 * s * 4 + s * 4 + s, B * C * N * oes + s * 4 + s * 4 + s, 0, fused["flops"], 4)
        return {"fused": fused, "unfused": un, "macs": macs}
    if kind == "group_norm":
        B, C = ins[0][:2]
        g = group_norm_silu(B, C, _n(ins[0][2:]), es)
        wb = 2 * C * 4
        fused = {**g["fused"], "weights": wb}
        un = {**g["unfused"], "weights": wb}
        if not op["silu"]:  # no SiLU kernel to save
            un = {**un, "reads": un["reads"] - n * es, "writes": un["writes"] - n * es, "launches": 2}
        if op.get("store"):  # writes its consumer's int8 instead of a float tensor
            fused = {**fused, "writes": fused["writes"] - n * es + n}
            un = {**un, "reads": un["reads"] + n * es, "writes": un["writes"] + n, "launches": un["launches"] + 1}
        return {"fused": fused, "unfused": un, "macs": 0}
    if kind in ("flash_attention", "cross_attention", "attention_fq"):
        B, heads, d = out[0], op["heads"], op["head_dim"]
        N = _n(out[2:])
        M = _n(ins[1][2:]) if kind == "cross_attention" else N
        a = attention(B, heads, d, N, M, es)
        if kind == "attention_fq":  # the quantized-operand path runs the unfused kernels
            a = {"fused": a["unfused"], "unfused": a["unfused"]}
        return {"fused": {**a["fused"], "weights": 0}, "unfused": {**a["unfused"], "weights": 0},
                "macs": B * heads * 2 * N * M * d}
    if kind == "layer_norm":
        wb = (2 * out[1] * 4) if op.get("gamma") else 0
        un = _c(2 * n * es, n * es, wb, 10 * n, 1)
        if op.get("mod"):  # modulation x * (1 + scale) + shift as its own kernel
            un = _c(3 * n * es, 2 * n * es, wb, 12 * n, 2)
        fused = {**un, "reads": 2 * n * es, "writes": n * (1 if op.get("store") else es), "flops": 10 * n, "launches": 1}
        return {"fused": fused, "unfused": un, "macs": 0}
    if kind == "geglu":
        return {"fused": _c(2 * n * es, n * (1 if op.get("store") else es), 0, 20 * n, 1),
                "unfused": _c(3 * n * es, 2 * n * es, 0, 20 * n, 2), "macs": 0}
    if kind == "gate_residual":
        return {"fused": _c(2 * n * es, n * es, 0, 2 * n, 1), "unfused": _c(3 * n * es, 2 * n * es, 0, 2 * n, 2),
                "macs": 0}
    if kind in ("add", "add_broadcast"):
        c = _c(2 * n * es, n * es, wbytes(op.get("table"), es), n, 1)
        return {"fused": c, "unfused": c, "macs": 0}
    if kind == "timestep_embedding":
        c = _c(out[0] * 4, n * es, wbytes(op.get("freqs"), 4), 20 * n, 1)
        return {"fused": c, "unfused": c, "macs": 0}
    # silu, gelu, gelu_tanh, affine, concat, upsample2x, embedding, unpatchify: read the input(s), write the output
    c = _c(sum(_n(s) for s in ins) * es, n * (1 if op.get("store") else es), 0, 8 * n, 1)  # a concat may store int8
    return {"fused": c, "unfused": c, "macs": 0}


def _out_shape(op: dict[str, Any], ins: list[tuple[int, ...]], wshape: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    kind, x = op["op"], ins[0]
    if kind in ("conv", "qconv", "iconv"):
        co, _, kh, kw = wshape[op["weight"]]
        pt, pl, pb, pr = op["pad"]
        s = op["stride"]
        return (x[0], co, (x[2] + pt + pb - kh) // s + 1, (x[3] + pl + pr - kw) // s + 1)
    if kind == "flash_attention":
        return (x[0], x[1] // 3, *x[2:])
    if kind == "concat":
        return (x[0], x[1] + ins[1][1], *x[2:])
    if kind == "upsample2x":
        return (x[0], x[1], 2 * x[2], 2 * x[3])
    if kind == "timestep_embedding":
        return (x[0], op["dim"], 1, 1)
    if kind == "embedding":
        return (x[0], wshape[op["table"]][1], 1, 1)
    if kind == "geglu":
        return (x[0], x[1] // 2, *x[2:])
    if kind == "unpatchify":
        p = op["patch"]
        return (x[0], op["out_channels"], x[2] * p, x[3] * p)
    return x


def schedule_costs(schedule: dict[str, Any], wshape: dict[str, tuple[int, ...]], precision: str,
                   batch: int = 1, temb: int = 1280) -> list[dict[str, Any]]:
    """Every op of a bundle schedule with its shapes and op_cost, at `batch` (shape inference
    follows the executor; the context of a conditional UNet is (B, D, M, 1), channels-first)."""
    es = 2 if precision == "fp16" else 4
    shapes: dict[str, tuple[int, ...]] = {"sample": (batch, *schedule["sample_shape"]), "timestep": (batch,),
                                          "class_labels": (batch,), "temb": (batch, temb, 1, 1)}
    if schedule.get("cond_shape"):
        m, d = schedule["cond_shape"]
        shapes["context"] = (batch, int(d), int(m), 1)
    rows = []
    for op in schedule["ops"]:
        ins = [shapes[i] for i in op["in"]]
        if op["op"] == "layer_norm" and op.get("mod"):
            ins = ins[:1]  # the modulation vector is small; counted in neither variant
        out = _out_shape(op, ins, wshape)
        shapes[op["out"]] = out
        c = op_cost(op, ins, out, wshape, es)
        rows.append({"name": op["name"], "op": op["op"], "out_shape": list(out), **c,
                     "precision": "int8" if op["op"] in ("qconv", "iconv", "attention_int8")
                     else ("fp16" if es == 2 else "fp32")})
    return rows


def bundle_costs(path: Any, batch: int = 1) -> list[dict[str, Any]]:
    """schedule_costs of an OpenCL bundle directory (weight shapes read from its safetensors header)."""
    from pathlib import Path

    from edgediff.kernels.export import read_bundle
    from safetensors import safe_open

    meta = read_bundle(Path(path))
    with safe_open(str(Path(path) / meta["weights"]), "np") as f:
        wshape = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return schedule_costs(meta["schedule"], wshape, meta["precision"], batch)


def bundle_work(path: Any) -> list[dict[str, Any]]:
    """The fused kernels of a bundle as the device estimate's per-op work (batch 1): the fields of
    edgediff.profiling.graph.OpWork, so `profile BUNDLE --device adreno740` prices what this
    runtime actually reads and writes, not the op-by-op graph an exporter would emit."""
    out = []
    for r in bundle_costs(path):
        f = r["fused"]
        out.append({"name": r["name"], "node": r["name"], "op": ESTIMATE_OP.get(r["op"], r["op"]), "macs": int(r["macs"]),
                    "bytes_in": int(f["reads"]), "bytes_w": int(f["weights"]), "bytes_out": int(f["writes"]),
                    "precision": r["precision"]})
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fused vs unfused bytes and launches per op kind over a schedule's rows."""
    agg: dict[str, dict[str, Any]] = {}
    for r in rows:
        a = agg.setdefault(r["op"], {"op": r["op"], "count": 0, "fused_bytes": 0, "unfused_bytes": 0,
                                     "fused_launches": 0, "unfused_launches": 0, "macs": 0})
        a["count"] += 1
        a["fused_bytes"] += total(r["fused"]) + r["fused"]["weights"]
        a["unfused_bytes"] += total(r["unfused"]) + r["unfused"]["weights"]
        a["fused_launches"] += r["fused"]["launches"]
        a["unfused_launches"] += r["unfused"]["launches"]
        a["macs"] += r["macs"]
    out = sorted(agg.values(), key=lambda a: -a["unfused_bytes"])
    for a in out:
        a["ratio"] = round(a["unfused_bytes"] / a["fused_bytes"], 2) if a["fused_bytes"] else None
    return out


def sd15_level_costs(C: int, hw: int, heads: int = 8, ctx: tuple[int, int] = (77, 768), es: int = 2,
                     temb: int = 1280) -> list[dict[str, Any]]:
    """schedule_costs of one SD-1.x UNet level at batch 1 (a ResnetBlock2D, then a Transformer2DModel
    with the self-attn -> cross-attn -> GEGLU schedule, heads x C/heads), built by the bundle builder
    itself from real diffusers modules (uninitialised weights: only shapes are used; never run)."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from edgediff.kernels.graph import level_schedule

    with torch.device("meta"):
        res = ResnetBlock2D(in_channels=C, out_channels=C, temb_channels=temb, groups=32, eps=1e-5)
        tr = Transformer2DModel(num_attention_heads=heads, attention_head_dim=C // heads, in_channels=C,
                                cross_attention_dim=ctx[1], norm_num_groups=32)
    res.to_empty(device="cpu")
    tr.to_empty(device="cpu")
    ops, wshape = level_schedule(res, tr)
    rows = schedule_costs({"sample_shape": [C, hw, hw], "cond_shape": list(ctx), "ops": ops}, wshape,
                          "fp16" if es == 2 else "fp32", temb=temb)
    return rows


# ----------------------------------------------------------------------------- measured on oclgrind
_CALL = re.compile(r"^\s*(\d+) - call _Z\d+v(load|store)(_half)?(\d*)\w*?PU3AS1(K?)(f|Dh)")
_MEM = re.compile(r"^\s*(\d+) - (load|store) global \((\d+) bytes\)")


def parse_inst_counts(text: str) -> dict[str, dict[str, int]]:
    """Global-memory bytes per case from oclgrind's instruction histograms (OCLGRIND_INST_COUNTS=1):
    scalar `load/store global (N bytes)` plus vload/vstore builtins on __global pointers (count x
    width x element size). Cases are delimited by '### CASE name' lines that _measure_main writes."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("### CASE "):
            cur = out.setdefault(line[9:].strip(), {"reads": 0, "writes": 0, "kernels": 0})
            continue
        if cur is None:
            continue
        if line.startswith("Instructions executed for kernel"):
            cur["kernels"] += 1
        m = _MEM.match(line)
        if m:
            cur["reads" if m.group(2) == "load" else "writes"] += int(m.group(3))
            continue
        m = _CALL.match(line)
        if m:
            width = int(m.group(4) or 1)
            esize = 2 if (m.group(3) or m.group(6) == "Dh") else 4
            cur["reads" if m.group(2) == "load" else "writes"] += int(m.group(1)) * width * esize
    return out


def _measure_cases() -> list[tuple[str, Any, dict[str, int]]]:
    """(case, thunk running the kernel(s) on an oclgrind CLRuntime, the model's fused cost) at small fp32 shapes."""
    import numpy as np
    import torch
    from edgediff.kernels.runtime import CLRuntime, pick_device

    rt = CLRuntime(pick_device("oclgrind"))
    g = torch.Generator().manual_seed(0)

    def dev(*s: int) -> Any:
        return rt.to_device(torch.randn(*s, generator=g))

    f32 = np.float32
    x, ga, be = dev(1, 32, 8, 8), rt.to_device(torch.ones(32), f32), rt.to_device(torch.zeros(32), f32)
    gn = group_norm_silu(1, 32, 64, 4)
    q, k, v = dev(1, 32, 64), dev(1, 32, 64), dev(1, 32, 64)
    at = attention(1, 2, 16, 64, 64, 4)
    u = dev(1, 64, 64, 1)
    mod = dev(1, 96, 1, 1)
    w1 = rt.to_device(torch.randn(96, 32, 1, 1, generator=g))
    w3 = rt.to_device(torch.randn(32, 32, 3, 3, generator=g))
    n = 32 * 64
    conv1 = {"op": "conv", "name": "p.to_qkv", "weight": "w", "bias": None, "pad": [0, 0, 0, 0], "stride": 1}
    conv3 = {"op": "conv", "name": "c", "weight": "w", "bias": None, "pad": [1, 1, 1, 1], "stride": 1}
    c1 = op_cost(conv1, [(1, 32, 8, 8)], (1, 96, 8, 8), {"w": (96, 32, 1, 1)}, 4)["fused"]
    c3 = op_cost(conv3, [(1, 32, 8, 8)], (1, 32, 8, 8), {"w": (32, 32, 3, 3)}, 4)["fused"]
    ln = {"op": "layer_norm", "gamma": "g", "mod": None}
    return [
        ("group_norm+silu fused", lambda: rt.group_norm(x, ga, be, 8, 1e-5, True), {**gn["fused"], "weights": 256}),
        ("group_norm+silu unfused", lambda: rt.group_norm_unfused(x, ga, be, 8, 1e-5, True),
         {**gn["unfused"], "weights": 256}),
        ("attention flash h2 d16 N64", lambda: rt.flash_attention(q, k, v, 2, 16, 64, 64), at["fused"]),
        ("attention unfused h2 d16 N64", lambda: rt.attention_unfused(q, k, v, 2, 16, 64, 64), at["unfused"]),
        ("layer_norm_channels C32 N64", lambda: rt.layer_norm_channels(x, ga, be, 1e-5),
         op_cost(ln, [(1, 32, 8, 8)], (1, 32, 8, 8), {}, 4)["fused"]),
        ("geglu F32 N64", lambda: rt.geglu(u), _c(2 * n * 4, n * 4, 0, 0, 1)),
        ("gate_residual C32 N64", lambda: rt.gate_residual(x, x, mod, 32), _c(2 * n * 4, n * 4, 0, 0, 1)),
        ("conv 1x1 32->96 8x8 (stacked QKV)", lambda: rt.conv2d(x, w1, None), c1),
        ("conv 3x3 32->32 8x8", lambda: rt.conv2d(x, w3, None, 1, 1), c3),
    ]


def _measure_main() -> None:
    """Child process under OCLGRIND_INST_COUNTS=1 (oclgrind prints each kernel's histogram on stdout):
    each case's kernels between '### CASE' markers, then '### MODELS' and the model's costs as JSON."""
    import ctypes
    import json
    import sys

    libc = ctypes.CDLL(None)  # oclgrind prints through C stdio: flush it with Python's, in order

    def flush() -> None:
        sys.stdout.flush()
        libc.fflush(None)

    cases = _measure_cases()
    flush()
    models = {}
    for name, thunk, model in cases:
        print(f"### CASE {name}", flush=True)
        thunk().get()  # read back: the kernels have run and printed their histograms
        flush()
        models[name] = model
    print("### MODELS " + json.dumps(models), flush=True)


def measure_oclgrind(timeout: int = 600) -> list[dict[str, Any]]:
    """Global bytes that oclgrind counts for each _measure_cases kernel next to the model's bytes
    (compulsory traffic; oclgrind counts every access, with no cache)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OCLGRIND_INST_COUNTS": "1"}
    p = subprocess.run([sys.executable, "-c", "from edgediff.kernels.cost import _measure_main; _measure_main()"],
                       capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"oclgrind measurement failed: {p.stderr[-2000:]}")
    models = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("### MODELS "))[11:])
    got = parse_inst_counts(p.stdout)
    rows = []
    for name, m in models.items():
        meas = got.get(name, {"reads": 0, "writes": 0, "kernels": 0})
        mb = m["reads"] + m["writes"] + m.get("weights", 0)
        ob = meas["reads"] + meas["writes"]
        rows.append({"case": name, "model_bytes": mb, "oclgrind_bytes": ob, "oclgrind_kernels": meas["kernels"],
                     "model_launches": m["launches"], "oclgrind_over_model": round(ob / mb, 2) if mb else None})
    return rows
