"""The DDPM noise schedule: an object apart from the network (as diffusers' schedulers).

Notation follows the seed document (``seeds/001``): for ``i = 1..L``

* ``beta2_i = beta2_0 + (i / L) (beta2_1 - beta2_0)`` (the variance added at step ``i``),
* ``alpha_i = sqrt(1 - beta2_i)``, ``abar_i = prod_{k<=i} alpha_k`` (a product of square
  roots, so the marginal variance is ``1 - abar_i^2``),
* ``q(x_i | x_{i-1}) = N(alpha_i x_{i-1}, beta2_i I)``, ``q(x_i | x_0) = N(abar_i x_0, (1 - abar_i^2) I)``.

Every per-step buffer has length ``L + 1`` and is indexed by the step ``i`` itself; index 0
stands for the data (``abar_0 = 1``, ``beta2_0 := 0``), so ``buf[t]`` and ``buf[t - 1]`` need
no off-by-one bookkeeping. Buffers are computed in float64 (the cumulative product over
2500 steps loses ~1e-4 relative accuracy in float32) and then cast.

Reverse variance (a documented choice, ``reverse_variance``): ``p(x_{i-1} | x_i) =
N(mu_theta, sigma2_i I)`` with

* ``beta2`` (default): ``sigma2_i = beta2_i``. For continuous data this is the tight choice:
  at small ``i`` the true reverse variance is ``beta2_tilde_i + c0_i^2 Var[x_0 | x_i] ~ beta2_i``
  (c0 ~ 1/i, Var ~ i beta2), so the KL of the variance mismatch vanishes.
* ``posterior``: ``sigma2_i = beta2_tilde_i = beta2_i (1 - abar_{i-1}^2) / (1 - abar_i^2)``, the
  variance of ``q(x_{i-1} | x_i, x_0)``; with it even the Bayes-optimal mean leaves a gap of
  ``sum_i D / (4 (i-1)^2) ~ D pi^2 / 24`` (0.82 nats in 2D) at any L (the test on Gaussian
  data shows it), so it is kept only for comparison.

Either way the decoder ``p(x_0 | x_1) = N(mu_theta(x_1, 1), beta2_1 I)`` uses ``sigma2_1 =
beta2_1`` (the posterior variance at ``i = 1`` is 0). Sampling and the ELBO use the same
``sigma2``.

Reference: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NoiseSchedule(nn.Module):
    """Linear-in-``beta^2`` schedule with float64-computed buffers of length ``L + 1``.

    Args:
        n_steps: ``L``.
        beta2_start, beta2_end: ``beta2_0`` and ``beta2_1`` of the seed's linear formula.
        dtype: dtype the buffers are cast to (the network's dtype).
        reverse_variance: ``beta2`` or ``posterior`` (see the module docstring).
    """

    beta2: Tensor
    alpha: Tensor
    abar: Tensor
    sigma_marg: Tensor
    post_coef_x0: Tensor
    post_coef_xt: Tensor
    post_var: Tensor
    sigma2: Tensor
    eps_weight: Tensor
    kl_const: Tensor

    def __init__(
        self,
        n_steps: int,
        beta2_start: float,
        beta2_end: float,
        dtype: torch.dtype = torch.float32,
        reverse_variance: str = "beta2",
    ) -> None:
        super().__init__()
        if n_steps < 1 or not 0 < beta2_start < beta2_end < 1:
            raise ValueError(f"need n_steps >= 1 and 0 < beta2_start < beta2_end < 1, got {n_steps}, {beta2_start}, {beta2_end}")
        if reverse_variance not in ("beta2", "posterior"):
            raise ValueError(f"reverse_variance must be 'beta2' or 'posterior', got {reverse_variance!r}")
        self.n_steps = n_steps
        self.reverse_variance = reverse_variance
        self.beta2_start = beta2_start
        self.beta2_end = beta2_end
        i = torch.arange(n_steps + 1, dtype=torch.float64)
        beta2 = beta2_start + (i / n_steps) * (beta2_end - beta2_start)
        beta2[0] = 0.0  # index 0 is the data itself: no noise added
        alpha = torch.sqrt(1.0 - beta2)
        # cumulative product through logs: exact to float64 rounding over thousands of steps
        abar = torch.exp(torch.cumsum(torch.log(alpha), 0))
        one_m_abar2 = 1.0 - abar**2  # variance of q(x_i | x_0); 0 at i = 0
        prev = torch.cat([abar.new_ones(1), abar[:-1]])  # abar_{i-1}
        prev_var = 1.0 - prev**2
        safe = torch.where(one_m_abar2 > 0, one_m_abar2, torch.ones_like(one_m_abar2))
        # posterior q(x_{i-1} | x_i, x_0) = N(c0 x_0 + ct x_i, post_var): product of the
        # Gaussians q(x_i | x_{i-1}) and q(x_{i-1} | x_0), then completing the square.
        post_coef_x0 = prev * beta2 / safe
        post_coef_xt = alpha * prev_var / safe
        post_var = beta2 * prev_var / safe
        post_coef_x0[0] = 1.0  # unused (no step 0); keeps the buffers finite
        post_coef_xt[0] = 0.0
        post_var[0] = 0.0
        sigma2 = beta2.clone() if reverse_variance == "beta2" else post_var.clone()
        sigma2[1] = beta2[1]  # decoder variance (see the module docstring)
        sigma2[0] = 1.0  # unused; keeps divisions by sigma2 finite
        # Per-dimension part of KL(N(mu~, post_var) || N(mu_theta, sigma2)) that does not
        # depend on the network, for t >= 2: (r - 1 - log r) / 2 with r = post_var / sigma2.
        r = post_var / sigma2
        kl_const = 0.5 * (r - 1.0 - torch.log(torch.where(r > 0, r, torch.ones_like(r))))
        kl_const[:2] = 0.0  # t = 1 is the decoder, t = 0 does not exist
        # The t-th ELBO term written in the noise: |mu~ - mu_theta|^2 / (2 sigma2) =
        # eps_weight_t |eps - eps_theta|^2, with mu = (x_t - beta2/sqrt(1-abar^2) eps) / alpha.
        # Large (~1/(2t)) at small t: the reason to importance-sample the steps.
        eps_weight = (beta2 / (alpha * safe.sqrt())) ** 2 / (2.0 * sigma2)
        eps_weight[0] = 0.0
        for name, buf in (
            ("beta2", beta2),
            ("alpha", alpha),
            ("abar", abar),
            ("sigma_marg", torch.sqrt(one_m_abar2)),
            ("post_coef_x0", post_coef_x0),
            ("post_coef_xt", post_coef_xt),
            ("post_var", post_var),
            ("sigma2", sigma2),
            ("eps_weight", eps_weight),
            ("kl_const", kl_const),
        ):
            # persistent=False: the schedule is rebuilt from the config, never from a checkpoint
            self.register_buffer(name, buf.to(dtype), persistent=False)

    @staticmethod
    def _bcast(buf: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``buf[t]`` reshaped to broadcast against ``like`` (B, D...)."""
        v = buf[t]
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample of ``q(x_t | x_0)``: ``abar_t x0 + sqrt(1 - abar_t^2) noise``.

        Args:
            x0: (B, D) data; noise: (B, D) standard normal; t: (B,) int64 steps in ``0..L``.
        Returns:
            (B, D) noisy points.
        """
        return self._bcast(self.abar, t, x0) * x0 + self._bcast(self.sigma_marg, t, x0) * noise

    def posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``q(x_{t-1} | x_t, x_0) = N(mean, var I)`` for ``t >= 1``.

        Returns:
            mean (B, D) and var (B,) (the posterior variance, 0 at ``t = 1``).
        """
        mean = self._bcast(self.post_coef_x0, t, x0) * x0 + self._bcast(self.post_coef_xt, t, x0) * xt
        return mean, self.post_var[t]

    # --- conversions between the three network parameterisations ----------------------------

    def x0_from_eps(self, xt: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Invert ``x_t = abar_t x0 + sqrt(1 - abar_t^2) eps`` for ``x0`` (t >= 1)."""
        return (xt - self._bcast(self.sigma_marg, t, xt) * eps) / self._bcast(self.abar, t, xt)

    def eps_from_x0(self, xt: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """Invert ``x_t = abar_t x0 + sqrt(1 - abar_t^2) eps`` for ``eps`` (t >= 1)."""
        return (xt - self._bcast(self.abar, t, xt) * x0) / self._bcast(self.sigma_marg, t, xt)

    def x0_from_mean(self, xt: Tensor, mean: Tensor, t: Tensor) -> Tensor:
        """Invert the posterior mean ``c0 x0 + ct x_t`` for ``x0`` (ill-conditioned at large t,
        where ``c0`` is tiny: the strided sampler only ever multiplies the result by a
        coefficient of the same order, see :func:`genmodels.diffusion.sampling.sample_strided`)."""
        return (mean - self._bcast(self.post_coef_xt, t, xt) * xt) / self._bcast(self.post_coef_x0, t, xt)

    def mean_from_x0(self, xt: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """Posterior mean ``mu~(x_t, x0)`` with the predicted ``x0`` plugged in."""
        return self._bcast(self.post_coef_x0, t, xt) * x0 + self._bcast(self.post_coef_xt, t, xt) * xt

    def mean_from_eps(self, xt: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """``(x_t - beta2_t / sqrt(1 - abar_t^2) eps) / alpha_t``, the same mean written in ``eps``."""
        b = self._bcast
        return (xt - b(self.beta2, t, xt) / b(self.sigma_marg, t, xt) * eps) / b(self.alpha, t, xt)

    def step(self, mean: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One ancestral step ``x_{t-1} = mean + sqrt(sigma2_t) noise``; at ``t = 1`` the decoder's mean
        is returned (the usual convention: the last step adds no noise).

        Args:
            mean: (B, D) model mean ``mu_theta(x_t, t)``; t: (B,) steps; noise: (B, D).
        """
        std = torch.where(t > 1, self.sigma2[t].sqrt(), torch.zeros_like(self.sigma2[t]))
        return mean + std.reshape(std.shape + (1,) * (mean.dim() - 1)) * noise
