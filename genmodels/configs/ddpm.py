"""The ``ddpm`` section (defaults: seeds/001, DDPM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check, in_open_unit, non_negative, positive


@dataclass(frozen=True)
class DDPMConfig:
    """DDPM on 2D points: L = 2500, beta^2 linear 1e-4 -> 0.02, posterior-mean network."""

    n_steps: int = 2500
    beta2_start: float = 1e-4
    beta2_end: float = 0.02
    parameterization: Literal["mean", "eps", "x0"] = "mean"
    time_embed_dim: int = 32
    hidden_units: int = 64
    lr: float = 1e-3
    lr_decay: float = 0.999
    epochs: int = 1000
    batch_size: int = 4096
    patience: int = 50
    min_delta: float = 0.0
    sampling_steps: int = 100
    seed: int = 689

    def validate(self, prefix: str) -> None:
        positive(
            prefix,
            self,
            "n_steps",
            "time_embed_dim",
            "hidden_units",
            "lr",
            "epochs",
            "batch_size",
            "patience",
            "sampling_steps",
        )
        non_negative(prefix, self, "min_delta")
        in_open_unit(prefix, self, "lr_decay", "beta2_start", "beta2_end")
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
