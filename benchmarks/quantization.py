"""Post-training quantization of the demo model: edgediff vs onnxruntime and NNCF, same calibration set.

    python benchmarks/quantization.py [--samples 64] [--steps 20] [--calib 256] [--iters N] [--act-iters N]
                                      [--seeds 0,1,2] [--model demo] [--out bench-out/quantization.json]
                                      [--cache bench-out/cache] [--merge A.json B.json ...]

The reconstruction runs the quant pass's defaults (1000 + 500 iterations per block) unless
--iters/--act-iters say otherwise. Calibration sets and the fp32 reference samples are cached
under --cache (keyed by model weights, seed, sample count, steps and sampler), so a rerun of some
rows (--only) reuses them instead of sampling the float model again; --merge combines the
per-seed results of several runs (later files replace same-named rows) into one mean ± std table.

Rows (all on the same model, all calibrated on the same number of x_t from the FP model's own
DDIM trajectories; the peers get exactly the points edgediff's w8a8 uses, for free):
  fp32                       the float model (reference)
  ort-minmax / ort-percentile onnxruntime.quantization.quantize_static, QDQ, per-channel int8
                             weights, uint8 activations, on an ONNX from torch.onnx.export
  nncf                       nncf.quantize on the same ONNX (MIXED preset: asymmetric activations)
  edgediff-w8a8              recipe w8a8 (PTQ4DM calibration, L_p init, shortcut split, attention)
  edgediff-w8a8-smooth       the same + SmoothQuant migration (quant option smooth = true)
  plain-w4a8                 W4A8 min-max, no reconstruction, no shortcut split (the collapse case)
  edgediff-w4a8              recipe w4a8 (Q-Diffusion calibration, BRECQ/AdaRound, split)
  edgediff-w4a8-ptqd         the w4a8 model + the ptqd pass (correction applied in the sampler)
  edgediff-w4a8-sym          recipe w4a8 with symmetric weights (the recipe before session 14)
  edgediff-w4a8-splitw       ... symmetric + split_weights (per-half weight scales at skip concatenations)
  edgediff-w4a8-asym         ... weight_symmetric = false (per-channel zero points; what the recipe now runs)
Columns: PSNR of final samples vs FP32 under the same seeds (DDIM and DDPM), digit Fréchet
distance to held-out real digits and confidence share (DDIM samples, the bundled classifier),
weight bytes as stored, calibration wall time. The edgediff rows are PyTorch simulations of the
integer arithmetic (fake quantization); the ORT/NNCF rows run in onnxruntime's int8 kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `python benchmarks/quantization.py` puts benchmarks/ first on sys.path, where benchmarks/openvino.py
# would shadow the openvino package that NNCF imports
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from edgediff.demo.judge import DigitJudge  # noqa: E402
from edgediff.loaders import load_model  # noqa: E402
from edgediff.metrics import psnr  # noqa: E402
from edgediff.model import DiffusionModel  # noqa: E402
from edgediff.passes import PassContext, get, make_options  # noqa: E402
from edgediff.quant_params import QuantParams  # noqa: E402
from edgediff.recipe import load_recipe  # noqa: E402
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample  # noqa: E402


class OrtDenoiser:
    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = self.sess.run(None, {"sample": x.numpy().astype(np.float32), "timestep": t.numpy().astype(np.float32)})
        return torch.from_numpy(out[0])


def export_onnx(model: DiffusionModel, path: Path) -> None:
    inp = model.example_inputs(batch=2)
    torch.onnx.export(model.module().eval(), (inp["sample"], inp["timestep"]), str(path), input_names=["sample", "timestep"],
                      output_names=["out"], opset_version=17, dynamo=False,
                      dynamic_axes={"sample": {0: "B"}, "timestep": {0: "B"}, "out": {0: "B"}})


def nncf_ready(path: Path) -> Any:
    """The ONNX with an Identity before the graph output and inferred value_info.

    NNCF 3.4's ONNX preprocessing removes no-op Casts and looks up their output in
    value_info, which has no entry when that output is the graph output ('out'): KeyError.
    """
    import onnx
    from onnx import helper

    m = onnx.load(str(path))
    for node in m.graph.node:
        for i, o in enumerate(node.output):
            if o == "out":
                node.output[i] = "out_pre_identity"
    m.graph.node.append(helper.make_node("Identity", ["out_pre_identity"], ["out"], name="out_identity"))
    return onnx.shape_inference.infer_shapes(m)


WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def timestep_path_nodes(path: Path, timestep_input: str = "timestep") -> list[str]:
    """Names of the nodes computing on the timestep alone, up to (not including) its first weighted layer.

    These are the sinusoidal embedding's t*freq, Sin, Cos, Concat, Cast. Left to the peers'
    defaults they get uint8 activations: t*freq spans [0, ~1000] rad, so one step is ~4 rad and
    Sin/Cos of it are noise, which ruins every sample (docs/quantization.md, "the ORT and NNCF
    rows"). edgediff's quant pass keeps this arithmetic in float as every int8 deployment does, so
    the peers are given the same scope (ORT nodes_to_exclude, NNCF IgnoredScope).
    """
    import onnx

    graph = onnx.load(str(path)).graph
    # tensors that do not depend on any graph input's values (weights, constants, shapes)
    static = {i.name for i in graph.initializer} | {""}
    timed = {timestep_input}
    names = []
    for node in graph.node:  # ONNX keeps nodes in topological order
        ins = set(node.input)
        if node.op_type == "Shape" or ins <= static:
            static.update(node.output)
        elif ins & timed and ins <= static | timed and node.op_type not in WEIGHTED_OPS:
            timed.update(node.output)
            names.append(node.name)
    return names


def onnx_weight_bytes(path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer))


def edgediff_weight_bytes(model: DiffusionModel) -> int:
    """Quantized weights at their bit-width (+ one fp32 scale per channel), everything else fp32."""
    qp = QuantParams.of(model)
    # the simulation's activation steps are 0-d parameters named *.scale: not weights
    total = sum(p.numel() * 4 for n, p in model.denoiser.named_parameters() if not (n.endswith(".scale") and p.dim() == 0))
    mods = dict(model.denoiser.named_modules())
    for name, lq in (qp.layers.items() if qp else []):
        if lq.weight is None:
            continue
        w = mods[name].inner.weight
        total += -w.numel() * 4 + (w.numel() * lq.weight.bits + 7) // 8
        for tq in (lq.weight, lq.weight2):  # a split weight's second part has its own scales
            if tq is not None:  # fp32 scale per channel, plus a one-byte zero point when asymmetric
                total += tq.scale.numel() * (4 if tq.signed else 5)
    return int(total)


def edgediff_denoiser(model: DiffusionModel, runtime: str, where: Path, probe: tuple[torch.Tensor, torch.Tensor]
                      ) -> tuple[Any, str]:
    """The quantized model as a sampler runs it: the PyTorch simulation, or its int8 ONNX export
    (qlinear layout, onnxruntime's integer kernels) with its deviation from the simulation."""
    if runtime == "sim":
        return TorchDenoiser(model), "PyTorch fake-quant simulation"
    from edgediff.exporters import get_backend

    backend = get_backend("onnx")
    report = backend.export(model, where, "int8")
    den = backend.load_denoiser(where)
    x, t = probe
    a, b = TorchDenoiser(model)(x, t), den(x, t)
    dev = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return den, (f"int8 ONNX ({report.get('int8_layout', 'int8')}) in onnxruntime; output deviates {dev:.1e} (relative) "
                 f"from the simulation on {len(x)} calibration points")


def run_pass(name: str, model: DiffusionModel, opts: dict[str, Any], ctx: PassContext) -> tuple[DiffusionModel, float, dict]:
    fn, _ = get(name)
    ctx.metrics = {}
    t0 = time.perf_counter()
    out = fn(model.clone(), make_options(name, opts), ctx)
    return out, time.perf_counter() - t0, dict(ctx.metrics)


def recipe_opts(recipe: str, name: str) -> dict[str, Any]:
    return next(dict(p.options) for p in load_recipe(recipe).passes if p.name == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--calib", type=int, default=256, help="calibration points for every method")
    ap.add_argument("--iters", type=int, default=None,
                    help="edgediff reconstruction stage-1 iterations per block (default: the quant pass's)")
    ap.add_argument("--act-iters", type=int, default=None,
                    help="edgediff reconstruction stage-2 iterations per block (default: the quant pass's)")
    ap.add_argument("--cache", type=Path, default=Path("bench-out/cache"),
                    help="calibration sets and fp32 reference samples, reused across runs")
    ap.add_argument("--runtime", choices=("sim", "onnx"), default="sim",
                    help="edgediff rows: PyTorch simulation, or the int8 ONNX export in onnxruntime (faster)")
    ap.add_argument("--samplers", default="ddim,ddpm",
                    help="samplers whose final samples are compared (FD and confidence need ddim)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine the per-seed results of these JSON files (no run)")
    ap.add_argument("--calib-traj", type=int, default=32, help="FP trajectories the calibration sets come from")
    ap.add_argument("--calib-steps", type=int, default=50, help="DDIM steps of those trajectories")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (e.g. 0,1,2): one full run per seed "
                    "(calibration set, sampling noise), then mean ± std per row; overrides --seed")
    ap.add_argument("--out", type=Path, default=Path("bench-out/quantization.json"))
    args = ap.parse_args()
    out = args.out
    if args.merge:
        results = merge_runs(args.merge)
        write_spread(out, results, sorted({r["seed"] for r in results}), results[0]["samples"], results[0]["steps"])
        return
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [args.seed]
    results = []
    for seed in seeds:
        args.seed = seed
        args.out = out if len(seeds) == 1 else out.with_name(f"{out.stem}-seed{seed}{out.suffix}")
        results.append(run_once(args))
        if len(seeds) > 1:  # after every seed, so that an interrupted run still has its spread so far
            write_spread(out, results, seeds[:len(results)], args.samples, args.steps)


def write_spread(out: Path, results: list[dict[str, Any]], seeds: list[int], samples: int, steps: int) -> None:
    spread = mean_std(results)
    print(f"\nmean ± std over seeds {seeds} ({samples} samples, {steps} steps)")
    for name, figs in spread.items():
        print(f"{name:22s} " + "  ".join(f"{k} {v[0]:.3f} ± {v[1]:.3f}" for k, v in figs.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": seeds, "samples": samples, "steps": steps,
                               "mean_std": spread, "per_seed": results}, indent=2) + "\n")
    print(f"wrote {out}")


def merge_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Per-seed results of several runs, one per seed; a later file's row replaces an earlier same-named one."""
    by_seed: dict[int, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for res in data.get("per_seed", [data]):
            if "seed" not in res:
                raise SystemExit(f"{path}: not a finished benchmarks/quantization.py result (no seed)")
            cur = by_seed.setdefault(res["seed"], {**res, "rows": []})
            if (cur["samples"], cur["steps"]) != (res["samples"], res["steps"]):
                raise SystemExit(f"{path}: seed {res['seed']} was run with other samples/steps")
            at = {r["name"]: i for i, r in enumerate(cur["rows"])}
            for r in res["rows"]:  # replaced in place, new rows appended: the table keeps its order
                if r["name"] in at:
                    cur["rows"][at[r["name"]]] = r
                else:
                    cur["rows"].append(r)
    if not by_seed:
        raise SystemExit("--merge: no results in " + ", ".join(map(str, paths)))
    return [by_seed[k] for k in sorted(by_seed)]


FIGURES = ("psnr_ddim", "psnr_ddpm", "digit_frechet", "confidence_share", "weight_bytes")


def mean_std(results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """row name -> figure -> [mean, std (ddof 1), n] over the runs that have it."""
    acc: dict[str, dict[str, list[float]]] = {}
    for res in results:
        for row in res["rows"]:
            for k in FIGURES:
                if row.get(k) is not None:
                    acc.setdefault(row["name"], {}).setdefault(k, []).append(float(row[k]))
    return {n: {k: [round(float(np.mean(v)), 4), round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4), len(v)]
                for k, v in figs.items()} for n, figs in acc.items()}


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    """One run of every requested row at args.seed; returns the result written to args.out."""
    torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(",")))
    samplers = [x for x in args.samplers.split(",") if x.strip()]
    if "ddim" not in samplers or not set(samplers) <= {"ddim", "ddpm"}:
        raise SystemExit(f"--samplers: expected ddim or ddim,ddpm, got {args.samplers!r}")
    want = lambda name: not only or name in only or name == "fp32"  # noqa: E731

    model = load_model(args.model)
    judge = DigitJudge()
    shape = model.signature.sample_shape
    tmp = Path(tempfile.mkdtemp(prefix="edgediff-bench-quant-"))
    ctx = PassContext(seed=args.seed, cache_dir=args.cache)
    from edgediff.passes.calib import model_hash

    ref_dir = args.cache / "fp32-ref"
    ref_key = f"{model_hash(model)[:16]}-s{args.seed}-n{args.samples}-t{args.steps}"
    rows: list[dict[str, Any]] = []
    ref: dict[str, torch.Tensor] = {}

    def evaluate(name: str, den: Any, weight_bytes: int, calib_s: float | None, correction: Any = None,
                 note: str = "") -> None:
        r: dict[str, Any] = {"name": name, "weight_bytes": weight_bytes,
                             "calib_seconds": round(calib_s, 1) if calib_s is not None else None}
        t0 = time.perf_counter()
        for sampler in samplers:
            cached = ref_dir / f"{ref_key}-{sampler}.pt"
            if name == "fp32" and cached.exists():  # the float model's samples do not change between runs
                x = torch.load(cached)
            else:
                x = sample(den, model.schedule, shape, args.samples, seed=args.seed,
                           cfg=SamplerConfig(sampler, args.steps, batch_size=args.samples), correction=correction)
            if name == "fp32":
                ref[sampler] = x
                if not cached.exists():
                    ref_dir.mkdir(parents=True, exist_ok=True)
                    torch.save(x, cached)
            r[f"psnr_{sampler}"] = round(psnr(x, ref[sampler]), 2) if name != "fp32" else None
            if sampler == "ddim":
                r["digit_frechet"] = round(judge.frechet(x), 3)
                r["confidence_share"] = round(judge.confidence_share(x), 3)
        r["sampling_seconds"] = round(time.perf_counter() - t0, 1)
        if note:
            r["note"] = note
        rows.append(r)
        # written after every row so that an interrupted run still leaves its figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"partial": True, "seed": args.seed, "samples": args.samples,
                                             "steps": args.steps, "rows": rows}, indent=2) + "\n")
        ps = lambda v: "   -  " if v is None else f"{v:6.2f}"  # noqa: E731
        print(f"{name:22s} PSNR ddim {ps(r['psnr_ddim'])} ddpm {ps(r.get('psnr_ddpm'))}  FD {r['digit_frechet']:7.3f}  "
              f"conf {r['confidence_share']:.3f}  bytes {weight_bytes:9d}  calib {r['calib_seconds']} s", flush=True)

    fp_bytes = sum(p.numel() * 4 for p in model.denoiser.parameters())
    evaluate("fp32", TorchDenoiser(model), fp_bytes, None)

    # --- calibration sets: PTQ4DM for w8a8 (and the peers), Q-Diffusion for w4a8, same size
    n_traj, cs = args.calib_traj, args.calib_steps
    w8_calib = {**recipe_opts("w8a8", "calib"), "n_samples": n_traj, "steps": cs, "count": args.calib,
                "seed": args.seed}
    w8_cal_model, w8_calib_s, _ = run_pass("calib", model, w8_calib, ctx)
    interval = max(1, (cs * n_traj) // args.calib)
    w4_calib = {**recipe_opts("w4a8", "calib"), "n_samples": n_traj, "steps": cs, "interval": interval,
                "seed": args.seed}
    from edgediff.passes.calib import load_calibration

    calib_data = load_calibration(w8_cal_model, ctx)
    feeds = [{"sample": calib_data["x"][i:i + 1].numpy(), "timestep": calib_data["t"][i:i + 1].numpy()}
             for i in range(len(calib_data["x"]))]

    # --- peers on an ONNX export of the same model
    fp_onnx = tmp / "fp32.onnx"
    export_onnx(model, fp_onnx)
    float_nodes = timestep_path_nodes(fp_onnx)
    for method in ("MinMax", "Percentile"):
        name = f"ort-{method.lower()}"
        if not want(name):
            continue
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        out = tmp / f"{name}.onnx"
        t0 = time.perf_counter()
        try:
            quantize_static(str(fp_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=float_nodes)
        except Exception as e:  # report the peer's failure as a row, do not hide it
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: failed: {e}", flush=True)
            continue
        evaluate(name, OrtDenoiser(out), onnx_weight_bytes(out), time.perf_counter() - t0,
                 note=f"{len(float_nodes)} timestep-embedding nodes kept float")

    if want("nncf"):
        try:
            import nncf
            import onnx

            t0 = time.perf_counter()
            # validate=False: NNCF's preprocessing drops the no-op Casts among these nodes
            qm = nncf.quantize(nncf_ready(fp_onnx), nncf.Dataset(feeds), subset_size=len(feeds),
                               preset=nncf.QuantizationPreset.MIXED,
                               ignored_scope=nncf.IgnoredScope(names=float_nodes, validate=False))
            dt = time.perf_counter() - t0
            out = tmp / "nncf.onnx"
            onnx.save(qm, str(out))
            evaluate("nncf", OrtDenoiser(out), onnx_weight_bytes(out), dt,
                     note=f"{len(float_nodes)} timestep-embedding nodes kept float")
        except Exception as e:
            rows.append({"name": "nncf", "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"nncf: failed: {e}", flush=True)

    # --- edgediff
    iters = {k: v for k, v in (("iters", args.iters), ("act_iters", args.act_iters)) if v is not None}
    if args.runtime == "onnx":
        from edgediff.exporters.base import set_threads

        set_threads(args.threads)
    probe = (calib_data["x"][:64], calib_data["t"][:64])
    as_run = lambda q, tag: edgediff_denoiser(q, args.runtime, tmp / f"{tag}.onnx", probe)  # noqa: E731
    if want("edgediff-w8a8"):
        q, dt, met = run_pass("quant", w8_cal_model, {**recipe_opts("w8a8", "quant"), **iters}, ctx)
        den, how = as_run(q, "w8a8")
        evaluate("edgediff-w8a8", den, edgediff_weight_bytes(q), w8_calib_s + dt,
                 note=f"{met.get('method')}; calib {w8_calib_s:.0f} s incl. FP trajectories; {how}")
    if want("edgediff-w8a8-smooth"):  # SmoothQuant migration on a model without injected outliers
        q, dt, met = run_pass("quant", w8_cal_model, {**recipe_opts("w8a8", "quant"), "smooth": True}, ctx)
        sm = met.get("smoothing") or {}
        den, how = as_run(q, "w8a8-smooth")
        evaluate("edgediff-w8a8-smooth", den, edgediff_weight_bytes(q), w8_calib_s + dt,
                 note=f"{met.get('method')}; {len(sm.get('smoothed', []))} norms smoothed, "
                      f"{len(sm.get('reverted', []))} reverted; {how}")
    w4_cal_model, w4_calib_s, _ = run_pass("calib", model, w4_calib, ctx)
    if want("plain-w4a8"):
        plain = {"weight_bits": 4, "act_bits": 8, "weight_init": "minmax", "act_init": "minmax", "split_shortcut": False,
                 "reconstruct": False}
        q, dt, met = run_pass("quant", w4_cal_model, plain, ctx)
        den, how = as_run(q, "plain-w4a8")
        evaluate("plain-w4a8", den, edgediff_weight_bytes(q), w4_calib_s + dt, note=f"{met.get('method', '')}; {how}")
    if want("edgediff-w4a8") or want("edgediff-w4a8-ptqd"):
        q4, dt4, met = run_pass("quant", w4_cal_model, {**recipe_opts("w4a8", "quant"), **iters}, ctx)
        den, how = as_run(q4, "w4a8")
        evaluate("edgediff-w4a8", den, edgediff_weight_bytes(q4), w4_calib_s + dt4,
                 note=f"{met.get('method')}; reconstruction {met.get('reconstruction')}; {how}")
        if want("edgediff-w4a8-ptqd"):
            from edgediff.passes.ptqd import correction_for

            p, dtp, metp = run_pass("ptqd", q4, recipe_opts("w4a8-ptqd", "ptqd"), ctx)
            den, how = as_run(p, "w4a8-ptqd")
            evaluate("edgediff-w4a8-ptqd", den, edgediff_weight_bytes(p), w4_calib_s + dt4 + dtp,
                     correction=correction_for(p),
                     note=f"k in [{metp.get('k_min')}, {metp.get('k_max')}], mean act bits {metp.get('mean_act_bits')}; "
                          f"{how}")

    # the recipe's weights are asymmetric since session 14: the variants name their options outright
    for tag, extra in (("sym", {"weight_symmetric": True}), ("splitw", {"split_weights": True, "weight_symmetric": True}),
                       ("asym", {"weight_symmetric": False})):
        name = f"edgediff-w4a8-{tag}"
        if want(name):  # the w4a8 recipe with one Q-Diffusion option changed, same reconstruction
            q, dt, met = run_pass("quant", w4_cal_model, {**recipe_opts("w4a8", "quant"), **iters, **extra}, ctx)
            den, how = as_run(q, name)
            evaluate(name, den, edgediff_weight_bytes(q), w4_calib_s + dt,
                     note=f"{met.get('method')}; reconstruction {met.get('reconstruction')}; {how}")

    by = {r["name"]: r for r in rows if "error" not in r}
    ratios: dict[str, Any] = {}
    for peer in ("ort-minmax", "ort-percentile", "nncf"):
        if peer in by and "edgediff-w8a8" in by:
            ratios[f"w8a8_psnr_ddim_minus_{peer}_db"] = round(by["edgediff-w8a8"]["psnr_ddim"] - by[peer]["psnr_ddim"], 2)
            if "psnr_ddpm" in by[peer]:
                ratios[f"w8a8_psnr_ddpm_minus_{peer}_db"] = round(by["edgediff-w8a8"]["psnr_ddpm"]
                                                                  - by[peer]["psnr_ddpm"], 2)
            if by[peer].get("calib_seconds"):
                ratios[f"w8a8_calib_time_ratio_vs_{peer}"] = round(by["edgediff-w8a8"]["calib_seconds"] /
                                                                   by[peer]["calib_seconds"], 2)
    if "plain-w4a8" in by and "edgediff-w4a8" in by:
        ratios["w4a8_psnr_ddim_gain_over_plain_db"] = round(by["edgediff-w4a8"]["psnr_ddim"] - by["plain-w4a8"]["psnr_ddim"], 2)
    if "edgediff-w4a8" in by:
        ratios["w4a8_weight_bytes_ratio_vs_fp32"] = round(by["edgediff-w4a8"]["weight_bytes"] / fp_bytes, 3)
    result = {"model": args.model, "samples": args.samples, "steps": args.steps, "calib_points": args.calib,
              "iters": args.iters, "act_iters": args.act_iters, "seed": args.seed, "threads": args.threads,
              "runtime": args.runtime,
              "simulation": ("edgediff rows: PyTorch fake-quant simulation" if args.runtime == "sim" else
                             "edgediff rows: their int8 ONNX export in onnxruntime") + "; ort/nncf rows: onnxruntime int8 QDQ",
              "rows": rows, "ratios": ratios}
    print(json.dumps(ratios, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
