"""OpenVINO target: IR export in every precision, the runtime as a Denoiser, PERF_COUNT profiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from edgediff.exporters import get_backend, target_of

from edgediff.errors import BadInput
from edgediff.sampling import TorchDenoiser
from edgediff.testing import minmax_quantize

ov = pytest.importorskip("openvino", reason="OpenVINO is an optional runtime: pip install 'edgediff[openvino]'")


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_cond_unet", "tiny_dit"])
def test_fp32_ir_matches_pytorch_with_dynamic_batch(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    out = tmp_path / "m.xml"
    rep = get_backend("openvino").export(model, out, "fp32")
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert rep["size_bytes"] == out.stat().st_size + out.with_suffix(".bin").stat().st_size
    assert target_of(out) == "openvino"
    den = get_backend("openvino").load_denoiser(out)
    ref = TorchDenoiser(model)
    for batch in (1, 3):
        inp = model.example_inputs(batch, seed=batch)
        cond = inp.get("encoder_hidden_states", inp.get("class_labels"))
        got = den(inp["sample"], inp["timestep"], cond)
        want = ref(inp["sample"], inp["timestep"], cond)
        # f32 inference precision is forced: bf16 (OpenVINO's CPU default here) would be ~1e-2 off
        assert float((got - want).abs().max()) < 1e-4
    chk = get_backend("openvino").check(out, model)
    assert chk["ok"], chk["problems"]


def test_fp16_ir_stores_half_weights(tiny_unet, tmp_path: Path) -> None:
    b = get_backend("openvino")
    b.export(tiny_unet, tmp_path / "a.xml", "fp32")
    b.export(tiny_unet, tmp_path / "b.xml", "fp16")
    # weights (the .bin) halve; the .xml graph text stays about the same
    assert (tmp_path / "b.bin").stat().st_size < 0.55 * (tmp_path / "a.bin").stat().st_size
    assert b.info(tmp_path / "b.xml")["precision"] == "fp16"
    inp = tiny_unet.example_inputs(2, seed=1)
    got = b.load_denoiser(tmp_path / "b.xml")(inp["sample"], inp["timestep"])
    want = TorchDenoiser(tiny_unet)(inp["sample"], inp["timestep"])
    err = float((got - want).abs().max())
    assert 0 < err < 2e-2  # weights really rounded to half, and close


def test_int8_ir_runs_quantized_kernels(tiny_unet, tmp_path: Path) -> None:
    q = minmax_quantize(tiny_unet)
    out = tmp_path / "q.xml"
    rep = get_backend("openvino").export(q, out, "int8")
    assert rep["fake_quantize"] > 0
    info = get_backend("openvino").info(out)
    assert info["precision"] == "int8"
    inp = tiny_unet.example_inputs(2, seed=3)
    got = get_backend("openvino").load_denoiser(out)(inp["sample"], inp["timestep"])
    sim = TorchDenoiser(q)(inp["sample"], inp["timestep"])
    flt = TorchDenoiser(tiny_unet)(inp["sample"], inp["timestep"])
    assert float((got - sim).abs().mean()) < 0.05
    assert float((got - flt).abs().max()) > 1e-3  # really quantized
    from edgediff.exporters.openvino import profile_openvino

    prof = profile_openvino(out, warmup=1, repeats=2, threads=1)
    # the CPU plugin executed the convolutions with int8 kernels (exec types like jit_avx512_I8 / *_I8)
    assert any("I8" in k.upper() or "U8" in k.upper() for k in prof["exec_types"]), prof["exec_types"]


def test_verify_runs_on_the_openvino_runtime(tiny_unet, tmp_path: Path) -> None:
    from edgediff.verify import verify

    out = tmp_path / "m.xml"
    get_backend("openvino").export(tiny_unet, out, "fp32")
    r = verify(tiny_unet, out, steps=3, samples=2)
    assert r["verified"] is True and r["exit_code"] == 0, r
    assert r["psnr_db"] > 60


def test_profile_layers_map_to_modules(tiny_unet, tmp_path: Path) -> None:
    from edgediff.profiling.run import profile

    out = tmp_path / "m.xml"
    get_backend("openvino").export(tiny_unet, out, "fp32")
    res = profile(out, repeats=3, warmup=1)
    assert res["runtime"] == "openvino" and res["total_ms"] > 0
    names = {la["name"] for la in res["layers"]}
    assert "down_blocks.0.resnets.0.conv1" in names
    assert abs(sum(la["share"] for la in res["layers"]) - 1) < 1e-6


def test_bad_outputs_and_files(tiny_unet, tmp_path: Path) -> None:
    b = get_backend("openvino")
    with pytest.raises(BadInput, match=r"\.xml"):
        b.export(tiny_unet, tmp_path / "m.onnx", "fp32")
    with pytest.raises(BadInput, match="int8"):
        b.export(tiny_unet, tmp_path / "m.xml", "int8")  # no QuantParams
    lonely = tmp_path / "lonely.xml"
    lonely.write_text("<net/>")
    with pytest.raises(BadInput, match="lonely.bin"):
        b.info(lonely)
    bad = tmp_path / "bad.xml"
    bad.write_text("not xml at all")
    bad.with_suffix(".bin").write_bytes(b"\0" * 8)
    with pytest.raises(BadInput, match="bad.xml"):
        b.info(bad)
    b.export(tiny_unet, tmp_path / "m.xml", "fp32")
    with pytest.raises(BadInput, match="already exists"):
        b.export(tiny_unet, tmp_path / "m.xml", "fp32")
    assert not [p for p in tmp_path.iterdir() if "edgediff-tmp" in p.name]  # no debris


def test_export_does_not_modify_the_model(tiny_unet, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_unet.denoiser.state_dict().items()}
    get_backend("openvino").export(tiny_unet, tmp_path / "m.xml", "fp16")
    after = tiny_unet.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_signals_still_handled_after_an_openvino_compile(tmp_path: Path) -> None:
    """OpenVINO's CPU plugin leaves the thread's alternate signal stack dangling once freed; Python's
    SIGTERM/SIGINT handlers run on that stack, so Ctrl-C after a run segfaulted (runtime.openvino
    keeps the caller's stack). In a child process: the crash must not take the test worker with it."""
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(
        "import faulthandler, gc, os, signal, time\n"
        "faulthandler.enable()  # an alternate signal stack of Python's own, as under pytest\n"
        "import numpy as np, openvino as ov\n"
        "from pathlib import Path\n"
        "from edgediff.runtime.openvino import OpenVinoEntry\n"
        f"d = Path({str(tmp_path)!r})\n"
        "x = ov.opset13.parameter([-1, 4], np.float32, name='x')\n"
        "ov.save_model(ov.Model([ov.opset13.relu(x)], [x]), str(d / 'm.xml'))\n"
        "e = OpenVinoEntry(d / 'm.xml')\n"
        "assert e.run(e.outputs, {'x': np.ones((2, 4), np.float32)})[0].sum() == 8\n"
        "del e; gc.collect()\n"
        "hit = []\n"
        "signal.signal(signal.SIGTERM, lambda s, f: hit.append(s))\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "print('handled' if hit else 'not handled')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "handled", (r.returncode, r.stdout, r.stderr[-2000:])
