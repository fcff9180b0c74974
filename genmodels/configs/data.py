"""The ``data`` section: where the IDX files come from, which class, how it is split, the 2D set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from genmodels.configs.base import check, in_open_unit, positive

POINTS2D_NAMES = ("two_moons", "eight_gaussians", "checkerboard", "pinwheel", "two_spirals", "rings")

MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
FASHION_URLS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)


@dataclass(frozen=True)
class ImageDataConfig:
    """One IDX image data set (MNIST or Fashion-MNIST) reduced to one class.

    Attributes:
        split: which official split the training images come from. ``train`` uses the
            60k training file for train/val and the official test file for test;
            ``test`` splits the official 10k test file itself into train/val/test.
        class_index: the class kept for training (0-9).
        val_fraction, test_fraction: fractions of the class' images held out (``test_fraction``
            only applies when ``split`` is ``test``; with ``train`` the official test file is the test set).
        mirror: folder holding ``<dataset>/<file>.gz`` (searched after ``data/raw``).
        download: allow a download from ``urls`` when neither ``data/raw`` nor the mirror has a file.
        urls: base URLs tried in order.
    """

    split: Literal["train", "test"] = "train"
    class_index: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    mirror: str = "../shared/data"
    download: bool = True
    urls: tuple[str, ...] = ()

    def validate(self, prefix: str) -> None:
        check(0 <= self.class_index <= 9, f"{prefix}.class_index", self.class_index, "an integer from 0 to 9")
        in_open_unit(prefix, self, "val_fraction", "test_fraction")
        check(
            self.val_fraction + self.test_fraction < 0.9,
            f"{prefix}.val_fraction",
            self.val_fraction,
            f"val_fraction + test_fraction < 0.9 (test_fraction is {self.test_fraction})",
        )
        for i, u in enumerate(self.urls):
            check(u.startswith(("http://", "https://")), f"{prefix}.urls[{i}]", u, "an http(s) URL")


@dataclass(frozen=True)
class Points2DConfig:
    """The 2D point set.

    Attributes:
        name: a built-in distribution (with exact log-density) or ``csv``.
        csv_path: the user's file of 2D points (``x,y`` per row, optional header); only for ``csv``.
        n_train, n_val, n_test: sizes (for ``csv`` the file is split with these fractions of its rows).
        seed: seed of the generator (and of the CSV split).
        entropy_samples: Monte-Carlo samples for the true entropy (its standard error is reported).
    """

    name: Literal["two_moons", "eight_gaussians", "checkerboard", "pinwheel", "two_spirals", "rings", "csv"] = (
        "two_moons"
    )
    csv_path: str | None = None
    n_train: int = 65536
    n_val: int = 8192
    n_test: int = 16384
    seed: int = 0
    entropy_samples: int = 262144

    def validate(self, prefix: str) -> None:
        positive(prefix, self, "n_train", "n_val", "n_test", "entropy_samples")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
        if self.name == "csv":
            check(
                self.csv_path is not None,
                f"{prefix}.csv_path",
                self.csv_path,
                "a path to a CSV file when name is 'csv'",
            )
        else:
            check(self.csv_path is None, f"{prefix}.csv_path", self.csv_path, "null unless name is 'csv'")


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section."""

    mnist: ImageDataConfig = field(default_factory=lambda: ImageDataConfig(urls=MNIST_URLS))
    fashion_mnist: ImageDataConfig = field(default_factory=lambda: ImageDataConfig(urls=FASHION_URLS))
    points2d: Points2DConfig = field(default_factory=Points2DConfig)

    def validate(self, prefix: str) -> None:
        self.mnist.validate(f"{prefix}.mnist")
        self.fashion_mnist.validate(f"{prefix}.fashion_mnist")
        self.points2d.validate(f"{prefix}.points2d")
