"""Stage `train_classifier`: the small CNN per image data set whose features define the FID.

Usage (dvc.yaml runs it once per data set, as `train_classifier@<dataset>`):

    python stages/train_classifier.py mnist|fashion_mnist [--params params.yaml]
        [--raw-dir data/raw] [--out models/classifier/<dataset>.pt]
        [--metrics metrics/classifier_<dataset>.json] [--plots-dir plots/classifier]

Trains on all ten classes. Fashion-MNIST (and MNIST with ``data.mnist.split: train``): the
official training file, tested on the official test file. MNIST with ``split: test`` (the
offline default: its training file is not in the mirror): a seeded split of the official test
file (``classifier.mnist_test_fraction`` held out); the metrics say which.

Also runs data-parallel under ``torchrun --nproc_per_node N stages/train_classifier.py <dataset>``
(one process per GPU, or gloo on the CPU; ``classifier.batch_size`` stays the global batch):
rank 0 alone logs to MLflow and writes the outputs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from torch import Tensor
    from torch import device as TorchDevice

    from genmodels.distributed import DistInfo
    from genmodels.metrics.classifier import ClassifierResult


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

from genmodels.configs import Params, flatten, to_dict  # noqa: E402
from genmodels.configs import ClassifierConfig  # noqa: E402
from genmodels.distributed import barrier, cleanup, init_from_env  # noqa: E402

STAGE = "train_classifier"


def load_labelled(dataset: str, params: Params, clf: ClassifierConfig, raw_dir: Path) -> tuple:
    """``train_x, train_y, test_x, test_y, source`` for the classifier of ``dataset`` (all ten classes)."""
    import torch

    from genmodels.data.idx import as_tensor, locate
    from genmodels.data.images import DATASET_DIRS
    from genmodels.metrics.classifier import seeded_split

    cfg = getattr(params.data, dataset)
    folder = DATASET_DIRS[dataset]
    mirror = resolve_input(cfg.mirror) if cfg.mirror else None

    def get(key: str) -> torch.Tensor:
        log = lambda m: click.echo(f"[{STAGE}@{dataset}] {m}", err=True)  # noqa: E731
        found = locate(folder, key, raw_dir=raw_dir, mirror=mirror, urls=cfg.urls, allow_download=cfg.download, log=log)
        return as_tensor(found.array)

    test_x, test_y = get("test-images"), get("test-labels").long()
    if dataset == "mnist" and cfg.split == "test":
        return (*seeded_split(test_x, test_y, clf.mnist_test_fraction, clf.seed), "test_file_split")
    return get("train-images"), get("train-labels").long(), test_x, test_y, "train_file"


def _train(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    clf: ClassifierConfig,
    device: TorchDevice,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    dist_info: DistInfo,
) -> ClassifierResult:
    """``train_classifier`` on ``train_x, train_y, test_x, test_y`` with the ``classifier`` params
    (the same call on every rank of a torchrun job)."""
    from genmodels.metrics.classifier import train_classifier

    return train_classifier(
        *data,
        epochs=clf.epochs,
        batch_size=clf.batch_size,
        lr=clf.lr,
        channels=tuple(clf.channels),  # type: ignore[arg-type]
        feature_dim=clf.feature_dim,
        max_train=clf.max_train,
        seed=clf.seed,
        device=device,
        on_epoch=on_epoch,
        dist=dist_info,
    )


@click.command()
@click.argument("dataset", type=click.Choice(["mnist", "fashion_mnist"]))
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file")
@click.option(
    "--raw-dir",
    default="data/raw",
    show_default=True,
    type=click.Path(path_type=Path),
    help="first place to look for IDX files",
)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(path_type=Path),
    help="checkpoint [models/classifier/<dataset>.pt]",
)
@click.option(
    "--metrics",
    "metrics_path",
    default=None,
    type=click.Path(path_type=Path),
    help="[metrics/classifier_<dataset>.json]",
)
@click.option("--plots-dir", default="plots/classifier", show_default=True, type=click.Path(path_type=Path))
@stage_main
def main(
    dataset: str, params_path: str, raw_dir: Path, out_path: Path | None, metrics_path: Path | None, plots_dir: Path
) -> None:
    """Train the FID classifier of DATASET (mnist or fashion_mnist)."""
    from genmodels.metrics.classifier import save_classifier
    from genmodels.training import History

    params = load_params_or_exit(params_path)
    clf = params.classifier
    # Under `torchrun --nproc_per_node N` this joins the process group (gloo on CPU, nccl on
    # CUDA, one GPU per rank); run plainly it is a single process and changes nothing.
    dist_info = init_from_env(setup_torch(params))
    device = dist_info.device
    out_path = out_path or Path("models/classifier") / f"{dataset}.pt"
    metrics_path = metrics_path or Path("metrics") / f"classifier_{dataset}.json"
    if not dist_info.is_main:
        # Other ranks read the IDX files once rank 0 has them (it may have downloaded them into
        # --raw-dir), train silently (they only contribute gradients) and exit.
        barrier()
        train_x, train_y, test_x, test_y, _ = load_labelled(dataset, params, clf, raw_dir)
        _train((train_x, train_y, test_x, test_y), clf, device, None, dist_info)
        cleanup()
        return
    train_x, train_y, test_x, test_y, source = load_labelled(dataset, params, clf, raw_dir)
    barrier()  # the other ranks' signal to read the data (no-op when single-process)
    if source == "test_file_split":
        click.echo(
            f"[{STAGE}@{dataset}] data.mnist.split = test: the MNIST training file is not available, so the classifier "
            f"is trained on {1 - clf.mnist_test_fraction:.0%} of the official test file and tested on the rest",
            err=True,
        )
    history = History()
    with mlflow_run(f"{STAGE}@{dataset}", params, [], device) as run:
        run.log_params(flatten(to_dict(clf), "classifier"))
        run.set_tags({"dataset": dataset, "train_source": source, "world_size": dist_info.world_size})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            history.append(epoch, metrics)
            run.on_epoch(epoch, metrics)
            click.echo(f"[{STAGE}@{dataset}] epoch {epoch}: {metrics}", err=True)

        result = _train((train_x, train_y, test_x, test_y), clf, device, on_epoch, dist_info)
        cleanup()  # the collectives are over; saving and logging are rank 0's alone
        arch = {"channels": list(clf.channels), "feature_dim": clf.feature_dim, "dataset": dataset}
        save_classifier(out_path, result, arch)
        summary = {
            "dataset": dataset,
            "test_accuracy": result.test_accuracy,
            "train_accuracy": result.train_accuracy,
            "n_train": result.n_train,
            "n_test": result.n_test,
            "train_source": source,
            "feature_dim": clf.feature_dim,
        }
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifact(out_path, "model")
    plots_dir.mkdir(parents=True, exist_ok=True)
    (plots_dir / f"{dataset}.csv").write_text(history.to_csv())
    write_json(metrics_path, summary)
    click.echo(
        f"[{STAGE}@{dataset}] test accuracy {result.test_accuracy:.4f} on {result.n_test} images ({source})", err=True
    )


if __name__ == "__main__":
    run_stage(main)
