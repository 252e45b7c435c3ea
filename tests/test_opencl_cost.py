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


# ---------------------------------------------------------------- per op of a bundle, the estimate, oclgrind
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from edgediff.model import DiffusionModel  # noqa: E402


@pytest.fixture
def cond_bundle(tiny_cond_unet: DiffusionModel, tmp_path: Path) -> Path:
    from edgediff.exporters import get_backend

    get_backend("opencl").export(tiny_cond_unet, tmp_path / "b", "fp16")
    return tmp_path / "b"


def test_bundle_costs_price_every_op_and_fusion_never_costs_more(cond_bundle: Path) -> None:
    import json

    sched = json.loads((cond_bundle / "opencl_bundle.json").read_text())["schedule"]
    rows = cost.bundle_costs(cond_bundle)
    assert [r["name"] for r in rows] == [o["name"] for o in sched["ops"]]
    for r in rows:  # fusion saves bytes and launches (except head_dim-tiled attention at large heads)
        assert cost.total(r["fused"]) <= cost.total(r["unfused"]) and r["fused"]["launches"] <= r["unfused"]["launches"]
    qkv = next(r for r in rows if r["name"].endswith("attn1.to_qkv"))
    (B, C, H, W) = next(r for r in rows if r["name"].endswith("norm1"))["out_shape"]
    assert qkv["unfused"]["reads"] - qkv["fused"]["reads"] == 2 * B * C * H * W * 2  # Q, K, V each read the input
    ca = next(r for r in rows if r["op"] == "cross_attention")
    assert ca["macs"] == B * 8 * 2 * H * W * 6 * (C // 8)  # 8 heads, 6 context tokens
    kinds = {a["op"]: a for a in cost.summarize(rows)}
    assert kinds["group_norm"]["ratio"] > 1.5 and kinds["geglu"]["ratio"] > 1.5 and kinds["flash_attention"]["ratio"] > 2


def test_device_estimate_of_a_bundle_uses_the_fused_kernels(cond_bundle: Path) -> None:
    from edgediff.profiling.run import profile

    work = cost.bundle_work(cond_bundle)
    res = profile(cond_bundle, device="adreno740")
    assert res["estimated"] is True and res["runtime"] == "estimate:adreno740" and res["total_ms"] > 0
    assert res["bytes"] == sum(w["bytes_in"] + w["bytes_w"] + w["bytes_out"] for w in work)
    assert res["macs"] == sum(w["macs"] for w in work) > 0
    assert {la["name"] for la in res["layers"]} == {w["name"] for w in work}


def test_sd15_level_from_the_bundle_builder() -> None:
    rows = cost.sd15_level_costs(320, 16)
    ops = [r["op"] for r in rows]
    assert ops.count("layer_norm") == 3 and ops.count("cross_attention") == 1 and ops.count("geglu") == 1
    ff = next(r for r in rows if r["name"].endswith("ff.net.0.proj"))
    assert ff["out_shape"] == [1, 2 * 4 * 320, 16, 16]  # GEGLU's proj: value and gate, 4x inner
    ca = next(r for r in rows if r["op"] == "cross_attention")
    assert ca["macs"] == 8 * 2 * 256 * 77 * 40


def test_parse_inst_counts() -> None:
    text = ("noise\n### CASE a\nInstructions executed for kernel 'k':\n  10 - load global (40 bytes)\n"
            "   3 - store global (12 bytes)\n   5 - load local (20 bytes)\n   2 - call _Z6vload4mPU3AS1Kf()\n"
            "   2 - call _Z7vstore4Dv4_fmPU3AS1f()\n### CASE b\n   4 - call _Z10vload_halfmPU3AS1KDh()\n")
    got = cost.parse_inst_counts(text)
    assert got["a"] == {"reads": 40 + 32, "writes": 12 + 32, "kernels": 1}
    assert got["b"] == {"reads": 8, "writes": 0, "kernels": 0}


def _has_oclgrind() -> bool:
    p = subprocess.run([sys.executable, "-c", "import pyopencl as cl; print(any('Oclgrind' in p.name for p in "
                        "cl.get_platforms()))"], capture_output=True, text=True, env={**os.environ}, timeout=120)
    return p.stdout.strip().endswith("True")


@pytest.mark.skipif(not _has_oclgrind(), reason="oclgrind is not installed (CI: apt-get install oclgrind)")
def test_model_against_oclgrind_counted_bytes() -> None:
    """oclgrind counts every global access (no cache): it must equal the model where each element is
    read once (flash attention, GEGLU), and may exceed it only where the model assumes a cache
    (per-element affine/gate reads, conv tile re-reads); fused vs unfused GroupNorm ratio as modelled."""
    rows = {r["case"]: r for r in cost.measure_oclgrind()}
    assert rows["attention flash h2 d16 N64"]["oclgrind_over_model"] == 1.0
    assert rows["geglu F32 N64"]["oclgrind_over_model"] == 1.0
    assert all(r["oclgrind_bytes"] >= r["model_bytes"] for r in rows.values())
    assert all(r["oclgrind_kernels"] == r["model_launches"] for r in rows.values())
    f, u = rows["group_norm+silu fused"], rows["group_norm+silu unfused"]
    assert abs(u["oclgrind_bytes"] / f["oclgrind_bytes"] - u["model_bytes"] / f["model_bytes"]) < 0.1


def test_runtime_picks_the_attention_path_per_shape() -> None:
    """Flash or unfused per attention op, from the bytes model with the device's own head_dim chunk:
    on a GPU profile SD-1.x's 16x16 level (head_dim 160, 256 tokens) runs unfused and the 64x64
    level (head_dim 40, 4096 tokens) flash; a CPU driver (unsplit flash) runs flash. The unfused
    op slices Q, K, V out of the stacked buffer and gives the reference result."""
    import numpy as np
    import pytest
    import torch

    pytest.importorskip("pyopencl")
    from edgediff.kernels import reference as ref
    from edgediff.kernels import runtime as clrt
    from edgediff.kernels.graph import SCHEDULE_VERSION, Executor

    if not clrt.opencl_available()[0]:
        pytest.skip("no OpenCL device")
    gpu = clrt.CLRuntime(profile="adreno-740", profiling=True)
    assert gpu.attention_path(1, 8, 160, 256, 256, copied=3 * 1280 * 256) == "unfused"
    assert gpu.attention_path(1, 8, 40, 4096, 4096, copied=3 * 320 * 4096) == "flash"
    cpu = clrt.CLRuntime()
    if not cpu.profile.is_gpu:
        assert cpu.attention_path(1, 8, 160, 256, 256, copied=3 * 1280 * 256) == "flash"
    heads, d, hw = 1, 160, 16
    C = heads * d
    sched = {"version": SCHEDULE_VERSION, "arch": "UNet2DModel", "inputs": ["sample", "timestep"], "output": "out",
             "sample_shape": [3 * C, hw, hw], "out_channels": C,
             "ops": [{"op": "flash_attention", "name": "attn", "in": ["sample"], "out": "out", "heads": heads,
                      "head_dim": d, "scale": d ** -0.5}]}
    qkv = torch.randn(2, 3 * C, hw, hw, generator=torch.Generator().manual_seed(0))
    want = ref.attention(*(qkv[:, i * C:(i + 1) * C].reshape(2, C, hw * hw) for i in range(3)), heads)
    ex = Executor(sched, {}, gpu)
    gpu.event_times()
    got = ex.run(qkv, torch.zeros(2))
    names = {k for _, k, _ in gpu.event_times()}
    assert {"gemm_batched", "softmax_rows"} <= names and "flash_attention" not in names
    np.testing.assert_allclose(got.reshape(want.shape).numpy(), want.numpy(), atol=2e-5, rtol=1e-4)
    cpu_got = Executor(sched, {}, cpu).run(qkv, torch.zeros(2))
    np.testing.assert_allclose(cpu_got.numpy(), got.numpy(), atol=2e-5, rtol=1e-4)
