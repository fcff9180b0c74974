"""The ``realnvp2d`` section (defaults: seeds/001, RealNVP)."""

from __future__ import annotations

from dataclasses import dataclass

from genmodels.configs.base import check, in_open_unit, non_negative, positive


@dataclass(frozen=True)
class RealNVP2DConfig:
    """RealNVP on 2D points: 14 affine couplings, alternating halves, nets 2 x 128."""

    n_layers: int = 14
    n_hidden: int = 2
    hidden_units: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.999
    epochs: int = 500
    batch_size: int = 2048
    patience: int = 30
    min_delta: float = 1e-4
    seed: int = 42

    def validate(self, prefix: str) -> None:
        positive(prefix, self, "n_layers", "n_hidden", "hidden_units", "lr", "epochs", "batch_size", "patience")
        non_negative(prefix, self, "min_delta")
        in_open_unit(prefix, self, "lr_decay")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
