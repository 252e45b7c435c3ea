"""Backend-neutral quantization parameters: what the quant pass writes, what exporters read.

Stored in `DiffusionModel.extras["quant"]` (and so in the artifact's extras/quant.*) as

    {"version": 1, "weight_bits": 8, "act_bits": 8, "method": "...",
     "layers": {NAME: LayerQuant.to_dict(), ...}}

NAME is the module path inside the *float* denoiser (`model.denoiser`, e.g.
"down_blocks.0.resnets.0.conv1"); attention matmuls use "<attention module path>:qk" and
"<attention module path>:av". Integer arithmetic follows docs/architecture.md ("Integer arithmetic"):
    q = clamp(round(x / scale) + zero_point, qmin, qmax),  x ~ (q - zero_point) * scale
Weights are per-channel along `axis` (0 = output channels for conv and linear), symmetric
(signed, zero_point 0) by default or asymmetric (unsigned grid with a zero point per channel,
`signed` false). A shortcut-split layer may also split its weight (`weight2`: the quantization
of input channels [split_at:], `weight` then covers [:split_at]). The float weights kept in
the model already lie on that grid (AdaRound's rounding included), so `round(w / scale)` recovers the integers exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from edgediff.errors import BadInput

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
KINDS = ("conv", "linear", "matmul_qk", "matmul_av")


@dataclass
class TensorQuant:
    bits: int
    scale: torch.Tensor  # float32; shape () per-tensor, (C,) per-channel
    zero_point: torch.Tensor  # int32, same shape as scale
    axis: int | None = None  # channel axis for per-channel, None per-tensor
    signed: bool = True  # True: [-2^(b-1), 2^(b-1)-1]; False: [0, 2^b - 1]

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise BadInput(f"unsupported bit-width {self.bits}; supported: {SUPPORTED_BITS}")
        self.scale = torch.as_tensor(self.scale, dtype=torch.float32)
        self.zero_point = torch.as_tensor(self.zero_point, dtype=torch.int32)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def symmetric(self) -> bool:
        return bool((self.zero_point == 0).all())

    def _bcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.dim() == 0:
            return t
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.view(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integers (as int32) for float x; round half to even like torch.round and ONNX."""
        s, z = self._bcast(self.scale, x), self._bcast(self.zero_point, x)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        s, z = self._bcast(self.scale, q), self._bcast(self.zero_point, q)
        return (q.to(torch.float32) - z) * s

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "scale": self.scale, "zero_point": self.zero_point, "axis": self.axis,
                "signed": self.signed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorQuant:
        return cls(int(d["bits"]), d["scale"], d["zero_point"], d.get("axis"), bool(d.get("signed", True)))


@dataclass
class LayerQuant:
    name: str
    kind: str  # one of KINDS
    weight: TensorQuant | None = None  # conv/linear
    input: TensorQuant | None = None  # the activation entering the layer (for matmuls: the left operand)
    input2: TensorQuant | None = None  # matmuls: the right operand (K^T or V)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"split_at": C1} for shortcut splitting
    # the layer's output as the integer kernel writes it (requantized); for a shortcut-split layer
    # output is the first half's partial sum and output2 the second's. None: float output.
    output: TensorQuant | None = None
    output2: TensorQuant | None = None
    # a split weight's second part (input channels [split_at:]); None: one quantization for the weight
    weight2: TensorQuant | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "meta": self.meta}
        for k in ("weight", "input", "input2", "output", "output2", "weight2"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v.to_dict()
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> LayerQuant:
        w, i, i2, o, o2, w2 = (TensorQuant.from_dict(d[k]) if d.get(k) else None
                               for k in ("weight", "input", "input2", "output", "output2", "weight2"))
        return cls(name, d["kind"], w, i, i2, dict(d.get("meta", {})), o, o2, w2)

    def weight_parts(self) -> list[tuple[slice, TensorQuant]]:
        """(input-channel slice, weight quantization) per part: two for a split weight, else one."""
        if self.weight is None:
            return []
        if self.weight2 is not None and self.meta.get("split_at"):
            c = int(self.meta["split_at"])
            return [(slice(0, c), self.weight), (slice(c, None), self.weight2)]
        return [(slice(None), self.weight)]

    def refuse_split_weight(self, target: str) -> None:
        """BadInput for a writer that takes one weight quantization per layer (never a silent merge)."""
        if self.weight2 is not None:
            raise BadInput(f"{self.name}: its weight is quantized in two parts at a shortcut concatenation "
                           f"(quant option split_weights); {target} has no export for that: re-quantize with "
                           "split_weights = false or export to ONNX")


@dataclass
class QuantParams:
    weight_bits: int
    act_bits: int
    layers: dict[str, LayerQuant] = field(default_factory=dict)
    method: str = ""

    def to_extras(self) -> dict[str, Any]:
        return {"version": 1, "weight_bits": self.weight_bits, "act_bits": self.act_bits, "method": self.method,
                "layers": {n: lq.to_dict() for n, lq in self.layers.items()}}

    @classmethod
    def from_extras(cls, d: dict[str, Any]) -> QuantParams:
        return cls(int(d["weight_bits"]), int(d["act_bits"]),
                   {n: LayerQuant.from_dict(n, ld) for n, ld in d.get("layers", {}).items()}, d.get("method", ""))

    @classmethod
    def of(cls, model: Any) -> QuantParams | None:
        """The quantization parameters of a DiffusionModel, or None if it is not quantized."""
        d = getattr(model, "extras", {}).get("quant")
        return cls.from_extras(d) if d else None


def is_quant_wrapper(module: Any) -> bool:
    """Quantization-simulation wrappers mark themselves and keep the float module as `.inner`."""
    return bool(getattr(module, "_edgediff_quant_wrapper", False)) and hasattr(module, "inner")


def strip_quant_wrappers(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every simulation wrapper by its float `.inner` module, in place; returns `module`.

    Module names then match the names used in QuantParams.layers, and the float weights are
    the on-grid ones, which is what exporters need to emit Q/DQ or integer kernels.
    """
    for name, child in list(module.named_children()):
        if is_quant_wrapper(child):
            setattr(module, name, strip_quant_wrappers(child.inner))
        else:
            strip_quant_wrappers(child)
    return module
