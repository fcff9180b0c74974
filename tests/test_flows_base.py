"""Flow building blocks against independent computations: autograd Jacobians + slogdet,
closed-form Gaussian densities, round trips and seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genmodels.flows.base import (
    AffineCoupling,
    Compose,
    Flow,
    ScalarReLUMLP,
    StandardNormal,
    Standardize,
    alternating_masks,
    checkerboard_mask_2d,
    mlp,
)


def _randomize(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Overwrite every parameter (zero-initialised output layers included) with N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x_b) / d x_b| for every row b, from autograd's full Jacobian."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0))[0].squeeze(0), row)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def _coupling(mask: torch.Tensor, seed: int) -> AffineCoupling:
    layer = AffineCoupling(mask, hidden=16, n_hidden=2, scale_bound=2.0).double()
    _randomize(layer, seed)
    return layer


MASKS = [
    torch.tensor([True, False]),
    torch.tensor([False, True]),
    torch.tensor([True, False, False, True, False]),
    checkerboard_mask_2d(2, 3),
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("c" if b else "t" for b in m.tolist()))
def test_affine_coupling_logdet_matches_autograd_jacobian(mask: torch.Tensor) -> None:
    layer = _coupling(mask, seed=1)
    x = torch.randn(6, mask.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    z, ld = layer(x)
    assert ld.shape == (6,)
    # The random weights must make this a non-trivial map, or the test proves nothing.
    assert (ld.abs() > 1e-3).all()
    torch.testing.assert_close(ld, _jacobian_logdet(layer, x), rtol=1e-10, atol=1e-10)
    x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(ld_inv, _jacobian_logdet(layer.inverse, z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    # Conditioning coordinates pass through unchanged.
    torch.testing.assert_close(z[:, mask], x[:, mask], rtol=0, atol=0)


def test_compose_logdet_and_round_trip() -> None:
    dim = 4
    std = Standardize(dim).double()
    std.fit(torch.randn(100, dim, dtype=torch.float64) * torch.tensor([3.0, 0.2, 1.0, 5.0], dtype=torch.float64) + 7)
    layers = [std] + [_coupling(m, seed=10 + i) for i, m in enumerate(alternating_masks(dim, 5, "half"))]
    flow = Compose(layers)
    x = torch.randn(5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3 + 7
    z, ld = flow(x)
    torch.testing.assert_close(ld, _jacobian_logdet(flow, x), rtol=1e-9, atol=1e-9)
    # The composition's log-det is the sum of the parts' (checked against the layers one by one).
    total, h = torch.zeros(5, dtype=torch.float64), x
    for t in layers:
        h, part = t(h)
        total = total + part
    torch.testing.assert_close(ld, total, rtol=1e-12, atol=1e-12)
    x_back, ld_inv = flow.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_inv, _jacobian_logdet(flow.inverse, z), rtol=1e-9, atol=1e-9)


def test_standardize_logdet_and_fit() -> None:
    data = torch.randn(1000, 2, dtype=torch.float64) * torch.tensor([4.0, 0.25], dtype=torch.float64) - 3
    t = Standardize(2).double()
    t.fit(data)
    z, ld = t(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-10, rtol=0)
    assert ld.shape == (1000,)
    torch.testing.assert_close(ld[:4], _jacobian_logdet(t, data[:4]))
    # Buffers belong to the state dict so a checkpoint restores them.
    assert set(t.state_dict()) == {"mean", "std"}


def test_scale_is_soft_clamped() -> None:
    layer = AffineCoupling(torch.tensor([True, False]), hidden=8, n_hidden=1, scale_bound=1.5)
    with torch.no_grad():
        layer.net[-1].bias.fill_(1e4)  # a raw log-scale far beyond the bound
    _, ld = layer(torch.randn(10, 2))
    assert torch.isfinite(ld).all()
    assert (ld <= 1.5 + 1e-6).all() and (ld > 1.4).all()


def _linear_conditioner_flow(a: float, c: float, raw: float, bound: float) -> Flow:
    """x -> z with z1 = x1, z2 = x2 * exp(s) + a * x1 + c and s = bound * tanh(raw / bound)."""
    net = nn.Linear(1, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[a], [0.0]], dtype=torch.float64))
        net.bias.copy_(torch.tensor([c, raw], dtype=torch.float64))
    layer = AffineCoupling(torch.tensor([True, False]), net=net, scale_bound=bound)
    return Flow(Compose([layer]), StandardNormal((2,)))


def test_log_prob_matches_closed_form_gaussian() -> None:
    a, c, raw, bound = 0.8, -1.5, 0.6, 3.0
    flow = _linear_conditioner_flow(a, c, raw, bound)
    s = bound * math.tanh(raw / bound)
    # x = A z + m with z ~ N(0, I): x1 = z1, x2 = (z2 - a z1 - c) e^{-s}.
    A = torch.tensor([[1.0, 0.0], [-a * math.exp(-s), math.exp(-s)]], dtype=torch.float64)
    m = torch.tensor([0.0, -c * math.exp(-s)], dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(m, covariance_matrix=A @ A.T)
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    torch.testing.assert_close(flow.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)

    # Samples have the closed-form mean and covariance (tolerance: 5 standard errors).
    n = 200_000
    xs = flow.sample(n, generator=torch.Generator().manual_seed(5))
    cov = A @ A.T
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert ((xs.mean(0) - m).abs() < 5 * se_mean).all()
    emp_cov = torch.cov(xs.T)
    # Var of a sample covariance entry (Gaussian): (S_ij^2 + S_ii S_jj) / n.
    se_cov = torch.sqrt((cov**2 + torch.outer(torch.diagonal(cov), torch.diagonal(cov))) / n)
    assert ((emp_cov - cov).abs() < 5 * se_cov).all()


def test_sample_reproducible_with_generator_and_log_prob_consistent() -> None:
    masks = alternating_masks(2, 4)
    flow = Flow(Compose([_coupling(m, seed=20 + i) for i, m in enumerate(masks)]), StandardNormal((2,)))
    s1 = flow.sample(64, generator=torch.Generator().manual_seed(7))
    s2 = flow.sample(64, generator=torch.Generator().manual_seed(7))
    s3 = flow.sample(64, generator=torch.Generator().manual_seed(8))
    assert s1.dtype == torch.float64 and s1.shape == (64, 2)
    assert torch.equal(s1, s2)
    assert not torch.allclose(s1, s3)
    xs, lp = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(xs, s1, rtol=0, atol=0)
    torch.testing.assert_close(lp, flow.log_prob(xs), rtol=1e-10, atol=1e-10)
    # Temperature scales the base draw: T = 0 gives the image of z = 0 for every sample.
    cold = flow.sample(3, generator=torch.Generator().manual_seed(1), temperature=0.0)
    torch.testing.assert_close(cold, cold[:1].expand(3, 2))


def test_zero_initialised_mlp_makes_coupling_identity() -> None:
    net = mlp(1, 2, hidden=8, n_hidden=2)
    layer = AffineCoupling(torch.tensor([False, True]), net=net)
    x = torch.randn(5, 2)
    z, ld = layer(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(5))


def test_mask_must_split() -> None:
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(torch.tensor([True, True]))
    with pytest.raises(ValueError, match="mask kind"):
        alternating_masks(2, 2, "diagonal")


@pytest.mark.parametrize("n_hidden", [1, 2, 3])
def test_scalar_relu_mlp_equals_plain_mlp_values_and_gradients(n_hidden: int) -> None:
    net = ScalarReLUMLP(2, 16, n_hidden).double()
    _randomize(net, seed=30, scale=1.0)
    with torch.no_grad():  # units that never switch (w = 0), active and inactive
        net[0].weight[3] = 0.0
        net[0].bias[3] = 0.7
        net[0].weight[5] = 0.0
        net[0].bias[5] = -0.4
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(400, 1, dtype=torch.float64, generator=g) * 3).requires_grad_(True)
    fast = net(x)
    plain = nn.Sequential.forward(net, x)  # the ordinary layer-by-layer evaluation
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    params = [x, *net.parameters()]
    g_fast = torch.autograd.grad(fast.sin().sum(), params)
    g_plain = torch.autograd.grad(plain.sin().sum(), params)
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # Same layers and state-dict keys as mlp(), so checkpoints are interchangeable.
    assert net.state_dict().keys() == mlp(1, 2, 16, n_hidden).state_dict().keys()
