"""Pass manager, recipes and artifacts: atomic, reproducible, never touching the input."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from edgediff import passes
from edgediff.artifact import _umask, atomic_file, load_artifact
from edgediff.cli import main
from edgediff.errors import BadInput
from edgediff.loaders import sha256_of
from edgediff.pipeline import compress, run_recipe
from edgediff.recipe import Recipe, load_recipe, parse


def _out(m, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return m.module()(**m.example_inputs(batch)).float()


def test_none_recipe_artifact_roundtrip(tmp_path: Path, tiny_unet) -> None:
    model, manifest = compress(tiny_unet, load_recipe("none"), tmp_path / "a")
    art = tmp_path / "a"
    assert {"manifest.json", "model", "scheduler_config.json"} <= {p.name for p in art.iterdir()}
    assert (art.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    m = json.loads((art / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["recipe"]["name"] == "none" and m["metrics"]["before"]["params"] > 0
    back = load_artifact(art)
    torch.testing.assert_close(_out(back), _out(tiny_unet))


def test_fp16_recipe_halves_bytes_and_reloads(tmp_path: Path, tiny_unet) -> None:
    model, manifest = compress(tiny_unet, load_recipe("fp16"), tmp_path / "a")
    b, a = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert a["params"] == b["params"] and a["size_bytes"] < 0.55 * b["size_bytes"]
    back = load_artifact(tmp_path / "a")
    assert any(p.dtype == torch.float16 for p in back.denoiser.parameters())
    ref = _out(tiny_unet)
    torch.testing.assert_close(_out(back), _out(model))
    assert (_out(back) - ref).abs().max() < 5e-2  # fp16 rounding, not garbage
    assert all(p.dtype == torch.float32 for p in tiny_unet.denoiser.parameters())  # input untouched


def test_same_model_recipe_seed_gives_identical_weights(tmp_path: Path, tiny_unet) -> None:
    compress(tiny_unet, load_recipe("fp16"), tmp_path / "a", seed=7)
    compress(tiny_unet, load_recipe("fp16"), tmp_path / "b", seed=7)
    wa = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    wb = (tmp_path / "b" / "model" / "model.safetensors").read_bytes()
    assert wa == wb


@dataclass
class _BoomOptions:
    when: str = "now"


def test_interrupted_compress_leaves_nothing(tmp_path: Path, tiny_unet, monkeypatch) -> None:
    @passes.register("test.boom", _BoomOptions)
    def boom(model, opts, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(passes._MODULES, "test.boom", "tests.none")
    r = Recipe("boom", passes=[parse('[[pass]]\nname = "test.boom"', "t").passes[0]])
    with pytest.raises(KeyboardInterrupt):
        compress(tiny_unet, r, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_after_passes_leaves_nothing(tmp_path: Path, tiny_unet, monkeypatch) -> None:
    import edgediff.artifact as art

    def broken(model, folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(art, "write_model_files", broken)
    with pytest.raises(OSError):
        compress(tiny_unet, load_recipe("none"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_then_replaced_with_force(tmp_path: Path, tiny_unet) -> None:
    compress(tiny_unet, load_recipe("none"), tmp_path / "a")
    with pytest.raises(BadInput, match="already exists"):
        compress(tiny_unet, load_recipe("none"), tmp_path / "a")
    compress(tiny_unet, load_recipe("fp16"), tmp_path / "a", force=True)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["recipe"]["name"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cli_compress_does_not_modify_input(tmp_path: Path, tiny_unet, capsys) -> None:
    tiny_unet.denoiser.save_pretrained(tmp_path / "in")
    before = sha256_of(tmp_path / "in")
    rc = main(["compress", str(tmp_path / "in"), "--recipe", "fp16", "-o", str(tmp_path / "out"), "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source_sha256"] == before == sha256_of(tmp_path / "in")
    assert data["passes"][0]["name"] == "fp16"


def test_recipe_errors(tmp_path: Path, tiny_unet, monkeypatch) -> None:
    with pytest.raises(BadInput, match="unknown recipe"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "r.toml"
    bad.write_text('[[pass]]\nname = "fp16"\nnot_an_option = 1\n')
    with pytest.raises(BadInput, match="not_an_option"):
        run_recipe(tiny_unet, load_recipe(str(bad)))
    bad.write_text("[[pass]\nname=")
    with pytest.raises(BadInput, match="TOML"):
        load_recipe(str(bad))
    bad.write_text('[[pass]]\nname = "warp.drive"\n')
    with pytest.raises(BadInput, match="unknown pass"):
        load_recipe(str(bad))
    # ordering rules declared at registration are checked when the recipe is planned, before any pass runs
    r = parse('[[pass]]\nname = "quant"\n', "t")
    with pytest.raises(BadInput, match="needs 'calib' before it"):
        run_recipe(tiny_unet, r)
    r = parse('[[pass]]\nname = "calib"\n[[pass]]\nname = "prune.diff"\n', "t")
    with pytest.raises(BadInput, match="must run before 'calib'"):
        run_recipe(tiny_unet, r)
    r = parse('[[pass]]\nname = "fp16"\n[[pass]]\nname = "calib"\n[[pass]]\nname = "quant"\n', "t")
    with pytest.raises(BadInput, match="'quant' must run before 'fp16'"):  # at planning, not in quant's body
        run_recipe(tiny_unet, r)


def test_cli_exit_codes_for_contract_commands(tmp_path: Path, capsys, monkeypatch) -> None:

    assert main(["recipes", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)["recipes"]}
    assert {"none", "fp16", "prune-diff", "prune-ld", "w8a8", "w4a8", "w4a8-ptqd", "edge"} <= names
    assert main(["export", "demo", "--target", "vhs", "-o", str(tmp_path / "x")]) == 2
    assert main(["export", "demo", "--target", "onnx", "--precision", "int3", "-o", str(tmp_path / "x")]) == 2
    assert main(["compress", "demo", "--recipe", "nope", "-o", str(tmp_path / "y")]) == 2
    assert main(["info", "demo", "--sample-shape", "a,b"]) == 2
    assert main(["no-such-command"]) == 2


def test_atomic_file_has_normal_permissions(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    assert ((tmp_path / "f.txt").stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_json_stdout_is_one_object_even_when_libraries_print(capsys, monkeypatch) -> None:
    import edgediff.describe as describe

    def chatty(target, load):
        print("(00:00) [START] some converter progress")  # what litert-torch does on stdout
        return {"params": 1, "macs": 2, "size_bytes": 3}

    monkeypatch.setattr(describe, "describe", chatty)
    assert main(["info", "demo", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"params": 1, "macs": 2, "size_bytes": 3}
    assert "converter progress" in cap.err


def test_set_submodule_swaps_nested_and_indexed_children() -> None:
    from torch import nn

    from edgediff.model import set_submodule

    root = nn.Module()
    root.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ReLU())])
    old = set_submodule(root, "blocks.0.1", nn.Identity())
    assert isinstance(old, nn.ReLU) and isinstance(root.blocks[0][1], nn.Identity)
    assert "blocks.0.1" in dict(root.named_modules())
    set_submodule(root, "blocks", nn.ModuleList())
    assert len(root.blocks) == 0
