"""Stage `train_flow`: the image normalizing flow on prepared Fashion-MNIST class 0.

Usage (hyper-parameters come from the ``flow`` section of params.yaml):

    python stages/train_flow.py [--params params.yaml] [--data data/prepared/fashion_mnist.pt]
                                [--model-dir models/flow] [--plots-dir plots/flow] [--metrics metrics/train_flow.json]

Writes ``models/flow/model.pt`` (best-validation checkpoint with its config),
``plots/flow/train.csv`` (per-epoch bpd), ``plots/flow/samples.png`` (final sample grid),
``plots/flow/bpd.png`` (learning curves with the Gaussian baseline) and
``metrics/train_flow.json`` (test bpd of the flow and of the full-covariance Gaussian
baseline in the same logit space). MLflow gets the params, per-epoch metrics, a sample
grid every ``flow.sample_every`` epochs, the figures and the checkpoint.

Also runs data-parallel under ``torchrun --nproc_per_node N stages/train_flow.py`` (one
process per GPU, or gloo on the CPU): rank 0 alone logs to MLflow and writes the outputs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import (  # noqa: E402
    StageRun,
    load_params_or_exit,
    mlflow_run,
    run_stage,
    setup_torch,
    stage_main,
    write_csv,
    write_json,
)

from genmodels.configs.flow import FlowConfig  # noqa: E402
from genmodels.data.images import load_prepared  # noqa: E402
from genmodels.distributed import cleanup, init_from_env  # noqa: E402
from genmodels.flows.imageflow import (  # noqa: E402
    build_model,
    gaussian_baseline,
    image_grid,
    mean_and_se,
    per_image_bpd,
    save_trained,
    train_flow,
)
from genmodels.training import History, make_generator, resume_path  # noqa: E402

STAGE = "train_flow"


def _save_png(images: torch.Tensor, path: Path) -> None:
    """uint8 ``(n, H, W)`` -> a grayscale PNG grid (PIL: byte-identical for identical pixels)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images.cpu()).numpy(), mode="L").save(path)


def _log_grid(run: StageRun, images: torch.Tensor, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        _save_png(images, p)
        run.log_artifact(p, "figures")


def _curve_figure(history: History, baseline_val: float, path: Path) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_bpd"] for r in history.rows], label="train (fresh dequantization)")
    ax.plot(epochs, [r["val_bpd"] for r in history.rows], label="validation")
    ax.axhline(baseline_val, color="gray", ls="--", label="full-cov. Gaussian (validation)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits / dim (8-bit pixel space)")
    ax.set_title("Image flow, Fashion-MNIST class 0")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return fig


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--data",
    "data_path",
    default="data/prepared/fashion_mnist.pt",
    show_default=True,
    type=click.Path(path_type=Path),
    help="prepared Fashion-MNIST (prepare stage)",
)
@click.option("--model-dir", default="models/flow", show_default=True, type=click.Path(path_type=Path))
@click.option("--plots-dir", default="plots/flow", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--metrics", "metrics_path", default="metrics/train_flow.json", show_default=True, type=click.Path(path_type=Path)
)
@stage_main
def main(params_path: str, data_path: Path, model_dir: Path, plots_dir: Path, metrics_path: Path) -> None:
    """Train the image flow; write checkpoint, series, figures and metrics."""
    params = load_params_or_exit(params_path)
    cfg: FlowConfig = params.flow
    # Under `torchrun --nproc_per_node N` this joins the process group (gloo on CPU, nccl on
    # CUDA, one GPU per rank); run plainly it is a single process and changes nothing.
    dist_info = init_from_env(setup_torch(params))
    device = dist_info.device
    data = load_prepared(data_path)
    train, val, test = data["train"], data["val"], data["test"]
    click.echo(
        f"[{STAGE}] train {tuple(train.shape)}, val {tuple(val.shape)}, test {tuple(test.shape)} on {device}", err=True
    )
    resume = resume_path(Path.cwd(), STAGE)
    if not dist_info.is_main:
        # Other ranks only contribute gradients: rank 0 alone logs to MLflow and writes outputs.
        train_flow(build_model(cfg), train, val, cfg, device=device, resume_path=resume, dist=dist_info)
        cleanup()
        return

    with mlflow_run(STAGE, params, ["flow"], device) as run:
        run.set_tags({"world_size": dist_info.world_size})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            run.on_epoch(epoch, metrics)
            click.echo(
                f"[{STAGE}] epoch {epoch}: train {metrics['train_bpd']:.4f} val {metrics['val_bpd']:.4f} bpd", err=True
            )

        def on_samples(epoch: int, images: torch.Tensor) -> None:
            _log_grid(run, images, f"samples_epoch_{epoch:04d}.png")

        t0 = time.perf_counter()
        result = train_flow(
            build_model(cfg),
            train,
            val,
            cfg,
            device=device,
            on_epoch=on_epoch,
            on_samples=on_samples,
            resume_path=resume,
            dist=dist_info,
        )
        cleanup()  # the collectives are over; evaluation, baseline and figures are rank 0's alone
        train_seconds = time.perf_counter() - t0
        model = result.model
        test_bpd, test_se = mean_and_se(per_image_bpd(model, test, seed=cfg.seed + 3, batch_size=cfg.eval_batch_size))
        # The baseline is fitted in the same logit space (same λ), with the same dequantization noise
        # as the flow's whitening init, and scored through the same bpd code path.
        gauss = gaussian_baseline(
            train.to(device),
            cfg.logit_lambda,
            generator=make_generator(cfg.seed + 1, device),
            shrinkage=cfg.whiten_shrinkage,
        )
        base_test, base_se = mean_and_se(per_image_bpd(gauss, test, seed=cfg.seed + 3, batch_size=cfg.eval_batch_size))
        base_val = float(per_image_bpd(gauss, val, seed=cfg.seed + 2, batch_size=cfg.eval_batch_size).mean())

        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics = {
            "test_bpd": test_bpd,
            "test_bpd_se": test_se,
            "best_val_bpd": result.best_val_bpd,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "train_bpd_at_best": result.history.rows[result.best_epoch - 1]["train_bpd"] if result.best_epoch else None,
            "baseline_gaussian_test_bpd": base_test,
            "baseline_gaussian_test_bpd_se": base_se,
            "baseline_gaussian_val_bpd": base_val,
            "n_params": n_params,
            "n_trainable_params": n_trainable,
        }
        model_path = model_dir / "model.pt"
        save_trained(model_path, model, cfg, best_epoch=result.best_epoch, test_bpd=test_bpd)
        write_csv(plots_dir / "train.csv", result.history)
        samples = model.sample_images(
            cfg.n_samples, generator=make_generator(cfg.seed + 4, device), temperature=cfg.temperature
        )
        _save_png(samples, plots_dir / "samples.png")
        samples_t1 = model.sample_images(cfg.n_samples, generator=make_generator(cfg.seed + 5, device), temperature=1.0)
        _save_png(samples_t1, plots_dir / "samples_t1.png")
        fig = _curve_figure(result.history, base_val, plots_dir / "bpd.png")

        run.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_metrics({"train_seconds": train_seconds})
        run.log_figure(fig, "bpd.png")
        for name in ("samples.png", "samples_t1.png"):
            run.log_artifact(plots_dir / name, "figures")
        run.log_artifact(model_path, "model")
    write_json(metrics_path, metrics)
    resume.unlink(missing_ok=True)
    click.echo(
        f"[{STAGE}] test bpd {test_bpd:.4f} +- {test_se:.4f} (Gaussian baseline {base_test:.4f} +- {base_se:.4f}); "
        f"best epoch {result.best_epoch}/{result.epochs_run}; {train_seconds:.0f} s",
        err=True,
    )


if __name__ == "__main__":
    run_stage(main)
