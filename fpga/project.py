"""The FPGA backend: write an HLS project for a quantized model and verify it by C-simulation.

Split like hls4ml's backends: converters (convert_onnx.py with one handler per op, convert_quantparams.py)
produce the layer graph (graph.py); the writer (writer.py) writes the project; the C-simulation check
(check.py) runs it and compares every output; this module is the backend shell the CLI calls.

`edgediff export X --target fpga -o DIR` where X is a QDQ-quantized ONNX model (made by any
tool, e.g. onnxruntime.quantization.quantize_static) or an edgediff artifact carrying
QuantParams. The project holds:

    hls/                 systolic.h/.cpp, top.cpp, tb.cpp (the design and its testbench)
    vectors/             per quantized layer: configuration, int8 weights/bias, input vectors,
                         expected outputs from fpga/sim.py (the bit-accurate model)
    build/csim           the g++ C-simulation binary (what was run here)
    run_hls.tcl          Vitis HLS script: csim_design, csynth_design, cosim_design, export_design
    layers.json          the GEMM view of every layer (for the estimator and `edgediff profile`)
    fpga_project.json    marker + report: each layer with `bit_exact` and `mismatches`, cycles,
                         host-side ops with their MACs share, estimates

Verification rung (docs/architecture.md, "Verification"): the g++ C-simulation runs here and every output of every
quantized layer is compared bit for bit with sim.py, which itself matches ONNX Runtime's integer
kernels (each layer is also run through ONNX Runtime here: `ort_bit_exact`). Synthesis and
co-simulation need Vitis HLS, which is not installed here: the TCL script is written, not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgediff.exporters.base import Backend, ExportReport, deepcache_record
from edgediff.fpga import csim
from edgediff.fpga.check import ROUNDING_DEFAULT, export_project, ort_check
from edgediff.fpga.convert_onnx import HANDLERS, extract_onnx
from edgediff.fpga.convert_quantparams import extract_quantparams
from edgediff.fpga.graph import HOST_SIDE_HINT, Extracted, ExtractedLayer, array_geometry
from edgediff.fpga.writer import RUN_HLS_SH, TCL, synthesize, vitis_hls_status

from edgediff.errors import BadInput, Unavailable

__all__ = ["BACKEND", "HANDLERS", "HOST_SIDE_HINT", "ROUNDING_DEFAULT", "RUN_HLS_SH", "TCL", "Extracted",
           "ExtractedLayer", "FpgaBackend", "array_geometry", "export_project", "extract_onnx", "extract_quantparams",
           "ort_check", "synthesize", "vitis_hls_status"]



class FpgaBackend(Backend):
    """The "fpga" target: an HLS project verified by C-simulation (the contract: edgediff.exporters.base)."""

    target = "fpga"
    # fp32 is the CLI's default --precision: the FPGA target then exports the model's own int8 quantization
    precisions = ("int8", "fp32")
    precision_hint = " (the FPGA target runs int8 only: pass --precision int8)"
    marker = "fpga_project.json"
    options = frozenset({"seed", "rounding", "rows", "cols", "k_tile", "clock_mhz", "part", "compare_ort", "board"})
    takes_onnx_source = True
    float_nonlinear_ops = False  # GroupNorm/softmax/LUT units in fixed point (fpga/nonlinear.py)

    def available(self) -> tuple[bool, str]:
        ok, why = csim.toolchain()
        return ok, why or "g++ found: the C-simulation runs here"

    def needs_toolchain_to_export(self) -> bool:
        return False  # without g++ the project is written and the report says the C-simulation did not run

    def _export(self, model: Any, out: Path, precision: str, options: dict[str, Any], progress: Any,
                force: bool) -> ExportReport:
        opts = dict(options)
        seed = int(opts.pop("seed", 0))
        call = None
        cache = None  # DeepCache schedule of an artifact (fpga/deepcache.py)
        from edgediff.onnx_source import graph_module, is_graph_model

        if isinstance(model, (str, Path)):
            ext = extract_onnx(Path(model), seed=seed)
        elif is_graph_model(model):  # an ONNX-in artifact: its quantized graph is the QDQ source
            import tempfile

            with tempfile.TemporaryDirectory(prefix="edgediff-fpga-graph-") as td:
                src = Path(td) / "denoiser.onnx"
                src.write_bytes(graph_module(model).graph)
                ext = extract_onnx(src, seed=seed)
            ext.source = "the quantized ONNX graph of the artifact (ONNX-in)"
        else:
            call = _whole_call_program(model, seed)
            cache = deepcache_record(model)
            if cache is not None and isinstance(call, tuple):  # DeepCache: the full call keeps the feature
                from edgediff.fpga.deepcache import mark_feature, unet_blocks

                mark_feature(call[0], cache, unet_blocks(model))
            if isinstance(call, tuple):  # the shared int8 lowering's layers, with the inputs of the whole call
                from edgediff.fpga.program import extracted_layers

                ext = extracted_layers(*call)
            else:  # not covered by the whole-call program (the reason goes in the report): layers alone
                ext = extract_quantparams(model, seed=seed)
        tick = None
        if progress is not None:  # export_project reports (done, total); the contract hands a rich Progress
            task = progress.add_task("fpga: layer vectors", total=len(ext.layers))

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)
        try:
            rep = export_project(ext, Path(out), force=force, progress=tick, call=call, **opts)
        finally:
            if progress is not None:
                progress.remove_task(task)
        if cache is not None:
            rep["cache"] = _shallow_call(Path(out), call, cache, opts)
            size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
        else:
            size = rep.pop("size_bytes", 0)
        rep.pop("size_bytes", None)
        for k in ("target", "precision"):
            rep.pop(k, None)
        return ExportReport(self.target, "int8", str(out), size, extra=rep)

    def runtime_available(self, path: Path | None = None) -> tuple[bool, str]:
        if path is not None and (Path(path) / "call" / "program.json").is_file():
            return True, ("every call through the bit-accurate simulator of the whole-call integer program (array "
                          "layers + nonlinear units, fpga/program.py), the first calls also through the g++ "
                          "C-simulation of the design, compared bit for bit (no FPGA board: rung 1)")
        return False, ("this project has no whole-call program (call/program.json): it is written for an edgediff "
                       "int8 UNet2DModel artifact; a QDQ ONNX source gets its layers verified one by one only "
                       "(see fpga_project.json), and the board itself needs Vitis HLS + Vivado")

    def load_denoiser(self, path: Path) -> Any:
        ok, why = self.runtime_available(path)
        if not ok:
            raise Unavailable(why)
        from edgediff.fpga.deepcache import SHALLOW_DIR, CachedFpgaDenoiser
        from edgediff.fpga.runtime import FpgaCallDenoiser

        rep = self.info(path)
        arr = rep.get("array") or {}
        array = csim.ArrayConfig(int(arr.get("rows", 16)), int(arr.get("cols", 16)), int(arr.get("k_tile", 512)))
        if (Path(path) / SHALLOW_DIR / "program.json").is_file():  # DeepCache: full + shallow programs
            return CachedFpgaDenoiser(Path(path), array=array)
        return FpgaCallDenoiser(Path(path), array=array)

    def check(self, path: Path, reference: Any = None) -> dict[str, Any]:
        """Structural check of an exported project (+ the C-sim results recorded at export)."""
        rep = self.info(path)
        hls = Path(path) / "hls"
        missing = [f for f in csim.HLS_SOURCES if not (hls / f).is_file()]
        return {"target": "fpga", "hls_sources_present": not missing, "missing": missing,
                "layers_total": rep.get("layers_total"), "layers_bit_exact": rep.get("layers_bit_exact"),
                "csim_verified": rep.get("verified"), "whole_call": rep.get("whole_call"),
                "ops": {"array": rep.get("layers_total"), "host": len(rep.get("host_ops", []))}}

    def info(self, path: Path) -> dict[str, Any]:
        marker = Path(path) / "fpga_project.json"
        if not marker.is_file():
            raise BadInput(f"{path}: not an FPGA project (no fpga_project.json)")
        from edgediff.files import read_json

        rep = read_json(marker)  # BadInput naming the file on damaged JSON
        keep = ("target", "precision", "source", "rounding", "array", "verified", "layers_total", "layers_bit_exact",
                "ort_layers_bit_exact", "csim_cycles", "whole_call", "cache",
                "array_macs", "host_macs", "array_macs_share", "estimate", "reason",
                "host_ops")
        out = {k: rep[k] for k in keep if k in rep}
        out["macs"] = rep.get("array_macs", 0) + rep.get("host_macs", 0)
        out["params"] = sum(int(r.get("params", 0)) for r in rep.get("layers", []))  # the array's weights and biases
        out["size_bytes"] = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
        return out


def _shallow_call(out: Path, call: Any, cache: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """DeepCache: the shallow program beside the whole-call one (fpga/deepcache.py), recorded in
    fpga_project.json; or why the project holds the full call only."""
    import json

    if not isinstance(call, tuple):
        rec: dict[str, Any] = {"exported": False, "reason": "the whole-call program does not cover this model "
                               f"({call}), so there is no shallow program either: the project holds the full call only"}
    else:
        from edgediff.fpga.deepcache import write_shallow

        arr = csim.ArrayConfig(int(opts.get("rows", 16)), int(opts.get("cols", 16)), int(opts.get("k_tile", 512)))
        rec = {"exported": True, **cache, "shallow": write_shallow(out, call[0], cache, call[1], call[2], arr)}
    marker = out / "fpga_project.json"
    data = json.loads(marker.read_text())
    data["cache"] = rec
    marker.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return rec


def _whole_call_program(model: Any, seed: int) -> Any:
    """(Program, sample codes, temb codes) of one call at t = 500 on the model's example input, or the reason the
    program does not cover the model (its layers are still exported and checked one by one)."""
    import torch
    from edgediff.fpga.program import build_program, call_inputs

    try:
        prog = build_program(model, seed)
    except Unavailable as e:
        return str(e)
    inp = model.example_inputs(batch=1, seed=seed)
    t = min(500, int(model.schedule.num_train_timesteps) - 1)
    s, e = call_inputs(prog, inp["sample"].float().numpy(), torch.full((1,), float(t)).numpy())
    return prog, s, e


BACKEND = FpgaBackend()
