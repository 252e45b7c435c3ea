"""Diff-Pruning vs LD-Pruner vs Torch-Pruning's plain importances, at the same MACs budget.

    python benchmarks/pruning.py [--models demo,cifar] [--macs-reduction 0.45]
                                 [--methods diff,taylor,magnitude,ld] [--samples 128] [--steps 20]
                                 [--finetune-steps 100] [--repeat 20] [--out bench-out/pruning.json]

Models: `demo` (the bundled, trained 1x16x16 digits UNet2DModel) and `cifar` (diffusers
UNet2DModel with the google/ddpm-cifar10-32 config, 35.7M params, RANDOMLY INITIALISED:
structure and speed only, no quality figures).

Methods, all through edgediff's passes in this one run:
- diff: prune.diff, Diff-Pruning (Taylor over the informative timesteps, threshold 0.05);
- taylor: prune.diff importance=taylor, Torch-Pruning's TaylorImportance over all timesteps;
- magnitude: prune.diff importance=magnitude, Torch-Pruning's MagnitudeImportance (L2);
- random: prune.diff importance=random (optional);
- ld: prune.ld, LD-Pruner (operator removal: ResNet blocks, attention, transformer branches);
- ld-ops: prune.ld at operator level (include = operators: also single 3x3 convs -> 1x1 and single
  Linear layers -> identity / low rank / bias), budget spent in 2 re-scored rounds;
- ld-ops-cost: ld-ops removing in ascending score per MAC saved (order = per_cost, the pass's default)
  instead of score (ld and ld-ops run order = score, the paper's).
The channel methods share one channel ratio, found once by bisection so that MACs drop by
--macs-reduction; they therefore have identical structure (params, MACs, latency), and
differ only in which channels they keep. LD-Pruner removes operators until the same budget.

Figures per method: params, MACs, ONNX Runtime latency (1 thread, batch 1, best of --repeat
after warm-up, same run as the unpruned model) and the speed-up vs unpruned; on the demo model
also sample quality before and after one fixed short fine-tune (finetune pass, distilled from
the unpruned model): PSNR of the final samples vs the unpruned model's samples (same seeds,
DDIM), digit Fréchet distance vs held-out real digits and the classifier's confidence share.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.demo.judge import DigitJudge  # noqa: E402
from edgediff.metrics import macs, params, psnr  # noqa: E402
from edgediff.model import DiffusionModel, InputSignature  # noqa: E402
from edgediff.passes import PassContext, get, make_options  # noqa: E402
from edgediff.sampling import SamplerConfig, TorchDenoiser, sample  # noqa: E402
from edgediff.schedule import NoiseSchedule  # noqa: E402

# google/ddpm-cifar10-32's UNet2DModel config (as in benchmarks/kernels.py)
CIFAR_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
                    attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, dropout=0.0)


def load(name: str) -> tuple[DiffusionModel, str]:
    if name == "demo":
        from edgediff.loaders import load_model

        return load_model("demo"), "bundled demo model (trained on digits)"
    if name == "cifar":
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        m = UNet2DModel(**CIFAR_CONFIG).eval()
        return (DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((3, 32, 32)), "UNet2DModel",
                               dict(m.config), {"source": "cifar config, random init"}),
                "google/ddpm-cifar10-32 config, RANDOM INIT (structure and speed only)")
    raise SystemExit(f"unknown model {name!r}; expected demo or cifar")


def ort_ms(model: DiffusionModel, repeat: int) -> float:
    """Best-of-`repeat` ONNX Runtime latency of one batch-1 call, single thread."""
    import onnxruntime as ort

    inputs = model.example_inputs(1)
    names = [k for k in ("sample", "timestep", "encoder_hidden_states", "class_labels") if k in inputs]
    args = (inputs["sample"], inputs["timestep"], inputs.get("encoder_hidden_states"), inputs.get("class_labels"))
    f = io.BytesIO()
    torch.onnx.export(model.module().eval(), args, f, input_names=names, output_names=["out"], dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {k: inputs[k].numpy() for k in names}
    sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    # the minimum: on a shared machine the spread is other processes, the minimum is our cost
    return float(min(times) * 1e3)


def samples_of(model: DiffusionModel, n: int, steps: int, seed: int) -> torch.Tensor:
    return sample(TorchDenoiser(model), model.schedule, tuple(model.signature.sample_shape), n, seed=seed,
                  cfg=SamplerConfig("ddim", steps=steps, batch_size=64))


def quality(judge: DigitJudge, x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"psnr_db": round(psnr(x, ref), 2), **{k: round(v, 4) for k, v in judge.report(x).items()}}


def run_pass(name: str, model: DiffusionModel, original: DiffusionModel, seed: int = 0,
             **options: Any) -> tuple[DiffusionModel, dict[str, Any], float]:
    run, _ = get(name)
    ctx = PassContext(seed=seed, original=original)
    t0 = time.perf_counter()
    out = run(model.clone(), make_options(name, options), ctx)
    return out, ctx.metrics, time.perf_counter() - t0


def bench_model(name: str, args: argparse.Namespace, judge: DigitJudge | None) -> dict[str, Any]:
    from edgediff.passes.prune_diff import ratio_for_macs

    model, what = load(name)
    is_demo = name == "demo"
    print(f"\n== {name}: {what}", file=sys.stderr)
    base = {"method": "unpruned", "params": params(model.module()), "macs": macs(model),
            "ort_ms": ort_ms(model, args.repeat)}
    ref = None
    if is_demo and judge is not None:
        ref = samples_of(model, args.samples, args.steps, args.seed)
        base["quality"] = {k: round(v, 4) for k, v in judge.report(ref).items()}
    t0 = time.perf_counter()
    ratio, achieved = ratio_for_macs(model, args.macs_reduction, closest=True)
    ratio = float(ratio)
    print(f"channel ratio {ratio:.3f} removes {achieved:.1%} of MACs (search {time.perf_counter() - t0:.0f}s)",
          file=sys.stderr)
    # gradient data: the digits for the demo; the model's own (here: untrained) samples for cifar
    grad_opts = (dict(t_stride=args.t_stride, batch_size=args.grad_batch, data="auto") if is_demo
                 else dict(t_stride=100, batch_size=4, data="samples", sample_steps=2))
    ld_opts = dict(samples=16, steps=10) if is_demo else dict(samples=4, steps=2)
    rows = [base]
    for method in args.methods:
        print(f"-- {name}: {method}", file=sys.stderr)
        if method in ("ld", "ld-ops", "ld-ops-cost"):
            # LD-Pruner removes (or replaces) operators until at least the budget the channel methods reached
            level: dict[str, Any] = dict(include="operators", rounds=2) if method.startswith("ld-ops") else {}
            # ld and ld-ops keep the paper's score order (the pass's default is per_cost)
            level["order"] = "per_cost" if method == "ld-ops-cost" else "score"
            pruned, m, secs = run_pass("prune.ld", model, model, seed=args.seed, macs_reduction=round(achieved, 4),
                                       **ld_opts, **level)
            extra = {"removed": [f"{r['name']}:{r['kind']}" for r in m["removed"]]}
        else:
            opts = dict(ratio=ratio, importance=method, **(grad_opts if method in ("diff", "taylor") else {}))
            pruned, m, secs = run_pass("prune.diff", model, model, seed=args.seed, **opts)
            extra = {k: m[k] for k in ("timesteps_used", "last_t", "stopped_by_threshold") if k in m}
        row: dict[str, Any] = {"method": method, "params": params(pruned.module()), "macs": macs(pruned),
                               "prune_s": round(secs, 1), **extra}
        row["ort_ms"] = ort_ms(pruned, args.repeat)
        row["speedup"] = round(base["ort_ms"] / row["ort_ms"], 3)
        row["macs_reduction"] = round(1 - row["macs"] / base["macs"], 4)
        row["params_reduction"] = round(1 - row["params"] / base["params"], 4)
        if is_demo and judge is not None and ref is not None:
            row["before_ft"] = quality(judge, samples_of(pruned, args.samples, args.steps, args.seed), ref)
            tuned, fm, fsecs = run_pass("finetune", pruned, model, seed=args.seed, steps=args.finetune_steps, batch_size=32,
                                        lr=5e-4, distill=1.0, ema=0.999, data="auto")
            row["finetune_s"] = round(fsecs, 1)
            row["after_ft"] = quality(judge, samples_of(tuned, args.samples, args.steps, args.seed), ref)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return {"model": name, "what": what, "ratio": round(ratio, 4), "rows": rows}


def print_table(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: {res['what']}; channel ratio {res['ratio']}")
    hdr = f"{'method':<10} {'params':>10} {'MACs':>12} {'-MACs':>6} {'ORT ms':>8} {'speedup':>7}"
    q = "quality" in res["rows"][0]
    if q:
        hdr += f" | {'PSNR':>6} {'FD':>7} {'conf':>5} | {'PSNR ft':>7} {'FD ft':>7} {'conf ft':>7}"
    print(hdr)
    for r in res["rows"]:
        line = (f"{r['method']:<10} {r['params']:>10,} {r['macs']:>12,} {r.get('macs_reduction', 0):>6.1%} "
                f"{r['ort_ms']:>8.3f} {r.get('speedup', 1.0):>7.2f}")
        if q:
            if r["method"] == "unpruned":
                line += f" | {'ref':>6} {r['quality']['digit_frechet']:>7.2f} {r['quality']['confidence_share']:>5.2f} |"
            else:
                b, a = r["before_ft"], r["after_ft"]
                line += (f" | {b['psnr_db']:>6.2f} {b['digit_frechet']:>7.2f} {b['confidence_share']:>5.2f} | "
                         f"{a['psnr_db']:>7.2f} {a['digit_frechet']:>7.2f} {a['confidence_share']:>7.2f}")
        print(line)


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """model -> method -> figure -> [mean, std (ddof 1), n] over the seeds' runs."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for res in results:
        for row in res["rows"]:
            figs: dict[str, float] = {"ort_ms": row["ort_ms"]}
            for stage in ("quality", "before_ft", "after_ft"):
                for k, v in (row.get(stage) or {}).items():
                    figs[f"{stage}.{k}"] = v
            for k, v in figs.items():
                acc.setdefault(res["model"], {}).setdefault(row["method"], {}).setdefault(k, []).append(float(v))
    return {m: {meth: {k: [round(float(np.mean(v)), 4), round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4),
                           len(v)] for k, v in figs.items()} for meth, figs in by.items()} for m, by in acc.items()}


def print_spread(spread: dict[str, Any], seeds: list[int]) -> None:
    keys = ("before_ft.psnr_db", "before_ft.digit_frechet", "after_ft.psnr_db", "after_ft.digit_frechet",
            "after_ft.confidence_share")
    for model, by in spread.items():
        print(f"\n{model}: mean ± std over seeds {seeds}")
        print(f"{'method':<10} " + " ".join(f"{k:>22}" for k in keys))
        for meth, figs in by.items():
            cells = [f"{figs[k][0]:.2f} ± {figs[k][1]:.2f}" if k in figs else "-" for k in keys]
            print(f"{meth:<10} " + " ".join(f"{c:>22}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,cifar")
    ap.add_argument("--methods", default="diff,taylor,magnitude,ld", help="any of diff, taylor, magnitude, random, "
                    "ld, ld-ops, ld-ops-cost")
    ap.add_argument("--macs-reduction", type=float, default=0.45)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--t-stride", type=int, default=20, help="demo: timestep stride of the gradient walk")
    ap.add_argument("--grad-batch", type=int, default=32, help="demo: images in the gradient batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="", help="comma-separated seeds (e.g. 0,1,2): one full run per seed, "
                    "then mean ± std of every quality figure; overrides --seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-out/pruning.json"))
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [args.seed]
    torch.set_num_threads(args.threads)
    judge = DigitJudge()
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        args.seed = seed
        np.random.seed(seed)
        results = [bench_model(name, args, judge) for name in args.models.split(",") if name]
        for res in results:
            res["seed"] = seed
            print_table(res)
        per_seed.append(results)
    spread = summarize([r for results in per_seed for r in results])
    print_spread(spread, seeds)
    out = {"macs_reduction_target": args.macs_reduction, "t_stride": args.t_stride, "grad_batch": args.grad_batch,
           "samples": args.samples, "ddim_steps": args.steps, "seeds": seeds,
           "finetune_steps": args.finetune_steps, "torch_threads": args.threads,
           "results": [r for results in per_seed for r in results], "mean_std": spread,
           "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
