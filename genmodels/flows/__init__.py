"""Normalizing flows: shared building blocks (:mod:`genmodels.flows.base`) and RealNVP 2D
(:mod:`genmodels.flows.realnvp2d`)."""

from genmodels.flows.base import (
    AffineCoupling,
    Compose,
    Coupling,
    Flow,
    ScalarReLUMLP,
    SharedPiecesCompose,
    StandardNormal,
    Standardize,
    Transform,
    alternating_masks,
    checkerboard_mask_2d,
    mlp,
    relu_linear_1d,
    relu_mlp2_1d,
    relu_mlp2_1d_pieces,
)

__all__ = [
    "AffineCoupling",
    "Compose",
    "Coupling",
    "Flow",
    "ScalarReLUMLP",
    "SharedPiecesCompose",
    "StandardNormal",
    "Standardize",
    "Transform",
    "alternating_masks",
    "checkerboard_mask_2d",
    "mlp",
    "relu_linear_1d",
    "relu_mlp2_1d",
    "relu_mlp2_1d_pieces",
]
