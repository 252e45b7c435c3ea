"""Pass "prune.diff": Diff-Pruning (Fang et al., NeurIPS 2023), structural channel pruning.

Importance is the first-order Taylor score |w * dL/dw| of the denoising loss, with the
gradients accumulated only over the *informative* timesteps: walk t = 0, 1, 2, ... upward
with one fixed batch (x0, noise), back-propagating L_t each time, and stop at the first t
whose loss drops below `threshold * max L` (0.05 in the paper). Late, noisy steps mostly
shape coarse content and contribute little to what pruning destroys, so leaving them out
of the gradient keeps the estimate focused (the paper's argument).

The channel surgery itself is Torch-Pruning's: its DependencyGraph finds every coupled
group (skip concatenations, residual adds, time-embedding projections, q/k/v and out
projections), and a BasePruner removes the same share of channels from each group, ranked
by the chosen importance. Around it this module adds what diffusion denoisers need:

- the output layer is ignored (its channels are the image channels);
- GroupNorm groups and attention heads stay consistent: each GroupNorm group and each head
  loses the same channels, so the (smaller) groups keep their original members;
- attention keeps its logit scale: SDPA processors scale by 1/sqrt(head_dim) of the *pruned*
  head, so the query projection is rescaled by sqrt(d'/d) and `Attention.scale` is updated,
  which makes every processor compute the original logits minus the removed dims;
- static attributes are updated (Upsample2D/Downsample2D `channels`, ResnetBlock2D
  in/out_channels, Attention query_dim/inner_dim/inner_kv_dim/out_dim/cross_attention_dim),
  which serialize.py then records in structure.json so the artifact reloads;
- transformer residual streams that carry non-parameter tensors (DiT's fixed positional
  embedding buffer) or adaLN modulation chunks are left at full width; their attention
  inner dims, MLP hidden dims and embedding dims are pruned.

`importance` also offers the baselines used in the paper and in benchmarks/pruning.py:
"taylor" (the same Taylor score over all timesteps), "magnitude" (L2 norm of the weights)
and "random". `ratio` is the share of channels removed per group; `macs_reduction`, when
non-zero, picks the ratio that removes that share of MACs instead (found by bisection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import BadInput
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, register
from edgediff.passes.prune_data import DATA_SOURCES, DataSource, denoising_loss

IMPORTANCES = ("diff", "taylor", "magnitude", "random")
SELECTIONS = ("per_group", "tied")
SCORES = ("abs", "squared")


@dataclass
class PruneDiffOptions:
    ratio: float = 0.3  # share of channels removed from every prunable group, in (0, 1)
    macs_reduction: float = 0.0  # if > 0: choose the ratio that removes this share of MACs (overrides ratio)
    importance: str = "diff"  # diff | taylor | magnitude | random
    threshold: float = 0.05  # Diff-Pruning: stop accumulating at the first t with L_t < threshold * max L
    t_stride: int = 10  # visit t = 0, s, 2s, ... (1 = every training step, as in the paper; slower)
    batch_size: int = 32  # images in the fixed gradient batch
    data: str = "auto"  # auto | given (ctx.data) | samples (the model's own DDIM samples)
    sample_steps: int = 20  # DDIM steps when data = samples
    # per_group: every GroupNorm group / attention head drops its own lowest-scoring channels (the
    # Diff-Pruning code); tied: the same positions in every group (Torch-Pruning's averaging)
    selection: str = "per_group"
    score: str = "abs"  # Taylor score per weight: abs = |w * g| (the paper), squared = (w * g)^2

    def __post_init__(self) -> None:
        if not 0.0 < float(self.ratio) < 1.0:
            raise BadInput(f"prune.diff: option ratio={self.ratio} must lie strictly between 0 and 1")
        if not 0.0 <= float(self.macs_reduction) < 1.0:
            raise BadInput(f"prune.diff: option macs_reduction={self.macs_reduction} must lie in [0, 1) (0 = use ratio)")
        if self.importance not in IMPORTANCES:
            raise BadInput(f"prune.diff: option importance={self.importance!r}; expected one of {', '.join(IMPORTANCES)}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise BadInput(f"prune.diff: option threshold={self.threshold} must lie strictly between 0 and 1")
        if int(self.t_stride) < 1 or int(self.batch_size) < 1 or int(self.sample_steps) < 1:
            raise BadInput("prune.diff: options t_stride, batch_size and sample_steps must be >= 1")
        if self.data not in DATA_SOURCES:
            raise BadInput(f"prune.diff: option data={self.data!r}; expected one of {', '.join(DATA_SOURCES)}")
        if self.selection not in SELECTIONS:
            raise BadInput(f"prune.diff: option selection={self.selection!r}; expected one of {', '.join(SELECTIONS)}")
        if self.score not in SCORES:
            raise BadInput(f"prune.diff: option score={self.score!r}; expected one of {', '.join(SCORES)}")


# --------------------------------------------------------------------------------------------
# Torch-Pruning set-up for diffusers denoisers


def _lcm_pruner_class() -> type:
    import torch_pruning as tp

    class _DiffusersPruner(tp.pruner.BasePruner):
        """BasePruner whose channel grouping is the lcm of all groupings in a dependency group.

        Torch-Pruning takes the max, which breaks consistency when a residual stream passes
        through GroupNorms with different group counts (e.g. 8 and 32) or a GroupNorm and a
        multi-head projection; the lcm keeps every one of them divisible.
        """

        def _get_channel_groups(self, group: Any) -> int:
            out = 1
            for dep, _ in group:
                table = self.out_channel_groups if self.DG.is_out_channel_pruning_fn(dep.handler) else self.in_channel_groups
                g = table.get(dep.target.module)
                if g:
                    out = math.lcm(out, int(g))
            return out

    return _DiffusersPruner


def _groupwise_pruner_class() -> type:
    base = _lcm_pruner_class()

    class _GroupwisePruner(base):  # type: ignore[misc, valid-type]
        """Local pruning where each channel group picks its own channels.

        Torch-Pruning averages the importance over the channel groups of a dependency group
        (GroupNorm groups, attention heads) and removes the same positions from every group.
        Diff-Pruning's code ranks inside each group instead: every group loses the same *number*
        of channels (so GroupNorm groups and heads stay whole and equal-sized), but its own
        lowest-scoring ones. Dependency graph, importance and the surgery stay Torch-Pruning's;
        only the choice of indices differs.
        """

        def _prune(self) -> Any:
            ratio = float(self.per_step_pruning_ratio[self.current_step])
            chosen: list[tuple[nn.Module, Any, list[int]]] = []
            # every importance first, then the surgery: scores must see the unpruned weights
            for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                root_module_types=self.root_module_types):
                if not self._check_pruning_ratio(group):
                    continue
                if self._is_atten_group(group)[0]:
                    group = self._downstream_node_as_root_if_attention(group)
                    if group is None:
                        continue
                n_groups = self._get_channel_groups(group)
                imp = self.estimate_importance(group)
                if imp is None or len(imp) % n_groups:
                    continue
                size = len(imp) // n_groups
                k = min(size - int(size * (1 - ratio)), size - 1)  # as Torch-Pruning's local count
                if k <= 0:
                    continue
                low = torch.topk(imp.view(n_groups, size).cpu(), k, dim=1, largest=False).indices
                idxs = (low + torch.arange(n_groups).view(-1, 1) * size).flatten().sort().values.tolist()
                chosen.append((group[0].dep.target.module, group[0].dep.handler, idxs))
            for module, fn, idxs in chosen:
                group = self.DG.get_pruning_group(module, fn, idxs)
                if self.DG.check_pruning_group(group):
                    yield group

    return _GroupwisePruner


class TaylorScore:
    """Torch-Pruning importance from the accumulated gradients: sum |w * g| or sum (w * g)^2.

    Torch-Pruning's magnitude importance (p = 1 or 2, with its group reduction, normalisation
    and per-layer handling) applied to the elementwise product w * dL/dw instead of w: with
    p = 1 this is its TaylorImportance(multivariable=False), the Diff-Pruning score; p = 2 is
    the squared first-order Taylor score.
    """

    def __init__(self, squared: bool = False) -> None:
        import torch_pruning as tp

        self.inner = tp.importance.GroupMagnitudeImportance(p=2 if squared else 1)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for dep, _ in group:
            for t in (getattr(dep.target.module, "weight", None), getattr(dep.target.module, "bias", None)):
                if isinstance(t, nn.Parameter) and not any(t is s for s, _ in saved):
                    saved.append((t, t.data))
                    # a parameter the loss never reached has zero gradient, hence zero score
                    t.data = t.data * t.grad if t.grad is not None else torch.zeros_like(t.data)
        try:
            return self.inner(group)
        finally:
            for t, d in saved:
                t.data = d


def _output_layers(inner: nn.Module) -> list[nn.Module]:
    """Layers whose output channels are the model's output (never pruned)."""
    out = []
    for name in ("conv_out", "proj_out_2", "proj_out"):
        m = getattr(inner, name, None)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append(m)
            break
    return out


def _ignored_layers(inner: nn.Module) -> list[nn.Module]:
    """Output layer, plus the parts whose width Torch-Pruning cannot follow safely."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PatchEmbed

    ignored = _output_layers(inner)
    for m in inner.modules():
        if isinstance(m, PatchEmbed):
            # the residual stream of a transformer starts here and gets a fixed sin-cos
            # positional buffer added: a tensor the dependency graph cannot see
            ignored.append(m.proj)
        if type(m).__name__.startswith("AdaLayerNorm") and isinstance(getattr(m, "linear", None), nn.Linear):
            ignored.append(m.linear)  # its output is chunked into per-channel shift/scale of the residual
        if isinstance(m, Attention) and (m.norm_q is not None or m.norm_k is not None):
            # q/k norms act on the head dim after the head reshape: keep such attention intact
            ignored += [x for x in (m.to_q, m.to_k, m.to_v) if x is not None]
    for name in ("proj_out_1",):  # DiT: adaLN-style shift/scale of the final norm
        m = getattr(inner, name, None)
        if isinstance(m, nn.Linear):
            ignored.append(m)
    return ignored


def _channel_groups(inner: nn.Module) -> tuple[dict[nn.Module, int], dict[nn.Module, int]]:
    """GroupNorm group counts (in and out) and attention heads for q/k/v projections."""
    from diffusers.models.attention_processor import Attention

    groups: dict[nn.Module, int] = {}
    heads: dict[nn.Module, int] = {}
    for m in inner.modules():
        if isinstance(m, nn.GroupNorm):
            groups[m] = m.num_groups
        if isinstance(m, Attention):
            for x in (m.to_q, m.to_k, m.to_v):
                if isinstance(x, nn.Linear):
                    heads[x] = m.heads
    return groups, heads


def _example_inputs(model: DiffusionModel) -> dict[str, torch.Tensor]:
    inputs = model.example_inputs(batch=1)
    return inputs


def _build_pruner(model: DiffusionModel, ratio: float, importance: Any, selection: str = "per_group") -> Any:
    wrapper = model.module()
    inner = model.denoiser.inner if hasattr(model.denoiser, "inner") else model.denoiser
    groups, heads = _channel_groups(inner)
    cls = _groupwise_pruner_class() if selection == "per_group" else _lcm_pruner_class()
    return cls(
        wrapper, _example_inputs(model), importance=importance, pruning_ratio=ratio,
        ignored_layers=_ignored_layers(inner), in_channel_groups=dict(groups), out_channel_groups=dict(groups),
        num_heads=heads, prune_num_heads=False, prune_head_dims=True,
        forward_fn=lambda m, inp: m(**inp),
    )


def _attention_dims(inner: nn.Module) -> dict[nn.Module, int]:
    from diffusers.models.attention_processor import Attention

    return {m: m.to_q.out_features // m.heads for m in inner.modules()
            if isinstance(m, Attention) and isinstance(m.to_q, nn.Linear)}


def _fix_static_attributes(inner: nn.Module, head_dims_before: dict[nn.Module, int]) -> None:
    """Bring attributes that forward() or re-construction read back in line with the weights."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    for m in inner.modules():
        if isinstance(m, (Upsample2D, Downsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, nn.Conv2d):
                m.channels = conv.in_channels
                m.out_channels = conv.out_channels
            elif getattr(m, "norm", None) is not None and hasattr(m.norm, "normalized_shape"):
                m.channels = m.out_channels = int(m.norm.normalized_shape[0])
        elif isinstance(m, ResnetBlock2D):
            m.in_channels = m.conv1.in_channels
            m.out_channels = m.conv2.out_channels
        elif isinstance(m, Attention) and m in head_dims_before:
            d_old = head_dims_before[m]
            d_new = m.to_q.out_features // m.heads
            m.inner_dim = m.to_q.out_features
            m.query_dim = m.to_q.in_features
            m.inner_kv_dim = m.to_k.out_features
            m.cross_attention_dim = m.to_k.in_features
            m.out_dim = m.to_out[0].out_features
            if d_new != d_old and m.scale_qk:
                # SDPA scales logits by 1/sqrt(d_new); fold sqrt(d_new/d_old) into q so that the
                # logits keep the trained temperature 1/sqrt(d_old) with every processor
                f = (d_new / d_old) ** 0.5
                with torch.no_grad():
                    m.to_q.weight.mul_(f)
                    if m.to_q.bias is not None:
                        m.to_q.bias.mul_(f)
                m.scale = d_new**-0.5


def _inner(model: DiffusionModel) -> nn.Module:
    return model.denoiser.inner if hasattr(model.denoiser, "inner") else model.denoiser


def check_prunable(model: DiffusionModel) -> None:
    if model.config is not None and model.arch in ("SD3Transformer2DModel", "SanaTransformer2DModel",
                                                   "FluxTransformer2DModel"):
        # joint/dual-stream blocks, RoPE on the head dim and (Sana) linear attention: couplings the
        # dependency graph does not follow (head dims, rotary pairs, context projections)
        raise BadInput(f"structural pruning of {model.arch} is not supported: its transformer blocks couple channels "
                       "through joint/linear attention, head reshapes, q/k norms and context projections that Torch-Pruning's "
                       "dependency graph does not follow; use quantization (--recipe w8a8) instead")
    if model.config is None or model.arch not in ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel",
                                                  "Transformer2DModel", "PixArtTransformer2DModel"):
        raise BadInput(f"structural pruning needs a diffusers denoiser (UNet2DModel, UNet2DConditionModel, "
                       f"DiTTransformer2DModel...); this model is {model.arch!r} (an exported graph or a pickled "
                       "module cannot be rewritten)")
    if any(getattr(m, "_edgediff_quant_wrapper", False) for m in model.denoiser.modules()):
        raise BadInput("structural pruning must run before quantization (the model already has quantization wrappers)")


def prune_structure(model: DiffusionModel, ratio: float, importance: Any,
                    selection: str = "per_group") -> tuple[DiffusionModel, int]:
    """Prune `model` in place with a Torch-Pruning importance; returns (model, groups pruned).

    `selection`: "per_group" (each GroupNorm group / head ranks its own channels) or "tied".
    """
    check_prunable(model)
    inner = _inner(model)
    dims = _attention_dims(inner)
    reference_shape = None
    with torch.no_grad():
        reference_shape = model.module()(**_example_inputs(model)).shape
    pruner = _build_pruner(model, ratio, importance, selection)
    n_groups = 0
    for group in pruner.step(interactive=True):
        group.prune()
        n_groups += 1
    if n_groups == 0:
        raise BadInput(f"{model.arch}: no prunable channel group at ratio {ratio} (every layer is an output or "
                       "ignored layer, or too narrow to remove a channel)")
    _fix_static_attributes(inner, dims)
    for p in model.denoiser.parameters():
        p.grad = None
    try:
        with torch.no_grad():
            out = model.module()(**_example_inputs(model))
    except RuntimeError as e:
        # a coupling the traced dependency graph did not see (PixArt: the caption projection
        # reshaped before cross-attention K/V): refuse the class rather than crash
        raise BadInput(f"{model.arch}: structural pruning is not supported for this class: Torch-Pruning's "
                       f"dependency graph missed a channel coupling, the pruned model fails ({str(e).splitlines()[0]})"
                       ) from None
    if out.shape != reference_shape:
        raise RuntimeError(f"pruning changed the output shape {tuple(reference_shape)} -> {tuple(out.shape)}")
    return model, n_groups


def ratio_for_macs(model: DiffusionModel, macs_reduction: float, tol: float = 0.01,
                   closest: bool = False) -> tuple[float, float]:
    """The channel ratio whose pruned model has `macs_reduction` fewer MACs (bisection).

    With local (per-group) pruning the channel counts depend only on the ratio, not on the
    importance, so random importance finds the structure. Returns (ratio, achieved reduction):
    the smallest ratio that removes at least that share, or with `closest` the ratio whose
    reduction is nearest to it (GroupNorm groups make the reachable reductions coarse on small
    models, e.g. 43% or 65% on the demo, nothing in between). Raises BadInput when even the
    largest ratio cannot reach the budget.
    """
    import torch_pruning as tp

    from edgediff.metrics import macs

    base = macs(model)

    def reduction(r: float) -> float:
        m = model.clone()
        prune_structure(m, r, tp.importance.RandomImportance())
        return 1 - macs(m) / base

    # coarse scan first: TP skips a group whose kept share would round to zero channels, so the
    # reduction is not monotone near ratio 1 and a plain bisection from 0.95 can miss the budget
    grid = [round(0.1 * i, 2) for i in range(1, 10)]
    prev, found = 0.0, None
    best_seen = 0.0
    for r in grid:
        red = reduction(r)
        best_seen = max(best_seen, red)
        if red >= macs_reduction:
            found = (r, red)
            break
        prev = r
    if found is None:
        raise BadInput(f"prune.diff: macs_reduction={macs_reduction} cannot be met: channel pruning of this "
                       f"{model.arch} removes at most {best_seen:.1%} of its MACs (output and fixed-width layers stay)")
    if closest:
        # the reachable reductions are a staircase in the ratio: walk it finely up to the first
        # step at or above the target and keep whichever of that step and the one below is nearer
        below: tuple[float, float] | None = None
        for r in np.arange(0.025, found[0] + 1e-9, 0.025):
            red = reduction(float(r))
            if red >= macs_reduction:
                above = (float(r), red)
                if below is not None and macs_reduction - below[1] < above[1] - macs_reduction:
                    return below
                return above
            if below is None or red > below[1]:
                below = (float(r), red)
        return found
    lo, hi = prev, found[0]
    best = found
    for _ in range(5):
        mid = (lo + hi) / 2
        red = reduction(mid)
        if red >= macs_reduction:
            hi, best = mid, (mid, red)
            if red - macs_reduction <= tol:
                break
        else:
            lo = mid
    return best


# --------------------------------------------------------------------------------------------
# Importance


def accumulate_gradients(model: DiffusionModel, opts: PruneDiffOptions, ctx: PassContext) -> dict[str, Any]:
    """Back-propagate the denoising loss over timesteps into param.grad (Diff-Pruning / Taylor)."""
    module = model.module()
    module.eval()  # no dropout: the importance estimate must be deterministic
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None
    src = DataSource(model, opts.data, opts.batch_size, ctx.seed, pool=max(opts.batch_size, 64),
                     sample_steps=opts.sample_steps, given=ctx.data)
    x0, cond = src.batch()
    g = torch.Generator().manual_seed(ctx.seed + 1)
    noise = torch.randn(x0.shape, generator=g)
    ts = list(range(0, model.schedule.num_train_timesteps, int(opts.t_stride)))
    losses: list[float] = []
    max_loss = 0.0
    stopped_at = None
    label = "Diff-Pruning: informative timesteps" if opts.importance == "diff" else "Taylor: gradients over timesteps"
    for t in ctx.track(ts, label):
        tt = torch.full((len(x0),), t, dtype=torch.long)
        loss = denoising_loss(model, module, x0, cond, tt, noise)
        lv = float(loss.detach())
        max_loss = max(max_loss, lv)
        # the paper's order: the step that falls below the threshold is not back-propagated
        if opts.importance == "diff" and lv < opts.threshold * max_loss:
            stopped_at = t
            break
        loss.backward()
        losses.append(lv)
    return {"data": src.source, "timesteps_used": len(losses), "last_t": ts[len(losses) - 1],
            "stopped_by_threshold": stopped_at is not None, "stopped_at_t": stopped_at, "loss_max": max_loss,
            "loss_last": losses[-1]}


def make_importance(name: str, score: str = "abs") -> Any:
    import torch_pruning as tp

    if name in ("diff", "taylor"):
        # "diff" and "taylor" share the score; they differ only in the timesteps accumulated
        return TaylorScore(squared=score == "squared")
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    return tp.importance.RandomImportance()


@register("prune.diff", PruneDiffOptions, must_precede=("calib", "quant", "ptqd"))
def run(model: DiffusionModel, opts: PruneDiffOptions, ctx: PassContext) -> DiffusionModel:
    from edgediff.metrics import macs, params

    check_prunable(model)
    before = {"params": params(model.module()), "macs": macs(model)}
    ratio = float(opts.ratio)
    if opts.macs_reduction > 0:
        ratio, _ = ratio_for_macs(model, float(opts.macs_reduction))
        ctx.log(f"prune.diff: ratio {ratio:.3f} meets macs_reduction={opts.macs_reduction}")
    info: dict[str, Any] = {"importance": opts.importance, "ratio": round(ratio, 4), "selection": opts.selection,
                            "score": opts.score}
    if opts.importance in ("diff", "taylor"):
        info.update(accumulate_gradients(model, opts, ctx))
    torch.manual_seed(ctx.seed)  # random importance draws from the global generator
    model, n_groups = prune_structure(model, ratio, make_importance(opts.importance, opts.score), opts.selection)
    for p in model.denoiser.parameters():
        p.requires_grad_(False)
    model.denoiser.eval()
    after = {"params": params(model.module()), "macs": macs(model)}
    info.update(groups_pruned=n_groups, params_before=before["params"], params_after=after["params"],
                macs_before=before["macs"], macs_after=after["macs"],
                macs_reduction=round(1 - after["macs"] / before["macs"], 4))
    ctx.metrics.update(info)
    model.provenance.setdefault("pruning", []).append({"pass": "prune.diff", **info})
    ctx.log(f"prune.diff: {before['params']:,} -> {after['params']:,} params, {before['macs']:,} -> {after['macs']:,} MACs")
    return model
