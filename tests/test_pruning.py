"""Diff-Pruning, LD-Pruner and fine-tuning passes on every supported denoiser kind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff.artifact import load_artifact, write_artifact
from edgediff.errors import BadInput
from edgediff.metrics import macs, params
from edgediff.model import DiffusionModel
from edgediff.passes import PassContext, get, make_options

ARCHS = ["tiny_unet", "tiny_cond_unet", "tiny_dit"]


def _run(name: str, model: DiffusionModel, original: DiffusionModel | None = None, **options) -> tuple[DiffusionModel, dict]:
    run, _ = get(name)
    ctx = PassContext(original=original)
    out = run(model.clone(), make_options(name, options), ctx)
    return out, ctx.metrics


def _forward(model: DiffusionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.module().eval()(**inputs)


def _onnx_roundtrip(model: DiffusionModel, inputs: dict[str, torch.Tensor]) -> float:
    """torch.onnx.export the model, run it in ONNX Runtime, return max |ort - torch|."""
    import onnxruntime as ort

    names = [k for k in ("sample", "timestep", "encoder_hidden_states", "class_labels") if k in inputs]
    args = (inputs["sample"], inputs["timestep"], inputs.get("encoder_hidden_states"), inputs.get("class_labels"))
    f = io.BytesIO()
    torch.onnx.export(model.module().eval(), args, f, input_names=names, output_names=["out"], dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: inputs[k].numpy() for k in names})[0]
    return float(np.abs(got - _forward(model, inputs).numpy()).max())


def _reload(model: DiffusionModel, where: Path) -> DiffusionModel:
    write_artifact(model, where, {})
    return load_artifact(where)


# ------------------------------------------------------------------------------------------- prune.diff


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_diff_runs_saves_reloads_and_exports(arch: str, request, tmp_path: Path) -> None:
    model = request.getfixturevalue(arch)
    before_params, before_macs = params(model.module()), macs(model)
    pruned, m = _run("prune.diff", model, ratio=0.4, importance="diff", t_stride=250, batch_size=4,
                     data="samples", sample_steps=2)
    assert params(pruned.module()) < before_params and macs(pruned) < before_macs
    assert m["params_after"] == params(pruned.module()) and m["groups_pruned"] > 0
    inputs = model.example_inputs(batch=2)
    y = _forward(pruned, inputs)
    assert y.shape == _forward(model, inputs).shape and torch.isfinite(y).all()
    # the input model is untouched (passes get a clone, but check we did not share tensors)
    assert params(model.module()) == before_params
    again = _reload(pruned, tmp_path / "a")
    assert torch.equal(_forward(again, inputs), y)
    assert _onnx_roundtrip(pruned, inputs) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_groups_and_heads_stay_consistent(arch: str, request) -> None:
    from diffusers.models.attention_processor import Attention

    model = request.getfixturevalue(arch)
    heads_before = {n: m.heads for n, m in model.denoiser.named_modules() if isinstance(m, Attention)}
    pruned, _ = _run("prune.diff", model, ratio=0.5, importance="magnitude")
    for name, mod in pruned.denoiser.named_modules():
        if isinstance(mod, torch.nn.GroupNorm):
            assert mod.num_channels % mod.num_groups == 0, name
            assert mod.weight.shape[0] == mod.num_channels
        if isinstance(mod, Attention):
            assert mod.heads == heads_before[name]
            assert mod.inner_dim == mod.to_q.out_features and mod.inner_dim % mod.heads == 0
            assert mod.to_k.out_features == mod.to_q.out_features
            assert mod.out_dim == mod.to_out[0].out_features and mod.query_dim == mod.to_q.in_features
    from diffusers.models.resnet import Downsample2D, Upsample2D

    for mod in pruned.denoiser.modules():
        if isinstance(mod, (Upsample2D, Downsample2D)) and getattr(mod, "conv", None) is not None:
            assert mod.channels == mod.conv.in_channels


def test_every_attention_processor_computes_the_same_pruned_model(tiny_unet) -> None:
    """Head dims shrink; the logit scale is folded into q so the classic and SDPA processors agree."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pruned, _ = _run("prune.diff", tiny_unet, ratio=0.5, importance="magnitude")
    inputs = tiny_unet.example_inputs(2)
    attns = [m for m in pruned.denoiser.modules() if hasattr(m, "set_processor")]
    assert attns
    for a in attns:
        a.set_processor(AttnProcessor2_0())
    y_sdpa = _forward(pruned, inputs)
    for a in attns:
        a.set_processor(AttnProcessor())
    y_classic = _forward(pruned, inputs)
    assert torch.allclose(y_sdpa, y_classic, atol=1e-5)


def test_attention_scale_fold_preserves_logits_of_kept_dims() -> None:
    """Removing head dims whose q rows are zero must not change the attention output."""
    from diffusers.models.attention_processor import Attention

    from edgediff.passes.prune_diff import _attention_dims, _fix_static_attributes

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, bias=True).eval()
    drop = [j for h in range(2) for j in (h * 8 + 6, h * 8 + 7)]  # two dims of each head
    keep = [j for j in range(16) if j not in drop]
    with torch.no_grad():
        attn.to_q.weight[drop] = 0
        attn.to_q.bias[drop] = 0
        attn.to_v.weight[drop] = 0
        attn.to_v.bias[drop] = 0
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y_ref = attn(x)
    dims = _attention_dims(attn)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            lin.weight = torch.nn.Parameter(lin.weight[keep].clone())
            lin.bias = torch.nn.Parameter(lin.bias[keep].clone())
            lin.out_features = len(keep)
        attn.to_out[0].weight = torch.nn.Parameter(attn.to_out[0].weight[:, keep].clone())
        attn.to_out[0].in_features = len(keep)
    _fix_static_attributes(attn, dims)
    with torch.no_grad():
        y = attn(x)
    assert attn.inner_dim == 12 and attn.scale == pytest.approx(6**-0.5)
    assert torch.allclose(y, y_ref, atol=1e-5)


def test_diff_importance_uses_informative_steps_and_differs_from_baselines(tiny_unet) -> None:
    common = dict(ratio=0.5, t_stride=100, batch_size=4, data="samples", sample_steps=2)
    diff, md = _run("prune.diff", tiny_unet, importance="diff", threshold=0.9, **common)
    taylor, mt = _run("prune.diff", tiny_unet, importance="taylor", **common)
    mag, _ = _run("prune.diff", tiny_unet, importance="magnitude", **common)
    n_all = len(range(0, tiny_unet.schedule.num_train_timesteps, 100))
    assert mt["timesteps_used"] == n_all and not mt["stopped_by_threshold"]
    # the stopping rule: stop at the first t whose loss is below threshold * the running max
    assert md["timesteps_used"] <= n_all
    if md["stopped_by_threshold"]:
        assert md["loss_last"] < 0.9 * md["loss_max"] and md["timesteps_used"] < n_all
    # same structure, different channels kept
    assert params(diff.module()) == params(taylor.module()) == params(mag.module())
    assert any(not torch.equal(a, b) for a, b in zip(diff.denoiser.parameters(), mag.denoiser.parameters()))


def test_macs_budget_picks_a_ratio(tiny_unet) -> None:
    pruned, m = _run("prune.diff", tiny_unet, importance="magnitude", macs_reduction=0.4)
    assert m["macs_reduction"] >= 0.4
    assert 0 < m["ratio"] < 1


# ------------------------------------------------------------------------------------------- prune.ld


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_ld_meets_budget_keeps_weights_and_reloads(arch: str, request, tmp_path: Path) -> None:
    from edgediff.passes.skip_modules import SkipAttention, SkipBlock, SkipResnet, ZeroBranch

    model = request.getfixturevalue(arch)
    pruned, m = _run("prune.ld", model, macs_reduction=0.2, samples=3, steps=2, order="score")
    assert macs(pruned) <= 0.8 * macs(model) and m["macs_after"] == macs(pruned)
    assert m["removed"] and all(r["score"] <= max(m["scores"].values()) for r in m["removed"])
    # removed in ascending score order
    scores = [r["score"] for r in m["removed"]]
    assert scores == sorted(scores)
    stand_ins = [x for x in pruned.denoiser.modules() if isinstance(x, (SkipResnet, SkipAttention, SkipBlock, ZeroBranch))]
    assert len(stand_ins) == len(m["removed"])
    # every weight that is still there is the original one
    orig = dict(model.denoiser.named_parameters())
    for name, p in pruned.denoiser.named_parameters():
        assert torch.equal(p, orig[name]), name
    inputs = model.example_inputs(2)
    again = _reload(pruned, tmp_path / "a")
    assert torch.equal(_forward(again, inputs), _forward(pruned, inputs))
    assert _onnx_roundtrip(pruned, inputs) < 1e-3


def test_prune_ld_operator_level_convs_to_1x1_in_rounds(tiny_unet, tmp_path: Path) -> None:
    from edgediff.passes.prune_ld import candidates, conv_to_1x1

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    one = conv_to_1x1(conv)
    flat = torch.randn(1, 3, 1, 1).expand(1, 3, 6, 6)  # locally constant: the 1x1 is exact inside
    with torch.no_grad():
        assert torch.allclose(conv(flat)[..., 1:-1, 1:-1], one(flat)[..., 1:-1, 1:-1], atol=1e-5)
    kinds = {c.kind for c in candidates(tiny_unet, "operators")}
    assert {"conv1x1", "resnet", "attention"} <= kinds
    assert {c.kind for c in candidates(tiny_unet, "convs")} == {"conv1x1"}
    assert "conv1x1" not in {c.kind for c in candidates(tiny_unet, "all")}  # the default set is unchanged
    pruned, m = _run("prune.ld", tiny_unet, macs_reduction=0.25, samples=3, steps=2, include="convs", rounds=2)
    assert macs(pruned) <= 0.75 * macs(tiny_unet) and m["macs_after"] == macs(pruned)
    assert m["rounds"] == 2 and {r["round"] for r in m["removed"]} == {0, 1}
    # round 2 re-scored only what round 1 left, on the pruned model
    first = {r["name"] for r in m["removed"] if r["round"] == 0}
    assert first and not first & set(m["round_scores"][1])
    for r in m["removed"]:
        layer = pruned.denoiser.get_submodule(r["name"])
        assert isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1)
    inputs = tiny_unet.example_inputs(2)
    again = _reload(pruned, tmp_path / "a")
    assert torch.equal(_forward(again, inputs), _forward(pruned, inputs))
    with pytest.raises(BadInput, match="rounds"):
        make_options("prune.ld", {"rounds": 0})


def test_prune_ld_per_cost_order_is_score_per_mac_saved(tiny_unet) -> None:
    from edgediff.passes.prune_ld import candidate_savings, candidates

    cands = candidates(tiny_unet, "convs")  # 3x3 -> 1x1 of convs of different widths: different savings
    inputs = tiny_unet.example_inputs(2)
    before, out = macs(tiny_unet), _forward(tiny_unet, inputs)
    saving = candidate_savings(tiny_unet, cands)
    # each replacement was taken out again: the model is unchanged
    assert macs(tiny_unet) == before and torch.equal(_forward(tiny_unet, inputs), out)
    assert all(v >= 0 for v in saving.values()) and len({saving[id(c)] for c in cands}) > 1
    ratios = {}
    for order in ("score", "per_cost"):
        pruned, m = _run("prune.ld", tiny_unet, macs_reduction=0.25, samples=2, steps=1, include="convs", order=order)
        assert m["order"] == order and macs(pruned) <= 0.75 * before
        key = [r["score"] / r["macs_saved"] if order == "per_cost" else r["score"] for r in m["removed"]]
        assert key == sorted(key), order  # removed in ascending order of the chosen key
        ratios[order] = [r["score"] / r["macs_saved"] for r in m["removed"]]
    # the greedy knapsack order never takes a worse score-per-MAC candidate first
    assert ratios["per_cost"][0] <= ratios["score"][0]
    with pytest.raises(BadInput, match="order"):
        make_options("prune.ld", {"order": "ratio"})


def test_low_rank_and_bias_stand_ins_of_a_linear() -> None:
    from edgediff.passes.skip_modules import LinearBias, LowRankLinear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    with torch.no_grad():  # a rank-3 weight: the rank-3 factorisation is exact, rank 2 is not
        lin.weight.copy_(torch.randn(10, 3, generator=g) @ torch.randn(3, 12, generator=g))
    x = torch.randn(5, 7, 12, generator=g)
    with torch.no_grad():
        assert torch.allclose(LowRankLinear.replacing(lin, 3)(x), lin(x), atol=1e-4)
        assert not torch.allclose(LowRankLinear.replacing(lin, 2)(x), lin(x), atol=1e-2)
        bias_only = LinearBias.replacing(lin)(x)
    assert bias_only.shape == (5, 7, 10) and torch.equal(bias_only[3, 2], lin.bias.detach())


def test_prune_ld_single_linears_meet_budget_reload_and_export(tiny_dit, tmp_path: Path) -> None:
    from edgediff.passes.prune_ld import _inner, candidates
    from edgediff.passes.skip_modules import LinearBias, LowRankLinear

    cands = candidates(tiny_dit, "linears")
    assert {c.kind for c in cands} == {"linear_identity", "linear_lowrank", "linear_remove"}
    lin = {n: m for n, m in _inner(tiny_dit).named_modules() if type(m) is torch.nn.Linear}
    for c in cands:  # identity only where the shapes allow it, low rank only where it is cheaper
        m = lin[c.name]
        if c.kind == "linear_identity":
            assert m.in_features == m.out_features
        if c.kind == "linear_lowrank":
            assert c.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
    assert {c.kind for c in candidates(tiny_dit, "linears", linear_ops="remove")} == {"linear_remove"}
    assert not {c.kind for c in candidates(tiny_dit, "all")} & {"linear_identity", "linear_lowrank", "linear_remove"}
    pruned, m = _run("prune.ld", tiny_dit, macs_reduction=0.3, samples=3, steps=2, include="linears")
    assert macs(pruned) <= 0.7 * macs(tiny_dit) and m["macs_after"] == macs(pruned) and m["budget"] == "macs"
    expected = {"linear_identity": torch.nn.Identity, "linear_lowrank": LowRankLinear, "linear_remove": LinearBias}
    for r in m["removed"]:
        assert isinstance(_inner(pruned).get_submodule(r["name"]), expected[r["kind"]]), r
    assert len({r["name"] for r in m["removed"]}) == len(m["removed"])  # one stand-in per layer
    inputs = tiny_dit.example_inputs(2)
    again = _reload(pruned, tmp_path / "a")
    assert torch.equal(_forward(again, inputs), _forward(pruned, inputs))
    assert _onnx_roundtrip(pruned, inputs) < 1e-3


def test_predicted_latency_saving_uses_measured_layers() -> None:
    from edgediff.passes.prune_ld import predicted_saving_ms

    layers = [{"name": "a.conv1", "ms": 2.0, "macs": 100}, {"name": "a.conv2", "ms": 1.0, "macs": 100},
              {"name": "a", "ms": 0.5, "macs": 0}, {"name": "b", "ms": 4.0, "macs": 400}]
    assert predicted_saving_ms("a", 200, layers) == pytest.approx(3.5)  # everything under a, all of its MACs
    assert predicted_saving_ms("a.conv1", 50, layers) == pytest.approx(1.0)  # half of conv1's MACs
    # fused into its ancestor's node (no layer of its own): the ancestor's ms per MAC
    assert predicted_saving_ms("b.conv", 100, layers) == pytest.approx(1.0)
    assert predicted_saving_ms("c", 100, layers) == 0.0


def test_prune_ld_latency_budget_is_measured(tiny_unet) -> None:
    # whole blocks: a tiny model's latency is per-op overhead, which only removing ops reduces
    pruned, m = _run("prune.ld", tiny_unet, include="all", budget="latency", latency_reduction=0.15, samples=3,
                     steps=2, latency_repeats=10)
    assert m["budget"] == "latency" and m["removed"]
    # one measurement before and one after every round; the last one is what the budget is checked on
    assert len(m["latency_measured_ms"]) == m["rounds"] + 1
    assert m["latency_ms_after"] == pytest.approx(m["latency_measured_ms"][-1], abs=1e-3)
    assert m["latency_met"] == (m["latency_ms_after"] <= 0.85 * m["latency_ms_before"] + 1e-4)
    assert all(r["predicted_ms_saved"] >= 0 for r in m["removed"]) and any(r["predicted_ms_saved"] > 0
                                                                           for r in m["removed"])
    assert m["macs_after"] == macs(pruned) < macs(tiny_unet)
    for bad in ({"budget": "time"}, {"latency_reduction": 1.0}, {"linear_ops": "identity,svd"},
                {"lowrank_ratio": 0}):
        with pytest.raises(BadInput, match=next(iter(bad))):
            make_options("prune.ld", bad)


def test_ld_score_is_mean_shift_plus_spread_shift() -> None:
    from edgediff.passes.prune_ld import ld_score

    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert ld_score(z, z) == 0
    assert ld_score(z + 1.0, z) == pytest.approx(4.0, rel=1e-5)  # ||1||_2 over 16 elements
    expected = float(torch.linalg.vector_norm(z.mean(0)) + torch.linalg.vector_norm(z.std(0)))
    assert ld_score(2 * z, z) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_options_and_models_are_bad_input(tiny_unet, tiny_dit) -> None:
    for ratio in (0, 1, 1.5, -0.2):
        with pytest.raises(BadInput, match="ratio"):
            make_options("prune.diff", {"ratio": ratio})
    with pytest.raises(BadInput, match="importance"):
        make_options("prune.diff", {"importance": "vibes"})
    for budget in (0, 1.0, 2):
        with pytest.raises(BadInput, match="macs_reduction"):
            make_options("prune.ld", {"macs_reduction": budget})
    # a model that is not a diffusers denoiser has no prunable layers we can rewrite
    plain = DiffusionModel(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1)), tiny_unet.schedule,
                           tiny_unet.signature, arch="module")
    for name in ("prune.diff", "prune.ld"):
        with pytest.raises(BadInput, match="diffusers denoiser"):
            _run(name, plain)
    # budgets that cannot be met
    with pytest.raises(BadInput, match="cannot be met"):
        _run("prune.ld", tiny_dit, macs_reduction=0.95, samples=2, steps=1)
    with pytest.raises(BadInput, match="cannot be met"):
        _run("prune.diff", tiny_dit, importance="magnitude", macs_reduction=0.9)


def test_model_without_removable_operators_is_bad_input(tiny_unet) -> None:
    with pytest.raises(BadInput, match="no removable operator"):
        _run("prune.ld", tiny_unet, include="transformer", samples=2, steps=1)


def test_cli_exit_2_for_bad_ratio(tmp_path: Path, tiny_unet, capsys) -> None:
    from edgediff.cli import main

    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "bad"\n[[pass]]\nname = "prune.diff"\nratio = 1.5\n')
    tiny_unet.denoiser.save_pretrained(tmp_path / "in")
    rc = main(["compress", str(tmp_path / "in"), "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ratio=1.5" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- pipeline + info


def test_recipe_prune_then_finetune_artifact_and_info(tmp_path: Path, tiny_unet, capsys) -> None:
    from edgediff.cli import main
    from edgediff.pipeline import compress
    from edgediff.recipe import parse

    recipe = parse('name = "t"\n[[pass]]\nname = "prune.diff"\nratio = 0.4\nimportance = "magnitude"\n'
                   '[[pass]]\nname = "finetune"\nsteps = 3\nbatch_size = 4\ndata = "samples"\ndata_pool = 4\n', "t.toml")
    result, manifest = compress(tiny_unet, recipe, tmp_path / "art")
    assert manifest["metrics"]["after"]["macs"] < manifest["metrics"]["before"]["macs"]
    assert manifest["passes"][1]["metrics"]["distilled"] is True  # the unpruned input is the teacher
    assert main(["info", str(tmp_path / "art"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == params(result.module()) and info["macs"] == macs(result)
    assert info["after"]["macs"] == info["macs"] < info["before"]["macs"] == macs(tiny_unet)
    assert info["after"]["params"] < info["before"]["params"]


# ------------------------------------------------------------------------------------------- finetune


def test_finetune_trains_and_resumes_exactly(tiny_unet, tmp_path: Path) -> None:
    pruned, _ = _run("prune.diff", tiny_unet, ratio=0.4, importance="magnitude")
    opts = dict(batch_size=4, data="samples", data_pool=4, checkpoint_every=2, lr=1e-3)
    full, mf = _run("finetune", pruned, original=tiny_unet, steps=4, **opts)
    ck = str(tmp_path / "ck")
    _run("finetune", pruned, original=tiny_unet, steps=2, checkpoint_dir=ck, **opts)
    assert (tmp_path / "ck" / "finetune.safetensors").is_file()
    resumed, mr = _run("finetune", pruned, original=tiny_unet, steps=4, checkpoint_dir=ck, **opts)
    assert mr["resumed_from"] == 2 and mf["resumed_from"] == 0
    changed = any(not torch.equal(a, b) for a, b in zip(full.denoiser.parameters(), pruned.denoiser.parameters()))
    assert changed
    for a, b in zip(full.denoiser.parameters(), resumed.denoiser.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(BadInput, match="another model"):
        _run("finetune", tiny_unet, steps=3, checkpoint_dir=ck, **opts)


def test_finetune_ddp_two_cpu_processes_gloo(tiny_unet, tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 -m edgediff.passes.finetune, for real, on gloo."""
    write_artifact(tiny_unet, tmp_path / "in", {})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgediff.passes.finetune", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
           "--steps", "2", "--batch-size", "4", "--data", "samples", "--data-pool", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["world_size"] == 2 and report["steps"] == 2
    out = load_artifact(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["passes"][-1]["name"] == "finetune"
    assert any(not torch.equal(a, b) for a, b in zip(out.denoiser.parameters(), tiny_unet.denoiser.parameters()))


# ------------------------------------------------------------------------------------------- selection rule


class _FixedScores:
    """A Torch-Pruning importance with fixed pseudo-random scores per root channel."""

    def __call__(self, group) -> torch.Tensor:
        n = len(group[0][1])
        return torch.rand(n, generator=torch.Generator().manual_seed(n))


def _kept_conv_in_channels(model: DiffusionModel, selection: str) -> tuple[list[int], int, int]:
    from edgediff.passes.prune_diff import prune_structure

    m = model.clone()
    conv = m.denoiser.inner.conv_in if hasattr(m.denoiser, "inner") else m.denoiser.conv_in
    with torch.no_grad():
        conv.bias.copy_(torch.arange(conv.out_channels, dtype=torch.float32))  # tags the channels
    c = conv.out_channels
    prune_structure(m, 0.25, _FixedScores(), selection)
    conv = m.denoiser.inner.conv_in if hasattr(m.denoiser, "inner") else m.denoiser.conv_in
    return [int(v) for v in conv.bias.round().tolist()], c, 8


def test_per_group_selection_drops_each_groups_own_lowest(tiny_unet) -> None:
    """Each GroupNorm group loses its own lowest-scoring channels (Diff-Pruning's code); tied
    selection (Torch-Pruning's) removes the same positions from every group."""
    kept, c, groups = _kept_conv_in_channels(tiny_unet, "per_group")
    size = c // groups
    scores = torch.rand(c, generator=torch.Generator().manual_seed(c)).view(groups, size)
    expect = [g * size + int(j) for g in range(groups) for j in sorted(scores[g].argsort(descending=True)[:size - 1])]
    assert kept == expect
    tied, _, _ = _kept_conv_in_channels(tiny_unet, "tied")
    positions = {tuple(v % size for v in tied[g * (size - 1):(g + 1) * (size - 1)]) for g in range(groups)}
    assert len(positions) == 1  # the same positions in every group
    assert len({tuple(v % size for v in kept[g * (size - 1):(g + 1) * (size - 1)]) for g in range(groups)}) > 1


def test_taylor_score_is_torch_pruning_taylor_and_squared_differs(tiny_unet) -> None:
    import torch_pruning as tp

    from edgediff.passes.prune_diff import TaylorScore, _build_pruner

    m = tiny_unet.clone()
    mod = m.module()
    for p in mod.parameters():
        p.requires_grad_(True)
    mod(**m.example_inputs(2)).pow(2).mean().backward()
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    pruner = _build_pruner(m, 0.25, TaylorScore())
    groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                           root_module_types=pruner.root_module_types))
    ref = tp.importance.TaylorImportance(multivariable=False)
    checked = 0
    for g in groups[:6]:
        a, b = TaylorScore()(g), ref(g)
        if a is None or b is None:
            continue
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        sq = TaylorScore(squared=True)(g)
        assert sq.shape == a.shape and not torch.allclose(sq, a)
        checked += 1
    assert checked >= 3
    # the weights are restored after scoring
    assert all(torch.equal(before[k], v) for k, v in mod.state_dict().items())


def test_diff_threshold_is_checked_before_backprop(tiny_unet, monkeypatch) -> None:
    """The step whose loss falls below the threshold is not accumulated; taylor walks every step."""
    from edgediff.passes import prune_diff

    real = prune_diff.denoising_loss
    # an untrained model's loss is flat in t: damp it so that the walk has somewhere to stop
    monkeypatch.setattr(prune_diff, "denoising_loss",
                        lambda model, module, x0, cond, t, noise: real(model, module, x0, cond, t, noise)
                        / (1 + float(t[0]) / 50))
    common = dict(ratio=0.25, t_stride=50, batch_size=4, data="samples", sample_steps=2)
    _, md = _run("prune.diff", tiny_unet, importance="diff", threshold=0.3, **common)
    assert md["stopped_by_threshold"] and md["stopped_at_t"] > md["last_t"]
    assert md["timesteps_used"] == md["stopped_at_t"] // 50
    assert md["loss_last"] >= 0.3 * md["loss_max"]
    _, mt = _run("prune.diff", tiny_unet, importance="taylor", score="squared", **common)
    assert mt["timesteps_used"] == len(range(0, tiny_unet.schedule.num_train_timesteps, 50))
    assert mt["score"] == "squared" and mt["selection"] == "per_group"
    with pytest.raises(BadInput, match="selection"):
        make_options("prune.diff", {"selection": "shared"})


def test_finetune_on_teacher_trajectories(tiny_unet) -> None:
    """A share of each batch is x_t from the teacher's DDIM trajectories with the teacher's output."""
    from edgediff.passes.finetune import teacher_trajectories

    traj = teacher_trajectories(tiny_unet, 3, 4, seed=0)
    assert traj["x"].shape == (12, 1, 16, 16) and traj["out"].shape == (12, 1, 16, 16)
    assert sorted(set(traj["t"].tolist())) == sorted(set(traj["t"].tolist()))[:4] and len(set(traj["t"].tolist())) == 4
    with torch.no_grad():
        again = tiny_unet.module()(traj["x"][:3], traj["t"][:3].float())
    assert torch.allclose(again, traj["out"][:3], atol=1e-5)  # targets are the teacher's outputs there
    pruned, _ = _run("prune.diff", tiny_unet, ratio=0.4, importance="magnitude")
    opts = dict(steps=3, batch_size=4, data="samples", data_pool=4, lr=1e-3)
    a, ma = _run("finetune", pruned, original=tiny_unet, trajectories=3, trajectory_steps=4, **opts)
    b, mb = _run("finetune", pruned, original=tiny_unet, **opts)
    assert ma["trajectory_points"] == 12 and mb["trajectory_points"] == 0
    assert any(not torch.equal(x, y) for x, y in zip(a.denoiser.parameters(), b.denoiser.parameters()))
    with pytest.raises(BadInput, match="trajectory_share"):
        make_options("finetune", {"trajectory_share": 0.0})
