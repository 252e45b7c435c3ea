"""Every kernel variant at small shapes against its PyTorch reference, on one OpenCL device.

    python -m edgediff.kernels.simcheck [--device oclgrind] [--profiles device,adreno-740,mali-g710]
                                        [--precisions fp32,fp16] [--json]

What CI runs under oclgrind (a device simulator that reports out-of-bounds accesses, data races
and barrier divergence: set OCLGRIND_DATA_RACES=1, OCLGRIND_CHECK_API=1, OCLGRIND_LOG=FILE) and
on PoCL. Each device profile (edgediff.kernels.device) selects a different set of variants on the
same device: local tiles or not, head_dim-tiled attention, the packed int8 dot-product conv,
GroupNorm split across work-groups. fp16 runs with half arithmetic where the device reports
cl_khr_fp16, else as half storage, and is compared with fp16 tolerances. `compile_half` builds
every program with half arithmetic on a device whose compiler accepts `half` even when it does
not run it (oclgrind 21.10 compiles half but cannot execute half arithmetic).
Exit status: 0 all cases within tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from edgediff.kernels import reference as ref

Case = tuple[str, Any, torch.Tensor, float]  # (name, device result, reference, tolerance in units of max|ref|)


def _t(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _cases(rt: Any) -> Iterator[Case]:
    from edgediff.kernels.runtime import weight_sums, winograd_weights

    f32 = np.float32
    tol = 2e-2 if rt.half else 2e-5
    a, b = _t(2, 3, 5, 7, seed=1, scale=3), _t(2, 3, 5, 7, seed=2)  # 210 elements: a VEC tail of 2
    da, db = rt.to_device(a), rt.to_device(b)
    yield "silu", rt.silu(da), torch.nn.functional.silu(a), tol
    yield "gelu", rt.gelu(da), torch.nn.functional.gelu(a), tol
    yield "add", rt.add(da, db, 0.5), (a + b) * 0.5, tol
    yield "affine", rt.affine(da, 2.0, -1.0), 2 * a - 1, tol
    c = _t(2, 4, 5, 7, seed=3)
    yield "concat", rt.concat(da, rt.to_device(c)), torch.cat([a, c], 1), tol
    yield "upsample2x", rt.upsample2x(da), torch.nn.functional.interpolate(a, scale_factor=2.0), tol
    t = torch.tensor([0.0, 3.0, 999.0])
    fr = ref.timestep_freqs(17, 1.0)
    yield ("timestep_embedding", rt.timestep_embedding(rt.to_device(t, f32), rt.to_device(fr, f32), 17, True),
           ref.timestep_embedding(t, 17, True, 1.0).reshape(3, 17, 1, 1), tol)
    x = _t(2, 8, 9, 7, seed=4, scale=2) + 3.0
    g, be = _t(8, seed=5), _t(8, seed=6)
    dg, dbe = rt.to_device(g, f32), rt.to_device(be, f32)
    want = ref.group_norm(x, g, be, 4, 1e-5, True)
    yield "group_norm", rt.group_norm(rt.to_device(x), dg, dbe, 4, 1e-5, True), want, tol
    yield "group_norm_split", rt.group_norm_split(rt.to_device(x), dg, dbe, 4, 1e-5, True, 3), want, tol
    yield "group_norm_unfused", rt.group_norm_unfused(rt.to_device(x), dg, dbe, 4, 1e-5, True), want, tol
    s = _t(5, 37, seed=7, scale=3)
    yield "softmax", rt.softmax(rt.to_device(s)), ref.softmax(s), tol
    for heads, d, n, m, dc in ((2, 8, 9, 13, None), (1, 12, 7, 19, 5), (2, 16, 11, 11, 8)):
        C = heads * d
        q, k, v = _t(1, C, n, seed=8), _t(1, C, m, seed=9), _t(1, C, m, seed=10)
        want = ref.attention(q, k, v, heads)
        tag = f"h{heads}d{d}" + (f"/dc{dc}" if dc else "")
        yield (f"flash_attention {tag}", rt.flash_attention(rt.to_device(q), rt.to_device(k), rt.to_device(v), heads, d,
                                                            n, m, d_chunk=dc), want, tol)
        if n == m:
            dq = rt.to_device(torch.cat([q, k, v], 1))
            yield (f"flash_attention fused-qkv {tag}", rt.flash_attention(dq, dq, dq, heads, d, n, m, 0, C * n, 2 * C * n,
                                                                          d_chunk=dc), want, tol)
        yield (f"attention_unfused {tag}", rt.attention_unfused(rt.to_device(q), rt.to_device(k), rt.to_device(v), heads,
                                                                d, n, m), want, tol)
    for ci, co, h, w, kk, stride, pad in ((3, 5, 7, 9, 3, 1, 1), (4, 6, 9, 8, 3, 2, 1), (9, 3, 5, 5, 1, 1, 0),
                                          (2, 4, 6, 6, 3, 2, (0, 0, 1, 1))):
        x, wt, bb = _t(2, ci, h, w, seed=11), _t(co, ci, kk, kk, seed=12), _t(co, seed=13)
        yield (f"conv2d {ci}->{co} k{kk} s{stride}", rt.conv2d(rt.to_device(x), rt.to_device(wt), rt.to_device(bb, f32),
                                                               stride, pad), ref.conv2d(x, wt, bb, stride, pad), tol)
    x, wt, bb = _t(2, 5, 5, 7, seed=14), _t(7, 5, 3, 3, seed=15), _t(7, seed=16)
    temb, res = _t(2, 7, seed=17), _t(2, 7, 5, 7, seed=18)
    want = ref.conv2d(x, wt, bb, 1, 1, chan_add=temb, res=res, out_scale=0.5)
    args = (rt.to_device(bb, f32), rt.to_device(temb), rt.to_device(res), 0.5)
    yield "conv2d epilogue", rt.conv2d(rt.to_device(x), rt.to_device(wt), args[0], 1, 1, *args[1:]), want, tol
    u = rt.to_device(winograd_weights(wt.numpy()))
    yield "conv2d_winograd", rt.conv2d_winograd(rt.to_device(x), u, *args), want, 2 * tol
    # transformer-block ops of conditional denoisers (channels-first tokens (B, C, N))
    import torch.nn.functional as F

    x = _t(2, 6, 5, 3, seed=30, scale=2) + 1.0
    g, be = _t(6, seed=31), _t(6, seed=32)
    mod = _t(2, 18, 1, 1, seed=33, scale=0.5)
    ln = F.layer_norm(x.permute(0, 2, 3, 1), (6,), g, be, 1e-5).permute(0, 3, 1, 2)
    yield "layer_norm_channels affine", rt.layer_norm_channels(rt.to_device(x), rt.to_device(g, f32),
                                                               rt.to_device(be, f32), 1e-5), ln, tol
    plain = F.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    want = plain * (1 + mod[:, 12:18]) + mod[:, 6:12]
    yield ("layer_norm_channels adaLN", rt.layer_norm_channels(rt.to_device(x), None, None, 1e-6, rt.to_device(mod), 12,
                                                               6), want, tol)
    u = _t(2, 10, 7, 1, seed=34, scale=2)
    yield "geglu", rt.geglu(rt.to_device(u)), u[:, :5] * F.gelu(u[:, 5:]), tol
    yield "gelu_tanh", rt.gelu_tanh(rt.to_device(a)), F.gelu(a, approximate="tanh"), tol
    r = _t(2, 6, 5, 3, seed=35)
    yield ("gate_residual", rt.gate_residual(rt.to_device(x), rt.to_device(r), rt.to_device(mod), 6),
           r + mod[:, 6:12] * x, tol)
    pe = _t(6, 5, 3, seed=36)
    yield "add_broadcast", rt.add_broadcast(rt.to_device(x), rt.to_device(pe)), x + pe, tol
    table = _t(11, 7, seed=37)
    lab = torch.tensor([3, 10, 0])
    yield ("embedding_rows", rt.embedding_rows(rt.to_device(lab.numpy(), np.int32), rt.to_device(table)),
           table[lab].reshape(3, 7, 1, 1), tol)
    pt, co, hh, ww = 2, 3, 3, 2
    xp = _t(2, pt * pt * co, hh, ww, seed=38)
    want = torch.einsum("nhwpqc->nchpwq", xp.permute(0, 2, 3, 1).reshape(2, hh, ww, pt, pt, co)).reshape(
        2, co, hh * pt, ww * pt)
    yield "unpatchify", rt.unpatchify(rt.to_device(xp), pt, co), want, tol
    # cross-attention: K and V one stacked projection of a context of another length (M = 7)
    for heads, d, dc in ((2, 8, None), (1, 12, 5)):
        C, n, m = heads * d, 10, 7
        q, kv = _t(2, C, n, seed=39), _t(2, 2 * C, m, seed=40)
        want = ref.attention(q, kv[:, :C], kv[:, C:], heads)
        dkv = rt.to_device(kv)
        yield (f"cross_attention h{heads}d{d}" + (f"/dc{dc}" if dc else ""),
               rt.flash_attention(rt.to_device(q), dkv, dkv, heads, d, n, m, 0, 0, C * m, q_bstride=C * n,
                                  kv_bstride=2 * C * m, d_chunk=dc), want, tol)
    if rt.half:
        return  # the integer kernels take float32 inputs in every bundle
    # int8: exact integer results (tolerance 0) for the requantizing conv, float rounding for the rest
    xs = _t(2, 5, 6, 7, seed=19, scale=2)
    for signed, zx in ((True, 3), (False, 128)):
        qmin, qmax = (-128, 127) if signed else (0, 255)
        xq = ref.quantize(xs, 0.021, zx, qmin, qmax)
        dq = rt.quantize(rt.to_device(xs, f32), 0.021, zx, signed)
        yield f"quantize {'s8' if signed else 'u8'}", dq, xq.float(), 0.0
        wq = torch.randint(-127, 128, (4, 5, 3, 3), generator=torch.Generator().manual_seed(20), dtype=torch.int32)
        bias = torch.randint(-3000, 3000, (4,), generator=torch.Generator().manual_seed(22), dtype=torch.int32)
        mult = torch.full((4,), 0.021 * 0.004 / 0.05, dtype=torch.float32)
        got = rt.conv2d_int8(dq, rt.to_device(wq, np.int8), rt.to_device(bias, np.int32), rt.to_device(mult, f32), zx, -2,
                             stride=2, pad=1)
        yield (f"conv2d_int8 {'s8' if signed else 'u8'}", got,
               ref.conv2d_int8(xq, wq, bias, mult, zx, -2, qmin, qmax, stride=2, pad=1).float(), 0.0)
        yield f"dequantize {'s8' if signed else 'u8'}", rt.dequantize(dq, 0.021, zx), (xq.float() - zx) * 0.021, 1e-6
    x = _t(2, 6, 5, 7, seed=3)
    x[:, 4:] *= 8
    s_w = torch.rand(3, generator=torch.Generator().manual_seed(4)) * 0.02 + 0.005
    wi = torch.randint(-127, 128, (3, 6, 3, 3), generator=torch.Generator().manual_seed(5)).float()
    bias = _t(3, seed=6)
    s1, z1, s2, z2 = 0.02, 5, 0.11, -3

    def fq(t: torch.Tensor, s: float, z: int) -> torch.Tensor:
        return (torch.clamp(torch.round(t / torch.tensor(s)) + z, -128, 127) - z) * torch.tensor(s)

    xd = torch.cat([fq(x[:, :4], s1, z1), fq(x[:, 4:], s2, z2)], 1)
    want = torch.nn.functional.conv2d(xd, wi * s_w[:, None, None, None], bias, padding=1)
    xq = rt.quantize_split(rt.to_device(x, f32), 4, s1, z1, s2, z2)
    wdev = rt.to_device(wi, np.int8)
    ws = rt.to_device(weight_sums(wi.numpy().astype(np.int8), 4), np.int32)
    yield ("conv2d_int8_dq split" + (" (packed dot)" if rt.use_int8_dot else " (tiled)"),
           rt.conv2d_int8_dq(xq, wdev, rt.to_device(s_w, f32), rt.to_device(bias, f32), 4, z1, z2, s1, s2,
                             pad=(1, 1, 1, 1), wsum=ws), want, 1e-5)
    yield ("fake_quant_seg", rt.fake_quant_seg(rt.to_device(x, f32), [(0, s1, z1, -128, 127), (4, s2, z2, -128, 127)]),
           xd, 1e-6)
    yield from _lowered_cases(rt)


def _lowered_cases(rt: Any) -> Iterator[Case]:
    """The kernels of int8 bundles built on edgediff.lowering: integer conv with requantizing
    epilogue (one part stored as int8 directly; two parts + epilogue terms stored float),
    GroupNorm stored quantized, integer attention."""
    from edgediff.kernels.graph import attention_attrs, grid_attrs

    from edgediff.lowering import ActQ, IntPart, LoweredAttention, LoweredLayer, run_attention, run_part

    f32 = np.float32
    gen = torch.Generator().manual_seed(30)
    ux, sx, sy = ActQ(0.02, 131, 8, False), ActQ(0.11, -3, 8, True).as_uint8(), ActQ(0.05, -2, 8, True)
    w = torch.randint(-127, 128, (5, 6, 3, 3), generator=gen).numpy().astype(np.int8)
    ws = (torch.rand(5, generator=gen) * 0.01 + 0.002).numpy().astype(f32)
    bias = torch.randint(-900, 900, (5,), generator=gen).numpy().astype(np.int32)
    geo = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    p1 = IntPart(ux, (0, 4), w[:, :4], ws, 8, bias, sy)
    p2 = IntPart(sx, (4, 6), w[:, 4:], ws, 8, None, ActQ(0.07, 1, 8, True))
    lay1 = LoweredLayer("one", "conv", [IntPart(ux, (0, 6), w, ws, 8, bias, sy)], geo)
    lay2 = LoweredLayer("two", "conv", [p1, p2], geo)
    xq = torch.randint(0, 256, (2, 6, 5, 7), generator=gen).numpy()
    dx, dw = rt.to_device(xq.astype(np.uint8), np.uint8), rt.to_device(w, np.int8)

    def parts(lay: LoweredLayer) -> list[dict[str, Any]]:
        return [{"split": pt.channels[1], "zp": pt.input.zero_point, "acc_scale": rt.to_device(pt.acc_scale, f32),
                 "mult": rt.to_device(pt.multiplier, f32), "out": grid_attrs(pt.output)} for pt in lay.parts]

    want = run_part(lay1, lay1.parts[0], xq)
    got = rt.conv2d_int8_lowered(dx, dw, parts(lay1), rt.to_device(bias, np.int32), 1, (1, 1, 1, 1),
                                 store=grid_attrs(sy), direct=True)
    tag = " (packed dot)" if rt.use_int8_dot else " (tiled)"
    yield "conv2d_int8_lowered direct" + tag, got, torch.from_numpy(want).float(), 0.0
    ca, res = _t(2, 5, 1, 1, seed=31), _t(2, 5, 5, 7, seed=32)
    v = sum(pt.output.dequantize(run_part(lay2, pt, xq[:, pt.channels[0]:pt.channels[1]])) for pt in lay2.parts)
    want2 = (torch.from_numpy(v) + ca + res) * 0.5
    got = rt.conv2d_int8_lowered(dx, dw, parts(lay2), rt.to_device(bias, np.int32), 1, (1, 1, 1, 1),
                                 rt.to_device(ca, f32), rt.to_device(res, f32), 0.5)
    yield "conv2d_int8_lowered split + epilogue", got, want2, 1e-6
    x = _t(2, 8, 9, 7, seed=33, scale=2) + 3.0
    g, be = _t(8, seed=34), _t(8, seed=35)
    gq = ActQ(0.013, 20, 8, False)
    want3 = torch.from_numpy(gq.quantize(ref.group_norm(x, g, be, 4, 1e-5, True).numpy())).float()
    got = rt.group_norm_q(rt.to_device(x, f32), rt.to_device(g, f32), rt.to_device(be, f32), 4, 1e-5, True, grid_attrs(gq))
    yield "group_norm_q", got, want3, 1.01 / 255  # one step where GroupNorm's float rounding crosses a boundary
    g2 = ActQ(0.021, 7, 8, False)
    gn = ref.group_norm(x, g, be, 4, 1e-5, True).numpy()
    want5 = torch.from_numpy(np.concatenate([gq.quantize(gn[:, :5]), g2.quantize(gn[:, 5:])], 1)).float()
    for s in (1, 3):  # one work-group per group, and split across work-groups
        got = rt.group_norm_q(rt.to_device(x, f32), rt.to_device(g, f32), rt.to_device(be, f32), 4, 1e-5, True,
                              grid_attrs(gq), grid_attrs(g2), 5, S=s)
        yield f"group_norm_q two grids S={s}", got, want5, 1.01 / 255
    c1, c2 = _t(2, 3, 5, 7, seed=40, scale=2), _t(2, 4, 5, 7, seed=41)
    cat = torch.cat([c1, c2], 1).numpy()
    want6 = torch.from_numpy(np.concatenate([gq.quantize(cat[:, :2]), g2.quantize(cat[:, 2:])], 1)).float()
    import torch.nn.functional as F

    xl, gl, bl = _t(2, 6, 5, 3, seed=42, scale=2) + 1.0, _t(6, seed=43), _t(6, seed=44)
    lnq = gq.quantize(F.layer_norm(xl.permute(0, 2, 3, 1), (6,), gl, bl, 1e-5).permute(0, 3, 1, 2).numpy())
    yield ("layer_norm_channels_q", rt.layer_norm_channels(rt.to_device(xl, f32), rt.to_device(gl, f32),
                                                           rt.to_device(bl, f32), 1e-5, store=grid_attrs(gq)),
           torch.from_numpy(lnq).float(), 1.01 / 255)
    u = _t(2, 10, 7, 1, seed=45, scale=2)
    gg = gq.quantize((u[:, :5] * F.gelu(u[:, 5:])).numpy())
    yield "geglu_q", rt.geglu(rt.to_device(u, f32), grid_attrs(gq)), torch.from_numpy(gg).float(), 1.01 / 255
    yield ("concat_q two grids", rt.concat_q(rt.to_device(c1, f32), rt.to_device(c2, f32), grid_attrs(gq), grid_attrs(g2), 2),
           want6, 0.0)
    heads, d, n = 2, 8, 13
    att = LoweredAttention("a", ActQ(0.03, 0, 8, True), ActQ(0.025, 0, 8, True), ActQ(1 / 255, 0, 8, False),
                           ActQ(0.02, 0, 8, True), d ** -0.5, heads, ActQ(0.01, -3, 8, True))
    qf, kf, vf = (_t(1, heads, n, d, seed=36 + i) for i in range(3))
    want4 = att.output.quantize(run_attention(att, qf.numpy(), kf.numpy(), vf.numpy()))
    spec = attention_attrs(att)

    def cf(t: torch.Tensor, a: ActQ) -> Any:  # channels-first int8 (1, heads * d, n)
        return rt.to_device(a.quantize(t.permute(0, 1, 3, 2).reshape(1, heads * d, n).numpy()).astype(np.int8), np.int8)

    got = rt.attention_int8(cf(qf, att.q), cf(kf, att.k), cf(vf, att.v), heads, d, n, n, spec, store=grid_attrs(att.output),
                            direct=True)
    yield ("attention_int8", got, torch.from_numpy(want4.transpose(0, 1, 3, 2).reshape(1, heads * d, n)).float(),
           2.01 / 128)  # a softmax probability on a rounding boundary of P moves the result by a step or two


def run_profile(device: Any, profile: str | None, precision: str) -> list[dict[str, Any]]:
    """Every case on one (device, profile, precision): [{case, variant, max_err, limit, ok}]."""
    from edgediff.kernels.runtime import CLRuntime

    rt = CLRuntime(device, precision=precision, profile=profile)
    v = rt.variants
    tag = (f"{profile or 'device'}/{precision}: half_arith={int(v.half_arith)} vec={rt._vec()} "
           f"local_tiles={int(v.local_tiles)} int8_dot={v.int8_dot}")
    out = []
    for name, got, want, tol in _cases(rt):
        g = np.asarray(got.get(), dtype=np.float64)
        w = want.detach().double().numpy().reshape(g.shape)
        err = float(np.abs(g - w).max())
        limit = tol * max(1.0, float(np.abs(w).max()))
        out.append({"case": name, "variant": tag, "max_err": err, "limit": limit, "ok": bool(err <= limit)})
    return out


def compile_half(device: Any) -> list[dict[str, Any]]:
    """Build every program with half arithmetic (HALF_ARITH=1) and each layout variant, without
    running anything: [{program, defines, ok, error}]. For compilers that accept `half`."""
    import pyopencl as cl
    from edgediff.kernels.runtime import PROGRAMS, kernel_source

    ctx = cl.Context([device])
    out = []
    for name in PROGRAMS:
        if name == "int8":
            continue  # float32 in, integers inside: no half variant
        for local in (1, 0):
            extra = ["-DHEAD_DIM=80", "-DDC=32", "-DBKV=16"] if name == "attention" else []
            opts = ["-DUSE_HALF=1", "-DHALF_ARITH=1", "-DVEC=8", f"-DLOCAL_TILES={local}", *extra]
            try:
                cl.Program(ctx, kernel_source(name)).build(options=opts)
                out.append({"program": name, "defines": opts, "ok": True, "error": ""})
            except cl.RuntimeError as e:
                out.append({"program": name, "defines": opts, "ok": False, "error": str(e)[-400:]})
    return out


def accepts_half(device: Any) -> bool:
    """Whether the device's compiler accepts half arithmetic at all (a one-line probe build)."""
    import pyopencl as cl

    src = "#pragma OPENCL EXTENSION cl_khr_fp16 : enable\n__kernel void p(__global half* x) { x[0] = x[1] * x[2]; }"
    try:
        cl.Program(cl.Context([device]), src).build()
        return True
    except cl.Error:
        return False


# oclgrind's plugins, switched on by environment variables read when the simulator starts
OCLGRIND_ENV = {"OCLGRIND_DATA_RACES": "1", "OCLGRIND_CHECK_API": "1", "OCLGRIND_MAX_ERRORS": "20"}
# pyopencl asks every device for OpenCL 2.x/3.0 parameters; a 1.2 device (oclgrind) answers
# CL_INVALID_VALUE and oclgrind's API checker reports it. That is the host library probing.
_PROBE = "Function: clGetDeviceInfo\n\tError:    CL_INVALID_VALUE\n\tFor argument 'param_name'"


def oclgrind_env(log: str) -> dict[str, str]:
    return {**OCLGRIND_ENV, "OCLGRIND_LOG": log}


def oclgrind_findings(stderr: str, log: str) -> list[str]:
    """oclgrind's diagnostics (out-of-bounds accesses, data races, barrier divergence, API
    misuse, fatal errors) from its log file and the process's stderr, one string each, without
    pyopencl's parameter probes."""
    header = "Oclgrind - OpenCL runtime error detected"
    out = [b.strip() for b in log.replace(_PROBE, "").split("\n\n") if b.strip() and b.strip() != header]
    for b in stderr.replace(_PROBE, "").split("\n\n"):
        b = b.strip()
        if b and b != header and ("Oclgrind" in b or "OCLGRIND" in b):
            out.append(b)
    return out


def main(argv: list[str] | None = None) -> int:
    from edgediff.kernels.runtime import pick_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--profiles", default="device,adreno-740,mali-g710")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    dev = pick_device(a.device)
    rows: list[dict[str, Any]] = []
    for prof in a.profiles.split(","):
        for prec in a.precisions.split(","):
            rows += run_profile(dev, None if prof == "device" else prof, prec)
    half = compile_half(dev) if accepts_half(dev) else []
    res = {"device": dev.name.strip(), "platform": dev.platform.name.strip(),
           "cl_khr_fp16": "cl_khr_fp16" in dev.extensions, "cases": rows, "half_arith_builds": half,
           "ok": all(r["ok"] for r in rows) and all(h["ok"] for h in half)}
    show: Callable[[str], None] = print
    if a.json:
        show(json.dumps(res, indent=1))
    else:
        for r in rows:
            if not r["ok"]:
                show(f"FAIL {r['variant']} {r['case']}: max err {r['max_err']:.3g} > {r['limit']:.3g}")
        show(f"{res['device']}: {sum(r['ok'] for r in rows)}/{len(rows)} cases within tolerance; "
             f"{sum(h['ok'] for h in half)}/{len(half)} half-arithmetic builds")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
