"""Stage `train_realnvp2d`: RealNVP on the prepared 2D point set (maximum likelihood).

Usage (dvc.yaml):

    python stages/train_realnvp2d.py [--params params.yaml] [--data data/prepared/points2d.pt]
        [--model-dir models/realnvp2d] [--plots-dir plots/realnvp2d] [--metrics metrics/train_realnvp2d.json]

Writes the checkpoint (best-validation weights + the config that rebuilds them), the
per-epoch series, a three-panel figure (data, latent ``z = f(x)``, samples) and the loss
curves, and ``metrics/train_realnvp2d.json`` with the test NLL next to the true entropy;
logs all of it to MLflow. Resumes from ``.resume/train_realnvp2d.pt`` after an interruption.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import (  # noqa: E402
    close_figure,
    mlflow_run,
    run_stage,
    save_loss_curves,
    save_points_panels,
    stage_main,
    start_points2d_training,
    write_csv,
    write_json,
)

from genmodels.distributed import cleanup  # noqa: E402
from genmodels.flows.realnvp2d import mean_nll, sample, save_trained, train_realnvp2d  # noqa: E402

STAGE = "train_realnvp2d"
N_FIGURE = 8192  # points per panel of the figure


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--data", "data_path", default="data/prepared/points2d.pt", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--model-dir", default="models/realnvp2d", show_default=True, type=click.Path(path_type=Path))
@click.option("--plots-dir", default="plots/realnvp2d", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/train_realnvp2d.json",
    show_default=True,
    type=click.Path(path_type=Path),
)
@stage_main
def main(params_path: str, data_path: Path, model_dir: Path, plots_dir: Path, metrics_path: Path) -> None:
    """Train RealNVP on the prepared 2D points."""
    start = start_points2d_training(STAGE, params_path, data_path)
    params, dist_info, device, resume = start.params, start.dist, start.dist.device, start.resume
    train, val, test, name, entropy = start.train, start.val, start.test, start.name, start.entropy
    cfg = params.realnvp2d
    if not dist_info.is_main:
        # Other ranks only contribute gradients: rank 0 alone logs to MLflow and writes outputs.
        train_realnvp2d(cfg, train, val, device=device, resume_path=resume, dist=dist_info)
        cleanup()
        return

    with mlflow_run(STAGE, params, ["realnvp2d"], device) as run:
        run.set_tags({"data.points2d.name": name, "world_size": dist_info.world_size})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            run.on_epoch(epoch, metrics)
            click.echo(
                f"[{STAGE}] epoch {epoch}: train NLL {metrics['train_loss']:.4f} val NLL {metrics['val_loss']:.4f}",
                err=True,
            )

        t0 = time.perf_counter()
        result = train_realnvp2d(cfg, train, val, device=device, on_epoch=on_epoch, resume_path=resume, dist=dist_info)
        cleanup()  # the collectives are over; evaluation and figures below are rank 0's alone
        train_seconds = time.perf_counter() - t0
        model = result.model

        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = model_dir / "model.pt"
        save_trained(ckpt_path, model, cfg)

        test_d = test.to(device, torch.float32)
        test_nll, test_se = mean_nll(model, test_d)
        val_nll, _ = mean_nll(model, val.to(device, torch.float32))
        summary: dict[str, float | int | bool | str | None] = {
            "data": name,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "val_nll": val_nll,
            "test_nll": test_nll,
            "test_nll_se": test_se,
            "true_entropy": entropy,
            "kl_gap": (test_nll - entropy) if entropy is not None else None,
        }
        write_json(metrics_path, summary)
        write_csv(plots_dir / "train.csv", result.history)

        with torch.no_grad():
            latent, _ = model.transform(test_d[:N_FIGURE])
        gen = sample(model, N_FIGURE, seed=cfg.seed + 100)
        gap = f", KL gap {summary['kl_gap']:.4f}" if entropy is not None else ""
        names = ("test data", "latent z = f(x)", "samples f^-1(z), z ~ N(0, I)")
        fig = save_points_panels(
            list(zip(names, (test_d[:N_FIGURE], latent, gen), strict=True)),
            plots_dir / "samples.png",
            f"RealNVP 2D on {name}: test NLL {test_nll:.4f}{gap}",
        )
        run.log_figure(fig, "samples.png")
        close_figure(fig)
        if result.history.rows:
            fig = save_loss_curves(result.history.rows, plots_dir / "train_curves.png", entropy=entropy, what="NLL")
            run.log_figure(fig, "train_curves.png")
            close_figure(fig)

        # Wall-clock time goes to MLflow only: output files must be byte-identical across runs.
        run.log_metrics(
            {
                **{k: float(v) for k, v in summary.items() if isinstance(v, (int, float))},
                "train_seconds": train_seconds,
                "resumed_from_epoch": result.resumed_from,
            }
        )
        run.log_artifact(ckpt_path, "model")
        run.log_artifact(plots_dir / "train.csv")
        click.echo(
            f"[{STAGE}] done in {train_seconds:.1f}s: {result.epochs_run} epochs, best {result.best_epoch} "
            f"(val NLL {result.best_val_loss:.4f}); test NLL {test_nll:.4f} +- {test_se:.4f}{gap}",
            err=True,
        )
    resume.unlink(missing_ok=True)


if __name__ == "__main__":
    run_stage(main)
