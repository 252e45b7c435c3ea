"""`edgediff export` / `edgediff verify` on the command line: exit codes and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgediff.exporters import tensorrt as et

from edgediff.cli import main


@pytest.fixture
def model_dir(tiny_unet, tmp_path: Path) -> Path:
    d = tmp_path / "unet"
    tiny_unet.denoiser.save_pretrained(d)
    return d


def test_export_then_verify_json(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--target", "onnx", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["size_bytes"] == out.stat().st_size and rep["precision"] == "fp32"
    assert main(["verify", str(model_dir), str(out), "--steps", "2", "--samples", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] is True and res["exit_code"] == 0 and res["target"] == "onnx"
    assert {"psnr_db", "max_abs_err", "samples", "steps", "tolerance"} <= set(res)


def test_info_on_exported_onnx(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--target", "onnx", "--precision", "fp16", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["target"] == "onnx" and info["precision"] == "fp16" and info["size_bytes"] == out.stat().st_size
    assert info["params"] > 0


@pytest.mark.parametrize("args, message", [
    (["--target", "nope"], "unknown target"),
    (["--target", "onnx", "--precision", "int9"], "unknown precision"),
    (["--target", "onnx", "--precision", "int8"], "quantization parameters"),
])
def test_bad_requests_exit_2(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                             message: str) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_force(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    out.write_text("precious")
    assert main(["export", str(model_dir), "--target", "onnx", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "precious"
    assert main(["export", str(model_dir), "--target", "onnx", "-o", str(out), "--force"]) == 0
    assert out.stat().st_size > 1000


def test_unwritable_directory_exit_2(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    assert main(["export", str(model_dir), "--target", "onnx", "-o", str(blocker / "sub" / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and "Traceback" not in err


def test_verify_out_of_tolerance_exit_4(model_dir: Path, tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--target", "onnx", "-o", str(out)]) == 0
    other = tmp_path / "other"
    m = tiny_unet.clone().denoiser
    m.conv_out.weight.data.mul_(2)
    m.save_pretrained(other)
    assert main(["verify", str(other), str(out), "--steps", "2", "--samples", "1", "--json"]) == 4


@pytest.mark.skipif(et._tensorrt()[0] is not None, reason="TensorRT and a GPU are present here")
def test_tensorrt_without_tensorrt_exit_3(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.engine"
    assert main(["export", str(model_dir), "--target", "tensorrt", "--precision", "fp16", "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "trtexec" in err
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.trtexec.sh").is_file() and not out.exists()
    assert main(["verify", str(model_dir), str(out), "--steps", "2", "--samples", "1", "--json"]) == 3
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] is False and res["check"]["ok"]
