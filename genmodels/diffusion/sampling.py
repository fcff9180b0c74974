"""Samplers: the full ancestral chain (L steps) and a strided DDIM-style chain (S < L steps).

Both run one network call per step on the whole batch, draw noise from an explicit
generator and never synchronise with the host inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from genmodels.diffusion.model import DDPM

#: ``sampling_precision`` values: the dtype the samplers' network runs in
PRECISIONS = ("auto", "float32", "bfloat16")


def _cpu_multiplies_bf16() -> bool:
    """True where the CPU has AMX tiles and oneDNN multiplies bfloat16 on them."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(amx is not None and amx() and bf16 is not None and bf16())
    except RuntimeError:  # an op missing from this build
        return False


def sampling_dtype(
    precision: str, device: torch.device | str, model_dtype: torch.dtype = torch.float32
) -> torch.dtype:
    """The dtype of the samplers' network: ``float32`` (that is, the model's own dtype),
    ``bfloat16``, or for ``auto`` bfloat16 for a float32 model on a CPU that multiplies bfloat16
    matrices in hardware (AMX) and the model's dtype elsewhere.

    Elsewhere means a GPU (a 2D sampling step there is a few tiny kernels, bound by their
    launches, not by arithmetic), a CPU without AMX (which converts bfloat16 in software) or a
    float64 model (asked for precision). The states ``x_t``, the noise and the update stay in
    the model's dtype whatever the network runs in.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "auto" and model_dtype == torch.float32 and torch.device(device).type == "cpu":
        return torch.bfloat16 if _cpu_multiplies_bf16() else model_dtype
    return model_dtype


def strided_steps(n_steps: int, sampling_steps: int) -> list[int]:
    """``S`` evenly spaced steps ``tau_S = L > ... > tau_1 >= 1``, then ``tau_0 = 0``, descending."""
    if not 1 <= sampling_steps <= n_steps:
        raise ValueError(f"sampling_steps must be in 1..{n_steps}, got {sampling_steps}")
    taus = [round(k * n_steps / sampling_steps) for k in range(sampling_steps, 0, -1)]
    return [*taus, 0]


def ancestral_coefficients(model: DDPM) -> tuple[list[float], list[float], list[float]]:
    """Per step ``t`` (list index ``t``, 1..L): ``x_{t-1} = a_t x_t + b_t out + s_t z`` with ``out``
    the network's output and ``z`` standard normal, for every parameterisation.

    ``mean``: ``mu = x_t + out`` (a = b = 1); ``eps``: ``mu = (x_t - beta2/sqrt(1 - abar^2) out) / alpha``;
    ``x0``: ``mu = c_xt x_t + c_x0 out`` (the posterior mean's coefficients); ``s_t = sqrt(sigma2_t)``
    and ``s_1 = 0`` (the last step returns the decoder's mean). Computed in float64 once per
    chain and kept on the host: the loop then launches no indexing or coefficient kernels.
    """
    s = model.schedule
    alpha, beta2, sig = s.alpha.double().cpu(), s.beta2.double().cpu(), s.sigma_marg.double().cpu()
    if model.parameterization == "mean":
        a, b = torch.ones_like(alpha), torch.ones_like(alpha)
    elif model.parameterization == "eps":
        a = 1.0 / alpha
        b = -beta2 / (sig.clamp_min(1e-300) * alpha)  # sig_0 = 0: index 0 is never used
    else:
        a, b = s.post_coef_xt.double().cpu(), s.post_coef_x0.double().cpu()
    std = s.sigma2.double().cpu().sqrt()
    std[:2] = 0.0
    return a.tolist(), b.tolist(), std.tolist()


@torch.inference_mode()
def sample_ancestral(
    model: DDPM,
    n: int,
    *,
    generator: torch.Generator,
    precision: str = "auto",
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """``x_L ~ N(0, I)``, then ``x_{t-1} ~ N(mu_theta(x_t, t), sigma2_t I)`` for ``t = L..1``.

    The last step returns the decoder's mean (no noise). Args: n points; generator on the
    model's device; precision: the network's (:func:`sampling_dtype`); on_step: called as
    ``on_step(L, x_L)`` first, then ``on_step(t - 1, x_{t-1})`` after every step, states in
    standardised units (the figures' snapshots; the tensor is updated in place afterwards: copy
    what you keep, and do not modify it). Returns (n, D) samples in data units.
    """
    was_training = model.training
    model.eval()
    dev = model.shift.device
    x = torch.randn(n, model.dim, generator=generator, device=dev, dtype=model.shift.dtype)
    # every step's time projection folded into the biases, once; biases[t] is then a view
    biases = model.step_biases(sampling_dtype(precision, dev, model.shift.dtype))
    a, b, std = ancestral_coefficients(model)
    if on_step is not None:
        on_step(model.n_steps, x)
    for t in range(model.n_steps, 0, -1):
        if biases is not None:
            out = model.net.forward_at(x, biases[t])
        else:
            out = model.net(x, torch.full((1,), t, device=dev, dtype=torch.long))
        # in place: x is this function's own tensor, and the update is 2-3 passes over (n, D)
        if a[t] != 1.0:
            x.mul_(a[t])
        x.add_(out, alpha=b[t])
        if t > 1:
            x.add_(torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype), alpha=std[t])
        if on_step is not None:
            on_step(t - 1, x)
    model.train(was_training)
    return model.unstandardize(x)


@torch.inference_mode()
def sample_strided(
    model: DDPM,
    n: int,
    *,
    sampling_steps: int,
    generator: torch.Generator,
    eta: float = 1.0,
    precision: str = "auto",
) -> Tensor:
    """DDIM-style sampler on ``S = sampling_steps`` evenly spaced steps (Song et al. 2021, eq. 12).

    From step ``t`` to ``s < t``: estimate ``x0_hat`` from the network (any parameterisation;
    for ``mean`` by inverting ``mu~ = c0 x0 + ct x_t``), ``eps_hat`` from ``x_t`` and ``x0_hat``,
    then ``x_s = abar_s x0_hat + sqrt(1 - abar_s^2 - sigma^2) eps_hat + std z`` with
    ``sigma = eta * sqrt((1 - abar_s^2) / (1 - abar_t^2)) * sqrt(1 - abar_t^2 / abar_s^2)``.
    At ``eta = 1`` the mean is that of ``q(x_s | x_t, x0_hat)``; ``std`` is ``sigma`` for the
    ``posterior`` reverse variance and ``eta * sqrt(1 - abar_t^2 / abar_s^2)`` (the strided
    beta^2) for ``beta2`` -- the variance the model was trained and evaluated with, so that
    with ``S = L`` and ``eta = 1`` this is exactly the ancestral sampler. (The posterior
    variance ignores the uncertainty of ``x0_hat`` and, at large strides, under-disperses
    the samples: ~30% too little variance on Gaussian data at S = 50.) ``eta = 0`` is the
    deterministic DDIM. ``precision``: the network's (:func:`sampling_dtype`). The final step (to 0)
    returns ``x0_hat``. For the mean parameterisation the ill-conditioned ``x0_hat`` only
    enters multiplied by coefficients of the same tiny order as ``c0`` (exactly so at
    ``eta = 1``), so its error is amplified at most by about the stride.

    Returns (n, D) samples in data units.
    """
    was_training = model.training
    model.eval()
    dev = model.shift.device
    s_ = model.schedule
    abar = s_.abar
    x = torch.randn(n, model.dim, generator=generator, device=dev, dtype=model.shift.dtype)
    taus = strided_steps(model.n_steps, sampling_steps)
    biases = model.step_biases(sampling_dtype(precision, dev, model.shift.dtype))
    for t, s in zip(taus[:-1], taus[1:], strict=True):
        tt = torch.full((1,), t, device=dev, dtype=torch.long)
        x0_hat = model.predict_x0(x, tt, biases)
        if s == 0:
            x = x0_hat
            break
        eps_hat = s_.eps_from_x0(x, x0_hat, tt)
        a_t, a_s = abar[t].double(), abar[s].double()
        # coefficients in float64 (scalars): 1 - abar^2 is tiny near t = 0
        beta2_ts = 1 - a_t**2 / a_s**2  # variance of q(x_t | x_s): the strided beta^2
        sigma = eta * torch.sqrt((1 - a_s**2) / (1 - a_t**2) * beta2_ts)
        c_eps = torch.sqrt((1 - a_s**2 - sigma**2).clamp_min(0.0))
        x = a_s.to(x.dtype) * x0_hat + c_eps.to(x.dtype) * eps_hat
        if eta > 0:
            # the noise follows the model's reverse variance: the strided beta^2 for ``beta2``
            # (at eta = 1 and S = L exactly the ancestral chain), the posterior one otherwise
            std = eta * beta2_ts.sqrt() if s_.reverse_variance == "beta2" else sigma
            x = x + std.to(x.dtype) * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    model.train(was_training)
    return model.unstandardize(x)


def sample(
    model: DDPM,
    n: int,
    *,
    generator: torch.Generator,
    sampling_steps: int | None = None,
    eta: float = 1.0,
    precision: str = "auto",
) -> Tensor:
    """``sampling_steps`` None or equal to L: the full ancestral chain; fewer: :func:`sample_strided`."""
    if sampling_steps is None or sampling_steps == model.n_steps:
        return sample_ancestral(model, n, generator=generator, precision=precision)
    return sample_strided(model, n, sampling_steps=sampling_steps, generator=generator, eta=eta, precision=precision)
