"""Every kernel variant under oclgrind (a device simulator that reports out-of-bounds accesses,
data races and barrier divergence) and on PoCL, against the PyTorch references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyopencl")
from edgediff.kernels import runtime as clrt  # noqa: E402
from edgediff.kernels import simcheck  # noqa: E402
from edgediff.kernels.device import DeviceProfile, select_variants  # noqa: E402


def _oclgrind() -> bool:
    try:
        return any("oclgrind" in (d.platform.name + d.name).lower() for d in clrt.list_devices())
    except Exception:  # noqa: BLE001 - no ICD at all
        return False


needs_oclgrind = pytest.mark.skipif(not _oclgrind(), reason="oclgrind is not installed (CI: apt-get install oclgrind)")


def _under_oclgrind(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = tmp_path / "oclgrind.log"
    env = {**os.environ, **simcheck.oclgrind_env(str(log)), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)
    return p, simcheck.oclgrind_findings(p.stderr, log.read_text() if log.exists() else "")


@needs_oclgrind
def test_every_variant_under_oclgrind_is_clean_and_matches_pytorch(tmp_path: Path) -> None:
    p, findings = _under_oclgrind(["-m", "edgediff.kernels.simcheck", "--device", "oclgrind", "--json"], tmp_path)
    assert findings == [], "\n\n".join(findings[:5])
    assert p.returncode in (0, 1), p.stderr[-2000:]
    res = json.loads(p.stdout)
    bad = [r for r in res["cases"] if not r["ok"]]
    assert not bad, bad[:5]
    tags = {r["variant"] for r in res["cases"]}
    names = {r["case"] for r in res["cases"]}
    # the variants the profiles select are all there: tiled and untiled, fp32 and fp16 storage
    assert any("local_tiles=1" in t for t in tags) and any("local_tiles=0" in t for t in tags)
    assert any("/fp16" in t for t in tags) and any("/fp32" in t for t in tags)
    assert {"conv2d_int8_dq split (packed dot)", "conv2d_int8_dq split (tiled)", "group_norm_split",
            "flash_attention h1d12/dc5", "layer_norm_channels adaLN", "geglu", "gate_residual", "unpatchify",
            "embedding_rows", "cross_attention h1d12/dc5"} <= names
    if res["cl_khr_fp16"]:  # half arithmetic ran: it is among the variants
        assert any("half_arith=1" in t for t in tags)
    # oclgrind 21.10 compiles half arithmetic (but cannot run it): every program builds with it
    assert res["half_arith_builds"] and all(h["ok"] for h in res["half_arith_builds"]), res["half_arith_builds"]
    assert res["ok"] and p.returncode == 0


_BUGGY = r'''
import numpy as np, pyopencl as cl, pyopencl.array as ca
from edgediff.kernels.runtime import pick_device
dev = pick_device("oclgrind")
ctx = cl.Context([dev]); q = cl.CommandQueue(ctx)
src = """
__kernel void oob(__global float* y, const int n) { y[get_global_id(0) + 1] = 1.0f; }
__kernel void race(__global float* y, __local float* t) {
    t[0] = (float)get_local_id(0);  /* every work-item writes the same local word, no barrier */
    y[get_local_id(0)] = t[0];
}
__kernel void diverge(__global float* y) {
    if (get_local_id(0) < 2) barrier(CLK_LOCAL_MEM_FENCE);
    y[get_global_id(0)] = 0.0f;
}
"""
prg = cl.Program(ctx, src).build()
y = ca.zeros(q, 4, np.float32)
cl.Kernel(prg, "oob")(q, (4,), (4,), y.data, np.int32(4))
cl.Kernel(prg, "race")(q, (4,), (4,), y.data, cl.LocalMemory(4))
cl.Kernel(prg, "diverge")(q, (4,), (4,), y.data)
q.finish()
'''


@needs_oclgrind
def test_oclgrind_harness_reports_oob_races_and_barrier_divergence(tmp_path: Path) -> None:
    """The same environment and parser catch the three bug classes (a harness that saw nothing
    would pass every kernel)."""
    _, findings = _under_oclgrind(["-c", _BUGGY], tmp_path)
    text = "\n".join(findings)
    assert "Invalid write" in text and "oob" in text
    assert "data race" in text.lower()
    assert "barrier" in text.lower() and "diverge" in text


def test_profiles_select_variants_by_rule() -> None:
    base = DeviceProfile(name="x", vendor="v", is_gpu=True, extensions=frozenset({"cl_khr_fp16"}), local_mem_type="local",
                         local_mem_size=32768, max_work_group_size=256, max_work_item_sizes=(256, 256, 256),
                         compute_units=4, sub_group_size=None, correctly_rounded_divide_sqrt=False)
    v = select_variants(base, "fp16")
    assert v.half_arith and v.vec == 8 and v.local_tiles and v.int8_dot == "emulated" and v.build_options == ()
    assert any("correctly rounded" in n for n in v.notes)
    assert not select_variants(base, "fp32").half_arith and select_variants(base, "fp32").vec == 4
    mali = base.with_preset("mali-g710")
    assert mali.local_mem_type == "global" and not select_variants(mali, "fp32").local_tiles
    assert mali.extensions == base.extensions  # extensions are never simulated
    import dataclasses

    arm = dataclasses.replace(base, extensions=frozenset({"cl_arm_integer_dot_product_int8"}),
                              correctly_rounded_divide_sqrt=True)
    va = select_variants(arm, "fp16")
    assert va.int8_dot == "arm" and not va.half_arith and va.build_options == ("-cl-fp32-correctly-rounded-divide-sqrt",)
    khr = dataclasses.replace(arm, extensions=frozenset({"cl_khr_integer_dot_product", "cl_arm_integer_dot_product_int8"}))
    assert select_variants(khr, "int8").int8_dot == "khr"
    from edgediff.kernels.device import attention_d_chunk

    assert attention_d_chunk(64) == 64 and attention_d_chunk(160) == 32 and attention_d_chunk(80) == 40
    assert attention_d_chunk(72) == 8


@pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")
def test_build_options_follow_the_device_and_work_groups_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = clrt.CLRuntime()
    opts = rt.build_options("int8", {})
    assert ("-cl-fp32-correctly-rounded-divide-sqrt" in opts) == rt.profile.correctly_rounded_divide_sqrt
    k = rt.kernel("norm", "group_norm")
    wg, mult = rt.kernel_limits(k)
    assert 1 <= wg <= rt.max_wg and mult >= 1
    L = rt.local_1d(k, 10_000)
    assert L <= wg and L & (L - 1) == 0
    # a kernel whose CL_KERNEL_WORK_GROUP_SIZE is small gets small work-groups
    rt._kinfo[k] = (8, 1)
    assert rt.local_1d(k, 10_000) == 8


@pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")
def test_head_dim_tiling_only_on_gpus() -> None:
    """d 160 attention: chunked (DC 32) under a GPU profile, unsplit on a CPU driver (measured faster)."""
    import numpy as np

    for prof, want in (("adreno-740", 32), (None, 160)):
        rt = clrt.CLRuntime(profile=prof)
        if prof is None and rt.profile.is_gpu:
            want = 32
        q = rt.to_device(np.zeros((1, 160, 3), np.float32))
        rt.flash_attention(q, q, q, 1, 160, 3, 3)
        dcs = {dict(key[1]).get("DC") for key in rt._programs if key[0] == "attention"}
        assert dcs == {want}, (prof, dcs)


@pytest.mark.slow
@pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")
def test_every_variant_on_the_default_device() -> None:
    """The same cases on PoCL (CI's default device), every profile."""
    assert simcheck.main([]) == 0


def _fp16_devices() -> list:
    try:
        return [d for d in clrt.list_devices() if "cl_khr_fp16" in d.extensions
                and "oclgrind" not in (d.platform.name + d.name).lower()]
    except Exception:  # noqa: BLE001 - no ICD at all
        return []


@pytest.mark.skipif(not _fp16_devices(), reason="no OpenCL device here reports cl_khr_fp16 (oclgrind 21.10, PoCL 3.0 "
                    "and Debian's PoCL 3.1 do not): the half-arithmetic variants can only be compiled")
def test_half_arithmetic_variants_run_where_the_device_has_fp16() -> None:
    """On every device that reports cl_khr_fp16 (a GPU driver), each fp16 kernel variant runs with
    half arithmetic and matches the PyTorch reference within fp16 tolerances."""
    for dev in _fp16_devices():
        for profile in (None, "mali-g710"):
            rows = simcheck.run_profile(dev, profile, "fp16")
            assert rows and all("half_arith=1" in r["variant"] for r in rows)
            bad = [r for r in rows if not r["ok"]]
            assert not bad, bad[:5]
