"""The fuse pass: same outputs (float tolerance), fewer ONNX nodes, saves and reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgediff import passes
from edgediff.artifact import load_artifact, write_artifact
from edgediff.fused import FoldedTimesteps, PackedAttnProcessor, PackedAway
from edgediff.passes import PassContext
from edgediff.pipeline import onnx_nodes
from edgediff.sampling import TorchDenoiser
from edgediff.testing import minmax_quantize


def _run(model, **opts):
    run, options = passes.get("fuse")
    ctx = PassContext(graph_nodes=onnx_nodes)
    return run(model.clone(), options(**opts), ctx), ctx.metrics


def _out(model, seed: int = 3) -> torch.Tensor:
    inp = model.signature.example_inputs(2, seed=seed)
    return TorchDenoiser(model)(inp["sample"], inp["timestep"], inp.get("encoder_hidden_states", inp.get("class_labels")))


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_cond_unet", "tiny_dit"])
def test_fuse_keeps_results_and_reloads(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(fixture)
    fused, m = _run(model, count_ops=False)
    assert m["qkv_packed"] > 0 and m["timesteps_folded"] > 0 and m["dropout_dropped"] > 0
    assert m["max_abs_diff"] <= 1e-5
    assert torch.allclose(_out(fused), _out(model), atol=1e-5)
    mods = list(fused.denoiser.modules())
    assert any(isinstance(x, PackedAttnProcessor) for x in mods) and any(isinstance(x, FoldedTimesteps) for x in mods)
    assert not any(isinstance(x, torch.nn.Dropout) for x in mods)
    # the input model is untouched
    assert not any(isinstance(x, (PackedAway, FoldedTimesteps)) for x in model.denoiser.modules())
    write_artifact(fused, tmp_path / "a", {})
    back = load_artifact(tmp_path / "a")
    assert any(isinstance(x, PackedAttnProcessor) for x in back.denoiser.modules())
    assert torch.equal(_out(back), _out(fused))


def test_fuse_counts_onnx_nodes(tiny_unet) -> None:
    _, m = _run(tiny_unet)
    assert m["onnx_nodes_after"] < m["onnx_nodes_before"]
    assert m["ops_removed"] == m["onnx_nodes_before"] - m["onnx_nodes_after"] > 0


def test_groupnorm_silu_marks_survive_saving(tiny_unet, tmp_path: Path) -> None:
    fused, m = _run(tiny_unet, count_ops=False, pack_qkv=False)
    marked = [n for n, x in fused.denoiser.named_modules() if getattr(x, "edgediff_silu_after", False)]
    assert "conv_norm_out" in marked and "down_blocks.0.resnets.0.norm1" in marked and len(marked) == m["groupnorm_silu_marked"]
    assert not any(isinstance(x, PackedAway) for x in fused.denoiser.modules())  # pack_qkv=False keeps to_q/k/v
    write_artifact(fused, tmp_path / "a", {})
    back = load_artifact(tmp_path / "a")
    assert [n for n, x in back.denoiser.named_modules() if getattr(x, "edgediff_silu_after", False)] == marked


def test_output_scale_factor_is_folded(tiny_unet) -> None:
    model = tiny_unet.clone()
    block = model.denoiser.down_blocks[1].resnets[0]
    assert block.conv_shortcut is not None
    block.output_scale_factor = 2.0
    fused, m = _run(model, count_ops=False)
    assert m["scales_folded"] == 1 and fused.denoiser.down_blocks[1].resnets[0].output_scale_factor == 1.0
    assert torch.allclose(_out(fused), _out(model), atol=1e-5)


def test_quantized_model_keeps_its_grid(tiny_unet) -> None:
    q = minmax_quantize(tiny_unet)
    q.denoiser.down_blocks[1].resnets[0].output_scale_factor = 2.0
    fused, m = _run(q, count_ops=False)
    assert m["quantized_input"] and m["qkv_packed"] == 0 and m["scales_folded"] == 0
    assert torch.equal(_out(fused), _out(q))


def test_packed_projection_fails_loudly_if_called(tiny_unet) -> None:
    fused, _ = _run(tiny_unet, count_ops=False)
    attn = fused.denoiser.down_blocks[1].attentions[0]
    with pytest.raises(RuntimeError, match="packed into `to_qkv`"):
        attn.to_q(torch.zeros(1, 32))
