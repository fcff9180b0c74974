"""RealNVP 2D: architecture from the config, exact log-det of the whole flow, normalisation,
training determinism, resume, NaN handling, checkpoint round trip, seeded sampling."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from genmodels.configs.base import ConfigError, from_mapping, to_dict
from genmodels.configs.realnvp2d import RealNVP2DConfig
from genmodels.flows.base import AffineCoupling, Standardize
from genmodels.flows.realnvp2d import (
    build_model,
    init_model,
    load_trained,
    mean_nll,
    sample,
    save_trained,
    train_realnvp2d,
)
from genmodels.training import CheckpointError, NonFiniteLossError, load_checkpoint, save_checkpoint

TINY = RealNVP2DConfig(n_layers=4, n_hidden=2, hidden_units=16, epochs=4, batch_size=128, patience=50, seed=3)


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _gaussian_data(n: int, seed: int) -> torch.Tensor:
    """Correlated, shifted Gaussian points (n, 2): x = L e + m."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.tensor([[1.5, 0.0], [0.9, 0.4]])
    return torch.randn(n, 2, generator=g) @ chol.T + torch.tensor([2.0, -1.0])


def test_default_architecture_follows_the_seed() -> None:
    model = build_model(RealNVP2DConfig())
    layers = list(model.transform.transforms)
    assert isinstance(layers[0], Standardize)
    couplings = layers[1:]
    assert len(couplings) == 14 and all(isinstance(c, AffineCoupling) for c in couplings)
    # Alternating halves: x conditions y, then y conditions x, ...
    assert [int(c.cond_idx) for c in couplings] == [0, 1] * 7
    linears = [m for m in couplings[0].net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 128), (128, 128), (128, 2)]
    # Built from a plain dict (what a checkpoint stores) the model is the same.
    assert build_model(to_dict(RealNVP2DConfig())).state_dict().keys() == model.state_dict().keys()


def test_whole_flow_logdet_matches_autograd_jacobian() -> None:
    model = init_model(RealNVP2DConfig(n_layers=6, hidden_units=24), _gaussian_data(500, 0)).double()
    _randomize(model, seed=1)
    x = _gaussian_data(6, 2).double()
    z, ld = model.transform(x)
    assert (ld.abs() > 1e-2).all()
    ref = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: model.transform(v.unsqueeze(0))[0].squeeze(0), row)
        ref.append(torch.linalg.slogdet(jac).logabsdet)
    torch.testing.assert_close(ld, torch.stack(ref), rtol=1e-9, atol=1e-9)
    x_back, ld_inv = model.transform.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-10, atol=1e-10)


def test_density_integrates_to_one() -> None:
    """A randomly weighted flow is a proper density in the data space (standardisation included)."""
    model = init_model(RealNVP2DConfig(n_layers=4, hidden_units=16), _gaussian_data(2000, 0)).double()
    _randomize(model, seed=5, scale=0.3)
    # Where the mass is: a bounding box from many samples.
    with torch.no_grad():
        xs = model.sample(20000, generator=torch.Generator().manual_seed(0))
    lo, hi = xs.min(0).values - 1.0, xs.max(0).values + 1.0
    n = 600
    gx = torch.linspace(float(lo[0]), float(hi[0]), n, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        p = model.log_prob(grid).exp().reshape(n, n)
    mass = torch.trapezoid(torch.trapezoid(p, gy, dim=1), gx)
    assert abs(float(mass) - 1.0) < 0.01


def test_training_learns_a_gaussian_and_is_deterministic() -> None:
    train, val, test = _gaussian_data(4096, 10), _gaussian_data(1024, 11), _gaussian_data(4096, 12)
    # min_delta=0: every lower val NLL is a new best, so best_val_loss is the curve's minimum
    cfg = RealNVP2DConfig(
        n_layers=4, hidden_units=32, epochs=12, batch_size=256, patience=50, min_delta=0.0, seed=0, lr=3e-3
    )
    seen: list[tuple[int, dict]] = []
    res = train_realnvp2d(cfg, train, val, on_epoch=lambda e, m: seen.append((e, dict(m))))
    assert [e for e, _ in seen] == list(range(1, 13))
    assert set(seen[0][1]) == {"train_loss", "val_loss", "lr"}
    assert seen[1][1]["lr"] == pytest.approx(3e-3 * 0.999)
    # True entropy of N(m, L L^T): 1 + log(2 pi) + log|det L|.
    h = 1 + math.log(2 * math.pi) + math.log(1.5 * 0.4)
    nll, se = mean_nll(res.model, test)
    assert nll - h > -4 * se  # a model cannot beat the entropy beyond sampling noise
    assert nll - h < 0.05
    assert res.best_val_loss == pytest.approx(min(m["val_loss"] for _, m in seen))

    again = train_realnvp2d(cfg, train, val)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


class _Kill(Exception):
    pass


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9, "grad_clip": 2.0}])
def test_resume_after_interruption_is_byte_identical(tmp_path: Path, extra: dict[str, float]) -> None:
    cfg = TINY.__class__(**{**to_dict(TINY), **extra})
    train, val = _gaussian_data(1024, 1), _gaussian_data(256, 2)
    full = train_realnvp2d(cfg, train, val, resume_path=tmp_path / "a.pt")

    def kill_at_2(epoch: int, _m: object) -> None:
        if epoch == 2:
            raise _Kill

    resume = tmp_path / "b.pt"
    with pytest.raises(_Kill):
        train_realnvp2d(cfg, train, val, resume_path=resume, on_epoch=kill_at_2)
    assert load_checkpoint(resume, kind="realnvp2d_resume")["epoch"] == 2
    epochs: list[int] = []
    resumed = train_realnvp2d(cfg, train, val, resume_path=resume, on_epoch=lambda e, m: epochs.append(e))
    assert resumed.resumed_from == 2 and epochs == [3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.history.rows == full.history.rows

    # A resume file written with another config is ignored: the run starts from scratch.
    other = train_realnvp2d(cfg.__class__(**{**to_dict(cfg), "seed": 4}), train, val, resume_path=resume)
    assert other.resumed_from == 0


def test_ema_weights_are_the_validated_and_returned_ones() -> None:
    """With ``ema_decay`` the returned model is the averaged one that early stopping chose:
    its validation NLL is the best recorded one, and it differs from the raw weights' run."""
    train, val = _gaussian_data(1024, 1), _gaussian_data(256, 2)
    cfg = TINY.__class__(**{**to_dict(TINY), "ema_decay": 0.9, "ema_reset": 0.0})
    res = train_realnvp2d(cfg, train, val)
    assert mean_nll(res.model, val)[0] == pytest.approx(res.best_val_loss, abs=1e-5)
    raw = train_realnvp2d(TINY.__class__(**{**to_dict(TINY), "ema_decay": 0.0}), train, val)
    assert [r["train_loss"] for r in raw.history.rows] == [r["train_loss"] for r in res.history.rows]
    assert [r["val_loss"] for r in raw.history.rows] != [r["val_loss"] for r in res.history.rows]


def test_ema_reset_restarts_the_average_from_the_raw_weights() -> None:
    """With a decay close to 1 the average lags the raw weights, which validate better after
    the first epoch: ``ema_reset`` copies them into the average, so the returned model is the
    raw run's; without it (or with a larger margin) the average is returned."""
    train, val = _gaussian_data(1024, 1), _gaussian_data(256, 2)
    base = {**to_dict(TINY), "epochs": 1}
    raw = train_realnvp2d(TINY.__class__(**{**base, "ema_decay": 0.0}), train, val)
    slow = {**base, "ema_decay": 0.999999, "ema_reset": 0.0}
    kept = train_realnvp2d(TINY.__class__(**slow), train, val)
    reset = train_realnvp2d(TINY.__class__(**{**slow, "ema_reset": 1e-6}), train, val)
    assert reset.best_val_loss == pytest.approx(raw.best_val_loss, abs=1e-6)
    assert kept.best_val_loss > raw.best_val_loss + 1e-3
    for k, v in raw.model.state_dict().items():
        assert torch.equal(v, reset.model.state_dict()[k]), k
    # A margin larger than the difference: no reset, the average is kept.
    margin = train_realnvp2d(TINY.__class__(**{**slow, "ema_reset": 100.0}), train, val)
    assert margin.best_val_loss == kept.best_val_loss


def test_grad_clip_bounds_the_first_adam_step() -> None:
    """One full-batch step from the seeded initialisation. Unclipped, Adam's first step moves
    every coordinate with a gradient by ``lr`` (``m / sqrt(v) = sign(g)``). With the global
    gradient norm clipped to ``c`` every ``|g| <= c``, so the step is at most
    ``lr * c / (c + eps)``: a tenth of ``lr`` for ``c = 1e-9`` and Adam's ``eps = 1e-8``."""
    train, val = _gaussian_data(512, 1), _gaussian_data(128, 2)
    base = {**to_dict(TINY), "epochs": 1, "batch_size": 512, "ema_decay": 0.0, "grad_clip": 0.0}
    init = init_model(TINY.__class__(**base), train).state_dict()

    def largest_move(**extra: float) -> float:
        res = train_realnvp2d(TINY.__class__(**{**base, **extra}), train, val)
        return max(float((v - init[k]).abs().max()) for k, v in res.model.state_dict().items())

    lr = TINY.lr
    assert largest_move() == pytest.approx(lr, rel=1e-3)
    assert largest_move(grad_clip=1e-9) <= lr * 1e-9 / (1e-9 + 1e-8) * (1 + 1e-4)


def test_early_stopping_ends_the_run() -> None:
    train, val = _gaussian_data(512, 1), _gaussian_data(128, 2)
    cfg = RealNVP2DConfig(n_layers=2, hidden_units=8, epochs=200, batch_size=512, patience=2, min_delta=10.0)
    res = train_realnvp2d(cfg, train, val)
    # min_delta 10 nats: only the first epoch counts as an improvement, then 2 bad epochs.
    assert res.epochs_run == 3 and res.best_epoch == 1 and res.stopped_early


def test_nonfinite_loss_stops_and_keeps_last_good_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import genmodels.flows.realnvp2d as mod

    train, val = _gaussian_data(512, 1), _gaussian_data(128, 2)
    resume = tmp_path / "r.pt"
    built: list[torch.nn.Module] = []
    real_init = mod.init_model

    def keep_handle(config: RealNVP2DConfig, data: torch.Tensor | None = None) -> torch.nn.Module:
        built.append(real_init(config, data))
        return built[-1]

    monkeypatch.setattr(mod, "init_model", keep_handle)

    def diverge_after_2(epoch: int, _m: object) -> None:
        if epoch == 2:  # simulate a divergence: the weights epoch 3 trains from are NaN
            with torch.no_grad():
                next(built[0].parameters()).fill_(float("nan"))

    cfg = RealNVP2DConfig(n_layers=2, hidden_units=8, epochs=5, batch_size=128)
    with pytest.raises(NonFiniteLossError, match="epoch 3"):
        train_realnvp2d(cfg, train, val, resume_path=resume, on_epoch=diverge_after_2)
    state = load_checkpoint(resume, kind="realnvp2d_resume")
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_round_trip_and_sampling(tmp_path: Path) -> None:
    train = _gaussian_data(1000, 0)
    model = init_model(TINY, train)
    _randomize(model, 9)
    path = tmp_path / "model.pt"
    save_trained(path, model, TINY)
    loaded, config = load_trained(path, "cpu")
    assert config == to_dict(TINY)
    x = _gaussian_data(50, 1)
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    # Standardisation buffers travel with the weights.
    torch.testing.assert_close(loaded.transform.transforms[0].mean, train.mean(0))

    a, b, c = sample(loaded, 300, seed=1), sample(loaded, 300, seed=1), sample(loaded, 300, seed=2)
    assert a.shape == (300, 2) and torch.equal(a, b) and not torch.equal(a, c)
    # Chunked drawing is the same stream as one big draw.
    torch.testing.assert_close(sample(loaded, 300, seed=1, batch_size=64)[:64], a[:64])

    save_checkpoint(tmp_path / "other.pt", kind="ddpm", config={})
    with pytest.raises(CheckpointError, match="ddpm"):
        load_trained(tmp_path / "other.pt", "cpu")


def test_input_bound_reaches_every_coupling_and_old_checkpoints_load_unbounded(tmp_path: Path) -> None:
    bounded_cfg = dataclasses.replace(TINY, input_bound=2.5)
    couplings = list(build_model(bounded_cfg).transform.transforms)[1:]
    assert [c.input_bound for c in couplings] == [2.5] * TINY.n_layers
    # A checkpoint written before the key existed: its config lacks it, its model is unbounded.
    train = _gaussian_data(1000, 0)
    free_cfg = dataclasses.replace(TINY, input_bound=0.0)
    model = init_model(free_cfg, train)
    _randomize(model, 11, scale=0.8)
    old_config = to_dict(free_cfg)
    del old_config["input_bound"]
    save_checkpoint(tmp_path / "old.pt", kind="realnvp2d", config=old_config, model=model.state_dict())
    loaded, config = load_trained(tmp_path / "old.pt", "cpu")
    assert config["input_bound"] == 0.0
    assert all(c.input_bound == 0.0 for c in list(loaded.transform.transforms)[1:])
    x = _gaussian_data(50, 1) * 3  # wide, so a bound would change the densities
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    bounded = build_model(bounded_cfg)
    bounded.load_state_dict(model.state_dict())
    assert (bounded.log_prob(x) - model.log_prob(x)).abs().max() > 1e-3
    # A new checkpoint keeps its own value.
    save_trained(tmp_path / "new.pt", bounded, bounded_cfg)
    loaded, config = load_trained(tmp_path / "new.pt", "cpu")
    assert config["input_bound"] == 2.5
    torch.testing.assert_close(loaded.log_prob(x), bounded.log_prob(x), rtol=0, atol=0)


def test_config_rejects_unknown_and_out_of_range_keys() -> None:
    with pytest.raises(ConfigError, match="realnvp2d.n_layer"):
        from_mapping(RealNVP2DConfig, {"n_layer": 3}, "realnvp2d")
    with pytest.raises(ConfigError, match="realnvp2d.scale_bound"):
        from_mapping(RealNVP2DConfig, {"scale_bound": 0.0}, "realnvp2d")
    with pytest.raises(ConfigError, match="realnvp2d.ema_reset"):
        from_mapping(RealNVP2DConfig, {"ema_reset": -0.1}, "realnvp2d")
    with pytest.raises(ConfigError, match="realnvp2d.input_bound"):
        from_mapping(RealNVP2DConfig, {"input_bound": -1.0}, "realnvp2d")
    with pytest.raises(ConfigError, match="realnvp2d.lr_decay"):
        from_mapping(RealNVP2DConfig, {"lr_decay": 1.5}, "realnvp2d")
