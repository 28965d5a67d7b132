"""GRPO maths against hand-computed values."""

import math

import pytest
import torch

from editrl import grpo

GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0])
    valid = torch.ones(8, dtype=torch.bool)
    adv = grpo.group_advantages(r, valid, GROUPS)
    std0 = math.sqrt(((torch.tensor([1.0, 2, 3, 4]) - 2.5) ** 2).mean().item())
    assert adv[:4].tolist() == pytest.approx([(v - 2.5) / (std0 + 1e-4) for v in (1, 2, 3, 4)], rel=1e-5)
    std1 = math.sqrt((3 * 1.0**2 + 3.0**2) / 4)
    assert adv[4:].tolist() == pytest.approx([-1 / (std1 + 1e-4)] * 3 + [3 / (std1 + 1e-4)], rel=1e-5)


def test_batch_scale_and_no_scale():
    r = torch.tensor([1.0, 3.0, 5.0, 9.0])
    g = torch.tensor([0, 0, 1, 1])
    valid = torch.ones(4, dtype=torch.bool)
    batch_std = r.std(unbiased=False).item()
    assert grpo.group_advantages(r, valid, g, scale="batch").tolist() == pytest.approx(
        [-1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4), -2 / (batch_std + 1e-4), 2 / (batch_std + 1e-4)], rel=1e-5
    )
    assert grpo.group_advantages(r, valid, g, scale="none").tolist() == [-1.0, 1.0, -2.0, 2.0]


def test_invalid_rewards_are_excluded_not_zero():
    r = torch.tensor([1.0, 3.0, 0.0, 100.0])
    valid = torch.tensor([True, True, False, True])
    g = torch.zeros(4, dtype=torch.long)
    adv = grpo.group_advantages(r, valid, g, scale="none")
    mean = (1 + 3 + 100) / 3  # the invalid 0 does not pull the mean down
    assert adv.tolist() == pytest.approx([1 - mean, 3 - mean, 0.0, 100 - mean])


def test_advantage_clipping():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    adv = grpo.group_advantages(r, torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.long), adv_clip=2.0)
    assert adv.max().item() == 2.0
    assert adv[:7].tolist() == pytest.approx([-1 / math.sqrt(7) / (1 + 1e-4 * 8 / math.sqrt(7))] * 7, rel=1e-3)


def test_tied_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0])
    tied = grpo.tied_groups(r, torch.ones(8, dtype=torch.bool), GROUPS)
    assert tied.tolist() == [True] * 4 + [False] * 4
    one_valid = torch.tensor([True, False, False, False, True, True, True, True])
    assert grpo.tied_groups(torch.arange(8.0), one_valid, GROUPS)[:4].all()


def test_sum_then_normalize():
    g = torch.tensor([0, 0])
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    valid = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])}
    total, ok = grpo.aggregate_rewards(scores, valid, {"a": 2.0, "b": 0.5}, g, "sum_then_normalize")
    assert total[0].item() == pytest.approx(2 * 1 + 0.5 * 10)
    assert ok.tolist() == [True, False]


def test_normalize_then_sum():
    g = torch.tensor([0, 0, 0, 0])
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([100.0, 0.0, 0.0, 0.0])}
    valid = {"a": torch.ones(4, dtype=torch.bool), "b": torch.tensor([True, True, False, False])}
    total, ok = grpo.aggregate_rewards(scores, valid, {"a": 1.0, "b": 1.0}, g, "normalize_then_sum")
    za = grpo.group_advantages(scores["a"], valid["a"], g)
    zb = torch.tensor([1.0, -1.0, 0.0, 0.0]) * 50 / (50 + 1e-4)
    assert total.tolist() == pytest.approx((za + zb).tolist(), rel=1e-5)
    assert ok.all()


def test_clipped_surrogate_closed_form():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    out = grpo.clipped_surrogate(new, old, adv, clip_range=0.2)
    # max(-A r, -A clip(r)): A=1: r=1.5 -> max(-1.5, -1.2) = -1.2; r=0.5 -> max(-0.5, -0.8) = -0.5
    # A=-1: r=1.5 -> max(1.5, 1.2) = 1.5; r=0.5 -> max(0.5, 0.8) = 0.8
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert out.clipped.tolist() == [True, False, False, True]
    assert out.approx_kl.item() == pytest.approx(0.5 * (new**2).mean().item())


def test_on_policy_gradient_is_the_policy_gradient():
    logp = torch.tensor([0.3, -0.2], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    grpo.clipped_surrogate(logp, logp.detach(), adv, clip_range=1e-4).loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.5])


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    kl = grpo.kl_to_reference(mean, ref, std)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    ).mean(dim=(1, 2))
    assert torch.allclose(kl, expected, atol=1e-6)
