"""Bytes moved and FLOPs per kernel, fused vs unfused, counted from what the .cl kernels read and write.

A model, not a measurement: each function counts global-memory reads and writes of the kernels
at element size `es` (2 for fp16, 4 for fp32), assuming caches hold nothing across kernels and
tiles are read once per work-group as the kernels do. `sd15_block_rows()` applies it to the
SD-1.x UNet shapes (320/640/1280 channels at 64/32/16 latents, 8 heads: head_dim 40/80/160,
77 text tokens), which never need to run.
"""

from __future__ import annotations

from typing import Any


def group_norm_silu(B: int, C: int, HW: int, es: int = 2) -> dict[str, dict[str, int]]:
    """Fused (norm.cl group_norm / the split pair: read twice, write once) vs unfused (statistics
    kernel reading twice, normalise kernel, SiLU kernel)."""
    n = B * C * HW
    fused = {"reads": 2 * n * es, "writes": n * es, "flops": 12 * n, "launches": 1}
    unfused = {"reads": 2 * n * es + n * es + n * es, "writes": n * es + n * es, "flops": 12 * n, "launches": 3}
    return {"fused": fused, "unfused": unfused}


def attention(B: int, heads: int, d: int, N: int, M: int, es: int = 2, bq: int = 64) -> dict[str, dict[str, int]]:
    """Flash (attention.cl: q once, K and V once per BQ-query work-group, o once; with head_dim
    tiling, q and K once per chunk and the QK FLOPs recomputed per chunk) vs unfused
    (S = Q^T K written, softmax reading it twice and writing P, O = V P^T reading P)."""
    from edgediff.kernels.device import attention_d_chunk

    bh = B * heads
    qblocks = -(-N // bq)
    nch = -(-d // attention_d_chunk(d))  # head_dim-tiled: Q and K are read once per channel chunk
    flops = bh * (2 * nch + 2) * N * M * d
    fused = {"reads": bh * (nch * N * d + qblocks * (nch + 1) * M * d) * es, "writes": bh * N * d * es,
             "flops": flops, "launches": 1}
    s = bh * N * M * es
    unfused = {"reads": bh * (N * d + M * d) * es + 2 * s + s + bh * M * d * es, "writes": s + s + bh * N * d * es,
               "flops": bh * 4 * N * M * d, "launches": 3}
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
