"""Image data sets reduced to one class, with seeded train/val/test splits stored as uint8 tensors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from genmodels.configs.data import ImageDataConfig
from genmodels.data.idx import as_tensor, locate

# params name -> folder name of the canonical files
DATASET_DIRS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}


@dataclass(frozen=True)
class PreparedImages:
    """The prepared splits of one data set.

    Attributes:
        train, val, test: uint8 ``(N, 28, 28)`` images of the chosen class.
        other: uint8 ``(M, 28, 28)`` images of the other classes, from the official test file
            (never used for training; the out-of-distribution set).
        other_labels: int64 ``(M,)``.
        info: provenance (files, sources, sha256, split, counts), JSON-serialisable.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    other: Tensor
    other_labels: Tensor
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "other": self.other,
            "other_labels": self.other_labels,
            "class_index": int(self.info["class_index"]),
            "split": str(self.info["split"]),
        }


def prepare_images(
    name: str,
    cfg: ImageDataConfig,
    *,
    raw_dir: Path,
    mirror: Path | None,
    seed: int,
    log: Callable[[str], None] = print,
) -> PreparedImages:
    """Locate + verify the IDX files of ``name`` and build the class-filtered splits.

    ``split == 'train'``: train/val from the official training file (val = ``val_fraction``
    of the class), test = the class in the official test file.
    ``split == 'test'``: the class in the official test file is split into train/val/test
    by ``val_fraction``/``test_fraction``. In both cases ``other`` is the other classes
    of the official test file.
    """
    folder = DATASET_DIRS[name]

    def get(key: str):  # noqa: ANN202 - small local helper
        return locate(folder, key, raw_dir=raw_dir, mirror=mirror, urls=cfg.urls, allow_download=cfg.download, log=log)

    files = {}
    test_x, test_y = get("test-images"), get("test-labels")
    files["test-images"], files["test-labels"] = test_x, test_y
    tx, ty = as_tensor(test_x.array), as_tensor(test_y.array).long()
    _check_pair(tx, ty, test_x.path, test_y.path)
    g = torch.Generator().manual_seed(seed)
    c = cfg.class_index
    if cfg.split == "train":
        tr_x, tr_y = get("train-images"), get("train-labels")
        files["train-images"], files["train-labels"] = tr_x, tr_y
        x, y = as_tensor(tr_x.array), as_tensor(tr_y.array).long()
        _check_pair(x, y, tr_x.path, tr_y.path)
        pool = x[y == c]
        perm = torch.randperm(pool.shape[0], generator=g)
        n_val = round(pool.shape[0] * cfg.val_fraction)
        val, train = pool[perm[:n_val]], pool[perm[n_val:]]
        test = tx[ty == c]
    else:
        pool = tx[ty == c]
        perm = torch.randperm(pool.shape[0], generator=g)
        n_val = round(pool.shape[0] * cfg.val_fraction)
        n_test = round(pool.shape[0] * cfg.test_fraction)
        val, test, train = pool[perm[:n_val]], pool[perm[n_val : n_val + n_test]], pool[perm[n_val + n_test :]]
    other_mask = ty != c
    info: dict[str, Any] = {
        "dataset": name,
        "split": cfg.split,
        "class_index": c,
        "n_train": int(train.shape[0]),
        "n_val": int(val.shape[0]),
        "n_test": int(test.shape[0]),
        "n_other": int(other_mask.sum()),
        "class_counts_test_file": {str(k): int((ty == k).sum()) for k in range(10)},
        "files": {k: {"path": str(v.path), "source": v.source, "sha256": v.sha256} for k, v in files.items()},
    }
    return PreparedImages(train.contiguous(), val.contiguous(), test.contiguous(), tx[other_mask].contiguous(), ty[other_mask].contiguous(), info)


def _check_pair(x: Tensor, y: Tensor, px: Path, py: Path) -> None:
    from genmodels.data.idx import DataFileError

    if x.ndim != 3 or x.dtype != torch.uint8:
        raise DataFileError(f"{px}: expected uint8 images (N, rows, cols), got {tuple(x.shape)} {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataFileError(f"{py}: {y.shape[0] if y.ndim else 0} labels for {x.shape[0]} images in {px}")
    if int(y.min()) < 0 or int(y.max()) > 9:
        raise DataFileError(f"{py}: labels outside 0-9")


def load_prepared(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``data/prepared/<dataset>.pt`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared data not found; run `dvc repro prepare` first")
    return torch.load(path, map_location="cpu", weights_only=True)
