"""Image preprocessing as flow layers with exact log-dets, and the bits-per-dimension conversion.

The image flow models a density on *continuous 8-bit pixel space*: an image of ``D = H * W``
pixels is a point ``v`` of ``[0, 256)^D``. Uniform dequantization (Theis et al. 2016;
Ho et al. 2019, "Flow++") turns an integer image ``x`` into ``v = x + u``, ``u ~ U[0, 1)^D``.
Because every integer bin ``[x, x + 1)^D`` has unit volume, Jensen's inequality gives

    log P(x) = log ∫_{[0,1)^D} p(x + u) du >= E_u[log p(x + u)],

so ``-E_u[log p(x + u)]`` is an upper bound on the discrete code length in nats, and

    bpd(x) = -log p(v) / (D * ln 2),                                           (1)

with ``log p(v)`` the log-density in pixel space that already contains **every** Jacobian of
the preprocessing chain below. Written out for the chain used by the image flow
(``y = v / 256``, ``s = λ + (1 - 2λ) y``, ``l = logit(s)``, then the learnt part ``z = f(l)``):

    log p(v) = log N(z; 0, I) + log|det ∂z/∂l| + Σ_i [log(1 - 2λ) - log s_i - log(1 - s_i)] - D log 256.

A model that is uniform on ``[0, 256)^D`` has ``log p(v) = -D log 256`` and therefore exactly
8 bits per dimension; a Gaussian, the flow and any other model on ``v`` are scored by (1).

All layers here follow :mod:`genmodels.flows.base`: data -> noise in ``forward``, both
directions return ``(output, logabsdet (B,))``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genmodels.flows.base import Transform

PIXEL_LEVELS = 256
"""Number of 8-bit intensity levels; the width of pixel space."""


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization: uint8/int images ``(B, ...)`` -> float32 ``x + u``, ``u ~ U[0, 1)``.

    The noise has no Jacobian term (it is added, not a function of ``x``); its role in the
    likelihood bound is explained in the module docstring.
    """
    xf = x.to(torch.float32)
    u = torch.rand(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
    # In float32, x + u rounds up to x + 1 when u is within an ulp of 1 (p ~ 1e-5 per pixel for
    # x >= 128); clamping to the largest float below x + 1 keeps floor(v) == x exactly.
    return torch.minimum(xf + u, torch.nextafter(xf + 1.0, xf))


def quantize(v: Tensor) -> Tensor:
    """Continuous pixel values ``(B, ...)`` -> uint8 images in ``[0, 255]`` (floor, then clamp).

    Floor is the exact inverse of :func:`dequantize` (``floor(x + u) = x`` for ``u`` in [0, 1));
    the clamp maps the tails a sample may reach at high temperature onto valid pixels.
    """
    return v.floor().clamp_(0, PIXEL_LEVELS - 1).to(torch.uint8)


def bits_per_dim(log_prob: Tensor, dim: int) -> Tensor:
    """Equation (1): log-density in 8-bit pixel space (nats, ``(B,)``) -> bits per dimension ``(B,)``."""
    return -log_prob / (dim * math.log(2.0))


class ImageToVector(Transform):
    """Reshape ``(B, H, W)`` (or ``(B, C, H, W)``) images to ``(B, D)`` vectors; log-det 0."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.reshape(z.shape[0], *self.shape), z.new_zeros(z.shape[0])


class Scale(Transform):
    """``y = v / scale`` on ``(B, D)``: pixel space ``[0, 256)`` -> ``[0, 1)``; log-det ``-D log scale``."""

    def __init__(self, scale: float = float(PIXEL_LEVELS)) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ld = -math.log(self.scale) * x[0].numel()
        return x / self.scale, x.new_full((x.shape[0],), ld)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        ld = math.log(self.scale) * z[0].numel()
        return z * self.scale, z.new_full((z.shape[0],), ld)


class Logit(Transform):
    """``l = logit(λ + (1 - 2λ) y)`` on ``(B, D)`` with ``y`` in ``[0, 1)`` (RealNVP, Dinh et al. 2017 §4.1).

    The squeeze into ``[λ, 1 - λ]`` keeps the logit finite at ``y = 0``. Per coordinate,
    ``dl/dy = (1 - 2λ) / (s (1 - s))`` with ``s = λ + (1 - 2λ) y``; the log-det is the sum of
    its logs. ``λ`` trades how hard the near-constant background pixels are to model (small
    λ stretches the bin ``[0, 1/256)`` of a black pixel into a long tail) against resolution.
    """

    def __init__(self, lam: float) -> None:
        super().__init__()
        if not 0.0 <= lam < 0.5:
            raise ValueError(f"logit lambda must be in [0, 0.5), got {lam}")
        self.lam = float(lam)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.lam + (1.0 - 2.0 * self.lam) * x
        # log s - log(1 - s) written with log1p for accuracy near 0 and 1.
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        ld = (math.log1p(-2.0 * self.lam) - log_s - log_1ms).sum(dim=1)
        return log_s - log_1ms, ld

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(z)
        # log s + log(1 - s) = -softplus(-z) - softplus(z), stable for large |z|.
        ld = (-math.log1p(-2.0 * self.lam) - nn.functional.softplus(-z) - nn.functional.softplus(z)).sum(dim=1)
        return (s - self.lam) / (1.0 - 2.0 * self.lam), ld


class ActNorm(Transform):
    """Per-coordinate affine ``z = (x - loc) * exp(-log_scale)`` on ``(B, D)`` (Glow, Kingma & Dhariwal 2018).

    :meth:`initialize` sets ``loc``/``log_scale`` from a data batch so the output has zero
    mean and unit variance per coordinate; afterwards both are trained.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init from ``x`` (N, D)."""
        x64 = x.to(torch.float64)
        self.loc.copy_(x64.mean(0).to(self.loc.dtype))
        self.log_scale.copy_(torch.log(x64.std(0) + 1e-6).to(self.log_scale.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x - self.loc) * torch.exp(-self.log_scale)
        return z, (-self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x = z * torch.exp(self.log_scale) + self.loc
        return x, self.log_scale.sum().expand(z.shape[0])


class LULinear(Transform):
    """Invertible linear map ``z = W x + b`` on ``(B, D)`` with ``W = L U`` (Glow's LU 1x1 conv, flat).

    ``L`` is unit lower-triangular, ``U`` upper-triangular with diagonal ``exp(log_diag)``, so
    ``log|det W| = sum(log_diag)`` costs O(D) and the inverse is two triangular solves.

    :meth:`initialize` sets ``W = C^{-1}`` (``C`` the Cholesky factor of the data covariance)
    and ``b = -W mean``: the layer then whitens the data exactly, and a flow that starts with
    it (couplings starting at the identity) starts *at* the full-covariance Gaussian
    baseline's likelihood instead of far above it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("_strict_lower", torch.tril(torch.ones(dim, dim), diagonal=-1), persistent=False)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(L, U)``, both ``(D, D)``; masking (not slicing) keeps the unused halves at zero gradient."""
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        low = self.lower * self._strict_lower + eye
        up = self.upper * self._strict_lower.T + torch.diag(torch.exp(self.log_diag))
        return low, up

    @torch.no_grad()
    def initialize(self, x: Tensor, eps: float = 1e-6, shrinkage: float = 0.0) -> None:
        """Whitening init from ``x`` (N, D): ``W = chol(cov + r I)^{-1}`` (lower-triangular, so ``U`` diagonal).

        ``r = eps + shrinkage * mean(diag(cov))``. Shrinkage (ridge on the covariance) matters
        for images: near-constant background pixels give eigenvalues ~1e-4 of the mean
        variance, and an exact whitening blows a held-out image's tiny deviation there up
        into tens of standard deviations (worse held-out bpd, and huge coupling inputs).
        """
        x64 = x.to(torch.float64)
        mean = x64.mean(0)
        xc = x64 - mean
        cov = xc.T @ xc / max(x64.shape[0] - 1, 1)
        ridge = eps + shrinkage * float(torch.diagonal(cov).mean())
        cov = cov + ridge * torch.eye(self.dim, dtype=torch.float64, device=x.device)
        chol = torch.linalg.cholesky(cov)
        w = torch.linalg.solve_triangular(chol, torch.eye(self.dim, dtype=torch.float64, device=x.device), upper=False)
        d = torch.diagonal(w)
        self.lower.copy_((w / d.unsqueeze(0)).to(self.lower.dtype))  # unit lower part: W = L diag(d)
        self.upper.zero_()
        self.log_diag.copy_(torch.log(d).to(self.log_diag.dtype))
        self.bias.copy_((-(w @ mean)).to(self.bias.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, up = self.factors()
        # x W^T = (x U^T) L^T: two (B, D) x (D, D) products instead of forming W.
        z = (x @ up.T) @ low.T + self.bias
        return z, self.log_diag.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        low, up = self.factors()
        rhs = (z - self.bias).T  # (D, B)
        y = torch.linalg.solve_triangular(low, rhs, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(up, y, upper=True).T
        return x, (-self.log_diag.sum()).expand(z.shape[0])


def preprocessing(shape: tuple[int, ...], logit_lambda: float) -> list[Transform]:
    """The fixed head of every image flow: image -> vector, ``/256``, logit with ``λ``."""
    return [ImageToVector(shape), Scale(float(PIXEL_LEVELS)), Logit(logit_lambda)]


__all__ = [
    "PIXEL_LEVELS",
    "ActNorm",
    "ImageToVector",
    "LULinear",
    "Logit",
    "Scale",
    "bits_per_dim",
    "dequantize",
    "preprocessing",
    "quantize",
]
