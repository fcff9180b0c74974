"""Stage `train_ddpm`: DDPM on the prepared 2D point set (ELBO-weighted MSE).

Usage (dvc.yaml):

    python stages/train_ddpm.py [--params params.yaml] [--data data/prepared/points2d.pt]
        [--model-dir models/ddpm] [--plots-dir plots/ddpm] [--metrics metrics/train_ddpm.json]

Also runs data-parallel under ``torchrun --nproc_per_node N stages/train_ddpm.py`` (one
process per GPU, or gloo on the CPU): rank 0 alone logs to MLflow and writes the outputs.

Writes the checkpoint (best-validation weights + the config that rebuilds them), the
per-epoch series, a three-panel figure (data, fully diffused data, samples), the loss curves
and the per-step ELBO terms, and ``metrics/train_ddpm.json`` with the full ELBO bound
(``nll_bound``) on held-out points next to the true entropy, and sample metrics next to
their real-vs-real floors; logs all of it to MLflow. Resumes from ``.resume/train_ddpm.pt``
after an interruption.
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

from genmodels.configs.base import to_dict  # noqa: E402
from genmodels.data.points2d import get_distribution  # noqa: E402
from genmodels.diffusion import nll_bound, sample, save_trained, train_ddpm  # noqa: E402
from genmodels.distributed import cleanup  # noqa: E402
from genmodels.metrics.sample import DEFAULT_FLOOR_DRAWS, sample_metrics, sample_metrics_with_floor  # noqa: E402
from genmodels.training import make_generator, mean_and_se  # noqa: E402

STAGE = "train_ddpm"
N_FIGURE = 8192  # points per panel of the figure


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--data", "data_path", default="data/prepared/points2d.pt", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--model-dir", default="models/ddpm", show_default=True, type=click.Path(path_type=Path))
@click.option("--plots-dir", default="plots/ddpm", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--metrics", "metrics_path", default="metrics/train_ddpm.json", show_default=True, type=click.Path(path_type=Path)
)
@stage_main
def main(params_path: str, data_path: Path, model_dir: Path, plots_dir: Path, metrics_path: Path) -> None:
    """Train a DDPM on the prepared 2D points."""
    start = start_points2d_training(STAGE, params_path, data_path)
    params, dist_info, device, resume = start.params, start.dist, start.dist.device, start.resume
    train, val, test, name, entropy = start.train, start.val, start.test, start.name, start.entropy
    cfg = params.ddpm
    if not dist_info.is_main:
        # Other ranks only contribute gradients: rank 0 alone logs to MLflow and writes outputs.
        train_ddpm(cfg, train, val, device=device, resume_path=resume, dist=dist_info)
        cleanup()
        return

    with mlflow_run(STAGE, params, ["ddpm"], device) as run:
        run.set_tags({"data.points2d.name": name, "world_size": dist_info.world_size})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            run.on_epoch(epoch, metrics)
            click.echo(
                f"[{STAGE}] epoch {epoch}: train {metrics['train_loss']:.4f} val {metrics['val_loss']:.4f} nats",
                err=True,
            )

        t0 = time.perf_counter()
        result = train_ddpm(cfg, train, val, device=device, on_epoch=on_epoch, resume_path=resume, dist=dist_info)
        cleanup()  # the collectives are over; evaluation, sampling and figures are rank 0's alone
        train_seconds = time.perf_counter() - t0
        model = result.model

        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = model_dir / "model.pt"
        save_trained(ckpt_path, model, to_dict(cfg))

        # The full ELBO (all L terms) on held-out points: the number that compares with the
        # flow's exact test NLL and with the true entropy.
        n_elbo = min(cfg.elbo_points, test.shape[0])
        summary: dict[str, float | int | bool | str | None] = {
            "data": name,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "true_entropy": entropy,
            "elbo_points": n_elbo,
        }
        terms = None
        elbo_seconds = 0.0
        if n_elbo > 0:
            t1 = time.perf_counter()
            bound, terms = nll_bound(
                model,
                test[:n_elbo].to(device, torch.float32),
                generator=make_generator(cfg.seed + 200, device),
                return_terms=True,
            )
            elbo_seconds = time.perf_counter() - t1
            nb, nb_se = mean_and_se(bound)
            summary["nll_bound"] = nb
            summary["nll_bound_se"] = nb_se if n_elbo > 1 else None  # JSON has no NaN
            summary["kl_gap_bound"] = (nb - entropy) if entropy is not None else None

        t2 = time.perf_counter()
        gen = sample(
            model,
            cfg.n_samples,
            generator=make_generator(cfg.seed + 100, device),
            sampling_steps=cfg.sampling_steps,
            eta=cfg.sampling_eta,
            precision=cfg.sampling_precision,
        ).cpu()
        sampling_seconds = time.perf_counter() - t2
        if entropy is not None:
            g_real = make_generator(cfg.seed + 300)
            real = [get_distribution(name).sample(cfg.n_samples, g_real) for _ in range(DEFAULT_FLOOR_DRAWS)]
            sm = sample_metrics_with_floor(gen, real, test, seed=cfg.seed)
        else:
            sm = sample_metrics(gen, test, generator=make_generator(cfg.seed))
        summary.update(sm)
        if entropy is not None:
            summary["sample_logp"] = get_distribution(name).log_prob(gen).double().mean().item()
        write_json(metrics_path, summary)
        write_csv(plots_dir / "train.csv", result.history)

        test_fig = test[:N_FIGURE]
        noise = torch.randn(test_fig.shape, generator=make_generator(cfg.seed + 400))
        s = model.schedule.to("cpu")
        x0 = model.standardize(test_fig.to(model.shift.device)).cpu()
        diffused = s.add_noise(x0, noise, torch.full((test_fig.shape[0],), cfg.n_steps))
        model.schedule.to(device)
        gap = f", bound gap {summary['kl_gap_bound']:.4f}" if summary.get("kl_gap_bound") is not None else ""
        steps = "full chain" if cfg.sampling_steps == cfg.n_steps else f"{cfg.sampling_steps} strided steps"
        names = ("test data", "forward diffused x_L ~ q(x_L | x_0)", "samples")
        fig = save_points_panels(
            list(zip(names, (test_fig, diffused, gen[:N_FIGURE]), strict=True)),
            plots_dir / "samples.png",
            f"DDPM ({cfg.parameterization}) on {name}: nll_bound {summary.get('nll_bound', float('nan')):.4f}"
            f"{gap}; samples: {steps}",
        )
        run.log_figure(fig, "samples.png")
        close_figure(fig)
        fig = save_loss_curves(
            result.history.rows, plots_dir / "train_curves.png", entropy=entropy, what="(ELBO estimate)", terms=terms
        )
        run.log_figure(fig, "train_curves.png")
        close_figure(fig)

        # Wall-clock times go to MLflow only: output files must be byte-identical across runs.
        run.log_metrics(
            {
                **{k: float(v) for k, v in summary.items() if isinstance(v, (int, float))},
                "train_seconds": train_seconds,
                "elbo_seconds": elbo_seconds,
                "sampling_seconds_per_1000": 1000 * sampling_seconds / cfg.n_samples,
            }
        )
        run.log_artifact(ckpt_path, "model")
        run.log_artifact(plots_dir / "train.csv")
        click.echo(
            f"[{STAGE}] done in {train_seconds:.1f}s: {result.epochs_run} epochs, best {result.best_epoch} "
            f"(val {result.best_val:.4f}); nll_bound {summary.get('nll_bound', float('nan')):.4f}{gap}; "
            f"energy distance {sm['energy_distance']:.2e}",
            err=True,
        )
    resume.unlink(missing_ok=True)


if __name__ == "__main__":
    run_stage(main)
