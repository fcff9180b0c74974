"""Stage `prepare`: verified IDX files -> class-filtered uint8 splits; seeded 2D point sets.

Usage (dvc.yaml runs it once per data set, as `prepare@<dataset>`):

    python stages/prepare.py mnist|fashion_mnist|points2d [--params params.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

# This checkout's stages/ and genmodels/ come first, also in DVC's temp experiment copies.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from _common import (  # noqa: E402
    load_params_or_exit,
    mlflow_run,
    resolve_input,
    run_stage,
    setup_torch,
    stage_main,
    write_json,
)

from genmodels.configs import flatten, to_dict  # noqa: E402
from genmodels.data.images import prepare_images  # noqa: E402
from genmodels.data.points2d import get_distribution, make_splits, read_points_csv, split_csv_points  # noqa: E402
from genmodels.training import atomic_save  # noqa: E402

@click.command()
@click.argument("dataset", type=click.Choice(["mnist", "fashion_mnist", "points2d"]))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option("--raw-dir", default="data/raw", show_default=True, type=click.Path(path_type=Path), help="first place to look for IDX files; downloads land here")
@click.option("--out-dir", default="data/prepared", show_default=True, type=click.Path(path_type=Path), help="prepared tensors")
@click.option("--metrics-dir", default="metrics/data", show_default=True, type=click.Path(path_type=Path), help="small JSON summaries (DVC metrics)")
@stage_main
def main(dataset: str, params_path: str, raw_dir: Path, out_dir: Path, metrics_dir: Path) -> None:
    """Prepare DATASET (mnist, fashion_mnist or points2d)."""
    params = load_params_or_exit(params_path)
    setup_torch(params)
    out_dir.mkdir(parents=True, exist_ok=True)
    with mlflow_run(f"prepare@{dataset}", params, [], "cpu") as run:
        run.log_params(flatten(to_dict(getattr(params.data, dataset)), f"data.{dataset}"))
        if dataset == "points2d":
            summary = _prepare_points(params, out_dir)
        else:
            summary = _prepare_images(dataset, params, raw_dir, out_dir)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.set_tags({f"data.{k}": v for k, v in summary.items() if isinstance(v, str)})
        run.log_dict(summary, f"{dataset}_summary.json")
    write_json(metrics_dir / f"{dataset}.json", summary)


def _prepare_images(dataset: str, params, raw_dir: Path, out_dir: Path) -> dict:  # noqa: ANN001
    cfg = getattr(params.data, dataset)
    if dataset == "mnist":
        if cfg.split == "test":
            click.echo(
                "prepare@mnist: data.mnist.split = test -> the official MNIST *test* file (t10k) is split into "
                f"train/val/test zeros (val {cfg.val_fraction}, test {cfg.test_fraction}); the training split is not in the "
                "offline mirror. Set data.mnist.split: train when train-images-idx3-ubyte.gz is available.",
                err=True,
            )
        else:
            click.echo("prepare@mnist: data.mnist.split = train -> the official MNIST training file.", err=True)
    prepared = prepare_images(
        dataset,
        cfg,
        raw_dir=raw_dir,
        mirror=resolve_input(cfg.mirror) if cfg.mirror else None,
        seed=params.common.seed,
        log=lambda m: click.echo(f"prepare@{dataset}: {m}", err=True),
    )
    atomic_save(prepared.to_dict(), out_dir / f"{dataset}.pt")
    info = prepared.info
    summary = {
        "dataset": dataset,
        "split": info["split"],
        "class_index": info["class_index"],
        "n_train": info["n_train"],
        "n_val": info["n_val"],
        "n_test": info["n_test"],
        "n_other": info["n_other"],
    }
    for k, v in info["class_counts_test_file"].items():
        summary[f"test_file_class_{k}"] = v
    for k, v in info["files"].items():
        summary[f"sha256_{k}"] = v["sha256"]
        summary[f"source_{k}"] = v["source"]
    click.echo(f"prepare@{dataset}: train {info['n_train']}, val {info['n_val']}, test {info['n_test']}, other classes {info['n_other']}", err=True)
    return summary


def _prepare_points(params, out_dir: Path) -> dict:  # noqa: ANN001
    cfg = params.data.points2d
    summary: dict = {"dataset": "points2d", "name": cfg.name}
    if cfg.name == "csv":
        pts = read_points_csv(resolve_input(cfg.csv_path))
        splits = split_csv_points(pts, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
        summary["csv_rows"] = int(pts.shape[0])
    else:
        splits = make_splits(cfg.name, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
        h, se = get_distribution(cfg.name).entropy(n=cfg.entropy_samples, seed=cfg.seed + 1)
        summary["true_entropy"] = h
        summary["true_entropy_se"] = se
        click.echo(f"prepare@points2d: {cfg.name}: true entropy {h:.4f} +- {se:.4f} nats (Monte-Carlo, {cfg.entropy_samples} samples)", err=True)
    summary.update({"n_train": int(splits.train.shape[0]), "n_val": int(splits.val.shape[0]), "n_test": int(splits.test.shape[0])})
    payload = {"train": splits.train, "val": splits.val, "test": splits.test, "name": cfg.name}
    if "true_entropy" in summary:
        payload["true_entropy"] = summary["true_entropy"]
        payload["true_entropy_se"] = summary["true_entropy_se"]
    atomic_save(payload, out_dir / "points2d.pt")
    return summary


if __name__ == "__main__":
    run_stage(main)
