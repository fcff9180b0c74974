"""The DDPM ELBO on Gaussian data, where the optimal reverse model and the bound are known
in closed form, for every parameterisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from genmodels.diffusion.elbo import elbo_estimate, nll_bound
from genmodels.diffusion.model import DDPM
from genmodels.diffusion.schedule import NoiseSchedule

M = torch.tensor([0.5, -1.0], dtype=torch.float64)  # data mean
S2 = torch.tensor([0.3, 1.7], dtype=torch.float64)  # data variances (diagonal)


class GaussianOracle(nn.Module):
    """The Bayes-optimal network for x0 ~ N(M, diag(S2)) in any parameterisation.

    E[x0 | x_t] = M + abar S2 / (abar^2 S2 + 1 - abar^2) (x_t - abar M); the optimal mean
    E[mu~ | x_t] = c0 E[x0 | x_t] + ct x_t (the ELBO's terms are MSEs, minimised by the
    conditional expectation); E[eps | x_t] follows from x_t = abar x0 + sqrt(1 - abar^2) eps.
    """

    def __init__(self, schedule: NoiseSchedule, parameterization: str) -> None:
        super().__init__()
        self.s = schedule
        self.parameterization = parameterization

    def forward(self, xt: Tensor, t: Tensor) -> Tensor:
        ab = self.s.abar[t].reshape(-1, 1)
        x0 = M + ab * S2 / (ab**2 * S2 + 1 - ab**2) * (xt - ab * M)
        if self.parameterization == "x0":
            return x0
        if self.parameterization == "eps":
            return self.s.eps_from_x0(xt, x0, t.expand(xt.shape[0]))
        return self.s.mean_from_x0(xt, x0, t.expand(xt.shape[0])) - xt  # residual mean


def oracle_model(schedule: NoiseSchedule, parameterization: str) -> DDPM:
    model = DDPM(GaussianOracle(schedule, parameterization), schedule, parameterization)
    return model.double()


def analytic_bound(s: NoiseSchedule, D: int = 2) -> float:
    """E_x0[-ELBO] of the oracle: sum_t c0_t^2 Var[x0|x_t] / (2 sigma2_t) + decoder const + prior KL."""
    total = 0.0
    L = s.n_steps
    for t in range(1, L + 1):
        ab = s.abar[t].item()
        post_var_x0 = S2 * (1 - ab**2) / (ab**2 * S2 + 1 - ab**2)  # Var[x0 | x_t], per coordinate
        total += (s.post_coef_x0[t].item() ** 2 * post_var_x0).sum().item() / (2 * s.sigma2[t].item())
    total += 0.5 * D * math.log(2 * math.pi * s.sigma2[1].item())
    # variance mismatch of each KL(N(mu~, beta2_tilde) || N(mu, sigma2)), t >= 2, computed here
    for t in range(2, L + 1):
        r = s.post_var[t].item() / s.sigma2[t].item()
        total += 0.5 * D * (r - 1 - math.log(r))
    ab = s.abar[L].item()
    ex2 = (M**2 + S2).sum().item()
    total += 0.5 * (D * (1 - ab**2) + ab**2 * ex2 - D - D * math.log(1 - ab**2))
    return total


def gaussian_data(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return M + S2.sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("parameterization", ["mean", "eps", "x0"])
@pytest.mark.parametrize(("L", "b0", "b1"), [(200, 1e-3, 0.1), (2500, 1e-4, 0.02)])
def test_full_elbo_of_oracle_matches_closed_form(parameterization: str, L: int, b0: float, b1: float) -> None:
    s = NoiseSchedule(L, b0, b1, dtype=torch.float64)  # reverse variance beta2 (the default)
    model = oracle_model(s, parameterization)
    x = gaussian_data(400 if L > 1000 else 2000, 0)
    bound = nll_bound(model, x, generator=torch.Generator().manual_seed(1), chunk_points=150)
    expected = analytic_bound(s)
    se = bound.std().item() / math.sqrt(x.shape[0])
    assert abs(bound.mean().item() - expected) < 5 * se + 1e-9, (bound.mean().item(), expected, se)
    # an upper bound on the NLL: above the data's entropy, and close to it for this exact model
    entropy = 0.5 * (2 * math.log(2 * math.pi * math.e) + torch.log(S2).sum().item())
    assert expected > entropy
    assert expected - entropy < 0.05


def test_posterior_variance_leaves_a_gap_even_for_the_oracle() -> None:
    """With sigma2 = posterior variance the Bayes-optimal mean still leaves ~D pi^2 / 24 nats."""
    s = NoiseSchedule(2500, 1e-4, 0.02, dtype=torch.float64, reverse_variance="posterior")
    model = oracle_model(s, "x0")
    x = gaussian_data(300, 7)
    bound = nll_bound(model, x, generator=torch.Generator().manual_seed(8))
    expected = analytic_bound(s)
    se = bound.std().item() / math.sqrt(x.shape[0])
    assert abs(bound.mean().item() - expected) < 5 * se
    entropy = 0.5 * (2 * math.log(2 * math.pi * math.e) + torch.log(S2).sum().item())
    assert 0.5 < expected - entropy < 2 * math.pi**2 / 24


def test_elbo_terms_and_standardisation() -> None:
    """Per-step terms sum to the bound; rescaling data by k adds D log k (the map's log-det)."""
    s = NoiseSchedule(100, 1e-3, 0.2, dtype=torch.float64)
    model = oracle_model(s, "x0")
    x = gaussian_data(500, 2)
    b, terms = nll_bound(model, x, generator=torch.Generator().manual_seed(3), return_terms=True)
    assert terms.shape == (100,)
    # scaling: data 3x larger, model standardises by 3 -> bound + 2 log 3 with the same noise
    model.scale.fill_(3.0)
    b3 = nll_bound(model, 3 * x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b3, b + 2 * math.log(3.0))


@pytest.mark.parametrize("proposal", ["uniform", "skewed"])
def test_one_step_estimate_is_unbiased(proposal: str) -> None:
    """E_t[elbo_estimate] = nll_bound for uniform steps and for an importance proposal."""
    L = 100
    s = NoiseSchedule(L, 1e-3, 0.2, dtype=torch.float64)
    model = oracle_model(s, "eps")
    x = gaussian_data(200, 4)
    exact = nll_bound(model, x, generator=torch.Generator().manual_seed(5)).mean().item()
    g = torch.Generator().manual_seed(6)
    reps = 200
    xr = x.repeat(reps, 1)
    if proposal == "uniform":
        t = torch.randint(1, L + 1, (xr.shape[0],), generator=g)
        inv_p = None
    else:
        p = 1.0 / torch.arange(1, L + 1, dtype=torch.float64)
        p = p / p.sum()
        t = torch.multinomial(p, xr.shape[0], replacement=True, generator=g) + 1
        inv_p = 1.0 / p[t - 1]
    noise = torch.randn(xr.shape, generator=g, dtype=torch.float64)
    est = elbo_estimate(model, xr, t, noise, inv_p)
    se = est.std().item() / math.sqrt(est.shape[0])
    assert abs(est.mean().item() - exact) < 5 * se + 0.02, (est.mean().item(), exact, se)
