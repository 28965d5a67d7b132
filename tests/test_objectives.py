"""The objective and sampling switches against closed forms and constructed cases: Flow-GRPO's CPS score, GRPO-Guard's
normalised ratio, DiffusionNFT's loss, shuffled advantages, and dynamic sampling of tied groups."""

import math

import pytest
import torch

from editrl import grpo, sde
from editrl.base import RecipeError
from editrl.config import parse_recipe
from editrl.harness import DataCursor, Timer, derive_seed
from editrl.preflight import load_recipe
from editrl.trainer import Trainer

# ---------------------------------------------------------------------------------------------- CPS log-probability


def test_both_cps_conventions_against_a_hand_computed_step():
    t, t_next, a = 0.5, 0.4, 0.7
    x, v, sample = torch.tensor([[0.3, -1.2]]), torch.tensor([[1.0, 0.5]]), torch.tensor([[0.1, -0.6]])
    std = t_next * math.sin(a * math.pi / 2)
    c = math.sqrt(t_next**2 - std**2)
    mean = [(1 - t_next) * (xi - t * vi) + c * (xi + (1 - t) * vi) for xi, vi in zip([0.3, -1.2], [1.0, 0.5])]
    sq = [(si - mi) ** 2 for si, mi in zip([0.1, -0.6], mean)]
    exact = sum(-q / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi) for q in sq) / 2
    flow_grpo = -sum(sq) / 2
    got = {conv: sde.step("cps", x, v, t, t_next, noise_level=a, prev_sample=sample, cps_logprob=conv).log_prob.item()
           for conv in ("exact", "flow_grpo")}
    assert got["exact"] == pytest.approx(exact, rel=1e-5)
    assert got["flow_grpo"] == pytest.approx(flow_grpo, rel=1e-5)


def test_flow_grpo_cps_log_ratio_is_two_variances_times_the_exact_one():
    g = torch.Generator().manual_seed(0)
    x, v_old, v_new = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    draw = sde.step("cps", x, v_old, 0.6, 0.45, noise_level=0.7, generator=g)
    std = 0.45 * math.sin(0.7 * math.pi / 2)

    def log_ratio(conv):
        lp = [sde.step("cps", x, v, 0.6, 0.45, noise_level=0.7, prev_sample=draw.prev_sample, cps_logprob=conv).log_prob
              for v in (v_new, v_old)]
        return lp[0] - lp[1]

    assert torch.allclose(log_ratio("flow_grpo"), 2 * std**2 * log_ratio("exact"), rtol=1e-4, atol=1e-6)
    other = sde.step("flow_sde", x, v_old, 0.6, 0.45, noise_level=0.7, prev_sample=draw.prev_sample, cps_logprob="flow_grpo")
    assert torch.equal(other.log_prob, sde.step("flow_sde", x, v_old, 0.6, 0.45, noise_level=0.7, prev_sample=draw.prev_sample).log_prob)


def test_flow_grpo_convention_needs_the_cps_kind():
    with pytest.raises(RecipeError, match="cps_logprob=flow_grpo scores cps steps only"):
        parse_recipe("toy", ["sampling.cps_logprob=flow_grpo"])
    assert parse_recipe("toy", ["sampling.sde=cps", "sampling.cps_logprob=flow_grpo"]).sampling.cps_logprob == "flow_grpo"


# ---------------------------------------------------------------------------------------------- GRPO-Guard


def _step_draws(std: float, n: int = 20000, d: int = 16, seed: int = 0):
    """n draws x = old_mean + std eps of one step whose new mean sits `delta` away from the old one."""
    g = torch.Generator().manual_seed(seed)
    old_mean = torch.randn(1, d, generator=g).expand(n, d)
    delta = torch.linspace(-0.02, 0.03, d)
    sample = old_mean + std * torch.randn(n, d, generator=g)
    return sample, old_mean + delta, old_mean, torch.full((n, 1), std), delta


def test_guard_log_ratio_is_flow_factorys_formula():
    """Flow-Factory's GRPOGuardTrainer: exp((logp - logp_old) s + mse / (2 s)), from exact Gaussian log-probs."""
    sample, mean, old_mean, std, _ = _step_draws(0.3, n=64)
    s = std[0, 0].item()
    raw = sde.gaussian_log_prob(sample, mean, std) - sde.gaussian_log_prob(sample, old_mean, std)
    mse = ((mean - old_mean) ** 2).mean(dim=1)
    expected = raw.double() * s + mse.double() / (2 * s)
    assert torch.allclose(grpo.guard_log_ratio(sample, mean, old_mean, std).double(), expected, atol=1e-5)


@pytest.mark.parametrize("s", [0.05, 0.5])
def test_normalised_log_ratio_has_the_stated_moments_at_every_noise_level(s):
    """Raw: mean -mse / (2 s^2), std sqrt(mse / D) / s. Normalised: mean 0, std sqrt(mse / D), whatever s."""
    sample, mean, old_mean, std, delta = _step_draws(s)
    d, mse = delta.numel(), float((delta**2).mean())
    raw = sde.gaussian_log_prob(sample, mean, std) - sde.gaussian_log_prob(sample, old_mean, std)
    norm = grpo.guard_log_ratio(sample, mean, old_mean, std)
    spread = math.sqrt(mse / d)
    assert raw.mean().item() == pytest.approx(-mse / (2 * s**2), abs=5 * spread / s / math.sqrt(len(raw)))
    assert raw.std().item() == pytest.approx(spread / s, rel=0.03)
    assert norm.mean().item() == pytest.approx(0.0, abs=5 * spread / math.sqrt(len(norm)))
    assert norm.std().item() == pytest.approx(spread, rel=0.03)


def test_normalised_gradient_is_the_on_policy_gradient_times_the_step_std():
    """Its gradient is mean(eps d mean) wherever the new mean is: s times the on-policy gradient of log r."""
    s = 0.2
    sample, _, old_mean, std, _ = _step_draws(s, n=4)
    at_old = old_mean.clone().requires_grad_(True)
    sde.gaussian_log_prob(sample, at_old, std).sum().backward()
    moved = (old_mean + 0.1).requires_grad_(True)
    grpo.guard_log_ratio(sample, moved, old_mean, std).sum().backward()
    assert torch.allclose(moved.grad, s * at_old.grad, atol=1e-6)
    assert torch.allclose(moved.grad, (sample - old_mean) / s / sample.shape[1], atol=1e-6)


def test_ratio_norm_logs_each_steps_ratio_before_and_after(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.ratio_norm=true", "grpo.minibatches=2", "optim.lr=0.05"]))
    metrics = trainer.train_step()
    steps = sorted(k.split("/")[1] for k in metrics if k.endswith("/raw_std"))
    assert len(steps) == 7 and all(f"ratio/{t}/std" in metrics for t in steps)
    assert all(metrics[f"ratio/{t}/raw_std"] != metrics[f"ratio/{t}/std"] for t in steps)  # the second update's


# ---------------------------------------------------------------------------------------------- DiffusionNFT


def test_nft_loss_at_a_known_point():
    """x_t = 0.5, t = 0.5, v_old = 0, v = 1, beta = 1, c = 5; x0 = (1, -1).
    A = +5 (r = 1): x0+ = x_t - t v = 0, err (-1, 1), w = 1, loss 5 * 1 = 5.
    A = -5 (r = 0): v- = 2 v_old - v = -1, x0- = 1, err (0, 2), w = 1, loss 5 * mean(0, 4) = 10."""
    x_t, x0 = torch.full((2, 2), 0.5), torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    v = torch.ones(2, 2, requires_grad=True)
    out = grpo.nft_loss(v, torch.zeros(2, 2), x_t, x0, 0.5, torch.tensor([5.0, -5.0]), beta=1.0, adv_clip=5.0)
    assert out.loss.item() == pytest.approx((5.0 + 10.0) / 2)
    assert out.extra["nft_old_deviation"].item() == pytest.approx(1.0)
    out.loss.backward()
    # d/dv of the r=1 sample: 5 * mean(2 err * -t) / w = (5, -5) / 2 / 2; of the r=0 one: 5 * mean(2 err * t) / w
    assert v.grad.flatten().tolist() == pytest.approx([1.25, -1.25, 0.0, 2.5])


def test_nft_zero_advantage_pushes_nowhere_on_policy():
    g = torch.Generator().manual_seed(0)
    x_t, x0, v_old = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    v = v_old.clone().requires_grad_(True)
    grpo.nft_loss(v, v_old, x_t, x0, 0.7, torch.zeros(3), beta=0.1, adv_clip=5.0).loss.backward()
    assert torch.allclose(v.grad, torch.zeros_like(v), atol=1e-6)


def test_nft_keeps_the_sampling_policys_velocity_across_updates(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.loss=nft", "grpo.minibatches=2", "optim.lr=0.05"]))
    kept = []
    trainer.collect = lambda timer, collect=trainer.collect: kept.append(collect(timer)) or kept[-1]  # type: ignore[method-assign]
    metrics = trainer.train_step()
    assert metrics["train/nft_old_deviation"] > 0  # the second update's policy has moved off the rollout's
    traj = kept[0][0].traj
    assert traj.latents.numel() == traj.next_latents.numel() == 0  # the SDE pairs it never reads are not kept
    assert traj.extras["nft_x_t"].shape[:2] == traj.log_probs.shape
    assert not any(k.startswith("ratio/") or k == "train/clip_frac" for k in metrics)


# ---------------------------------------------------------------------------------------------- shuffled advantages


def test_shuffle_advantages_permutes_the_masked_ones_only():
    adv = torch.arange(8.0)
    mask = torch.tensor([True, True, False, True, True, False, True, True])
    a = grpo.shuffle_advantages(adv, mask, torch.Generator().manual_seed(3))
    b = grpo.shuffle_advantages(adv, mask, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, adv)
    assert a[~mask].tolist() == [2.0, 5.0]
    assert sorted(a[mask].tolist()) == adv[mask].tolist()


def test_shuffled_run_trains_the_same_advantages_on_other_samples(toy_overrides, tmp_path):
    plain = Trainer(load_recipe("toy", toy_overrides)).train_step()
    other = [f"run.output_dir={tmp_path / 'shuffled'}", *toy_overrides[1:], "grpo.shuffle_advantages=true"]
    shuffled = Trainer(load_recipe("toy", other)).train_step()
    for key in ("reward/total/mean", "adv/mean", "adv/std", "adv/abs_max", "samples/trained"):
        assert shuffled[key] == pytest.approx(plain[key], abs=1e-6), key
    assert shuffled["train/grad_norm"] != pytest.approx(plain["train/grad_norm"])


# ---------------------------------------------------------------------------------------------- dynamic sampling

TIED = {"a sunny beach", "a blue sky"}


def ties_for_some(instructions, edited, **kw):
    """Brightness, except that a request in TIED scores 1 whatever the video: its groups always tie."""
    return [1.0 if text in TIED else float(e.mean()) for text, e in zip(instructions, edited)]


def test_tied_groups_are_replaced_by_informative_extras(toy_overrides):
    budget = 4  # seed 0: the first group ties, and so do the first three extras drawn for it
    terms = 'rewards.terms=[{name: "test_objectives:ties_for_some"}]'
    trainer = Trainer(load_recipe("toy", toy_overrides + [terms, "run.plugins=[test_objectives]", f"grpo.resample_tied={budget}"]))
    data = trainer.train_data
    slots = [data[i].instruction for i in DataCursor(len(data), 0, True).take(2)]
    pool = torch.randint(len(data), (budget,), generator=torch.Generator().manual_seed(derive_seed(0, 0, 4)))
    extras = [data[int(i)].instruction for i in pool]
    drawn = 0
    while targets := [k for k, text in enumerate(slots) if text in TIED][: budget - drawn]:
        for j, slot in enumerate(targets):
            if extras[drawn + j] not in TIED:
                slots[slot] = extras[drawn + j]
        drawn += len(targets)
    ro, _ = trainer.collect(Timer())
    metrics: dict[str, float] = {}
    ro = trainer.resample_tied(ro, Timer(), metrics)
    assert drawn == 4 and slots[0] not in TIED, "the constructed case: rounds of tied extras, then a replacement"
    assert [smp.instruction for smp in ro.samples[::4]] == slots
    assert metrics == {"groups/resampled": float(drawn), "groups/still_tied": float(sum(t in TIED for t in slots))}
    assert trainer.cursor.position == 2  # extras never move the data order, so resume draws them again
    assert len(ro.samples) == ro.traj.latents.shape[0] == ro.edited.shape[0] == ro.cond.batch_size == 8
    scores = ro.rewards["test_objectives:ties_for_some"].scores.view(2, 4)
    for text, row in zip(slots, scores):
        assert (row.std() == 0) == (text in TIED)
