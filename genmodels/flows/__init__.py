"""Normalizing flows: shared building blocks (:mod:`genmodels.flows.base`) and RealNVP 2D
(:mod:`genmodels.flows.realnvp2d`)."""

from genmodels.flows.base import (
    AffineCoupling,
    Compose,
    Coupling,
    Flow,
    ScalarReLUMLP,
    StandardNormal,
    Standardize,
    Transform,
    alternating_masks,
    checkerboard_mask_2d,
    mlp,
    relu_linear_1d,
)

__all__ = [
    "AffineCoupling",
    "Compose",
    "Coupling",
    "Flow",
    "ScalarReLUMLP",
    "StandardNormal",
    "Standardize",
    "Transform",
    "alternating_masks",
    "checkerboard_mask_2d",
    "mlp",
    "relu_linear_1d",
]
