"""The ELBO of a DDPM: the training loss (one random step per point) and the full bound.

For a data point ``x_0`` (standardised units, D dims) the negative ELBO is

    -ELBO = KL(q(x_L | x_0) || N(0, I))                                     (prior)
          + sum_{t=2}^{L} E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))    (L - 1 terms)
          + E_q [-log p(x_0 | x_1)]                                          (decoder)

With ``p(x_{t-1} | x_t) = N(mu_theta, sigma2_t I)`` (``sigma2`` fixed, see
:mod:`genmodels.diffusion.schedule`) each KL is exactly
``|mu~_t - mu_theta|^2 / (2 sigma2_t) + D kl_const_t`` with the network-free
``kl_const_t = (r - 1 - log r) / 2``, ``r = beta2_tilde_t / sigma2_t``; the decoder term is
``|x_0 - mu_theta(x_1, 1)|^2 / (2 sigma2_1) + (D/2) log(2 pi sigma2_1)``. Since
``mu~_1 = x_0``, one formula ``|mu~_t - mu_theta|^2 / (2 sigma2_t)`` covers every ``t = 1..L``
(the "ELBO-weighted MSE"); only constants and the prior differ. The data-unit bound adds
``sum(log scale)`` of the standardisation (its log-det).

Reference: Ho et al. 2020, eq. (5); Sohl-Dickstein et al. 2015.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genmodels.diffusion.model import DDPM


def prior_kl(model: DDPM, x0: Tensor) -> Tensor:
    """``KL(N(abar_L x0, (1 - abar_L^2) I) || N(0, I))`` per point: (B, D) -> (B,)."""
    s = model.schedule
    ab = s.abar[-1].to(torch.float64)
    var = 1.0 - ab**2
    x = x0.to(torch.float64)
    kl = 0.5 * (var + ab**2 * x**2 - 1.0 - torch.log(var)).sum(1)
    return kl.to(x0.dtype)


def decoder_const(model: DDPM) -> Tensor:
    """Everything of the bound's L terms that does not depend on the network:
    ``(D/2) log(2 pi sigma2_1)`` of ``-log p(x_0 | x_1)`` plus ``D sum_{t>=2} kl_const_t``."""
    s = model.schedule
    return 0.5 * model.dim * torch.log(2 * math.pi * s.sigma2[1]) + model.dim * s.kl_const.sum()


def weighted_mse(model: DDPM, x0: Tensor, t: Tensor, noise: Tensor, step_biases: Tensor | None = None) -> Tensor:
    """``|mu~_t - mu_theta(x_t, t)|^2 / (2 sigma2_t)`` per point.

    Args:
        x0: (B, D) standardised data; t: (B,) steps in ``1..L``, or (1,) for one step shared
            by all rows; noise: (B, D) standard normal; step_biases: the network's fast path
            for a shared step (see :meth:`DDPM.predict`), inference only.
    Returns:
        (B,) the t-th ELBO term without constants.
    """
    s = model.schedule
    xt = s.add_noise(x0, noise, t)
    target, _ = s.posterior(x0, xt, t)
    _, mean = model.predict(xt, t, step_biases)
    return (target - mean).pow(2).sum(1) / (2.0 * s.sigma2[t])


def elbo_estimate(model: DDPM, x: Tensor, t: Tensor, noise: Tensor, inv_prob: Tensor | None = None) -> Tensor:
    """Unbiased one-step estimate of the negative ELBO in nats, data units, per point.

    With ``t ~ p(t)`` on ``1..L``, ``weighted_mse / p(t)`` estimates the sum of all L terms
    (``p`` uniform: ``L * weighted_mse``); the prior, the decoder constant and the
    standardisation log-det are added exactly. Its expectation is :func:`nll_bound`, so
    train/val losses read as NLL bounds.

    Args:
        x: (B, D) data in data units; t: (B,) steps drawn from ``p``; noise: (B, D);
        inv_prob: (B,) ``1 / p(t)`` (None: uniform steps, ``L``).
    Returns:
        (B,) estimates (differentiable w.r.t. the network).
    """
    x0 = model.standardize(x)
    w = model.n_steps if inv_prob is None else inv_prob
    terms = w * weighted_mse(model, x0, t, noise)
    return terms + prior_kl(model, x0) + decoder_const(model) + model.log_scale_sum()


@torch.no_grad()
def nll_bound(
    model: DDPM,
    x: Tensor,
    *,
    generator: torch.Generator,
    chunk_points: int = 16384,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The full negative ELBO (all L terms + prior + decoder), nats per point, data units.

    Every point gets every step ``t = 1..L``, each with its own ``x_t ~ q(x_t | x_0)``. The
    evaluation is step-major: for a chunk of up to ``chunk_points`` points, one network call
    per step on the whole chunk, so the step's time projection is shared by all rows (the
    network's fast path) and a bound costs about one sampling chain over the same points.
    Memory is ``O(chunk_points)``. The noise is drawn step by step: ``(chunk, D)`` for
    ``t = 1``, then ``t = 2``, ...

    Args:
        x: (N, D) held-out points in data units.
        generator: source of the ``x_t`` noise (on ``x``'s device).
        chunk_points: points per network call.
        return_terms: also return the mean of each step's term over the points, (L,)
            (index ``t - 1``; the decoder term at index 0 excludes its constant).
    Returns:
        (N,) bound per point, or ``(bound, terms)``.
    """
    if chunk_points < 1:
        raise ValueError(f"chunk_points must be >= 1, got {chunk_points}")
    was_training = model.training
    model.eval()
    L = model.n_steps
    x0_all = model.standardize(x)
    biases = model.step_biases()
    # sums in float64: 2500 terms of very different sizes
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    step_sums: list[Tensor] = []
    for start in range(0, x.shape[0], chunk_points):
        x0 = x0_all[start : start + chunk_points]
        acc = out[start : start + x0.shape[0]]  # a view: accumulated in place
        for t in range(1, L + 1):
            tt = torch.full((1,), t, device=x.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x.device, dtype=x.dtype)
            term = weighted_mse(model, x0, tt, noise, biases)
            acc += term
            if return_terms:
                step_sums.append(term.sum(dtype=torch.float64))
    bound = (out + prior_kl(model, x0_all) + decoder_const(model) + model.log_scale_sum()).to(x.dtype)
    model.train(was_training)
    if return_terms:
        # step_sums is chunk-major: (n_chunks, L) summed over the chunks
        terms = torch.stack(step_sums).reshape(-1, L).sum(0) / x.shape[0]
        return bound, terms.to(x.dtype)
    return bound
