"""Stage `train_ebm`: energy-based model on the prepared MNIST zeros (contrastive divergence).

Usage (dvc.yaml):

    python stages/train_ebm.py [--params params.yaml] [--data data/prepared/mnist.pt]
        [--model-dir models/ebm] [--plots-dir plots/ebm] [--metrics metrics/train_ebm.json]

Writes the checkpoint (best weights, final weights, optimizer, replay buffer, generator states),
the per-epoch series, buffer sample grids every ``ebm.sample_every`` epochs, long-run samples
from noise, and ``metrics/train_ebm.json``; logs all of it to MLflow. Resumes from
``.resume/train_ebm.pt`` after an interruption.

Also runs data-parallel under ``torchrun --nproc_per_node N stages/train_ebm.py`` (one process
per GPU, or gloo on the CPU): every rank keeps the whole replay buffer and runs Langevin on its
slice of each global batch of chains; rank 0 alone logs to MLflow and writes the outputs.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click
import torch

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import (  # noqa: E402
    load_params_or_exit,
    mlflow_run,
    run_stage,
    setup_torch,
    stage_main,
    write_csv,
    write_json,
)

from genmodels.configs import to_dict  # noqa: E402
from genmodels.data.images import load_prepared  # noqa: E402
from genmodels.distributed import cleanup, init_from_env  # noqa: E402
from genmodels.ebm import RollbackEvent, images_to_float, sample_model, train_ebm  # noqa: E402
from genmodels.training import make_generator, resume_path, save_checkpoint  # noqa: E402

STAGE = "train_ebm"
N_GRID = 64


def _grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """``(n, 1, 28, 28)`` in [0, 1] -> one ``(H, W)`` grid image (black padding)."""
    n = images.shape[0]
    rows = math.ceil(n / nrow)
    h, w = images.shape[-2:]
    grid = torch.zeros(rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[
            k, 0
        ]
    return grid


def _save_grid(images: torch.Tensor, path: Path, title: str):  # noqa: ANN202 - matplotlib figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(_grid(images.detach().cpu().clamp(0, 1)).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamps in the PNG metadata: same params + seed -> byte-identical files.
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return fig


def _curves(rows: list[dict[str, float]], path: Path):  # noqa: ANN202 - matplotlib figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(ep, [r["train_loss"] for r in rows], label="train loss")
    axes[0].plot(ep, [r["val_loss"] for r in rows], label="val loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[1].plot(ep, [r["energy_real"] for r in rows], label="E(train data)")
    axes[1].plot(ep, [r["energy_fake"] for r in rows], label="E(Langevin samples)")
    axes[1].plot(ep, [r["val_energy_real"] for r in rows], label="E(val data)")
    axes[1].set_xlabel("epoch")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return fig


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--data", "data_path", default="data/prepared/mnist.pt", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--model-dir", default="models/ebm", show_default=True, type=click.Path(path_type=Path))
@click.option("--plots-dir", default="plots/ebm", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--metrics", "metrics_path", default="metrics/train_ebm.json", show_default=True, type=click.Path(path_type=Path)
)
@stage_main
def main(params_path: str, data_path: Path, model_dir: Path, plots_dir: Path, metrics_path: Path) -> None:
    """Train the energy-based model on the prepared MNIST class."""
    params = load_params_or_exit(params_path)
    # Under `torchrun --nproc_per_node N` this joins the process group (gloo on CPU, nccl on
    # CUDA, one GPU per rank); run plainly it is a single process and changes nothing.
    dist_info = init_from_env(setup_torch(params))
    device = dist_info.device
    cfg = params.ebm
    data = load_prepared(data_path)
    train, val, test = data["train"], data["val"], data["test"]
    click.echo(
        f"[{STAGE}] MNIST digit {int(data['class_index'])} from the '{data['split']}' split: "
        f"train {train.shape[0]}, val {val.shape[0]}, test {test.shape[0]}; device {device}",
        err=True,
    )
    resume = resume_path(Path.cwd(), STAGE)
    if not dist_info.is_main:
        # Other ranks only contribute their slices of each batch: rank 0 alone logs and writes.
        train_ebm(cfg, train, val, device=device, resume_path=resume, dist=dist_info)
        cleanup()
        return
    if resume.is_file():
        click.echo(f"[{STAGE}] found resume state {resume}; continuing from it if its config matches", err=True)
    buffer_dir = plots_dir / "buffer"
    with mlflow_run(STAGE, params, ["ebm"], device) as run:
        run.set_tags(
            {
                "data.split": data["split"],
                "data.class_index": int(data["class_index"]),
                "world_size": dist_info.world_size,
            }
        )

        def on_samples(epoch: int, images: torch.Tensor) -> None:
            fig = _save_grid(images, buffer_dir / f"epoch_{epoch:04d}.png", f"replay buffer, epoch {epoch}")
            run.log_figure(fig, f"buffer_epoch_{epoch:04d}.png")
            import matplotlib.pyplot as plt

            plt.close(fig)

        def on_rollback(event: RollbackEvent) -> None:
            click.echo(
                f"[{STAGE}] WARNING: divergence at epoch {event.epoch} ({event.reason}); rolled back to the last "
                f"good epoch, lr {event.lr_before:.3g} -> {event.lr_after:.3g}, "
                f"{cfg.rollback_reinit_fraction:.0%} of the buffer restarted (rollback {event.count}/{cfg.max_rollbacks})",
                err=True,
            )
            run.log_metrics({"rollback_lr": event.lr_after, "rollback_epoch": event.epoch}, step=event.count)
            run.set_tags({f"rollback_{event.count}": f"epoch {event.epoch}: {event.reason}"})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            run.on_epoch(epoch, metrics)
            click.echo(
                f"[{STAGE}] epoch {epoch}: train {metrics['train_loss']:.4f} val {metrics['val_loss']:.4f} "
                f"E(data) {metrics['energy_real']:.4f} E(samples) {metrics['energy_fake']:.4f}",
                err=True,
            )

        t0 = time.perf_counter()
        result = train_ebm(
            cfg,
            train,
            val,
            device=device,
            on_epoch=on_epoch,
            on_samples=on_samples,
            on_rollback=on_rollback,
            resume_path=resume,
            dist=dist_info,
        )
        cleanup()  # the collectives are over; sampling, evaluation and figures are rank 0's alone
        train_seconds = time.perf_counter() - t0

        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = model_dir / "model.pt"
        save_checkpoint(
            ckpt_path,
            kind="ebm",
            config=to_dict(cfg),
            history=[dict(r) for r in result.history.rows],
            **result.checkpoint,
        )

        # Long-run Langevin from noise with the best model (what `sample` and `evaluate` draw).
        model = result.model
        g = make_generator(cfg.seed + 100, device)
        samples = sample_model(model, to_dict(cfg), N_GRID, generator=g, device=device)
        with torch.no_grad():
            e_train = model(images_to_float(train).to(device))
            e_val = model(images_to_float(val).to(device))
            e_test = model(images_to_float(test).to(device))
            e_samples = model(samples)
            e_noise = model(torch.rand(N_GRID, 784, generator=g, device=device))

        rows = [dict(r) for r in result.history.rows]
        write_csv(plots_dir / "train.csv", result.history)
        fig = _save_grid(samples, plots_dir / "samples.png", f"{cfg.sample_steps}-step Langevin from noise")
        run.log_figure(fig, "samples.png")
        if rows:
            fig = _curves(rows, plots_dir / "train_curves.png")
            run.log_figure(fig, "train_curves.png")

        summary = {
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "rollbacks": len(result.rollbacks),
            "energy_train_mean": float(e_train.mean()),
            "energy_val_mean": float(e_val.mean()),
            "energy_test_mean": float(e_test.mean()),
            "energy_test_std": float(e_test.std()) if e_test.numel() > 1 else 0.0,
            "energy_samples_mean": float(e_samples.mean()),
            "energy_samples_std": float(e_samples.std()),
            "energy_noise_mean": float(e_noise.mean()),
            "final_train_loss": rows[-1]["train_loss"] if rows else float("nan"),
            "final_val_loss": rows[-1]["val_loss"] if rows else float("nan"),
        }
        write_json(metrics_path, summary)
        # Wall-clock time goes to MLflow only: output files must be byte-identical across runs.
        run.log_metrics({**{k: float(v) for k, v in summary.items()}, "train_seconds": train_seconds})
        run.log_dict({"rollbacks": [e.as_dict() for e in result.rollbacks]}, "rollbacks.json")
        run.log_artifact(ckpt_path, "model")
        run.log_artifact(plots_dir / "train.csv")
        click.echo(
            f"[{STAGE}] done in {train_seconds:.1f}s: best epoch {result.best_epoch} "
            f"(val loss {result.best_val_loss:.4f}), {len(result.rollbacks)} rollback(s); "
            f"E(test zeros) {summary['energy_test_mean']:.4f}, E(samples) {summary['energy_samples_mean']:.4f}, "
            f"E(noise) {summary['energy_noise_mean']:.4f}",
            err=True,
        )
    resume.unlink(missing_ok=True)


if __name__ == "__main__":
    run_stage(main)
