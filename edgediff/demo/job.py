"""`edgediff demo`: the main job on the bundled model, with whatever passes and targets exist.

1. sample the FP32 model (reference) and score it with the digit classifier;
2. compress it with the default `edge` recipe (the demo's training digits reach the passes as ctx.data);
3. sample the compressed model under the same seeds and sampler: PSNR vs reference, digit
   Fréchet distance, confidence share, params/MACs/bytes;
4. export to every target, verify each with the sampler in the loop (a target this machine
   cannot build or run says so: status "unavailable: ...", exit 3 of that backend);
5. profile the ONNX export;
6. write DIR/ atomically as an artifact (edgediff.artifact.write_contents) with report.html and a summary.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table

from edgediff import __version__
from edgediff.artifact import atomic_dir, write_contents
from edgediff.demo.data import split
from edgediff.demo.judge import DigitJudge
from edgediff.errors import EdgediffError
from edgediff.exporters import get_backend
from edgediff.loaders import load_model
from edgediff.metrics import grid_png, psnr
from edgediff.pipeline import model_stats, run_recipe
from edgediff.profiling.coverage import coverage
from edgediff.profiling.graph import onnx_ops
from edgediff.profiling.html import sections as profile_sections
from edgediff.profiling.run import profile
from edgediff.recipe import load_recipe
from edgediff.report import image, page, table
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample
from edgediff.verify import verify

DEMO_RECIPE = "edge"
# (target, precision) pairs the demo tries, in order; int8 ones only when the model is quantized
EXPORTS = [("onnx", "fp32"), ("onnx", "int8"), ("tensorrt", "fp16"), ("tflite", "fp32"), ("tflite", "int8"),
           ("coreml", "fp16"), ("opencl", "fp32"), ("fpga", "int8")]
_EXT = {"onnx": ".onnx", "tensorrt": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage", "opencl": "", "fpga": ""}


def run_demo(out: Path, samples: int = 64, steps: int = 25, seed: int = 0, progress: Any = None, force: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    t_start = time.perf_counter()
    model = load_model("demo")
    judge = DigitJudge()
    scfg = SamplerConfig("ddim", steps)

    log(f"sampling the FP32 demo model: {samples} samples, DDIM {steps} steps, seed {seed}")
    ref = sample(TorchDenoiser(model), model.schedule, model.signature.sample_shape, samples, seed, scfg,
                 progress=progress, description="sampling fp32 reference")
    rows: list[dict[str, Any]] = [{"step": "original (fp32)", **model_stats(model), "psnr_db": None,
                                    **judge.report(ref), "note": "reference"}]
    grids = [("original fp32", grid_png(ref))]

    recipe = load_recipe(DEMO_RECIPE)
    log(f"compressing with recipe {recipe.name!r}: {' -> '.join(p.name for p in recipe.passes)}")
    compressed, records = run_recipe(model, recipe, seed, progress, data=split()["train"][0])
    applied = [r.name for r in records]
    comp = sample(TorchDenoiser(compressed), model.schedule, model.signature.sample_shape, samples, seed, scfg,
                  progress=progress, description="sampling compressed model")
    rows.append({"step": f"compressed ({' + '.join(applied) or 'no pass available'})", **model_stats(compressed),
                 "psnr_db": psnr(comp, ref), **judge.report(comp), "note": ""})
    grids.append(("compressed (PyTorch)", grid_png(comp)))

    quantized = "quant" in compressed.extras
    if quantized:  # the artifact carries the original's samples, as `compress` writes it (edgediff.quality)
        from edgediff.quality import attach

        attach(model, compressed)
    with atomic_dir(out, force=force) as tmp:
        exports = _export_all(compressed, tmp / "exports", quantized, steps, min(samples, 16), seed, progress, log,
                              original=model)
        for e in exports:
            if e.get("samples_png"):
                grids.append((f"{e['target']} {e['precision']} (runtime)", e.pop("samples_png")))
        profile = _profile(exports, log, tmp)
        wall = time.perf_counter() - t_start
        summary = {
            "edgediff_version": __version__, "recipe": recipe.to_dict(), "seed": seed, "samples": samples,
            "steps": steps, "sampler": "ddim", "rows": rows, "passes": [r.to_dict() for r in records],
            "exports": exports, "profile": profile, "wall_seconds": round(wall, 1),
        }
        write_contents(compressed, tmp, {
            "source": "demo", "recipe": recipe.to_dict(), "seed": seed, "schedule": model.schedule.to_config(),
            "passes": summary["passes"], "metrics": {"before": model_stats(model), "after": model_stats(compressed)},
            "demo": summary})
        (tmp / "report.html").write_text(render(summary, grids))
        for name, png in grids:
            (tmp / f"samples_{name.split(' ')[0]}.png").write_bytes(png) if name.startswith(("original", "compressed")) else None
    return summary


def _export_all(model: Any, folder: Path, quantized: bool, steps: int, samples: int, seed: int, progress: Any,
                log: Callable[[str], None], original: Any = None) -> list[dict[str, Any]]:
    folder.mkdir()
    results = []
    for target, precision in EXPORTS:
        rec: dict[str, Any] = {"target": target, "precision": precision}
        results.append(rec)
        if precision == "int8" and not quantized:
            rec["status"] = "skipped: model has no quantization parameters"
            continue
        backend = get_backend(target)
        path = folder / f"{target}-{precision}{_EXT[target]}"
        log(f"exporting {target} {precision}")
        try:
            rep = backend.export(model, path, precision, progress=progress).to_dict()
            rec.update({k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool)) or v is None})
            rec["path"] = str(Path("exports") / path.name)
            rec["status"] = "exported"
        except EdgediffError as e:
            rec["status"] = f"unavailable: {e}" if e.exit_code == 3 else f"failed: {e}"
            if not path.exists():
                continue
            rec["path"] = str(Path("exports") / path.name)
        except Exception as e:  # noqa: BLE001 - one failing backend must not sink the whole demo
            rec["status"] = f"failed: {e.__class__.__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=3)
            continue
        try:
            v = verify(model, path, steps=steps, samples=samples, sampler="ddim", seed=seed, progress=progress,
                       return_samples=True, original=original)
            s = v.pop("final_samples", None)
            rec["verify"] = v
            if s is not None:
                rec["samples_png"] = grid_png(s)
        except EdgediffError as e:
            rec["verify"] = {"verified": False, "reason": str(e)}
    return results


def _profile(exports: list[dict[str, Any]], log: Callable[[str], None], root: Path = Path(".")) -> dict[str, Any] | None:
    onnx = next((e for e in exports if e["target"] == "onnx" and e.get("status") == "exported"), None)
    if onnx is None:
        return {"status": "no ONNX export to profile"}
    log("profiling the ONNX export on onnxruntime (+ this CPU's calibrated roofline, op coverage per target)")
    path = root / onnx["path"]  # export paths are relative to the artifact being written
    try:
        result = profile(path, runtime="ort", device="this-cpu")
        result["coverage"] = coverage(onnx_ops(path))
    except EdgediffError as e:  # a profiling problem must not sink the demo
        return {"status": f"profiling failed: {e}"}
    result.pop("nodes", None)  # per-node rows stay out of the summary (layers carry the same times)
    return result


def render(summary: dict[str, Any], grids: list[tuple[str, bytes]]) -> str:
    rows = summary["rows"]
    headers = ["step", "params", "MACs/call", "bytes", "PSNR vs fp32 (dB)", "digit Fréchet", "confident share", "note"]
    body = [[r["step"], r["params"], r["macs"], r["size_bytes"], r["psnr_db"], r["digit_frechet"], r["confidence_share"],
             r.get("note", "")] for r in rows]
    passes = [[p["name"], p["seconds"], json.dumps(p["metrics"], default=str)[:160]]
              for p in summary["passes"]]
    exp_rows = []
    for e in summary["exports"]:
        v = e.get("verify")
        vtxt = (f"verified={v.get('verified')} psnr={v.get('psnr_db')}" if isinstance(v, dict) else (v or ""))
        if isinstance(v, dict) and "psnr_vs_original_db" in v:  # quantized: export vs the original fp32 model
            vtxt += f" vs original fp32: {v['psnr_vs_original_db']} dB" + (" (WARNING)" if v.get("quality_warning") else "")
        exp_rows.append([e["target"], e["precision"], e.get("status", ""), e.get("size_bytes"), vtxt])
    sections = [
        ("What each step cost and bought", table(headers, body)),
        ("Samples (same seeds and sampler)", "<div class='grids'>" + "".join(image(p, n) for n, p in grids) + "</div>"),
        ("Passes", table(["pass", "seconds", "metrics"], passes)),
        ("Exports and verification", table(["target", "precision", "status", "bytes", "verify"], exp_rows)),
    ]
    prof = summary.get("profile") or {}
    if prof.get("layers"):
        sections.extend(profile_sections(prof))
    sub = (f"DDIM {summary['steps']} steps, {summary['samples']} samples, seed {summary['seed']}; "
           f"recipe {summary['recipe']['name']}; wall time {summary['wall_seconds']} s")
    return page("edgediff demo report", sub, sections)


def _si(n: float | None) -> str:
    """1234567 -> 1.23M: the summary table fits an 80-column terminal."""
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def summary_table(summary: dict[str, Any]) -> Group:
    """The demo's result for a terminal: cost/benefit per step, then each export (fits 80 columns)."""
    t = Table(title=f"edgediff demo ({summary['wall_seconds']} s)", box=box.SIMPLE, pad_edge=False)
    # FD: Fréchet distance of the digit classifier's features; conf: share with confidence >= 0.9
    for c in ("step", "params", "MACs", "bytes", "PSNR dB", "FD", "conf"):
        step = c == "step"
        t.add_column(c, justify="left" if step else "right", overflow="ellipsis", no_wrap=True,
                     max_width=24 if step else None, min_width=None if step else max(len(c), 6))
    for r in summary["rows"]:
        p = "ref" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        t.add_row(r["step"], _si(r["params"]), _si(r["macs"]), _si(r["size_bytes"]), p,
                  f"{r['digit_frechet']:.2f}", f"{r['confidence_share']:.0%}")
    e_t = Table(box=box.SIMPLE, pad_edge=False)
    for c in ("export", "bytes", "status", "verify"):
        e_t.add_column(c, overflow="ellipsis", no_wrap=True, max_width={"export": 16, "bytes": 7, "status": 34}.get(c, 16))
    for e in summary["exports"]:
        v = e.get("verify")
        vt = ""
        if isinstance(v, dict):
            vt = f"{v.get('psnr_db')} dB" if v.get("verified") else f"exit {v.get('exit_code')}"
        e_t.add_row(f"{e['target']} {e['precision']}", _si(e.get("size_bytes")), str(e.get("status", "")), vt)
    return Group(t, e_t)
