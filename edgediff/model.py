"""The IR every pass takes and returns: a denoiser with its schedule, signature and provenance."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgediff.schedule import NoiseSchedule


@dataclass
class InputSignature:
    """What one denoiser call takes, without the batch axis.

    sample_shape: (C, H, W) of x_t. cond_shape: (seq_len, dim) of encoder_hidden_states for
    cross-attention models, else None. num_classes: class-label conditioning (DiT), else None.
    """

    sample_shape: tuple[int, ...]
    cond_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sample_shape": list(self.sample_shape),
                "cond_shape": list(self.cond_shape) if self.cond_shape else None,
                "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSignature:
        return cls(tuple(d["sample_shape"]), tuple(d["cond_shape"]) if d.get("cond_shape") else None,
                   d.get("num_classes"))

    def example_inputs(self, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Deterministic example inputs for tracing, export and MACs counting."""
        g = torch.Generator().manual_seed(seed)
        out = {"sample": torch.randn(batch, *self.sample_shape, generator=g).to(dtype),
               "timestep": torch.full((batch,), 500.0)}
        if self.cond_shape:
            out["encoder_hidden_states"] = torch.randn(batch, *self.cond_shape, generator=g).to(dtype)
        if self.num_classes:
            out["class_labels"] = torch.randint(0, self.num_classes, (batch,), generator=g)
        return out


class DenoiserModule(nn.Module):
    """A plain-tensor view of any denoiser: forward(sample, timestep[, cond]) -> model output.

    diffusers models return dataclasses and take keyword arguments; exporters, the quantizer
    and the samplers want one tensor out. Timesteps are float32 of shape (B,) everywhere
    (friendlier to TFLite and FPGA flows than int64).
    """

    def __init__(self, inner: nn.Module, signature: InputSignature) -> None:
        super().__init__()
        self.inner = inner
        self.has_cond = signature.cond_shape is not None
        self.has_class = signature.num_classes is not None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        # I/O stays float32 whatever the weights' dtype (fp16 models cast inside the graph)
        dtype = next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), sample.dtype)
        kwargs: dict[str, Any] = {}
        if self.has_cond:
            kwargs["encoder_hidden_states"] = encoder_hidden_states.to(dtype) if encoder_hidden_states is not None else None
        if self.has_class:
            kwargs["class_labels"] = class_labels
        out = self.inner(sample.to(dtype), timestep, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, torch.Tensor):
            out = out.sample
        return out.float()


@dataclass
class DiffusionModel:
    """Denoiser + noise schedule + input signature + provenance (+ pass state in `extras`).

    `config` is the diffusers config the denoiser was built from (None for a pickled or
    exported module); `arch` names its class. `extras` holds what passes attach (quantization
    parameters, PTQD corrections...), keyed by pass name, saved by the artifact writer.
    """

    denoiser: nn.Module
    schedule: NoiseSchedule
    signature: InputSignature
    arch: str = "module"
    config: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def module(self) -> DenoiserModule:
        """The denoiser as a plain-tensor nn.Module (see DenoiserModule)."""
        if isinstance(self.denoiser, DenoiserModule):
            return self.denoiser
        return DenoiserModule(self.denoiser, self.signature)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.signature.example_inputs(batch, seed)

    def clone(self) -> DiffusionModel:
        """A deep copy, so that passes never modify their input in place."""
        return DiffusionModel(
            denoiser=copy.deepcopy(self.denoiser), schedule=self.schedule, signature=self.signature,
            arch=self.arch, config=copy.deepcopy(self.config), provenance=copy.deepcopy(self.provenance),
            extras=copy.deepcopy(self.extras),
        )
