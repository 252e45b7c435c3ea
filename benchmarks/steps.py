"""Fewer and cheaper denoiser calls on the demo model, measured on ONNX Runtime through bundles.

    python benchmarks/steps.py [--samples 512] [--seeds 0,1,2] [--rounds 3]
                               [--edge-fast ARTIFACT] [--distilled ARTIFACT] [--consistency ARTIFACT]
                               [--distilled-edge ARTIFACT]
                               [--out bench-out/steps.json]

Rows (every one an `edgediff export ... -o DIR` bundle run by the torch-free numpy runtime):
DDIM 50 fp32 (the reference), DDIM 10, DPM-Solver++ 10 and 6, DeepCache N=2, 3 and 5 on
DPM-Solver++ 10, the progressively distilled model at 4 steps (`distill` recipe), and the
`edge-fast` composition (prune + finetune + cache + W8A8) exported to ONNX int8, and the same
bundle with its cache switched off (row key edgefast_nocache, not in the default --rows), a
consistency-distilled model at its recorded steps (row key consistency, with --consistency), and
the distilled model pruned and quantized (`compress DISTILLED --recipe distill-edge`, exported to
ONNX int8; row key distilled_edge, with --distilled-edge).
Without --edge-fast / --distilled the recipes are run here first (minutes).

Columns: denoiser calls per image (full/shallow), ORT ms per image (1 thread, denoiser and
scheduler only, rows interleaved over --rounds, median), digit Fréchet distance and confident
share over --samples samples for each seed (mean ± std over seeds), PSNR of the final samples
vs the reference's under the same seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _build(recipe: str, work: Path, seed: int = 0) -> Path:
    from edgediff.demo.data import split
    from edgediff.loaders import load_model
    from edgediff.pipeline import compress
    from edgediff.recipe import load_recipe

    out = work / recipe
    print(f"building the {recipe} artifact (runs the recipe) ...", flush=True)
    t0 = time.perf_counter()
    compress(load_model("demo"), load_recipe(recipe), out, seed=seed, data=split()["train"][0])
    print(f"  {recipe}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _bundle(model: Any, out: Path, precision: str = "fp32", sampler: str | None = None,
            steps: int | None = None) -> Path:
    from edgediff.bundle import export_bundle

    export_bundle(model, out, "onnx", precision, force=True, sampler=sampler, steps=steps)
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    """The JSON so far (rewritten after every row, so an interrupted long run keeps its finished rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (64 images each)")
    ap.add_argument("--edge-fast", type=Path, default=None, help="an artifact made with --recipe edge-fast")
    ap.add_argument("--distilled", type=Path, default=None, help="an artifact made with --recipe distill")
    ap.add_argument("--consistency", type=Path, default=None,
                    help="an artifact made with distill.steps method=consistency (row key consistency)")
    ap.add_argument("--distilled-edge", type=Path, default=None,
                    help="a distill artifact compressed with --recipe distill-edge (row key distilled_edge)")
    ap.add_argument("--work", type=Path, default=None, help="where bundles (and built artifacts) go")
    ap.add_argument("--rows", default="ref,ddim10,dpm10,dpm6,cache3,cache5,distilled,edgefast",
                    help="which rows to run (the reference's samples are cached in --work for PSNR)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/steps.json"))
    args = ap.parse_args()
    order = [k.strip() for k in args.rows.split(",") if k.strip()]  # rows run (and print) in this order
    want = set(order)
    if "consistency" in want and args.consistency is None:
        ap.error("row consistency needs --consistency ARTIFACT")
    if "distilled_edge" in want and args.distilled_edge is None:
        ap.error("row distilled_edge needs --distilled-edge ARTIFACT")
    torch.set_num_threads(1)

    from edgediff import passes
    from edgediff.artifact import load_artifact
    from edgediff.demo.judge import DigitJudge, held_out_digits
    from edgediff.loaders import load_model
    from edgediff.metrics import psnr
    from edgediff.passes import PassContext
    from edgediff.runtime.generate import run_bundle

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="edgediff-steps-"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_model("demo")
    run_cache, cache_opts = passes.get("cache")

    def cached(n: int) -> Any:
        return run_cache(base.clone(), cache_opts(depth=0, interval=n, check_samples=0), PassContext())

    plain = _bundle(base, work / "b-plain", steps=50, sampler="ddim")
    # (key, label, bundle maker, sampler, steps)
    specs: list[tuple[str, str, Any, str | None, int | None]] = [
        ("ref", "DDIM 50 fp32 (reference)", lambda: plain, "ddim", 50),
        ("ddim10", "DDIM 10", lambda: plain, "ddim", 10),
        ("dpm10", "DPM-Solver++ 10", lambda: plain, "dpmpp-2m", 10),
        ("dpm6", "DPM-Solver++ 6", lambda: plain, "dpmpp-2m", 6),
        ("cache3", "DPM-Solver++ 10 + DeepCache N=3",
         lambda: _bundle(cached(3), work / "b-cache3", sampler="dpmpp-2m", steps=10), None, None),
        ("cache2", "DPM-Solver++ 10 + DeepCache N=2",
         lambda: _bundle(cached(2), work / "b-cache2", sampler="dpmpp-2m", steps=10), None, None),
        ("cache5", "DPM-Solver++ 10 + DeepCache N=5",
         lambda: _bundle(cached(5), work / "b-cache5", sampler="dpmpp-2m", steps=10), None, None),
        ("distilled", "distilled, DDIM 4 (trailing)",
         lambda: _bundle(load_artifact(args.distilled or _build("distill", work)), work / "b-distilled"), None, None),
        ("consistency", "consistency distilled, LCM (recorded steps)",
         lambda: _bundle(load_artifact(args.consistency), work / "b-consistency"), None, None),
        ("distilled_edge", "distilled 4 + prune + W8A8 (distill-edge), ONNX int8",
         lambda: _bundle(load_artifact(args.distilled_edge), work / "b-distilled-edge", precision="int8"), None, None),
        ("edgefast", "edge-fast, ONNX int8",
         lambda: _bundle(load_artifact(args.edge_fast or _build("edge-fast", work)), work / "b-edge-fast",
                         precision="int8"), None, None),
    ]
    by_key = {key: (label, make, sampler, steps) for key, label, make, sampler, steps in specs}

    def nocache() -> Path:  # the same int8 bundle with its cache schedule switched off
        b = work / "b-edge-fast"
        if not b.is_dir():
            _bundle(load_artifact(args.edge_fast or _build("edge-fast", work)), b, precision="int8")
        return b

    by_key["edgefast_nocache"] = ("edge-fast without DeepCache, ONNX int8", nocache, None, None)
    unknown = want - set(by_key)
    if unknown:
        ap.error(f"unknown --rows {', '.join(sorted(unknown))}; expected some of {', '.join(by_key)}")
    rows = [(by_key[k][0], by_key[k][1](), by_key[k][2], by_key[k][3]) for k in order]

    # latency: rows take turns, one 64-image batch per round, 1 thread
    lat: dict[str, list[float]] = {r[0]: [] for r in rows}
    calls: dict[str, tuple[int, int]] = {}
    for _ in range(args.rounds):
        for label, b, sampler, steps in rows:
            _, st = run_bundle(b, samples=64, seed=100, steps=steps, sampler=sampler, threads=1,
                               cache="without DeepCache" not in label)
            lat[label].append(st["sampling_ms_per_image"])
            calls[label] = (st["denoiser_calls_full"], st["denoiser_calls_shallow"])
    print("latency done", flush=True)

    judge = DigitJudge()
    held = held_out_digits()
    ref_x: dict[int, torch.Tensor] = {}
    results = []
    for label, b, sampler, steps in rows:
        fds, confs, psnrs = [], [], []
        t0 = time.perf_counter()
        for seed in seeds:
            cached_ref = work / f"ref_seed{seed}_n{args.samples}.npy"
            if label.endswith("(reference)") or seed not in ref_x:
                if not cached_ref.is_file():
                    x, _ = run_bundle(plain, samples=args.samples, seed=seed, steps=50, sampler="ddim", threads=1)
                    np.save(cached_ref, x)
                ref_x[seed] = torch.from_numpy(np.load(cached_ref))
            if label.endswith("(reference)"):
                xt = ref_x[seed]
            else:
                x, _ = run_bundle(b, samples=args.samples, seed=seed, steps=steps, sampler=sampler, threads=1,
                                  cache="without DeepCache" not in label)
                xt = torch.from_numpy(x)
            fds.append(judge.frechet(xt, held))
            confs.append(judge.confidence_share(xt))
            psnrs.append(psnr(xt, ref_x[seed]))
        row = {"name": label, "calls_full": calls[label][0], "calls_shallow": calls[label][1],
               "ort_ms_per_image": round(statistics.median(lat[label]), 3), "ms_rounds": lat[label],
               "fd_mean": statistics.mean(fds), "fd_std": statistics.pstdev(fds),
               "confident_mean": statistics.mean(confs), "confident_std": statistics.pstdev(confs),
               "psnr_vs_reference_db": statistics.mean(psnrs) if not label.endswith("(reference)") else None,
               "fd_per_seed": fds, "confident_per_seed": confs, "seconds": round(time.perf_counter() - t0, 1)}
        results.append(row)
        _write(args.out, {"samples": args.samples, "seeds": seeds, "rounds": args.rounds, "threads": 1,
                          "rows": results, "partial": True})
        print(f"{label:34s} calls {row['calls_full']:2d}/{row['calls_shallow']:<2d} "
              f"{row['ort_ms_per_image']:8.2f} ms  FD {row['fd_mean']:6.2f}±{row['fd_std']:.2f}  "
              f"conf {row['confident_mean']:.3f}±{row['confident_std']:.3f}", flush=True)

    ref = next((r for r in results if r["name"].endswith("(reference)")), None)
    for r in results:
        r["speedup_vs_reference"] = round(ref["ort_ms_per_image"] / r["ort_ms_per_image"], 2) if ref else None
    goal: dict[str, Any] = {}
    # one-sided: a row is not failed for a higher confident share or a lower FD than the reference's
    for ef in (r for r in results if r["name"].startswith("edge-fast") and ref):  # each edge-fast row
        goal[ef["name"]] = {"speedup_10x": ef["speedup_vs_reference"] >= 10,
                            "confident_within_0.03": ref["confident_mean"] - ef["confident_mean"] <= 0.03,
                            "fd_within_seed_spread": ef["fd_mean"] - ref["fd_mean"] <= max(ref["fd_std"], ef["fd_std"])}
    print("\n| configuration | calls full/shallow | ORT ms/image | speedup | digit FD | confident share | PSNR vs ref |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ps = "-" if r["psnr_vs_reference_db"] is None else f"{r['psnr_vs_reference_db']:.1f} dB"
        print(f"| {r['name']} | {r['calls_full']}/{r['calls_shallow']} | {r['ort_ms_per_image']:.2f} | "
              f"{r['speedup_vs_reference'] or 0:.1f}x | {r['fd_mean']:.1f} ± {r['fd_std']:.1f} | "
              f"{r['confident_mean']:.3f} ± {r['confident_std']:.3f} | {ps} |")
    print(f"\nedge-fast goal: {goal}")
    _write(args.out, {"samples": args.samples, "seeds": seeds, "rounds": args.rounds, "threads": 1,
                      "rows": results, "goal": goal, "machine": "shared 2-core CPU, other jobs running"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
