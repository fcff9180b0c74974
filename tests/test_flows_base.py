"""Flow building blocks against independent computations: autograd Jacobians + slogdet,
closed-form Gaussian densities, round trips and seeded sampling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from genmodels.flows.base import (
    AffineCoupling,
    Compose,
    Flow,
    ScalarReLUMLP,
    SharedPiecesCompose,
    StandardNormal,
    Standardize,
    alternating_masks,
    checkerboard_mask_2d,
    mlp,
    relu_mlp2_1d,
    relu_mlp2_1d_pieces,
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
    z = _check_logdets_and_round_trip(layer, x)
    # Conditioning coordinates pass through unchanged.
    torch.testing.assert_close(z[:, mask], x[:, mask], rtol=0, atol=0)


def _check_logdets_and_round_trip(layer: AffineCoupling, x: torch.Tensor) -> torch.Tensor:
    """Forward and inverse log-dets of ``layer`` at ``x`` (B, D) against autograd Jacobians, and
    the round trip; returns ``z``."""
    z, ld = layer(x)
    assert ld.shape == (x.shape[0],)
    # The random weights must make this a non-trivial map, or the test proves nothing.
    assert (ld.abs() > 1e-3).all()
    torch.testing.assert_close(ld, _jacobian_logdet(layer, x), rtol=1e-10, atol=1e-10)
    x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(ld_inv, _jacobian_logdet(layer.inverse, z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    return z


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


# --- input_bound: the conditioner sees c * tanh(x_C / c) ---------------------------------------


def _bounded_coupling(mask: torch.Tensor, seed: int, input_bound: float) -> AffineCoupling:
    layer = AffineCoupling(mask, hidden=16, n_hidden=2, scale_bound=2.0, input_bound=input_bound).double()
    _randomize(layer, seed)
    return layer


@pytest.mark.parametrize("mask", MASKS[:3], ids=lambda m: "".join("c" if b else "t" for b in m.tolist()))
def test_input_bound_logdet_matches_autograd_jacobian_and_round_trips(mask: torch.Tensor) -> None:
    layer = _bounded_coupling(mask, seed=60, input_bound=1.0)
    # Spread 3: many conditioning inputs well beyond the bound, where tanh bends.
    x = torch.randn(6, mask.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(61)) * 3
    z = _check_logdets_and_round_trip(layer, x)
    # It is a different map from the unbounded one with the same weights.
    free = _bounded_coupling(mask, seed=60, input_bound=0.0)
    assert (free(x)[0] - z).abs().max() > 1e-3


def test_input_bound_makes_the_conditioner_constant_far_from_the_data() -> None:
    mask = torch.tensor([True, False])
    bounded = _bounded_coupling(mask, seed=62, input_bound=2.0)
    free = _bounded_coupling(mask, seed=62, input_bound=0.0)
    far = torch.tensor([[40.0], [1e3], [1e6]], dtype=torch.float64)
    for sign in (1.0, -1.0):
        shift, log_scale = bounded.shift_and_log_scale(sign * far)
        # tanh(x / c) rounds to +-1 here: every far point gets exactly the same output, the net's
        # value at +-c (up to the batch-size-dependent rounding of the matmuls).
        assert (shift == shift[0]).all() and (log_scale == log_scale[0]).all()
        ref_shift, ref_raw = bounded.net(torch.tensor([[sign * 2.0]], dtype=torch.float64)).chunk(2, dim=1)
        torch.testing.assert_close(shift, ref_shift.expand(3, 1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_scale, 2.0 * torch.tanh(ref_raw / 2.0).expand(3, 1), rtol=1e-12, atol=1e-12)
        # Without the bound a ReLU net extrapolates linearly: the shift grows with the input.
        free_shift, _ = free.shift_and_log_scale(sign * far)
        assert (free_shift[2] - free_shift[1]).abs() > 100 * (free_shift[1] - free_shift[0]).abs().clamp_min(1e-6)
    # Over a wide range of inputs the shift never leaves the range the net takes on [-c, c].
    inside = bounded.net(torch.linspace(-2, 2, 4001, dtype=torch.float64).unsqueeze(1))[:, :1]
    wide = bounded.shift_and_log_scale(torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64).unsqueeze(1))[0]
    assert wide.min() >= inside.min() - 1e-9 and wide.max() <= inside.max() + 1e-9
    # Inside the data's range (|x| << c) it is close to the unbounded map: tanh(x/c) c ~ x.
    near = torch.tensor([[0.0], [1e-3]], dtype=torch.float64)
    torch.testing.assert_close(bounded.shift_and_log_scale(near)[0], free.shift_and_log_scale(near)[0])


def test_input_bound_defaults_off_and_rejects_negative() -> None:
    layer = AffineCoupling(torch.tensor([True, False]), hidden=8, n_hidden=2)
    assert layer.input_bound == 0.0
    with pytest.raises(ValueError, match="input_bound"):
        AffineCoupling(torch.tensor([True, False]), hidden=8, n_hidden=2, input_bound=-1.0)


def test_input_bound_piece_table_equals_plain_mlp() -> None:
    """With the bound on, ScalarReLUMLP (piece table) and the plain mlp give the same coupling,
    log-det and gradients (weights, inputs)."""
    mask = torch.tensor([False, True])
    net = ScalarReLUMLP(2, 16, 2).double()
    _randomize(net, seed=63, scale=1.0)
    plain_net = mlp(1, 2, 16, 2).double()
    plain_net.load_state_dict(net.state_dict())
    fast = AffineCoupling(mask, net=net, scale_bound=2.0, input_bound=1.5)
    plain = AffineCoupling(mask, net=plain_net, scale_bound=2.0, input_bound=1.5)
    x = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(64)) * 3
    x_fast, x_plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    z_fast, ld_fast = fast(x_fast)
    z_plain, ld_plain = plain(x_plain)
    torch.testing.assert_close(z_fast, z_plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_fast, ld_plain, rtol=1e-10, atol=1e-10)
    assert ld_fast.abs().max() > 1e-2
    loss_fast = (z_fast.sin().sum() + ld_fast.sum())
    loss_plain = (z_plain.sin().sum() + ld_plain.sum())
    g_fast = torch.autograd.grad(loss_fast, [x_fast, *net.parameters()])
    g_plain = torch.autograd.grad(loss_plain, [x_plain, *plain_net.parameters()])
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # Inside a SharedPiecesCompose (tables built together) it is still the same map.
    shared = SharedPiecesCompose([fast])
    z_shared, ld_shared = shared(x)
    torch.testing.assert_close(z_shared, z_plain.detach(), rtol=1e-10, atol=1e-10)
    x_back, _ = shared.inverse(z_shared)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)


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


# --- the two-hidden-layer ScalarReLUMLP as one table of linear pieces --------------------------


def _pieces_net(hidden: int, seed: int, dtype: torch.dtype = torch.float32) -> ScalarReLUMLP:
    """A ScalarReLUMLP(2, hidden, 2) with trained-like random weights (N(0, 1/fan_in)) and, for
    hidden >= 4, the special cases: first-layer units with w = 0 (one on, one off), a layer-2 unit
    that is never on (zero weights, negative bias) and one that is always on (positive bias)."""
    net = ScalarReLUMLP(2, hidden, 2).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (net[0], net[2], net[4]):
            scale = layer.in_features**-0.5
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=dtype) * scale)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=dtype) * 0.5)
        if hidden >= 4:
            net[0].weight[0, 0], net[0].bias[0] = 0.0, 0.8
            net[0].weight[1, 0], net[0].bias[1] = 0.0, -0.3
            net[2].weight[0].zero_()
            net[2].bias[0] = -0.5
            net[2].weight[1].zero_()
            net[2].bias[1] = 0.7
    return net


def _params(net: ScalarReLUMLP) -> tuple[torch.Tensor, ...]:
    """The net's weights stacked for relu_mlp2_1d_pieces (L = 1)."""
    first, second, out = net[0], net[2], net[4]
    return tuple(
        p.unsqueeze(0) for p in (first.weight[:, 0], first.bias, second.weight, second.bias, out.weight, out.bias)
    )


def _test_points(net: ScalarReLUMLP, n: int, seed: int) -> torch.Tensor:
    """Random points, points exactly on first-layer and fine kinks, and far outside all kinks."""
    g = torch.Generator().manual_seed(seed)
    dtype = net[0].weight.dtype
    w, b = net[0].weight[:, 0].detach(), net[0].bias.detach()
    coarse = (-b / w)[w != 0]
    (kinks,), _ = relu_mlp2_1d_pieces(*(p.detach() for p in _params(net)))
    fine = kinks[(kinks.abs() < 1e30)][::3]
    far = torch.tensor([-1e3, -50.0, 50.0, 1e3], dtype=dtype)
    return torch.cat([torch.randn(n, generator=g, dtype=dtype) * 3, coarse, fine, far]).unsqueeze(1)


def _forward_scale(net: ScalarReLUMLP, x: torch.Tensor) -> torch.Tensor:
    """Per point (B, O), in float64: the sum of the magnitudes of every term the output is built
    from (all units, on or off), the scale any float evaluation of the net is rounded against."""
    w, b, w2, b2, w3, b3 = (
        p.detach().double()
        for p in (net[0].weight[:, 0], net[0].bias, net[2].weight, net[2].bias, net[4].weight, net[4].bias)
    )
    h1 = x.double().abs() * w.abs() + b.abs()  # (B, H)
    return (h1 @ w2.abs().T + b2.abs()) @ w3.abs().T + b3.abs()


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "fixed"])
@pytest.mark.parametrize("hidden", [1, 3, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_piece_table_equals_plain_mlp_in_float32(hidden: int, seed: int, compact: bool) -> None:
    net = _pieces_net(hidden, seed)
    x = _test_points(net, 500, seed + 100)
    (kinks,), (table,) = relu_mlp2_1d_pieces(*_params(net), compact=compact)
    fast = relu_mlp2_1d(x, kinks, table)
    with torch.no_grad():
        exact = nn.Sequential.forward(net.double(), x.double())
        net.float()
        plain = nn.Sequential.forward(net, x)
    # Worst-case rounding of a float32 evaluation: ~(H + H2) roundings of the term magnitudes.
    # The plain layer-by-layer forward must meet the same bound (checks the bound itself).
    bound = (2 * hidden + 8) * torch.finfo(torch.float32).eps * _forward_scale(net, x)
    assert (exact.abs() > 1e-2).any(), "the net must not be trivially zero"
    assert ((plain.double() - exact).abs() <= bound).all()
    assert ((fast.double() - exact).abs() <= bound).all()
    assert fast.dtype == torch.float32 and fast.shape == (x.shape[0], 2)
    # The kinks are sorted, and the nets default (compact on CPU) builds the same function.
    assert (kinks[1:] >= kinks[:-1]).all()
    torch.testing.assert_close(net(x), fast, rtol=1e-6, atol=1e-6)


def _away_from_kinks(net: ScalarReLUMLP, x: torch.Tensor, gap: float) -> torch.Tensor:
    """The points of x (B, 1) farther than gap from every kink (first layer and second layer)."""
    (kinks,), _ = relu_mlp2_1d_pieces(*(p.detach() for p in _params(net)))
    kinks = kinks[kinks.abs() < 1e30]
    keep = (x - kinks).abs().min(dim=1).values > gap
    return x[keep]


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "fixed"])
@pytest.mark.parametrize("hidden", [1, 3, 128])
def test_piece_table_gradients_equal_plain_mlp(hidden: int, compact: bool) -> None:
    """Away from the kinks the table's gradients (every weight and x) are the plain MLP's."""
    net = _pieces_net(hidden, seed=7, dtype=torch.float64)
    x = _away_from_kinks(net, _test_points(net, 400, 8)[:400], gap=1e-6)
    assert x.shape[0] > 350
    x = x.clone().requires_grad_(True)
    coef = torch.randn(x.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (kinks,), (table,) = relu_mlp2_1d_pieces(*_params(net), compact=compact)
    params = [x, *net.parameters()]
    g_fast = torch.autograd.grad((relu_mlp2_1d(x, kinks, table) * coef).sum(), params)
    g_plain = torch.autograd.grad((nn.Sequential.forward(net, x) * coef).sum(), params)
    for a, b in zip(g_fast, g_plain, strict=True):
        assert a.abs().max() > 0 or b.abs().max() == 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max().clamp_min(1)))


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "fixed"])
def test_piece_table_gradcheck(compact: bool) -> None:
    """Finite differences of the float64 tables w.r.t. every weight of two stacked nets."""
    nets = [_pieces_net(5, seed=s, dtype=torch.float64) for s in (11, 12)]
    x = torch.cat(
        [_away_from_kinks(n, torch.linspace(-4, 4, 41, dtype=torch.float64).unsqueeze(1), 1e-3) for n in nets]
    )
    leaves = [p.detach().clone().requires_grad_(True) for n in nets for p in _params(n)]

    def f(*ps: torch.Tensor) -> torch.Tensor:
        stacked = [torch.cat(group) for group in zip(ps[:6], ps[6:], strict=True)]
        kinks, tables = relu_mlp2_1d_pieces(*stacked, compact=compact)
        return torch.cat([relu_mlp2_1d(x, k, t) for k, t in zip(kinks, tables, strict=True)])

    assert torch.autograd.gradcheck(f, leaves)


def _tie_net() -> ScalarReLUMLP:
    """Exact ties (small integers, so float64 is exact): first-layer kinks at 0, 1, 2 and
    second-layer units that are exactly 0 at a first-layer kink, rising (A at 0, C at 2) or
    falling (B at 0), and identically zero on whole segments (B left of 0, C on (1, 2))."""
    net = ScalarReLUMLP(2, 3, 2).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0, 2.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        net[4].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]]))
        net[4].bias.copy_(torch.tensor([0.25, -0.5]))
    return net


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "fixed"])
def test_piece_table_exact_ties(compact: bool) -> None:
    net = _tie_net()
    x = torch.cat([torch.linspace(-3, 4, 141, dtype=torch.float64), torch.tensor([0.0, 1.0, 2.0, -0.0])]).unsqueeze(1)
    (kinks,), (table,) = relu_mlp2_1d_pieces(*_params(net), compact=compact)
    plain = nn.Sequential.forward(net, x)
    assert plain[:, 0].max() - plain[:, 0].min() > 1  # the ties matter for the output
    torch.testing.assert_close(relu_mlp2_1d(x, kinks, table), plain, rtol=0, atol=1e-12)
    # Between the kinks (here 0, 1, 2 only) the slopes are the plain MLP's derivatives.
    xs = torch.tensor([[-1.5], [0.5], [1.5], [2.5]], dtype=torch.float64, requires_grad=True)
    g_fast = torch.autograd.grad(relu_mlp2_1d(xs, kinks, table).sum(), [xs, *net.parameters()])
    g_plain = torch.autograd.grad(nn.Sequential.forward(net, xs).sum(), [xs, *net.parameters()])
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_piece_table_batch_sizes_and_layouts() -> None:
    net = _pieces_net(16, seed=3)
    assert net(torch.empty(0, 1)).shape == (0, 2)
    x1 = torch.tensor([[0.37]])
    torch.testing.assert_close(net(x1), nn.Sequential.forward(net, x1), rtol=1e-6, atol=1e-6)
    # Both layouts describe the same function; the fixed one has (H+1)(H2+1) pieces.
    (k_c,), (t_c,) = relu_mlp2_1d_pieces(*_params(net), compact=True)
    (k_f,), (t_f,) = relu_mlp2_1d_pieces(*_params(net), compact=False)
    assert t_f.shape == (17 * 17, 4) and t_c.shape[0] < t_f.shape[0]
    x = _test_points(net, 200, 4)
    torch.testing.assert_close(relu_mlp2_1d(x, k_c, t_c), relu_mlp2_1d(x, k_f, t_f), rtol=1e-6, atol=1e-6)


def test_shared_pieces_match_each_nets_own_and_are_released() -> None:
    nets = [_pieces_net(32, seed=s) for s in range(3)] + [_pieces_net(8, seed=5), ScalarReLUMLP(2, 8, 3)]
    x = torch.randn(100, 1, generator=torch.Generator().manual_seed(6)) * 2
    own = [n(x) for n in nets]
    with ScalarReLUMLP.shared_pieces(nets):
        assert all(n._pieces is not None for n in nets[:4]) and nets[4]._pieces is None
        shared = [n(x) for n in nets]
    for a, b in zip(shared, own, strict=True):
        torch.testing.assert_close(a, b)
    assert all(n._pieces is None for n in nets)
    # Released on errors too, so a stale table can never outlive its call.
    with pytest.raises(RuntimeError, match="boom"), ScalarReLUMLP.shared_pieces(nets):
        raise RuntimeError("boom")
    assert all(n._pieces is None for n in nets)
    # Tables built inside the block are from the weights at entry: a later update is seen after it.
    with torch.no_grad():
        nets[0][4].bias.add_(1.0)
    torch.testing.assert_close(nets[0](x), own[0] + torch.tensor([1.0, 1.0]))


def _scalar_coupling_stack(seed: int, dtype: torch.dtype = torch.float64) -> list[AffineCoupling]:
    layers = []
    for i, m in enumerate(alternating_masks(2, 4)):
        net = _pieces_net(12, seed=seed + i, dtype=dtype)
        layers.append(AffineCoupling(m, net=net, scale_bound=2.0).to(dtype))
    return layers


def test_shared_pieces_compose_equals_compose() -> None:
    layers = _scalar_coupling_stack(seed=40)
    shared, plain = SharedPiecesCompose(layers), Compose(layers)
    assert shared.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(41)) * 2
    z, ld = shared(x)
    z_ref, ld_ref = plain(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
    assert (ld.abs() > 1e-3).all()
    torch.testing.assert_close(ld[:5], _jacobian_logdet(shared, x[:5]), rtol=1e-9, atol=1e-9)
    x_back, ld_inv = shared.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-10, atol=1e-10)


def test_piece_tables_are_deterministic_under_deterministic_algorithms() -> None:
    """Same inputs on CPU: bitwise identical outputs and gradients, nothing raises or warns."""
    layers = _scalar_coupling_stack(seed=50, dtype=torch.float32)
    flow = Flow(SharedPiecesCompose(layers), StandardNormal((2,)))
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(51)) * 2
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            runs = []
            for _ in range(2):
                flow.zero_grad(set_to_none=True)
                lp = flow.log_prob(x)
                lp.mean().backward()
                (kinks,), (table,) = relu_mlp2_1d_pieces(*(p.detach() for p in _params(layers[0].net)), compact=False)
                runs.append([lp.detach(), table, *(p.grad.clone() for p in flow.parameters())])
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask", MASKS[:2] + [alternating_masks(6, 2)[1]], ids=["ct", "tc", "ttt|ccc"])
def test_block_masks_split_by_view_like_by_index(mask: torch.Tensor) -> None:
    """One block of each kind uses views and a cat: bitwise the index path's values and gradients."""
    fast = _coupling(mask, seed=60)
    assert fast._cond_first is not None
    slow = _coupling(mask, seed=60)
    slow._cond_first = None
    x = torch.randn(8, mask.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(61))
    results = []
    for layer in (fast, slow):
        xi = x.clone().requires_grad_(True)
        z, ld = layer(xi)
        xb, ld_inv = layer.inverse(z)
        grads = torch.autograd.grad(
            (z.sin().sum() + ld.sum() + xb.cos().sum() + ld_inv.sum()), [xi, *layer.parameters()]
        )
        results.append([z, ld, xb, ld_inv, *grads])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert _coupling(MASKS[2], seed=60)._cond_first is None  # c t t c t: by index
