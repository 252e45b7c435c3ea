"""Fuzzing the files an artifact or recipe is read from: whatever the mutation, the CLI exits 0 or 2,
never 1 (a bug) and never with a traceback. Bounded to a few seconds of examples in CI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgediff.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**13) | st.floats(allow_nan=True)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8)
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import UNet2DModel

    from edgediff.artifact import write_artifact
    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    m = DiffusionModel(unet, NoiseSchedule.from_config({}), InputSignature((1, 8, 8)), "UNet2DModel", dict(unet.config),
                       {"source": "test"}, extras={"probe": {"w": torch.ones(2)}})
    root = tmp_path_factory.mktemp("fuzz")
    write_artifact(m, root / "art", {})
    return root / "art"


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    """Replace or delete one node of the document with arbitrary JSON."""
    paths = _paths(doc)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON)
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc in (0, 2), err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("target", ["manifest.json", "model/structure.json", "extras/probe.json",
                                    "model/config.json"])
@FUZZ
@given(data=st.data())
def test_fuzz_artifact_json(artifact: Path, tmp_path_factory: pytest.TempPathFactory, target: str,
                            data: st.DataObject, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path_factory.mktemp("case") / "art"
    shutil.copytree(artifact, work)
    doc = json.loads((work / target).read_text())
    (work / target).write_text(json.dumps(_mutate(doc, data)))
    _run(["info", work, "--json"], capsys)


@FUZZ
@given(data=st.data())
def test_fuzz_recipe_toml(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff.recipe import load_recipe

    recipe = {"name": "f", "description": "fuzz", "pass": [{"name": "finetune", "steps": 2}]}
    doc = _mutate(recipe, data)
    folder = tmp_path_factory.mktemp("recipe")
    toml = _to_toml(doc)
    if toml is None:
        return
    f = folder / "r.toml"
    f.write_text(toml)
    try:
        load_recipe(str(f))
    except Exception as e:  # noqa: BLE001 - only our one-line error is acceptable
        from edgediff.errors import BadInput

        assert isinstance(e, BadInput), repr(e)
        assert "r.toml" in str(e), str(e)


def _to_toml(doc: Any) -> str | None:
    """A tiny TOML writer for the shapes the mutator makes; None when TOML cannot express it."""
    if not isinstance(doc, dict):
        return None

    def val(v: Any) -> str | None:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list) and all(not isinstance(x, (dict, list)) and x is not None for x in v):
            parts = [val(x) for x in v]
            return None if None in parts else "[" + ", ".join(parts) + "]"  # type: ignore[arg-type]
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) and x is not None for x in v.values()):
            parts = [f"{json.dumps(k)} = {val(x)}" for k, x in v.items()]
            return "{" + ", ".join(parts) + "}"
        return None

    lines, tables = [], []
    for k, v in doc.items():
        if k == "pass" and isinstance(v, list) and all(isinstance(p, dict) for p in v):
            tables = v
            continue
        s = val(v)
        if s is None:
            return None
        lines.append(f"{json.dumps(k)} = {s}")
    for p in tables:
        lines.append("[[pass]]")
        for k, v in p.items():
            s = val(v)
            if s is None:
                return None
            lines.append(f"{json.dumps(k)} = {s}")
    return "\n".join(lines) + "\n"
