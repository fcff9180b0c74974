"""Langevin dynamics against closed forms on a Gaussian energy.

For E(x) = 1/2 sum_d (x_d - mu_d)^2 / s_d^2 the unclamped, unclipped update

    x' = x - h * (x - mu) / s^2 + n * xi

is an AR(1) chain per coordinate, x' - mu = a (x - mu) + n xi with a = 1 - h / s^2, whose
stationary law is exactly N(mu, n^2 / (1 - a^2)). That closed form is the independent reference.
"""

from __future__ import annotations

import math

import torch

from genmodels.ebm import EnergyMLP, langevin, sample_from_noise


def gaussian_energy(mu: torch.Tensor, s: torch.Tensor):
    def energy(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (((x - mu) / s) ** 2).sum(dim=1)

    return energy


def ar1_stationary_var(h: float, n: float, s2: torch.Tensor) -> torch.Tensor:
    a = 1.0 - h / s2
    return n**2 / (1.0 - a**2)


def _check_moments(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> None:
    """Sample mean/variance of ``x`` (N, D) equal ``mu``/``var`` within 4.5 standard errors."""
    n = x.shape[0]
    x = x.double()
    mean_se = (var / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 4.5 * mean_se).all(), (x.mean(0), mu, mean_se)
    # Var of the sample variance of a Gaussian: 2 var^2 / (n - 1).
    var_se = var * math.sqrt(2.0 / (n - 1))
    assert ((x.var(0) - var).abs() < 4.5 * var_se).all(), (x.var(0), var, var_se)


def test_langevin_proper_scaling_samples_the_gaussian() -> None:
    # noise = sqrt(2 h): the discretised Langevin diffusion targets exp(-E) up to an O(h) bias.
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    s = torch.tensor([1.0, 0.7], dtype=torch.float64)
    h = 0.01
    g = torch.Generator().manual_seed(0)
    x0 = (mu + 3.0).expand(8000, 2).clone()  # start far away: tests convergence too
    x = langevin(
        gaussian_energy(mu, s), x0, n_steps=1000, step_size=h, noise_std=math.sqrt(2 * h), clamp=None, generator=g
    )
    exact = ar1_stationary_var(h, math.sqrt(2 * h), s**2)
    _check_moments(x, mu, exact)
    # The O(h) discretisation bias of the variance is below 2% of the target's variance here.
    assert ((exact - s**2).abs() / s**2 < 0.02).all()


def test_langevin_tutorial_scaling_targets_a_near_zero_temperature() -> None:
    # The seed's (and the EBM literature's) setting: step 10, noise 5e-3. The chain then targets
    # exp(-E(x) / T) with T = noise^2 / (2 step) = 1.25e-6 (plus the O(step) correction that the
    # AR(1) closed form includes): almost noiseless gradient descent to the energy minimum, not
    # samples of exp(-E). Here s^2 = 100 so that step / s^2 = 0.1 keeps the unclipped chain stable.
    h, n = 10.0, 5e-3
    mu = torch.tensor([0.3, 0.6], dtype=torch.float64)
    s2 = torch.tensor([100.0, 100.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = mu + torch.randn(8000, 2, generator=g, dtype=torch.float64)
    x = langevin(gaussian_energy(mu, s2.sqrt()), x0, n_steps=300, step_size=h, noise_std=n, clamp=None, generator=g)
    exact = ar1_stationary_var(h, n, s2)
    _check_moments(x, mu, exact)
    temperature = n**2 / (2 * h)
    assert temperature == 1.25e-6
    # Variance ~ T * s^2 / (1 - h / (2 s^2)): six orders of magnitude below exp(-E)'s s^2.
    assert torch.allclose(exact, temperature * s2 / (1 - h / (2 * s2)))
    assert (x.var(0) / s2 < 1e-5).all()


def test_gradient_clip_bounds_each_move() -> None:
    # Far from the mode the clipped gradient saturates: without noise every coordinate moves by
    # exactly step * grad_clip per step (the literature's 10 * 0.03 = 0.3 pixel units).
    mu = torch.zeros(3, dtype=torch.float64)
    x0 = torch.full((4, 3), 50.0, dtype=torch.float64)
    x = langevin(
        gaussian_energy(mu, torch.ones(3, dtype=torch.float64)),
        x0,
        n_steps=7,
        step_size=10.0,
        noise_std=0.0,
        grad_clip=0.03,
        clamp=None,
    )
    assert torch.allclose(x, torch.full_like(x0, 50.0 - 7 * 0.3))


def test_langevin_is_pure_and_reproducible() -> None:
    g_init = torch.Generator().manual_seed(0)
    model = EnergyMLP(hidden=(16,))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g_init) * 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = torch.rand(5, 784, generator=g_init)
    x0_copy = x0.clone()
    kwargs = dict(n_steps=4, step_size=10.0, noise_std=5e-3, grad_clip=0.03)
    with torch.no_grad():  # works inside evaluation code too
        a = langevin(model, x0, generator=torch.Generator().manual_seed(3), **kwargs)
    b = langevin(model, x0, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(x0, x0_copy)  # input untouched
    assert not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1  # pixel clamp
    assert not torch.equal(a, x0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p in model.parameters():
        assert p.grad is None and p.requires_grad  # gradients w.r.t. inputs only


def test_long_run_sampling_lowers_energy() -> None:
    # On an energy with a known minimiser (a fixed image), long-run sampling from noise
    # approaches it: the mean distance shrinks by far more than the noise level.
    target = torch.linspace(0.1, 0.9, 784)
    energy = gaussian_energy(target, torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    x = sample_from_noise(energy, 16, (784,), n_steps=256, step_size=0.5, noise_std=5e-3, grad_clip=0.03, generator=g)
    x0 = torch.rand(16, 784, generator=torch.Generator().manual_seed(0))
    assert (x - target).abs().mean() < 0.02 < (x0 - target).abs().mean()
