"""The DDPM noise schedule against independent computations: numpy products, the simulated
forward chain (Monte-Carlo with standard-error bounds) and Bayes' rule on a grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genmodels.diffusion.schedule import NoiseSchedule


def numpy_schedule(L: int, b0: float, b1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """beta2, alpha, abar for i = 1..L straight from the seed's formulas (independent code)."""
    i = np.arange(1, L + 1, dtype=np.float64)
    beta2 = b0 + (i / L) * (b1 - b0)
    alpha = np.sqrt(1.0 - beta2)
    return beta2, alpha, np.cumprod(alpha)


@pytest.mark.parametrize(("L", "b0", "b1"), [(2500, 1e-4, 0.02), (40, 1e-3, 0.3)])
def test_buffers_match_seed_formulas(L: int, b0: float, b1: float) -> None:
    s64 = NoiseSchedule(L, b0, b1, dtype=torch.float64)
    beta2, alpha, abar = numpy_schedule(L, b0, b1)
    np.testing.assert_allclose(s64.beta2[1:].numpy(), beta2, rtol=1e-12)
    np.testing.assert_allclose(s64.alpha[1:].numpy(), alpha, rtol=1e-12)
    np.testing.assert_allclose(s64.abar[1:].numpy(), abar, rtol=1e-10)
    assert s64.abar[0].item() == 1.0
    np.testing.assert_allclose(s64.sigma_marg[1:].numpy(), np.sqrt(1 - abar**2), rtol=1e-10)
    # float64 computation, then cast: the float32 buffers are the rounded float64 values
    s32 = NoiseSchedule(L, b0, b1)
    assert s32.abar.dtype == torch.float32
    np.testing.assert_allclose(s32.abar.numpy(), s64.abar.float().numpy(), rtol=0, atol=0)


def test_default_schedule_reaches_noise() -> None:
    s = NoiseSchedule(2500, 1e-4, 0.02, dtype=torch.float64)
    # abar_L = exp(sum log alpha) ~ exp(-L * mean(beta2) / 2): the prior term is negligible
    assert s.abar[-1].item() < 1e-5
    assert s.abar[-1].item() == pytest.approx(math.exp(0.5 * np.log1p(-numpy_schedule(2500, 1e-4, 0.02)[0]).sum()))


def test_closed_form_marginal_matches_forward_chain() -> None:
    """Iterate x_i = alpha_i x_{i-1} + beta_i z and compare with q(x_i | x_0) = N(abar_i x0, 1 - abar_i^2)."""
    L, n = 60, 40000
    s = NoiseSchedule(L, 1e-3, 0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(n, 2)
    x = x0.clone()
    for i in range(1, L + 1):
        x = s.alpha[i] * x + s.beta2[i].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if i in (1, 7, 30, L):
            mean_cf = (s.abar[i] * x0[0]).numpy()
            var_cf = (1 - s.abar[i] ** 2).item()
            m, v = x.mean(0).numpy(), x.var(0).numpy()
            se_m = math.sqrt(var_cf / n)
            se_v = var_cf * math.sqrt(2.0 / (n - 1))
            assert np.all(np.abs(m - mean_cf) < 5 * se_m), (i, m, mean_cf)
            assert np.all(np.abs(v - var_cf) < 5 * se_v), (i, v, var_cf)
            # add_noise draws from the same distribution (two-sample check of the mean)
            t = torch.full((n,), i)
            y = s.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
            assert np.all(np.abs(y.mean(0).numpy() - m) < 5 * math.sqrt(2 * var_cf / n))
            assert np.all(np.abs(y.var(0).numpy() - v) < 5 * math.sqrt(2) * se_v)


@pytest.mark.parametrize("t", [2, 3, 17, 39])
def test_posterior_matches_bayes_rule_on_a_grid(t: int) -> None:
    """q(x_{t-1} | x_t, x0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised numerically (1D grid)."""
    s = NoiseSchedule(40, 1e-3, 0.3, dtype=torch.float64)
    x0, xt = 0.7, -0.4
    a, b2 = s.alpha[t].item(), s.beta2[t].item()
    ap = s.abar[t - 1].item()
    grid = np.linspace(-8, 8, 400001)
    log_lik = -0.5 * (xt - a * grid) ** 2 / b2
    log_prior = -0.5 * (grid - ap * x0) ** 2 / (1 - ap**2)
    w = np.exp(log_lik + log_prior - (log_lik + log_prior).max())
    w /= np.trapezoid(w, grid)
    mean_num = np.trapezoid(w * grid, grid)
    var_num = np.trapezoid(w * (grid - mean_num) ** 2, grid)
    mean, var = s.posterior(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t])
    )
    assert mean.item() == pytest.approx(mean_num, rel=1e-6, abs=1e-9)
    assert var.item() == pytest.approx(var_num, rel=1e-5)


def test_posterior_at_first_step_is_the_data() -> None:
    s = NoiseSchedule(100, 1e-4, 0.02, dtype=torch.float64)
    x0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xt = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean, var = s.posterior(x0, xt, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)
    # the decoder's variance is beta2_1; the reverse steps use beta2 (default) or the posterior variance
    assert s.sigma2[1].item() == pytest.approx(s.beta2[1].item())
    torch.testing.assert_close(s.sigma2[2:], s.beta2[2:])
    sp = NoiseSchedule(100, 1e-4, 0.02, dtype=torch.float64, reverse_variance="posterior")
    assert sp.sigma2[1].item() == pytest.approx(sp.beta2[1].item())
    torch.testing.assert_close(sp.sigma2[2:], sp.post_var[2:])
    assert torch.all(sp.kl_const == 0) and torch.all(s.kl_const[2:] > 0)


def test_parameterisation_conversions_agree() -> None:
    """eps, x0 and mean describe the same prediction: convert and compare with the true posterior."""
    s = NoiseSchedule(300, 1e-4, 0.02, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    n = 64
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, 301, (n,), generator=g)
    xt = s.add_noise(x0, eps, t)
    post_mean, _ = s.posterior(x0, xt, t)
    torch.testing.assert_close(s.mean_from_eps(xt, eps, t), post_mean)
    torch.testing.assert_close(s.mean_from_x0(xt, x0, t), post_mean)
    torch.testing.assert_close(s.x0_from_eps(xt, eps, t), x0)
    torch.testing.assert_close(s.eps_from_x0(xt, x0, t), eps)
    torch.testing.assert_close(s.x0_from_mean(xt, post_mean, t), x0, rtol=1e-6, atol=1e-6)
    # eps_weight: the ELBO term in noise units equals the term in mean units
    eps_hat = eps + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    d_mean = (post_mean - s.mean_from_eps(xt, eps_hat, t)).pow(2).sum(1) / (2 * s.sigma2[t])
    d_eps = s.eps_weight[t] * (eps - eps_hat).pow(2).sum(1)
    torch.testing.assert_close(d_mean, d_eps)


def test_step_adds_reverse_noise_except_at_the_end() -> None:
    s = NoiseSchedule(50, 1e-3, 0.1, dtype=torch.float64)
    mean = torch.zeros(30000, 1, dtype=torch.float64)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = s.step(mean, torch.full((30000,), 10), noise)
    var = s.beta2[10].item()
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / 29999)
    assert torch.equal(s.step(mean, torch.ones(30000, dtype=torch.long), noise), mean)
