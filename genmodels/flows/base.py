"""Normalizing-flow building blocks shared by RealNVP 2D and the image flow.

Direction convention (as nflows and zuko): a :class:`Transform` maps **data -> noise**.
``forward(x)`` returns ``(z, logabsdet)`` with ``logabsdet = log|det dz/dx|`` of shape ``(B,)``;
``inverse(z)`` returns ``(x, logabsdet)`` with ``logabsdet = log|det dx/dz|``, shape ``(B,)``.
So ``forward`` and ``inverse`` log-dets of matching points are negatives of each other.

Reference: Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn


class Transform(nn.Module):
    """An invertible map data -> noise with a tractable log-det. Subclasses implement both directions."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``x`` (B, ...) -> ``(z, log|det dz/dx|)`` with shapes ``(B, ...)`` and ``(B,)``."""
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        """``z`` (B, ...) -> ``(x, log|det dx/dz|)`` with shapes ``(B, ...)`` and ``(B,)``."""
        raise NotImplementedError


class Compose(Transform):
    """``T_n o ... o T_1``: forward applies the transforms in order, inverse in reverse order."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            total = total + ld
        return x, total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ld = t.inverse(z)
            total = total + ld
        return z, total


def mlp(
    in_features: int, out_features: int, hidden: int, n_hidden: int, activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """``n_hidden`` hidden layers of width ``hidden``; the output layer starts at zero.

    A zero-initialised output layer makes every coupling start as the identity, the usual
    trick (Glow, nflows) that keeps deep flows stable at the first step.
    """
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(n_hidden):
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    out = nn.Linear(width, out_features)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    layers.append(out)
    return nn.Sequential(*layers)


def relu_linear_1d(x: Tensor, w: Tensor, b: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``relu(x w^T + b) @ weight^T + bias`` for a scalar input, without the ``B x H x H2`` matmul.

    With a one-dimensional input, ``h(x) = relu(w x + b)`` is piecewise linear in ``x`` with
    at most ``H`` kinks at ``t_j = -b_j / w_j``. Between consecutive kinks the set of active
    units is fixed, so the next layer's pre-activation is ``P_k x + Q_k`` on segment ``k``
    with ``P = (M * w) @ weight^T`` and ``Q = (M * b) @ weight^T + bias`` (``M`` (H+1, H) the
    0/1 activity pattern of each segment). Neighbouring segments differ by one unit, so the
    tables are a running sum over the sorted kinks (``O(H H2)``) and each point costs only a
    lookup and an ``O(H2)`` affine map, instead of the ``B H H2`` matmul -- the bulk of a 2D RealNVP step, whose
    conditioners all have one input. The result is the same function (equal up to float
    rounding); gradients reach ``w``, ``b``, ``weight``, ``bias`` and ``x`` through autograd,
    and match ReLU's everywhere except exactly on a kink.

    Args:
        x: ``(B, 1)`` inputs.
        w, b: ``(H,)`` first-layer weight column and bias.
        weight, bias: ``(H2, H)`` and ``(H2,)`` of the layer after the ReLU.

    Returns:
        ``(B, H2)`` pre-activations of the second layer.
    """
    with torch.no_grad():
        flat = w == 0
        # Units with w_j = 0 never switch: their kink sits at +inf and their activity is b_j > 0.
        kinks = torch.where(flat, torch.full_like(w, math.inf), -b / torch.where(flat, torch.ones_like(w), w))
        kinks_sorted, order = torch.sort(kinks)
        # Leftmost segment (x -> -inf): units with w_j < 0 are on. Crossing kink j to the right
        # switches unit j on (w_j > 0) or off (w_j < 0).
        active_left = ((w < 0) | (flat & (b > 0))).to(w.dtype)
        toggle = torch.sign(w).index_select(0, order)
        # segment k = number of kinks strictly left of x
        segment = torch.searchsorted(kinks_sorted, x.detach().reshape(-1).contiguous())
    # Per-unit contributions to the next layer, (H, 2 * H2): [w_j * weight[:, j], b_j * weight[:, j]].
    contrib = torch.cat([w.unsqueeze(1) * weight.T, b.unsqueeze(1) * weight.T], dim=1)
    start = active_left @ contrib + torch.cat([torch.zeros_like(bias), bias])
    # Segment tables (H+1, 2 * H2) as a running sum over the sorted kinks: O(H H2), not O(H^2 H2).
    steps = torch.cumsum(toggle.unsqueeze(1) * contrib.index_select(0, order), dim=0)
    table = torch.cat([start.unsqueeze(0), start + steps], dim=0)
    slope, offset = table.index_select(0, segment).chunk(2, dim=1)
    return torch.addcmul(offset, slope, x)


class ScalarReLUMLP(nn.Sequential):
    """:func:`mlp` with one input and ReLU (same layers, same state-dict keys), evaluated with
    :func:`relu_linear_1d` for its first hidden-to-hidden layer.

    ``(B, 1) -> (B, out_features)``; with ``n_hidden = 1`` it is exactly the plain MLP.
    """

    def __init__(self, out_features: int, hidden: int, n_hidden: int) -> None:
        super().__init__(*mlp(1, out_features, hidden, n_hidden, nn.ReLU))

    def forward(self, x: Tensor) -> Tensor:
        if len(self) < 5:  # no hidden-to-hidden layer to shortcut
            return super().forward(x)
        first, second = self[0], self[2]
        h = relu_linear_1d(x, first.weight[:, 0], first.bias, second.weight, second.bias)
        for layer in list(self)[3:]:
            h = layer(h)
        return h


class Coupling(Transform):
    """Coupling layer on flat inputs ``(B, D)``: the coordinates in ``mask`` condition an
    element-wise invertible map of the others.

    The base class does the split and merge by index; subclasses only say how the
    transformed part changes given the conditioning part (:meth:`_forward_part`,
    :meth:`_inverse_part`).
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        mask = mask.to(torch.bool).flatten()
        if mask.all() or not mask.any():
            raise ValueError("coupling mask must keep some and transform some coordinates")
        self.register_buffer("cond_idx", torch.nonzero(mask).flatten(), persistent=False)
        self.register_buffer("trans_idx", torch.nonzero(~mask).flatten(), persistent=False)
        self.dim = mask.numel()

    @property
    def n_cond(self) -> int:
        return int(self.cond_idx.numel())

    @property
    def n_trans(self) -> int:
        return int(self.trans_idx.numel())

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(1, self.cond_idx), x.index_select(1, self.trans_idx)

    def _merge(self, cond: Tensor, trans: Tensor) -> Tensor:
        out = torch.empty(cond.shape[0], self.dim, dtype=cond.dtype, device=cond.device)
        out[:, self.cond_idx] = cond
        out[:, self.trans_idx] = trans
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self._split(x)
        trans, ld = self._forward_part(trans, cond)
        return self._merge(cond, trans), ld

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self._split(z)
        trans, ld = self._inverse_part(trans, cond)
        return self._merge(cond, trans), ld

    def _forward_part(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _inverse_part(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class AffineCoupling(Coupling):
    """``z_T = x_T * exp(s(x_C)) + t(x_C)``, log-det ``sum(s)``.

    The log-scale is soft-clamped, ``s = b * tanh(raw / b)`` with bound ``b`` (default 3):
    smooth, identity near 0, and no coupling can multiply by more than ``e^b`` -- the
    "numerically safe scale" that keeps early training and long stacks from overflowing.

    Args:
        mask: ``(D,)`` booleans, True = conditioning coordinate.
        net: maps ``(B, n_cond)`` to ``(B, 2 * n_trans)`` = ``[shift, raw log-scale]``;
            built by :func:`mlp` when ``None``.
    """

    def __init__(
        self,
        mask: Tensor,
        net: nn.Module | None = None,
        *,
        hidden: int = 128,
        n_hidden: int = 2,
        scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(mask)
        self.net = net if net is not None else mlp(self.n_cond, 2 * self.n_trans, hidden, n_hidden, activation)
        self.scale_bound = float(scale_bound)

    def shift_and_log_scale(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``cond`` (B, n_cond) -> shift, log-scale, both (B, n_trans)."""
        shift, raw = self.net(cond).chunk(2, dim=1)
        b = self.scale_bound
        return shift, b * torch.tanh(raw / b)

    def _forward_part(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(cond)
        return x * torch.exp(log_scale) + shift, log_scale.sum(dim=1)

    def _inverse_part(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(cond)
        return (z - shift) * torch.exp(-log_scale), -log_scale.sum(dim=1)


def alternating_masks(dim: int, n_layers: int, kind: str = "half") -> list[Tensor]:
    """Masks for ``n_layers`` couplings that alternate which coordinates are transformed.

    ``half``: first ``dim // 2`` coordinates vs the rest (the seeds' 392 + 392 split; for
    ``dim = 2`` this is x vs y). ``checkerboard``: even vs odd flat indices; for
    28 x 28 images use :func:`checkerboard_mask_2d` for a true spatial checkerboard.
    """
    if kind == "half":
        base = torch.arange(dim) < dim // 2
    elif kind == "checkerboard":
        base = torch.arange(dim) % 2 == 0
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected 'half' or 'checkerboard'")
    return [base if i % 2 == 0 else ~base for i in range(n_layers)]


def checkerboard_mask_2d(height: int, width: int) -> Tensor:
    """``(H * W,)`` spatial checkerboard (True where row + col is even), flattened row-major."""
    r = torch.arange(height).unsqueeze(1)
    c = torch.arange(width).unsqueeze(0)
    return ((r + c) % 2 == 0).flatten()


class Standardize(Transform):
    """Fixed element-wise affine map ``z = (x - mean) / std`` on flat inputs ``(B, D)``.

    Used as the first transform of a flow so the couplings see roughly unit-scale data
    while ``Flow.log_prob`` stays in the data space: the log-det ``-sum(log std)`` is
    exact, so NLLs are comparable with the data's true entropy. ``mean`` and ``std`` are
    persistent buffers (saved in the state dict), not trained parameters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set ``mean``/``std`` from data ``x`` (N, D) (population std, floored at 1e-6)."""
        self.mean.copy_(x.mean(dim=0).to(self.mean))
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6).to(self.std))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ld = -torch.log(self.std).sum()
        return (x - self.mean) / self.std, ld.expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        ld = torch.log(self.std).sum()
        return z * self.std + self.mean, ld.expand(z.shape[0])


class StandardNormal(nn.Module):
    """Isotropic standard normal base distribution on ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self._log_z = 0.5 * math.prod(self.shape) * math.log(2 * math.pi)

    def log_prob(self, z: Tensor) -> Tensor:
        """``z`` (B, *shape) -> (B,)."""
        return -0.5 * z.pow(2).flatten(1).sum(dim=1) - self._log_z

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
    ) -> Tensor:
        """``(n, *shape)`` draws (times ``temperature``)."""
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=dtype)
        return z * temperature if temperature != 1.0 else z


class Flow(nn.Module):
    """A density ``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` with ``f`` a :class:`Transform`.

    Args:
        transform: data -> noise map.
        base: base distribution with ``log_prob`` and ``sample``.
    """

    def __init__(self, transform: Transform, base: StandardNormal) -> None:
        super().__init__()
        self.transform = transform
        self.base = base

    def log_prob(self, x: Tensor) -> Tensor:
        """``x`` (B, ...) -> log-density (B,) in nats."""
        z, logabsdet = self.transform(x)
        return self.base.log_prob(z) + logabsdet

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ N(0, temperature^2 I)``; shape ``(n, ...)``."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else torch.float32
        z = self.base.sample(n, generator=generator, device=device, dtype=dtype, temperature=temperature)
        x, _ = self.transform.inverse(z)
        return x

    def sample_and_log_prob(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples (n, ...) and their log-density (n,) from one inverse pass."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else torch.float32
        z = self.base.sample(n, generator=generator, device=device, dtype=dtype)
        x, ld_inv = self.transform.inverse(z)
        return x, self.base.log_prob(z) - ld_inv


LogProbFn = Callable[[Tensor], Tensor]
