"""genmodels.plotting: the process snapshots reproduce the library's samplers exactly, the density
grids are densities (checked against closed forms and direct counts), and PNGs are byte-stable."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from genmodels import plotting as gp
from genmodels.diffusion import build_model as build_ddpm
from genmodels.diffusion import sample_ancestral
from genmodels.ebm import EnergyMLP, sample_model
from genmodels.training import make_generator


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Non-trivial weights (zero-initialised output layers would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _tiny_ddpm(parameterization: str = "mean"):  # noqa: ANN202
    cfg = {
        "n_steps": 20,
        "beta2_start": 1e-4,
        "beta2_end": 0.05,
        "parameterization": parameterization,
        "time_embed_dim": 8,
        "hidden_units": 16,
        "n_hidden": 2,
    }
    model = build_ddpm(cfg)
    _randomize(model.net, 1)
    model.set_standardization(torch.randn(256, 2, generator=torch.Generator().manual_seed(2)) * 3 + 1)
    return model.eval()


@pytest.mark.parametrize("parameterization", ["mean", "eps"])
def test_ddpm_reverse_snapshots_end_exactly_at_sample_ancestral(parameterization: str) -> None:
    model = _tiny_ddpm(parameterization)
    steps = gp.snapshot_steps(model.n_steps)
    snaps = gp.ddpm_reverse_snapshots(model, 64, steps, make_generator(7))
    ref = sample_ancestral(model, 64, generator=make_generator(7))
    assert set(snaps) == set(steps)
    assert torch.equal(snaps[0], ref)
    # The first snapshot is the starting noise: the generator's first draw.
    assert torch.equal(snaps[model.n_steps], torch.randn(64, 2, generator=make_generator(7)))


def test_ddpm_forward_snapshots_follow_the_closed_form_marginals() -> None:
    """q(x_t | x_0) = N(abar_t x0, (1 - abar_t^2) I): mean and variance of the residual."""
    model = _tiny_ddpm()
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3)) * 3 + 1
    snaps = gp.ddpm_forward_snapshots(model, x0, [0, 5, 20], make_generator(4))
    z0 = model.standardize(x0)
    assert torch.allclose(snaps[0], z0)  # t = 0 is the data (no noise)
    for t in (5, 20):
        abar = float(model.schedule.abar[t])
        resid = (snaps[t] - abar * z0).double()
        var = 1 - abar**2
        se_mean = math.sqrt(var / resid.shape[0])
        assert resid.mean(0).abs().max() < 4 * se_mean
        # variance estimate of a Gaussian: se = var * sqrt(2 / n)
        assert (resid.var(0) - var).abs().max() < 4 * var * math.sqrt(2 / resid.shape[0])


def test_langevin_snapshots_end_exactly_at_sample_model() -> None:
    energy = EnergyMLP(784, (16,))
    _randomize(energy, 5, scale=0.05)
    cfg = {"step_size": 10.0, "noise_std": 5e-3, "grad_clip": 0.03, "sample_steps": 12}
    snaps = gp.langevin_snapshots(energy, cfg, 6, [0, 3, 7, 12], generator=make_generator(9))
    ref = sample_model(energy, cfg, 6, generator=make_generator(9))
    assert sorted(snaps) == [0, 3, 7, 12]
    assert torch.equal(snaps[12].reshape(6, 1, 28, 28), ref)
    assert torch.equal(snaps[0], torch.rand((6, 784), generator=make_generator(9)))
    # The chain moved, and stayed in the pixel range.
    assert not torch.equal(snaps[3], snaps[0]) and float(snaps[7].min()) >= 0 and float(snaps[7].max()) <= 1


def test_density_grid_integrates_a_gaussian_and_matches_its_closed_form() -> None:
    mu, sigma = torch.tensor([0.5, -0.3]), 0.7

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        return -((x - mu) ** 2).sum(1) / (2 * sigma**2) - math.log(2 * math.pi * sigma**2)

    limits = (-4.0, 4.0, -4.5, 3.5)
    grid, extent = gp.density_grid(limits, 120)
    dens = gp.evaluate_on_grid(log_prob, grid)
    cell = (8.0 / 120) * (8.0 / 120)
    assert extent == limits
    assert abs(float(dens.sum()) * cell - 1.0) < 1e-4  # midpoint rule on a smooth density, >5 sigma box
    # Row-major from the bottom: the cell containing mu is where the density peaks.
    i = int(dens.argmax())
    r, c = divmod(i, 120)
    assert abs(float(grid[i, 0]) - 0.5) <= 8 / 120 and abs(float(grid[i, 1]) + 0.3) <= 8 / 120
    assert float(grid[i, 1]) == pytest.approx(-4.5 + (r + 0.5) * 8 / 120)
    assert float(grid[i, 0]) == pytest.approx(-4.0 + (c + 0.5) * 8 / 120)


def test_histogram_density_counts_points_per_cell() -> None:
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(5000, 2, generator=g) * 6 - 3  # some fall outside the limits below
    limits, n = (-2.0, 2.0, -2.0, 2.0), 10
    dens = gp.histogram_density(pts, limits, n)
    area = (4.0 / n) ** 2
    inside = ((pts.abs() < 2).all(1)).sum().item()
    assert float(dens.sum()) * area * pts.shape[0] == pytest.approx(inside)
    # One cell by brute force: bottom-left cell [-2, -1.6) x [-2, -1.6).
    in_cell = ((pts[:, 0] >= -2) & (pts[:, 0] < -1.6) & (pts[:, 1] >= -2) & (pts[:, 1] < -1.6)).sum().item()
    assert float(dens[0]) * area * pts.shape[0] == pytest.approx(in_cell)


def test_save_png_is_byte_identical_and_carries_no_software_tag(tmp_path) -> None:  # noqa: ANN001
    pts = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    paths = []
    for k in range(2):
        fig = gp.realnvp_results(pts, pts * 0.5, pts + 1, "test figure")
        paths.append(gp.save_png(fig, tmp_path / f"f{k}.png"))
        plt.close(fig)
    a, b = (p.read_bytes() for p in paths)
    assert a == b
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 300
    assert "Software" not in img.info


def test_read_series_keeps_missing_cells_as_nan(tmp_path) -> None:  # noqa: ANN001
    p = tmp_path / "train.csv"
    p.write_text("epoch,train_loss,val_loss\n1,2.5,3\n2,2.0,\n")
    rows = gp.read_series(p)
    assert rows[0] == {"epoch": 1.0, "train_loss": 2.5, "val_loss": 3.0}
    assert rows[1]["train_loss"] == 2.0 and math.isnan(rows[1]["val_loss"])
    fig = gp.loss_curves_figure(rows, [("nats", ["train_loss", "val_loss"]), ("absent", ["nope"])], "t", {"H": 1.0})
    assert len(fig.axes) == 1  # the group with no column present is dropped
    plt.close(fig)


def test_snapshot_steps_descend_from_L_to_0_without_repeats() -> None:
    for n_steps in (1, 2, 5, 50, 2500):
        s = gp.snapshot_steps(n_steps)
        assert s[0] == n_steps and s[-1] == 0
        assert all(a > b for a, b in zip(s, s[1:]))
    assert gp.snapshot_steps(2500) == [2500, 1250, 625, 312, 156, 78, 0]


def test_tile_places_each_image_at_its_cell() -> None:
    imgs = torch.arange(5, dtype=torch.uint8).reshape(5, 1, 1).expand(5, 3, 3).contiguous() * 40
    grid = gp.tile(imgs, nrow=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 4 + 1)
    for k in range(5):
        r, c = divmod(k, 2)
        assert (grid[1 + 4 * r : 4 + 4 * r, 1 + 4 * c : 4 + 4 * c] == 40 * k).all()
    assert (grid[9:12, 5:8] == 128).all()  # the empty sixth cell is padding grey
