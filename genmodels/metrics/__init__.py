"""Metrics with their references: two-sample distances on points, AUROC, Frechet distance, the
FID classifier, and the naive baselines every model is shown beside.

Modules: :mod:`.sample` (MMD, energy distance, sliced Wasserstein, real-vs-real floors),
:mod:`.roc` (AUROC, ROC curves), :mod:`.frechet` (Frechet distance of fitted Gaussians),
:mod:`.classifier` (the small CNN whose features define the FID), :mod:`.baselines`
(full-covariance Gaussian and KDE, on points and in the image flow's space),
:mod:`.config` (the ``classifier`` and ``evaluate`` params sections).
"""

from genmodels.metrics.frechet import frechet_distance, frechet_from_features, gaussian_stats
from genmodels.metrics.roc import auroc, roc_curve
from genmodels.metrics.sample import (
    DEFAULT_BANDWIDTHS,
    ReferenceSums,
    energy_distance,
    mmd2,
    mmd2_and_energy,
    reference_sums,
    sample_metrics,
    sample_metrics_with_floor,
    sliced_wasserstein2,
)

__all__ = [
    "DEFAULT_BANDWIDTHS",
    "ReferenceSums",
    "auroc",
    "energy_distance",
    "frechet_distance",
    "frechet_from_features",
    "gaussian_stats",
    "mmd2",
    "mmd2_and_energy",
    "reference_sums",
    "roc_curve",
    "sample_metrics",
    "sample_metrics_with_floor",
    "sliced_wasserstein2",
]
