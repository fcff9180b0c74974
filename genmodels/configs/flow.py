"""The ``flow`` section (defaults: seeds/000, image normalizing flow, plus what makes it beat a Gaussian)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check, non_negative, positive


@dataclass(frozen=True)
class FlowConfig:
    """Image flow on Fashion-MNIST class 0: dequantize + logit, affine couplings (392 + 392).

    Attributes:
        n_layers: affine coupling layers (the seed: 6).
        hidden_units, n_hidden: width and depth of each coupling's MLP (shift and log-scale).
        mask: ``half`` (the seed's 392 + 392 split of the flat vector) or ``checkerboard``
            (spatial 28 x 28 checkerboard); alternates between layers.
        logit_lambda: the λ of ``logit(λ + (1 - 2λ) y)``.
        whiten: start with a data-initialised LU linear layer (exact whitening of the
            logit-space training data), so the flow starts at the Gaussian baseline:
            ``fixed`` keeps it frozen, ``learned`` trains it too, ``none`` leaves it out.
        whiten_shrinkage: ridge added to the whitening covariance, as a fraction of the mean
            pixel variance (also used by the Gaussian baseline, so both are compared alike).
        linear_between: a learnable LU linear layer (identity-initialised) before every
            coupling after the first, so later couplings see mixed coordinates.
        actnorm: a data-initialised ActNorm after every coupling.
        scale_bound: soft clamp ``b`` of the couplings' log-scale (``b tanh(s / b)``).
        cond_clamp: soft clamp ``c tanh(x / c)`` of the coupling MLPs' inputs (0 = off); keeps
            outlying held-out images from driving the MLPs into huge shifts.
        lr, weight_decay: AdamW.
        lr_decay: exponential learning-rate decay per epoch.
        epochs, batch_size, patience: training length, minibatch, early-stopping patience
            (epochs without a better validation bpd).
        grad_clip: max global gradient norm.
        seed: seeds initialisation, shuffling, dequantization noise and samples.
        sample_every: a sample grid every this many epochs (0 = only at the end).
        n_samples: images per sample grid.
        temperature: temperature of the sample grids (1.0 = the model's distribution).
        eval_batch_size: batch size of likelihood evaluation (no gradients).
    """

    n_layers: int = 6
    hidden_units: int = 512
    n_hidden: int = 2
    mask: Literal["half", "checkerboard"] = "checkerboard"
    logit_lambda: float = 0.001
    whiten: Literal["none", "fixed", "learned"] = "fixed"
    whiten_shrinkage: float = 0.02
    linear_between: bool = False
    actnorm: bool = False
    scale_bound: float = 3.0
    cond_clamp: float = 4.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 0.97
    epochs: int = 30
    batch_size: int = 256
    patience: int = 5
    grad_clip: float = 100.0
    seed: int = 0
    sample_every: int = 3
    n_samples: int = 64
    temperature: float = 0.8
    eval_batch_size: int = 1000

    def validate(self, prefix: str) -> None:
        positive(
            prefix,
            self,
            "n_layers",
            "hidden_units",
            "n_hidden",
            "lr",
            "epochs",
            "batch_size",
            "patience",
            "grad_clip",
            "scale_bound",
            "n_samples",
            "temperature",
            "eval_batch_size",
        )
        non_negative(prefix, self, "weight_decay", "sample_every", "whiten_shrinkage", "cond_clamp")
        check(0 < self.logit_lambda < 0.5, f"{prefix}.logit_lambda", self.logit_lambda, "a number in (0, 0.5)")
        check(0 < self.lr_decay <= 1, f"{prefix}.lr_decay", self.lr_decay, "a number in (0, 1]")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
