"""`edgediff demo`: the main job on the bundled model, with whatever passes and targets exist.

1. sample the FP32 model (reference) and score it with the digit classifier;
2. compress it with the default `edge` recipe (the demo's training digits reach the passes as ctx.data);
3. sample the compressed model under the same seeds and sampler: PSNR vs reference, digit
   Fréchet distance, confidence share, params/MACs/bytes;
4. export to every target, verify each with the sampler in the loop (a target this machine
   cannot build or run says so: status "unavailable: ...", exit 3 of that backend);
5. the fast composition: the `edge` recipe with the `fast` recipe's passes (DPM-Solver++ 10
   steps + DeepCache) inserted before its calibration, so W8A8 is calibrated on the fast cached
   trajectories (fast_recipe), sampled in PyTorch and exported as an ONNX int8 bundle (full and
   shallow graphs) that is verified on onnxruntime with the cached schedule;
6. one time table, measured interleaved in the same run: ms per denoiser call and per image
   (steps x calls) on each runtime the demo ran, for the original fp32, the compressed fp32,
   the compressed int8 and the fast schedule (edgediff.timing);
7. profile the ONNX export;
8. write DIR/ atomically as an artifact (edgediff.artifact.write_contents) with report.html and a summary.
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
from edgediff.exporters.base import native_output_captured, threads
from edgediff.loaders import load_model
from edgediff.metrics import grid_png, psnr
from edgediff.pipeline import model_stats, run_recipe
from edgediff.profiling.coverage import coverage
from edgediff.profiling.graph import onnx_ops
from edgediff.profiling.html import sections as profile_sections
from edgediff.profiling.run import profile
from edgediff.recipe import PassSpec, Recipe, load_recipe
from edgediff.report import image, page, table
from edgediff.sampling import SamplerConfig, TorchDenoiser, recorded_sampling, sample
from edgediff.timing import per_image, time_denoisers
from edgediff.verify import verify

DEMO_RECIPE = "edge"
FAST_RECIPE = "fast"  # training-free (sampling + cache): inserted into the demo recipe (fast_recipe)
TIME_BATCH, TIME_REPS = 8, 10  # images per timed call, interleaved rounds (median)
# runtimes whose load_denoiser is not a latency: the FPGA target runs a bit-accurate simulation
NOT_TIMED = {"fpga": "bit-accurate simulation, not a device latency"}
# the original fp32 is exported again for the time table only where that costs seconds (a LiteRT or
# Core ML conversion costs minutes here: those runtimes show the compressed rows only, with a note)
RETIME_ORIGINAL = ("onnx", "opencl")
# (target, precision) pairs the demo tries, in order; int8 ones only when the model is quantized
EXPORTS = [("onnx", "fp32"), ("onnx", "int8"), ("tensorrt", "fp16"), ("tflite", "fp32"), ("tflite", "int8"),
           ("coreml", "fp16"), ("opencl", "fp32"), ("fpga", "int8")]
_EXT = {"onnx": ".onnx", "tensorrt": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage", "opencl": "", "fpga": ""}


def fast_recipe(recipe: Recipe, fast: Recipe) -> Recipe:
    """`recipe` with `fast`'s passes inserted before its first calib pass (at the end without one).

    Calibration follows the recorded sampler and cache schedule, so the int8 model is calibrated on
    the trajectories it is sampled along; appending the fast passes to an already quantized model
    kept the scales of DDIM trajectories (its DPM-Solver++ samples were at 9.7 dB vs the reference)."""
    names = [p.name for p in recipe.passes]
    at = names.index("calib") if "calib" in names else len(names)
    # no quant PSNR floor here: it compares 16 samples with the float model under the model's own
    # sampler, and along cached DPM-Solver++ trajectories int8 lands on other (as good) digits, so
    # the floor measured 21.7 dB and kept every layer float (docs/fast_sampling.md)
    after = [PassSpec(p.name, {**p.options, "min_psnr_db": 0.0}, p.component) if p.name == "quant" else p
             for p in recipe.passes[at:]]
    return Recipe(f"{recipe.name}+{fast.name}", f"{recipe.name} at the {fast.name} schedule",
                  [*recipe.passes[:at], *fast.passes, *after], recipe.source)


def sample_fast(fast_model: Any, samples: int, seed: int, default_steps: int,
                progress: Any = None) -> tuple[Any, SamplerConfig, tuple[int, int]]:
    """(samples, sampler config, (full, shallow) calls per image) of the fast composition, at its recorded
    sampler and steps and with its own noise schedule: the `sampling` pass's clip_x0 lives in that
    schedule (the original model's schedule samples it unclipped: 13.7 dB vs 28 dB on the demo)."""
    fsamp, fsteps, feta = recorded_sampling(fast_model)
    fcfg = SamplerConfig(fsamp, int(fsteps or default_steps), float(feta or 0.0))
    fstats: dict[str, Any] = {}
    x = sample(TorchDenoiser(fast_model), fast_model.schedule, fast_model.signature.sample_shape, samples, seed, fcfg,
               progress=progress, description="sampling the fast composition", stats=fstats)
    calls = (int(fstats.get("denoiser_calls_full", fstats["denoiser_calls"])), int(fstats.get("denoiser_calls_shallow", 0)))
    return x, fcfg, calls


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

    fast_passes = load_recipe(FAST_RECIPE)
    composed = fast_recipe(recipe, fast_passes)
    log(f"fast composition: recipe {composed.name!r}: {' -> '.join(p.name for p in composed.passes)}")
    fast_model, fast_records = run_recipe(model, composed, seed, progress, data=split()["train"][0])
    fast, fcfg, fast_calls = sample_fast(fast_model, samples, seed, steps, progress)
    fsamp = fcfg.sampler
    cache = fast_model.extras.get("cache") or {}
    rows.append({"step": f"fast {fsamp} {fcfg.steps}" + (f" DeepCache {fast_calls[0]}/{fast_calls[1]}" if cache else ""),
                 **model_stats(fast_model), "psnr_db": psnr(fast, ref), **judge.report(fast),
                 "note": f"{' + '.join(r.name for r in fast_records)}: {fast_calls[0]} full + "
                         f"{fast_calls[1]} shallow calls per image; PSNR vs the DDIM {steps} fp32 reference"})
    grids.append(("fast (PyTorch)", grid_png(fast)))

    quantized = "quant" in compressed.extras
    if quantized:  # the artifact carries the original's samples, as `compress` writes it (edgediff.quality)
        from edgediff.quality import attach

        attach(model, compressed)
    with atomic_dir(out, force=force) as tmp:
        exports = _export_all(compressed, tmp / "exports", quantized, steps, min(samples, 16), seed, progress, log,
                              original=model)
        exports.append(_export_fast(fast_model, tmp / "exports", quantized, min(samples, 16), seed, progress, log))
        for e in exports:
            if e.get("samples_png"):
                grids.append((f"{e['target']} {e['precision']} (runtime)", e.pop("samples_png")))
        timing = _time_table(model, compressed, fast_model, exports, tmp, steps, fast_calls, log)
        profile = _profile(exports, log, tmp)
        wall = time.perf_counter() - t_start
        summary = {
            "edgediff_version": __version__, "recipe": recipe.to_dict(), "seed": seed, "samples": samples,
            "steps": steps, "sampler": "ddim", "rows": rows, "passes": [r.to_dict() for r in records],
            "fast": {"recipe": composed.to_dict(), "sampler": fsamp, "steps": fcfg.steps,
                     "calls_full": fast_calls[0], "calls_shallow": fast_calls[1],
                     "passes": [r.to_dict() for r in fast_records]},
            "exports": exports, "timing": timing, "profile": profile, "wall_seconds": round(wall, 1),
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
        _verify_into(rec, model, path, steps=steps, samples=samples, sampler="ddim", seed=seed, progress=progress,
                     original=original)
    return results


def _verify_into(rec: dict[str, Any], model: Any, path: Path, **kw: Any) -> None:
    """rec["verify"] (and the grid of the final samples) from verifying `path`; a verify that cannot run says why."""
    try:
        v = verify(model, path, return_samples=True, **kw)
        s = v.pop("final_samples", None)
        rec["verify"] = v
        if s is not None:
            rec["samples_png"] = grid_png(s)
    except EdgediffError as e:
        rec["verify"] = {"verified": False, "reason": str(e)}


def _export_fast(model: Any, folder: Path, quantized: bool, samples: int, seed: int, progress: Any,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """The fast composition as an ONNX bundle (full + shallow graphs), verified with its own schedule."""
    from edgediff.bundle import export_bundle

    precision = "int8" if quantized else "fp32"
    path = folder / f"onnx-{precision}-fast"
    rec: dict[str, Any] = {"target": "onnx bundle", "precision": precision, "fast": True,
                           "path": str(Path("exports") / path.name)}
    log(f"exporting the fast composition: ONNX {precision} bundle")
    try:
        rep = export_bundle(model, path, "onnx", precision, progress=progress)
        rec["size_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rec["status"] = "exported"
        rec["cache"] = rep.get("cache")
    except EdgediffError as e:
        rec["status"] = f"unavailable: {e}" if e.exit_code == 3 else f"failed: {e}"
        return rec
    _verify_into(rec, model, path, samples=samples, seed=seed, progress=progress)
    return rec


class _OrtCall:
    """A bundle graph as a (x, t, cond) denoiser for timing; the shallow one is fed a cached feature."""

    def __init__(self, path: Path, outputs: list[str], feature: Any = None) -> None:
        from edgediff.runtime.generate import OrtEntry

        self.entry, self.outputs, self.feature = OrtEntry(path, threads=threads()), outputs, feature

    def __call__(self, x: Any, t: Any, cond: Any = None) -> Any:
        from edgediff.runtime.bundle import FEATURE_NAME

        feeds = {"sample": x.numpy(), "timestep": t.float().numpy()}
        if self.feature is not None:
            feeds[FEATURE_NAME] = self.feature
        return self.entry.run(self.outputs, feeds)


def _time_table(original: Any, compressed: Any, fast_model: Any, exports: list[dict[str, Any]], root: Path,
                steps: int, fast_calls: tuple[int, int], log: Callable[[str], None]) -> dict[str, Any]:
    """ms per denoiser call and per image on each runtime the demo ran, all calls interleaved in one run.

    Rows: original fp32, compressed fp32, compressed int8 (each at the demo's DDIM steps) and the
    fast schedule (full and shallow calls at their own counts). The original is exported for each
    runtime that ran a compressed export, so every runtime compares like with like.
    """
    import torch

    from edgediff.deepcache import capturing, find_unet, shallow
    from edgediff.runtime.bundle import FEATURE_NAME, OUTPUT_NAME, ROLE_FULL, ROLE_SHALLOW, read_bundle

    log("timing denoiser calls (original fp32, compressed fp32/int8, fast schedule), interleaved")
    dens: dict[str, Callable[..., Any]] = {}
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}

    def add(key: str, config: str, runtime: str, precision: str, den: Any, calls: tuple[int, int],
            shallow_key: str | None = None) -> None:
        dens[key] = den
        rows.append({"config": config, "runtime": runtime, "precision": precision, "key": key,
                     "shallow_key": shallow_key, "calls_full": calls[0], "calls_shallow": calls[1]})

    plain = (steps, 0)
    add("pt-orig", "original fp32", "pytorch", "fp32", TorchDenoiser(original, use_cache=False), plain)
    add("pt-comp", "compressed (simulation)", "pytorch", "int8 sim" if "quant" in compressed.extras else "fp32",
        TorchDenoiser(compressed, use_cache=False), plain)
    x = torch.randn((TIME_BATCH, *original.signature.sample_shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((TIME_BATCH,), 500.0)
    cache = fast_model.extras.get("cache")
    fast_td = TorchDenoiser(fast_model, use_cache=False)  # the full call; shallow calls swap blocks below
    if cache:
        unet, depth = find_unet(fast_td.module), int(cache["depth"])
        with torch.inference_mode(), capturing(unet, depth) as cap:
            fast_td(x, t)
        feat = cap.value

        def shallow_call(x_: Any, t_: Any, c_: Any = None) -> Any:
            with shallow(unet, depth, feat):
                return fast_td(x_, t_, c_)
        dens["pt-fast-s"] = shallow_call
    add("pt-fast", "fast schedule", "pytorch", rows[-1]["precision"], fast_td, fast_calls,
        "pt-fast-s" if cache else None)

    ran = [e for e in exports if isinstance(e.get("verify"), dict) and e["verify"].get("verified")
           and e.get("path") and not e.get("fast")]
    for e in exports:
        if e["target"] in NOT_TIMED and e in ran:
            notes[e["target"]] = NOT_TIMED[e["target"]]
    ran = [e for e in ran if e["target"] not in NOT_TIMED]
    for target in dict.fromkeys(e["target"] for e in ran):
        backend = get_backend(target)
        orig_path = root / "exports" / f"original-{target}-fp32{_EXT.get(target, '')}"
        try:
            if target not in RETIME_ORIGINAL:
                raise EdgediffError(f"exported again only for {', '.join(RETIME_ORIGINAL)} (a second {target} "
                                    "conversion costs minutes here)")
            backend.export(original, orig_path, "fp32")
            with native_output_captured():  # runtimes' start-up messages go to the log, as in verify
                den = backend.load_denoiser(orig_path)
            add(f"{target}-orig", "original fp32", target, "fp32", den, plain)
        except EdgediffError as ex:
            notes[f"{target} original fp32"] = f"not timed: {ex}"
        for e in (e for e in ran if e["target"] == target):
            try:
                with native_output_captured():
                    den = backend.load_denoiser(root / e["path"])
                add(f"{target}-{e['precision']}", f"compressed {e['precision']}", target, e["precision"], den, plain)
            except EdgediffError as ex:
                notes[f"{target} compressed {e['precision']}"] = f"not timed: {ex}"
    fast_e = next((e for e in exports if e.get("fast") and e.get("status") == "exported"), None)
    if fast_e is not None:
        b = read_bundle(root / fast_e["path"])
        if b.cache:
            full = _OrtCall(b.file(ROLE_FULL), [OUTPUT_NAME, FEATURE_NAME])
            feat_np = full(x, t)[1]
            dens["ort-fast-s"] = _OrtCall(b.file(ROLE_SHALLOW), [OUTPUT_NAME], feat_np)
            add("ort-fast", "fast schedule", "onnx", fast_e["precision"], full, fast_calls, "ort-fast-s")
        else:
            add("ort-fast", "fast schedule", "onnx", fast_e["precision"], _OrtCall(b.file(ROLE_FULL), [OUTPUT_NAME]),
                fast_calls)
    with native_output_captured():  # a first call may print (delegates initialising)
        res = time_denoisers(dens, x, t, reps=TIME_REPS)
    base = {r["runtime"]: r for r in rows if r["config"] == "original fp32"}
    for r in rows:
        r["ms_per_call"] = res[r["key"]]["ms_per_call"]
        r["ms_per_call_shallow"] = res[r.pop("shallow_key")]["ms_per_call"] if r.get("shallow_key") else None
        r["ms_per_image"] = round(per_image(r["ms_per_call"], TIME_BATCH, r["calls_full"])
                                  + per_image(r["ms_per_call_shallow"] or 0.0, TIME_BATCH, r["calls_shallow"]), 3)
        r.pop("key")
    for r in rows:
        b0 = base.get(r["runtime"])
        r["speedup_vs_original"] = round(b0["ms_per_image"] / r["ms_per_image"], 2) if b0 and r["ms_per_image"] else None
    return {"batch": TIME_BATCH, "rounds": TIME_REPS, "threads": threads(), "statistic": "median",
            "rows": rows, "notes": notes,
            "what": f"ms per denoiser call on a batch of {TIME_BATCH} (median of {TIME_REPS} interleaved rounds); "
                    "ms per image = calls per image x ms per call / batch"}


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
    tim = summary.get("timing") or {}
    if tim.get("rows"):
        t_rows = [[r["config"], r["runtime"], r["precision"], r["ms_per_call"], r["ms_per_call_shallow"],
                   f"{r['calls_full']}/{r['calls_shallow']}", r["ms_per_image"], r["speedup_vs_original"]]
                  for r in tim["rows"]]
        notes = "".join(f"<p>{k}: {v}</p>" for k, v in (tim.get("notes") or {}).items())
        sections.insert(1, ("Time per denoiser call and per image", f"<p>{tim['what']}; threads: "
                            f"{tim.get('threads') or 'runtime default'}</p>" + table(
                                ["configuration", "runtime", "precision", "ms/call (full)", "ms/call (shallow)",
                                 "calls/image (full/shallow)", "ms/image", "speedup vs original fp32 (same runtime)"],
                                t_rows) + notes))
    prof = summary.get("profile") or {}
    if prof.get("layers"):
        sections.extend(profile_sections(prof))
    fast = summary.get("fast") or {}
    sub = (f"DDIM {summary['steps']} steps, {summary['samples']} samples, seed {summary['seed']}; "
           f"recipe {summary['recipe']['name']}"
           + (f"; fast: {fast['sampler']} {fast['steps']} steps, {fast['calls_full']} full + {fast['calls_shallow']} "
              "shallow calls" if fast else "") + f"; wall time {summary['wall_seconds']} s")
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
    parts = [t, e_t]
    tim = summary.get("timing") or {}
    if tim.get("rows"):  # ms per call and per image, interleaved in one run
        m_t = Table(box=box.SIMPLE, pad_edge=False, title=f"time (batch {tim['batch']}, median)")
        for c in ("config", "runtime", "ms/call", "calls", "ms/img", "x"):
            m_t.add_column(c, justify="left" if c in ("config", "runtime") else "right", overflow="ellipsis",
                           no_wrap=True, max_width={"config": 24, "runtime": 10}.get(c))
        for r in tim["rows"]:
            call = f"{r['ms_per_call']:.3g}" + (f"/{r['ms_per_call_shallow']:.3g}" if r["ms_per_call_shallow"] else "")
            sp = r["speedup_vs_original"]
            m_t.add_row(f"{r['config']} {r['precision']}" if r["config"].startswith("fast") else r["config"],
                        r["runtime"], call, f"{r['calls_full']}/{r['calls_shallow']}", f"{r['ms_per_image']:.3g}",
                        "" if sp is None else f"{sp:.2f}")
        parts.append(m_t)
    return Group(*parts)
