"""The ``ddpm`` section (defaults: seeds/001, DDPM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check, in_open_unit, in_unit, non_negative, positive


@dataclass(frozen=True)
class DDPMConfig:
    """DDPM on 2D points: L = 2500, beta^2 linear 1e-4 -> 0.02, posterior-mean network.

    Attributes:
        n_steps: L, the number of diffusion steps.
        beta2_start, beta2_end: the linear beta^2 schedule's end points (beta^2_0, beta^2_1).
        parameterization: what the network predicts: ``mean`` (posterior mean mu~, the seed's),
            ``eps`` (the noise) or ``x0`` (the clean point). All are trained with the same
            ELBO-weighted MSE on the implied mean.
        reverse_variance: variance of the reverse steps (and of sampling): ``beta2``
            (sigma2_t = beta2_t, tight for continuous data) or ``posterior`` (the variance of
            q(x_{t-1} | x_t, x_0); leaves a ~0.8-nat gap in 2D even for a perfect network).
        time_embed_dim, hidden_units, n_hidden: network size (sinusoidal embedding, width, depth).
        lr, lr_decay: Adam learning rate and its exponential decay per epoch.
        epochs: maximum number of epochs (early stopping usually ends sooner).
        batch_size: points per optimiser step.
        patience, min_delta: early stopping on the validation ELBO estimate.
        t_sampling: how training draws the step of each point: ``importance`` (p(t) ~ the
            running RMS of each step's ELBO term, mixed with 10% uniform; lower-variance
            gradients of the same ELBO) or ``uniform``.
        ema_decay: exponential moving average of the weights used for validation, the
            checkpoint and sampling, with the warm-up ``min(ema_decay, (1 + k) / (10 + k))``
            after ``k`` steps (:func:`genmodels.training.update_average`); 0 = off.
        sampling_steps: steps of the sampler used for the stage's samples and figures
            (= n_steps: the full ancestral chain; fewer: the strided DDIM-style sampler).
        sampling_eta: noise of the strided sampler (1 = stochastic/ancestral-like, 0 = DDIM).
        sampling_precision: the network's arithmetic while sampling (never in training or the
            bound): ``auto`` (bfloat16 on a CPU with AMX, float32 elsewhere), ``float32`` or
            ``bfloat16``; see :func:`genmodels.diffusion.sampling_dtype`.
        elbo_points: held-out points on which the training stage evaluates the full ELBO
            (all L terms per point; 0 = none).
        n_samples: samples the training stage draws for its figure and sample metrics.
        seed: seed of initialisation, shuffling, steps and noise.
    """

    n_steps: int = 2500
    beta2_start: float = 1e-4
    beta2_end: float = 0.02
    parameterization: Literal["mean", "eps", "x0"] = "mean"
    reverse_variance: Literal["beta2", "posterior"] = "beta2"
    time_embed_dim: int = 32
    hidden_units: int = 64
    n_hidden: int = 5
    lr: float = 1e-3
    lr_decay: float = 0.999
    epochs: int = 1000
    batch_size: int = 4096
    patience: int = 50
    min_delta: float = 0.0
    ema_decay: float = 0.9995
    t_sampling: Literal["importance", "uniform"] = "importance"
    sampling_steps: int = 500
    sampling_eta: float = 1.0
    sampling_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    elbo_points: int = 4096
    n_samples: int = 16384
    seed: int = 689

    def validate(self, prefix: str) -> None:
        positive(
            prefix,
            self,
            "n_steps",
            "time_embed_dim",
            "hidden_units",
            "n_hidden",
            "lr",
            "epochs",
            "batch_size",
            "patience",
            "sampling_steps",
            "n_samples",
        )
        non_negative(prefix, self, "min_delta", "elbo_points")
        in_open_unit(prefix, self, "lr_decay", "beta2_start", "beta2_end")
        in_unit(prefix, self, "sampling_eta")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", self.ema_decay, "a number in [0, 1) (0 = no EMA)")
        check(
            self.beta2_start < self.beta2_end,
            f"{prefix}.beta2_end",
            self.beta2_end,
            f"a value > beta2_start ({self.beta2_start})",
        )
        check(
            self.sampling_steps <= self.n_steps,
            f"{prefix}.sampling_steps",
            self.sampling_steps,
            f"an integer <= n_steps ({self.n_steps})",
        )
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
