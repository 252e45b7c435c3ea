"""--adapter: a hand-written torch denoiser (trusted pickle, torch.export .pt2) described by a TOML file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgediff.cli import main
from edgediff.errors import BadInput
from edgediff.loaders import LoadOptions, load_model


class RawEdm(nn.Module):
    """k-diffusion style: takes raw x and sigma (and a context), returns the denoised x0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.ctx = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        bias = self.ctx(ctx.mean(1)).view(-1, 2, 1, 1)
        return self.conv(x / (1 + sigma.view(-1, 1, 1, 1))) + bias


class TimeNet(nn.Module):
    """A plain eps-predictor taking (t, x) in that order: the adapter says which is which."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


EDM_TOML = """sample_shape = [2, 8, 8]
inputs = ["x", "sigma", "ctx"]
sample = "x"
time = "sigma"
time_kind = "sigma"
preconditioning = "edm"

[cond.ctx]
shape = [3, 5]
role = "encoder_hidden_states"

[scheduler]
_class_name = "EDMEulerScheduler"
sigma_data = 0.5
"""


def test_pickled_edm_module_with_adapter_generates_and_saves_without_torch_export(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    raw = RawEdm().eval()
    src = tmp_path / "edm.pt"
    torch.save(raw, src)
    (tmp_path / "a.toml").write_text(EDM_TOML)
    m = load_model(src, LoadOptions(adapter=tmp_path / "a.toml", trust_pickle=True))
    assert m.schedule.class_name == "EDMEulerScheduler" and m.signature.cond_shape == (3, 5)
    # the scheduler's call (c_in x, c_noise) -> F with x0 = c_skip x + c_out F, as EDMEulerScheduler wants
    x, ctx, sigma = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 5), torch.tensor([0.7, 12.0])
    sch = m.schedule.make_scheduler()
    x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 0.25) ** 0.5
    f = m.module()(x_in, 0.25 * torch.log(sigma), ctx)
    for i in range(2):
        d = sch.precondition_outputs(x[i:i + 1], f[i:i + 1], sigma[i])
        torch.testing.assert_close(d, raw(x[i:i + 1], sigma[i:i + 1], ctx[i:i + 1]), atol=1e-5, rtol=1e-5)
    out = tmp_path / "art"
    npy = tmp_path / "g.npy"
    args = ["--adapter", str(tmp_path / "a.toml"), "--trust-pickle"]
    assert main(["compress", str(src), "--recipe", "none", "-o", str(out), *args]) == 0
    capsys.readouterr()
    assert (out / "model" / "adapter.json").is_file() and not (out / "model" / "denoiser.pt2").exists()
    back = load_model(out)
    ex = {**m.example_inputs(2), "timestep": torch.tensor([-0.5, 0.5])}  # c_noise of sigma 0.14 and 7.4
    torch.testing.assert_close(back.module()(**ex), m.module()(**ex))
    assert main(["generate", str(out), "--steps", "3", "--samples", "2", "--save-npy", str(npy), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sampler"] == "EDMEulerScheduler" and rep["denoiser_calls"] == 3
    from edgediff.sampling import TorchDenoiser
    from edgediff.verify import single_call_error

    den = TorchDenoiser(back)
    assert single_call_error(den, den, back) == 0.0  # finite: checked at the scheduler's own sigmas
    # the artifact refuses a source that changed since
    torch.save(RawEdm(), src)
    with pytest.raises(BadInput, match="changed"):
        load_model(out)


def test_pt2_dynamic_batch_with_reordered_inputs(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = TimeNet().eval()
    b = torch.export.Dim("batch")
    ep = torch.export.export(net, (torch.zeros(2), torch.zeros(2, 2, 8, 8)), dynamic_shapes=({0: b}, {0: b}))
    src = tmp_path / "net.pt2"
    torch.export.save(ep, str(src))
    (tmp_path / "a.toml").write_text('sample_shape = [2, 8, 8]\ninputs = ["t", "x"]\nsample = "x"\ntime = "t"\n'
                                     '[scheduler]\n_class_name = "DDIMScheduler"\nclip_sample = false\n')
    m = load_model(src, LoadOptions(adapter=tmp_path / "a.toml"))
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    torch.testing.assert_close(m.module()(x, t), net(t, x))
    npy = tmp_path / "g.npy"
    assert main(["generate", str(src), "--adapter", str(tmp_path / "a.toml"), "--steps", "2", "--samples", "3",
                 "--save-npy", str(npy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "DDIMScheduler"
    onnx_out = tmp_path / "n.onnx"
    assert main(["export", str(src), "--adapter", str(tmp_path / "a.toml"), "--target", "onnx", "-o", str(onnx_out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(src), str(onnx_out), "--adapter", str(tmp_path / "a.toml"), "--steps", "2",
                 "--samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]


@pytest.mark.parametrize("text,field", [
    (EDM_TOML.replace('time_kind = "sigma"', 'time_kind = "minutes"'), "time_kind"),
    (EDM_TOML.replace('sample = "x"', 'sample = "y"'), "sample"),
    (EDM_TOML.replace('role = "encoder_hidden_states"', 'role = "prompt"'), "cond.ctx"),
    (EDM_TOML.replace("EDMEulerScheduler", "DDIMScheduler"), "time_kind"),
    (EDM_TOML.replace("[cond.ctx]\nshape = [3, 5]", "[cond.ctx]\nshape = [3, 0]"), "cond.ctx.shape"),
])
def test_bad_adapter_exits_2_naming_the_field(tmp_path: Path, text: str, field: str, capsys) -> None:
    torch.save(RawEdm(), tmp_path / "edm.pt")
    (tmp_path / "a.toml").write_text(text)
    rc = main(["info", str(tmp_path / "edm.pt"), "--adapter", str(tmp_path / "a.toml"), "--trust-pickle"])
    err = capsys.readouterr().err
    assert rc == 2 and field in err and "a.toml" in err


class _Named(nn.Module):
    """A plain denoiser taking (x, t, <third>): the third input's name decides whether it fits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.lin = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1)) + self.lin(encoder_hidden_states).mean(1).view(-1, 2, 1, 1)


class _Context(_Named):
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, t, context)


def _pt2(tmp_path: Path, net: nn.Module, name: str) -> Path:
    b = torch.export.Dim("batch")
    args = (torch.zeros(2, 2, 8, 8), torch.zeros(2), torch.zeros(2, 3, 5))
    ep = torch.export.export(net.eval(), args, dynamic_shapes=tuple({0: b} for _ in args))
    torch.export.save(ep, str(tmp_path / name))
    return tmp_path / name


def test_pt2_without_adapter_fits_or_exits_2_naming_the_argument(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    net = _Named()
    m = load_model(_pt2(tmp_path, net, "ok.pt2"))  # the third input is passed by name, positionally placed
    assert m.signature.cond_shape == (3, 5)
    x, t, c = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 2.0, 3.0]), torch.randn(3, 3, 5)
    torch.testing.assert_close(m.module()(x, t, c), net(x, t, c))
    bad = _pt2(tmp_path, _Context(), "ctx.pt2")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'context'" in err and "--adapter" in err and len(err.splitlines()) == 1
    # a shape the archive's guards reject: the argument it choked on is named
    assert main(["info", str(tmp_path / "ok.pt2"), "--cond-shape", "3,4"]) == 2
    err = capsys.readouterr().err
    assert "rejects argument 'encoder_hidden_states'" in err and "(2, 3, 4)" in err
    assert main(["info", str(tmp_path / "ok.pt2"), "--sample-shape", "3,8,8"]) == 2
    assert "rejects argument 'x'" in capsys.readouterr().err


def test_adapted_module_w8a8_artifact_replays_the_quantization_at_reload(tmp_path: Path) -> None:
    """w8a8 replaces the adapted module's convs/linears by quantization wrappers: the artifact records
    that against the source and the reloaded model computes exactly what the compressed one did."""
    from edgediff.pipeline import compress
    from edgediff.quant_params import is_quant_wrapper
    from edgediff.recipe import parse

    torch.manual_seed(0)
    src = tmp_path / "edm.pt"
    torch.save(RawEdm().eval(), src)
    (tmp_path / "a.toml").write_text(EDM_TOML)
    m = load_model(src, LoadOptions(adapter=tmp_path / "a.toml", trust_pickle=True))
    recipe = parse('name = "t"\ndescription = "t"\n[[pass]]\nname = "calib"\nmethod = "qdiff"\nn_samples = 2\n'
                   'steps = 3\ninterval = 1\n[[pass]]\nname = "quant"\ncalib_limit = 6\n', "t.toml")
    out = tmp_path / "art"
    done, _ = compress(m, recipe, out)
    assert (out / "model" / "structure.json").is_file()
    back = load_model(out)
    assert sum(is_quant_wrapper(x) for x in back.denoiser.modules()) == sum(
        is_quant_wrapper(x) for x in done.denoiser.modules()) > 0
    ex = {**m.example_inputs(3), "timestep": torch.tensor([-0.5, 0.1, 0.5])}
    with torch.no_grad():
        want, got = done.module()(**ex), back.module()(**ex)
        plain = m.module()(**ex)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, plain)  # the quantization is there, not just the float weights
