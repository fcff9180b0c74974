"""The ``ebm`` section (defaults: seeds/000, energy-based model)."""

from __future__ import annotations

from dataclasses import dataclass

from genmodels.configs.base import check, in_unit, positive


@dataclass(frozen=True)
class EBMConfig:
    """EBM on MNIST zeros: MLP 784-512-512-1, 60 Langevin steps (step 10, noise 5e-3), alpha 0.1."""

    hidden: tuple[int, ...] = (512, 512)
    alpha: float = 0.1
    lr: float = 1e-4
    epochs: int = 60
    batch_size: int = 128
    buffer_size: int = 8192
    reinit_prob: float = 0.05
    langevin_steps: int = 60
    step_size: float = 10.0
    noise_std: float = 5e-3
    grad_clip: float = 0.03
    patience: int = 10
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
        )
        in_unit(prefix, self, "reinit_prob")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
