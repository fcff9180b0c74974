"""Stage `evaluate`: every model's figures of merit beside their floors and naive baselines.

Usage (dvc.yaml runs it once per model, as `evaluate@<model>`):

    python stages/evaluate.py realnvp2d|ddpm|flow|ebm [--params params.yaml]
        [--models-dir models] [--data-dir data/prepared] [--metrics-dir metrics] [--plots-dir plots]

Reads ``models/<model>/model.pt`` and the prepared data it needs (the image models also the
other image data set, for OOD, and ``models/classifier/<dataset>.pt`` for the FID); writes
``metrics/<model>.json`` and, for the image models, one ROC curve CSV per AUROC under
``plots/roc/<model>/<key>.csv`` (the folder exists, empty, for the 2D models); logs everything
to MLflow. The per-model work is in
:mod:`genmodels.evaluation`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import (  # noqa: E402
    load_params_or_exit,
    load_points2d,
    mlflow_run,
    run_stage,
    setup_torch,
    stage_main,
    write_json,
)

from genmodels.configs import flatten, to_dict  # noqa: E402
from genmodels.training import atomic_write_text  # noqa: E402

STAGE = "evaluate"
# wall-clock metrics: written to metrics/timing/<model>.json, not to the reproducible metrics/<model>.json
TIMING_KEYS = ("sampling_seconds_per_1k", "sampling_seconds_per_1k_strided")
MODELS = ("realnvp2d", "ddpm", "flow", "ebm")


def _roc_csv(fpr, tpr) -> str:  # noqa: ANN001 - (K,) tensors
    rows = ["fpr,tpr"] + [f"{float(f)!r},{float(t)!r}" for f, t in zip(fpr, tpr)]
    return "\n".join(rows) + "\n"


@click.command()
@click.argument("model_name", metavar="MODEL", type=click.Choice(MODELS))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option("--models-dir", default="models", show_default=True, type=click.Path(path_type=Path))
@click.option("--data-dir", default="data/prepared", show_default=True, type=click.Path(path_type=Path))
@click.option("--metrics-dir", default="metrics", show_default=True, type=click.Path(path_type=Path))
@click.option("--plots-dir", default="plots", show_default=True, type=click.Path(path_type=Path))
@stage_main
def main(
    model_name: str, params_path: str, models_dir: Path, data_dir: Path, metrics_dir: Path, plots_dir: Path
) -> None:
    """Evaluate MODEL (realnvp2d, ddpm, flow or ebm)."""
    from genmodels import evaluation

    t_start = time.perf_counter()
    params = load_params_or_exit(params_path)
    cfg = params.evaluate
    device = setup_torch(params)
    ckpt = models_dir / model_name / "model.pt"
    with mlflow_run(f"{STAGE}@{model_name}", params, [], device) as run:
        run.log_params(flatten(to_dict(cfg), "evaluate"))
        if model_name in ("realnvp2d", "ddpm"):
            points = evaluation.Points.from_prepared(load_points2d(data_dir / "points2d.pt"))
            if model_name == "realnvp2d":
                from genmodels.flows.realnvp2d import load_trained

                model, _ = load_trained(ckpt, device)
                ev = evaluation.evaluate_realnvp2d(model, points, cfg, device)
            else:
                from genmodels.diffusion import load_trained

                model, config = load_trained(ckpt, device)
                ev = evaluation.evaluate_ddpm(model, config, points, cfg, device)
        else:
            from genmodels.data.images import load_prepared
            from genmodels.metrics.classifier import load_classifier

            mnist, fashion = load_prepared(data_dir / "mnist.pt"), load_prepared(data_dir / "fashion_mnist.pt")
            own = "fashion_mnist" if model_name == "flow" else "mnist"
            classifier, info = load_classifier(models_dir / "classifier" / f"{own}.pt", device)
            if model_name == "flow":
                from genmodels.flows.imageflow import load_trained

                model, config = load_trained(ckpt, device)
                ev = evaluation.evaluate_flow(model, config, fashion, mnist, classifier, info, cfg, device)
            else:
                from genmodels.ebm import load_trained

                model, config = load_trained(ckpt, device)
                ev = evaluation.evaluate_ebm(model, config, mnist, fashion, classifier, info, cfg, device)
        run.set_tags({"model": model_name})
        run.log_metrics({k: v for k, v in ev.metrics.items() if isinstance(v, (int, float))})
        run.log_dict({"metrics": ev.metrics, "notes": ev.notes}, f"evaluate_{model_name}.json")
        # Always created (empty for the 2D models): it is the stage's declared output directory.
        out_dir = plots_dir / "roc" / model_name
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, (fpr, tpr) in sorted(ev.roc.items()):
            path = out_dir / f"{key}.csv"
            atomic_write_text(_roc_csv(fpr, tpr), path)
            run.log_artifact(path, "roc")
    # Wall-clock figures go to their own metrics file: metrics/<model>.json must be byte-identical
    # across runs with the same params and seed, and a time never is.
    timing = {k: v for k, v in ev.metrics.items() if k in TIMING_KEYS}
    write_json(metrics_dir / f"{model_name}.json", {k: v for k, v in ev.metrics.items() if k not in TIMING_KEYS})
    write_json(
        metrics_dir / "timing" / f"{model_name}.json", {"evaluate_seconds": time.perf_counter() - t_start, **timing}
    )
    for line in ev.notes:
        click.echo(f"[{STAGE}@{model_name}] {line}", err=True)
    shown = ", ".join(
        f"{k} {v:.4g}" for k, v in ev.metrics.items() if isinstance(v, float) and not k.startswith("baseline_")
    )
    click.echo(f"[{STAGE}@{model_name}] {shown}", err=True)


if __name__ == "__main__":
    run_stage(main)
