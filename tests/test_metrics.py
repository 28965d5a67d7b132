"""Pixel metrics against closed forms and an independent direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from editrl import metrics


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_closed_form_and_identity():
    a = rand(2, 3, 3, 16, 16) * 0.8
    b = a + 0.1  # mse = 0.01 exactly (up to float rounding) -> 20 dB
    assert torch.allclose(metrics.psnr(a, b), torch.tensor([20.0, 20.0]), atol=1e-3)
    assert torch.equal(metrics.psnr(a, a), torch.full((2,), metrics.MAX_PSNR_DB))
    assert torch.allclose(metrics.psnr(a, b, data_range=2.0), torch.tensor([20 + 20 * math.log10(2)] * 2), atol=1e-3)


def test_masked_psnr_sees_only_its_region_and_empty_region_is_nan():
    a = rand(1, 2, 3, 8, 8)
    mask = torch.zeros(1, 2, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :] = True
    b = a.clone()
    b[..., 4:, :] += 0.5  # change outside the mask only
    assert metrics.psnr(a, b, mask).item() == metrics.MAX_PSNR_DB
    b[..., :4, :] = a[..., :4, :] + 0.2  # now inside too: mse inside = 0.04 -> 13.98 dB
    assert metrics.psnr(a, b, mask).item() == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-3)
    empty = torch.zeros_like(mask)
    assert math.isnan(metrics.psnr(a, b, empty).item())
    assert math.isnan(metrics.ssim(a, b, empty).item())


def test_ssim_identity_is_exactly_one_and_symmetric():
    a, b = rand(2, 2, 3, 24, 24, seed=1), rand(2, 2, 3, 24, 24, seed=2)
    assert torch.equal(metrics.ssim(a, a), torch.ones(2))
    assert torch.allclose(metrics.ssim(a, b), metrics.ssim(b, a))
    assert (metrics.ssim(a, b) < 0.2).all()


def test_ssim_of_constant_frames_is_the_luminance_formula():
    a = torch.full((1, 1, 3, 16, 16), 0.3)
    b = torch.full((1, 1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1)
    assert metrics.ssim(a, b).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_map_matches_a_direct_windowed_computation():
    a, b = rand(1, 1, 1, 21, 21, seed=3), rand(1, 1, 1, 21, 21, seed=4)
    b = 0.5 * a + 0.5 * b  # correlated, so every term matters
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    pa, pb = a[0, 0, 0, 5:16, 5:16].double(), b[0, 0, 0, 5:16, 5:16].double()  # the window centred on (10, 10)
    mx, my = (w * pa).sum(), (w * pb).sum()
    vx, vy = (w * (pa - mx) ** 2).sum(), (w * (pb - my) ** 2).sum()
    cov = (w * (pa - mx) * (pb - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    direct = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim_map(a, b)[0, 0, 0, 10, 10].item() == pytest.approx(direct.item(), abs=1e-6)


def test_ssim_falls_as_noise_grows():
    a = rand(1, 2, 3, 32, 32, seed=5)
    noise = rand(1, 2, 3, 32, 32, seed=6) - 0.5
    values = [metrics.ssim(a, (a + k * noise).clamp(0, 1)).item() for k in (0.05, 0.2, 0.5)]
    assert values[0] > values[1] > values[2]


def test_batch_rows_are_independent():
    a, b = rand(3, 2, 3, 16, 16, seed=7), rand(3, 2, 3, 16, 16, seed=8)
    mask = rand(3, 2, 1, 16, 16, seed=9) > 0.5
    for fn in (metrics.psnr, metrics.ssim):
        batched = fn(a, b, mask)
        single = torch.cat([fn(a[i : i + 1], b[i : i + 1], mask[i : i + 1]) for i in range(3)])
        assert torch.allclose(batched, single)


def test_masked_ssim_ignores_changes_outside_its_region():
    a = rand(1, 2, 3, 32, 32, seed=10)
    mask = torch.zeros(1, 2, 1, 32, 32, dtype=torch.bool)
    mask[..., 8:24, 8:24] = True
    b = a.clone()
    b[..., :, :4] = 1 - b[..., :, :4]  # edit far outside and right at the mask's border
    b[..., 7, 8:24] = 0.0
    assert metrics.ssim(b, a, mask).item() == 1.0
    assert metrics.ssim(b, a, ~mask).item() < 0.9


def test_fidelity_and_preservation_of_trivial_edits():
    source = rand(2, 3, 3, 16, 16, seed=11)
    mask = torch.zeros(2, 3, 1, 16, 16, dtype=torch.bool)
    mask[..., 4:10, 4:10] = True
    target = torch.where(mask, 1 - source, source)
    for scores in (metrics.fidelity(target, target, mask), metrics.preservation(target, source, mask)):
        assert torch.equal(scores["psnr"], torch.full((2,), metrics.MAX_PSNR_DB))
        assert torch.equal(scores["ssim"], torch.ones(2))
    lazy_fid = metrics.fidelity(source, target, mask)
    lazy_pres = metrics.preservation(source, source, mask)
    assert (lazy_fid["psnr"] < 20).all() and (lazy_fid["ssim"] < 0.9).all()
    assert torch.equal(lazy_pres["psnr"], torch.full((2,), metrics.MAX_PSNR_DB))
    whole = torch.ones_like(mask)
    assert torch.isnan(metrics.preservation(source, source, whole)["psnr"]).all()


def test_temporal_consistency_closed_forms():
    static = rand(2, 1, 3, 8, 8, seed=12).expand(2, 5, 3, 8, 8)
    assert torch.equal(metrics.temporal_consistency(static), torch.ones(2))
    ramp = torch.linspace(0, 0.4, 5).view(1, 5, 1, 1, 1).expand(1, 5, 3, 8, 8)  # +0.1 per frame
    assert metrics.temporal_consistency(ramp).item() == pytest.approx(0.9, abs=1e-6)
    assert metrics.temporal_consistency(ramp, reference=ramp).item() == 1.0
    assert metrics.temporal_consistency(ramp, reference=static[:1]).item() == pytest.approx(0.9, abs=1e-6)
    assert torch.isnan(metrics.temporal_consistency(static[:, :1])).all()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        metrics.psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.ssim(torch.rand(1, 2, 3, 8, 8), torch.rand(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="mask must be"):
        metrics.psnr(torch.rand(1, 2, 3, 8, 8), torch.rand(1, 2, 3, 8, 8), torch.ones(1, 2, 3, 8, 8, dtype=torch.bool))
