"""Naive density baselines that every model is shown beside: a full-covariance Gaussian and a KDE.

Both are fitted on the model's own training data, in the same space: 2D points directly, and
images in the image flow's space (uniform dequantization, ``/256``, logit with ``λ``), with
every Jacobian of that preprocessing included, so their bits/dim are comparable with the
flow's. A model that does not beat them has learnt less than a mean and a covariance, or than
"the training set, blurred".

Both expose ``log_prob(x) -> (B,)`` (nats) and ``sample(n, generator) -> (n, D)``.

The image flow's transforms are imported where the image wrapper needs them, so evaluating a
2D model does not depend on (and is not re-run by DVC for changes in) the image-flow code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class GaussianBaseline:
    """Full-covariance Gaussian with the data's mean and (unbiased) covariance plus a small ridge.

    Args:
        mean: (D,) mean; cov: (D, D) covariance (ridge already added). Stored in float64.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        self.mean = mean.detach().to(torch.float64)
        self.cov = cov.detach().to(torch.float64)
        self.chol = torch.linalg.cholesky(self.cov)
        self.dim = int(self.mean.numel())
        self._log_norm = 0.5 * self.dim * math.log(2 * math.pi) + torch.log(torch.diagonal(self.chol)).sum().item()

    @classmethod
    def fit(cls, x: Tensor, ridge: float = 1e-6) -> GaussianBaseline:
        """Mean and covariance of ``x`` (N, D) plus ``ridge * I`` (keeps near-constant
        coordinates, e.g. always-black border pixels, from making the covariance singular)."""
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)
        xc = x64 - mean
        # Unbiased (N - 1), as the image flow's whitening layer, so both give the same Gaussian.
        cov = xc.T @ xc / max(x64.shape[0] - 1, 1)
        cov = cov + ridge * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
        return cls(mean, cov)

    @classmethod
    def fit_validated(
        cls, x: Tensor, val: Tensor, *, ridges: Sequence[float] | None = None, n_grid: int = 17
    ) -> tuple[GaussianBaseline, dict[str, list[float]]]:
        """Like :meth:`fit`, with the ridge chosen to maximise the validation log-likelihood.

        With fewer training points than dimensions (686 MNIST zeros, 784 pixels) the sample
        covariance is singular and a fixed tiny ridge gives absurd held-out likelihoods; the
        validated ridge is the honest "best Gaussian" baseline. Default grid: ``n_grid``
        log-spaced values from 1e-8 to 1 times the mean variance. One eigendecomposition
        serves every candidate.

        Returns:
            The Gaussian and ``{'ridges', 'val_loglik'}``.
        """
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(0)
        xc = x64 - mean
        cov = xc.T @ xc / max(x64.shape[0] - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0.0)
        if ridges is None:
            scale = float(evals.mean()) or 1.0
            ridges = (scale * torch.logspace(-8, 0, n_grid, dtype=torch.float64)).tolist()
        proj2 = ((val.detach().to(torch.float64) - mean) @ evecs).pow(2)  # (Nv, D) in the eigenbasis
        d = cov.shape[0]
        lls = []
        for r in ridges:
            lam = evals + r
            ll = -0.5 * (proj2 / lam).sum(1) - 0.5 * torch.log(lam).sum() - 0.5 * d * math.log(2 * math.pi)
            lls.append(float(ll.mean()))
        best = max(range(len(lls)), key=lls.__getitem__)
        eye = torch.eye(d, dtype=torch.float64, device=cov.device)
        return cls(mean, cov + ridges[best] * eye), {"ridges": list(ridges), "val_loglik": lls}

    def log_prob(self, x: Tensor) -> Tensor:
        """``x`` (B, D) -> log N(x; mean, cov) (B,), float64."""
        diff = (x.detach().to(torch.float64) - self.mean).T  # (D, B)
        sol = torch.linalg.solve_triangular(self.chol, diff, upper=False)
        return -0.5 * sol.pow(2).sum(0) - self._log_norm

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws (n, D), float64."""
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.mean.device)
        return self.mean + eps @ self.chol.T


def _logsumexp_gauss(x: Tensor, centers: Tensor, bandwidths: Sequence[float], chunk: int) -> Tensor:
    """``logsumexp_i(-|x - c_i|^2 / (2 h^2))`` for each h: (len(bandwidths), B), float64."""
    out = torch.empty(len(bandwidths), x.shape[0], dtype=torch.float64, device=x.device)
    c2 = centers.pow(2).sum(1)
    for i in range(0, x.shape[0], chunk):
        xi = x[i : i + chunk]
        # One distance block per chunk serves every bandwidth; memory stays (chunk, N).
        d2 = (xi.pow(2).sum(1, keepdim=True) + c2.unsqueeze(0) - 2.0 * xi @ centers.T).clamp_min_(0.0)
        for k, h in enumerate(bandwidths):
            out[k, i : i + chunk] = torch.logsumexp(d2 * (-1.0 / (2.0 * float(h) ** 2)), dim=1)
    return out


class KDEBaseline:
    """Isotropic Gaussian kernel density estimate ``p(x) = mean_i N(x; c_i, h^2 I)``.

    Args:
        centers: (N, D) kernel centres (the training points).
        bandwidth: ``h`` in data units.
    """

    def __init__(self, centers: Tensor, bandwidth: float) -> None:
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        self.centers = centers.detach().to(torch.float64)
        self.bandwidth = float(bandwidth)
        self.dim = int(self.centers.shape[1])

    @staticmethod
    def log_likelihoods(centers: Tensor, x: Tensor, bandwidths: Sequence[float], *, chunk: int = 1024) -> Tensor:
        """Per-point log-density of ``x`` (B, D) under the KDE for each bandwidth: (len(bandwidths), B)."""
        c = centers.detach().to(torch.float64)
        x64 = x.detach().to(torch.float64)
        n, d = c.shape
        hs = torch.tensor([float(h) for h in bandwidths], dtype=torch.float64, device=c.device)
        norm = math.log(n) + 0.5 * d * torch.log(2 * math.pi * hs**2)
        return _logsumexp_gauss(x64, c, bandwidths, chunk) - norm.view(-1, 1)

    @classmethod
    def fit(
        cls,
        train: Tensor,
        val: Tensor,
        *,
        grid: Sequence[float] | None = None,
        n_grid: int = 13,
        max_centers: int | None = None,
        generator: torch.Generator | None = None,
        chunk: int = 1024,
    ) -> tuple[KDEBaseline, dict[str, list[float]]]:
        """Choose ``h`` maximising the mean validation log-likelihood over a log-spaced grid.

        The default grid spans 1/32 to 4 times Scott's rule ``sigma * N^(-1/(D+4))`` (sigma the
        mean coordinate std), in ``n_grid`` log-spaced steps; a choice on the grid's edge is a
        sign the grid was too narrow and is widened once by the same factor.

        ``max_centers``: keep at most this many training points as centres (a random subset
        drawn with ``generator``): a KDE costs O(N) per evaluated point, and 65,536 centres x
        16,384 test points x a grid of bandwidths is too slow on a CPU for what is a baseline.

        Returns:
            The fitted KDE and ``{'bandwidths', 'val_loglik'}`` (the whole curve, for the record).
        """
        t = train.detach().to(torch.float64)
        if max_centers is not None and t.shape[0] > max_centers:
            idx = torch.randperm(t.shape[0], generator=generator, device=t.device)[:max_centers]
            t = t[idx.sort().values]
        if grid is None:
            sigma = float(t.std(0).mean())
            scott = sigma * t.shape[0] ** (-1.0 / (t.shape[1] + 4))
            grid = torch.logspace(math.log10(scott / 32), math.log10(scott * 4), n_grid).tolist()
        grid = sorted(float(h) for h in grid)
        ll = cls.log_likelihoods(t, val, grid, chunk=chunk).mean(1)
        best = int(torch.argmax(ll))
        if best in (0, len(grid) - 1) and len(grid) > 1:
            # Widen once on the side where the optimum sits, keeping the log-spacing.
            ratio = grid[1] / grid[0]
            extra = (
                [grid[0] / ratio ** (k + 1) for k in range(len(grid) - 1)][::-1]
                if best == 0
                else [grid[-1] * ratio ** (k + 1) for k in range(len(grid) - 1)]
            )
            ll_extra = cls.log_likelihoods(t, val, extra, chunk=chunk).mean(1)
            grid = sorted(grid + extra)
            ll = torch.cat([ll_extra, ll]) if best == 0 else torch.cat([ll, ll_extra])
            best = int(torch.argmax(ll))
        return cls(t, grid[best]), {"bandwidths": grid, "val_loglik": ll.tolist(), "n_centers": [float(t.shape[0])]}

    def log_prob(self, x: Tensor, *, chunk: int = 1024) -> Tensor:
        """``x`` (B, D) -> log-density (B,), float64."""
        return self.log_likelihoods(self.centers, x, [self.bandwidth], chunk=chunk)[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws (n, D): a uniformly chosen centre plus ``h * N(0, I)`` noise, float64."""
        idx = torch.randint(self.centers.shape[0], (n,), generator=generator, device=self.centers.device)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.centers.device)
        return self.centers[idx] + self.bandwidth * eps


Baseline = GaussianBaseline | KDEBaseline


@dataclass
class ImageSpace:
    """The image flow's preprocessing as a fixed map: dequantized pixels ``v`` (B, H, W) in
    ``[0, 256)`` -> logit space (B, D), with the exact log-det of ``/256`` and the logit.

    The layers are :mod:`genmodels.flows.image`'s own, so baselines and flow share one code path.
    """

    shape: tuple[int, ...]
    logit_lambda: float

    def __post_init__(self) -> None:
        from genmodels.flows.image import ImageToVector, Logit, Scale

        self._layers = [ImageToVector(self.shape), Scale(256.0), Logit(self.logit_lambda)]
        self.dim = math.prod(self.shape)

    def forward(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """``v`` (B, H, W) float -> ``(l (B, D), log|det dl/dv| (B,))``, float64."""
        x = v.to(torch.float64)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for layer in self._layers:
            x, ld = layer(x)
            total = total + ld
        return x, total

    def inverse(self, z: Tensor) -> Tensor:
        """Logit-space points (B, D) -> continuous pixel values (B, H, W)."""
        x = z.to(torch.float64)
        for layer in reversed(self._layers):
            x, _ = layer.inverse(x)
        return x


class ImageBaseline:
    """A :class:`GaussianBaseline` or :class:`KDEBaseline` living in the image flow's logit space.

    ``log_prob_pixels`` includes the preprocessing Jacobians, so ``bpd`` is in bits per
    dimension of 8-bit pixel space exactly as the flow reports it.
    """

    def __init__(self, space: ImageSpace, base: Baseline) -> None:
        self.space = space
        self.base = base

    @classmethod
    def fit(
        cls,
        kind: str,
        train: Tensor,
        val: Tensor,
        logit_lambda: float,
        *,
        generator: torch.Generator,
        ridge: float | None = 1e-6,
        max_centers: int | None = None,
    ) -> tuple[ImageBaseline, dict[str, list[float]]]:
        """Fit ``kind`` (``gaussian`` or ``kde``) on uint8 ``train`` images (N, H, W); ``val``
        chooses the KDE bandwidth, and the Gaussian's ridge when ``ridge`` is None
        (:meth:`GaussianBaseline.fit_validated`). Dequantization noise comes from ``generator``.

        Returns:
            The baseline and its fit record (the validation curve; empty for a fixed ridge).
        """
        from genmodels.flows.image import dequantize

        space = ImageSpace(tuple(train.shape[1:]), logit_lambda)
        lt, _ = space.forward(dequantize(train, generator))
        if kind == "gaussian":
            if ridge is not None:
                return cls(space, GaussianBaseline.fit(lt, ridge)), {}
            lv, _ = space.forward(dequantize(val, generator))
            gauss, record = GaussianBaseline.fit_validated(lt, lv)
            return cls(space, gauss), record
        if kind == "kde":
            lv, _ = space.forward(dequantize(val, generator))
            kde, record = KDEBaseline.fit(lt, lv, max_centers=max_centers, generator=generator)
            return cls(space, kde), record
        raise ValueError(f"unknown baseline kind {kind!r}; expected 'gaussian' or 'kde'")

    def log_prob_pixels(self, v: Tensor) -> Tensor:
        """Dequantized images ``v`` (B, H, W) -> log-density in pixel space (B,), nats."""
        lv, ld = self.space.forward(v)
        return self.base.log_prob(lv) + ld

    def bpd(self, images: Tensor, generator: torch.Generator, batch_size: int = 1000) -> Tensor:
        """uint8 images (N, H, W) -> bits per dimension (N,), one dequantization draw each."""
        from genmodels.flows.image import bits_per_dim, dequantize

        out = [
            bits_per_dim(self.log_prob_pixels(dequantize(images[i : i + batch_size], generator)), self.space.dim)
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(out)

    def sample_images(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` uint8 images (n, H, W): baseline draws in logit space, mapped back and quantized."""
        from genmodels.flows.image import quantize

        return quantize(self.space.inverse(self.base.sample(n, generator)))


__all__ = ["Baseline", "GaussianBaseline", "ImageBaseline", "ImageSpace", "KDEBaseline"]
