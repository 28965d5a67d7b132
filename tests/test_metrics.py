"""Pixel metrics against closed forms, an independent direct computation and scikit-image's SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

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
    # float32: a variance that should be 0 comes out ~1e-8, which is ~1e-5 next to C2 = 9e-4
    assert metrics.ssim(a, b).item() == pytest.approx(expected, abs=5e-5)


def direct_ssim(pa: torch.Tensor, pb: torch.Tensor) -> float:
    """SSIM of one window (a square patch) straight from the definition, in float64."""
    n = pa.shape[-1]
    x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    pa, pb = pa.double(), pb.double()
    mx, my = (w * pa).sum(), (w * pb).sum()
    vx, vy = (w * (pa - mx) ** 2).sum(), (w * (pb - my) ** 2).sum()
    cov = (w * (pa - mx) * (pb - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).item()


def test_ssim_map_matches_a_direct_windowed_computation():
    a, b = rand(1, 1, 1, 21, 21, seed=3), rand(1, 1, 1, 21, 21, seed=4)
    b = 0.5 * a + 0.5 * b  # correlated, so every term matters
    m = metrics.ssim_map(a, b)
    assert m.shape == (1, 1, 1, 11, 11)  # valid interior only: no padding
    # map pixel (5, 5) is the window centred on input pixel (10, 10)
    assert m[0, 0, 0, 5, 5].item() == pytest.approx(direct_ssim(a[0, 0, 0, 5:16, 5:16], b[0, 0, 0, 5:16, 5:16]), abs=1e-6)


def test_frames_smaller_than_the_window_use_the_largest_odd_window_that_fits():
    a, b = rand(1, 1, 1, 8, 9, seed=3), rand(1, 1, 1, 8, 9, seed=4)
    m = metrics.ssim_map(a, b)
    assert m.shape == (1, 1, 1, 2, 3)  # a 7x7 window
    assert m[0, 0, 0, 1, 2].item() == pytest.approx(direct_ssim(a[0, 0, 0, 1:8, 2:9], b[0, 0, 0, 1:8, 2:9]), abs=1e-6)
    assert metrics.ssim(a, b).item() == pytest.approx(m.mean().item())


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


def sk_ssim_map(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """scikit-image's SSIM map of one (C, H, W) frame pair as Wang et al. define it, (H, W, C)."""
    _, s = structural_similarity(
        a.permute(1, 2, 0).double().numpy(),
        b.permute(1, 2, 0).double().numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
        full=True,
    )
    return s


def structured(h: int, w: int, seed: int) -> torch.Tensor:
    """(3, H, W): gradients, a sinusoid, hard-edged blocks and a disc, so flat, smooth and sharp regions all occur."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    blocks = ((x * 4).floor() + (y * 3).floor()) % 2
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).float()
    base = [0.3 + 0.4 * x, 0.5 + 0.3 * torch.sin(12 * x + 7 * y), 0.2 + 0.5 * blocks + 0.2 * disc]
    return (torch.stack(base) + 0.02 * torch.randn(3, h, w, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("size", [(32, 32), (45, 70), (64, 48), (11, 11)])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_scikit_image(size, kind):
    h, w = size
    if kind == "random":
        a = rand(2, 2, 3, h, w, seed=20)
        b = (0.6 * a + 0.4 * rand(2, 2, 3, h, w, seed=21)).clamp(0, 1)
    else:
        a = torch.stack([torch.stack([structured(h, w, seed=s + t) for t in range(2)]) for s in (0, 5)])
        b = (0.9 * a.roll(1, dims=-1) + 0.05).clamp(0, 1)  # shifted and toned: every SSIM term moves
    # skimage averages the map over the interior it leaves after cropping (win - 1) / 2 = 5 pixels
    expected = [np.mean([sk_ssim_map(a[i, t], b[i, t])[5:-5, 5:-5].mean() for t in range(2)]) for i in range(2)]
    assert metrics.ssim(a, b).tolist() == pytest.approx(expected, abs=1e-4)
    assert metrics.ssim_map(a, b)[1, 1].permute(1, 2, 0).numpy() == pytest.approx(sk_ssim_map(a[1, 1], b[1, 1])[5:-5, 5:-5], abs=1e-4)


def test_masked_ssim_is_the_map_of_the_copied_frame_averaged_over_the_cropped_mask():
    a = torch.stack([structured(40, 56, seed=1), structured(40, 56, seed=2)])[None]  # (1, 2, 3, 40, 56)
    b = (a + 0.1 * rand(1, 2, 3, 40, 56, seed=22)).clamp(0, 1)
    mask = torch.zeros(1, 2, 1, 40, 56, dtype=torch.bool)
    mask[0, 0, :, 3:20, 10:50] = True  # reaches into the 5-pixel border the map does not cover
    mask[0, 1, :, 25:38, 2:30] = True
    copied = torch.where(mask, a, b)  # outside the region the edit is replaced by the reference
    maps = [sk_ssim_map(copied[0, t], b[0, t])[5:-5, 5:-5] for t in range(2)]  # (H-10, W-10, C) each
    inner = [mask[0, t, 0, 5:-5, 5:-5].numpy() for t in range(2)]
    total = sum(m[r].sum() for m, r in zip(maps, inner))
    count = sum(r.sum() for r in inner) * 3
    assert metrics.ssim(a, b, mask).item() == pytest.approx(total / count, abs=1e-4)
    # a region that lies entirely in the uncovered border has no SSIM
    border = torch.zeros_like(mask)
    border[..., :5, :] = True
    assert math.isnan(metrics.ssim(a, b, border).item())


def test_psnr_pools_the_error_over_the_clip_before_the_log():
    a = rand(1, 2, 3, 8, 8, seed=23) * 0.8
    b = a.clone()
    b[:, 1] += 0.1  # frame 0 perfect (per-frame PSNR: max), frame 1 at 20 dB
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)  # 23.01 dB, not (100 + 20) / 2


def test_fidelity_and_preservation_compute_only_the_metrics_asked_for(monkeypatch):
    source = rand(2, 3, 3, 16, 16, seed=24)
    target = rand(2, 3, 3, 16, 16, seed=25)
    mask = rand(2, 3, 1, 16, 16, seed=26) > 0.5
    both = metrics.fidelity(source, target, mask)
    assert set(both) == {"psnr", "ssim"}

    def no_ssim(*args, **kwargs):
        raise AssertionError("SSIM computed but not asked for")

    monkeypatch.setattr(metrics, "ssim_map", no_ssim)
    fid = metrics.fidelity(source, target, mask, metrics=("psnr",))
    assert list(fid) == ["psnr"] and torch.equal(fid["psnr"], both["psnr"])
    assert list(metrics.preservation(source, target, mask, metrics=["psnr"])) == ["psnr"]
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.fidelity(source, target, mask, metrics=("lpips",))
    with pytest.raises(ValueError, match="needs the edit mask"):
        metrics.preservation(source, target, None)  # type: ignore[arg-type]


def test_metrics_follow_the_inputs_dtype_and_device():
    a, b = rand(2, 3, 3, 16, 20, seed=27), rand(2, 3, 3, 16, 20, seed=28)
    mask = rand(2, 3, 1, 16, 20, seed=29) > 0.5
    ref = {**metrics.fidelity(a, b, mask), "temporal": metrics.temporal_consistency(a, b)}
    assert all(v.dtype == torch.float32 for v in ref.values())
    # half precision in, float32 maths and scores out
    half = {**metrics.fidelity(a.bfloat16(), b.bfloat16(), mask), "temporal": metrics.temporal_consistency(a.bfloat16(), b.bfloat16())}
    rounded = {**metrics.fidelity(a.bfloat16().float(), b.bfloat16().float(), mask)}
    assert all(v.dtype == torch.float32 for v in half.values())
    assert torch.equal(half["psnr"], rounded["psnr"]) and torch.equal(half["ssim"], rounded["ssim"])
    # the meta device has no data: any host sync (.item(), bool(tensor)) or tensor made on the CPU fails there
    meta = [t.to("meta") for t in (a, b, mask)]
    on_meta = [
        *metrics.fidelity(*meta).values(),
        *metrics.preservation(*meta).values(),
        metrics.temporal_consistency(meta[0], meta[1]),
        metrics.temporal_consistency(meta[0]),
        metrics.temporal_consistency(meta[0][:, :1]),
    ]
    assert all(v.device.type == "meta" and v.shape == (2,) for v in on_meta)
