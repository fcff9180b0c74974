"""The 2D point sets: exact log-densities integrate to 1, match their own samples, give an entropy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from genmodels.data import points2d as P
from genmodels.data.points2d import POINT_SETS, CurveMixture, PointSetError, get_distribution, read_points_csv

NAMES = list(POINT_SETS)
H = 0.05  # grid step; cell edges fall on integers, so the checkerboard is integrated exactly
LIM = 7.0


def _grid() -> tuple[torch.Tensor, float]:
    n = int(2 * LIM / H)
    centers = -LIM + H * (torch.arange(n, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(centers, centers, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1), H * H


@pytest.fixture(scope="module")
def grid_logp() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pts, _ = _grid()
    return {name: (pts, get_distribution(name).log_prob(pts)) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_integrates_to_one(name: str, grid_logp) -> None:  # noqa: ANN001
    _, lp = grid_logp[name]
    mass = float(lp.exp().sum() * H * H)
    assert abs(mass - 1.0) < 1e-3, f"{name}: integral {mass}"


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_matches_histogram_of_own_samples(name: str, grid_logp) -> None:  # noqa: ANN001
    """Counts in 0.5 x 0.5 cells vs n * (density integrated over the cell): binomial z-scores."""
    pts, lp = grid_logp[name]
    n = 200_000
    x = get_distribution(name).sample(n, torch.Generator().manual_seed(1)).double()
    cell = 0.5
    n_cells = int(2 * LIM / cell)
    # expected cell probabilities from the grid (each 0.5-cell holds 25 x 25 grid points)
    prob = (lp.exp() * H * H).reshape(int(2 * LIM / H), int(2 * LIM / H))
    k = int(cell / H)
    prob = prob.reshape(n_cells, k, n_cells, k).sum(dim=(1, 3))
    idx = torch.floor((x + LIM) / cell).long()
    inside = ((idx >= 0) & (idx < n_cells)).all(dim=1)
    counts = torch.zeros(n_cells, n_cells, dtype=torch.float64)
    counts.index_put_((idx[inside, 0], idx[inside, 1]), torch.ones(int(inside.sum()), dtype=torch.float64), accumulate=True)
    expected = n * prob
    mask = expected > 20
    z = (counts[mask] - expected[mask]) / torch.sqrt(expected[mask] * (1 - prob[mask]))
    # ~hundreds of cells: |z| < 5 for all is a loose-enough family-wise bound, tight enough to catch a wrong density
    assert z.abs().max() < 5.0, f"{name}: max |z| = {float(z.abs().max()):.2f}"
    # nearly all samples fall in cells the density says carry mass
    assert float(counts[~mask].sum()) / n < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_entropy_monte_carlo_matches_grid_integral(name: str, grid_logp) -> None:  # noqa: ANN001
    _, lp = grid_logp[name]
    p = lp.exp()
    finite = p > 0
    h_grid = float(-(p[finite] * lp[finite]).sum() * H * H)
    h_mc, se = get_distribution(name).entropy(n=1 << 17, seed=3)
    assert se < 0.01
    assert abs(h_mc - h_grid) < 4 * se + 2e-3, f"{name}: MC {h_mc:.4f} +- {se:.4f} vs grid {h_grid:.4f}"


def test_checkerboard_entropy_is_log_8() -> None:
    assert get_distribution("checkerboard").entropy() == (math.log(8), 0.0)


def test_checkerboard_edges_belong_to_the_dark_squares() -> None:
    """A point on a cell edge or corner is inside exactly when a dark square touches it: the OR of
    the four points nudged diagonally off it, which lie strictly inside cells (no tie to break)."""
    d = get_distribution("checkerboard")
    ticks = torch.arange(-10, 11, dtype=torch.float64) / 4  # -2.5 .. 2.5: integers, cell interiors, outside
    gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], dim=1)
    eps = 1e-6
    nudged = torch.stack([d.inside(pts + eps * torch.tensor([sx, sy])) for sx in (-1, 1) for sy in (-1, 1)])
    interior = (pts.frac() != 0).all(dim=1)  # cell interiors: the point's own cell decides, as before
    expected = torch.where(interior, d.inside(pts + eps), nudged.any(dim=0))
    assert torch.equal(d.inside(pts), expected)
    assert torch.isfinite(d.log_prob(pts[expected])).all()
    # the float32 sample that used to score -inf: x1 = -1 - 1e-9 rounds onto the edge x1 = -1
    edge = torch.tensor([[-1.0 - 1e-9, 0.3947817385196686]], dtype=torch.float64)
    assert bool(d.inside(edge)) and bool(d.inside(edge.float()))


@pytest.mark.parametrize(("curve", "sigma", "panels", "kw"), [
    (P._moons_curve, 0.2, 16, {}),
    (P._spirals_curve, 0.1, 64, {"log_rho": lambda s: torch.log(2 * s), "s_from_u": torch.sqrt}),
])
def test_quadrature_error_far_below_1e_3_nats(curve, sigma, panels, kw) -> None:  # noqa: ANN001
    coarse = CurveMixture("c", curve, sigma, panels, **kw)
    fine = CurveMixture("f", curve, sigma, panels * 8, **kw)
    g = torch.Generator().manual_seed(0)
    x = coarse.sample(3000, g)
    x = torch.cat([x, x + 0.5 * torch.randn(x.shape, generator=g)])  # also off the data
    a, b = coarse.log_prob(x), fine.log_prob(x)
    relevant = b > -15
    assert float((a - b)[relevant].abs().max()) < 1e-4


def test_sampling_is_seeded() -> None:
    for name in NAMES:
        d = get_distribution(name)
        a = d.sample(100, torch.Generator().manual_seed(5))
        b = d.sample(100, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (100, 2)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown 2D point set 'swiss'"):
        get_distribution("swiss")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x,y\n" + "1,2\n" * 20 + "1,2,3\n", "row 22: expected 2 comma-separated columns"),
        ("x,y\n" + "1,2\n" * 5 + "1,abc\n" + "1,2\n" * 20, "row 7: non-numeric value"),
        ("1,2\n" * 3 + "nan,1\n" + "1,2\n" * 20, "row 4: non-finite value"),
        ("1,2\n" * 3 + "1,inf\n" + "1,2\n" * 20, "row 4: non-finite value"),
        ("x,y\n" + "1,2\n" * 5, "only 5 data rows"),
        ("", "only 0 data rows"),
    ],
)
def test_bad_csv_names_the_row(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "pts.csv"
    f.write_text(text)
    with pytest.raises(PointSetError, match=fragment):
        read_points_csv(f)


def test_good_csv_with_header(tmp_path: Path) -> None:
    f = tmp_path / "pts.csv"
    f.write_text("x,y\n" + "".join(f"{i},{-i * 0.5}\n" for i in range(30)))
    pts = read_points_csv(f)
    assert pts.shape == (30, 2) and float(pts[3, 1]) == -1.5
