"""AUROC and ROC curves for out-of-distribution detection (score higher = more in-distribution).

The AUROC is computed from ranks (the Mann-Whitney U statistic), so ties count one half,
exactly the probability ``P(s_in > s_out) + 0.5 P(s_in = s_out)`` over all pairs, and it is
O((n+m) log(n+m)) instead of the O(n m) pair count.

Reference: Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values`` (N,), ties sharing the mean of their ranks; float64."""
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    _, counts = torch.unique_consecutive(sorted_vals, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each tie group
    starts = ends - counts.to(torch.float64) + 1.0
    group_rank = (starts + ends) / 2.0
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    return ranks


def _check(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    a = scores_in.detach().flatten().to(device="cpu", dtype=torch.float64)
    b = scores_out.detach().flatten().to(device="cpu", dtype=torch.float64)
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("AUROC needs at least one score on each side")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        # A NaN would be ranked arbitrarily and give a meaningless number: refuse it.
        raise ValueError("AUROC scores must be finite (got NaN or inf)")
    return a, b


def auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for separating ``scores_in`` (positives) from ``scores_out``.

    Args:
        scores_in: (n,) scores of in-distribution examples (e.g. log-likelihood, -energy).
        scores_out: (m,) scores of out-of-distribution examples.

    Returns:
        ``P(S_in > S_out) + 0.5 P(S_in = S_out)`` in [0, 1]; 0.5 = no separation.
    """
    a, b = _check(scores_in, scores_out)
    n, m = a.numel(), b.numel()
    ranks = _average_ranks(torch.cat([a, b]))
    u = ranks[:n].sum() - n * (n + 1) / 2.0
    return float(u / (n * m))


def roc_curve(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC curve points, one per distinct score, from (0, 0) to (1, 1).

    Tied scores make one step (a diagonal segment), so the trapezoidal area under the points
    equals :func:`auroc` exactly.

    Returns:
        ``fpr``, ``tpr`` (K+1,) float64 and ``thresholds`` (K+1,): point k classifies
        ``score >= thresholds[k]`` as in-distribution (the first threshold is ``+inf``).
    """
    a, b = _check(scores_in, scores_out)
    scores = torch.cat([a, b])
    labels = torch.cat([torch.ones_like(a), torch.zeros_like(b)])
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    tp = torch.cumsum(labels, 0)
    fp = torch.cumsum(1.0 - labels, 0)
    # Keep only the last index of each run of equal scores: thresholds between distinct values.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tp[last] / a.numel()])
    fpr = torch.cat([zero, fp[last] / b.numel()])
    thresholds = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), scores[last]])
    return fpr, tpr, thresholds


__all__ = ["auroc", "roc_curve"]
