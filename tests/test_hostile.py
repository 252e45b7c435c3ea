"""Hostile inputs: files from someone else must not run code, escape their folder, modify inputs
or crash; each is exit 2 with one line naming the file (docs/security.md).

Most cases call the CLI in-process (fast); the code-execution repros run as subprocesses,
exactly as a user would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from edgediff.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")


# ---------------------------------------------------------------- helpers
def sha(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_bad(rc: int, err: str, names: str | Path, code: int = 2) -> None:
    """Exit `code`, no traceback, exactly one error line, naming the file."""
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("edgediff: error:")]
    assert len(lines) == 1, err
    assert str(names) in lines[0], err


def run_subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "edgediff", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


class TinyNet(nn.Module):
    """A stand-in denoiser for .pt2 archives: quick to export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.conv(sample) + timestep[:, None, None, None] * 0.001


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny artifact and a tiny .pt2, built once for the module."""
    from diffusers import UNet2DModel

    from edgediff.artifact import write_artifact
    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.schedule import NoiseSchedule

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8).eval()
    m = DiffusionModel(unet, NoiseSchedule.from_config({}), InputSignature((1, 8, 8)), "UNet2DModel", dict(unet.config),
                       {"source": "test"}, extras={"probe": {"w": torch.ones(3), "note": "x"}})
    write_artifact(m, root / "art", {})
    net = TinyNet().eval()
    args = (torch.randn(2, 1, 8, 8), torch.full((2,), 500.0))
    ep = torch.export.export(net, args, dynamic_shapes=({0: torch.export.Dim.AUTO}, {0: torch.export.Dim.AUTO}))
    torch.export.save(ep, str(root / "net.pt2"))
    return root


@pytest.fixture
def art(work: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "art"
    shutil.copytree(work / "art", dest)
    return dest


def edit_json(path: Path, fn) -> None:  # noqa: ANN001 - a small mutator
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def rewrite_pt2(src: Path, dst: Path, fn) -> None:  # noqa: ANN001 - fn(name, bytes) -> bytes | None
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = fn(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)


def patch_program(src: Path, dst: Path, fn) -> None:  # noqa: ANN001 - fn(program dict)
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            prog = json.loads(data)
            fn(prog)
            return json.dumps(prog).encode()
        return data

    rewrite_pt2(src, dst, change)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- 1. structure.json class allowlist
@pytest.mark.parametrize("cls,init", [
    ("edgediff.artifact.os.system", {"command": "touch {marker}"}),
    ("edgediff.artifact.shutil.rmtree", {"path": "{victim}"}),
    ("builtins.eval", {}),
    ("torch.nn.modules.conv.os.system", {"command": "touch {marker}"}),
    ("posix.system", {"command": "touch {marker}"}),
])
def test_structure_class_outside_table_runs_nothing(art: Path, tmp_path: Path, cls: str, init: dict,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    marker, victim = tmp_path / "MARKER", tmp_path / "victim"
    victim.mkdir()
    init = {k: v.format(marker=marker, victim=victim) for k, v in init.items()}
    edit_json(art / "model" / "structure.json",
              lambda s: s.__setitem__("replaced", [{"name": "conv_x", "class": cls, "init": init}]))
    before = sha(art)
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, "structure.json")
    assert not marker.exists() and victim.is_dir() and sha(art) == before


def test_structure_os_system_repro_subprocess(art: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    edit_json(art / "model" / "structure.json", lambda s: s.__setitem__(
        "replaced", [{"name": "conv_x", "class": "edgediff.artifact.os.system", "init": {"command": f"touch {marker}"}}]))
    r = run_subprocess(["info", art], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "structure.json" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_structure_v1_dotted_alias_still_loads(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # what version-1 artifacts contain for a replaced module: the dotted class path
    edit_json(art / "model" / "structure.json", lambda s: s.update(version=1, replaced=[
        {"name": "conv_in", "class": "torch.nn.modules.conv.Conv2d",
         "init": {"in_channels": 1, "out_channels": 8, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                  "dilation": [1, 1], "groups": 1, "bias": True}}]))
    rc, err = cli(["info", art, "--json"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("mutate,what", [
    (lambda s: s.__setitem__("attrs", {"conv_in": {"forward": "x"}}), "forward"),
    (lambda s: s.__setitem__("attrs", {"conv_in": {"padding": {"a": 1}}}), "padding"),
    (lambda s: s.__setitem__("attrs", {"conv_in": {"weight": 1.0}}), "weight"),
    (lambda s: s.__setitem__("attrs", {"conv_in": {"_conv_forward": 1}}), "_conv_forward"),
    (lambda s: s.__setitem__("attrs", {"no_such.module": {"x": 1}}), "no_such.module"),
    (lambda s: s.__setitem__("replaced", [{"name": "conv_x", "class": "torch.Linear",
                                            "init": {"in_features": 10**12, "out_features": 10**12}}]), "out of range"),
    (lambda s: s.__setitem__("replaced", [{"name": "../x", "class": "torch.Identity", "init": {}}]), "../x"),
    (lambda s: s.__setitem__("replaced", [{"name": "forward", "class": "torch.Identity", "init": {}}]), "forward"),
    (lambda s: s.__setitem__("replaced", [{"name": "conv_x", "class": 123, "init": {}}]), "class name"),
    (lambda s: s.__setitem__("replaced", [{"name": "conv_x", "class": "torch.Conv2d",
                                            "init": {"kernel_size": [[3]]}}]), "kernel_size"),
    (lambda s: s.__setitem__("replaced", "nope"), "must be a list"),
])
def test_structure_values_are_type_checked(art: Path, mutate, what: str,  # noqa: ANN001
                                           capsys: pytest.CaptureFixture[str]) -> None:
    edit_json(art / "model" / "structure.json", mutate)
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, "structure.json")
    assert what in err


def test_registry_is_exact_and_stable() -> None:
    from edgediff.passes.skip_modules import SkipResnet
    from edgediff.serialize import ALIASES, class_for, registered_classes, stable_name

    table = registered_classes()
    assert table["skip_resnet"] is SkipResnet and stable_name(SkipResnet) == "skip_resnet"
    assert class_for("edgediff.passes.skip_modules.SkipResnet") is SkipResnet
    assert all(v in table for v in ALIASES.values())
    with pytest.raises(Exception, match="not in edgediff's table"):
        class_for("edgediff.passes.skip_modules.os")


# ---------------------------------------------------------------- 2. .pt2 archives
def test_pt2_pickled_sample_inputs_never_unpickled_subprocess(work: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save((Evil(marker),), buf)
    evil = tmp_path / "evil.pt2"
    rewrite_pt2(work / "net.pt2", evil, lambda n, d: buf.getvalue() if n.endswith("sample_inputs/model.pt") else d)
    before = sha(evil)
    r = run_subprocess(["info", evil, "--sample-shape", "1,8,8", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr  # the archive itself is fine: its sample inputs are never read
    assert not marker.exists() and sha(evil) == before


def test_pt2_shape_expression_eval_refused_subprocess(work: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt2"

    def inject(prog: dict) -> None:
        prog["range_constraints"] = {f"__import__('os').system('touch {marker}')": {"min_val": 1, "max_val": 9}}
    patch_program(work / "net.pt2", evil, inject)
    r = run_subprocess(["info", evil], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "evil.pt2" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def _walk_set(obj, key: str, value) -> int:  # noqa: ANN001
    n = 0
    if isinstance(obj, dict):
        for k in list(obj):
            if k == key:
                obj[k] = value
                n += 1
            else:
                n += _walk_set(obj[k], key, value)
    elif isinstance(obj, list):
        for x in obj:
            n += _walk_set(x, key, value)
    return n


@pytest.mark.parametrize("case", ["guards", "operator", "expr", "name", "pickled_weight", "custom_obj"])
def test_pt2_crafted_program_runs_nothing(work: Path, tmp_path: Path, case: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt2"
    cmd = f"__import__('os').system('touch {marker}')"
    if case == "guards":
        patch_program(work / "net.pt2", evil, lambda p: p.__setitem__("guards_code", [cmd]))
    elif case == "operator":
        patch_program(work / "net.pt2", evil, lambda p: _walk_set(p["graph_module"]["graph"]["nodes"][0], "target",
                                                                   "torch.os.system"))
    elif case == "expr":
        patch_program(work / "net.pt2", evil, lambda p: _walk_set(p, "expr_str", cmd))
    elif case == "name":
        patch_program(work / "net.pt2", evil, lambda p: _walk_set(p["graph_module"]["graph"]["inputs"], "name",
                                                                   f"x={cmd}"))
    else:
        def weights(name: str, data: bytes) -> bytes:
            if name.endswith("model_weights_config.json") and case == "pickled_weight":
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
                return json.dumps(cfg).encode()
            if name.endswith("model_constants_config.json") and case == "custom_obj":
                return json.dumps({"config": {"c": {"path_name": "custom_obj_0", "is_param": False,
                                                    "use_pickle": False, "tensor_meta": None}}}).encode()
            return data
        rewrite_pt2(work / "net.pt2", evil, weights)
    rc, err = cli(["info", evil, "--sample-shape", "1,8,8"], capsys)
    assert not marker.exists()
    if case == "guards":  # guard code is dropped, never run: the model itself loads
        assert rc == 0, err
    else:
        assert_bad(rc, err, "evil.pt2")


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 20, "zip-empty", "legacy"])
def test_pt2_not_an_archive(tmp_path: Path, content, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    f = tmp_path / "bad.pt2"
    if content == "zip-empty":
        zipfile.ZipFile(f, "w").close()
    elif content == "legacy":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("serialized_exported_program.json", "{}")
            z.writestr("version", "1.0")
    else:
        f.write_bytes(content)
    rc, err = cli(["info", f], capsys)
    assert_bad(rc, err, "bad.pt2")


def test_pt2_dynamic_batch_roundtrip_through_artifact(work: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(["compress", work / "net.pt2", "--sample-shape", "1,8,8", "--recipe", "none",
                   "-o", tmp_path / "a"], capsys)
    assert rc == 0, err
    from edgediff.artifact import load_artifact

    m = load_artifact(tmp_path / "a")
    for b in (1, 3):
        assert m.module()(torch.randn(b, 1, 8, 8), torch.full((b,), 10.0)).shape == (b, 1, 8, 8)


def test_random_bytes_pt_is_not_a_pytorch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "noise.pt"
    f.write_bytes(os.urandom(4096))
    rc, err = cli(["info", f], capsys)
    assert_bad(rc, err, "noise.pt")
    assert "--trust-pickle" not in err


def test_pickled_pt_refused_without_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "MARKER"
    f = tmp_path / "evil.pt"
    torch.save({"x": Evil(marker)}, f)
    rc, err = cli(["info", f], capsys)
    assert_bad(rc, err, "evil.pt")
    assert not marker.exists()


# ---------------------------------------------------------------- 3. paths stay inside
@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a/b", "..", ""])
def test_manifest_extras_names_are_plain(art: Path, tmp_path: Path, name: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.json").write_text("{}")
    edit_json(art / "manifest.json", lambda m: m.__setitem__("extras", [name]))
    out_before = listing(tmp_path)
    rc, err = cli(["compress", art, "--recipe", "none", "-o", tmp_path / "out"], capsys)
    assert_bad(rc, err, "manifest.json")
    assert listing(tmp_path) == out_before


def test_symlink_out_of_artifact_refused(art: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.move(art / "extras" / "probe.safetensors", outside)
    os.symlink(outside, art / "extras" / "probe.safetensors")
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, "symlink")


def test_child_path_and_plain_name_units(tmp_path: Path) -> None:
    from edgediff.errors import BadInput
    from edgediff.safety import child_path, plain_name

    assert child_path(tmp_path, "a/b.json", "w") == tmp_path / "a" / "b.json"
    for bad in ("../a", "/abs", "a/../../b", "a\\b", "a\x00b"):
        with pytest.raises(BadInput):
            child_path(tmp_path, bad, "w")
    for bad in ("a/b", ".", "..", "", "x\n"):
        with pytest.raises(BadInput):
            plain_name(bad, "w")


# ---------------------------------------------------------------- 4. inputs never modified
@pytest.mark.parametrize("out", ["same", "inside", "parent", "dot"])
def test_output_never_the_input(art: Path, tmp_path: Path, out: str, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    target = {"same": art, "inside": art / "sub", "parent": art.parent, "dot": Path(".")}[out]
    before = sha(art)
    rc, err = cli(["compress", art, "--recipe", "none", "-o", target, "--force"], capsys)
    assert_bad(rc, err, target)
    assert sha(art) == before
    assert not any(".old-" in p or "edgediff-tmp" in p for p in listing(tmp_path))


def test_export_onto_input_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "in.onnx"
    f.write_bytes(b"not really onnx")
    rc, err = cli(["export", f, "--target", "fpga", "-o", f, "--force"], capsys)
    assert_bad(rc, err, "in.onnx")
    assert f.is_file() and f.read_bytes() == b"not really onnx"


def test_file_output_onto_a_directory(tmp_path: Path) -> None:
    from edgediff.artifact import atomic_file
    from edgediff.errors import BadInput

    (tmp_path / "d").mkdir()
    with pytest.raises(BadInput, match="directory"), atomic_file(tmp_path / "d", force=True):
        pass


# ---------------------------------------------------------------- 5. interrupted runs
def test_interrupted_atomic_dir_leaves_nothing_and_debris_is_cleaned(tmp_path: Path) -> None:
    from edgediff.artifact import atomic_dir

    stale = tmp_path / ".out.edgediff-tmp-999999999-abc"  # a pid that does not exist: a killed run's debris
    stale.mkdir()
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out") as tmp:
        assert ".out.edgediff-tmp-" in tmp.name
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert listing(tmp_path) == set()  # the stale dir went too


@pytest.mark.parametrize("sig,rc_want,text", [(signal.SIGTERM, 143, "interrupted"), (signal.SIGINT, 130, "interrupted")])
def test_signals_print_one_line(art: Path, tmp_path: Path, sig: int, rc_want: int, text: str,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import edgediff.pipeline as pipeline

    def killed(*a, **k):  # noqa: ANN002, ANN003
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal should have interrupted us")

    monkeypatch.setattr(pipeline, "compress", killed)
    rc, err = cli(["compress", art, "--recipe", "none", "-o", tmp_path / "out"], capsys)
    assert rc == rc_want and text in err and "nothing written" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 6. resource limits
@pytest.mark.parametrize("size", [2048, 100000, -3])
def test_config_beyond_budget_or_invalid(work: Path, tmp_path: Path, size: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    shutil.copytree(work / "art" / "model", d)
    (d / "structure.json").unlink()
    edit_json(d / "config.json", lambda c: c.__setitem__("sample_size", size))
    rc, err = cli(["info", d], capsys)
    assert_bad(rc, err, "config.json")


@pytest.mark.parametrize("args,flag", [
    (["verify", "{art}", "{art}/x.onnx", "--samples", "100000000"], "--samples"),
    (["verify", "{art}", "{art}/x.onnx", "--steps", "0"], "--steps"),
    (["--max-memory", "1K", "info", "{art}"], "budget"),
    (["info", "{art}", "--max-memory", "lots"], "--max-memory"),
])
def test_counts_and_budget(art: Path, args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli([a.format(art=art) for a in args], capsys)
    assert_bad(rc, err, flag)


# ---------------------------------------------------------------- 7. every bad input is one line
@pytest.mark.parametrize("mutate,where", [
    (lambda m: m.pop("signature"), "manifest.json"),
    (lambda m: m.__setitem__("signature", {"sample_shape": "big"}), "manifest.json"),
    (lambda m: m.__setitem__("signature", {"sample_shape": [1, -8, 8]}), "manifest.json"),
    (lambda m: m.__setitem__("extras", "probe"), "manifest.json"),
    (lambda m: m.__setitem__("format_version", "1"), "manifest.json"),
    (lambda m: m.__setitem__("provenance", [1]), "manifest.json"),
])
def test_manifest_wrongly_typed(art: Path, mutate, where: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    edit_json(art / "manifest.json", mutate)
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, where)


def test_deleted_extras_tensors(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (art / "extras" / "probe.safetensors").unlink()
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, "probe.json")


@pytest.mark.parametrize("target,text", [("manifest.json", "{nope"), ("model/structure.json", "[1, 2]"),
                                         ("model/model.safetensors", "")])
def test_corrupt_artifact_files(art: Path, target: str, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    (art / target).write_text(text)
    rc, err = cli(["info", art], capsys)
    assert_bad(rc, err, Path(target).name)


def test_disk_full_during_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from edgediff.artifact import atomic_dir
    from edgediff.errors import BadInput

    with pytest.raises(BadInput, match="No space left"), atomic_dir(tmp_path / "out"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert listing(tmp_path) == set()


# ---------------------------------------------------------------- 8. plain-text messages
@pytest.mark.parametrize("name", ["[bold]a[/bold].pt", "[/x].pt", "[red]b.pt2"])
def test_markup_in_file_names_is_printed_literally(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    rc, err = cli(["info", name], capsys)
    assert_bad(rc, err, name)


# ---------------------------------------------------------------- 7 (cont.): recipes, NaN, caches
@pytest.mark.parametrize("option", ["steps = inf", "steps = -5", "steps = 1e30", "lr = nan"])
def test_recipe_option_errors_name_recipe_and_pass(art: Path, tmp_path: Path, option: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    r = tmp_path / "mine.toml"
    r.write_text(f'name = "mine"\n\n[[pass]]\nname = "finetune"\n{option}\n')
    rc, err = cli(["compress", art, "--recipe", r, "-o", tmp_path / "out"], capsys)
    assert_bad(rc, err, "mine.toml")
    assert "finetune" in err and not (tmp_path / "out").exists()


def test_nan_weights_warn_and_json_stays_valid(art: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    from edgediff.cli import _json_safe

    st = load_file(str(art / "model" / "model.safetensors"))
    key = sorted(st)[0]
    st[key] = torch.full_like(st[key], float("nan"))
    save_file(st, str(art / "model" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    rc = main(["info", str(art), "--json"])
    cap = capsys.readouterr()
    assert rc == 0 and "NaN or Inf" in cap.err and key in cap.err
    json.loads(cap.out)
    assert json.loads(json.dumps(_json_safe({"a": float("nan"), "b": [float("inf"), 1.0]}), allow_nan=False)) == \
        {"a": None, "b": [None, 1.0]}


def test_corrupt_calibration_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.passes import PassContext, calib
    from edgediff.schedule import NoiseSchedule

    m = DiffusionModel(TinyNet(), NoiseSchedule.from_config({}), InputSignature((1, 8, 8)), "TinyNet", None,
                       {"source": "test"})
    opts = calib.CalibOptions(n_samples=2, steps=2)
    path = calib.cache_path(tmp_path, calib.cache_key(m, opts))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    monkeypatch.setattr(calib, "generate", lambda *a, **k: {"x": torch.zeros(2, 1, 8, 8), "t": torch.tensor([1.0, 2.0])})
    logs: list[str] = []
    calib.run(m, opts, PassContext(cache_dir=tmp_path, log=logs.append))
    assert any("corrupt" in x for x in logs)
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {"x", "t"}


def test_unwritable_cache_falls_back_to_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from edgediff import safety

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(blocker / "cache"))  # below a file: cannot be created
    monkeypatch.setattr(safety, "_warned_cache", [])
    d = safety.cache_dir()
    assert d.is_dir() and not str(d).startswith(str(blocker))
    assert "cannot write the cache" in capsys.readouterr().err


def test_shard_index_names_stay_in_folder(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    shutil.copytree(work / "art" / "model", d)
    (d / "structure.json").unlink()
    (d / "model.safetensors").rename(d / "diffusion_pytorch_model-00001-of-00002.safetensors")
    shutil.copy(d / "diffusion_pytorch_model-00001-of-00002.safetensors",
                d / "diffusion_pytorch_model-00002-of-00002.safetensors")
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../../etc/passwd", "b": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    rc, err = cli(["info", d], capsys)
    assert_bad(rc, err, "index.json")


# ---------------------------------------------------------------- 3 (cont.): bundles and FPGA projects
@pytest.mark.parametrize("rel", ["../x.onnx", "/etc/passwd", "link.onnx"])
def test_bundle_paths_stay_inside(tmp_path: Path, rel: str) -> None:
    from edgediff.errors import BadInput
    from edgediff.runtime.bundle import FORMAT, MANIFEST, ROLE_FULL, read_bundle

    b = tmp_path / "bundle"
    (b / "scheduler").mkdir(parents=True)
    (b / "scheduler" / "scheduler_config.json").write_text("{}")
    (tmp_path / "outside.onnx").write_bytes(b"x")
    os.symlink(tmp_path / "outside.onnx", b / "link.onnx")
    (b / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "signature": {"sample_shape": [1, 8, 8]},
                                          "scheduler": {}, "steps": 2, "sampler": "ddim",
                                          "components": {"den": {"role": ROLE_FULL, "path": rel}}}))
    with pytest.raises(BadInput, match=MANIFEST):
        read_bundle(b)


def test_damaged_fpga_project_json(tmp_path: Path) -> None:
    from edgediff.fpga.project import BACKEND

    from edgediff.errors import BadInput

    (tmp_path / "fpga_project.json").write_text("{truncated")
    with pytest.raises(BadInput, match="fpga_project.json"):
        BACKEND.info(tmp_path)


def test_sample_shape_that_does_not_fit(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    shutil.copytree(work / "art" / "model", d)
    (d / "structure.json").unlink()
    rc, err = cli(["info", d, "--sample-shape", "3,8,8"], capsys)  # the model takes 1 channel
    assert_bad(rc, err, "--sample-shape")


@pytest.mark.parametrize("size", ["abc", [8, True]])
def test_sample_size_wrong_type(work: Path, tmp_path: Path, size: object, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    shutil.copytree(work / "art" / "model", d)
    (d / "structure.json").unlink()
    edit_json(d / "config.json", lambda c: c.__setitem__("sample_size", size))
    rc, err = cli(["info", d], capsys)
    assert_bad(rc, err, "config.json")


def test_empty_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.onnx"
    f.write_bytes(b"")
    rc, err = cli(["info", f], capsys)
    assert_bad(rc, err, "empty.onnx")


def test_nan_output_is_never_zero_error() -> None:
    from edgediff.model import DiffusionModel, InputSignature
    from edgediff.schedule import NoiseSchedule
    from edgediff.verify import single_call_error

    m = DiffusionModel(TinyNet(), NoiseSchedule.from_config({}), InputSignature((1, 8, 8)), "TinyNet", None,
                       {"source": "test"})
    err = single_call_error(lambda x, t, c: torch.zeros_like(x), lambda x, t, c: torch.full_like(x, float("nan")), m)
    assert err != err  # NaN, not 0.0


@pytest.mark.parametrize("field, value", [("kernels", ["../../outside.cl"]), ("weights", "../outside.safetensors"),
                                          ("weights", "/etc/passwd")])
def test_opencl_bundle_naming_a_file_outside_is_refused(tmp_path: Path, field: str, value: object) -> None:
    from edgediff.kernels.export import FORMAT, FORMAT_VERSION, MARKER, read_bundle

    from edgediff.errors import BadInput

    (tmp_path / "outside.cl").write_text("__kernel void k() {}")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    b = tmp_path / "b"
    (b / "kernels").mkdir(parents=True)
    (b / "weights.safetensors").write_bytes(b"")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kernels": [], field: value}
    (b / MARKER).write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="leaves its folder"):
        read_bundle(b)
