"""Which lowered part does a converted op compute? Recognising the lowering's layers in a graph
written by a third-party converter (litert-torch for TFLite), whose op and tensor names are its own.

An op represents a part when its float filter, in the file's layout, is the part's integer
weights times its per-channel scales within MATCH_TOL of a quantization step (so a converter
that rounds or re-lays out the float weights still matches, and the integers written back are
exactly the lowering's), and its bias is the part's int32 bias at s_x*s_w within the same
tolerance. Several parts can have identical weights and biases (a model with repeated blocks);
their input/output scales differ, so a tie is settled by the op's tensor name (the converter's
module path: the longest common suffix with the layer's name) and then by order: each part is
taken once, in the lowering's (module definition) order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgediff.lowering.layers import IntPart, LoweredModel

MATCH_TOL = 0.01  # in quantization steps: float rounding by a converter, never a real change of value

# the lowering's weight (O, I, kh, kw) or (O, I) -> the file's filter layout, and where O lands
Layout = tuple[str, Callable[[np.ndarray], np.ndarray], int, Callable[[np.ndarray], bool]]


_PROBE = 256  # leading elements compared first: most candidates differ there, full arrays are large


@dataclass
class _Entry:
    name: str
    index: int
    part: IntPart
    layout: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]  # the filter's shape in the file's layout
    axis: int  # output-channel axis in that layout

    def __post_init__(self) -> None:
        q = self.layout(self.part.weight)
        self.probe_idx = np.unravel_index(np.arange(min(_PROBE, q.size)), q.shape)
        self.probe = q[self.probe_idx].astype(np.float32)
        self.probe_scale = np.asarray(self.part.weight_scale, np.float32)[self.probe_idx[self.axis]]

    def represents(self, w: np.ndarray, bias: np.ndarray | None) -> bool:
        if w.shape != self.shape:
            return False
        if not np.all(np.abs(w[self.probe_idx] / self.probe_scale - self.probe) <= MATCH_TOL):
            return False
        p = self.part
        if p.bias is None or (bias is None and not np.any(p.bias)):
            # converters give bias-free ops a shared zero bias, and drop an all-zero bias (litert-torch)
            if bias is not None and np.any(bias):
                return False
        elif bias is None or bias.size != p.bias.size or \
                not np.all(np.abs(bias.reshape(-1) / p.acc_scale - p.bias) <= MATCH_TOL + np.abs(p.bias) * 2.0**-21):
            # (a float32 bias holds an int32 above 2^24 only to a few ulps)
            return False
        shape = [1] * w.ndim
        shape[self.axis] = -1
        q = self.layout(p.weight)
        return bool(np.all(np.abs(w / np.asarray(p.weight_scale, np.float32).reshape(shape) - q) <= MATCH_TOL))


def _path_parts(name: str) -> list[str]:
    """Layer name components without container names (`down_blocks.0` -> `0`): converters name
    a module by its attribute in its parent, and a ModuleList's children by their index only."""
    comps = name.split(".")
    return [c for j, c in enumerate(comps) if not (j + 1 < len(comps) and comps[j + 1].isdigit())]


def _hint_parts(hint: str) -> list[str]:
    """The attribute names in a converter's module path `pkg.Class_attr/pkg.Class_attr/...`."""
    out = []
    for seg in re.split(r"/", hint.split(";")[0]):
        last = seg.rsplit(".", 1)[-1].lstrip("_")
        if "_" in last:
            out.append(last.split("_", 1)[1])
    return out


def _suffix_score(name: str, hint: str) -> int:
    a, b = _path_parts(name), _hint_parts(hint)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class PartMatcher:
    """Matches converted ops to lowered parts, each part at most once (see the module docstring).

    `layouts` maps an op kind (e.g. "CONV_2D") to (layer kind "conv"/"linear", the transform to the
    file's filter layout, the output-channel axis there, a predicate on the lowering's weight for
    whether this op kind can hold it, e.g. DEPTHWISE only for one input channel per group).
    """

    def __init__(self, low: LoweredModel, layouts: dict[str, Layout]) -> None:
        self.entries: dict[str, list[_Entry]] = {k: [] for k in layouts}
        for name, lay in low.layers.items():
            for i, p in enumerate(lay.parts):
                for kind, (layer_kind, fn, axis, ok) in layouts.items():
                    if lay.kind == layer_kind and ok(p.weight):
                        self.entries[kind].append(_Entry(name, i, p, fn, tuple(fn(p.weight).shape), axis))
        self.taken: set[tuple[str, int]] = set()

    def match(self, kind: str, w: np.ndarray, bias: np.ndarray | None, hint: str = "") -> tuple[str, int] | None:
        """The (layer, part index) the op with float filter `w` (in the file's layout and shape) and
        `bias` computes, or None; the part is then taken."""
        w = np.asarray(w, np.float32)
        cands = [e for e in self.entries.get(kind, ()) if (e.name, e.index) not in self.taken
                 and e.represents(w, bias)]
        if not cands:
            return None
        if len(cands) > 1 and hint:
            best = max(_suffix_score(e.name, hint) for e in cands)
            cands = [e for e in cands if _suffix_score(e.name, hint) == best]
        e = cands[0]
        self.taken.add((e.name, e.index))
        return e.name, e.index
