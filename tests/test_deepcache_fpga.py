"""FPGA projects of a DeepCache artifact: the shallow integer program (the outer layers reading the cached
feature), bit-exact in the C-simulation, and the sampler driving full/shallow programs in verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deepcache_fixtures import cached, micro_unet
from edgediff.fpga import csim

from edgediff.model import DiffusionModel

needs_cxx = pytest.mark.skipif(not csim.toolchain()[0], reason=f"no C-simulation toolchain: {csim.toolchain()[1]}")


@pytest.fixture(scope="module")
def cached_int8() -> DiffusionModel:
    """The micro UNet through the real calib + quant passes (output requantization: what the program needs)."""
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import parse

    recipe = parse('name = "t"\n[[pass]]\nname = "calib"\nmethod = "ptq4dm"\nn_samples = 4\nsteps = 4\ncount = 8\n'
                   '[[pass]]\nname = "quant"\nweight_init = "minmax"\nact_init = "minmax"\ncalib_limit = 8\n', "test")
    q, _ = run_recipe(micro_unet(), recipe, 0)
    return cached(q, sampler="ddim", steps=4, interval=2)


@needs_cxx
def test_shallow_program_csim_and_verify_with_the_schedule(cached_int8: DiffusionModel, tmp_path: Path) -> None:
    from edgediff.fpga.deepcache import CachedFpgaDenoiser, shallow_program
    from edgediff.fpga.program import call_inputs, load_program, run_program
    from edgediff.fpga.project import BACKEND

    from edgediff.verify import verify

    rep = BACKEND.export(cached_int8, tmp_path / "p", "int8").to_dict()
    c = rep["cache"]
    assert c["exported"] and c["full_steps"] == [0, 2]
    sh = c["shallow"]
    assert sh["bit_exact"] is True and 0 < sh["array_layers"] < sh["full_array_layers"] and sh["ops"] < sh["full_ops"]
    full = load_program(tmp_path / "p" / "call")
    shallow = load_program(tmp_path / "p" / "call_shallow")
    assert full.feature is not None and shallow.feature == full.feature
    assert [o.name for o in shallow.ops] == [o.name for o in shallow_program(full, full.feature).ops]
    assert not any(o.name.startswith(("mid_block", "down_blocks.1")) for o in shallow.ops)  # the deep part is gone
    # fed the feature of the same input, the shallow program computes exactly the full program's output
    x = cached_int8.example_inputs(2, seed=1)["sample"].numpy()
    s, e = call_inputs(full, x, np.array([500.0, 500.0]))
    bufs = run_program(full, s, e)
    got = run_program(shallow, s, e, feature_codes=bufs[full.feature])[shallow.output]
    np.testing.assert_array_equal(got, bufs[full.output])

    den = BACKEND.load_denoiser(tmp_path / "p")
    assert isinstance(den, CachedFpgaDenoiser)
    v = verify(cached_int8, tmp_path / "p", samples=2)
    assert v["exit_code"] == 0 and v["verified"] and v["psnr_db"] >= 25.0
    assert v["cache"]["full_steps"] == [0, 2]  # compared with the cached PyTorch sampler
    rr = v["runtime_report"]
    assert rr["consistent"] is True and rr["cache"]["calls"] == {"full": 2, "shallow": 2}
    assert {c["call"] for c in rr["csim"]} <= {"full", "shallow"} and rr["csim_identical"] == rr["csim_calls"] > 0


@pytest.mark.slow
def test_a_model_the_program_does_not_cover_says_why_there_is_no_shallow_call(tmp_path: Path) -> None:
    from edgediff.fpga.project import BACKEND

    from edgediff.testing import minmax_quantize

    m = cached(minmax_quantize(micro_unet()), sampler="ddim", steps=4)  # no output requantization
    c = BACKEND.export(m, tmp_path / "p", "int8").to_dict()["cache"]
    assert c["exported"] is False and "full call only" in c["reason"] and "float output" in c["reason"]
    assert not (tmp_path / "p" / "call_shallow").exists()
