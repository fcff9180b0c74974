"""The energy network: an MLP ``784 -> 512 -> 512 -> 1`` on flattened images (seed 000)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from genmodels.training import load_checkpoint

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 784

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
}


class EnergyMLP(nn.Module):
    """``E(x)``: images ``(B, 784)`` or ``(B, 1, 28, 28)`` in [0, 1] -> energies ``(B,)``.

    Low energy = likely. A smooth activation (SiLU/Swish by default) keeps ``grad_x E``
    continuous, which Langevin dynamics relies on.
    """

    def __init__(self, in_features: int = N_PIXELS, hidden: Sequence[int] = (512, 512), activation: str = "silu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), _ACTIVATIONS[activation]()]
            width = int(h)
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, ...)`` with ``in_features`` elements per sample -> energy ``(B,)``."""
        return self.net(x.reshape(x.shape[0], self.in_features)).squeeze(-1)


def build_model(config: Mapping[str, Any]) -> EnergyMLP:
    """The energy MLP described by an ``ebm`` params section (a mapping, e.g. ``to_dict(EBMConfig())``)."""
    return EnergyMLP(N_PIXELS, tuple(config.get("hidden", (512, 512))), str(config.get("activation", "silu")))


def load_trained(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[EnergyMLP, dict[str, Any]]:
    """Load the best weights from a ``train_ebm`` checkpoint (``weights_only=True``).

    Returns:
        ``(model in eval mode on device, the ebm config dict it was trained with)``.

    Raises:
        CheckpointError: missing file, not an EBM checkpoint, or unreadable.
    """
    ckpt = load_checkpoint(path, kind="ebm", map_location=device)
    config = dict(ckpt["config"])
    model = build_model(config).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, config
