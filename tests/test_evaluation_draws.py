"""genmodels.evaluation: the 2D models' and baselines' sample metrics are the mean over
``evaluate.sample_draws`` generated draws, with the standard error of that mean, each draw
recomputed here independently through the metric functions."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from genmodels.configs.evaluate import EvaluateConfig
from genmodels.configs.realnvp2d import RealNVP2DConfig
from genmodels.data.points2d import get_distribution, make_splits
from genmodels.evaluation import DRAW_SEED_STRIDE, SEED_OFFSETS, Points, evaluate_realnvp2d
from genmodels.flows.realnvp2d import build_model, sample
from genmodels.metrics.sample import mmd2_and_energy, random_directions, reference_sums, sliced_wasserstein2


def _points() -> Points:
    sp = make_splits("pinwheel", 512, 128, 384, 0)
    dist = get_distribution("pinwheel")
    h, h_se = dist.entropy()
    return Points(sp.train, sp.val, sp.test, "pinwheel", dist, h, h_se)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(RealNVP2DConfig(n_layers=2, hidden_units=8))
    with torch.no_grad():  # non-identity: the zero-initialised output layers get random weights
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _cfg(draws: int) -> EvaluateConfig:
    return EvaluateConfig(
        n_samples=300, swd_projections=16, floor_draws=2, sample_draws=draws, kde_max_centers=256, kde_grid=5
    )


def test_sample_metrics_are_the_mean_and_se_over_draws() -> None:
    points, model = _points(), _model()
    cfg = _cfg(3)
    m = evaluate_realnvp2d(model, points, cfg, torch.device("cpu")).metrics
    assert m["sample_draws"] == 3

    # Independently: each draw from its own seed, scored against the test split.
    test = points.test.float()
    ref = reference_sums(test, cfg.mmd_bandwidths)
    g_dir = torch.Generator().manual_seed(cfg.seed + SEED_OFFSETS["directions"])
    directions = random_directions(cfg.swd_projections, 2, g_dir)
    per: dict[str, list[float]] = {"mmd": [], "energy_distance": [], "swd": [], "sample_logp": []}
    for k in range(3):
        x = sample(model, cfg.n_samples, seed=cfg.seed + SEED_OFFSETS["samples"] + DRAW_SEED_STRIDE * k)
        mmd, ed = mmd2_and_energy(x, test, cfg.mmd_bandwidths, ref=ref)
        per["mmd"].append(mmd)
        per["energy_distance"].append(ed)
        per["swd"].append(sliced_wasserstein2(x, test, directions=directions))
        per["sample_logp"].append(float(points.distribution.log_prob(x).double().mean()))
    for key, vals in per.items():
        assert len(set(vals)) == 3, key  # three different draws, not one draw three times
        assert m[key] == pytest.approx(statistics.fmean(vals), rel=1e-9, abs=1e-12), key
        assert m[key + "_se"] == pytest.approx(statistics.stdev(vals) / math.sqrt(3), rel=1e-6, abs=1e-12), key
    # The baselines are averaged the same way.
    assert {"baseline_kde_energy_distance_se", "baseline_gaussian_swd_se"} <= set(m)


def test_one_draw_is_the_first_draw_and_has_no_se() -> None:
    points, model = _points(), _model()
    one = evaluate_realnvp2d(model, points, _cfg(1), torch.device("cpu")).metrics
    x = sample(model, 300, seed=SEED_OFFSETS["samples"])
    test = points.test.float()
    ed = mmd2_and_energy(x, test, EvaluateConfig().mmd_bandwidths)[1]
    assert one["energy_distance"] == pytest.approx(ed, rel=1e-9)
    for key in ("mmd", "energy_distance", "swd", "sample_logp", "baseline_kde_swd", "baseline_gaussian_mmd"):
        assert key in one and key + "_se" not in one, key
    # The floors do not depend on the number of generated draws.
    three = evaluate_realnvp2d(model, points, _cfg(3), torch.device("cpu")).metrics
    assert one["energy_distance_floor"] == three["energy_distance_floor"]


def test_sample_draws_must_be_positive() -> None:
    from genmodels.configs.base import ConfigError

    with pytest.raises(ConfigError, match="sample_draws"):
        EvaluateConfig(sample_draws=0).validate("evaluate")
