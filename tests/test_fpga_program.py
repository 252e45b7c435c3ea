"""The whole denoiser call as one integer program: its simulator, its C-simulation, and verify through it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.fpga import callsim, csim
from edgediff.fpga import nonlinear as nl
from edgediff.fpga import program as P
from edgediff.fpga.sim import ConvGeom, QLayer

from edgediff.errors import BadInput, Unavailable
from edgediff.model import DiffusionModel

needs_cxx = pytest.mark.skipif(not csim.toolchain()[0], reason=f"no C-simulation toolchain: {csim.toolchain()[1]}")


@pytest.fixture(scope="module")
def tiny_int8() -> DiffusionModel:
    """The conftest's tiny UNet2DModel (down/up blocks, attention, skip concatenations) through the real
    calib + quant passes with a small budget: output requantization, attention operands, split convs."""
    from diffusers import UNet2DModel

    from edgediff.model import InputSignature
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import parse
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8).eval()
    model = DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel",
                           dict(m.config), {"source": "test"})
    recipe = parse('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 4\nsteps = 5\ncount = 16\n'
                   '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\ncalib_limit = 16\n', "test")
    q, _ = run_recipe(model, recipe, 0)
    return q


def test_array_run_equals_the_layer_simulator() -> None:
    """The program's fast accumulation (float64 BLAS) is QLayer.run bit for bit: conv (stride, pads), gemm, matmul."""
    rng = np.random.default_rng(0)
    conv = QLayer("c", "conv", 0.02, 7, rng.uniform(0.001, 0.01, 8).astype(np.float32), w=rng.integers(-127, 128,
                  (8, 4, 3, 3)), bias=rng.integers(-500, 500, 8), geom=ConvGeom((2, 2), (1, 1, 1, 1)), out_scale=0.05,
                  out_zp=120)
    gemm = QLayer("g", "gemm", 0.03, 130, rng.uniform(0.001, 0.01, 12).astype(np.float32),
                  w=rng.integers(-127, 128, (20, 12)), bias=rng.integers(-99, 99, 12), out_scale=0.04, out_zp=3,
                  out_signed=True)
    mm = QLayer("m", "matmul", 1 / 255, 0, np.asarray(0.02, np.float32), zp_w=0, x2_signed=True)
    x = rng.integers(0, 256, (2, 4, 9, 9))
    assert np.array_equal(P.array_run(conv, x), conv.run(x))
    xg = rng.integers(0, 256, (3, 5, 20))
    assert np.array_equal(P.array_run(gemm, xg), gemm.run(xg))
    a, b = rng.integers(0, 256, (2, 6, 10)), rng.integers(-128, 128, (2, 10, 7))
    assert np.array_equal(P.array_run(mm, a, b), mm.run(a, b))


def test_activation_table_covers_the_full_step_and_a_linear_tail() -> None:
    lut, my = nl.act_q8_params(lambda v: v / (1 + np.exp(-v)), 0.05, 10, 0, 255)
    t = np.array([-5000, -2049, -2048, -1, 0, 255, 2047, 2048, 3000, 32767])
    y = nl.act_q8_int(t, lut, my, 10, 0, 255)
    v = t / 256.0
    ideal = np.clip(np.rint(v / (1 + np.exp(-v)) / 0.05) + 10, 0, 255)
    assert np.abs(y - ideal).max() <= 1 and y[-1] == 255  # saturates, never wraps
    assert y[0] == y[1] == lut[0] and y[2] == lut[0] and y[7] == lut[-1]
    assert nl.permute3_int(np.arange(24), (2, 3, 4), 1).shape == (3, 4, 2)


@needs_cxx
def test_whole_call_in_csim_equals_the_simulator_on_every_buffer(tiny_int8: DiffusionModel, tmp_path: Path) -> None:
    prog = P.build_program(tiny_int8)
    kinds = prog.summary()["op_counts"]
    assert {"array", "gn", "act", "lut", "add", "add_bcast", "softmax", "upsample", "permute", "concat"} <= set(kinds)
    # every integer layer of the shared lowering runs on the array (attention: QK^T and PV as two matmuls each)
    from edgediff.lowering import lower_model

    _, low = lower_model(tiny_int8)
    parts = sum(len(lay.parts) for lay in low.layers.values())
    assert kinds["array"] == parts + 2 * len(low.attentions)
    P.save_program(prog, tmp_path / "call")
    prog = P.load_program(tmp_path / "call")
    x = tiny_int8.example_inputs(batch=2, seed=1)["sample"]
    s, e = P.call_inputs(prog, x.numpy(), np.array([300.0, 300.0]))
    r = callsim.csim_call(prog, tmp_path / "cs", s[:1], e[:1])
    assert r["bit_exact"] and r["mismatching_total"] == 0 and r["buffers_compared"] == len(prog.ops)
    assert r["array_cycles"] > 0
    # the simulator batches: image 0 of a batch of two is the C-sim's image
    acc = P.run_program(prog, s, e)[prog.output]
    assert np.array_equal(acc[:1].reshape(r["output"].shape), r["output"])
    # and it tracks the artifact's own simulation closely
    from edgediff.sampling import TorchDenoiser

    ref = TorchDenoiser(tiny_int8, use_cache=False)(x, torch.full((2,), 300.0)).numpy()
    got = P.dequantize_output(prog, acc)
    assert nl.snr_db(ref, got) > 25.0
    # a wrong constant in the C-sim's copy of the program is caught at the op that reads it
    first_gn = next(i for i, o in enumerate(prog.ops) if o.op == "gn")
    g = np.fromfile(tmp_path / "cs" / "program" / f"op{first_gn:04d}.gamma.bin", "<i4")
    (g + 1).astype("<i4").tofile(tmp_path / "cs" / "program" / f"op{first_gn:04d}.gamma.bin")
    bad = callsim.csim_call(prog, tmp_path / "cs", s[:1], e[:1])
    assert not bad["bit_exact"] and bad["mismatching_ops"][0]["op"] == first_gn


@needs_cxx
def test_export_then_verify_runs_the_sampler_through_the_program(tiny_int8: DiffusionModel, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from edgediff.fpga.project import BACKEND

    from edgediff.verify import verify

    rep = BACKEND.export(tiny_int8, tmp_path / "proj", "int8")
    wc = rep["whole_call"]
    assert wc["bit_exact"] is True and wc["array_layers"] == rep["layers_total"] and (tmp_path / "proj/call").is_dir()
    assert BACKEND.runtime_available(tmp_path / "proj")[0]
    v = verify(tiny_int8, tmp_path / "proj", steps=3, samples=2, sampler="ddim")
    assert v["verified"] is True and v["exit_code"] == 0 and v["psnr_db"] >= 25.0
    # the per-call figures are reported, but the float simulation's per-call rule is not the fixed-point units'
    assert v["stepwise_calls"] == 3 and "not applied" in v["stepwise_rule"]
    rr = v["runtime_report"]
    assert rr["consistent"] is True and rr["csim_calls"] == rr["csim_identical"] == 2 and rr["calls"] >= 3
    json.dumps(v)  # the report is plain JSON
    # a C-simulation that disagrees with the simulator fails the verification (exit 4), never a silent pass
    real = callsim.csim_call

    def wrong(*a, **k):  # noqa: ANN002, ANN003, ANN202
        r = real(*a, **k)
        r["output"] = r["output"] + 1
        return r

    monkeypatch.setattr(callsim, "csim_call", wrong)
    v2 = verify(tiny_int8, tmp_path / "proj", steps=2, samples=1, sampler="ddim")
    assert v2["exit_code"] == 4 and v2["runtime_report"]["consistent"] is False


def test_the_program_refuses_what_it_does_not_cover(tiny_unet: DiffusionModel, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="quantization parameters"):
        P.build_program(tiny_unet)
    with pytest.raises(Unavailable, match="UNet2DModel"):
        P._unet_of(torch.nn.Conv2d(1, 1, 1))
    (tmp_path / "program.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(BadInput, match="program.json"):
        P.load_program(tmp_path)


@pytest.mark.slow
@needs_cxx
def test_demo_w8a8_whole_call_and_verify(tmp_path: Path) -> None:
    """The demo's W8A8 artifact: one call in C-sim bit-exact, then verify at >= 25 dB (several minutes)."""
    from edgediff.cli import main

    art, proj = tmp_path / "w8a8", tmp_path / "fpga"
    assert main(["compress", "demo", "--recipe", "w8a8", "-o", str(art)]) == 0
    assert main(["export", str(art), "--target", "fpga", "-o", str(proj)]) == 0
    rep = json.loads((proj / "fpga_project.json").read_text())
    assert rep["whole_call"]["bit_exact"] is True and rep["whole_call"]["array_layers"] == 84
    assert main(["verify", str(art), str(proj), "--samples", "4", "--steps", "10"]) == 0


def test_groupnorm_then_the_silu_table_costs_nothing_against_int8_rounding() -> None:
    """GN -> Q8 codes -> nl_act_q8 (the whole call's path) against float GroupNorm+SiLU: within 0.1 dB of ideal
    int8 rounding of the float result (the fused 4096-entry table at a 1/16 step loses ~3 dB); softmax too."""
    rng = np.random.default_rng(1)
    c, hw, g, s_x, zx, s_y = 32, 256, 8, 0.05, 128, 0.03
    x = np.clip(np.rint(rng.normal(0, 1.5, (c, hw)) / s_x) + zx, 0, 255).astype(np.int64)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c)
    ref = nl.groupnorm_float(s_x * (x - zx), gamma, beta, g, 1e-5, True)
    p = nl.groupnorm_params(s_x, zx, gamma, beta, 1e-5, g, (c // g) * hw, 1 / nl.Q8, 0, -32768, 32767, False)
    lut, my = nl.act_q8_params(nl.silu, s_y, 0, -128, 127)
    got = s_y * nl.act_q8_int(nl.groupnorm_int(x, p), lut, my, 0, -128, 127)
    ideal = s_y * np.clip(np.rint(ref / s_y), -128, 127)
    assert nl.snr_db(ref, got) > nl.snr_db(ref, ideal) - 0.1
    fused = nl.groupnorm_params(s_x, zx, gamma, beta, 1e-5, g, (c // g) * hw, s_y, 0, -128, 127, True)
    assert nl.snr_db(ref, s_y * nl.groupnorm_int(x, fused)) < nl.snr_db(ref, got) - 1.0
    a = rng.integers(-600, 600, (16, 64))
    pr = nl.softmax_int(a, nl.softmax_params(0.01, 1 / 255, 0, 0, 255)) / 255.0
    e = np.exp(0.01 * (a - a.max(1, keepdims=True)))
    fp = e / e.sum(1, keepdims=True)
    assert nl.snr_db(fp, pr) > nl.snr_db(fp, np.rint(fp * 255) / 255) - 0.1
