"""Figure builders for the ``plot`` stage: the seeds' three-panel figures, density heat maps,
diffusion and Langevin process snapshots, image grids, temperature sweeps and loss curves.

Everything renders with matplotlib's Agg backend (no display needed). Reproducibility: every
random draw takes an explicit ``torch.Generator`` and :func:`save_png` strips the PNG's
``Software`` tag, so the same inputs and seeds give byte-identical files (matplotlib writes no
timestamp into PNGs).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

DPI = 100
POINT_STYLE: dict[str, Any] = {"linewidths": 0, "rasterized": True}


def _point_style(n: int) -> dict[str, Any]:
    """Marker size/opacity for ``n`` points: thousands of faint dots, or a few hundred visible ones."""
    return {**POINT_STYLE, "s": float(min(8.0, max(0.5, 4000.0 / max(n, 1)))), "alpha": 0.35 if n > 2000 else 0.7}


# ----------------------------------------------------------------------------------- files


def save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG without the ``Software`` tag (matplotlib adds its version there).

    Returns the path; the figure stays open (the caller may still log it, then close it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return path


def read_series(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """A per-epoch CSV (``History.to_csv``: header, numeric cells, empty = missing) as rows.

    Missing cells become NaN so that columns stay aligned with ``epoch``.
    """
    rows: list[dict[str, float]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: (float(v) if v not in ("", None) else math.nan) for k, v in r.items() if k is not None})
    return rows


# ----------------------------------------------------------------------------------- 2D points


def _np(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def data_limits(*point_sets: Tensor, margin: float = 0.1, quantile: float = 0.999) -> tuple[float, float, float, float]:
    """Square-ish axis limits ``(xmin, xmax, ymin, ymax)`` covering the central ``quantile`` of
    the given (N, 2) sets (a few far-out model samples must not shrink the picture)."""
    pts = torch.cat([p.detach().cpu().double() for p in point_sets])
    pts = pts[torch.isfinite(pts).all(1)]
    lo = torch.quantile(pts, 1 - quantile, dim=0)
    hi = torch.quantile(pts, quantile, dim=0)
    span = (hi - lo).max().item() * (1 + 2 * margin) / 2
    mid = (hi + lo) / 2
    return (mid[0].item() - span, mid[0].item() + span, mid[1].item() - span, mid[1].item() + span)


def scatter_panels(
    panels: Sequence[tuple[str, Tensor]],
    limits: Sequence[tuple[float, float, float, float] | None],
    title: str,
    axis_labels: Sequence[tuple[str, str]] | None = None,
) -> Figure:
    """One row of scatter plots.

    Args:
        panels: ``(panel title, points (N, 2))``.
        limits: per panel ``(xmin, xmax, ymin, ymax)`` or None (matplotlib's choice).
        title: the figure title.
        axis_labels: per panel ``(xlabel, ylabel)``; default ``x1``/``x2``.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False, layout="constrained")
    for i, (ax, (name, pts)) in enumerate(zip(axes[0], panels, strict=True)):
        p = _np(pts)
        ax.scatter(p[:, 0], p[:, 1], c="tab:blue", **_point_style(p.shape[0]))
        ax.set_title(f"{name}\n({p.shape[0]:,} points)", fontsize=10)
        lim = limits[i]
        if lim is not None:
            ax.set_xlim(lim[0], lim[1])
            ax.set_ylim(lim[2], lim[3])
        ax.set_box_aspect(1)  # square panels; the limits are square, so x and y scale alike
        xl, yl = axis_labels[i] if axis_labels else ("x1", "x2")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.2)
    fig.suptitle(title, fontsize=11)
    return fig


def realnvp_results(data: Tensor, latent: Tensor, samples: Tensor, title: str) -> Figure:
    """The seed's RealNVP figure: test data | latent ``z = f(x)`` (should look N(0, I)) | samples.

    Args: data, latent, samples: (N, 2) each, data units (latent in noise units).
    """
    lim = data_limits(data)
    return scatter_panels(
        [
            ("Original data (test split)", data),
            ("Latent z = f(x)", latent),
            ("Generated samples f⁻¹(z), z ~ N(0, I)", samples),
        ],
        [lim, (-4.0, 4.0, -4.0, 4.0), lim],
        title,
        [("x1", "x2"), ("z1", "z2"), ("x1", "x2")],
    )


def ddpm_results(data: Tensor, diffused: Tensor, samples: Tensor, title: str) -> Figure:
    """The seed's DDPM figure: data | fully forward-diffused ``x_L ~ q(x_L | x_0)`` | samples.

    Args: data, samples: (N, 2) data units; diffused: (N, 2) in the model's standardised units.
    """
    lim = data_limits(data)
    return scatter_panels(
        [
            ("Original data (test split)", data),
            ("Forward diffused x_L ~ q(x_L | x_0)", diffused),
            ("Generated samples (reverse chain)", samples),
        ],
        [lim, (-4.0, 4.0, -4.0, 4.0), lim],
        title,
        [("x1", "x2"), ("standardised x1", "standardised x2"), ("x1", "x2")],
    )


def density_grid(
    limits: tuple[float, float, float, float], n: int = 200
) -> tuple[Tensor, tuple[float, float, float, float]]:
    """Cell centres (n*n, 2) of an ``n`` x ``n`` grid over ``limits``, row-major from the bottom
    (row ``i`` has ``x2`` = the i-th value), and the ``extent`` for ``imshow(origin='lower')``."""
    xmin, xmax, ymin, ymax = limits
    dx, dy = (xmax - xmin) / n, (ymax - ymin) / n
    xs = torch.linspace(xmin + dx / 2, xmax - dx / 2, n, dtype=torch.float64)
    ys = torch.linspace(ymin + dy / 2, ymax - dy / 2, n, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), (xmin, xmax, ymin, ymax)


def evaluate_on_grid(log_prob: Callable[[Tensor], Tensor], grid: Tensor, chunk: int = 8192) -> Tensor:
    """``exp(log_prob)`` on ``grid`` (M, 2) in chunks, as float64 (M,); ``-inf`` -> density 0.

    ``log_prob`` gets float32 points on the CPU (move the model there or wrap it).
    """
    out = []
    with torch.no_grad():
        for i in range(0, grid.shape[0], chunk):
            lp = log_prob(grid[i : i + chunk].float()).double()
            out.append(torch.exp(lp))
    return torch.nan_to_num(torch.cat(out), nan=0.0, posinf=0.0)


def histogram_density(points: Tensor, limits: tuple[float, float, float, float], n: int = 200) -> Tensor:
    """Normalised 2D histogram of ``points`` (N, 2) on the :func:`density_grid` cells, (n*n,)
    float64 in density units (counts / (N * cell area)); points outside ``limits`` still count in N."""
    xmin, xmax, ymin, ymax = limits
    p = points.detach().cpu().double()
    p = p[torch.isfinite(p).all(1)]
    ix = torch.floor((p[:, 0] - xmin) / (xmax - xmin) * n).long()
    iy = torch.floor((p[:, 1] - ymin) / (ymax - ymin) * n).long()
    keep = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
    counts = torch.bincount(iy[keep] * n + ix[keep], minlength=n * n).double()
    area = (xmax - xmin) * (ymax - ymin) / (n * n)
    return counts / (max(points.shape[0], 1) * area)


def density_figure(
    panels: Sequence[tuple[str, Tensor]],
    extent: tuple[float, float, float, float],
    title: str,
    difference: tuple[str, Tensor, Tensor] | None = None,
) -> Figure:
    """Heat maps of densities on one grid with one shared colour scale (so they compare at a
    glance), and optionally a signed difference map.

    Args:
        panels: ``(panel title, density (n*n,))`` from :func:`density_grid` order.
        extent: the grid's ``(xmin, xmax, ymin, ymax)``.
        difference: ``(title, a (n*n,), b (n*n,))`` -> a panel of ``a - b`` on a symmetric
            diverging scale.
    """
    n = math.isqrt(panels[0][1].numel())
    k = len(panels) + (difference is not None)
    fig, axes = plt.subplots(1, k, figsize=(4.4 * k, 4.4), squeeze=False, layout="constrained")
    # Shared scale clipped at the 99.5th percentile of the reference density: a few very high
    # cells (a sharp model, histogram noise) must not wash out the rest of the picture.
    ref = panels[0][1]
    vmax = float(torch.quantile(ref[ref > 0], 0.995)) if bool((ref > 0).any()) else float(ref.max()) or 1.0
    im = None
    for ax, (name, dens) in zip(axes[0], panels, strict=False):
        im = ax.imshow(
            _np(dens).reshape(n, n),
            origin="lower",
            extent=extent,
            cmap="viridis",
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    assert im is not None
    fig.colorbar(im, ax=list(axes[0][: len(panels)]), shrink=0.8, label="density")
    if difference is not None:
        name, a, b = difference
        d = _np(a - b).reshape(n, n)
        lim = float(np.quantile(np.abs(d), 0.995)) or 1.0
        ax = axes[0][-1]
        im2 = ax.imshow(d, origin="lower", extent=extent, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        fig.colorbar(im2, ax=ax, shrink=0.8, label="density difference")
    fig.suptitle(title, fontsize=11)
    return fig


# ----------------------------------------------------------------------------------- diffusion


@torch.inference_mode()
def ddpm_forward_snapshots(
    model: Any, x0: Tensor, steps: Sequence[int], generator: torch.Generator
) -> dict[int, Tensor]:
    """Samples of ``q(x_t | x_0)`` for each ``t`` in ``steps``, in standardised units.

    Args:
        model: a :class:`genmodels.diffusion.DDPM`; x0: (N, 2) data units.
        steps: steps in ``0..L``; one independent noise draw each (from ``generator``).
    Returns:
        ``{t: (N, 2)}`` on the CPU.
    """
    dev = model.shift.device
    z0 = model.standardize(x0.to(dev, torch.float32))
    out: dict[int, Tensor] = {}
    for t in steps:
        noise = torch.randn(z0.shape, generator=generator, device=dev)
        tt = torch.full((z0.shape[0],), int(t), device=dev, dtype=torch.long)
        out[int(t)] = model.schedule.add_noise(z0, noise, tt).cpu()
    return out


def ddpm_reverse_snapshots(
    model: Any, n: int, steps: Sequence[int], generator: torch.Generator, precision: str = "auto"
) -> dict[int, Tensor]:
    """The full ancestral chain of :func:`genmodels.diffusion.sample_ancestral`, recording ``x_t``
    for each ``t`` in ``steps`` (``L`` = the starting noise, ``0`` = the returned samples).

    It *is* ``sample_ancestral`` (with its ``on_step`` hook): with the same generator state and
    ``precision`` the ``t = 0`` snapshot equals its output. States are recorded in standardised
    units, except ``t = 0`` in data units (what the samplers return).

    Returns:
        ``{t: (n, 2)}`` on the CPU.
    """
    from genmodels.diffusion.sampling import sample_ancestral

    want = {int(t) for t in steps}
    out: dict[int, Tensor] = {}

    def record(t: int, x: Tensor) -> None:
        if t in want and t > 0:
            out[t] = x.detach().to("cpu", copy=True)  # the sampler updates x in place

    samples = sample_ancestral(model, n, generator=generator, precision=precision, on_step=record)
    if 0 in want:
        out[0] = samples.cpu()
    return out


def snapshot_steps(n_steps: int, k: int = 7) -> list[int]:
    """``k`` steps from ``L`` down to 0, geometrically denser near 0 (where the reverse chain
    forms the data's shape), without duplicates: e.g. L=2500 -> 2500, 1250, 625, 312, 156, 78, 0."""
    steps = [n_steps]
    for _ in range(k - 2):
        nxt = steps[-1] // 2
        if nxt <= 0 or nxt == steps[-1]:
            break
        steps.append(nxt)
    return [*steps, 0]


def process_figure(
    rows: Sequence[tuple[str, Mapping[int, Tensor]]],
    limits: Sequence[tuple[float, float, float, float]],
    title: str,
) -> Figure:
    """A grid of scatter plots: one row per process (e.g. forward / reverse), one column per step.

    Args:
        rows: ``(row label, {t: (N, 2)})``; every row has the same steps (columns, descending t).
        limits: per column axis limits.
    """
    steps = sorted(rows[0][1], reverse=True)
    fig, axes = plt.subplots(
        len(rows), len(steps), figsize=(2.6 * len(steps), 2.8 * len(rows)), squeeze=False, layout="constrained"
    )
    for r, (label, snaps) in enumerate(rows):
        for c, t in enumerate(steps):
            ax = axes[r][c]
            p = _np(snaps[t])
            ax.scatter(p[:, 0], p[:, 1], c="tab:blue" if r == 0 else "tab:orange", **_point_style(p.shape[0]))
            lim = limits[c]
            ax.set_xlim(lim[0], lim[1])
            ax.set_ylim(lim[2], lim[3])
            ax.set_box_aspect(1)  # square panels; the limits are square, so x and y scale alike
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"t = {t}", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


# ----------------------------------------------------------------------------------- images


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] with 784 pixels per item -> uint8 (N, 28, 28)."""
    x = images.detach().float().cpu().reshape(images.shape[0], 28, 28)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def tile(images: Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W) -> one (rows*(H+pad)+pad, nrow*(W+pad)+pad) uint8 array, grey padding."""
    n, h, w = images.shape
    rows = max(1, math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=np.uint8)
    imgs = images.detach().cpu().numpy()
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = imgs[k]
    return grid


def image_grids_figure(grids: Sequence[tuple[str, Tensor]], title: str, nrow: int = 8) -> Figure:
    """Side-by-side image grids (e.g. real | model samples | baseline samples).

    Args: grids: ``(panel title, uint8 images (N, 28, 28))``.
    """
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6), squeeze=False, layout="constrained")
    for ax, (name, imgs) in zip(axes[0], grids, strict=True):
        ax.imshow(tile(imgs, nrow), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{name}\n({imgs.shape[0]} images)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    return fig


def image_rows_figure(rows: Sequence[tuple[str, Tensor]], title: str) -> Figure:
    """One labelled row of images per entry (a chain's steps, a temperature sweep, an interpolation).

    Args: rows: ``(row label, uint8 images (K, 28, 28))``, the same K for every row.
    """
    k = rows[0][1].shape[0]
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(0.75 * k + 1.8, 0.85 * len(rows) + 0.8), squeeze=False, layout="constrained"
    )
    for ax, (label, imgs) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(tile(imgs, k), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def langevin_snapshots(
    energy: Callable[[Tensor], Tensor],
    config: Mapping[str, Any],
    n: int,
    checkpoints: Sequence[int],
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Long-run Langevin from uniform noise (as :func:`genmodels.ebm.sample_model`), recording the
    chains after each number of steps in ``checkpoints`` (0 = the starting noise).

    The chain is run in segments with the same generator, so the draws are exactly those of one
    ``sample_model(..., n_steps=max(checkpoints))`` call with the same generator state.

    Returns:
        ``{steps: images (n, 784) in [0, 1]}`` on the CPU.
    """
    from genmodels.ebm import langevin

    x = torch.rand((n, 784), generator=generator, device=device)
    out: dict[int, Tensor] = {}
    done = 0
    for k in sorted({int(c) for c in checkpoints}):
        if k > done:
            x = langevin(
                energy,
                x,
                n_steps=k - done,
                step_size=float(config["step_size"]),
                noise_std=float(config["noise_std"]),
                grad_clip=float(config["grad_clip"]),
                clamp=(0.0, 1.0),
                generator=generator,
            )
            done = k
        out[k] = x.detach().cpu()
    return out


# ----------------------------------------------------------------------------------- curves


def loss_curves_figure(
    rows: Sequence[Mapping[str, float]],
    groups: Sequence[tuple[str, Sequence[str]]],
    title: str,
    references: Mapping[str, float] | None = None,
) -> Figure:
    """Per-epoch series, one panel per group.

    Args:
        rows: per-epoch rows with an ``epoch`` key (see :func:`read_series`).
        groups: ``(y-axis label, [column names])``; columns absent from the CSV are skipped,
            groups with none present are dropped.
        references: horizontal lines ``{label: value}`` drawn in the first panel (e.g. the true
            entropy below an NLL curve).
    """
    present = [(lab, [c for c in cols if any(c in r and math.isfinite(r[c]) for r in rows)]) for lab, cols in groups]
    present = [(lab, cols) for lab, cols in present if cols] or [("value", [])]
    fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.8), squeeze=False, layout="constrained")
    ep = [r.get("epoch", float(i + 1)) for i, r in enumerate(rows)]
    for i, (ax, (label, cols)) in enumerate(zip(axes[0], present, strict=True)):
        for c in cols:
            ax.plot(ep, [r.get(c, math.nan) for r in rows], marker="o" if len(rows) < 30 else None, ms=3, label=c)
        if i == 0 and references:
            for j, (name, v) in enumerate(references.items()):
                ax.axhline(v, color="k", ls=("--", ":", "-.")[j % 3], lw=1, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if cols or (i == 0 and references):
            ax.legend(fontsize=8)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(title, fontsize=11)
    return fig


__all__ = [
    "data_limits",
    "ddpm_forward_snapshots",
    "ddpm_results",
    "ddpm_reverse_snapshots",
    "density_figure",
    "density_grid",
    "evaluate_on_grid",
    "histogram_density",
    "image_grids_figure",
    "image_rows_figure",
    "langevin_snapshots",
    "loss_curves_figure",
    "process_figure",
    "read_series",
    "realnvp_results",
    "save_png",
    "scatter_panels",
    "snapshot_steps",
    "tile",
    "to_uint8",
]
