"""Image flow: exact log-dets against autograd, round trips on real images, bpd of known densities,
sampling, training (early stopping, resume byte-identity, NaN guard) and config validation."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import pytest
import torch
from torch import Tensor

from genmodels.configs.base import ConfigError, from_mapping, to_dict
from genmodels.configs.flow import FlowConfig
from genmodels.flows.base import Compose
from genmodels.flows.image import (
    ActNorm,
    LULinear,
    Logit,
    bits_per_dim,
    dequantize,
    preprocessing,
    quantize,
)
from genmodels.flows.imageflow import (
    ImageFlow,
    build_model,
    gaussian_baseline,
    image_grid,
    load_trained,
    per_image_bpd,
    save_trained,
    train_flow,
)
from genmodels.training import NonFiniteLossError, load_checkpoint, make_generator

FMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
SMALL = (4, 4)  # 16 pixels: small enough for full autograd Jacobians


def _tiny_config(**kw: object) -> FlowConfig:
    base = {"n_layers": 3, "hidden_units": 8, "n_hidden": 1, "epochs": 3, "batch_size": 16, "patience": 5}
    return from_mapping(FlowConfig, {**base, **kw}, "flow")


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Perturb every parameter (the couplings' zero output layers too) so no layer is the identity."""
    g = make_generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _autograd_logdet(fn, v: Tensor) -> Tensor:
    """log|det d fn(v_b) / d v_b| per sample, from the full Jacobian of the flattened map."""
    out = []
    for b in range(v.shape[0]):

        def flat(x: Tensor, b: int = b) -> Tensor:
            return fn(x.reshape(1, *v.shape[1:]))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, v[b].reshape(-1))
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _random_images(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (n, *shape), generator=make_generator(seed), dtype=torch.uint8)


def _read_idx(path: Path) -> Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = struct.unpack(">I", raw[:4])[0] & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


@pytest.fixture(scope="module")
def tshirts() -> Tensor:
    """Real Fashion-MNIST class-0 images (1000 from the official test file)."""
    images, labels = FMNIST / "t10k-images-idx3-ubyte.gz", FMNIST / "t10k-labels-idx1-ubyte.gz"
    if not images.is_file():
        pytest.skip(f"Fashion-MNIST not found at {FMNIST}")
    return _read_idx(images)[_read_idx(labels) == 0]


# --- exact log-dets -----------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 0.05])
def test_preprocessing_logdet_matches_autograd(lam: float) -> None:
    chain = Compose(preprocessing(SMALL, lam)).double()
    v = dequantize(_random_images(3, SMALL), make_generator(1)).double()
    z, ld = chain(v)
    assert z.shape == (3, 16) and ld.shape == (3,)
    torch.testing.assert_close(ld, _autograd_logdet(lambda x: chain(x)[0], v), rtol=1e-9, atol=1e-8)
    # independent closed form: -D log 256 + sum log((1-2λ) / (s(1-s)))
    s = lam + (1 - 2 * lam) * v.reshape(3, -1) / 256
    expected = -16 * math.log(256) + torch.log((1 - 2 * lam) / (s * (1 - s))).sum(1)
    torch.testing.assert_close(ld, expected, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("mask", ["half", "checkerboard"])
def test_flow_logdet_and_inverse_match_autograd(mask: str) -> None:
    cfg = _tiny_config(
        mask=mask, whiten="learned", linear_between=True, actnorm=True, n_layers=4, logit_lambda=0.05, cond_clamp=2.0
    )
    model = build_model(cfg, SMALL).double()
    data = dequantize(_random_images(64, SMALL), make_generator(2)).double()
    model.initialize(data)  # 64 > 16 points: a well-conditioned whitening
    _randomize(model)
    v = data[:4]
    z, ld = model.transform(v)
    torch.testing.assert_close(ld, _autograd_logdet(lambda x: model.transform(x)[0], v), rtol=1e-8, atol=1e-7)
    back, ld_inv = model.transform.inverse(z)
    torch.testing.assert_close(back, v, rtol=1e-6, atol=1e-4)  # pixel units: the bin width is 1
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-8, atol=1e-6)
    torch.testing.assert_close(
        ld_inv, _autograd_logdet(lambda y: model.transform.inverse(y.reshape(1, -1))[0], z), rtol=1e-8, atol=1e-7
    )


@pytest.mark.parametrize("layer", ["lu", "actnorm", "logit"])
def test_single_layers_logdet(layer: str) -> None:
    g = make_generator(3)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    if layer == "lu":
        t = LULinear(6).double()
        t.initialize(torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g).double())
        _randomize(t, 4, 0.2)
    elif layer == "actnorm":
        t = ActNorm(6).double()
        _randomize(t, 5)
    else:
        t = Logit(0.05).double()
        x = torch.rand(5, 6, generator=g, dtype=torch.float64)
    _, ld = t(x)
    torch.testing.assert_close(ld, _autograd_logdet(lambda y: t(y)[0], x), rtol=1e-9, atol=1e-9)


def test_lu_initialize_whitens_exactly() -> None:
    g = make_generator(6)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(4000, 8, generator=g, dtype=torch.float64) @ a.T + 3.0
    lu = LULinear(8).double()
    lu.initialize(x, eps=0.0)
    z, _ = lu(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    # with shrinkage s: W^-1 W^-T = cov + s * mean(var) I (a ridge-regularised Gaussian)
    lu.initialize(x, eps=0.0, shrinkage=0.1)
    low, up = lu.factors()
    w_inv = torch.linalg.inv(low @ up)
    cov = torch.cov(x.T)
    torch.testing.assert_close(w_inv @ w_inv.T, cov + 0.1 * cov.diagonal().mean() * torch.eye(8).double())


# --- round trips on real images -----------------------------------------------------------------


def test_round_trip_real_images(tshirts: Tensor) -> None:
    x = tshirts[:64]
    cfg = _tiny_config(n_layers=4, hidden_units=32, linear_between=True, actnorm=True, logit_lambda=1e-3)
    model = build_model(cfg).double()
    model.initialize(dequantize(tshirts, make_generator(7)).double())  # 1000 > 784 images: invertible covariance
    v = dequantize(x, make_generator(8)).double()
    _randomize(model, 8, 0.01)  # small: random 784x784 LU factors must stay well conditioned
    z, ld = model.transform(v)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    back, ld_inv = model.transform.inverse(z)
    torch.testing.assert_close(back, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-9, atol=1e-6)
    assert torch.equal(quantize(v.float()), x)  # floor undoes dequantization exactly
    inner = (v - v.floor() > 1e-4) & (v - v.floor() < 1 - 1e-4)  # away from bin edges, where 1e-6 cannot matter
    assert inner.float().mean() > 0.99
    assert torch.equal(quantize(back)[inner], x[inner])


def test_dequantize_stays_in_its_bin() -> None:
    x = torch.full((200_000,), 255, dtype=torch.uint8)
    v = dequantize(x, make_generator(0))
    assert v.dtype == torch.float32 and bool((v >= 255).all()) and bool((v < 256).all())
    assert torch.equal(quantize(v), x)
    # uniform on [x, x + 1): mean 1/2 and variance 1/12 within Monte-Carlo error
    u = (v - 255).double()
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / u.numel())


# --- bpd of known distributions -----------------------------------------------------------------


class _TruncatedLogistic(torch.nn.Module):
    """Density of logit(λ + (1-2λ)y) when y ~ U[0,1)^D: a standard logistic on [logit λ, logit(1-λ)], / (1-2λ)."""

    def __init__(self, dim: int, lam: float) -> None:
        super().__init__()
        self.dim, self.lam = dim, lam

    def log_prob(self, z: Tensor) -> Tensor:
        logistic = -z - 2 * torch.nn.functional.softplus(-z)
        return (logistic - math.log1p(-2 * self.lam)).sum(1)


@pytest.mark.parametrize("lam", [1e-6, 1e-3, 0.05])
def test_uniform_pixel_model_is_exactly_8_bpd(tshirts: Tensor, lam: float) -> None:
    shape = tuple(tshirts.shape[1:])
    model = ImageFlow(Compose(preprocessing(shape, lam)), shape).double()
    model.base = _TruncatedLogistic(model.dim, lam)
    bpd = per_image_bpd(model, tshirts[:200], seed=0)
    # float32 dequantized inputs: 8 bits up to rounding of the per-pixel log-dets
    torch.testing.assert_close(bpd, torch.full_like(bpd, 8.0), rtol=0, atol=1e-4)


def test_gaussian_baseline_bpd_matches_independent_mvn(tshirts: Tensor) -> None:
    lam = 1e-3
    train, test = tshirts[:800], tshirts[800:900]
    gauss = gaussian_baseline(train, lam, generator=make_generator(9))
    got = per_image_bpd(gauss, test, seed=10)
    # independent: MultivariateNormal on logit data (same noise) + hand-written Jacobian, in float64
    g = make_generator(9)
    y_train = dequantize(train, g).double().reshape(800, -1) / 256
    l_train = torch.logit(lam + (1 - 2 * lam) * y_train)
    cov = torch.cov(l_train.T, correction=1) + 1e-6 * torch.eye(784, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(l_train.mean(0), covariance_matrix=cov)
    y = dequantize(test, make_generator(10)).double().reshape(100, -1) / 256
    s = lam + (1 - 2 * lam) * y
    logp = mvn.log_prob(torch.logit(s)) + torch.log((1 - 2 * lam) / (s * (1 - s))).sum(1) - 784 * math.log(256)
    expected = -logp / (784 * math.log(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


def test_bits_per_dim_formula() -> None:
    lp = torch.tensor([-784 * math.log(256.0), 0.0])
    torch.testing.assert_close(bits_per_dim(lp, 784), torch.tensor([8.0, 0.0]))


def test_untrained_whitened_flow_equals_gaussian_baseline(tshirts: Tensor) -> None:
    cfg = _tiny_config(logit_lambda=1e-3, whiten="learned")
    model = build_model(cfg)
    model.initialize(dequantize(tshirts[:800], make_generator(11)), shrinkage=0.02)
    gauss = gaussian_baseline(tshirts[:800], 1e-3, generator=make_generator(11), shrinkage=0.02)
    a = per_image_bpd(model, tshirts[800:], seed=1)
    b = per_image_bpd(gauss, tshirts[800:], seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


# --- sampling -----------------------------------------------------------------------------------


def test_sampling_gives_valid_images_and_is_seeded(tshirts: Tensor) -> None:
    cfg = _tiny_config(logit_lambda=1e-3)
    model = build_model(cfg)
    model.initialize(dequantize(tshirts[:500], make_generator(12)))
    a = model.sample_images(20, generator=make_generator(13), temperature=0.7)
    b = model.sample_images(20, generator=make_generator(13), temperature=0.7)
    assert a.dtype == torch.uint8 and a.shape == (20, 28, 28)
    assert torch.equal(a, b)
    hot = model.sample_images(20, generator=make_generator(13), temperature=3.0)
    assert int(hot.min()) >= 0 and int(hot.max()) <= 255  # uint8 by construction; tails are clamped
    # lower temperature -> samples closer to the mean image (pixel variance shrinks)
    cold = model.sample_images(200, generator=make_generator(14), temperature=0.3).float().var(0).mean()
    warm = model.sample_images(200, generator=make_generator(14), temperature=1.0).float().var(0).mean()
    assert cold < warm
    grid = image_grid(a, nrow=5)
    assert grid.shape == (4 * 30 + 2, 5 * 30 + 2)
    assert torch.equal(grid[2:30, 2:30], a[0])


# --- training -----------------------------------------------------------------------------------


def test_training_improves_on_the_gaussian_and_keeps_best(tshirts: Tensor, tmp_path: Path) -> None:
    cfg = _tiny_config(n_layers=2, hidden_units=64, epochs=4, batch_size=100, logit_lambda=1e-3, lr=1e-3)
    train, val = tshirts[:600], tshirts[600:800]
    res = train_flow(build_model(cfg), train, val, cfg)
    vals = [r["val_bpd"] for r in res.history.rows]
    assert res.best_val_bpd == min(vals) and vals[res.best_epoch - 1] == min(vals)
    start = gaussian_baseline(train, 1e-3, generator=make_generator(cfg.seed + 1))
    assert res.best_val_bpd < float(per_image_bpd(start, val, seed=cfg.seed + 2).mean())
    # the returned model holds the best weights
    assert abs(float(per_image_bpd(res.model, val, seed=cfg.seed + 2).mean()) - res.best_val_bpd) < 1e-9
    path = tmp_path / "model.pt"
    save_trained(path, res.model, cfg)
    loaded, loaded_cfg = load_trained(path)
    assert loaded_cfg == cfg
    for (k, a), (_, b) in zip(res.model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_resume_gives_identical_weights(tshirts: Tensor, tmp_path: Path) -> None:
    cfg = _tiny_config(n_layers=2, hidden_units=16, epochs=4, batch_size=128, sample_every=2, n_samples=4)
    train, val = tshirts[:300], tshirts[300:400]
    full = train_flow(build_model(cfg), train, val, cfg)

    class Interrupt(Exception):
        pass

    def stop_at_2(epoch: int, _m: object) -> None:
        if epoch == 2:
            raise Interrupt

    resume = tmp_path / "resume.pt"
    with pytest.raises(Interrupt):
        train_flow(build_model(cfg), train, val, cfg, on_epoch=stop_at_2, resume_path=resume)
    assert load_checkpoint(resume, kind="flow_resume", config=to_dict(cfg))["epoch"] == 2
    seen: list[int] = []
    resumed = train_flow(build_model(cfg), train, val, cfg, resume_path=resume, on_epoch=lambda e, m: seen.append(e))
    assert seen == [3, 4]
    assert resumed.history.rows == full.history.rows
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_nan_loss_is_detected_and_last_good_state_kept(tshirts: Tensor, tmp_path: Path) -> None:
    cfg = _tiny_config(n_layers=2, hidden_units=8, epochs=3, batch_size=128)

    def poison(epoch: int, _m: object) -> None:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    model = build_model(cfg)
    resume = tmp_path / "resume.pt"
    with pytest.raises(NonFiniteLossError, match="epoch 2"):
        train_flow(model, tshirts[:200], tshirts[200:300], cfg, on_epoch=poison, resume_path=resume)
    state = load_checkpoint(resume, kind="flow_resume", config=to_dict(cfg))
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="flow.logit_lambda"):
        from_mapping(FlowConfig, {"logit_lambda": 0.5}, "flow")
    with pytest.raises(ConfigError, match="flow.hiden_units"):
        from_mapping(FlowConfig, {"hiden_units": 8}, "flow")
    with pytest.raises(ConfigError, match="flow.mask"):
        from_mapping(FlowConfig, {"mask": "stripes"}, "flow")
