"""All params sections and the one entry point that validates a parsed ``params.yaml``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from genmodels.configs.base import ConfigError, flatten, from_mapping, to_dict
from genmodels.configs.common import CommonConfig
from genmodels.configs.data import DataConfig, ImageDataConfig, Points2DConfig
from genmodels.configs.ddpm import DDPMConfig
from genmodels.configs.ebm import EBMConfig
from genmodels.configs.flow import FlowConfig
from genmodels.configs.realnvp2d import RealNVP2DConfig
from genmodels.configs.evaluate import ClassifierConfig, EvaluateConfig


@dataclass(frozen=True)
class Params:
    """The whole of ``params.yaml``: one attribute per section."""

    common: CommonConfig = field(default_factory=CommonConfig)
    data: DataConfig = field(default_factory=DataConfig)
    realnvp2d: RealNVP2DConfig = field(default_factory=RealNVP2DConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    ebm: EBMConfig = field(default_factory=EBMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def load_params(raw: Mapping[str, Any] | None) -> Params:
    """Validate a parsed ``params.yaml`` (all sections) and return typed params.

    Raises:
        ConfigError: naming the first unknown/ill-typed/out-of-range key.
    """
    if raw is None:
        raw = {}
    return from_mapping(Params, raw, "")


__all__ = [
    "ClassifierConfig",
    "EvaluateConfig",
    "CommonConfig",
    "ConfigError",
    "DDPMConfig",
    "DataConfig",
    "EBMConfig",
    "FlowConfig",
    "ImageDataConfig",
    "Params",
    "Points2DConfig",
    "RealNVP2DConfig",
    "flatten",
    "load_params",
    "to_dict",
]
