"""The backend contract (edgediff.exporters.base.Backend) over every registered target, and the pass registry."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from edgediff.exporters import TARGETS, all_backends, get_backend, target_of
from edgediff.exporters.base import PRECISIONS, Backend, ExportReport

from edgediff import passes
from edgediff.errors import BadInput


@pytest.mark.parametrize("target", list(TARGETS))
def test_target_registers_under_its_own_name(target: str) -> None:
    b = get_backend(target)
    assert isinstance(b, Backend) and b.target == target
    assert b.precisions and set(b.precisions) <= set(PRECISIONS)
    assert bool(b.suffixes) != (b.marker is not None), "a target is recognised by suffix or by bundle marker"
    # the template is not overridden: every target gets the same preamble
    assert type(b).export is Backend.export
    assert not inspect.isabstract(type(b))


@pytest.mark.parametrize("target", list(TARGETS))
def test_capability_answers_are_bool_and_reason(target: str) -> None:
    b = get_backend(target)
    for ok, why in (b.available(), b.runtime_available(None)):
        assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.parametrize("target", list(TARGETS))
def test_export_preamble_rejects_bad_requests(target: str, tiny_unet, tmp_path: Path) -> None:
    b = get_backend(target)
    good = tmp_path / ("out" + (b.suffixes[0] if b.suffixes else ""))
    with pytest.raises(BadInput, match="precision"):
        b.export(tiny_unet, good, "int3")
    with pytest.raises(BadInput, match="unknown option"):
        b.export(tiny_unet, good, b.precisions[0], {"no_such_option": 1})
    if b.suffixes:
        with pytest.raises(BadInput, match="must end in"):
            b.export(tiny_unet, tmp_path / "out.wrong", b.precisions[0])
    good.mkdir() if not b.suffixes else good.write_bytes(b"")
    with pytest.raises(BadInput, match="already exists"):
        b.export(tiny_unet, good, b.precisions[0])
    with pytest.raises(BadInput, match="exports a model"):
        b.export(object(), tmp_path / ("fresh" + (b.suffixes[0] if b.suffixes else "")), b.precisions[0])


@pytest.mark.parametrize("target", list(TARGETS))
def test_info_and_check_on_a_missing_file_are_bad_input(target: str, tmp_path: Path) -> None:
    b = get_backend(target)
    missing = tmp_path / ("missing" + (b.suffixes[0] if b.suffixes else ""))
    for call in (b.info, b.check):
        with pytest.raises((BadInput, FileNotFoundError)):
            call(missing)


def test_onnx_export_report_and_target_of(tiny_unet, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    rep = get_backend("onnx").export(tiny_unet, out, "fp32")
    assert isinstance(rep, ExportReport)
    d = rep.to_dict()
    assert list(d)[:5] == ["target", "precision", "path", "size_bytes", "seconds"]
    assert d["size_bytes"] == out.stat().st_size and rep["ops"] == rep.extra["ops"]
    assert target_of(out) == "onnx"
    assert [b.target for b in all_backends()] == list(TARGETS)


def test_every_pass_loads_and_registers_under_its_own_name() -> None:
    for name in passes.known_passes():
        run, options = passes.get(name)
        assert callable(run) and isinstance(options, type)
        passes.order_rule(name)  # declared at registration
    with pytest.raises(BadInput, match="unknown pass"):
        passes.get("warp.drive")


def test_info_reports_macs_and_the_precision_of_a_foreign_int8_file(tiny_unet, tmp_path: Path) -> None:
    import onnx

    from edgediff.describe import describe
    from edgediff.metrics import macs
    from edgediff.testing import minmax_quantize

    out = tmp_path / "m.onnx"
    get_backend("onnx").export(tiny_unet, out, "fp32")
    info = describe(str(out), lambda: tiny_unet)
    assert info["macs"] == macs(tiny_unet) and info["precision"] == "fp32"
    q = tmp_path / "q.onnx"
    get_backend("onnx").export(minmax_quantize(tiny_unet), q, "int8")
    proto = onnx.load(str(q))
    del proto.metadata_props[:]  # as a file from another tool: no edgediff metadata
    onnx.save(proto, str(q))
    assert describe(str(q), lambda: tiny_unet)["precision"] == "int8"
