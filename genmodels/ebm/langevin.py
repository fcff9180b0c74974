"""Langevin dynamics on an energy function, and the buffer-backed sampler used in training.

Unadjusted Langevin (Welling & Teh 2011; Du & Mordatch 2019):

    x_{k+1} = clamp(x_k - step_size * clip(grad_x E(x_k)) + noise_std * xi_k),  xi_k ~ N(0, I)

With ``noise_std = sqrt(2 * step_size)`` and small steps this samples ``p(x) ~ exp(-E(x))``.
The EBM literature decouples the two: step 10 with noise 5e-3 samples (for small effective
steps) ``exp(-E(x) / T)`` at temperature ``T = noise_std**2 / (2 * step_size) = 1.25e-6``, i.e.
it is nearly noiseless gradient descent on the energy, and the per-pixel gradient clamp bounds
each move to ``step_size * grad_clip`` per pixel. The model learns to make that procedure
produce data (Nijkamp et al. 2019, "On the anatomy of MCMC-based maximum likelihood learning").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from genmodels.distributed import all_gather_rows, shard_bounds
from genmodels.ebm.buffer import ReplayBuffer

Energy = Callable[[Tensor], Tensor]
"""``energy(x (B, ...)) -> (B,)``."""


def langevin(
    energy: Energy,
    x: Tensor,
    *,
    n_steps: int,
    step_size: float,
    noise_std: float,
    grad_clip: float | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    noise_rows: tuple[int, int, int] | None = None,
) -> Tensor:
    """Run ``n_steps`` of Langevin dynamics from ``x``; a pure function of its inputs.

    Gradients are taken with ``torch.autograd.grad`` with respect to the chain states only:
    the energy's parameters are neither modified nor accumulate ``.grad``, and no
    ``requires_grad`` flags of parameters are touched.

    Args:
        energy: ``(B, ...) -> (B,)``.
        x: start states ``(B, ...)`` (not modified).
        n_steps, step_size, noise_std: the update above.
        grad_clip: per-element clamp of ``grad_x E`` (None = no clamp).
        clamp: range the states are clamped to after each step (None = unbounded).
        generator: source of the Gaussian noise (needed for reproducible chains).
        noise_rows: ``(n, start, stop)`` when ``x`` holds rows ``start:stop`` of a batch of ``n``
            chains that other processes run the rest of (data-parallel training): every step
            draws the noise of all ``n`` chains and uses these rows, so ``generator`` advances
            as for the whole batch and each chain gets the noise it gets in one process.

    Returns:
        Final states ``(B, ...)``, detached.
    """
    x = x.detach().clone()
    for _ in range(n_steps):
        x.requires_grad_(True)
        # Energies of a batch are independent per sample, so the gradient of the sum is the
        # per-sample gradient; enable_grad lets this run inside no_grad evaluation code too.
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        x = x.detach()
        if grad_clip is not None:
            grad = grad.clamp(-grad_clip, grad_clip)
        if noise_rows is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            n, start, stop = noise_rows
            shape = (n, *x.shape[1:])
            noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)[start:stop]
        x = x - step_size * grad + noise_std * noise
        if clamp is not None:
            x = x.clamp(clamp[0], clamp[1])
    return x


class BufferSampler:
    """Negative samples for contrastive divergence: draw chains from a :class:`ReplayBuffer`,
    run :func:`langevin` on them and push the results back.

    Args:
        buffer: the persistent chains.
        n_steps, step_size, noise_std, grad_clip, clamp: passed to :func:`langevin`.
        generator: noise generator of the chains (same device as the buffer).
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        *,
        n_steps: int,
        step_size: float,
        noise_std: float,
        grad_clip: float | None,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        generator: torch.Generator | None = None,
    ) -> None:
        self.buffer = buffer
        self.n_steps = n_steps
        self.step_size = step_size
        self.noise_std = noise_std
        self.grad_clip = grad_clip
        self.clamp = clamp
        self.generator = generator

    def __call__(self, energy: Energy, n: int) -> Tensor:
        """``n`` negative samples ``(n, *buffer.shape)`` (detached); the buffer is updated."""
        x0, idx = self.buffer.sample(n)
        x = self._move(energy, x0)
        self.buffer.push(idx, x)
        return x

    def _move(self, energy: Energy, x0: Tensor, noise_rows: tuple[int, int, int] | None = None) -> Tensor:
        """:func:`langevin` from ``x0`` with this sampler's settings (``noise_rows``: see there)."""
        return langevin(
            energy,
            x0,
            n_steps=self.n_steps,
            step_size=self.step_size,
            noise_std=self.noise_std,
            grad_clip=self.grad_clip,
            clamp=self.clamp,
            generator=self.generator,
            noise_rows=noise_rows,
        )

    def sample_shard(self, energy: Energy, n: int, rank: int, world_size: int) -> Tensor:
        """This rank's rows of ``n`` negative samples, for data-parallel training.

        Every rank holds an identical buffer and draws the same ``n`` chains and restarts (same
        generator); it runs Langevin only on its :func:`~genmodels.distributed.shard_bounds`
        rows, with those rows of the whole batch's noise, then the updated chains are gathered
        from all ranks and every rank pushes the same ``n`` chains, so the buffers stay
        identical and equal to the single-process buffer (up to float reduction order in
        ``energy``). ``energy`` should be the plain module, not its DDP wrapper: sampling needs
        input gradients only, no gradient synchronisation. A collective: all ranks must call it.

        Returns:
            The rows ``start:stop`` of the samples, ``(stop - start, *buffer.shape)``, detached.
        """
        x0, idx = self.buffer.sample(n)
        start, stop = shard_bounds(n, rank, world_size)
        x = self._move(energy, x0[start:stop], noise_rows=(n, start, stop))
        self.buffer.push(idx, all_gather_rows(x, n))
        return x


def sample_from_noise(
    energy: Energy,
    n: int,
    shape: tuple[int, ...],
    *,
    n_steps: int,
    step_size: float,
    noise_std: float,
    grad_clip: float | None,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    clamp: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Long-run Langevin from uniform noise: ``n`` samples ``(n, *shape)`` in ``clamp`` range."""
    x0 = clamp[0] + (clamp[1] - clamp[0]) * torch.rand((n, *shape), generator=generator, device=device)
    return langevin(
        energy,
        x0,
        n_steps=n_steps,
        step_size=step_size,
        noise_std=noise_std,
        grad_clip=grad_clip,
        clamp=clamp,
        generator=generator,
    )


def sample_model(
    energy: Energy,
    config: Mapping[str, Any],
    n: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    n_steps: int | None = None,
) -> Tensor:
    """Samples of a trained EBM: long-run Langevin from uniform noise with the training sampler's
    settings from ``config`` (an ``ebm`` params dict) and ``n_steps`` (default ``sample_steps``).

    Returns:
        Images ``(n, 1, 28, 28)`` in [0, 1].
    """
    steps = int(config.get("sample_steps", 256)) if n_steps is None else int(n_steps)
    x = sample_from_noise(
        energy,
        n,
        (784,),
        n_steps=steps,
        step_size=float(config["step_size"]),
        noise_std=float(config["noise_std"]),
        grad_clip=float(config["grad_clip"]),
        generator=generator,
        device=device,
    )
    return x.reshape(n, 1, 28, 28)
