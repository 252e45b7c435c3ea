"""DeepCache refresh schedules: which sampler steps run the full UNet (no torch here).

A cache record (model.extras["cache"], a bundle manifest's "cache") says `interval` N and, since
non-uniform schedules exist, `schedule`, the `steps` it was made for and its `full_steps`:

- "uniform": a full call every N steps from the first (DeepCache's 1:N), plus the last step
  when `full_last` is set;
- "centred": the same number of full calls, denser around a centre step and sparser away
  from it (spacing grows as a power of the distance; DeepCache's non-uniform 1:N);
- "auto": the full steps the cache pass chose from measured one-step errors (passes/cache.py).

First and last are always full in the non-uniform schedules. A sampler running another step
count than the record's gets the uniform rule again for "uniform", the centred rule recomputed
for "centred", and the recorded steps at the same fractions of the run for "auto".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

SCHEDULES = ("uniform", "centred", "auto")


def uniform_full_steps(steps: int, interval: int, last: bool = False) -> list[int]:
    """Steps 0, N, 2N, ... (and steps - 1 when `last`)."""
    full = {i for i in range(steps) if i % max(1, int(interval)) == 0}
    if last and steps > 0:
        full.add(steps - 1)
    return sorted(full)


def n_full_calls(steps: int, interval: int) -> int:
    """How many full calls a 1:N schedule makes at `steps` (the non-uniform ones keep that count)."""
    return max(1, math.ceil(steps / max(1, int(interval))))


def centred_full_steps(steps: int, n_full: int, centre: float = 0.5, power: float = 1.5) -> list[int]:
    """`n_full` full steps including the first and last, spaced ~ |u|^power around step centre*(steps-1).

    u runs evenly from the first step to the last in power-root space, so with power > 1 the
    full steps crowd around the centre; the power is lowered until rounding leaves n_full distinct steps."""
    if steps <= 2 or n_full >= steps:
        return list(range(steps))
    n_full = max(2, int(n_full))
    c = min(max(float(centre), 0.0), 1.0) * (steps - 1)

    def root(v: float, p: float) -> float:
        return math.copysign(abs(v) ** (1 / p), v)

    p = max(1.0, float(power))
    while True:
        lo, hi = root(-c, p), root(steps - 1 - c, p)
        us = [lo + (hi - lo) * k / (n_full - 1) for k in range(n_full)]
        full = sorted({min(steps - 1, max(0, round(c + math.copysign(abs(u) ** p, u)))) for u in us})
        if len(full) == n_full or p <= 1.0:
            break
        p = max(1.0, p - 0.05)
    full = sorted(set(full) | {0, steps - 1})
    for _ in range(steps):  # rounding at power 1 can still merge two: fill the widest gap
        if len(full) >= n_full:
            break
        gaps = [(full[k + 1] - full[k], k) for k in range(len(full) - 1)]
        g, k = max(gaps)
        if g > 1:
            full = sorted({*full, full[k] + g // 2})
    return full


def rescale_full_steps(full: list[int], from_steps: int, steps: int) -> list[int]:
    """Recorded full steps moved to the same fractions of a run of `steps` (first and last kept)."""
    if steps <= 0:
        return []
    if from_steps <= 1 or steps == 1:
        return [0]
    out = {round(int(i) * (steps - 1) / (from_steps - 1)) for i in full}
    return sorted(out | {0})


def full_steps_for(cache: Mapping[str, Any] | int, steps: int) -> list[int]:
    """Which of `steps` sampler steps run the full UNet under a cache record (an int: the uniform interval)."""
    if not isinstance(cache, Mapping):
        return uniform_full_steps(steps, int(cache))
    interval = int(cache.get("interval", 1))
    kind = str(cache.get("schedule", "uniform"))
    last = bool(cache.get("full_last", False))
    rec_steps, rec_full = cache.get("steps"), cache.get("full_steps")
    if rec_full is not None and rec_steps is not None and int(rec_steps) == int(steps):
        return sorted(int(i) for i in rec_full)
    if kind == "centred":
        return centred_full_steps(steps, n_full_calls(steps, interval), float(cache.get("centre", 0.5)),
                                  float(cache.get("power", 1.5)))
    if kind == "auto" and rec_full is not None and rec_steps is not None:
        return rescale_full_steps(list(rec_full), int(rec_steps), steps)
    return uniform_full_steps(steps, interval, last)


PARAM_KEYS = ("schedule", "full_last", "centre", "power")


def schedule_record(cache: Mapping[str, Any], steps: int | None = None) -> dict[str, Any]:
    """The schedule part of a cache record for a run of `steps` (default: the record's own steps), as
    bundles store it: the kind and its parameters, `steps` and the `full_steps` at that count."""
    rec: dict[str, Any] = {k: cache[k] for k in PARAM_KEYS if k in cache}
    rec.setdefault("schedule", "uniform")
    n = steps if steps is not None else cache.get("steps")
    if n is not None:
        rec.update({"steps": int(n), "full_steps": full_steps_for(cache, int(n))})
    return rec
