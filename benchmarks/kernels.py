"""OpenCL kernels and the whole-UNet OpenCL runtime against PyTorch CPU and onnxruntime CPU.

    python benchmarks/kernels.py [--quick] [--models demo,cifar] [--repeat 5] [--out bench-out/kernels.json]

Part 1, per kernel, same shapes, same run: median time of the OpenCL kernel (first OpenCL device:
PoCL on the CPU here) and of the PyTorch CPU op, effective GFLOP/s (convs, attention) or GB/s
(memory-bound ops) and the ratio torch_ms / opencl_ms (> 1: OpenCL faster). Fused vs unfused:
GroupNorm+SiLU (one kernel vs statistics + normalise + SiLU kernels) and attention (FlashAttention
vs Q^T K -> softmax -> V P^T with the score matrix materialised), with the bytes each moves
(counted from what the kernels read and write, not measured) and their times. int8 conv is
compared with onnxruntime's QLinearConv on the same integers.

Part 2, end to end, batch 1: one denoiser call through the OpenCL bundle (fp32 and fp16) vs the
ONNX export (exporters/onnx.py) in onnxruntime CPU, and PyTorch eager for reference; max abs
error of each vs PyTorch. Models: `demo` (bundled, trained) and `cifar` (diffusers UNet2DModel with
the google/ddpm-cifar10-32 config, 35.7M params, RANDOMLY INITIALISED: speed only).

Times are wall-clock best-of-N after a warm-up, with the queue drained (finish) inside the timing.
PoCL (POCL_MAX_PTHREAD_COUNT), onnxruntime (intra-op threads) and PyTorch all use --threads
threads (default 1: the machine this was written on is shared, and spinning thread pools
there measure the neighbours more than the kernels).
"""

# ruff: noqa: B023  (every timing lambda is called inside the iteration that defines it)
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# google/ddpm-cifar10-32's UNet2DModel config (same as benchmarks/export_edge.py)
CIFAR_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)


def median_ms(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] | None = None) -> float:
    """Best-of-`repeat` wall time in ms (after one warm-up call). The minimum, not the median: on a
    shared machine the spread comes from other processes, and the minimum is the op's own cost."""
    fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def pair_ms(a: Callable[[], Any], b: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Best-of-`repeat` ms of a and of b, measured interleaved (a, b, a, b, ...) after a warm-up of
    each, so that load from other processes hits both alike and their ratio stays meaningful."""
    ta, tb = [], []
    a(), sync(), b(), sync()
    for _ in range(repeat):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
    return min(ta), min(tb)


def transformer_rows(rt: Any, repeat: int, add: Callable[..., None]) -> None:
    """The conditional denoisers' kernels at SD-1.x-like token shapes scaled down (320 channels, 16x16
    latents, head_dim 40, 77 context tokens), OpenCL and PyTorch interleaved."""
    g = torch.Generator().manual_seed(1)
    C, n, m, heads = 320, 256, 77, 8
    d = C // heads
    x = torch.randn(1, C, 16, 16, generator=g)
    gm, bt = torch.randn(C, generator=g), torch.randn(C, generator=g)
    dx, dg, dbt = rt.to_device(x), rt.to_device(gm, np.float32), rt.to_device(bt, np.float32)
    xt = x.flatten(2).transpose(1, 2).contiguous()
    cl, tt = pair_ms(lambda: rt.layer_norm_channels(dx, dg, dbt, 1e-5),
                     lambda: F.layer_norm(xt, (C,), gm, bt, 1e-5), repeat, lambda: rt.finish())
    add("layer_norm over channels", f"1x{C}x16x16", cl, tt, nbytes=3 * x.numel() * 4, note="interleaved")
    u = torch.randn(1, 2 * 4 * C, 16, 16, generator=g)
    du = rt.to_device(u)
    ut = u.flatten(2).transpose(1, 2).contiguous()

    def tgeglu() -> Any:
        a, b = ut.chunk(2, -1)
        return a * F.gelu(b)

    cl, tt = pair_ms(lambda: rt.geglu(du), tgeglu, repeat, lambda: rt.finish())
    add("geglu", f"1x{8 * C}x16x16 -> {4 * C}", cl, tt, nbytes=1.5 * u.numel() * 4, note="interleaved")
    q, kv = torch.randn(1, C, n, generator=g), torch.randn(1, 2 * C, m, generator=g)
    dq, dkv = rt.to_device(q), rt.to_device(kv)
    qh = q.reshape(1, heads, d, n).transpose(-1, -2).contiguous()
    kh = kv[:, :C].reshape(1, heads, d, m).transpose(-1, -2).contiguous()
    vh = kv[:, C:].reshape(1, heads, d, m).transpose(-1, -2).contiguous()
    cl, tt = pair_ms(lambda: rt.flash_attention(dq, dkv, dkv, heads, d, n, m, 0, 0, C * m, q_bstride=C * n,
                                                kv_bstride=2 * C * m),
                     lambda: F.scaled_dot_product_attention(qh, kh, vh), repeat, lambda: rt.finish())
    add("cross-attention flash", f"h{heads} d{d} N{n} M{m}", cl, tt, 4.0 * heads * n * m * d, note="interleaved")


def kernel_rows(rt: Any, repeat: int, quick: bool) -> list[dict[str, Any]]:
    from edgediff.kernels.runtime import winograd_weights

    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g)

    def add(name: str, shape: str, cl_ms: float, torch_ms: float | None, flops: float = 0.0, nbytes: float = 0.0,
            **extra: Any) -> None:
        r: dict[str, Any] = {"kernel": name, "shape": shape, "opencl_ms": round(cl_ms, 3)}
        if torch_ms is not None:
            r["torch_ms"] = round(torch_ms, 3)
            r["ratio_torch_over_opencl"] = round(torch_ms / cl_ms, 3)
        if flops:
            r["opencl_gflops"] = round(flops / cl_ms / 1e6, 2)
            if torch_ms:
                r["torch_gflops"] = round(flops / torch_ms / 1e6, 2)
        if nbytes:
            r["bytes_moved"] = int(nbytes)
            r["opencl_gbps"] = round(nbytes / cl_ms / 1e6, 2)
        r.update(extra)
        rows.append(r)
        print(f"  {name:28s} {shape:28s} opencl {cl_ms:9.3f} ms" + (f"  torch {torch_ms:9.3f} ms" if torch_ms else ""),
              file=sys.stderr)

    sync = rt.finish
    # --- convolutions (demo and cifar-like layers)
    convs = [(2, 64, 64, 16, 3, 1), (2, 128, 128, 32, 3, 1), (2, 256, 768, 16, 1, 1), (2, 64, 64, 16, 3, 2)]
    if quick:
        convs = convs[:1] + convs[2:3]
    for B, ci, co, hw, k, s in convs:
        x, w, b = rnd(B, ci, hw, hw), rnd(co, ci, k, k), rnd(co)
        dx, dw, db = rt.to_device(x), rt.to_device(w), rt.to_device(b, np.float32)
        ho = (hw + 2 * (k // 2) - k) // s + 1
        flops = 2.0 * B * co * ci * k * k * ho * ho
        tt = median_ms(lambda: F.conv2d(x, w, b, stride=s, padding=k // 2), repeat)
        shape = f"{B}x{ci}x{hw}x{hw} -> {co}, k{k} s{s}"
        add("conv2d implicit-GEMM", shape, median_ms(lambda: rt.conv2d(dx, dw, db, s, k // 2), repeat, sync), tt, flops)
        if k == 3 and s == 1:
            u = rt.to_device(winograd_weights(w.numpy()))
            add("conv2d Winograd F(2x2,3x3)", shape, median_ms(lambda: rt.conv2d_winograd(dx, u, db), repeat, sync), tt,
                flops, note="flops counted as direct conv (effective)")
    # --- GroupNorm + SiLU, fused vs unfused
    for B, C, hw, G in ([(2, 256, 16, 32)] if quick else [(2, 128, 32, 32), (2, 256, 16, 32)]):
        x = rnd(B, C, hw, hw)
        gm, bt = rnd(C), rnd(C)
        dx, dg, dbt = rt.to_device(x), rt.to_device(gm, np.float32), rt.to_device(bt, np.float32)
        size = x.numel() * np.dtype(rt.dtype).itemsize
        tt = median_ms(lambda: F.silu(F.group_norm(x, G, gm, bt, 1e-5)), repeat)
        shape = f"{B}x{C}x{hw}x{hw} g{G}"
        fused, unfused = pair_ms(lambda: rt.group_norm(dx, dg, dbt, G, 1e-5, True),
                                 lambda: rt.group_norm_unfused(dx, dg, dbt, G, 1e-5, True), repeat, sync)
        # fused: statistics read + normalise read + write; unfused: 2 statistics reads, normalise R+W, SiLU R+W
        add("group_norm+silu fused", shape, fused, tt, nbytes=3 * size, launches=1)
        add("group_norm+silu unfused", shape, unfused, tt, nbytes=6 * size, launches=3,
            fused_speedup=round(unfused / fused, 3))
    # --- softmax
    x = rnd(1024, 256)
    dx = rt.to_device(x)
    add("softmax (online, 1 launch)", "1024x256", median_ms(lambda: rt.softmax(dx), repeat, sync),
        median_ms(lambda: torch.softmax(x, -1), repeat), nbytes=3 * x.numel() * 4)
    # --- attention: flash vs unfused vs torch SDPA
    for B, heads, d, n in ([(1, 1, 256, 256)] if quick else [(1, 2, 32, 64), (1, 1, 256, 256)]):
        C = heads * d
        q, k, v = rnd(B, C, n), rnd(B, C, n), rnd(B, C, n)
        dq, dk, dv = rt.to_device(q), rt.to_device(k), rt.to_device(v)
        qh, kh, vh = (a.reshape(B, heads, d, n).transpose(-1, -2).contiguous() for a in (q, k, v))
        tt = median_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh), repeat)
        flops = 4.0 * B * heads * n * n * d
        bq, _ = rt.attention_tiles(d)
        bq = min(bq, 1 << (n.bit_length() - 1))
        e = 4
        # flash: Q read once, K and V re-read by each of ceil(N/BQ) query tiles, O written once
        fb = e * B * heads * (n * d + -(-n // bq) * 2 * n * d + n * d)
        # unfused: Q, K read; S (N x N) written; softmax reads S, writes P; P and V read; O written
        ub = e * B * heads * (2 * n * d + n * n + 2 * n * n + n * n + n * d + n * d)
        shape = f"B{B} h{heads} d{d} N{n}"
        fl, un = pair_ms(lambda: rt.flash_attention(dq, dk, dv, heads, d, n, n),
                         lambda: rt.attention_unfused(dq, dk, dv, heads, d, n, n), repeat, sync)
        add("attention flash (tiled)", shape, fl, tt, flops, fb, score_matrix_bytes=0)
        add("attention unfused", shape, un, tt, flops, ub, score_matrix_bytes=e * B * heads * n * n,
            fused_speedup=round(un / fl, 3))
    # --- elementwise and resampling
    x, y = rnd(2, 256, 32, 32), rnd(2, 256, 32, 32)
    dx, dy = rt.to_device(x), rt.to_device(y)
    nb = x.numel() * 4
    add("silu", "2x256x32x32", median_ms(lambda: rt.silu(dx), repeat, sync), median_ms(lambda: F.silu(x), repeat),
        nbytes=2 * nb)
    add("gelu (erf)", "2x256x32x32", median_ms(lambda: rt.gelu(dx), repeat, sync), median_ms(lambda: F.gelu(x), repeat),
        nbytes=2 * nb)
    add("add", "2x256x32x32", median_ms(lambda: rt.add(dx, dy), repeat, sync), median_ms(lambda: x + y, repeat),
        nbytes=3 * nb)
    add("concat (channels)", "2x(256+256)x32x32", median_ms(lambda: rt.concat(dx, dy), repeat, sync),
        median_ms(lambda: torch.cat([x, y], 1), repeat), nbytes=4 * nb)
    xs = rnd(2, 256, 16, 16)
    dxs = rt.to_device(xs)
    add("upsample nearest 2x", "2x256x16x16", median_ms(lambda: rt.upsample2x(dxs), repeat, sync),
        median_ms(lambda: F.interpolate(xs, scale_factor=2.0, mode="nearest"), repeat), nbytes=5 * xs.numel() * 4)
    transformer_rows(rt, repeat, add)
    # --- int8 conv vs onnxruntime QLinearConv (same integers; 7-bit weights, see the tests)
    try:
        rows.append(int8_row(rt, repeat))
    except ImportError as e:
        print(f"  int8 row skipped: {e}", file=sys.stderr)
    return rows


def int8_row(rt: Any, repeat: int) -> dict[str, Any]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(1)
    B, ci, co, hw = 2, 64, 64, 16
    xq = torch.randint(0, 256, (B, ci, hw, hw), generator=g).numpy().astype(np.uint8)
    wq = torch.randint(-64, 64, (co, ci, 3, 3), generator=g).numpy().astype(np.int8)
    bias = torch.randint(-5000, 5000, (co,), generator=g).numpy().astype(np.int32)
    s_w = (torch.rand(co, generator=g).numpy() * 0.01 + 0.002).astype(np.float32)
    s_x, zp_x, s_y, zp_y = np.float32(0.03), 131, np.float32(0.07), 118
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.array(s_x), "sx"), (np.array(zp_x, np.uint8), "zx"), (wq, "w"), (s_w, "sw"), (np.zeros(co, np.int8), "zw"),
        (np.array(s_y), "sy"), (np.array(zp_y, np.uint8), "zy"), (bias, "b")]]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(xq.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                                  ir_version=8).SerializeToString(), so, providers=["CPUExecutionProvider"])
    mult = (s_x * s_w / s_y).astype(np.float32)
    dx, dw = rt.to_device(xq, np.uint8), rt.to_device(wq, np.int8)
    db, dm = rt.to_device(bias, np.int32), rt.to_device(mult, np.float32)
    run_cl = lambda: rt.conv2d_int8(dx, dw, db, dm, zp_x, zp_y, pad=1)  # noqa: E731
    same = bool(np.array_equal(run_cl().get(), sess.run(None, {"x": xq})[0]))
    cl_ms = median_ms(run_cl, repeat, rt.finish)
    ort_ms = median_ms(lambda: sess.run(None, {"x": xq}), repeat)
    flops = 2.0 * B * co * ci * 9 * hw * hw
    print(f"  {'conv2d int8 (vs ORT QLinearConv)':28s} opencl {cl_ms:9.3f} ms  ort {ort_ms:9.3f} ms  bit-exact {same}",
          file=sys.stderr)
    return {"kernel": "conv2d int8 -> requant", "shape": f"{B}x{ci}x{hw}x{hw} -> {co}, k3", "opencl_ms": round(cl_ms, 3),
            "ort_qlinearconv_ms": round(ort_ms, 3), "ratio_ort_over_opencl": round(ort_ms / cl_ms, 3),
            "opencl_gops": round(flops / cl_ms / 1e6, 2), "bit_exact_vs_ort": same}


def load_bench_model(name: str) -> tuple[Any, str]:
    if name == "demo":
        from edgediff.loaders import load_model

        return load_model("demo"), "bundled demo model (trained)"
    if name == "cifar":
        from diffusers import UNet2DModel

        from edgediff.model import DiffusionModel, InputSignature
        from edgediff.schedule import NoiseSchedule

        torch.manual_seed(0)
        m = UNet2DModel(**CIFAR_CONFIG).eval()
        return (DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel",
                               dict(m.config), {"source": "cifar config, random init"}),
                "google/ddpm-cifar10-32 config, RANDOM INIT (speed only)")
    raise SystemExit(f"unknown model {name!r}; expected demo or cifar")


def e2e_rows(name: str, repeat: int, folder: Path) -> list[dict[str, Any]]:
    from edgediff.exporters import get_backend

    from edgediff.metrics import macs as count_macs
    from edgediff.sampling import TorchDenoiser

    model, note = load_bench_model(name)
    inp = model.example_inputs(1, seed=0)
    x, t = inp["sample"], inp["timestep"]
    ref = TorchDenoiser(model)
    want = ref(x, t)
    try:
        gmacs = count_macs(model) / 1e9
    except Exception:  # noqa: BLE001 - the MAC count is informative only
        gmacs = float("nan")
    rows: list[dict[str, Any]] = []

    def row(runtime: str, den: Any, size: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        got = den(x, t)
        err = float((got - want).abs().max())
        ms = median_ms(lambda: den(x, t), repeat)
        r = {"model": name, "model_note": note, "runtime": runtime, "batch": 1, "ms_per_call": round(ms, 2),
             "gmacs_per_call": round(gmacs, 3), "max_abs_err_vs_torch": err, "size_bytes": size, **(extra or {})}
        print(f"  {name:6s} {runtime:34s} {ms:10.2f} ms/call  max|err| {err:.2e}", file=sys.stderr)
        rows.append(r)
        return r

    row("pytorch eager (cpu)", ref, None, {"torch_threads": torch.get_num_threads()})
    onnx = get_backend("onnx")
    rep = onnx.export(model, folder / f"{name}.onnx", "fp32")
    from edgediff.exporters.onnx import OnnxDenoiser

    ort_row = row("onnxruntime cpu fp32", OnnxDenoiser(folder / f"{name}.onnx", threads=torch.get_num_threads()),
                  rep.get("size_bytes"), {"ort_threads": torch.get_num_threads()})
    ocl = get_backend("opencl")
    for prec in ("fp32", "fp16"):
        rep = ocl.export(model, folder / f"{name}-{prec}", prec)
        den = ocl.load_denoiser(folder / f"{name}-{prec}")
        r = row(f"opencl {prec} ({den.rt.describe()['device']})", den, rep["size_bytes"],
                {"opencl": den.rt.describe()})
        r["ratio_ort_ms_over_opencl_ms"] = round(ort_row["ms_per_call"] / r["ms_per_call"], 4)
    return rows


def bytes_model_rows(demo_bundle: Path | None = None) -> list[dict[str, Any]]:
    """Bytes moved per kernel kind, fused vs unfused (edgediff.kernels.cost, fp16 storage, batch 1,
    computed, not run): the demo bundle's schedule (if given) and one SD-1.x UNet level per
    resolution (320/640/1280 channels at 64/32/16 latents, 8 heads: head_dim 40/80/160, 77 tokens)."""
    from edgediff.kernels import cost

    rows = []
    if demo_bundle is not None:
        for a in cost.summarize(cost.bundle_costs(demo_bundle)):
            rows.append({"model": "demo", "kernel": a["op"], "count": a["count"], "shape": "whole UNet",
                         **{k: a[k] for k in ("fused_bytes", "unfused_bytes", "ratio", "fused_launches",
                                              "unfused_launches", "macs")}})
    for C, hw in ((320, 64), (640, 32), (1280, 16)):
        lv = cost.sd15_level_costs(C, hw)
        for a in cost.summarize(lv):
            rows.append({"model": f"sd15 level d{C // 8}", "kernel": a["op"], "count": a["count"],
                         "shape": f"1x{C}x{hw}x{hw}",
                         **{k: a[k] for k in ("fused_bytes", "unfused_bytes", "ratio", "fused_launches",
                                              "unfused_launches", "macs")}})
    return rows


def demo_bundle(folder: Path) -> Path | None:
    """The bundled demo model as an fp16 OpenCL bundle (None when its weights are not there)."""
    from edgediff.exporters import get_backend

    from edgediff.loaders import load_model

    try:
        demo = load_model("demo")
    except Exception:  # noqa: BLE001 - a checkout without the trained demo weights
        return None
    out = folder / "demo-fp16"
    if not out.exists():
        get_backend("opencl").export(demo, out, "fp16")
    return out


def print_bytes(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':18s} {'kernel':18s} {'n':>3s} {'shape':14s} {'fused MB':>10s} {'unfused MB':>10s} {'x':>6s} "
          f"{'launches':>9s}", file=sys.stderr)
    for r in rows:
        print(f"{r['model']:18s} {r['kernel']:18s} {r['count']:3d} {r['shape']:14s} {r['fused_bytes'] / 1e6:10.2f} "
              f"{r['unfused_bytes'] / 1e6:10.2f} {r['ratio'] or 0:6.2f} {r['fused_launches']:4d}/{r['unfused_launches']:<4d}",
              file=sys.stderr)


def int8_layout_rows(artifact: Path, repeat: int) -> dict[str, Any]:
    """A quantized artifact's int8 bundle schedule (int8 kept between integer layers) against the
    same integer layers with float activations between every op: bytes per op kind (cost model,
    batch 1), launches, ms per call measured interleaved on the OpenCL device, and each layout's
    max abs difference from the artifact's PyTorch simulation for one call."""
    from collections import defaultdict

    from edgediff.kernels.cost import schedule_costs, total
    from edgediff.kernels.graph import Executor, build_schedule
    from edgediff.kernels.runtime import CLRuntime

    from edgediff.loaders import load_model
    from edgediff.quant_params import QuantParams
    from edgediff.sampling import TorchDenoiser

    q = load_model(artifact)
    qp = QuantParams.of(q)
    if qp is None:
        raise SystemExit(f"{artifact}: not a quantized artifact (no QuantParams)")
    rt = CLRuntime()
    x = torch.randn(1, *q.signature.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    cond = q.signature.conditioning(1, seed=0)
    want = TorchDenoiser(q)(x, t, cond)
    out: dict[str, Any] = {"artifact": str(artifact), "layouts": {}}
    runs = {}
    for tag, keep in (("int8_between", True), ("float_between", False)):
        sched, w = build_schedule(q, qp, keep_int8=keep)
        rows = schedule_costs(sched, {k: tuple(v.shape) for k, v in w.items()}, "int8")
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            per[r["op"]][0] += 1
            per[r["op"]][1] += total(r["fused"])
        ex = Executor(sched, w, rt)
        runs[tag] = ex
        out["layouts"][tag] = {"ops": len(rows), "activation_bytes": sum(total(r["fused"]) for r in rows),
                               "weight_bytes": sum(r["fused"]["weights"] for r in rows),
                               "per_op": {k: {"ops": v[0], "bytes": v[1]} for k, v in sorted(per.items())},
                               "max_abs_err_vs_simulation": float((ex.run(x, t, cond=cond) - want).abs().max())}
    a, b = pair_ms(lambda: runs["int8_between"].run(x, t, cond=cond), lambda: runs["float_between"].run(x, t, cond=cond),
                   repeat, rt.finish)
    out["layouts"]["int8_between"]["ms_per_call"], out["layouts"]["float_between"]["ms_per_call"] = a, b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer kernel shapes, demo model only")
    ap.add_argument("--models", default=None, help="comma-separated: demo, cifar (default demo,cifar; --quick: demo)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repetitions per kernel (best of); e2e uses min(3, this)")
    ap.add_argument("--threads", type=int, default=1, help="threads for PoCL, onnxruntime and PyTorch alike")
    ap.add_argument("--out", type=Path, default=Path("bench-out/kernels.json"))
    ap.add_argument("--bytes-only", action="store_true", help="print the bytes-moved model (fused vs unfused) and exit")
    ap.add_argument("--oclgrind", action="store_true", help="with the bytes model, oclgrind's counted global bytes "
                    "of a few kernels next to the model's (needs oclgrind)")
    ap.add_argument("--int8", type=Path, default=None, metavar="ARTIFACT",
                    help="int8 kept between layers vs float between, for this quantized artifact, and exit")
    args = ap.parse_args()
    if args.int8 is not None:
        res = int8_layout_rows(args.int8, args.repeat)
        for tag, r in res["layouts"].items():
            print(f"{tag:14s} {r['ops']:4d} ops  {r['activation_bytes'] / 1e6:7.3f} MB activations  "
                  f"{r['ms_per_call']:8.1f} ms/call  max|err| vs simulation {r['max_abs_err_vs_simulation']:.2e}",
                  file=sys.stderr)
        print(json.dumps(res, indent=1))
        return
    if args.bytes_only or args.oclgrind:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bytes_model_rows(demo_bundle(Path(tmp)))
        out: dict[str, Any] = {"bytes_model": rows}
        print_bytes(rows)
        if args.oclgrind:
            from edgediff.kernels.cost import measure_oclgrind

            out["oclgrind_counts"] = measure_oclgrind()
            for r in out["oclgrind_counts"]:
                print(f"{r['case']:36s} model {r['model_bytes']:8d} B  oclgrind {r['oclgrind_bytes']:8d} B  "
                      f"x{r['oclgrind_over_model']}  kernels {r['oclgrind_kernels']}", file=sys.stderr)
        print(json.dumps(out, indent=1))
        return
    torch.set_num_threads(args.threads)
    import os

    # PoCL reads this when the platform is first opened, i.e. before any pyopencl call below
    os.environ.setdefault("POCL_MAX_PTHREAD_COUNT", str(args.threads))
    from edgediff.kernels.runtime import CLRuntime, opencl_available

    ok, why = opencl_available()
    if not ok:
        raise SystemExit(f"no OpenCL device: {why}")
    rt = CLRuntime()
    print(f"OpenCL device: {rt.describe()}", file=sys.stderr)
    t0 = time.time()
    print("per kernel:", file=sys.stderr)
    krows = kernel_rows(rt, args.repeat, args.quick)
    models = (args.models or ("demo" if args.quick else "demo,cifar")).split(",")
    erows: list[dict[str, Any]] = []
    print("end to end (batch 1):", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            erows += e2e_rows(m.strip(), max(1, min(3, args.repeat)), Path(tmp))
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "threads": args.threads,
                          "pocl_max_pthread_count": os.environ.get("POCL_MAX_PTHREAD_COUNT"),
                          "gpu": "none lent to this task; OpenCL ran on PoCL (CPU)"},
              "opencl": rt.describe(), "kernels": krows, "end_to_end": erows, "bytes_model": bytes_model_rows(),
              "seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    # the table
    print(f"\n{'kernel':30s} {'shape':30s} {'opencl ms':>10s} {'torch ms':>10s} {'torch/ocl':>9s} {'GFLOP/s':>8s} {'GB/s':>7s}")
    for r in krows:
        print(f"{r['kernel']:30s} {r['shape']:30s} {r['opencl_ms']:10.3f} "
              f"{r.get('torch_ms', r.get('ort_qlinearconv_ms', float('nan'))):10.3f} "
              f"{r.get('ratio_torch_over_opencl', r.get('ratio_ort_over_opencl', float('nan'))):9.3f} "
              f"{r.get('opencl_gflops', r.get('opencl_gops', 0)):8.2f} {r.get('opencl_gbps', 0):7.2f}")
    print(f"\n{'model':6s} {'runtime':44s} {'ms/call':>10s} {'max|err|':>9s} {'ort/this':>8s}")
    for r in erows:
        print(f"{r['model']:6s} {r['runtime'][:44]:44s} {r['ms_per_call']:10.2f} {r['max_abs_err_vs_torch']:9.2e} "
              f"{r.get('ratio_ort_ms_over_opencl_ms', float('nan')):8.3f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
