"""Pixel and oracle rewards against closed forms (known MSE -> known PSNR, identical regions -> SSIM 1)."""

from __future__ import annotations

import pytest
import torch

from editrl.reward import RewardSet, build_reward
from editrl.types import RewardBatch


def videos(b: int = 2, t: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5


def box_mask(t: int = 3, size: int = 16) -> torch.Tensor:
    """(T, 1, H, W): the top-left quarter may change."""
    m = torch.zeros(t, 1, size, size, dtype=torch.bool)
    m[..., : size // 2, : size // 2] = True
    return m


def edit_inside(source: torch.Tensor, mask: torch.Tensor, seed: int = 1) -> torch.Tensor:
    noise = torch.rand(source.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(mask.unsqueeze(0), noise, source)


def test_preservation_psnr_matches_the_closed_form():
    src = videos()
    reward = build_reward("pixel_preservation", {"metric": "psnr", "outside_mask": False})
    out = reward(RewardBatch(["x", "y"], edited=src + 0.1, sources=src))
    assert out.valid.all()
    assert out.scores.tolist() == pytest.approx([20.0, 20.0], abs=1e-3)  # MSE 0.01 -> 20 dB


def test_preservation_outside_the_mask_ignores_the_edit_inside():
    src = videos()
    mask = box_mask()
    edited = edit_inside(src, mask)
    b = RewardBatch(["x", "y"], edited=edited, sources=src, masks=[mask, None])
    inside_ignored = build_reward("pixel_preservation", {"metric": "ssim"})(b)
    everywhere = build_reward("pixel_preservation", {"metric": "ssim", "outside_mask": False})(b)
    assert inside_ignored.scores[0].item() == pytest.approx(1.0, abs=1e-6)
    # Without a mask the whole video counts, exactly as with outside_mask off.
    assert inside_ignored.scores[1].item() == pytest.approx(everywhere.scores[1].item(), abs=1e-6)
    assert everywhere.scores[0].item() < 0.9
    assert build_reward("pixel_preservation", {"outside_mask": False}).needs == {"source", "edited"}


def test_a_global_edit_has_nothing_to_preserve():
    src = videos(1)
    everything = torch.ones(3, 1, 16, 16, dtype=torch.bool)
    out = build_reward("pixel_preservation", {})(RewardBatch(["x"], edited=src.flip(-1), sources=src, masks=[everything]))
    assert not out.valid.any()


def test_mask_shape_mismatch_is_a_clear_error():
    src = videos(1)
    with pytest.raises(ValueError, match=r"mask 0 has shape \(3, 1, 8, 8\)"):
        build_reward("pixel_preservation", {})(RewardBatch(["x"], edited=src, sources=src, masks=[torch.ones(3, 1, 8, 8)]))


def test_temporal_consistency_closed_forms():
    still = torch.full((1, 4, 3, 8, 8), 0.3)
    flicker = torch.zeros(1, 4, 3, 8, 8)
    flicker[:, 1::2] = 1.0
    reward = build_reward("temporal_consistency", {})
    out = reward(RewardBatch(["a", "b"], edited=torch.cat([still, flicker])))
    assert out.scores.tolist() == pytest.approx([1.0, 0.0])
    # Relative to the source: copying a moving source exactly is perfectly consistent.
    moving = torch.linspace(0, 1, 4).view(1, 4, 1, 1, 1).expand(1, 4, 3, 8, 8).contiguous()
    relative = build_reward("temporal_consistency", {"reference": "source"})
    assert relative.needs == {"edited", "source"}
    assert relative(RewardBatch(["a"], edited=moving, sources=moving)).scores.item() == pytest.approx(1.0)
    assert reward(RewardBatch(["a"], edited=moving)).scores.item() == pytest.approx(1 - 1 / 3)


def test_single_frame_videos_have_no_temporal_score():
    out = build_reward("temporal_consistency", {})(RewardBatch(["a"], edited=torch.rand(1, 1, 3, 8, 8)))
    assert not out.valid.any()


def test_oracle_fidelity_looks_only_inside_the_mask():
    src, target = videos(seed=0), videos(seed=5)
    mask = box_mask()
    # Perfect inside the mask, wrong (the source) outside it.
    edited = torch.where(mask.unsqueeze(0), target, src)
    b = RewardBatch(["x", "y"], edited=edited, sources=src, targets=target, masks=[mask, mask])
    fid = build_reward("oracle_fidelity", {"metric": "psnr"})(b)
    assert fid.valid.all() and fid.scores.tolist() == pytest.approx([100.0, 100.0])
    pres = build_reward("oracle_preservation", {"metric": "ssim"})(b)
    assert pres.scores.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # Swap the roles: right outside, wrong inside.
    wrong = torch.where(mask.unsqueeze(0), src, target)
    b2 = RewardBatch(["x", "y"], edited=wrong, sources=target, targets=target, masks=[mask, mask])
    assert (build_reward("oracle_fidelity", {"metric": "psnr"})(b2).scores < 30).all()


def test_oracle_rewards_without_ground_truth_are_invalid_not_zero():
    src = videos()
    b = RewardBatch(["x", "y"], edited=src, sources=src, masks=[box_mask(), None])
    fid = build_reward("oracle_fidelity", {})(b)
    assert not fid.valid.any() and fid.extras["error"] == ["no target video"] * 2
    pres = build_reward("oracle_preservation", {})(b)
    assert pres.valid.tolist() == [True, False] and pres.extras["error"] == [None, "no edit mask"]


def test_reward_set_scores_pixel_rewards_together():
    src = videos()
    rs = RewardSet([("pres", 1.0, build_reward("pixel_preservation", {})), ("temp", 0.5, build_reward("temporal_consistency", {}))])
    assert rs.needs == {"source", "edited", "mask"}
    out = rs.score(RewardBatch(["x", "y"], edited=src, sources=src))
    assert out["pres"].scores.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


PSNR_REWARDS = [
    ("oracle_fidelity", {"metric": "psnr"}),
    ("oracle_preservation", {"metric": "psnr"}),
    ("pixel_preservation", {"metric": "psnr"}),
    ("temporal_consistency", {"reference": "source"}),
]
ALL_REWARDS = [*PSNR_REWARDS, ("oracle_fidelity", {"metric": "ssim"}), ("oracle_preservation", {"metric": "ssim"}), ("pixel_preservation", {})]


def full_batch(dtype: torch.dtype = torch.float32, device: str = "cpu", mask_device: str = "cpu") -> RewardBatch:
    src, target = videos(seed=0), videos(seed=5)
    mask = box_mask()
    edited = edit_inside(src, mask, seed=2)
    return RewardBatch(
        ["x", "y"],
        edited=edited.to(device, dtype),
        sources=src.to(device, dtype),
        targets=target.to(device, dtype),
        masks=[mask.to(mask_device), None],
    )


def test_a_psnr_reward_does_not_compute_ssim(monkeypatch):
    from editrl import metrics

    def no_ssim(*args, **kwargs):
        raise AssertionError("SSIM computed for a PSNR reward")

    monkeypatch.setattr(metrics, "ssim_map", no_ssim)
    for name, options in PSNR_REWARDS:
        assert build_reward(name, options)(full_batch()).scores.shape == (2,), name
    with pytest.raises(AssertionError, match="SSIM computed"):
        build_reward("oracle_fidelity", {"metric": "ssim"})(full_batch())


@pytest.mark.parametrize("name,options", ALL_REWARDS)
def test_rewards_score_on_the_batch_device_in_float32(name, options):
    reward = build_reward(name, options)
    ref = reward(full_batch())
    assert ref.scores.dtype == torch.float32 and ref.valid.any()
    # bfloat16 videos are scored in float32 maths: the same scores as their float32 copies
    half = full_batch(torch.bfloat16)
    upcast = RewardBatch(half.instructions, half.edited.float(), half.sources.float(), half.targets.float(), masks=half.masks)
    out, expected = reward(half), reward(upcast)
    assert out.scores.dtype == torch.float32
    assert torch.equal(out.valid, expected.valid) and torch.equal(out.scores[out.valid], expected.scores[expected.valid])
    # On the meta device (no data) any host sync or tensor made on the CPU fails: the scores stay where the
    # videos are, whether the masks are still on the host or already there.
    for mask_device in ("cpu", "meta"):
        out = reward(full_batch(device="meta", mask_device=mask_device))
        assert out.scores.device.type == "meta" and out.valid.device.type == "meta" and out.scores.shape == (2,)


def test_stack_masks_builds_on_the_videos_device():
    from editrl.rewards.pixel import stack_masks

    like = torch.empty(2, 3, 3, 16, 16, device="meta")
    stacked = stack_masks([box_mask(), None], like, missing=True)
    assert stacked.device.type == "meta" and stacked.dtype == torch.bool and stacked.shape == (2, 3, 1, 16, 16)
    on_cpu = stack_masks([box_mask()[:, 0].float(), None], torch.empty(2, 3, 3, 16, 16), missing=False)  # (T, H, W) float
    assert torch.equal(on_cpu[0], box_mask()) and not on_cpu[1].any()


def test_oracle_rewards_without_ground_truth_stay_on_the_batch_device():
    b = RewardBatch(["x", "y"], edited=videos().to("meta"), sources=videos().to("meta"), masks=[box_mask(), None])
    fid = build_reward("oracle_fidelity", {})(b)
    assert fid.scores.device.type == "meta" and fid.extras["error"] == ["no target video"] * 2
    pres = build_reward("oracle_preservation", {})(b)
    assert pres.scores.device.type == "meta" and pres.extras["error"] == [None, "no edit mask"]
