"""The bytes-and-FLOPs model of the OpenCL kernels (fused vs unfused)."""

from __future__ import annotations

from edgediff.kernels import cost


def test_group_norm_fusion_halves_the_traffic() -> None:
    c = cost.group_norm_silu(1, 64, 100, es=4)
    assert cost.total(c["fused"]) == 3 * 6400 * 4 and cost.total(c["unfused"]) == 6 * 6400 * 4
    assert c["fused"]["launches"] == 1 and c["unfused"]["launches"] == 3


def test_attention_unfused_pays_for_the_score_matrix() -> None:
    small, big = cost.attention(1, 1, 32, 64, 64), cost.attention(1, 1, 32, 4096, 4096)
    # unfused moves N x M scores 4 times (write S, read twice, write P) plus reading P once more
    s = 4096 * 4096 * 2
    assert cost.total(big["unfused"]) > 5 * s > cost.total(big["fused"])
    assert cost.total(small["fused"]) < cost.total(small["unfused"])
    # head_dim-tiled (d 160 -> 5 chunks of 32): Q and K are re-read per chunk, FLOPs grow
    wide = cost.attention(1, 8, 160, 256, 256)
    assert wide["fused"]["flops"] > wide["unfused"]["flops"]


def test_sd15_rows_cover_the_three_levels() -> None:
    rows = cost.sd15_block_rows()
    assert {r["shape"] for r in rows} == {"1x320x64x64", "1x640x32x32", "1x1280x16x16"}
    sa = next(r for r in rows if r["kernel"] == "self-attention h8 d40")
    assert sa["ratio"] > 3 and all(r["fused_bytes"] > 0 for r in rows)
