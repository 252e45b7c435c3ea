"""The main job end to end on the bundled model (small sample count to keep CI fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgediff.exporters import get_backend

from edgediff.artifact import load_artifact
from edgediff.cli import main
from edgediff.loaders import DEMO_DIR, load_model


def test_bundled_demo_model_loads_and_is_small() -> None:
    m = load_model("demo")
    assert m.arch == "UNet2DModel" and m.signature.sample_shape == (1, 16, 16)
    assert m.provenance["source"] == "demo"

    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 8 * 2**20  # "a few MB at most"


# What this machine explicitly cannot do: TensorRT needs its package and an NVIDIA GPU to build an
# engine (the export writes the ONNX and the trtexec script, then says "unavailable").
UNAVAILABLE_HERE = {"tensorrt"}


def export_problems(summary: dict[str, Any], out: Path) -> list[str]:
    """Every export of the demo must be written and verified (exit 0), except that a target in
    UNAVAILABLE_HERE may say "unavailable", and a file whose runtime is not here (its backend's
    runtime_available(file) says so: Core ML off macOS, an FPGA project without a runnable call)
    must verify with exit 3 and a reason. Anything else is a failure of the demo."""
    problems = []
    for e in summary["exports"]:
        what = f"{e['target']} {e['precision']}"
        status, v = e.get("status", ""), e.get("verify") or {}
        if e["target"] in UNAVAILABLE_HERE and status.startswith("unavailable"):
            continue
        if status != "exported":
            problems.append(f"{what}: {status}")
            continue
        runs = True
        if not e.get("fast"):  # the fast composition is an ONNX bundle: onnxruntime, always here
            runs, why = get_backend(e["target"]).runtime_available(out / e["path"])
        if runs and not (v.get("verified") is True and v.get("exit_code") == 0):
            problems.append(f"{what}: runtime here but verify gave {v.get('exit_code')}: {v.get('reason')}")
        if not runs and not (v.get("verified") is False and v.get("exit_code") == 3 and v.get("reason")):
            problems.append(f"{what}: runtime not here ({why}) but verify gave {v}")
    return problems


def test_export_problems_fails_a_failed_or_unverified_target(tmp_path: Path) -> None:
    ok = {"target": "onnx", "precision": "fp32", "status": "exported", "path": "exports/onnx-fp32.onnx",
          "verify": {"verified": True, "exit_code": 0}}
    trt = {"target": "tensorrt", "precision": "fp16", "status": "unavailable: no GPU"}
    mac = {"target": "coreml", "precision": "fp16", "status": "exported", "path": "exports/coreml-fp16.mlpackage",
           "verify": {"verified": False, "exit_code": 3, "reason": "needs macOS"}}
    assert export_problems({"exports": [ok, trt]}, tmp_path) == []
    failed = {**ok, "status": "failed: RuntimeError: boom"}
    off = {**ok, "verify": {"verified": False, "exit_code": 4, "reason": "PSNR 12 dB"}}
    silent = {**ok, "precision": "int8", "status": "skipped: model has no quantization parameters"}
    assert len(export_problems({"exports": [failed, off, silent]}, tmp_path)) == 3
    if not get_backend("coreml").runtime_available(None)[0]:  # off macOS: exit 3 is the honest answer
        assert export_problems({"exports": [mac]}, tmp_path) == []
        assert export_problems({"exports": [{**mac, "verify": {"verified": True, "exit_code": 0}}]}, tmp_path)


def test_demo_command_writes_artifact_report_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "-o", str(out), "--samples", "8", "--steps", "5", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"][0]["step"].startswith("original") and summary["rows"][0]["psnr_db"] is None
    comp = summary["rows"][1]
    assert comp["params"] > 0 and comp["macs"] > 0 and 0 <= comp["confidence_share"] <= 1
    assert {e["target"] for e in summary["exports"]} >= {"onnx", "tflite", "coreml", "opencl", "fpga", "tensorrt"}
    assert export_problems(summary, out) == []
    for name in ("manifest.json", "report.html", "model"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    assert "What each step cost and bought" in html and html.count("data:image/png;base64,") >= 2
    # the demo directory is a loadable artifact
    m = load_artifact(out)
    assert m.signature.sample_shape == (1, 16, 16)
    # refuses to overwrite without --force
    assert main(["demo", "-o", str(out), "--samples", "8", "--steps", "5"]) == 2
