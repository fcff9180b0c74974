"""The ``classifier`` and ``evaluate`` params sections (frozen dataclasses, validated like the others).

They live next to the metrics they configure; ``genmodels.configs`` imports them into
:class:`genmodels.configs.Params`.
"""

from __future__ import annotations

from dataclasses import dataclass

from genmodels.configs.base import check, in_open_unit, non_negative, positive
from genmodels.metrics.sample import DEFAULT_BANDWIDTHS, DEFAULT_FLOOR_DRAWS, DEFAULT_PROJECTIONS


@dataclass(frozen=True)
class ClassifierConfig:
    """The small CNN per image data set whose penultimate features define the FID.

    Attributes:
        channels: conv channels of the two conv layers.
        feature_dim: width of the penultimate (feature) layer.
        epochs, batch_size, lr: Adam training on all ten classes.
        max_train: at most this many training images (a seeded subset; keeps it under a minute on a CPU).
        mnist_test_fraction: MNIST has only its official test file offline; the classifier is
            trained on a seeded split of it and tested on the held-out fraction.
        seed: weights, subset and batch order.
    """

    channels: tuple[int, ...] = (16, 32)
    feature_dim: int = 64
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    max_train: int = 20000
    mnist_test_fraction: float = 0.2
    seed: int = 0

    def validate(self, prefix: str) -> None:
        check(
            len(self.channels) == 2 and all(c > 0 for c in self.channels),
            f"{prefix}.channels",
            list(self.channels),
            "a list of two positive integers",
        )
        positive(prefix, self, "feature_dim", "epochs", "batch_size", "lr", "max_train")
        in_open_unit(prefix, self, "mnist_test_fraction")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class EvaluateConfig:
    """How the models are evaluated.

    Attributes:
        n_samples: generated 2D points for the sample metrics (and the size of the real draw
            for their floors).
        mmd_bandwidths: RBF widths of the MMD kernel (mean of RBFs), data units.
        swd_projections: random directions of the sliced Wasserstein distance.
        floor_draws: independent real draws of ``n_samples`` points whose mean metrics against
            the test set are the floors (``*_floor``, with ``*_floor_se``); the first draw also
            gives ``sample_logp_floor``.
        sample_draws: generated draws of ``n_samples`` points (2D models and baselines) whose
            mean metrics are reported (with ``*_se`` when > 1): one draw scatters as much as
            one real draw, so model and floor are both means.
        n_fid: generated images for the FID (the real sides use all held-out images; the
            floor compares the same number of training images with them).
        kde_max_centers: training points kept as KDE centres (seeded subset).
        kde_grid: bandwidths tried on validation data (log-spaced around Scott's rule).
        gaussian_ridge: added to the 2D Gaussian baseline's covariance diagonal (the image
            Gaussians choose theirs on validation images: MNIST has fewer zeros than pixels).
        timing_points: points sampled to time the DDPM samplers (reported per 1,000).
        nll_bound_points: test points of the DDPM's full negative ELBO (all L steps each;
            0 = the whole test set).
        image_logit_lambda: logit lambda of the EBM's image baselines (the flow's baselines use
            the flow's own lambda, so their bits/dim are comparable with it).
        seed: every random draw of the evaluation (samples, dequantization, directions).
    """

    n_samples: int = 16384
    mmd_bandwidths: tuple[float, ...] = DEFAULT_BANDWIDTHS
    swd_projections: int = DEFAULT_PROJECTIONS
    floor_draws: int = DEFAULT_FLOOR_DRAWS
    sample_draws: int = DEFAULT_FLOOR_DRAWS
    n_fid: int = 1000
    kde_max_centers: int = 16384
    kde_grid: int = 13
    gaussian_ridge: float = 1e-6
    timing_points: int = 1000
    nll_bound_points: int = 0
    image_logit_lambda: float = 0.001
    seed: int = 0

    def validate(self, prefix: str) -> None:
        positive(prefix, self, "n_samples", "sample_draws", "swd_projections", "n_fid", "kde_max_centers", "kde_grid", "timing_points")
        non_negative(prefix, self, "gaussian_ridge", "nll_bound_points")
        check(
            0 < self.image_logit_lambda < 0.5,
            f"{prefix}.image_logit_lambda",
            self.image_logit_lambda,
            "a number in (0, 0.5)",
        )
        check(self.n_samples >= 2, f"{prefix}.n_samples", self.n_samples, "an integer >= 2")
        check(
            self.floor_draws >= 2,
            f"{prefix}.floor_draws",
            self.floor_draws,
            "an integer >= 2 (a floor's standard error needs two draws)",
        )
        check(
            len(self.mmd_bandwidths) > 0 and all(h > 0 for h in self.mmd_bandwidths),
            f"{prefix}.mmd_bandwidths",
            list(self.mmd_bandwidths),
            "a non-empty list of positive numbers",
        )
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")


__all__ = ["ClassifierConfig", "EvaluateConfig"]
