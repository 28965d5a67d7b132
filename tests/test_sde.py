"""Flow-SDE kinds against closed forms: Gaussian densities, exact on-policy ratios, ODE limits, marginals."""

import math

import pytest
import torch

from editrl import sde

KINDS = ["flow_sde", "cps", "dance"]


def _inputs(seed=0, shape=(4, 3, 2, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.3, 0.05)])
def test_log_prob_is_the_gaussian_density(kind, sigma, sigma_next):
    x, v = _inputs()
    out = sde.step(kind, x, v, sigma, sigma_next, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Normal(out.mean.double(), out.std.double()).log_prob(out.prev_sample.double())
    assert torch.allclose(out.log_prob.double(), expected.mean(dim=(1, 2, 3, 4)), atol=1e-5)


def test_flow_sde_matches_the_written_formula():
    x, v = _inputs(3)
    t, t_next, a = 0.6, 0.45, 0.7
    out = sde.step("flow_sde", x, v, t, t_next, noise_level=a, generator=torch.Generator().manual_seed(0))
    dt = t_next - t
    std_t = a * math.sqrt(t / (1 - t))
    mean = x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.std, torch.full_like(out.std, std_t * math.sqrt(-dt)))


def test_flow_sde_at_sigma_one_uses_the_next_sigma():
    x, v = _inputs()
    out = sde.step("flow_sde", x, v, 1.0, 0.9, noise_level=0.5)
    assert torch.allclose(out.std, torch.full_like(out.std, 0.5 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1)))
    assert torch.isfinite(out.log_prob).all()


def test_cps_std_and_its_deterministic_last_step():
    x, v = _inputs()
    out = sde.step("cps", x, v, 0.5, 0.4, noise_level=0.7)
    assert torch.allclose(out.std, torch.full_like(out.std, 0.4 * math.sin(0.7 * math.pi / 2)))
    last = sde.step("cps", x, v, 0.1, 0.0, noise_level=0.7)
    assert torch.allclose(last.prev_sample, x - 0.1 * v) and torch.equal(last.log_prob, torch.zeros(4))


def test_cps_lands_exactly_on_the_marginal_in_one_step():
    """With point-mass data (x0 = c) the predictions are exact and one CPS step of any size gives
    x_next ~ N((1 - t_next) c, t_next^2): the coefficients are preserved."""
    n, c, t, t_next = 200000, 0.8, 0.9, 0.3
    g = torch.Generator().manual_seed(0)
    x = (1 - t) * c + t * torch.randn(n, 1, generator=g)
    v = (x - (1 - t) * c) / t - c
    out = sde.step("cps", x, v, t, t_next, noise_level=0.7, generator=g).prev_sample
    assert out.mean().item() == pytest.approx((1 - t_next) * c, abs=3e-3)
    assert out.var().item() == pytest.approx(t_next**2, rel=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_rescoring_the_sampled_step_gives_ratio_exactly_one(kind):
    x, v = _inputs(5)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3])
    sigma_next = sigma - 0.1
    rollout = sde.step(kind, x, v, sigma, sigma_next, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    train = sde.step(kind, x.clone(), v.clone(), sigma, sigma_next, noise_level=0.7, prev_sample=rollout.prev_sample)
    assert torch.equal(torch.exp(train.log_prob - rollout.log_prob), torch.ones(4))


@pytest.mark.parametrize("kind", KINDS)
def test_small_noise_approaches_the_ode_step(kind):
    x, v = _inputs(7)
    ode = sde.step("ode", x, v, 0.6, 0.5, noise_level=0.0)
    gaps = []
    for a in (0.1, 0.01, 0.001):
        out = sde.step(kind, x, v, 0.6, 0.5, noise_level=a, generator=torch.Generator().manual_seed(0))
        gaps.append((out.prev_sample - ode.prev_sample).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 5e-3


def test_ode_is_euler_with_zero_log_prob():
    x, v = _inputs()
    out = sde.step("ode", x, v, 0.8, 0.6, noise_level=0.7)
    assert torch.allclose(out.prev_sample, x - 0.2 * v)
    assert torch.equal(out.log_prob, torch.zeros(4))


@pytest.mark.parametrize("kind", ["flow_sde", "dance"])
def test_sde_preserves_the_flow_marginal(kind):
    """x0 ~ N(0, 1): x_t ~ N(0, (1-t)^2 + t^2) and the exact velocity is x (2t - 1) / ((1-t)^2 + t^2).

    Integrating each SDE with that velocity must keep the marginal variance on the flow's path.
    """
    n, steps = 20000, 200
    t = torch.linspace(0.9, 0.1, steps + 1)
    var = lambda s: (1 - s) ** 2 + s**2  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g) * math.sqrt(var(0.9))
    for i in range(steps):
        s, s_next = float(t[i]), float(t[i + 1])
        v = x * (2 * s - 1) / var(s)
        x = sde.step(kind, x, v, s, s_next, noise_level=0.7, generator=g).prev_sample
    assert x.var().item() == pytest.approx(var(0.1), rel=0.05)


def test_step_rejects_an_increasing_sigma():
    x, v = _inputs()
    with pytest.raises(ValueError, match="smaller"):
        sde.step("flow_sde", x, v, 0.4, 0.5, noise_level=0.7)


def test_sigma_schedule_runs_from_one_to_zero():
    s = sde.sigma_schedule(8, 3.0)
    assert s.shape == (9,) and s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())
