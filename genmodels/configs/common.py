"""The ``common`` section: settings shared by every stage (one home for device and seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genmodels.configs.base import check


@dataclass(frozen=True)
class CommonConfig:
    """Shared settings.

    Attributes:
        device: ``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` fails
            early when there is none.
        seed: seed of the stages that have no model-specific seed (prepare, evaluate, plot).
        num_threads: CPU threads torch may use (0 = torch's default).
        deterministic: ask torch for deterministic algorithms (CPU results are
            byte-identical either way; on CUDA this trades speed for reproducibility).
        mlflow_experiment: name of the MLflow experiment every stage logs to.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    num_threads: int = 0
    deterministic: bool = True
    mlflow_experiment: str = "genmodels"

    def validate(self, prefix: str) -> None:
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "an integer >= 0")
        check(self.num_threads >= 0, f"{prefix}.num_threads", self.num_threads, "an integer >= 0 (0 = default)")
        check(
            bool(self.mlflow_experiment.strip()),
            f"{prefix}.mlflow_experiment",
            self.mlflow_experiment,
            "a non-empty name",
        )
