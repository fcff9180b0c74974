"""The ``flow`` section (defaults: seeds/000, image normalizing flow)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check, in_open_unit, positive


@dataclass(frozen=True)
class FlowConfig:
    """Image flow on Fashion-MNIST class 0: dequantize + logit, 6 affine couplings (392 + 392)."""

    n_layers: int = 6
    hidden_units: int = 512
    n_hidden: int = 2
    mask: Literal["half", "checkerboard"] = "half"
    logit_lambda: float = 0.05
    lr: float = 1e-3
    epochs: int = 100
    batch_size: int = 256
    patience: int = 10
    grad_clip: float = 100.0
    seed: int = 0

    def validate(self, prefix: str) -> None:
        positive(
            prefix, self, "n_layers", "hidden_units", "n_hidden", "lr", "epochs", "batch_size", "patience", "grad_clip"
        )
        in_open_unit(prefix, self, "logit_lambda")
        check(self.logit_lambda < 0.5, f"{prefix}.logit_lambda", self.logit_lambda, "a number in (0, 0.5)")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
