"""The main job end to end on the bundled model (small sample count to keep CI fast)."""

from __future__ import annotations

import json
from pathlib import Path

from edgediff.artifact import load_artifact
from edgediff.cli import main
from edgediff.loaders import DEMO_DIR, load_model


def test_bundled_demo_model_loads_and_is_small() -> None:
    m = load_model("demo")
    assert m.arch == "UNet2DModel" and m.signature.sample_shape == (1, 16, 16)
    assert m.provenance["source"] == "demo"

    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 8 * 2**20  # "a few MB at most"


def test_demo_command_writes_artifact_report_and_summary(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", "-o", str(out), "--samples", "8", "--steps", "5", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"][0]["step"].startswith("original") and summary["rows"][0]["psnr_db"] is None
    comp = summary["rows"][1]
    assert comp["params"] > 0 and comp["macs"] > 0 and 0 <= comp["confidence_share"] <= 1
    assert {e["target"] for e in summary["exports"]} >= {"onnx", "tflite", "coreml", "opencl", "fpga", "tensorrt"}
    for name in ("manifest.json", "report.html", "model"):
        assert (out / name).exists(), name
    html = (out / "report.html").read_text()
    assert "What each step cost and bought" in html and html.count("data:image/png;base64,") >= 2
    # the demo directory is a loadable artifact
    m = load_artifact(out)
    assert m.signature.sample_shape == (1, 16, 16)
    # refuses to overwrite without --force
    assert main(["demo", "-o", str(out), "--samples", "8", "--steps", "5"]) == 2
