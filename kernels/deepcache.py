"""DeepCache in OpenCL bundles: a full and a shallow op schedule over one set of weights.

The cached feature of DeepCache at depth d (edgediff.deepcache: the hidden state entering up
block n-1-d) is a buffer of the full schedule: the output of the last op of up block n-2-d. The
shallow schedule is the full one with that buffer made an input and every op that "out" no
longer needs removed (dead-code elimination from the output): what remains is time embedding,
conv_in, down blocks 0..d, up blocks n-1-d.. and the head, i.e. exactly the shallow branch, for
any UNet the schedule builder takes, int8 layouts included (the feature keeps the storage the
full schedule gives it). Both schedules name the same weights (one weights.safetensors).

At run time `CachedOpenCLDenoiser` follows the sampler with `edgediff.deepcache.CacheSteps` (the
rule the PyTorch sampler uses): full calls keep the feature buffer on the device (one per batch
chunk), shallow calls read it; the shallow executor shares the full one's device weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from edgediff.kernels.graph import Executor

from edgediff.deepcache import CacheSteps, check_depth, find_unet
from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.runtime.cache_schedule import schedule_record


def feature_buffer(ops: list[dict[str, Any]], n_blocks: int, depth: int) -> str:
    """The buffer of the full schedule that DeepCache caches at `depth`."""
    last = f"up_blocks.{n_blocks - 2 - depth}."
    first = f"up_blocks.{n_blocks - 1 - depth}."
    made = [op["out"] for op in ops if op["name"].startswith(last)]
    if not made or not any(made[-1] in op["in"] and op["name"].startswith(first) for op in ops):
        raise BadInput(f"opencl target: DeepCache depth {depth}: no feature between {last}* and {first}* in the schedule")
    return made[-1]


def shallow_ops(ops: list[dict[str, Any]], feature: str, output: str = "out") -> list[dict[str, Any]]:
    """The ops `output` needs when `feature` is given (dead-code elimination, order kept)."""
    needed = {output}
    keep: list[bool] = []
    for op in reversed(ops):
        use = op["out"] in needed and op["out"] != feature
        keep.append(use)
        if use:
            needed.update(op["in"])
    return [op for op, k in zip(ops, reversed(keep)) if k]


def cached_schedules(model: DiffusionModel, sched: dict[str, Any], cache: dict[str, Any]) -> tuple[dict, dict]:
    """(shallow schedule, the bundle's cache record) for the full schedule `sched` of `model`."""
    unet = find_unet(model.module())
    depth = int(cache["depth"])
    check_depth(unet, depth)
    feat = feature_buffer(sched["ops"], len(unet.up_blocks), depth)
    shallow = {**sched, "ops": shallow_ops(sched["ops"], feat), "feature_input": feat}
    rec = {"depth": depth, "interval": int(cache["interval"]), "feature": feat,
           "feature_shape": cache.get("feature_shape"), "ops_full": len(sched["ops"]), "ops_shallow": len(shallow["ops"]),
           **schedule_record(cache)}
    return shallow, rec


def _weight_names(ops: list[dict[str, Any]], weights: dict[str, Any]) -> set[str]:
    names: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str) and v in weights:
            names.add(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
    walk(ops)
    return names


class _FeatureExecutor(Executor):
    """An Executor that keeps one buffer of the run (the full call's feature) or is given it (shallow)."""

    def __init__(self, schedule: dict[str, Any], weights: dict[str, Any], rt: Any, feature: str, **kw: Any) -> None:
        super().__init__(schedule, weights, rt, **kw)
        self.feature = feature
        self.kept: Any = None  # the full call's feature buffer (device array)
        self.given: Any = None  # the shallow call's feature (device array)

    def _op(self, op: dict[str, Any], env: dict[str, Any]) -> Any:
        out = super()._op(op, env)
        if op["out"] == self.feature:
            self.kept = out  # a reference: the buffer stays on the device after the run frees it
        return out

    def _inputs(self, sample: torch.Tensor, cond: Any) -> dict[str, Any]:
        got = super()._inputs(sample, cond)
        if self.given is not None:
            got[self.feature] = self.given
        return got


class CachedOpenCLDenoiser:
    """An OpenCL bundle with a DeepCache schedule, called like TorchDenoiser: full or shallow per step.

    Wraps the bundle's OpenCLDenoiser `base` (its runtime and device weights; kernels/export.py
    builds it, so this module does not import that one). `cache.calls` counts full/shallow calls
    of the last run (the sampler's stats read it).
    """

    def __init__(self, base: Any, path: Path, conv_algo: str = "auto") -> None:
        self.base, self.meta, self.rt, self.notes = base, base.meta, base.rt, base.notes
        rec = self.meta.get("cache")
        if not rec or "schedule_shallow" not in self.meta:
            raise BadInput(f"{path}: no DeepCache schedule in this OpenCL bundle")
        from safetensors.numpy import load_file

        feat = str(rec["feature"])
        weights = load_file(str(Path(path) / self.meta["weights"]))
        full_w = {k: weights[k] for k in _weight_names(self.meta["schedule"]["ops"], weights)}
        self.executor = _FeatureExecutor(self.meta["schedule"], full_w, self.rt, feat, conv_algo=conv_algo)
        self.executor.dev = base.executor.dev  # the base's device weights (this executor's own copy is dropped)
        sched_s = self.meta["schedule_shallow"]
        self.shallow = _FeatureExecutor(sched_s, {k: weights[k] for k in _weight_names(sched_s["ops"], weights)},
                                        self.rt, feat, conv_algo=conv_algo)
        self.shallow.dev = self.executor.dev  # one copy of the weights on the device
        self.cache = CacheSteps(rec)
        self.depth = int(rec["depth"])

    def describe(self) -> dict[str, Any]:
        return self.base.describe()

    def full_call(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> tuple[torch.Tensor, Any]:
        """(output, feature buffer on the device)."""
        self.executor.kept = None
        out = self.executor.run(x, t, cond=cond)
        return out, self.executor.kept

    def shallow_call(self, x: torch.Tensor, t: torch.Tensor, feature: Any, cond: Any = None) -> torch.Tensor:
        self.shallow.given = feature
        try:
            return self.shallow.run(x, t, cond=cond)
        finally:
            self.shallow.given = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        full, c = self.cache.next(float(t.reshape(-1)[0]))
        if full:
            out, feat = self.full_call(x, t, cond)
            self.cache.store(c, feat)
            return out
        return self.shallow_call(x, t, self.cache.feats[c], cond)

    def profile_shallow(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> list[tuple[str, str, float]]:
        """Per-op times of one shallow call (its feature from a full call first), as `profile`."""
        _, feat = self.full_call(x, t, cond)
        self.shallow.given = feat
        timings: list[tuple[str, str, float]] = []
        try:
            self.shallow.run(x, t, timings, cond=cond)
        finally:
            self.shallow.given = None
        return timings


def profile_cached(base: Any, path: Path, x: torch.Tensor, t: torch.Tensor, cond: Any, full_ms: float,
                   warmup: int = 3, repeats: int = 20) -> dict[str, Any]:
    """The shallow schedule's share of `profile`: median wall time of `repeats` shallow calls (each
    reading a feature of a full call made first, queue drained once per call), its per-op times,
    and the per-image time at the bundle's recorded steps (full calls x full_ms + shallow x shallow_ms)."""
    import statistics
    import time

    from edgediff.deepcache import full_steps

    den = CachedOpenCLDenoiser(base, Path(path))  # `base`: the profiling OpenCLDenoiser of `profile`
    _, feat = den.full_call(x, t, cond)
    for _ in range(max(warmup, 1)):
        den.shallow_call(x, t, feat, cond)
    totals = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        den.shallow_call(x, t, feat, cond)
        totals.append((time.perf_counter() - t0) * 1e3)
    shallow_ms = statistics.median(totals)
    rec = den.meta["cache"]
    steps = (den.meta.get("sampling") or {}).get("steps")
    out: dict[str, Any] = {"depth": rec["depth"], "interval": rec["interval"], "shallow_total_ms": shallow_ms,
                           "shallow_ops": len(den.meta["schedule_shallow"]["ops"]),
                           "shallow_layers": [{"name": n, "op": o, "ms": ms} for n, o, ms in den.profile_shallow(x, t, cond)],
                           "shallow_vs_full": round(shallow_ms / full_ms, 4) if full_ms else None}
    if steps:
        n_full = len(full_steps(int(steps), rec))
        out.update({"steps": int(steps), "calls_full": n_full, "calls_shallow": int(steps) - n_full,
                    "ms_per_image": full_ms * n_full + shallow_ms * (int(steps) - n_full),
                    "ms_per_image_uncached": full_ms * int(steps)})
    return out


def sampling_record(model: DiffusionModel) -> dict[str, Any]:
    """What an OpenCL bundle stores to sample by itself: the recorded sampling and the noise schedule."""
    from edgediff.sampling import recorded_sampling

    sampler, steps, eta = recorded_sampling(model)
    return {"sampling": {"sampler": sampler, "steps": steps, "eta": eta},
            "noise_schedule": model.schedule.to_config()}
