"""Frechet distance between Gaussians fitted to feature sets (the FID formula).

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})``.

The cross term is computed in its symmetric form: ``S_1^{1/2} S_2 S_1^{1/2}`` is symmetric
positive semi-definite, so its square root's trace is the sum of the square roots of its
(clamped) eigenvalues -- no non-symmetric ``sqrtm`` with complex round-off, as in some FID
code, and it equals ``tr((S_1 S_2)^{1/2})`` because the two matrices are similar.

Reference: Dowson & Landau, "The Frechet distance between multivariate normal distributions",
J. Multivariate Anal. 1982; Heusel et al., "GANs trained by a two time-scale update rule", 2017.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D), float64, of ``n`` feature vectors."""

    mean: Tensor
    cov: Tensor
    n: int


def gaussian_stats(features: Tensor) -> GaussianStats:
    """Fit a Gaussian to ``features`` (N, D), N >= 2 (unbiased covariance)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features of shape (N >= 2, D), got {tuple(features.shape)}")
    f = features.detach().to(dtype=torch.float64, device="cpu")
    mean = f.mean(0)
    c = f - mean
    cov = c.T @ c / (f.shape[0] - 1)
    return GaussianStats(mean=mean, cov=cov, n=int(f.shape[0]))


def _sqrt_psd(m: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    Args:
        mu1, mu2: (D,) means; cov1, cov2: (D, D) symmetric PSD covariances.
    """
    mu1, mu2, cov1, cov2 = (t.detach().to(dtype=torch.float64, device="cpu") for t in (mu1, mu2, cov1, cov2))
    s1 = _sqrt_psd(cov1)
    cross = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * tr_sqrt
    # Round-off can leave a tiny negative value for identical inputs; the distance is >= 0.
    return max(float(fd), 0.0)


def frechet_from_features(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    return frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)


__all__ = ["GaussianStats", "frechet_distance", "frechet_from_features", "gaussian_stats"]
