"""Plain min-max W8A8 quantization for tests and benchmarks of the exporters and the verifier.

This is NOT the quant pass (edgediff/passes/quant.py: PTQ4DM / Q-Diffusion calibration, BRECQ,
shortcut splitting). It is the simplest thing that produces QuantParams in the shared format
(edgediff/quant_params.py) plus a matching PyTorch simulation, so that the int8 export path can
be tested on any model without depending on the quant pass: per-output-channel symmetric
weights snapped to their grid, per-tensor activation ranges from min/max over a few denoiser
calls at several timesteps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgediff.model import DiffusionModel, set_submodule
from edgediff.quant_params import LayerQuant, QuantParams, TensorQuant
from edgediff.serialize import serializable


@serializable("minmax_sim_layer")
class MinMaxSimLayer(nn.Module):
    """Fake-quantizes the input of a Conv2d/Linear (its weight is already on the grid)."""

    _edgediff_quant_wrapper = True

    def __init__(self, kind: str = "conv", bits: int = 8, scale: float = 1.0, zero_point: int = 0,
                 signed: bool = True, inner: nn.Module | None = None) -> None:
        super().__init__()
        self._edgediff_init = {"kind": kind, "bits": bits, "scale": scale, "zero_point": zero_point, "signed": signed}
        self.inner = inner if inner is not None else nn.Identity()
        self.tq = TensorQuant(bits, torch.tensor(scale), torch.tensor(zero_point), None, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.tq.dequantize(self.tq.quantize(x))
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(xq, self.inner.weight, self.inner.bias)
        return F.linear(xq, self.inner.weight, self.inner.bias)


@torch.no_grad()
def minmax_quantize(model: DiffusionModel, symmetric: bool = True, bits: int = 8, calib_batches: int = 4,
                    seed: int = 0) -> DiffusionModel:
    """A copy of `model` with min-max W{bits}A{bits} QuantParams in extras["quant"] and a simulation.

    symmetric=False gives asymmetric (uint8 + zero point) activations, which TensorRT rejects:
    useful to test the compatibility check.
    """
    out = model.clone()
    den = out.denoiser
    layers = {n: m for n, m in den.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def hook(name: str) -> Any:
        def fn(_m: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach().float()
            lo[name] = min(lo.get(name, 0.0), float(x.min()))
            hi[name] = max(hi.get(name, 0.0), float(x.max()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    mod = out.module().eval()
    g = torch.Generator().manual_seed(seed)
    n_t = out.schedule.num_train_timesteps
    for i in range(calib_batches):
        inp = out.signature.example_inputs(batch=2, seed=seed + i)
        inp["timestep"] = torch.randint(0, n_t, (2,), generator=g).float()
        mod(**inp)
    for h in handles:
        h.remove()
    qmax = 2 ** (bits - 1) - 1
    qp = QuantParams(bits, bits, method="minmax (edgediff.testing)")
    for name, m in layers.items():
        if name not in lo:
            continue  # never called: stays float
        w = m.weight.detach()
        amax = w.flatten(1).abs().amax(1).clamp_min(1e-8)
        ws = amax / qmax
        m.weight.copy_(torch.clamp(torch.round(w / ws.view(-1, *[1] * (w.dim() - 1))), -qmax - 1, qmax)
                       * ws.view(-1, *[1] * (w.dim() - 1)))
        if symmetric:
            s, zp, signed = max(abs(lo[name]), abs(hi[name]), 1e-8) / qmax, 0, True
        else:
            s = max(hi[name] - lo[name], 1e-8) / (2**bits - 1)
            zp, signed = int(min(max(round(-lo[name] / s), 0), 2**bits - 1)), False
        kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
        wq = TensorQuant(bits, ws.float(), torch.zeros_like(ws, dtype=torch.int32), 0, True)
        aq = TensorQuant(bits, torch.tensor(s), torch.tensor(zp), None, signed)
        qp.layers[name] = LayerQuant(name, kind, wq, aq)
        set_submodule(den, name, MinMaxSimLayer(kind, bits, s, zp, signed, inner=m))
    out.extras["quant"] = qp.to_extras()
    return out


class _Bare(nn.Module):
    """A diffusers denoiser called as another tool traces it: positional (sample, timestep), tensor out."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


def export_third_party_onnx(unet: nn.Module, path: Any, example: tuple[torch.Tensor, torch.Tensor],
                            input_names: tuple[str, str] = ("sample", "timestep"), output_name: str = "out",
                            dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int | None = 17) -> Any:
    """`unet` exported outside edgediff (the TorchScript exporter on the bare module, the caller's
    names, time dtype and dynamic axes), as an ONNX-in model or a third-party profile target arrives."""
    kwargs: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "b"} for n in (*input_names, output_name)}
    torch.onnx.export(_Bare(unet).eval(), example, str(path), input_names=list(input_names),
                      output_names=[output_name], dynamo=False, dynamic_axes=dynamic_axes, **kwargs)
    return path


_TORCH_BLOCKED_CLI = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from edgediff.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}),
      file=sys.stderr)
"""


def cli_without_torch(args: list[str], timeout: float = 300) -> tuple[int, dict[str, Any], list[str], str]:
    """Run `edgediff ARGS` in a child process where `import torch` fails (what the torch-free runtime
    promises). Returns (exit code, the --json report or {}, the torch modules imported: ["torch"] is only
    the blocked entry itself, stderr)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _TORCH_BLOCKED_CLI, *args], capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    try:
        tail = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # the child died before its last line
        tail = {}
    rep = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return (int(tail.get("rc", proc.returncode)), rep, list(tail.get("torch", [])), proc.stderr)
