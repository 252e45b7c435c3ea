"""DeepCache on diffusers UNets: full calls that also return a deep feature, shallow calls that reuse it.

DeepCache (Ma et al. 2024): a UNet's deep features change slowly between adjacent sampler
steps. With n down/up blocks and a skip depth d (0 = the outermost branch), the full call
runs everything and caches the hidden state entering up block n-1-d (the output of up
block n-2-d); a shallow call runs only time embedding, conv_in, down blocks 0..d, up
blocks n-1-d..n-1 and the output head, reading the cached feature instead of the deep
part (down blocks d+1.., mid block, up blocks ..n-2-d).

The shallow call is the model's own diffusers forward with the skipped blocks' `forward`
swapped for stubs for the duration of the call: the stubs return correctly-shaped
placeholders (the skip connections they would have produced are consumed only by skipped
up blocks), and the last skipped up block returns the cached feature. So every variant of
UNet2DModel / UNet2DConditionModel forward (class labels, SDXL added conditioning, masks)
is covered without a copy of it, pruned and quantized blocks included; a traced shallow
graph contains only the shallow layers (the placeholders are dead code).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DenoiserModule, DiffusionModel
from edgediff.runtime.cache_schedule import full_steps_for

CACHE_KEY = "cache"  # model.extras key the cache pass writes: {"depth", "interval", ...}
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def find_unet(module: nn.Module) -> nn.Module:
    """The diffusers UNet inside a denoiser (itself, or DenoiserModule.inner)."""
    inner = module.inner if isinstance(module, DenoiserModule) else module
    if type(inner).__name__ not in UNET_CLASSES or not hasattr(inner, "up_blocks"):
        raise BadInput(f"DeepCache needs a diffusers {' or '.join(UNET_CLASSES)}, not {type(inner).__name__}")
    return inner


def max_depth(unet: nn.Module) -> int:
    return len(unet.up_blocks) - 2


def check_depth(unet: nn.Module, depth: int) -> None:
    n = len(unet.down_blocks)
    if len(unet.up_blocks) != n or n < 2:
        raise BadInput(f"DeepCache: {type(unet).__name__} with {n} down / {len(unet.up_blocks)} up blocks has no "
                       "skip branch to cache")
    if not 0 <= depth <= n - 2:
        raise BadInput(f"DeepCache: depth {depth} out of range for {n} blocks (0..{n - 2})")
    for blk in list(unet.down_blocks) + list(unet.up_blocks):
        if hasattr(blk, "skip_conv"):
            raise BadInput(f"DeepCache: skip-sample blocks ({type(blk).__name__}) are not supported")


def _n_res(blk: nn.Module) -> int:
    """How many skip connections a down block emits."""
    return len(blk.resnets) + (1 if getattr(blk, "downsamplers", None) else 0)


class _Capture:
    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.value = output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capturing(unet: nn.Module, depth: int) -> Iterator[_Capture]:
    """During the block, a full forward records the feature a shallow call will read."""
    cap = _Capture()
    h = unet.up_blocks[len(unet.up_blocks) - 2 - depth].register_forward_hook(cap)
    try:
        yield cap
    finally:
        h.remove()


@contextmanager
def shallow(unet: nn.Module, depth: int, feature: torch.Tensor) -> Iterator[None]:
    """During the block, the UNet's forward is the shallow call reading `feature`."""
    n = len(unet.up_blocks)
    saved: list[tuple[nn.Module, Any]] = []

    def stub_down(blk: nn.Module) -> Any:
        k = _n_res(blk)

        def fwd(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return hidden_states, (hidden_states,) * k
        return fwd

    def stub_mid(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def stub_up(*args: Any, **kwargs: Any) -> torch.Tensor:
        return feature

    def swap(blk: nn.Module, fn: Any) -> None:
        saved.append((blk, blk.__dict__.get("forward")))
        blk.forward = fn  # instance attribute: nn.Module.__call__ looks it up first

    try:
        for blk in list(unet.down_blocks)[depth + 1:]:
            swap(blk, stub_down(blk))
        if unet.mid_block is not None:
            swap(unet.mid_block, stub_mid)
        for blk in list(unet.up_blocks)[: n - 1 - depth]:
            swap(blk, stub_up)
        yield
    finally:
        for blk, prev in saved:
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev


class _Entry(nn.Module):
    """A DeepCache entry point over `module` (the UNet inside it cached at `depth`)."""

    def __init__(self, module: nn.Module, depth: int) -> None:
        super().__init__()
        self.module = module
        self.depth = depth
        self.unet = find_unet(module)
        check_depth(self.unet, depth)


class FullEntry(_Entry):
    """Export/sampling view of the full call: (inputs...) -> (out, cached_feature)."""

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capturing(self.unet, self.depth) as cap:
            out = self.module(*args, **kwargs)
        assert cap.value is not None
        return out, cap.value.float()


class ShallowEntry(_Entry):
    """Export/sampling view of the shallow call: (inputs..., cached_feature) -> out."""

    def forward(self, *args: torch.Tensor, feature: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        dtype = next((p.dtype for p in self.unet.parameters() if p.is_floating_point()), feature.dtype)
        with shallow(self.unet, self.depth, feature.to(dtype)):
            return self.module(*args, **kwargs)


def full_steps(steps: int, schedule: Mapping[str, Any] | int) -> list[int]:
    """Indices of the sampler steps that run the full UNet under a cache record or a uniform interval
    (the bundle runtime's rule: edgediff.runtime.cache_schedule)."""
    return full_steps_for(schedule, steps)


class CacheSteps:
    """Which call of a sampling run a denoiser call is, and whether it runs full or shallow.

    The sampler calls the denoiser once per step per batch chunk, steps in order; a step is
    recognised by its timestep (a new value starts the next step, a larger one starts a new run),
    chunks by their order within the step, each chunk keeping its own cached feature. Runtime-
    neutral (features are whatever the caller stores): CachedDenoiser and the OpenCL bundle use it.
    """

    def __init__(self, schedule: Mapping[str, Any] | int) -> None:
        self.schedule = schedule  # a cache record (its full_steps) or a uniform interval
        self.interval = int(schedule["interval"]) if isinstance(schedule, Mapping) else int(schedule)
        rec_steps = schedule.get("steps") if isinstance(schedule, Mapping) else None
        self._full: set[int] | None = set(full_steps_for(schedule, int(rec_steps))) if rec_steps else None
        self.reset()

    def begin(self, steps: int) -> None:
        """The run about to start has `steps` steps (the sampler says so; without it the record's
        steps hold, and the uniform rule past them)."""
        self._full = set(full_steps_for(self.schedule, int(steps)))

    def reset(self) -> None:
        """Start a new sampling run (calls counts are per run)."""
        self.calls = {"full": 0, "shallow": 0}
        self._t: float | None = None
        self._step = -1
        self._chunk = 0
        self.feats: list[Any] = []

    def is_full(self, step: int) -> bool:
        """Whether sampler step `step` of the run is a full call."""
        if self._full is not None and step <= max(self._full, default=-1):
            return step in self._full
        return step % max(1, self.interval) == 0

    def next(self, tv: float) -> tuple[bool, int]:
        """(full call?, chunk index) of a call at timestep value `tv`; counts it."""
        if self._t is None or tv > self._t:
            self.reset()
        if tv != self._t:
            self._step += 1
            self._chunk = 0
            self._t = tv
        else:
            self._chunk += 1
        c = self._chunk
        full = self.is_full(self._step) or c >= len(self.feats)
        if c == 0:
            self.calls["full" if full else "shallow"] += 1
        return full, c

    def store(self, c: int, feat: Any) -> None:
        """The feature chunk `c`'s full call cached."""
        if c < len(self.feats):
            self.feats[c] = feat
        else:
            self.feats.append(feat)


class CachedDenoiser:
    """Wraps a plain-tensor denoiser call (x, t, cond) with the DeepCache schedule (CacheSteps)."""

    def __init__(self, call: Any, module: nn.Module, depth: int, schedule: Mapping[str, Any] | int) -> None:
        self.call = call  # (entry module, x, t, cond) -> output of `entry`
        self.full = FullEntry(module, depth)
        self.shallow = ShallowEntry(module, depth)
        self.steps = CacheSteps(schedule)
        self.depth, self.interval = int(depth), self.steps.interval

    @property
    def calls(self) -> dict[str, int]:
        return self.steps.calls

    def reset(self) -> None:
        """Start a new sampling run (calls counts are per run)."""
        self.steps.reset()

    def begin(self, steps: int) -> None:
        """The next run has `steps` sampler steps (CacheSteps.begin)."""
        self.steps.begin(steps)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        full, c = self.steps.next(float(t.reshape(-1)[0]))
        if full:
            out, feat = self.call(self.full, x, t, cond)
            self.steps.store(c, feat)
            return out
        feat = self.steps.feats[c]
        return self.call(lambda *a, **k: self.shallow(*a, feature=feat, **k), x, t, cond)


def cache_config(model: DiffusionModel) -> dict[str, Any] | None:
    """The cache schedule an artifact carries (extras["cache"]), or None."""
    c = model.extras.get(CACHE_KEY)
    return dict(c) if c else None
