"""The conventional CLI: global --threads and --verbose, third-party logs captured, device names in help."""

from __future__ import annotations

import logging

import pytest
from edgediff.exporters import base

from edgediff.cli import main, quiet_third_party


def test_threads_option_reaches_the_runtimes(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "recipes", "--json"]) == 0
        assert base.threads() == 1 and torch.get_num_threads() == 1
    finally:
        base.set_threads(None)
        torch.set_num_threads(before)
    assert main(["--threads", "0", "recipes"]) == 2  # out of range: a usage error
    capsys.readouterr()


def test_third_party_logs_go_to_the_log_file_not_stderr(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    import warnings

    from edgediff.cli import CAPTURED, write_captured_log

    try:
        logging.captureWarnings(False)  # pytest restored showwarning after an earlier main(): install afresh
        quiet_third_party(verbose=False)
        CAPTURED.lines.clear()
        logging.getLogger("coremltools").warning("Missing quantization parameter for op 7")
        logging.getLogger("absl").error("I0000 delegate applied")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("TracerWarning: converting a tensor to a Python boolean", stacklevel=1)
        assert write_captured_log(tmp_path) == tmp_path / "edgediff.log"
        text = (tmp_path / "edgediff.log").read_text()
        assert "coremltools: Missing quantization parameter" in text and "absl: I0000" in text
        assert "TracerWarning" in text
        assert capfd.readouterr().err == ""  # none of it on the terminal
        quiet_third_party(verbose=True)  # --verbose: the library's own handlers/stderr again
        assert CAPTURED not in logging.getLogger("coremltools").handlers
        assert logging.getLogger("coremltools").propagate
    finally:
        logging.captureWarnings(False)
        CAPTURED.lines.clear()


def test_profile_help_lists_device_names(capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.profiling.estimate import device_names

    main(["profile", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in device_names():
        assert name in text


def test_demo_summary_table_fits_80_columns() -> None:
    from rich.console import Console

    from edgediff.demo.job import summary_table

    row = {"params": 35_746_307, "macs": 6_065_000_000, "size_bytes": 143_000_000, "digit_frechet": 12.34,
           "confidence_share": 0.5}
    summary = {"wall_seconds": 1234.5, "rows": [
        {"step": "original (fp32)", "psnr_db": None, **row},
        {"step": "compressed (prune.diff + finetune + fuse + calib + quant)", "psnr_db": 23.1, **row}],
        "exports": [{"target": "tensorrt", "precision": "fp16", "size_bytes": None,
                     "status": "unavailable: wrote x.onnx and x.trtexec.sh; the engine was not built " * 3},
                    {"target": "tflite", "precision": "int8", "size_bytes": 1_234_567, "status": "exported",
                     "verify": {"verified": True, "psnr_db": 31.25, "exit_code": 0}}]}
    c = Console(width=80, record=True)
    c.print(summary_table(summary))
    text = c.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "65.7M" not in text and "6.07G" in text and "31.25 dB" in text


def test_native_output_of_exports_is_captured(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    base.NATIVE_LOG.clear()
    try:
        base.capture_native_output(True)
        with base.native_output_captured():
            os.write(2, b"I0000 00:00 port.cc:153] oneDNN custom operations are on\n")
            os.write(1, b"(00:00) [START] LiteRT-Torch Convert\n")
            print("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
        assert capfd.readouterr() == ("", "")
        assert any("oneDNN" in ln for ln in base.NATIVE_LOG) and any("XNNPACK" in ln for ln in base.NATIVE_LOG)
        base.capture_native_output(False)  # --verbose: straight through
        with base.native_output_captured():
            os.write(2, b"shown\n")
        assert capfd.readouterr().err == "shown\n"
    finally:
        base.capture_native_output(False)
        base.NATIVE_LOG.clear()
