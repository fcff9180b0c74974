"""Stage `plot`: the figures people look at, one model at a time (``plot@<model>`` in dvc.yaml).

Usage:

    python stages/plot.py realnvp2d|ddpm|flow|ebm [--params params.yaml] [--models-dir models]
        [--data-dir data/prepared] [--plots-dir plots] [--metrics-dir metrics] [--out-dir plots/figures]

Reads the model's checkpoint ``models/<model>/model.pt``, the prepared data, the training
series ``plots/<model>/train.csv`` and (for reference lines) ``metrics/train_<model>.json``; writes PNGs under ``plots/figures/<model>/`` (a folder of its
own: ``plots/<model>/`` holds the training stage's outputs) and logs them to MLflow:

* realnvp2d: ``results.png`` (data | latent z = f(x) | samples), ``density.png`` (true vs model
  density heat maps and their difference), ``loss.png``.
* ddpm: ``results.png`` (data | forward diffused | samples), ``process.png`` (forward and reverse
  chains at the same steps), ``density.png`` (true density vs histograms of as many true draws
  and DDPM samples), ``loss.png``.
* flow: ``samples.png`` (real | samples at T = 1 | samples at the configured temperature),
  ``temperature.png`` (one latent draw at several temperatures), ``interpolation.png`` (between
  test images in latent space), ``loss.png``.
* ebm: ``samples.png`` (real | long-run Langevin samples), ``langevin.png`` (chains from noise at
  several step counts), ``loss.png``.

Every random draw comes from a generator seeded with ``common.seed`` plus a fixed offset, so on
the CPU the PNGs are byte-identical across runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import torch

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import load_params_or_exit, load_points2d, mlflow_run, run_stage, setup_torch, stage_main  # noqa: E402

from genmodels import plotting as gp  # noqa: E402
from genmodels.training import make_generator  # noqa: E402

STAGE = "plot"
MODELS = ("realnvp2d", "ddpm", "flow", "ebm")
N_POINTS = 8192  # points per 2D scatter panel
N_DENSITY = 16384  # true draws / DDPM samples behind each histogram of the density figure
GRID = 160  # cells per side of the density heat maps
N_IMAGES = 64  # images per sample grid
TEMPERATURES = (0.0, 0.4, 0.6, 0.8, 0.9, 1.0)
N_SWEEP = 10  # columns of the temperature sweep / Langevin chains / interpolation
OFFSETS = {"samples": 0, "forward": 1, "reverse": 2, "true": 4, "sweep": 5, "dequant": 6, "chains": 7}
"""``common.seed + offset`` seeds each purpose's generator (independent streams)."""

Figures = dict[str, Any]  # name -> matplotlib Figure


def _gen(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    return make_generator(seed + OFFSETS[purpose], device)


def _series(plots_dir: Path, model: str) -> list[dict[str, float]]:
    path = plots_dir / model / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training series not found; run `dvc repro train_{model}` first")
    return gp.read_series(path)


def _train_metrics(metrics_dir: Path, model: str) -> dict[str, Any]:
    """``metrics/train_<model>.json`` when present, else empty (only reference lines use it)."""
    path = metrics_dir / f"train_{model}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _true_distribution(points: dict[str, Any]) -> Any | None:
    """The exact density of a built-in point set; None for a user CSV (no exact density)."""
    from genmodels.data.points2d import get_distribution

    name = str(points.get("name", "csv"))
    if name == "csv" or "true_entropy" not in points:
        return None
    return get_distribution(name)


def _reference_density(
    points: dict[str, Any], limits: tuple[float, float, float, float], seed: int
) -> tuple[str, Any, Any]:
    """``(title, density on the grid, true draws or None)``: the exact density, or for a CSV set
    the histogram of its training points (the best reference there is)."""
    grid, _ = gp.density_grid(limits, GRID)
    dist = _true_distribution(points)
    if dist is None:
        return (
            "training points (histogram; no exact density)",
            gp.histogram_density(points["train"], limits, GRID),
            None,
        )
    true_draws = dist.sample(N_DENSITY, _gen(seed, "true"))
    return f"true density ({points['name']})", gp.evaluate_on_grid(dist.log_prob, grid), true_draws


def _entropy_ref(points: dict[str, Any]) -> dict[str, float]:
    return {"true entropy": float(points["true_entropy"])} if "true_entropy" in points else {}


# ----------------------------------------------------------------------------------- per model


def plot_realnvp2d(
    models_dir: Path, data_dir: Path, plots_dir: Path, seed: int, device: torch.device, train: Mapping[str, Any]
) -> Figures:
    from genmodels.flows.realnvp2d import load_trained, sample

    model, _ = load_trained(models_dir / "realnvp2d" / "model.pt", device)
    points = load_points2d(data_dir / "points2d.pt")
    name = str(points.get("name", "csv"))
    test = points["test"][:N_POINTS].to(device, torch.float32)
    with torch.no_grad():
        latent, _ = model.transform(test)
    samples = sample(model, test.shape[0], seed=seed + OFFSETS["samples"])  # as many as the data panel
    figs: Figures = {
        "results.png": gp.realnvp_results(test, latent, samples, f"RealNVP on {name}: data, latent and samples")
    }
    limits = gp.data_limits(points["test"])
    grid, extent = gp.density_grid(limits, GRID)
    ref_title, ref, _ = _reference_density(points, limits, seed)
    model_cpu = model.to("cpu")
    dens = gp.evaluate_on_grid(model_cpu.log_prob, grid)
    figs["density.png"] = gp.density_figure(
        [(ref_title, ref), ("RealNVP density exp(log p(x))", dens)],
        extent,
        f"RealNVP on {name}: density against the reference ({GRID}x{GRID} grid)",
        difference=("RealNVP − reference", dens, ref),
    )
    figs["loss.png"] = gp.loss_curves_figure(
        _series(plots_dir, "realnvp2d"),
        [("NLL (nats per point)", ["train_loss", "val_loss"])],
        f"RealNVP on {name}: training curves",
        _entropy_ref(points),
    )
    return figs


def plot_ddpm(
    models_dir: Path, data_dir: Path, plots_dir: Path, seed: int, device: torch.device, train: Mapping[str, Any]
) -> Figures:
    from genmodels.diffusion import load_trained

    model, config = load_trained(models_dir / "ddpm" / "model.pt", device)
    points = load_points2d(data_dir / "points2d.pt")
    name = str(points.get("name", "csv"))
    L = int(model.n_steps)
    test = points["test"][:N_POINTS]
    steps = gp.snapshot_steps(L)
    fwd = gp.ddpm_forward_snapshots(model, test, steps, _gen(seed, "forward", device))
    # One full ancestral chain serves every figure (L network calls on N_DENSITY points is the
    # stage's main cost on a CPU): its first chains, as many as the data panel's points (so both
    # rows of the process figure compare like with like), are the scatter panels and snapshots.
    chain = gp.ddpm_reverse_snapshots(
        model, N_DENSITY, steps, _gen(seed, "reverse", device), precision=config.get("sampling_precision", "auto")
    )
    rev = {t: v[: test.shape[0]] for t, v in chain.items()}
    samples = rev[0]
    figs: Figures = {
        "results.png": gp.ddpm_results(
            test, fwd[L], samples, f"DDPM on {name} ({L} steps): data, forward diffused and samples"
        )
    }
    # Both rows in the model's standardised units (the reverse chain's x_0 is in data units).
    fwd_rows = {t: (v if t > 0 else model.standardize(test.to(device, torch.float32)).cpu()) for t, v in fwd.items()}
    rev_rows = {t: (v if t > 0 else model.standardize(v.to(device)).cpu()) for t, v in rev.items()}
    std_lim = gp.data_limits(fwd_rows[0])
    noise_lim = (-4.0, 4.0, -4.0, 4.0)
    # Near t = 0 the data's own scale; at larger t the N(0, I) scale.
    col_limits = [std_lim if t <= L // 32 else noise_lim for t in sorted(fwd_rows, reverse=True)]
    figs["process.png"] = gp.process_figure(
        [("forward q(x_t | x_0)", fwd_rows), ("reverse p_θ (sampling)", rev_rows)],
        col_limits,
        f"DDPM on {name}: forward noising and the learned reverse chain (standardised units)",
    )
    limits = gp.data_limits(points["test"])
    _, extent = gp.density_grid(limits, GRID)
    ref_title, ref, true_draws = _reference_density(points, limits, seed)
    many = chain[0]
    panels = [(ref_title, ref)]
    if true_draws is not None:
        # What a perfect sampler's histogram looks like at this sample size (histogram noise).
        panels.append((f"histogram of {N_DENSITY:,} true draws", gp.histogram_density(true_draws, limits, GRID)))
    ddpm_hist = gp.histogram_density(many, limits, GRID)
    panels.append((f"histogram of {N_DENSITY:,} DDPM samples", ddpm_hist))
    figs["density.png"] = gp.density_figure(
        panels,
        extent,
        f"DDPM on {name}: sample density against the reference ({GRID}x{GRID} cells)",
        difference=("DDPM histogram − reference", ddpm_hist, panels[1][1] if true_draws is not None else ref),
    )
    figs["loss.png"] = gp.loss_curves_figure(
        _series(plots_dir, "ddpm"),
        [("negative ELBO estimate (nats per point)", ["train_loss", "val_loss"])],
        f"DDPM on {name}: training curves",
        _entropy_ref(points),
    )
    return figs


def _images(data_dir: Path, dataset: str) -> dict[str, Any]:
    from genmodels.data.images import load_prepared

    return load_prepared(data_dir / f"{dataset}.pt")


def plot_flow(
    models_dir: Path, data_dir: Path, plots_dir: Path, seed: int, device: torch.device, train: Mapping[str, Any]
) -> Figures:
    from genmodels.flows.image import dequantize
    from genmodels.flows.imageflow import load_trained

    model, cfg = load_trained(models_dir / "flow" / "model.pt", device)
    data = _images(data_dir, "fashion_mnist")
    real = data["test"][:N_IMAGES]
    t_cfg = float(cfg.temperature)
    with torch.no_grad():
        s1 = model.sample_images(N_IMAGES, generator=_gen(seed, "samples", device), temperature=1.0).cpu()
        st = model.sample_images(N_IMAGES, generator=_gen(seed, "samples", device), temperature=t_cfg).cpu()
        figs: Figures = {
            "samples.png": gp.image_grids_figure(
                [
                    ("real test images (class 0)", real),
                    ("flow samples, T = 1", s1),
                    (f"flow samples, T = {t_cfg:g} (same z, scaled)", st),
                ],
                "Image flow on Fashion-MNIST T-shirt/top: real images and samples",
            )
        }
        # The same base draw z at every temperature T (x = f⁻¹(T z)): how the sample sharpens
        # from the "mean image" at T = 0 to a full draw at T = 1.
        rows = [
            (f"T = {t:g}", model.sample_images(N_SWEEP, generator=_gen(seed, "sweep", device), temperature=t).cpu())
            for t in TEMPERATURES
        ]
        figs["temperature.png"] = gp.image_rows_figure(
            rows, "Image flow: temperature sweep (one latent draw per column)"
        )
        # Linear paths in latent space between pairs of test images, decoded back to images.
        pairs = data["test"][: 2 * 4].to(device)
        z, _ = model.transform(dequantize(pairs, _gen(seed, "dequant", device)))
        alphas = torch.linspace(0, 1, N_SWEEP, device=device)
        interp = []
        for k in range(4):
            za, zb = z[2 * k], z[2 * k + 1]
            path = (1 - alphas)[:, None] * za + alphas[:, None] * zb
            x, _ = model.transform.inverse(path)
            interp.append((f"pair {k + 1}", x.floor().clamp(0, 255).to(torch.uint8).cpu()))
        figs["interpolation.png"] = gp.image_rows_figure(
            interp, "Image flow: latent interpolation between test images (left and right ends reconstruct them)"
        )
    # train_loss/val_loss are the same bits/dim; the reference is the whitened Gaussian the flow
    # starts from (the training stage's baseline on the validation images), when recorded.
    refs = {}
    if isinstance(train.get("baseline_gaussian_val_bpd"), (int, float)):
        refs["Gaussian baseline (val)"] = float(train["baseline_gaussian_val_bpd"])
    figs["loss.png"] = gp.loss_curves_figure(
        _series(plots_dir, "flow"),
        [("bits per dimension", ["train_bpd", "val_bpd"])],
        "Image flow on Fashion-MNIST T-shirt/top: training curves",
        refs,
    )
    return figs


def plot_ebm(
    models_dir: Path, data_dir: Path, plots_dir: Path, seed: int, device: torch.device, train: Mapping[str, Any]
) -> Figures:
    from genmodels.ebm import load_trained

    model, config = load_trained(models_dir / "ebm" / "model.pt", device)
    data = _images(data_dir, "mnist")
    digit = int(data.get("class_index", 0))
    real = data["test"][:N_IMAGES]
    n_steps = int(config.get("sample_steps", 256))
    checkpoints = sorted({0, *[min(n_steps, s) for s in (1, 5, 10, 20, 40, 60, 100)], n_steps})
    chains = gp.langevin_snapshots(
        model, config, N_IMAGES, checkpoints, generator=_gen(seed, "chains", device), device=device
    )
    samples = gp.to_uint8(chains[n_steps])
    figs: Figures = {
        "samples.png": gp.image_grids_figure(
            [
                (f"real test images (digit {digit})", real),
                (f"EBM samples, {n_steps}-step Langevin from noise", samples),
            ],
            f"EBM on MNIST digit {digit}: real images and samples",
        )
    }
    rows = [(f"{k} steps", gp.to_uint8(chains[k][:N_SWEEP])) for k in checkpoints]
    figs["langevin.png"] = gp.image_rows_figure(
        rows,
        f"EBM: Langevin chains from uniform noise (step {config['step_size']}, noise {config['noise_std']}; one chain per column)",
    )
    figs["loss.png"] = gp.loss_curves_figure(
        _series(plots_dir, "ebm"),
        [
            ("loss", ["train_loss", "val_loss", "cd_loss", "reg_loss"]),
            ("mean energy", ["energy_real", "energy_fake", "val_energy_real", "val_energy_fake"]),
        ],
        f"EBM on MNIST digit {digit}: training curves",
    )
    return figs


PLOTTERS: dict[str, Callable[[Path, Path, Path, int, torch.device, Mapping[str, Any]], Figures]] = {
    "realnvp2d": plot_realnvp2d,
    "ddpm": plot_ddpm,
    "flow": plot_flow,
    "ebm": plot_ebm,
}


@click.command()
@click.argument("model_name", metavar="MODEL", type=click.Choice(MODELS))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option("--models-dir", default="models", show_default=True, type=click.Path(path_type=Path))
@click.option("--data-dir", default="data/prepared", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--plots-dir", default="plots", show_default=True, type=click.Path(path_type=Path), help="training series"
)
@click.option("--metrics-dir", default="metrics", show_default=True, type=click.Path(path_type=Path))
@click.option("--out-dir", default="plots/figures", show_default=True, type=click.Path(path_type=Path))
@stage_main
def main(
    model_name: str,
    params_path: str,
    models_dir: Path,
    data_dir: Path,
    plots_dir: Path,
    metrics_dir: Path,
    out_dir: Path,
) -> None:
    """Draw MODEL's figures (realnvp2d, ddpm, flow or ebm) into OUT_DIR/MODEL/."""
    import matplotlib.pyplot as plt

    params = load_params_or_exit(params_path)
    device = setup_torch(params)
    seed = int(params.common.seed)
    target = out_dir / model_name
    with mlflow_run(f"{STAGE}@{model_name}", params, [], device) as run:
        run.set_tags({"model": model_name})
        figs = PLOTTERS[model_name](
            models_dir, data_dir, plots_dir, seed, device, _train_metrics(metrics_dir, model_name)
        )
        target.mkdir(parents=True, exist_ok=True)
        # Remove figures a previous version of this stage wrote but this one does not.
        for old in target.glob("*.png"):
            if old.name not in figs:
                old.unlink()
        for name, fig in sorted(figs.items()):
            path = gp.save_png(fig, target / name)
            plt.close(fig)
            run.log_artifact(path, f"figures/{model_name}")
            click.echo(f"[{STAGE}@{model_name}] wrote {path}", err=True)


if __name__ == "__main__":
    run_stage(main)
