"""TFLite export carries every input of a multi-input denoiser's signature (SDXL text_embeds/time_ids
through added_cond_kwargs, SD3 pooled_projections) and the LiteRT runtime feeds them: export +
verify (fp32, 2 steps x 2 samples) exit 0 with the .tflite's inputs exactly the signature's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_models import MODELS, _save

from edgediff.cli import main
from edgediff.errors import BadInput


# sd3 converts in ~20 s, the SDXL-style UNet in ~35 s (loaded 16-core box)
@pytest.mark.parametrize("key", ["sd3", "sdxl"])
def test_tflite_export_and_verify_carry_extra_inputs(tmp_path: Path, key: str, capsys) -> None:
    d = _save(tmp_path, key)
    args = MODELS[key][2]
    out = tmp_path / "m.tflite"
    assert main(["export", str(d), "--target", "tflite", "-o", str(out), *args]) == 0, capsys.readouterr().err[-500:]
    capsys.readouterr()
    from edgediff.exporters.tflite import BACKEND, tflite_info

    assert sorted(tflite_info(out)["inputs"]) == sorted(MODELS[key][3])  # every input carried, no more
    assert main(["verify", str(d), str(out), "--steps", "2", "--samples", "2", "--json", *args]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] and res["psnr_db"] > 60
    den = BACKEND.load_denoiser(out)
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 500.0)
    ex = {k: v for k, v in den.inputs.items() if k not in ("sample", "timestep")}
    cond = {k: torch.randn(3, *[int(s) for s in v["shape"][1:]]) for k, v in ex.items()}
    assert den(x, t, cond).shape == (3, 4, 8, 8)  # batch 3 on a batch-1 file: chunked and padded
    extra = sorted(set(ex) - {"encoder_hidden_states"})
    with pytest.raises(BadInput, match=extra[0]):
        den(x, t, {k: v for k, v in cond.items() if k != extra[0]})
    with pytest.raises(BadInput, match=extra[0]):
        den(x, t, cond["encoder_hidden_states"])  # a bare tensor cannot carry the extras
