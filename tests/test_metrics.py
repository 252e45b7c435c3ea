"""Metrics: exact on known cases, and the digit judge separates real digits from noise."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgediff import metrics
from edgediff.demo.judge import DigitJudge, held_out_digits
from edgediff.metrics import frechet_distance, psnr
from edgediff.model import DiffusionModel, InputSignature
from edgediff.schedule import NoiseSchedule


class _ConvLinearAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
        h = self.conv(sample)  # (B,8,H,W)
        seq = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        q = self.lin(seq)
        att = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # 3-D: the math kernel
        heads = q.view(q.shape[0], q.shape[1], 2, 4).transpose(1, 2)  # 4-D (B, heads, S, D) as diffusers calls it
        att4 = torch.nn.functional.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).reshape_as(att)
        return (att + att4).transpose(1, 2).reshape_as(h)


def test_macs_count_conv_linear_and_attention() -> None:
    m = DiffusionModel(_ConvLinearAttn(), NoiseSchedule.from_config({}), InputSignature((3, 4, 5)))
    hw = 4 * 5
    conv = 8 * 3 * 9 * hw
    lin = hw * 8 * 8
    attn = 2 * (2 * hw * hw * 8)  # QK^T and softmax.V, once as 3-D and once as 2 heads of 4
    assert metrics.macs(m) == conv + lin + attn
    assert metrics.params(m.denoiser) == 8 * 3 * 9 + 8 + 8 * 8 + 8
    assert metrics.size_bytes(m.denoiser) == 4 * metrics.params(m.denoiser)


def test_psnr_known_values() -> None:
    ref = torch.zeros(2, 1, 4, 4)
    assert psnr(ref, ref) == float("inf")
    x = ref + 0.02  # mse 4e-4, range 2 -> 10*log10(4/4e-4) = 40 dB
    assert abs(psnr(x, ref) - 40.0) < 1e-5  # 0.02 is not exact in float32


def test_frechet_distance_is_a_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    assert frechet_distance(a, a) < 1e-6
    b = a + np.array([3.0, 0, 0, 0])
    assert abs(frechet_distance(a, b) - 9.0) < 1e-6  # same covariance: squared mean shift
    c = a * 2.0
    assert frechet_distance(a, c) > 1.0


def test_digit_judge_separates_real_digits_from_noise() -> None:
    judge = DigitJudge()
    real = held_out_digits()
    half = len(real) // 2
    noise = torch.rand_like(real[:half]) * 2 - 1
    shuffled = real[:half].flatten(1)[:, torch.randperm(real[0].numel(), generator=torch.Generator().manual_seed(0))]
    shuffled = shuffled.view_as(real[:half])
    assert judge.confidence_share(real) > 0.85
    assert judge.confidence_share(noise) < judge.confidence_share(real) - 0.3
    fd_real = judge.frechet(real[:half], real[half:])
    assert fd_real * 5 < judge.frechet(shuffled, real[half:])
    assert fd_real * 5 < judge.frechet(noise, real[half:])


def test_grid_png_is_a_png() -> None:
    png = metrics.grid_png(torch.rand(10, 1, 16, 16) * 2 - 1, nrow=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
