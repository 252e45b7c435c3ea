"""int8 ONNX with its float ops in float64, against the simulation computed the same way: how
close the runtime then gets to the simulation, and what float64 costs in time.

    python benchmarks/int8_float64.py ARTIFACT [--sampler ddim] [--steps 20] [--samples 16]
                                      [--reps 100] [--out bench-out/int8_float64.json]

The usual int8 export (float ops in float32) and the same export traced under
`edgediff.sim_floor.exact_float_ops(explicit_group_norm=True)` (GroupNorm, SiLU, softmax, ...
computed in float64 and rounded once, as Cast -> double ops -> Cast in the file). Both verified
(edgediff.verify: stepwise, trajectory, noise floor): the float32 file against the plain
simulation, the float64 file against the simulation run under exact_float_ops(). Timing: both
files in onnxruntime, 1 thread, interleaved, batch 1 and 16, median and min of --reps calls.
The figures in docs/int8.md name the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.artifact import load_artifact  # noqa: E402
from edgediff.sim_floor import exact_float_ops  # noqa: E402
from edgediff.timing import time_denoisers  # noqa: E402
from edgediff.verify import verify  # noqa: E402

KEYS = ("sampler", "psnr_db", "psnr_per_sample_db", "noise_floor_db", "max_abs_err", "stepwise_psnr_db",
        "stepwise_worst_t", "stepwise_min_sample_psnr_db", "stepwise_max_abs_err", "exit_code")


def double_ops(path: Path) -> dict[str, int]:
    """Op types of the nodes that write a double tensor (ONNX shape inference gives the types)."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dbl = {v.name for v in m.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE}
    return dict(Counter(n.op_type for n in m.graph.node if any(o in dbl for o in n.output)).most_common())


def main() -> None:
    from edgediff.exporters import get_backend
    from edgediff.exporters.onnx import OnnxDenoiser

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default="bench-out/int8_float64.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_artifact(Path(args.artifact))
    res: dict[str, Any] = {"artifact": args.artifact}
    with tempfile.TemporaryDirectory(prefix="edgediff-f64-") as td:
        f32, f64 = Path(td) / "int8.onnx", Path(td) / "int8-f64.onnx"
        get_backend("onnx").export(model, f32, "int8")
        with exact_float_ops(explicit_group_norm=True) as mode:
            get_backend("onnx").export(model, f64, "int8")
        res["float64_file"] = {"float_ops_traced": mode.calls, "double_ops": double_ops(f64)}
        kw = {"sampler": args.sampler, "steps": args.steps, "samples": args.samples}
        v32 = verify(model, f32, **kw)
        with exact_float_ops():
            v64 = verify(model, f64, **kw)
        res["verify_float32_ops"] = {k: v32.get(k) for k in KEYS}
        res["verify_float64_ops"] = {k: v64.get(k) for k in KEYS}
        res["timing_ort_1_thread"] = {}
        for b in (1, 16):
            dens = {"float32 ops": OnnxDenoiser(f32, threads=1), "float64 ops": OnnxDenoiser(f64, threads=1)}
            x = torch.randn(b, *model.signature.sample_shape, generator=torch.Generator().manual_seed(0))
            r = time_denoisers(dens, x, torch.full((b,), 500.0), reps=args.reps)
            r["ratio_median"] = round(r["float64 ops"]["ms_per_call"] / r["float32 ops"]["ms_per_call"], 3)
            r["ratio_min"] = round(r["float64 ops"]["ms_min"] / r["float32 ops"]["ms_min"], 3)
            res["timing_ort_1_thread"][f"batch_{b}"] = r
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
