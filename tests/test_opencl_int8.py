"""OpenCL int8 bundles on the shared lowering: activations stay int8 between integer layers,
each integer layer is bit-exact with edgediff.lowering.run_part, the whole bundle tracks the
simulation with the sampler in the loop, and the cost model counts the bytes int8 saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from edgediff.exporters import get_backend

from edgediff.lowering import lower, run_attention, run_part
from edgediff.model import DiffusionModel
from edgediff.quant_params import QuantParams, strip_quant_wrappers

pytest.importorskip("pyopencl")
from edgediff.kernels import runtime as clrt  # noqa: E402
from edgediff.kernels.cost import schedule_costs, total  # noqa: E402
from edgediff.kernels.graph import build_schedule, keep_int8_between  # noqa: E402

needs_cl = pytest.mark.skipif(not clrt.opencl_available()[0], reason="no OpenCL device")


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory: pytest.TempPathFactory) -> DiffusionModel:
    """The real calib + quant passes (asymmetric uint8 activations, output requantization, shortcut
    splits, quantized attention operands) on the tiny attention UNet."""
    from diffusers import UNet2DModel

    from edgediff.model import InputSignature
    from edgediff.pipeline import run_recipe
    from edgediff.recipe import PassSpec, Recipe
    from edgediff.schedule import NoiseSchedule

    torch.manual_seed(0)
    m = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=8, attention_head_dim=8).eval()
    dm = DiffusionModel(m, NoiseSchedule.from_config({}), InputSignature((1, 16, 16)), "UNet2DModel", dict(m.config),
                        {"source": "test"})
    recipe = Recipe("t", passes=[
        PassSpec("calib", {"method": "ptq4dm", "n_samples": 4, "steps": 5, "count": 16}),
        PassSpec("quant", {"weight_init": "minmax", "act_init": "minmax"})])
    q, _ = run_recipe(dm, recipe, cache_dir=tmp_path_factory.mktemp("cache"))
    return q


@pytest.fixture(scope="module")
def bundle(w8a8: DiffusionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cl") / "q8"
    rep = get_backend("opencl").export(w8a8, out, "int8")
    assert "note" not in rep  # the float-bundle note ("does not quantize activations") is not about int8
    return out


def _writers(ops: list[dict]) -> dict[str, dict]:
    return {op["out"]: op for op in ops}


def test_activations_stay_int8_between_integer_layers(w8a8: DiffusionModel) -> None:
    sched, _ = build_schedule(w8a8, QuantParams.of(w8a8))
    ops = sched["ops"]
    by_out = _writers(ops)
    att = [op for op in ops if op["op"] == "attention_int8"]
    assert att, "the quantized attentions run as integer attention"
    for a in att:
        # Q, K, V come straight from the projections' requantizing epilogues: no float tensor, no quantize op
        for b in a["in"]:
            assert by_out[b]["op"] == "iconv" and by_out[b]["direct"] and by_out[b]["store"]["dtype"] == "int8"
        # softmax(QK^T)V is requantized onto to_out's input grid and read by to_out as is
        assert a["direct"] and a["store"] is not None
        readers = [op for op in ops if a["out"] in op["in"]]
        assert [r["op"] for r in readers] == ["iconv"] and readers[0]["name"].endswith("to_out.0")
    # every GroupNorm read only by one integer layer writes that layer's int8 input, not float
    gn_q = [op for op in ops if op["op"] == "group_norm" and op.get("store")]
    assert len(gn_q) >= 10
    # a split layer's two input grids are written by the GroupNorm before it
    assert any(op.get("store2") and op["store_split"] > 0 for op in gn_q)
    for op in ops:
        if op["op"] != "quantize":
            continue  # what remains quantizes a tensor a float op or several layers also read, or an input
        src = by_out.get(op["in"][0])
        readers = [o for o in ops if op["in"][0] in o["in"]]
        foldable = src is not None and src["op"] in ("iconv", "group_norm", "attention_int8", "concat") \
            and (op["split"] == -1 or src["op"] in ("group_norm", "concat"))
        assert not foldable or len(readers) > 1, op["name"]
    # the unfolded layout has a quantize op in front of every integer layer and attention operand
    flat, _ = build_schedule(w8a8, QuantParams.of(w8a8), keep_int8=False)
    assert sum(o["op"] == "quantize" for o in flat["ops"]) > sum(o["op"] == "quantize" for o in ops)
    assert keep_int8_between(flat["ops"]) == ops


def test_int8_moves_fewer_bytes_than_float_between_layers(w8a8: DiffusionModel) -> None:
    """The cost model prices int8 buffers at one byte: the int8 layout moves fewer bytes than the
    same integer layers with float activations between them."""
    sched, w = build_schedule(w8a8, QuantParams.of(w8a8))
    flat, _ = build_schedule(w8a8, QuantParams.of(w8a8), keep_int8=False)
    shapes = {k: tuple(v.shape) for k, v in w.items()}

    def moved(s: dict) -> int:
        return sum(total(r["fused"]) for r in schedule_costs(s, shapes, "int8"))

    rows = {r["name"]: r for r in schedule_costs(sched, shapes, "int8")}
    gn = next(op for op in sched["ops"] if op["op"] == "group_norm" and op.get("store"))
    n = int(np.prod(rows[gn["name"]]["out_shape"]))
    assert rows[gn["name"]]["fused"]["writes"] == n  # one byte per element
    assert moved(sched) < 0.8 * moved(flat)


@needs_cl
def test_each_integer_layer_is_bit_exact_with_the_lowering(w8a8: DiffusionModel, bundle: Path) -> None:
    """On the model's own activations: every integer conv/linear of the bundle, from the int8 input
    it read to what it stored (requantized int8, or float after the epilogue), equals
    edgediff.lowering.run_part plus the same float32 epilogue, bit for bit."""
    from edgediff.kernels.export import OpenCLDenoiser

    den = OpenCLDenoiser(bundle)
    low = lower(_float_den(w8a8), QuantParams.of(w8a8))
    cap: dict[str, np.ndarray] = {}
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    den.executor.run(x, torch.tensor([3.0, 871.0]), capture=cap)
    checked = direct = 0
    for op in den.meta["schedule"]["ops"]:
        if op["op"] != "iconv":
            continue
        layer = low.layers[op["name"]]
        xq = cap[op["in"][0]].astype(np.int32)  # channels-first (B, C, H, W), a linear's tokens too
        v = None
        for part in layer.parts:
            a, b = part.channels
            if layer.kind == "linear":
                r = np.moveaxis(run_part(layer, part, np.moveaxis(xq[:, a:b], 1, -1)), -1, 1)
            else:
                r = run_part(layer, part, xq[:, a:b])
            if op["direct"]:
                got = cap[op["out"]].astype(np.int32).reshape(r.shape)
                assert np.array_equal(got, r), op["name"]
                direct += 1
                break
            r = part.output.dequantize(r) if part.output is not None else r
            v = r if v is None else (v + r).astype(np.float32)
        else:
            assert v is not None
            v = v.reshape(cap[op["out"]].shape)
            if op.get("chan_add"):
                v = v + cap[op["chan_add"]].reshape(v.shape[0], v.shape[1], 1, 1)
            if op.get("res"):
                v = cap[op["res"]] + v
            if op["out_scale"] != 1.0:
                v = v * np.float32(op["out_scale"])
            st = op.get("store")
            if st is not None:
                v = np.clip(np.rint(v / np.float32(st["scale"])) + st["zero_point"], st["qmin"], st["qmax"])
            assert np.array_equal(cap[op["out"]].astype(np.float32), v.astype(np.float32)), op["name"]
        checked += 1
    assert checked == len(low.layers) and direct >= 12


def _float_den(model: DiffusionModel) -> torch.nn.Module:
    import copy

    from edgediff.model import DenoiserModule

    den = copy.deepcopy(model.denoiser)
    den = den.inner if isinstance(den, DenoiserModule) else den
    return strip_quant_wrappers(den).float().eval()


@needs_cl
def test_integer_attention_matches_the_lowering() -> None:
    """attention_int8 against edgediff.lowering.run_attention on random operands: the integers agree
    except where a softmax probability sits on a rounding boundary of P's grid (one step)."""
    from edgediff.lowering import ActQ, LoweredAttention

    rt = clrt.CLRuntime()
    g = torch.Generator().manual_seed(1)
    B, heads, d, n = 2, 2, 8, 37
    qf, kf, vf = (torch.randn(B, heads, n, d, generator=g) for _ in range(3))
    sym = ActQ(0.03, 0, 8, True)
    att = LoweredAttention("a", sym, ActQ(0.025, 0, 8, True), ActQ(1 / 255, 0, 8, False), ActQ(0.02, 0, 8, True),
                           d ** -0.5, heads, ActQ(0.01, -3, 8, True))
    want = att.output.quantize(run_attention(att, qf.numpy(), kf.numpy(), vf.numpy()))  # (B, H, n, d)

    def cl_in(t: torch.Tensor, a: ActQ) -> object:  # channels-first (B, H*d, n) int8
        return rt.to_device(a.quantize(t.permute(0, 1, 3, 2).reshape(B, heads * d, n).numpy()).astype(np.int8), np.int8)

    from edgediff.kernels.graph import attention_attrs, grid_attrs

    spec = attention_attrs(att)
    got = rt.attention_int8(cl_in(qf, att.q), cl_in(kf, att.k), cl_in(vf, att.v), heads, d, n, n, spec,
                            store=grid_attrs(att.output), direct=True).get().astype(np.int32)
    got = got.reshape(B, heads, d, n).transpose(0, 1, 3, 2)
    diff = np.abs(got - want)
    assert diff.max() <= 2 and (diff == 0).mean() > 0.97
    flt = rt.attention_int8(cl_in(qf, att.q), cl_in(kf, att.k), cl_in(vf, att.v), heads, d, n, n, spec).get()
    np.testing.assert_allclose(flt.reshape(B, heads, d, n).transpose(0, 1, 3, 2), att.output.dequantize(want),
                               atol=2.5 * att.output.scale)


@needs_cl
def test_int8_bundle_tracks_the_simulation_with_the_sampler(w8a8: DiffusionModel, bundle: Path) -> None:
    from edgediff import verify
    from edgediff.sampling import TorchDenoiser

    den = get_backend("opencl").load_denoiser(bundle)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3.0, 871.0])
    want = TorchDenoiser(w8a8)(x, t)
    assert float((den(x, t) - want).abs().max()) < 1e-3 * max(1.0, float(want.abs().max()))
    res = verify.verify(w8a8, bundle, steps=3, samples=2)
    assert res["precision"] == "int8" and res["verified"] is True and res["exit_code"] == 0, res
