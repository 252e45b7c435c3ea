"""PyTorch references for every OpenCL kernel (what the tests and the benchmark compare against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, groups: int, eps: float,
               silu: bool = False) -> torch.Tensor:
    y = F.group_norm(x, groups, gamma, beta, eps)
    return F.silu(y) if silu else y


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Channels-first multi-head attention: q (B, H*D, N), k/v (B, H*D, M) -> (B, H*D, N)."""
    B, C, N = q.shape
    M = k.shape[2]
    d = C // heads
    qh = q.reshape(B, heads, d, N).transpose(-1, -2)
    kh = k.reshape(B, heads, d, M).transpose(-1, -2)
    vh = v.reshape(B, heads, d, M).transpose(-1, -2)
    o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # (B, H, N, D)
    return o.transpose(-1, -2).reshape(B, C, N)


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
           pad: int | tuple[int, int, int, int] = 0, chan_add: torch.Tensor | None = None,
           res: torch.Tensor | None = None, out_scale: float = 1.0) -> torch.Tensor:
    if isinstance(pad, int):
        y = F.conv2d(x, w, bias, stride=stride, padding=pad)
    else:
        pt, pl, pb, pr = pad
        y = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, bias, stride=stride)
    if chan_add is not None:
        y = y + chan_add.reshape(y.shape[0], y.shape[1], 1, 1)
    if res is not None:
        y = y + res
    return y * out_scale


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)


def timestep_freqs(dim: int, freq_shift: float, max_period: int = 10000) -> torch.Tensor:
    """exp(-ln(max_period) * i / (half - shift)) in float32, computed exactly as diffusers does."""
    import math

    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32)
    return torch.exp(exponent / (half - freq_shift))


def quantize(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """q = clamp(round(x / s) + zp), round half to even (torch.round), float32 (docs/architecture.md)."""
    s = torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x / s) + zp, qmin, qmax).to(torch.int32)


def conv2d_int8(xq: torch.Tensor, wq: torch.Tensor, bias_i32: torch.Tensor, mult: torch.Tensor, zp_x: int, zp_y: int,
                qmin: int, qmax: int, stride: int = 1, pad: int = 0) -> torch.Tensor:
    """Integer conv, ORT convention: int32 accumulation of (q_x - zp_x) * q_w (exact in int64 here),
    + bias, then y = clamp(rint(float32(acc) * mult) + zp_y) with round half to even."""
    xs = (xq.to(torch.int64) - zp_x)
    xs = F.pad(xs, (pad, pad, pad, pad))  # padding holds zp_x, i.e. 0 after the shift
    Co, Ci, KH, KW = wq.shape
    cols = F.unfold(xs.to(torch.float64), (KH, KW), stride=stride).round().to(torch.int64)  # exact for int8 ranges
    acc = torch.einsum("ok,bkn->bon", wq.reshape(Co, -1).to(torch.int64), cols) + bias_i32.to(torch.int64)[None, :, None]
    acc = acc.to(torch.int32)
    y = torch.round(acc.to(torch.float32) * mult.to(torch.float32)[None, :, None]) + zp_y
    y = torch.clamp(y, qmin, qmax).to(torch.int32)
    B, H, W = xq.shape[0], xq.shape[2], xq.shape[3]
    Ho = (H + 2 * pad - KH) // stride + 1
    Wo = (W + 2 * pad - KW) // stride + 1
    return y.reshape(B, Co, Ho, Wo)
