"""Metrics against independent computations: closed forms, brute force, scipy, Monte-Carlo with SE tolerances."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch

from genmodels.metrics.baselines import GaussianBaseline, ImageBaseline, KDEBaseline
from genmodels.metrics.frechet import frechet_distance, frechet_from_features, gaussian_stats
from genmodels.metrics.roc import auroc, roc_curve
from genmodels.metrics.sample import (
    DEFAULT_BANDWIDTHS,
    energy_distance,
    mmd2,
    mmd2_and_energy,
    null_floors,
    random_directions,
    real_vs_real_floors,
    reference_sums,
    sample_metrics_with_floor,
    sliced_wasserstein2,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gauss(n: int, mean: tuple[float, ...], std: float, g: torch.Generator) -> torch.Tensor:
    return torch.tensor(mean, dtype=torch.float64) + std * torch.randn(n, len(mean), generator=g, dtype=torch.float64)


def mc_mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


# ----------------------------------------------------------------------------- MMD


def rbf_mean(a: np.ndarray, b: np.ndarray, hs: tuple[float, ...]) -> np.ndarray:
    """Mean-of-RBFs kernel matrix from scipy's squared distances (no shared code)."""
    d2 = scipy.spatial.distance.cdist(a, b, "sqeuclidean")
    return np.mean([np.exp(-d2 / (2 * h * h)) for h in hs], axis=0)


def brute_mmd2(x: np.ndarray, y: np.ndarray, hs: tuple[float, ...]) -> float:
    """MMD_b^2 V-statistic: the plain mean of every kernel matrix, diagonals included."""
    return float(rbf_mean(x, x, hs).mean() + rbf_mean(y, y, hs).mean() - 2 * rbf_mean(x, y, hs).mean())


def brute_mmd2_u(x: np.ndarray, y: np.ndarray, hs: tuple[float, ...]) -> float:
    """The unbiased U-statistic (diagonals excluded), only to show a test can tell the two apart."""
    kxx, kyy = rbf_mean(x, x, hs), rbf_mean(y, y, hs)
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * rbf_mean(x, y, hs).mean()
    )


def brute_energy(x: np.ndarray, y: np.ndarray) -> float:
    """ED_V: 2 mean|x-y| - mean|x-x'| - mean|y-y'| over all pairs, diagonals (zeros) included."""
    cd = scipy.spatial.distance.cdist
    return float(2 * cd(x, y).mean() - cd(x, x).mean() - cd(y, y).mean())


def brute_energy_u(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased U-statistic of the energy distance (diagonals excluded)."""
    cd = scipy.spatial.distance.cdist
    n, m = len(x), len(y)
    return float(2 * cd(x, y).mean() - cd(x, x).sum() / (n * (n - 1)) - cd(y, y).sum() / (m * (m - 1)))


@pytest.mark.parametrize("hs", [DEFAULT_BANDWIDTHS, (0.3, 0.7, 1.9)])
@pytest.mark.parametrize("dim", [2, 6])  # 6: the matmul path of the distances, whose diagonal is zeroed
def test_mmd_matches_brute_force(hs: tuple[float, ...], dim: int) -> None:
    g = gen(0)
    x = gauss(300, (0.0,) * dim, 1.0, g)
    y = gauss(257, (0.3, -0.2) + (0.1,) * (dim - 2), 0.8, g)
    ours = mmd2(x, y, hs, chunk=64)  # several blocks, a ragged last one, the symmetric shortcut
    ref = brute_mmd2(x.numpy(), y.numpy(), hs)
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-8)
    # The diagonal's weight is what separates the V- from the U-statistic, by far more than the tolerance.
    assert abs(ref - brute_mmd2_u(x.numpy(), y.numpy(), hs)) > 1e-3 * ref


def test_mmd_identical_sets_is_zero() -> None:
    """For y == x the three kernel means coincide: MMD_b^2 is exactly 0 (the U-statistic is
    2 (S/m^2 - 1) / (m - 1) < 0 there, S the full kernel sum), also for a copy of x."""
    x = gauss(400, (0.0, 0.0), 1.0, gen(1))
    assert mmd2(x, x) == 0.0
    got = mmd2(x, x.clone(), chunk=64)  # x vs x not by the symmetric path: summation order differs
    assert 0.0 <= got < 1e-12
    assert brute_mmd2_u(x.numpy(), x.numpy(), DEFAULT_BANDWIDTHS) < -1e-4


def mean_rbf_gaussians(delta: np.ndarray, var: float, hs: tuple[float, ...]) -> float:
    """E k(X, Y) for the mean-of-RBFs kernel when X - Y ~ N(delta, var I) in D = len(delta) dims:
    E exp(-|Z|^2/(2h^2)) = (h^2/(h^2+var))^(D/2) exp(-|delta|^2/(2(h^2+var)))."""
    d, sq = len(delta), float(delta @ delta)
    return float(np.mean([(h * h / (h * h + var)) ** (d / 2) * math.exp(-sq / (2 * (h * h + var))) for h in hs]))


def expected_mmd2_v_gaussians(delta: np.ndarray, sigma: float, n: int, m: int, hs: tuple[float, ...]) -> float:
    """E[MMD_b^2] of n points of N(0, s^2 I) vs m points of N(delta, s^2 I), exactly:
    1/n + (1 - 1/n) E k(X,X') + 1/m + (1 - 1/m) E k(Y,Y') - 2 E k(X,Y)
    = population MMD^2 + (1/n + 1/m)(1 - E k(X,X'))."""
    k0 = mean_rbf_gaussians(np.zeros_like(delta), 2 * sigma**2, hs)
    kd = mean_rbf_gaussians(delta, 2 * sigma**2, hs)
    return 2 * (k0 - kd) + (1 / n + 1 / m) * (1 - k0)


def test_mmd_shifted_gaussians_expectation() -> None:
    shift, sigma, n, m = (0.5, -0.3), 0.7, 500, 400
    expected = expected_mmd2_v_gaussians(np.array(shift), sigma, n, m, DEFAULT_BANDWIDTHS)
    vals = [
        mmd2(gauss(n, (0.0, 0.0), sigma, gen(100 + 2 * i)), gauss(m, shift, sigma, gen(101 + 2 * i)))
        for i in range(12)
    ]
    mean, se = mc_mean_se(vals)
    assert abs(mean - expected) < 4 * se
    assert expected > 10 * se  # the test can tell a shift from no shift


def test_mmd_null_expectation_is_the_floor() -> None:
    """Both sets from one Gaussian: E[MMD_b^2] = (1/n + 1/m)(1 - E k(X,X')) > 0, and every value is >= 0.
    (The U-statistic averages 0 here: the bias term is many standard errors away from it.)"""
    sigma, n, m = 0.7, 200, 300
    _check_null_expectation(mmd2, expected_mmd2_v_gaussians(np.zeros(2), sigma, n, m, DEFAULT_BANDWIDTHS), sigma, n, m)


def _check_null_expectation(stat: Callable[..., float], expected: float, sigma: float, n: int, m: int) -> None:
    """16 pairs of sets of sizes n, m from N(0, sigma^2 I_2): every value >= 0, their mean within
    4 standard errors of ``expected``, which is > 10 se from 0 (where a U-statistic would be)."""
    vals = [
        stat(gauss(n, (0.0, 0.0), sigma, gen(300 + 2 * i)), gauss(m, (0.0, 0.0), sigma, gen(301 + 2 * i)))
        for i in range(16)
    ]
    mean, se = mc_mean_se(vals)
    assert min(vals) >= 0.0
    assert abs(mean - expected) < 4 * se
    assert expected > 10 * se


# ----------------------------------------------------------------------------- energy distance


def test_energy_distance_matches_brute_force() -> None:
    g = gen(3)
    x, y = gauss(211, (0.0, 0.0, 0.0), 1.0, g), gauss(190, (0.2, 0.0, -0.1), 1.3, g)  # 3-D, unequal sizes
    ref = brute_energy(x.numpy(), y.numpy())
    assert energy_distance(x, y, chunk=50) == pytest.approx(ref, rel=1e-5)
    assert abs(ref - brute_energy_u(x.numpy(), y.numpy())) > 1e-3 * ref  # the diagonal's weight matters
    x6, y6 = gauss(150, (0.0,) * 6, 1.0, g), gauss(120, (0.3,) * 6, 1.0, g)  # the matmul path of the distances
    assert energy_distance(x6, y6, chunk=40) == pytest.approx(brute_energy(x6.numpy(), y6.numpy()), rel=1e-5)


@pytest.mark.parametrize("hs", [DEFAULT_BANDWIDTHS, (0.3, 0.7, 1.9)])
def test_one_pass_mmd_and_energy_with_reused_reference_match_brute_force(hs: tuple[float, ...]) -> None:
    """The evaluation's path: one pass over the pair blocks for both metrics, the test set's
    self-sums computed once and reused for several sample sets."""
    g = gen(5)
    y = gauss(233, (0.0, 0.0), 1.0, g)
    ref = reference_sums(y, hs, chunk=40)
    for x in (gauss(300, (0.4, 0.0), 0.9, g), gauss(97, (0.0, -1.0), 1.5, g)):
        mmd, ed = mmd2_and_energy(x, y, hs, ref=ref, chunk=64)
        assert mmd == pytest.approx(brute_mmd2(x.numpy(), y.numpy(), hs), rel=1e-5, abs=1e-8)
        assert ed == pytest.approx(brute_energy(x.numpy(), y.numpy()), rel=1e-5)
        assert (mmd, ed) == pytest.approx(mmd2_and_energy(x, y, hs), rel=1e-6)  # without a reference
        assert (mmd, ed) == pytest.approx((mmd2(x, y, hs), energy_distance(x, y)), rel=1e-6)
    with pytest.raises(ValueError, match="another reference set"):
        mmd2_and_energy(y, y + 1.0, hs, ref=ref)
    with pytest.raises(ValueError, match="another reference set"):
        mmd2_and_energy(y, y, (1.0,), ref=ref)


def mean_norm_gaussian(delta: float, std: float, dim: int) -> float:
    """E|Z| for Z ~ N(delta e_1, std^2 I): folded normal (1D) or Rice (2D), via scipy."""
    if dim == 1:
        return float(scipy.stats.foldnorm.mean(abs(delta) / std, scale=std))
    return float(scipy.stats.rice.mean(abs(delta) / std, scale=std))


@pytest.mark.parametrize("dim", [1, 2])
def test_energy_distance_gaussians_expectation(dim: int) -> None:
    """E[ED_V] = population ED + E|X-X'|/n + E|Y-Y'|/m, each term in closed form."""
    mu, sx, sy, n, m = 0.6, 1.0, 0.5, 600, 500
    exx, eyy = mean_norm_gaussian(0.0, math.sqrt(2) * sx, dim), mean_norm_gaussian(0.0, math.sqrt(2) * sy, dim)
    expected = 2 * mean_norm_gaussian(mu, math.hypot(sx, sy), dim) - exx - eyy + exx / n + eyy / m
    shift = (mu,) + (0.0,) * (dim - 1)
    vals = [
        energy_distance(gauss(n, (0.0,) * dim, sx, gen(200 + 2 * i)), gauss(m, shift, sy, gen(201 + 2 * i)))
        for i in range(12)
    ]
    mean, se = mc_mean_se(vals)
    assert abs(mean - expected) < 4 * se
    assert expected > 10 * se


def test_energy_distance_null_expectation_gaussian() -> None:
    """Both sets from N(0, s^2 I) in 2D: E[ED_V] = (1/n + 1/m) E|X-X'|, E|X-X'| = s sqrt(pi)
    (X - X' ~ N(0, 2 s^2 I), a Rayleigh norm). The U-statistic would average 0: > 10 se away."""
    sigma, n, m = 0.7, 200, 300
    _check_null_expectation(energy_distance, (1 / n + 1 / m) * sigma * math.sqrt(math.pi), sigma, n, m)


# ----------------------------------------------------------------------------- non-negativity, floors


def arbitrary_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pairs of point sets meant to stress a sign: identical, duplicated, nested, nearly equal,
    same-distribution (where a U-statistic is negative about half the time), tiny, 1D and 6D."""
    g = gen(30)
    x = gauss(120, (0.0, 0.0), 1.0, g)
    pairs = [
        ("identical", x, x),
        ("copy", x, x.clone()),
        ("permuted", x, x[torch.randperm(120, generator=g)]),
        ("duplicated", x, torch.cat([x, x[:40]])),
        ("subset", x[:30], x),
        ("jittered", x, x + 1e-3 * torch.randn(120, 2, generator=g, dtype=torch.float64)),
        ("single points", x[:1], x[1:2]),
        ("one point vs itself", x[:1], x[:1]),
        ("two points", x[:2], x[2:4]),
        ("1d", gauss(50, (0.0,), 1.0, g), gauss(70, (0.0,), 1.0, g)),
        ("6d", gauss(60, (0.0,) * 6, 1.0, g), gauss(80, (0.0,) * 6, 1.0, g)),
        ("far apart", x, x + 100.0),
    ]
    for i in range(10):
        pairs.append((f"same distribution {i}", gauss(15, (0.0, 0.0), 1.0, g), gauss(12, (0.0, 0.0), 1.0, g)))
    return pairs


def test_statistics_are_non_negative_on_arbitrary_sets() -> None:
    u_negative = 0
    for name, x, y in arbitrary_pairs():
        mmd, ed = mmd2_and_energy(x, y, chunk=16)
        assert mmd >= 0.0 and ed >= 0.0, name
        assert mmd2(x, y, chunk=16) >= 0.0 and energy_distance(x, y, chunk=16) >= 0.0, name
        # The brute-force V-statistics in float64 are >= 0 too and agree with ours (to the float32
        # blocks' ~1e-7 of the O(1) kernel and distance means).
        bm, be = brute_mmd2(x.numpy(), y.numpy(), DEFAULT_BANDWIDTHS), brute_energy(x.numpy(), y.numpy())
        assert bm >= -1e-12 and be >= -1e-12, name
        assert mmd == pytest.approx(max(bm, 0.0), rel=1e-4, abs=5e-8), name
        assert ed == pytest.approx(max(be, 0.0), rel=1e-4, abs=1e-6), name
        if name.startswith(("identical", "copy", "permuted", "one point")):
            assert mmd < 1e-12 and ed < 1e-9, name  # the same empirical distribution: exactly 0
        if x.shape[0] > 1 and y.shape[0] > 1:
            u_negative += brute_energy_u(x.numpy(), y.numpy()) < 0
    assert u_negative >= 3  # the sets would catch the U-statistic's sign (it is negative on several)


def test_floor_of_two_real_draws_matches_null_expectation() -> None:
    """A perfect model on eight_gaussians: ``real`` and ``test`` drawn from the exact distribution.
    Averaged over test sets, the floors (means of real draws against the test set) and the
    closed-form ``*_floor_unconditional`` both reach the null expectations (1/n + 1/m) E|X-X'| and
    (1/n + 1/m)(1 - E k(X,X')); E|X-X'| and E k(X,X') come from a large independent Monte-Carlo
    over pairs, with its own standard error. The closed form scatters far less than one draw."""
    from genmodels.data.points2d import get_distribution

    dist = get_distribution("eight_gaussians")
    n, m, reps, n_mc = 256, 384, 48, 400_000
    a, b = dist.sample(n_mc, gen(40)).double(), dist.sample(n_mc, gen(41)).double()
    dist_ab = (a - b).norm(dim=1)
    ker_ab = torch.stack([torch.exp(-(a - b).pow(2).sum(1) / (2 * h * h)) for h in DEFAULT_BANDWIDTHS]).mean(0)
    c = 1 / n + 1 / m
    got: dict[str, list[float]] = {}
    for i in range(reps):
        samples, r1, r2, test = (dist.sample(size, gen(500 + 4 * i + j)) for j, size in enumerate((n, n, n, m)))
        out = sample_metrics_with_floor(samples, [r1, r2], test, seed=i, n_projections=8)
        d_mmd, d_ed = mmd2_and_energy(r1, test)
        for k, v in (("mmd_one_draw", d_mmd), ("energy_distance_one_draw", d_ed)):
            got.setdefault(k, []).append(v)
        for k in ("mmd", "energy_distance"):
            for suffix in ("_floor", "_floor_unconditional"):
                got.setdefault(k + suffix, []).append(out[k + suffix])
    for k, terms in (("energy_distance", dist_ab), ("mmd", 1.0 - ker_ab)):
        expected = c * float(terms.mean())
        se_expected = c * float(terms.std() / math.sqrt(n_mc))
        for suffix in ("_floor", "_floor_unconditional", "_one_draw"):
            vals = got[k + suffix]
            mean, se = mc_mean_se(vals)
            assert min(vals) > 0.0, k
            assert abs(mean - expected) < 4 * math.hypot(se, se_expected), (k, suffix, mean, se, expected)
            assert expected > 10 * se, k  # far from the U-statistic's 0
        assert np.std(got[k + "_floor_unconditional"]) < 0.25 * np.std(got[k + "_one_draw"]), k


def test_floor_se_is_the_scatter_of_the_floor_given_the_test_set() -> None:
    """One test set, 40 independent sets of K = 4 real draws: the floors scatter by their reported se."""
    from genmodels.data.points2d import get_distribution

    dist = get_distribution("eight_gaussians")
    test = dist.sample(300, gen(80))
    dirs = random_directions(16, 2, gen(81))
    ref = reference_sums(test)
    floors: dict[str, list[float]] = {}
    for i in range(40):
        out = real_vs_real_floors([dist.sample(200, gen(1000 + 4 * i + j)) for j in range(4)], ref, dirs)
        for k in ("mmd", "energy_distance", "swd"):
            floors.setdefault(k, []).append(out[k + "_floor"])
            floors.setdefault(k + "_se", []).append(out[k + "_floor_se"])
    for k in ("mmd", "energy_distance", "swd"):
        ratio = float(np.mean(floors[k + "_se"])) / float(np.std(floors[k], ddof=1))
        assert 0.65 < ratio < 1.5, (k, ratio)


def test_floor_follows_an_atypical_test_set() -> None:
    """Two far-apart Gaussians, equal weights; the test set holds 60/40 instead. A perfect model's
    energy distance to it averages the floor (real draws vs the same test set), not the closed-form
    expectation over test sets, which is several times lower."""

    def draw(n: int, frac: float | None, g: torch.Generator) -> torch.Tensor:
        k = int(round(frac * n)) if frac is not None else int(torch.rand(n, generator=g).lt(0.5).sum())
        return torch.cat([gauss(k, (-3.0, 0.0), 0.5, g), gauss(n - k, (3.0, 0.0), 0.5, g)])

    test = draw(400, 0.6, gen(90))
    ref = reference_sums(test)
    dirs = random_directions(8, 2, gen(91))
    out = real_vs_real_floors([draw(300, None, gen(92 + j)) for j in range(8)], ref, dirs)
    model = [mmd2_and_energy(draw(300, None, gen(200 + i)), test, ref=ref)[1] for i in range(24)]
    mean, se = mc_mean_se(model)
    floor, floor_se = out["energy_distance_floor"], out["energy_distance_floor_se"]
    assert abs(mean - floor) < 4 * math.hypot(se, floor_se), (mean, se, floor, floor_se)
    assert out["energy_distance_floor_unconditional"] < floor / 3


def test_null_floors_closed_form_on_a_gaussian() -> None:
    """N(0, s^2 I_2): X - X' ~ N(0, 2 s^2 I), so E|X-X'| = s sqrt(pi) (Rayleigh) and
    E exp(-|X-X'|^2 / (2h^2)) = 1 / (1 + 2 s^2 / h^2). Each test set's floors lie within a few of
    their own standard errors of the exact values."""
    s, n, m = 0.8, 1000, 2000
    c = 1 / n + 1 / m
    exact_ed = c * s * math.sqrt(math.pi)
    exact_mmd = c * (1.0 - float(np.mean([1.0 / (1.0 + 2 * s * s / (h * h)) for h in DEFAULT_BANDWIDTHS])))
    z = []
    for i in range(6):
        ref = reference_sums(gauss(m, (0.0, 0.0), s, gen(700 + i)), chunk=300)
        f = null_floors(ref, n)
        for key, exact in (("energy_distance_floor", exact_ed), ("mmd_floor", exact_mmd)):
            z.append((f[key] - exact) / f[key + "_se"])
            assert abs(f[key] - exact) < 4.5 * f[key + "_se"], (key, f[key], exact, f[key + "_se"])
            assert f[key + "_se"] < 0.05 * exact  # a usable reference: se a few % at m = 2000
    # the pooled z-scores are standard-normal-ish (not all on one side, not too spread)
    assert abs(float(np.mean(z))) < 1.5 and float(np.std(z)) < 2.0


def test_reference_row_sums_match_brute_force() -> None:
    """Row sums of the (symmetric, block-triangular) reference pass against scipy's full matrices."""
    y = gauss(333, (0.1, -0.2), 1.1, gen(60))
    ref = reference_sums(y, chunk=64)  # 333 = 5 full blocks + a ragged one
    yn = y.numpy()
    d = scipy.spatial.distance.cdist(yn, yn)
    k = rbf_mean(yn, yn, DEFAULT_BANDWIDTHS)
    np.testing.assert_allclose(ref.dist_rows.numpy(), d.sum(1), rtol=1e-5)
    np.testing.assert_allclose(ref.kernel_rows.numpy(), k.sum(1), rtol=1e-5)
    assert float(ref.dist) == pytest.approx(float(ref.dist_rows.sum()), rel=1e-12)
    assert float(ref.kernel) == pytest.approx(k.sum(), rel=1e-5)
    # the V-statistics through these sums are unchanged
    x = gauss(200, (0.0, 0.0), 1.0, gen(61))
    assert mmd2_and_energy(x, y, ref=ref, chunk=64)[1] == pytest.approx(brute_energy(x.numpy(), yn), rel=1e-5)


# ----------------------------------------------------------------------------- sliced Wasserstein


def test_swd_of_shifted_set_is_the_projected_shift() -> None:
    x = gauss(1000, (0.0, 0.0), 1.0, gen(4))
    s = torch.tensor([0.7, -0.4], dtype=torch.float64)
    dirs = random_directions(64, 2, gen(5))
    # Sorting commutes with adding a constant: every 1D W2^2 is exactly (theta . s)^2.
    expected = float((dirs @ s).pow(2).mean())
    assert sliced_wasserstein2(x, x + s, directions=dirs, squared=True) == pytest.approx(expected, rel=1e-10)
    assert sliced_wasserstein2(x, x + s, directions=dirs) == pytest.approx(math.sqrt(expected), rel=1e-10)
    # With directions drawn uniformly on the circle, E (theta . s)^2 = |s|^2 / 2.
    proj = (random_directions(4000, 2, gen(6)) @ s).pow(2)
    se = float(proj.std() / math.sqrt(proj.numel()))
    got = sliced_wasserstein2(x, x + s, n_projections=4000, generator=gen(6), squared=True)
    assert abs(got - float(s @ s) / 2) < 4 * se


def test_swd_permutation_invariant_and_zero_on_itself() -> None:
    x = gauss(500, (0.0, 0.0), 1.0, gen(7))
    perm = torch.randperm(500, generator=gen(8))
    assert sliced_wasserstein2(x, x[perm], generator=gen(9)) == 0.0


def test_swd_unequal_sizes_uses_quantiles() -> None:
    """1D, one projection: W2^2 between a set and a 3x replicated copy of it is 0 up to interpolation
    between neighbours; against scipy's W1 as a sanity bound (W1 <= W2)."""
    g = gen(10)
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    y = torch.randn(700, 1, generator=g, dtype=torch.float64) * 1.5 + 0.3
    w2 = sliced_wasserstein2(x, y, directions=torch.ones(1, 1, dtype=torch.float64))
    w1 = scipy.stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert w1 <= w2 + 1e-3
    # Population W2 between N(0,1) and N(0.3, 1.5^2) is sqrt(0.3^2 + 0.5^2).
    assert w2 == pytest.approx(math.hypot(0.3, 0.5), abs=0.12)


def test_floor_uses_same_directions_and_sizes() -> None:
    g = gen(11)
    samples, test = gauss(300, (0.2, 0.0), 1.0, g), gauss(350, (0.0, 0.0), 1.0, g)
    reals = [gauss(300, (0.0, 0.0), 1.0, g) for _ in range(5)]
    out = sample_metrics_with_floor(samples, reals, test, seed=5, n_projections=32)
    dirs = random_directions(32, 2, gen(5))
    # Each floor: the mean over the real draws of the same statistic against the same test set
    # (SWD on the model's directions); se = sd / sqrt(K).
    per_draw = {
        "swd": np.array([sliced_wasserstein2(r, test, directions=dirs) for r in reals]),
        "mmd": np.array([mmd2(r, test) for r in reals]),
        "energy_distance": np.array([energy_distance(r, test) for r in reals]),
    }
    for k, v in per_draw.items():
        assert out[k + "_floor"] == pytest.approx(v.mean(), rel=1e-9), k
        assert out[k + "_floor_se"] == pytest.approx(v.std(ddof=1) / math.sqrt(5), rel=1e-6), k
    assert out["swd"] == pytest.approx(sliced_wasserstein2(samples, test, directions=dirs), rel=1e-12)
    # Closed-form expectations over test sets: (1/n + 1/m) x the U-statistic over the test set's
    # distinct pairs (brute force).
    tn = test.numpy()
    c, m = 1 / 300 + 1 / 350, 350
    d, k = scipy.spatial.distance.cdist(tn, tn), rbf_mean(tn, tn, DEFAULT_BANDWIDTHS)
    assert out["energy_distance_floor_unconditional"] == pytest.approx(c * d.sum() / (m * (m - 1)), rel=1e-5)
    assert out["mmd_floor_unconditional"] == pytest.approx(c * (1 - (k.sum() - m) / (m * (m - 1))), rel=1e-5)
    assert out["mmd"] == pytest.approx(mmd2(samples, test), rel=1e-12)
    assert out["energy_distance"] == pytest.approx(energy_distance(samples, test), rel=1e-12)
    floors = {"mmd_floor", "energy_distance_floor", "swd_floor"}
    assert set(out) == {"mmd", "energy_distance", "swd"} | floors | {f + "_se" for f in floors} | {
        "mmd_floor_unconditional",
        "energy_distance_floor_unconditional",
    }
    # One (n, D) draw, a (K, n, D) stack and a list give the same floors; one draw has no se.
    one = sample_metrics_with_floor(samples, reals[0], test, seed=5, n_projections=32)
    assert one["swd_floor"] == pytest.approx(per_draw["swd"][0], rel=1e-12) and math.isnan(one["swd_floor_se"])
    assert sample_metrics_with_floor(samples, torch.stack(reals), test, seed=5, n_projections=32) == out
    with pytest.raises(ValueError, match="same size"):
        sample_metrics_with_floor(samples, reals[0][:10], test, seed=5)
    with pytest.raises(ValueError, match="same size"):
        real_vs_real_floors([reals[0], reals[1][:10]], reference_sums(test), dirs)


# ----------------------------------------------------------------------------- AUROC / ROC


def brute_auroc(a: np.ndarray, b: np.ndarray) -> float:
    diff = a[:, None] - b[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pair_count_with_ties(seed: int) -> None:
    g = gen(seed)
    a = torch.randint(0, 12, (137,), generator=g).double() + 1.5  # integers: many ties
    b = torch.randint(0, 10, (211,), generator=g).double()
    assert auroc(a, b) == pytest.approx(brute_auroc(a.numpy(), b.numpy()), abs=1e-12)
    a, b = torch.randn(100, generator=g), torch.randn(80, generator=g) - 0.5
    assert auroc(a, b) == pytest.approx(brute_auroc(a.numpy(), b.numpy()), abs=1e-12)
    assert auroc(b, a) == pytest.approx(1 - auroc(a, b), abs=1e-12)


def test_auroc_extremes_and_errors() -> None:
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auroc(torch.ones(5), torch.ones(7)) == 0.5
    with pytest.raises(ValueError, match="finite"):
        auroc(torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_roc_curve_area_equals_auroc() -> None:
    g = gen(12)
    a = torch.randint(0, 8, (90,), generator=g).double()
    b = torch.randint(0, 6, (70,), generator=g).double()
    fpr, tpr, thr = roc_curve(a, b)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert bool((fpr.diff() >= 0).all() and (tpr.diff() >= 0).all())
    assert thr[0] == float("inf") and bool((thr[1:].diff() < 0).all())
    area = float(np.trapezoid(tpr.numpy(), fpr.numpy()))
    assert area == pytest.approx(auroc(a, b), abs=1e-12)
    # Each point is the rates at its threshold, counted directly.
    k = 3
    assert tpr[k] == pytest.approx(float((a >= thr[k]).double().mean()))
    assert fpr[k] == pytest.approx(float((b >= thr[k]).double().mean()))


# ----------------------------------------------------------------------------- Frechet


def test_frechet_diagonal_closed_form() -> None:
    f64 = torch.float64
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=f64), torch.tensor([2.0, 1.0, 0.25], dtype=f64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0], dtype=f64), torch.tensor([1.0, 1.0, 0.0], dtype=f64)
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_general_vs_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T  # c2 full-rank too, non-commuting with c1
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))
    got = frechet_distance(*(torch.from_numpy(t) for t in (mu1, c1, mu2, c2)))
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(*(torch.from_numpy(t) for t in (mu1, c1, mu1, c1))) == pytest.approx(0.0, abs=1e-9)


def test_frechet_singular_covariance_is_finite() -> None:
    """Fewer samples than dimensions give a singular covariance; the symmetric form stays real."""
    g = gen(13)
    a, b = torch.randn(20, 50, generator=g), torch.randn(20, 50, generator=g)
    v = frechet_from_features(a, b)
    assert math.isfinite(v) and v > 0
    s = gaussian_stats(a)
    assert torch.allclose(s.cov, torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)))


# ----------------------------------------------------------------------------- baselines


def test_gaussian_baseline_log_prob_vs_scipy() -> None:
    g = gen(14)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 0.7, 0.2], [0.0, 0.0, 0.3]], dtype=torch.float64
    ) + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    base = GaussianBaseline.fit(x, ridge=1e-3)
    cov = np.cov(x.numpy(), rowvar=False) + 1e-3 * np.eye(3)
    ref = scipy.stats.multivariate_normal(x.numpy().mean(0), cov)
    pts = torch.randn(50, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(base.log_prob(pts).numpy(), ref.logpdf(pts.numpy()), rtol=1e-10)
    s = base.sample(20000, gen(15))
    se = np.sqrt(np.diag(cov) / 20000)
    assert np.all(np.abs(s.mean(0).numpy() - x.numpy().mean(0)) < 4 * se)


def test_gaussian_validated_ridge_maximises_validation_loglik() -> None:
    """Fewer points than dimensions: the chosen ridge is the grid's best by scipy's own log-pdf."""
    g = gen(23)
    a = torch.randn(12, 3, generator=g, dtype=torch.float64)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64) @ a.T + 0.3 * torch.randn(
        10, 12, generator=g, dtype=torch.float64
    )
    val = torch.randn(40, 3, generator=g, dtype=torch.float64) @ a.T + 0.3 * torch.randn(
        40, 12, generator=g, dtype=torch.float64
    )
    ridges = [1e-6, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0]
    base, record = GaussianBaseline.fit_validated(x, val, ridges=ridges)
    cov = np.cov(x.numpy(), rowvar=False)
    ref = [
        scipy.stats.multivariate_normal(x.numpy().mean(0), cov + r * np.eye(12)).logpdf(val.numpy()).mean()
        for r in ridges
    ]
    np.testing.assert_allclose(record["val_loglik"], ref, rtol=1e-9)
    best = ridges[int(np.argmax(ref))]
    assert 1e-3 < best < 3.0  # an interior optimum: neither the singular nor the over-smoothed end
    np.testing.assert_allclose(base.cov.numpy(), cov + best * np.eye(12), rtol=1e-12)


def test_kde_log_prob_vs_scipy_mixture() -> None:
    g = gen(16)
    centers, pts = (
        torch.randn(40, 2, generator=g, dtype=torch.float64),
        torch.randn(30, 2, generator=g, dtype=torch.float64),
    )
    kde = KDEBaseline(centers, 0.37)
    ref = np.log(
        np.mean(
            [scipy.stats.multivariate_normal(c, 0.37**2 * np.eye(2)).pdf(pts.numpy()) for c in centers.numpy()], axis=0
        )
    )
    np.testing.assert_allclose(kde.log_prob(pts, chunk=7).numpy(), ref, rtol=1e-10)


def test_kde_bandwidth_selection_recovers_the_true_scale() -> None:
    """Validation points drawn from a KDE with bandwidth h0 on the same centres: the expected
    validation log-likelihood is maximised by the true density, i.e. at h = h0."""
    g = gen(17)
    centers = 3.0 * torch.randn(150, 2, generator=g, dtype=torch.float64)
    for h0 in (0.05, 0.4):
        idx = torch.randint(0, 150, (3000,), generator=g)
        val = centers[idx] + h0 * torch.randn(3000, 2, generator=g, dtype=torch.float64)
        kde, record = KDEBaseline.fit(centers, val, n_grid=41)
        assert abs(math.log(kde.bandwidth / h0)) < 0.1, (h0, kde.bandwidth)
        assert len(record["bandwidths"]) == len(record["val_loglik"])


def test_kde_subsamples_centers_and_samples_near_them() -> None:
    g = gen(18)
    train = torch.randn(500, 2, generator=g, dtype=torch.float64)
    kde, record = KDEBaseline.fit(train, train[:100], max_centers=200, generator=gen(19))
    assert kde.centers.shape == (200, 2) and record["n_centers"] == [200.0]
    s = kde.sample(4000, gen(20))
    # Each sample is a centre plus h N(0, I): the mean squared distance to the nearest centre is <= 2 h^2.
    d2 = torch.cdist(s, kde.centers).min(1).values.pow(2).mean()
    assert float(d2) <= 2 * kde.bandwidth**2 * 1.1


def test_image_gaussian_baseline_matches_image_flow_gaussian() -> None:
    """Our logit-space Gaussian in bits/dim vs the image flow's own Gaussian (its whitening layer):
    two implementations, same preprocessing and dequantization noise, same numbers."""
    from genmodels.flows.imageflow import gaussian_baseline, per_image_bpd
    from genmodels.training import make_generator

    g = gen(21)
    # Structured 8-bit images: a blurred random blob per image plus noise, some black border.
    base = torch.rand(300, 1, 7, 7, generator=g)
    img = torch.nn.functional.interpolate(base, size=(12, 12), mode="bilinear").squeeze(1)
    images = (img * 200 + 20 * torch.rand(300, 12, 12, generator=g)).clamp(0, 255).to(torch.uint8)
    images[:, 0, :] = 0
    train, test = images[:250], images[250:]
    ours, _ = ImageBaseline.fit("gaussian", train, train[:10], 0.05, generator=make_generator(3))
    theirs = gaussian_baseline(train, 0.05, generator=make_generator(3))
    bpd_ours = ours.bpd(test, make_generator(4))
    bpd_theirs = per_image_bpd(theirs, test, seed=4)
    np.testing.assert_allclose(bpd_ours.numpy(), bpd_theirs.numpy(), atol=2e-3)
    samples = ours.sample_images(16, make_generator(5))
    assert samples.dtype == torch.uint8 and samples.shape == (16, 12, 12)


def test_image_kde_baseline_bpd_and_uniform_reference() -> None:
    """A KDE in logit space, reported in bits/dim: finite, and a uniform pixel model is 8 bpd."""
    from genmodels.training import make_generator

    g = gen(22)
    images = torch.randint(0, 256, (120, 6, 6), generator=g, dtype=torch.uint8)
    kde, record = ImageBaseline.fit("kde", images[:80], images[80:100], 0.05, generator=make_generator(1))
    bpd = kde.bpd(images[100:], make_generator(2))
    assert bpd.shape == (20,) and bool(torch.isfinite(bpd).all())
    # Uniformly random pixels carry 8 bits/dim; no density model can beat that on them by much.
    assert float(bpd.mean()) > 7.5
    assert len(record["bandwidths"]) >= 13
