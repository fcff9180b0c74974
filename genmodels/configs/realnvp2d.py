"""The ``realnvp2d`` section (defaults: seeds/001, RealNVP)."""

from __future__ import annotations

from dataclasses import dataclass

from genmodels.configs.base import check, in_open_unit, non_negative, positive


@dataclass(frozen=True)
class RealNVP2DConfig:
    """RealNVP on 2D points: 14 affine couplings, alternating halves, nets 2 x 128.

    Attributes:
        n_layers, n_hidden, hidden_units: couplings, hidden layers per net, their width (seed: 14, 2, 128).
        scale_bound: soft clamp ``b`` of each coupling's log-scale, ``s = b tanh(raw / b)``
            (5: rings' empty gaps between thin rings need strong contraction; 3 gave rings 0.0554).
        input_bound: soft clamp ``c`` of each conditioner's input, ``c tanh(x / c)`` (0 = off):
            shift and log-scale then stay bounded far from the data.
        standardize: first map the data with the training set's mean/std (exact log-det
            included, so NLLs stay in the data space).
        lr, lr_decay: Adam learning rate and its exponential decay per epoch (seed: 1e-3, 0.999).
        epochs: maximum number of epochs (seed: 500); early stopping usually ends sooner.
        batch_size: points per step (seed: 2048).
        patience, min_delta: early stopping on the validation NLL.
        grad_clip: largest global gradient norm of a step (larger ones are scaled down to it,
            ``torch.nn.utils.clip_grad_norm_``); 0 = no clipping.
        ema_decay: exponential moving average of the weights, updated after every optimiser
            step, used for validation, early stopping and the final model (0 = off).
        ema_reset: with the EMA on, restart it from the raw weights after an epoch whose raw
            validation NLL is lower than the average's by more than this (nats); 0 = never.
        seed: seed of initialisation and shuffling (seed: 42).
    """

    n_layers: int = 14
    n_hidden: int = 2
    hidden_units: int = 128
    scale_bound: float = 5.0
    input_bound: float = 3.0
    standardize: bool = True
    lr: float = 1e-3
    lr_decay: float = 0.999
    epochs: int = 500
    batch_size: int = 2048
    patience: int = 100
    min_delta: float = 1e-3
    grad_clip: float = 10.0
    ema_decay: float = 0.999
    ema_reset: float = 0.02
    seed: int = 42

    def validate(self, prefix: str) -> None:
        positive(
            prefix,
            self,
            "n_layers",
            "n_hidden",
            "hidden_units",
            "scale_bound",
            "lr",
            "epochs",
            "batch_size",
            "patience",
        )
        non_negative(prefix, self, "min_delta", "grad_clip", "input_bound", "ema_reset")
        in_open_unit(prefix, self, "lr_decay")
        check(0 <= self.ema_decay < 1, f"{prefix}.ema_decay", self.ema_decay, "a number in [0, 1) (0 = no EMA)")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
