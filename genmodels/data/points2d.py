"""Seeded 2D point sets with exact log-densities, and the user-CSV source.

Every built-in distribution has ``sample(n, generator)`` and an exact ``log_prob(x)``:
closed form where one exists (eight Gaussians, checkerboard, rings, pinwheel), otherwise
composite Gauss-Legendre quadrature over a 1D latent curve parameter (two moons, two
spirals) with enough nodes that the quadrature error is far below 1e-3 nats (tested by
halving the panel width and by integrating the density over a fine grid).

Knowing ``log p`` exactly gives the true entropy ``H = -E[log p(X)]`` (Monte-Carlo with a
standard error), so a model's test NLL can be reported as a KL gap ``NLL - H >= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


class PointSetError(ValueError):
    """A user CSV of 2D points is malformed (the message names the file and row)."""


class Distribution2D:
    """Base class: a 2D density with exact ``log_prob`` and seeded ``sample``."""

    name: str = ""

    def sample(self, n: int, generator: torch.Generator) -> Tensor:  # pragma: no cover - interface
        """``n`` i.i.d. points, float32 ``(n, 2)``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        """Exact log-density in nats, ``x`` ``(B, 2)`` -> ``(B,)`` float64."""
        raise NotImplementedError

    def entropy(self, n: int = 1 << 20, seed: int = 12345, chunk: int = 1 << 16) -> tuple[float, float]:
        """Monte-Carlo ``H = -E[log p(X)]`` and its standard error, from ``n`` fresh samples."""
        g = torch.Generator().manual_seed(seed)
        total = 0.0
        total_sq = 0.0
        done = 0
        while done < n:
            m = min(chunk, n - done)
            lp = self.log_prob(self.sample(m, g)).double()
            total += float(lp.sum())
            total_sq += float((lp * lp).sum())
            done += m
        mean = total / n
        var = max(total_sq / n - mean * mean, 0.0)
        return -mean, math.sqrt(var / n)


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 4096) -> Tensor:
    x = x.to(torch.float64)
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]) if x.shape[0] else x.new_zeros(0)


def _gauss_legendre_panels(a: float, b: float, n_panels: int, order: int = 8) -> tuple[Tensor, Tensor]:
    """Nodes and weights of composite Gauss-Legendre on [a, b] (float64)."""
    xs, ws = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(a, b, n_panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    mid = (edges[1:] + edges[:-1])[:, None] / 2
    nodes = (mid + half * xs[None, :]).ravel()
    weights = (half * ws[None, :]).ravel()
    return torch.from_numpy(nodes), torch.from_numpy(weights)


class CurveMixture(Distribution2D):
    """``X = c_k(S) + sigma * N(0, I)`` with arm ``k`` uniform over the arms and ``S ~ rho(s)`` on [0, 1].

    ``log p(x) = log( (1/K) sum_k int_0^1 rho(s) N(x; c_k(s), sigma^2 I) ds )``, the integral
    by composite Gauss-Legendre in log-space (logsumexp over nodes).

    Args:
        curve: maps ``s`` (T,) float64 in [0, 1] to arm points ``(K, T, 2)``.
        log_rho: log-density of ``S`` on [0, 1] (``None``: uniform).
        s_from_u: inverse CDF of ``S`` applied to ``U ~ U[0, 1]`` (``None``: identity).
        n_panels: quadrature panels (8 nodes each); chosen so a panel spans at most about
            two ``sigma`` along the curve, which keeps the quadrature error below 1e-6 nats.
    """

    def __init__(
        self,
        name: str,
        curve: Callable[[Tensor], Tensor],
        sigma: float,
        n_panels: int,
        log_rho: Callable[[Tensor], Tensor] | None = None,
        s_from_u: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.name = name
        self.curve = curve
        self.sigma = sigma
        self.n_panels = n_panels
        self.s_from_u = s_from_u or (lambda u: u)
        s, w = _gauss_legendre_panels(0.0, 1.0, n_panels)
        arms = curve(s)  # (K, T, 2)
        self.n_arms = arms.shape[0]
        log_w = torch.log(w) + (log_rho(s) if log_rho is not None else 0.0) - math.log(self.n_arms)
        self._centers = arms.reshape(-1, 2)  # (K*T, 2)
        self._log_w = log_w.repeat(self.n_arms)  # (K*T,)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        arm = torch.randint(0, self.n_arms, (n,), generator=generator)
        s = self.s_from_u(torch.rand(n, generator=generator, dtype=torch.float64))
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        c = self.curve(s)  # (K, n, 2)
        pts = c[arm, torch.arange(n)] + self.sigma * eps
        return pts.float()

    def log_prob(self, x: Tensor) -> Tensor:
        s2 = self.sigma**2

        def f(xb: Tensor) -> Tensor:
            d2 = torch.cdist(xb, self._centers).pow(2)  # (B, K*T)
            return torch.logsumexp(self._log_w - d2 / (2 * s2), dim=1) - LOG_2PI - math.log(s2)

        return _chunked(f, x, chunk=2048)


def _moons_curve(t: Tensor) -> Tensor:
    # sklearn's make_moons, centred at the origin and scaled by 2.
    th = math.pi * t
    upper = torch.stack([torch.cos(th), torch.sin(th)], dim=-1)
    lower = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], dim=-1)
    offset = torch.tensor([0.5, 0.25], dtype=t.dtype)
    return 2.0 * (torch.stack([upper, lower]) - offset)


def _spirals_curve(s: Tensor) -> Tensor:
    # Archimedean arms: angle a = 3 pi s, radius r = a / pi (1.5 turns, out to radius 3), the
    # second arm is the first rotated by pi. S has density 2s (S = sqrt(U)): points spread
    # evenly over the area the arm sweeps, as in FFJORD's two spirals. Parametrising by s
    # (not by u) keeps the curve speed bounded, so the quadrature converges fast.
    a = 3 * math.pi * s
    r = a / math.pi
    arm = torch.stack([-r * torch.cos(a), r * torch.sin(a)], dim=-1)
    return torch.stack([arm, -arm])


class EightGaussians(Distribution2D):
    """Eight isotropic Gaussians on a circle (radius 2*sqrt(2), std 0.5/sqrt(2), as FFJORD)."""

    name = "eight_gaussians"

    def __init__(self, radius: float = 2 * math.sqrt(2), std: float = 0.5 / math.sqrt(2)) -> None:
        ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        self.centers = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        self.std = std

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, 8, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centers[k] + self.std * eps).float()

    def log_prob(self, x: Tensor) -> Tensor:
        s2 = self.std**2

        def f(xb: Tensor) -> Tensor:
            d2 = torch.cdist(xb, self.centers).pow(2)
            return torch.logsumexp(-d2 / (2 * s2), dim=1) - math.log(8) - LOG_2PI - math.log(s2)

        return _chunked(f, x)


class Checkerboard(Distribution2D):
    """Uniform on the 8 dark unit squares of a 4 x 4 board on [-2, 2]^2 (FFJORD's checkerboard).

    ``log p = -log 8`` on the support and ``-inf`` outside; ``H = log 8`` exactly.
    """

    name = "checkerboard"

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        x1 = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
        x2 = torch.rand(n, generator=generator, dtype=torch.float64) - torch.randint(0, 2, (n,), generator=generator) * 2.0
        x2 = x2 + torch.floor(x1) % 2
        return torch.stack([x1, x2], dim=1).float()

    @staticmethod
    def inside(x: Tensor) -> Tensor:
        """Boolean ``(B,)``: the point lies on a closed dark square.

        The squares are closed: a point on an edge or corner counts as inside when any square it
        touches is dark. Edges have measure zero, but a float32 sample can land exactly on one
        (``sample`` draws in float64 and rounds, e.g. x1 = -1 - 1e-9 becomes -1.0), and with
        half-open squares such a point would get ``-inf`` from the light square next door.
        """
        x = x.to(torch.float64)
        in_box = (x.abs() <= 2).all(dim=1)
        # Along each axis a coordinate touches the cells floor(x) and ceil(x) - 1 (the same cell
        # unless x is an integer). Clamped to the board's cells -2..1: on the box's own edges
        # (x = +-2) the off-board candidate becomes the other one, which the point does touch.
        cells = torch.stack([torch.floor(x), torch.ceil(x) - 1]).clamp(-2, 1)  # (2, B, 2)
        a, b = cells[..., 0], cells[..., 1]  # (2, B) candidates per axis
        dark = ((a[:, None] + b[None, :]) % 2 == 0).flatten(0, 1).any(dim=0)  # any of the 2 x 2 pairs
        return in_box & dark

    def log_prob(self, x: Tensor) -> Tensor:
        inside = self.inside(x)
        out = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
        out[inside] = -math.log(8)
        return out

    def entropy(self, n: int = 1 << 20, seed: int = 12345, chunk: int = 1 << 16) -> tuple[float, float]:
        return math.log(8), 0.0


class Rings(Distribution2D):
    """Concentric circles (radii 1, 2, 3; weight proportional to circumference) blurred by N(0, sigma^2 I).

    Closed form: for a circle of radius ``r`` convolved with an isotropic Gaussian,
    ``p(x) = exp(-(rho^2 + r^2) / (2 s^2)) I_0(rho r / s^2) / (2 pi s^2)`` with ``rho = |x|``;
    the exponentially scaled Bessel function ``i0e`` keeps it finite.
    """

    name = "rings"

    def __init__(self, radii: tuple[float, ...] = (1.0, 2.0, 3.0), sigma: float = 0.08) -> None:
        self.radii = torch.tensor(radii, dtype=torch.float64)
        self.log_w = torch.log(self.radii / self.radii.sum())
        self.sigma = sigma

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        th = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        r = self.radii[k]
        return (torch.stack([r * torch.cos(th), r * torch.sin(th)], dim=1) + self.sigma * eps).float()

    def log_prob(self, x: Tensor) -> Tensor:
        s2 = self.sigma**2

        def f(xb: Tensor) -> Tensor:
            rho = xb.norm(dim=1, keepdim=True)  # (B, 1)
            r = self.radii[None, :]
            z = rho * r / s2
            # log I0(z) = log i0e(z) + z
            log_comp = -(rho**2 + r**2) / (2 * s2) + torch.log(torch.special.i0e(z)) + z - LOG_2PI - math.log(s2)
            return torch.logsumexp(self.log_w + log_comp, dim=1)

        return _chunked(f, x)


class Pinwheel(Distribution2D):
    """Five curved arms, exact density in polar coordinates.

    ``rho = exp(mu + s * n1)`` (log-normal radius), ``psi = theta_k + kappa * rho + tau * n2``
    with arm angle ``theta_k = 2 pi k / 5``. Then
    ``p(x) = p_rho(rho) * (1/5) sum_k WN(psi; theta_k + kappa rho, tau) / rho``
    (``1/rho`` is the polar Jacobian; WN is the wrapped normal, summed over +-3 wraps,
    which is exact to float64 precision for ``tau = 0.1``). The shape follows FFJORD's
    pinwheel (radius around 2, arms bending by about 0.35 rad per unit radius), with a density
    that is exact instead of a non-injective map.
    """

    name = "pinwheel"

    def __init__(self, n_arms: int = 5, mu: float = math.log(2.0), s: float = 0.3, kappa: float = 0.35, tau: float = 0.1) -> None:
        self.n_arms, self.mu, self.s, self.kappa, self.tau = n_arms, mu, s, kappa, tau
        self.theta = torch.arange(n_arms, dtype=torch.float64) * (2 * math.pi / n_arms)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.randint(0, self.n_arms, (n,), generator=generator)
        n1 = torch.randn(n, generator=generator, dtype=torch.float64)
        n2 = torch.randn(n, generator=generator, dtype=torch.float64)
        rho = torch.exp(self.mu + self.s * n1)
        psi = self.theta[k] + self.kappa * rho + self.tau * n2
        return torch.stack([rho * torch.cos(psi), rho * torch.sin(psi)], dim=1).float()

    def log_prob(self, x: Tensor) -> Tensor:
        def f(xb: Tensor) -> Tensor:
            rho = xb.norm(dim=1).clamp_min(1e-300)
            psi = torch.atan2(xb[:, 1], xb[:, 0])
            log_r = torch.log(rho)
            # log-normal density of rho
            lp_rho = -0.5 * ((log_r - self.mu) / self.s) ** 2 - log_r - math.log(self.s) - 0.5 * LOG_2PI
            mean = self.theta[None, :, None] + self.kappa * rho[:, None, None]  # (B, K, 1)
            wraps = torch.arange(-3, 4, dtype=torch.float64)[None, None, :] * 2 * math.pi
            d = psi[:, None, None] + wraps - mean
            lp_psi = torch.logsumexp(-0.5 * (d / self.tau) ** 2, dim=(1, 2)) - math.log(self.tau) - 0.5 * LOG_2PI - math.log(self.n_arms)
            return lp_rho + lp_psi - log_r

        return _chunked(f, x)


POINT_SETS: dict[str, Callable[[], Distribution2D]] = {
    "two_moons": lambda: CurveMixture("two_moons", _moons_curve, sigma=0.2, n_panels=16),
    "eight_gaussians": EightGaussians,
    "checkerboard": Checkerboard,
    "pinwheel": Pinwheel,
    "two_spirals": lambda: CurveMixture(
        "two_spirals",
        _spirals_curve,
        sigma=0.1,
        n_panels=64,
        log_rho=lambda s: torch.log(2 * s),
        s_from_u=torch.sqrt,
    ),
    "rings": Rings,
}


def get_distribution(name: str) -> Distribution2D:
    """The built-in distribution ``name`` (one of :data:`POINT_SETS`)."""
    try:
        return POINT_SETS[name]()
    except KeyError:
        raise ValueError(f"unknown 2D point set {name!r}; expected one of {', '.join(POINT_SETS)} (or 'csv')") from None


@dataclass(frozen=True)
class PointSplits:
    """Train/val/test point tensors, float32 ``(N, 2)`` each."""

    train: Tensor
    val: Tensor
    test: Tensor


def make_splits(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> PointSplits:
    """Independent seeded draws for the three splits (one generator, fixed order)."""
    dist = get_distribution(name)
    g = torch.Generator().manual_seed(seed)
    return PointSplits(dist.sample(n_train, g), dist.sample(n_val, g), dist.sample(n_test, g))


MIN_CSV_ROWS = 16


def read_points_csv(path: str | Path) -> Tensor:
    """Read a user CSV of 2D points: two numeric columns per row, an optional header line.

    Raises:
        PointSetError: missing file, wrong column count, non-numeric or non-finite value, or
            fewer than :data:`MIN_CSV_ROWS` rows; the message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise PointSetError(f"{path}: no such CSV file (set data.points2d.csv_path to an existing file)")
    rows: list[tuple[float, float]] = []
    seen_header = False
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            cells = [c.strip() for c in line.split(",")]
            if len(cells) != 2:
                raise PointSetError(f"{path}, row {lineno}: expected 2 comma-separated columns (x,y), found {len(cells)}: {line[:80]!r}")
            try:
                a, b = float(cells[0]), float(cells[1])
            except ValueError:
                if not rows and not seen_header and not any(_is_number(c) for c in cells):
                    seen_header = True  # one header line before the first data row
                    continue
                raise PointSetError(f"{path}, row {lineno}: non-numeric value in {line[:80]!r}") from None
            if not (math.isfinite(a) and math.isfinite(b)):
                raise PointSetError(f"{path}, row {lineno}: non-finite value (NaN or inf) in {line[:80]!r}")
            rows.append((a, b))
    if len(rows) < MIN_CSV_ROWS:
        raise PointSetError(f"{path}: only {len(rows)} data rows; at least {MIN_CSV_ROWS} are needed to split into train/val/test")
    return torch.tensor(rows, dtype=torch.float32)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def split_csv_points(points: Tensor, n_train: int, n_val: int, n_test: int, seed: int) -> PointSplits:
    """Shuffle the user's points with ``seed`` and split them in proportion ``n_train : n_val : n_test``."""
    n = points.shape[0]
    total = n_train + n_val + n_test
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    nv = max(1, round(n * n_val / total))
    nt = max(1, round(n * n_test / total))
    ntr = n - nv - nt
    return PointSplits(points[perm[:ntr]], points[perm[ntr : ntr + nv]], points[perm[ntr + nv :]])
