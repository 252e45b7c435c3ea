"""Core ML exports of a DeepCache artifact: one multifunction package (full + shallow), or two packages for
iOS 17; the structural check of both entry points; verify says exit 3 off macOS."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
from deepcache_fixtures import cached, export_cached, micro_unet
from edgediff.exporters import get_backend

ct = pytest.importorskip("coremltools", reason="Core ML packages are converted by coremltools")
off_mac = pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS Core ML predicts: verify runs it")


@off_mac
def test_cached_artifact_exports_two_functions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgediff.exporters.coreml_deepcache import cache_record, check_cached

    from edgediff.cli import main

    m, rc, rep, out = export_cached(micro_unet(), tmp_path, "coreml", "u.mlpackage", capsys)
    assert rc == 0
    assert rep["cache"]["layout"] == "multifunction" and rep["cache"]["full_steps"] == [0, 2, 4]
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert spec.description.defaultFunctionName == "full"
    fns = {f.name: ([i.name for i in f.input], [o.name for o in f.output]) for f in spec.description.functions}
    assert fns == {"full": (["sample", "timestep"], ["out", "cached_feature"]),
                   "shallow": (["sample", "timestep", "cached_feature"], ["out"])}
    feat = m.extras["cache"]["feature_shape"]
    info = get_backend("coreml").info(out)
    assert info["functions"]["shallow"]["inputs"]["cached_feature"]["shape"] == [1, *feat]
    assert set(info["inputs"]) == {"sample", "timestep"}  # the default function: the full call

    assert main(["verify", str(tmp_path / "art"), str(out), "--samples", "1", "--json"]) == 3
    v = json.loads(capsys.readouterr().out)
    assert v["verified"] is False and "macOS" in v["reason"]
    assert v["check"]["ok"], v["check"]["problems"]
    assert v["check"]["cache"]["functions"] == ["full", "shallow"]
    # the check compares the feature both functions pass with the artifact's schedule
    from edgediff.exporters.coreml import OUTPUT_NAME, coreml_info
    from edgediff.exporters.coreml_deepcache import OUTPUT_NAME as CACHED_OUT

    assert CACHED_OUT == OUTPUT_NAME
    rec = cache_record(out)
    assert rec is not None and check_cached(out, rec, coreml_info) == []
    bad = check_cached(out, {**rec, "feature_shape": [3, 3, 3]}, coreml_info)
    assert any("cached_feature shape" in p for p in bad)


@pytest.mark.slow
@off_mac
def test_ios17_target_writes_two_packages(tmp_path: Path) -> None:
    from edgediff.exporters.coreml_deepcache import shallow_path

    out = tmp_path / "u.mlpackage"
    rep = get_backend("coreml").export(cached(micro_unet()), out, "fp16", {"deployment_target": "iOS17"}).to_dict()
    side = shallow_path(out)
    assert rep["cache"]["layout"] == "two packages" and rep["cache"]["shallow_package"] == side.name
    assert get_backend("coreml").info(side)["inputs"]["cached_feature"]
    chk = get_backend("coreml").check(out)
    assert chk["ok"], chk["problems"]
    import shutil

    shutil.rmtree(side)
    chk = get_backend("coreml").check(out)
    assert not chk["ok"] and "shallow package is missing" in chk["problems"][0]
