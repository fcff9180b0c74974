"""The ``ebm`` section (defaults: seeds/000, energy-based model on MNIST zeros).

Reference settings: Du & Mordatch, "Implicit Generation and Modeling with Energy-Based Models"
(NeurIPS 2019) and the UvA deep-learning EBM tutorial the seed follows: Langevin with step 10,
noise 5e-3, gradients clamped to +-0.03, a replay buffer with 5% re-initialisation, Adam with
beta1 = 0 and an L2 penalty alpha * (E_real^2 + E_fake^2) with alpha = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check, in_unit, non_negative, positive


@dataclass(frozen=True)
class EBMConfig:
    """EBM on MNIST zeros: MLP 784-512-512-1, 60 Langevin steps (step 10, noise 5e-3), alpha 0.1.

    Attributes:
        hidden: hidden widths of the energy MLP (input 784, output 1).
        activation: hidden non-linearity (``silu`` = Swish, smooth, as EBMs need smooth input gradients).
        alpha: weight of the L2 energy penalty ``alpha * (E_real^2 + E_fake^2)``.
        lr, beta1, beta2: Adam settings (beta1 = 0: momentum destabilises the moving CD target).
        lr_decay: multiplicative learning-rate decay per epoch.
        ema_decay: Polyak (exponential moving) average of the weights, updated every batch; the
            average is validated, kept as the best checkpoint and returned (0 = off, the live
            weights). The Langevin sampler always uses the live weights.
        epochs, batch_size: training length and batch size.
        buffer_size, reinit_prob: replay buffer of persistent chains and the chance that a drawn
            chain restarts from uniform noise.
        langevin_steps, step_size, noise_std, grad_clip: the training sampler (per-pixel
            gradient clamp; pixels are clamped to [0, 1]).
        data_noise: std of Gaussian noise added to real images (keeps the energy smooth
            between the discrete pixel values).
        patience: early-stopping patience on the validation loss (epochs).
        min_epochs: epochs before the best checkpoint and early stopping consider the validation
            loss (early on the chains lag behind the model and the loss is spuriously low).
        max_energy: a batch with |E| above this (or any NaN/inf) counts as a divergence.
        max_rollbacks: divergences survived by rolling back before training fails.
        rollback_lr_factor: the learning rate is multiplied by this after each rollback.
        rollback_reinit_fraction: fraction of buffer chains restarted from noise on a rollback.
        sample_every: epochs between sample grids handed to the stage (0 = never).
        sample_steps: Langevin steps of long-run sampling from noise (``sample`` command, evaluate).
        seed: seed of every generator in training.
    """

    hidden: tuple[int, ...] = (512, 512)
    activation: Literal["silu", "relu", "elu", "leaky_relu", "tanh"] = "silu"
    alpha: float = 0.1
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    lr_decay: float = 0.9
    ema_decay: float = 0.98
    epochs: int = 20
    batch_size: int = 64
    buffer_size: int = 512
    reinit_prob: float = 0.05
    langevin_steps: int = 60
    step_size: float = 10.0
    noise_std: float = 5e-3
    grad_clip: float = 0.03
    data_noise: float = 5e-3
    patience: int = 10
    min_epochs: int = 5
    max_energy: float = 1e4
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    rollback_reinit_fraction: float = 0.5
    sample_every: int = 5
    sample_steps: int = 256
    seed: int = 0

    def validate(self, prefix: str) -> None:
        check(
            len(self.hidden) > 0 and all(h > 0 for h in self.hidden),
            f"{prefix}.hidden",
            list(self.hidden),
            "a non-empty list of positive integers",
        )
        positive(
            prefix,
            self,
            "alpha",
            "lr",
            "epochs",
            "batch_size",
            "buffer_size",
            "langevin_steps",
            "step_size",
            "noise_std",
            "grad_clip",
            "patience",
            "min_epochs",
            "max_energy",
            "sample_steps",
        )
        non_negative(prefix, self, "data_noise", "max_rollbacks", "sample_every")
        in_unit(prefix, self, "reinit_prob", "beta1", "rollback_reinit_fraction")
        check(0 <= self.beta2 < 1, f"{prefix}.beta2", self.beta2, "a number in [0, 1)")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", self.ema_decay, "a number in [0, 1)")
        check(0 < self.lr_decay <= 1, f"{prefix}.lr_decay", self.lr_decay, "a number in (0, 1]")
        check(
            0 < self.rollback_lr_factor < 1,
            f"{prefix}.rollback_lr_factor",
            self.rollback_lr_factor,
            "a number strictly between 0 and 1",
        )
        check(
            self.batch_size <= self.buffer_size,
            f"{prefix}.batch_size",
            self.batch_size,
            f"at most buffer_size ({self.buffer_size}): each batch draws distinct chains",
        )
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
