"""Replay buffer of persistent Langevin chains (Du & Mordatch 2019, "Implicit Generation and
Modeling with Energy-Based Models", section 3.1).

Short-run Langevin (60 steps) from noise cannot reach the model's modes; continuing chains
across training iterations can. The buffer holds ``capacity`` chain states; each iteration draws
a batch of distinct chains, restarts each with probability ``reinit_prob`` from uniform noise
(so the buffer keeps exploring and never collapses onto a few modes), runs Langevin on them and
writes the updated states back in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from genmodels.training import generator_state, make_generator, set_generator_state


class ReplayBuffer:
    """Fixed-capacity store of chain states in ``[low, high]``, drawn and updated in place.

    Args:
        capacity: number of persistent chains.
        shape: shape of one state, e.g. ``(784,)``.
        reinit_prob: probability that a drawn chain is replaced by fresh uniform noise.
        generator: the buffer's own generator (its state is part of :meth:`state_dict`); it
            must live on ``device``. Default: a generator seeded with 0.
        device: where the states live.
        low, high: range of the uniform noise (the pixel range).
    """

    def __init__(
        self,
        capacity: int,
        shape: Sequence[int],
        reinit_prob: float = 0.05,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if not 0.0 <= reinit_prob <= 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        self.capacity = int(capacity)
        self.shape = tuple(int(s) for s in shape)
        self.reinit_prob = float(reinit_prob)
        self.device = torch.device(device)
        self.low, self.high = float(low), float(high)
        self.generator = generator if generator is not None else make_generator(0, self.device)
        self.examples = self._noise(self.capacity)

    def _noise(self, n: int) -> Tensor:
        """``n`` uniform states in ``[low, high]``, shape ``(n, *shape)``."""
        u = torch.rand((n, *self.shape), generator=self.generator, device=self.device)
        return self.low + (self.high - self.low) * u

    def __len__(self) -> int:
        return self.capacity

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw ``n`` distinct chains; each restarts from noise with probability ``reinit_prob``.

        Returns:
            ``(x, idx)``: states ``(n, *shape)`` (a copy) and their buffer indices ``(n,)`` for :meth:`push`.
        """
        if not 0 < n <= self.capacity:
            raise ValueError(f"cannot draw {n} distinct chains from a buffer of {self.capacity}")
        idx = torch.randperm(self.capacity, generator=self.generator, device=self.device)[:n]
        x = self.examples[idx].clone()
        # Draw the coin flips and the noise for all n chains, so the generator advances by the
        # same amount whatever the coins say (keeps runs reproducible and resumable).
        restart = torch.rand(n, generator=self.generator, device=self.device) < self.reinit_prob
        fresh = self._noise(n)
        mask = restart.view(n, *([1] * len(self.shape)))
        return torch.where(mask, fresh, x), idx

    def push(self, idx: Tensor, x: Tensor) -> None:
        """Write updated states ``x`` ``(n, *shape)`` back to chains ``idx`` ``(n,)`` (detached)."""
        if x.shape[1:] != self.shape or x.shape[0] != idx.shape[0]:
            raise ValueError(f"push: expected states of shape ({idx.shape[0]}, {self.shape}), got {tuple(x.shape)}")
        self.examples[idx] = x.detach().to(self.examples.dtype)

    def reinitialize(self, fraction: float) -> Tensor:
        """Restart a random ``fraction`` of all chains from noise (used after a divergence).

        Returns:
            The indices ``(k,)`` that were restarted.
        """
        k = int(round(fraction * self.capacity))
        idx = torch.randperm(self.capacity, generator=self.generator, device=self.device)[:k]
        self.examples[idx] = self._noise(k)
        return idx

    def state_dict(self) -> dict[str, object]:
        """Chain states, settings and the generator state (plain tensors and numbers)."""
        return {
            "examples": self.examples.detach().cpu().clone(),
            "reinit_prob": self.reinit_prob,
            "low": self.low,
            "high": self.high,
            "generator": generator_state(self.generator),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore from :meth:`state_dict`; capacity and state shape must match."""
        examples = state["examples"]
        assert isinstance(examples, Tensor)
        if tuple(examples.shape) != (self.capacity, *self.shape):
            raise ValueError(f"buffer state has shape {tuple(examples.shape)}, expected {(self.capacity, *self.shape)}")
        self.examples = examples.to(self.device).clone()
        self.reinit_prob = float(state["reinit_prob"])  # type: ignore[arg-type]
        self.low = float(state["low"])  # type: ignore[arg-type]
        self.high = float(state["high"])  # type: ignore[arg-type]
        set_generator_state(self.generator, state["generator"])  # type: ignore[arg-type]
