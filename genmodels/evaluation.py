"""Per-model evaluation: every figure of merit beside its reference (floor) and naive baselines.

One function per model returns an :class:`Evaluation` (flat metrics dict + ROC curves), so the
``evaluate`` stage only loads files, calls one of them, writes and logs. Conventions:

* Entropy-based keys (``true_entropy``, ``kl_gap``, ``sample_logp``, ...) exist only when the
  2D set has an exact density; for a user CSV they are *absent*, never zero.
* ``*_floor``: the metric's expected value between a real sample of the generated size and the
  same test set -- what a perfect model gets on average -- estimated by the mean over
  ``evaluate.floor_draws`` real draws, with ``*_floor_se``
  (:func:`genmodels.metrics.sample.real_vs_real_floors`; ``sample_logp_floor`` and the FID's
  floor are one real draw). The 2D models' and baselines' own sample metrics are means over
  ``evaluate.sample_draws`` generated draws of the same size, with ``*_se``.
  ``baseline_<name>_<metric>``: the metric of a
  full-covariance Gaussian (``gaussian``) and a validation-tuned KDE (``kde``) fitted on the
  same training data (and, for images, in the image flow's logit space, Jacobians included).
* Every random draw comes from a generator seeded with ``evaluate.seed`` plus a fixed offset
  per purpose (:data:`SEED_OFFSETS`), so CPU results are byte-identical; the only exception
  is the DDPM's wall-clock ``sampling_seconds_per_1k*``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from genmodels.metrics.baselines import GaussianBaseline, ImageBaseline, KDEBaseline
from genmodels.metrics.classifier import SmallCNN, extract_features
from genmodels.metrics.config import EvaluateConfig
from genmodels.metrics.frechet import frechet_from_features
from genmodels.metrics.roc import auroc, roc_curve
from genmodels.metrics.sample import (
    ReferenceSums,
    mmd2_and_energy,
    random_directions,
    real_vs_real_floors,
    reference_sums,
    sliced_wasserstein2,
    sorted_projections,
)
from genmodels.training import make_generator, mean_and_se

SEED_OFFSETS = {
    "samples": 0,
    "real_draw": 1,
    "directions": 2,
    "nll": 3,
    "gaussian": 4,
    "kde": 5,
    "dequant": 6,
    "noise": 7,
    "strided": 8,
    "fid_real": 9,
    "timing": 10,
}
"""``evaluate.seed + offset`` seeds the generator of each purpose (independent streams)."""

ROC_MAX_POINTS = 1001
"""ROC curves are thinned to at most this many points for plotting (the AUROC uses all scores)."""


@dataclass
class Evaluation:
    """What one model's evaluation produced.

    Attributes:
        metrics: flat ``{key: number or short string}`` for ``metrics/<model>.json``.
        roc: ``{name: (fpr (K,), tpr (K,))}`` curves behind each AUROC (for ``dvc plots``).
        notes: human-readable provenance lines (what was compared with what).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    roc: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


DRAW_SEED_STRIDE = 1000
"""Draw ``k`` of a purpose with several draws (``evaluate.sample_draws``) is seeded ``k * DRAW_SEED_STRIDE``
above draw 0, clear of every other purpose's offset; draw 0 is the purpose's own seed."""


def _seed(cfg: EvaluateConfig, purpose: str, draw: int = 0) -> int:
    return cfg.seed + SEED_OFFSETS[purpose] + DRAW_SEED_STRIDE * draw


def _gen(cfg: EvaluateConfig, purpose: str, device: torch.device | str = "cpu", draw: int = 0) -> torch.Generator:
    return make_generator(_seed(cfg, purpose, draw), device)


def _thin(fpr: Tensor, tpr: Tensor, max_points: int = ROC_MAX_POINTS) -> tuple[Tensor, Tensor]:
    if fpr.numel() <= max_points:
        return fpr, tpr
    idx = torch.linspace(0, fpr.numel() - 1, max_points).round().long()
    return fpr[idx], tpr[idx]


def _ood(ev: Evaluation, key: str, scores_in: Tensor, scores_out: Tensor, *, curve: bool = True) -> None:
    """``ev.metrics[key] = AUROC(in vs out)``; the ROC curve too when ``curve``."""
    ev.metrics[key] = auroc(scores_in, scores_out)
    if curve:
        fpr, tpr, _ = roc_curve(scores_in, scores_out)
        ev.roc[key] = _thin(fpr, tpr)


# ----------------------------------------------------------------------------------------- 2D


@dataclass(frozen=True)
class Points:
    """A prepared 2D point set: splits (N, 2) and, for built-in sets, the exact density."""

    train: Tensor
    val: Tensor
    test: Tensor
    name: str
    distribution: Any | None  # genmodels.data.points2d.Distribution2D, None for a CSV
    true_entropy: float | None
    true_entropy_se: float | None

    @classmethod
    def from_prepared(cls, payload: Mapping[str, Any]) -> Points:
        """From ``data/prepared/points2d.pt`` (see docs/CONVENTIONS.md)."""
        from genmodels.data.points2d import get_distribution

        name = str(payload.get("name", "csv"))
        exact = name != "csv" and "true_entropy" in payload
        return cls(
            train=payload["train"].float(),
            val=payload["val"].float(),
            test=payload["test"].float(),
            name=name,
            distribution=get_distribution(name) if exact else None,
            true_entropy=float(payload["true_entropy"]) if exact else None,
            true_entropy_se=float(payload.get("true_entropy_se", float("nan"))) if exact else None,
        )


def _real_draws(points: Points, n: int, cfg: EvaluateConfig) -> tuple[list[Tensor], str]:
    """``cfg.floor_draws`` independent real samples of size ``n`` for the floors: from the exact
    distribution when there is one, else (CSV) seeded subsets of the training points (real, never
    the test set; subsets of one finite set, so not fully independent of each other)."""
    g = _gen(cfg, "real_draw")
    if points.distribution is not None:
        return [points.distribution.sample(n, g).float() for _ in range(cfg.floor_draws)], "true_distribution"
    if points.train.shape[0] < n:
        raise ValueError(
            f"evaluate.n_samples = {n} but the CSV point set has only {points.train.shape[0]} training points "
            "to serve as the real-vs-real floor; lower evaluate.n_samples"
        )
    idx = [torch.randperm(points.train.shape[0], generator=g)[:n] for _ in range(cfg.floor_draws)]
    return [points.train[i.sort().values] for i in idx], "train_subset"


def _nll_block(ev: Evaluation, prefix: str, nll: Tensor, points: Points, *, nll_key: str, gap_key: str) -> None:
    """``<prefix><nll_key>`` (+ ``_se``) and, with an exact density, ``<prefix><gap_key>`` = NLL - H."""
    mean, se = mean_and_se(nll)
    ev.metrics[prefix + nll_key] = mean
    ev.metrics[prefix + nll_key + "_se"] = se
    if points.true_entropy is not None:
        ev.metrics[prefix + gap_key] = mean - points.true_entropy
        ev.metrics[prefix + gap_key + "_se"] = math.sqrt(se**2 + (points.true_entropy_se or 0.0) ** 2)


def _sample_block(
    ev: Evaluation,
    prefix: str,
    suffix: str,
    draws: Sequence[Tensor],
    points: Points,
    cfg: EvaluateConfig,
    ruler: _Ruler,
    device: torch.device,
) -> None:
    """mmd / energy_distance / swd (and ``sample_logp`` with an exact density) of sample ``draws``
    (each (n, 2)) vs test: the mean over the draws, and with more than one draw its standard
    error (``<prefix><metric><suffix>_se``).

    The floors are means over ``evaluate.floor_draws`` real draws; one generated draw scatters as
    much as one real draw does (pinwheel's full chain: ED 7.83e-4, 5.03e-4, 1.77e-4 for three
    noise seeds), so a model is measured the same way: ``evaluate.sample_draws`` draws.
    """
    values: dict[str, list[float]] = {"mmd": [], "energy_distance": [], "swd": []}
    if points.distribution is not None:
        values["sample_logp"] = []
    for samples in draws:
        # The pairwise sums run on ``device`` (a GPU makes 16,384^2 pairs cheap); the exact density on the CPU.
        s = samples.detach().float().to(device)
        if not bool(torch.isfinite(s).all()):
            # A diverged sampler: the distances would be NaN anyway; say so instead of crashing.
            n_bad = int((~torch.isfinite(s)).any(1).sum())
            ev.notes.append(f"{prefix or 'model '}samples{suffix}: {n_bad} non-finite points; sample metrics are NaN")
            for k in ("mmd", "energy_distance", "swd", "sample_logp"):
                ev.metrics[f"{prefix}{k}{suffix}"] = float("nan")
            return
        mmd, ed = mmd2_and_energy(s, ruler.test, cfg.mmd_bandwidths, ref=ruler.ref)
        values["mmd"].append(mmd)
        values["energy_distance"].append(ed)
        values["swd"].append(sliced_wasserstein2(s, ruler.test, directions=ruler.directions, y_sorted=ruler.test_sorted))
        if points.distribution is not None:
            values["sample_logp"].append(float(points.distribution.log_prob(s.cpu()).double().mean()))
    for k, v in values.items():
        mean, se = mean_and_se(torch.tensor(v, dtype=torch.float64))
        ev.metrics[f"{prefix}{k}{suffix}"] = mean
        if len(v) > 1:
            ev.metrics[f"{prefix}{k}{suffix}_se"] = se


class _Ruler(NamedTuple):
    """What every sample set of one evaluation is measured against: the test points (on the
    metric device), their self pair sums (computed once, not once per sample set) and the
    SWD directions (the same for every set, so floors and models share one ruler) with the test
    points' sorted projections on them (also computed once)."""

    test: Tensor
    ref: ReferenceSums
    directions: Tensor
    test_sorted: Tensor


def _points_common(ev: Evaluation, points: Points, cfg: EvaluateConfig, device: torch.device) -> _Ruler:
    """Floors, reference values, sizes; returns the ruler shared by every sample set."""
    n = cfg.n_samples
    reals, source = _real_draws(points, n, cfg)
    directions = random_directions(cfg.swd_projections, 2, make_generator(cfg.seed + SEED_OFFSETS["directions"]))
    test = points.test.to(device, torch.float32)
    ruler = _Ruler(test, reference_sums(test, cfg.mmd_bandwidths), directions, sorted_projections(test, directions))
    # The floors: each metric's expected value between a real sample of n points and this test set
    # (the mean over the draws) with its se, and the closed-form mmd / ED expectation over test sets.
    ev.metrics.update(
        real_vs_real_floors([r.to(device) for r in reals], ruler.ref, directions, test_sorted=ruler.test_sorted)
    )
    if points.distribution is not None:
        # the mean true log-density of real points, = -H up to noise: the target of sample_logp
        ev.metrics["sample_logp_floor"] = float(points.distribution.log_prob(reals[0]).double().mean())
    ev.metrics.update(
        {
            "n_samples": n,
            "floor_draws": cfg.floor_draws,
            "sample_draws": cfg.sample_draws,
            "n_train": int(points.train.shape[0]),
            "n_val": int(points.val.shape[0]),
            "n_test": int(points.test.shape[0]),
            "floor_source": source,
            "point_set": points.name,
            "swd_projections": cfg.swd_projections,
        }
    )
    if points.distribution is not None:
        ev.metrics["true_entropy"] = points.true_entropy
        ev.metrics["true_entropy_se"] = points.true_entropy_se
    ev.notes.append(
        f"sample metrics: mean over {cfg.sample_draws} draws of {n} generated points vs {points.test.shape[0]} "
        f"test points; floors: mean of "
        f"{cfg.floor_draws} draws of {n} points from the {source.replace('_', ' ')} vs the same test points "
        f"(*_floor_unconditional: the closed-form expectation over test sets too)"
    )
    return ruler


def _points_baselines(ev: Evaluation, points: Points, cfg: EvaluateConfig, ruler: _Ruler, device: torch.device) -> None:
    """Gaussian and KDE fitted on the training points: test NLL, KL gap, sample metrics."""
    gauss = GaussianBaseline.fit(points.train, ridge=cfg.gaussian_ridge)
    kde, record = KDEBaseline.fit(
        points.train,
        points.val,
        n_grid=cfg.kde_grid,
        max_centers=cfg.kde_max_centers,
        generator=_gen(cfg, "kde"),
    )
    ev.metrics["baseline_kde_bandwidth"] = kde.bandwidth
    ev.metrics["baseline_kde_n_centers"] = int(kde.centers.shape[0])
    for name, model in (("gaussian", gauss), ("kde", kde)):
        prefix = f"baseline_{name}_"
        _nll_block(ev, prefix, -model.log_prob(points.test), points, nll_key="test_nll", gap_key="kl_gap")
        draws = [model.sample(cfg.n_samples, _gen(cfg, name, draw=k)) for k in range(cfg.sample_draws)]
        _sample_block(ev, prefix, "", draws, points, cfg, ruler, device)
    ev.notes.append(
        f"baselines: full-covariance Gaussian (ridge {cfg.gaussian_ridge}) and KDE (bandwidth {kde.bandwidth:.4g} "
        f"chosen on {points.val.shape[0]} validation points from {len(record['bandwidths'])} candidates, "
        f"{kde.centers.shape[0]} centres)"
    )


@torch.no_grad()
def evaluate_realnvp2d(model: nn.Module, points: Points, cfg: EvaluateConfig, device: torch.device) -> Evaluation:
    """RealNVP 2D: ``test_nll``, ``true_entropy``, ``kl_gap``, sample metrics + floors, ``sample_logp``, baselines.

    Args:
        model: a trained :class:`genmodels.flows.base.Flow` on ``device`` (eval mode).
        points: the prepared 2D set.
    """
    from genmodels.flows.realnvp2d import nll, sample

    ev = Evaluation()
    ruler = _points_common(ev, points, cfg, device)
    _nll_block(ev, "", nll(model, points.test.to(device)).cpu(), points, nll_key="test_nll", gap_key="kl_gap")
    draws = [sample(model, cfg.n_samples, seed=_seed(cfg, "samples", k)) for k in range(cfg.sample_draws)]
    _sample_block(ev, "", "", draws, points, cfg, ruler, device)
    _points_baselines(ev, points, cfg, ruler, device)
    return ev


def _timed(fn: Any, device: torch.device) -> tuple[Tensor, float]:
    """``fn()`` and its wall-clock seconds (synchronising a GPU before reading the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def evaluate_ddpm(
    model: nn.Module, config: Mapping[str, Any], points: Points, cfg: EvaluateConfig, device: torch.device
) -> Evaluation:
    """DDPM 2D: ``nll_bound`` (negative ELBO, nats), ``kl_gap_bound``, sample metrics + floors for the
    full chain and (suffix ``_strided``) the strided sampler, ``sampling_seconds_per_1k(_strided)``, baselines.

    Args:
        model: a trained :class:`genmodels.diffusion.DDPM` on ``device``.
        config: its ``ddpm`` config dict (``sampling_steps`` sets the strided sampler).
    """
    from genmodels.diffusion import nll_bound, sample_ancestral, sample_strided, sampling_dtype

    ev = Evaluation()
    ruler = _points_common(ev, points, cfg, device)
    test = points.test
    if cfg.nll_bound_points and cfg.nll_bound_points < test.shape[0]:
        test = test[: cfg.nll_bound_points]  # the test split is already an i.i.d. draw: a prefix is a subsample
    bound = nll_bound(model, test.to(device), generator=_gen(cfg, "nll", device))
    _nll_block(ev, "", bound.cpu(), points, nll_key="nll_bound", gap_key="kl_gap_bound")
    ev.metrics["nll_bound_points"] = int(test.shape[0])
    steps = int(config["sampling_steps"])
    prec = str(config.get("sampling_precision", "auto"))  # checkpoints from before the option: auto
    n_steps = int(model.n_steps)
    ev.metrics["sampling_steps_full"] = n_steps
    ev.metrics["sampling_steps_strided"] = steps
    full = [
        sample_ancestral(model, cfg.n_samples, generator=_gen(cfg, "samples", device, k), precision=prec)
        for k in range(cfg.sample_draws)
    ]
    _sample_block(ev, "", "", full, points, cfg, ruler, device)
    strided = [
        sample_strided(
            model, cfg.n_samples, sampling_steps=steps, generator=_gen(cfg, "strided", device, k), precision=prec
        )
        for k in range(cfg.sample_draws)
    ]
    _sample_block(ev, "", "_strided", strided, points, cfg, ruler, device)
    # Timing on a separate, smaller draw so it measures the sampler, not the metric code.
    k = cfg.timing_points
    _, t_full = _timed(
        lambda: sample_ancestral(model, k, generator=_gen(cfg, "timing", device), precision=prec), device
    )
    _, t_str = _timed(
        lambda: sample_strided(model, k, sampling_steps=steps, generator=_gen(cfg, "timing", device), precision=prec),
        device,
    )
    ev.metrics["sampling_seconds_per_1k"] = t_full * 1000.0 / k
    ev.metrics["sampling_seconds_per_1k_strided"] = t_str * 1000.0 / k
    ev.metrics["sampling_device"] = device.type
    ev.metrics["sampling_dtype"] = str(sampling_dtype(prec, device, model.shift.dtype)).removeprefix("torch.")
    _points_baselines(ev, points, cfg, ruler, device)
    ev.notes.append(
        f"nll_bound: full negative ELBO over all {n_steps} steps on {test.shape[0]} test points; "
        f"strided sampler: {steps} steps; sampler network in {ev.metrics['sampling_dtype']}; timing on {k} points on {device.type} (wall clock: not reproducible)"
    )
    return ev


# ------------------------------------------------------------------------------------- images


def _to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] (any shape with 784 pixels per item) -> uint8 (N, 28, 28)."""
    x = images.detach().float().cpu().reshape(images.shape[0], 28, 28)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _fid_block(
    ev: Evaluation,
    prefix: str,
    classifier: SmallCNN,
    generated: Tensor,
    test: Tensor,
    floor_real: Tensor | None,
) -> None:
    """``<prefix>fid`` of uint8 ``generated`` vs ``test``; ``fid_floor`` from ``floor_real`` when given."""
    f_test = extract_features(classifier, test)
    ev.metrics[prefix + "fid"] = frechet_from_features(extract_features(classifier, generated), f_test)
    if floor_real is not None:
        ev.metrics["fid_floor"] = frechet_from_features(extract_features(classifier, floor_real), f_test)
        ev.metrics["fid_n_generated"] = int(generated.shape[0])
        ev.metrics["fid_n_real"] = int(test.shape[0])


def _fid_sizes(train: Tensor, cfg: EvaluateConfig) -> int:
    """Generated images for the FID: ``n_fid``, at most the number of training images, so the
    floor can compare a disjoint real set (training images) of the same size with the test set."""
    return min(cfg.n_fid, int(train.shape[0]))


def _fid_real(train: Tensor, n: int, cfg: EvaluateConfig) -> Tensor:
    idx = torch.randperm(train.shape[0], generator=_gen(cfg, "fid_real"))[:n]
    return train[idx.sort().values]


def official_test_images(data: Mapping[str, Any]) -> Tensor:
    """All images of a prepared data set's official *test* file (N, 28, 28): the other classes,
    plus the chosen class' held-out split(s) that came from that file."""
    parts = [data["other"], data["test"]]
    if data.get("split") == "test":
        parts += [data["train"], data["val"]]
    return torch.cat(parts)


@torch.no_grad()
def evaluate_flow(
    model: nn.Module,
    config: Any,
    fashion: Mapping[str, Any],
    mnist: Mapping[str, Any],
    classifier: SmallCNN,
    classifier_info: Mapping[str, Any],
    cfg: EvaluateConfig,
    device: torch.device,
) -> Evaluation:
    """Image flow on Fashion-MNIST class c: ``test_bpd``, ``gaussian_bpd``, ``ood_auroc`` (vs the other
    nine classes, score = log-likelihood), ``ood_auroc_mnist``, ``fid`` / ``fid_floor``, baselines.

    Args:
        model: trained :class:`genmodels.flows.imageflow.ImageFlow`; config: its :class:`FlowConfig`.
        fashion, mnist: prepared data dicts (``genmodels.data.images.load_prepared``).
        classifier: the Fashion-MNIST FID classifier; classifier_info: its checkpoint info.
    """
    from genmodels.flows.imageflow import per_image_bpd

    ev = Evaluation()
    lam = float(config.logit_lambda)
    seed = cfg.seed + SEED_OFFSETS["dequant"]
    train, val, test, other = fashion["train"], fashion["val"], fashion["test"], fashion["other"]
    mnist_images = official_test_images(mnist)
    bpd_test = per_image_bpd(model, test, seed=seed).cpu()
    ev.metrics["test_bpd"], ev.metrics["test_bpd_se"] = mean_and_se(bpd_test)
    # Score = log-likelihood = -bpd * D ln 2: a monotone map, so the AUROC of -bpd is the same.
    _ood(ev, "ood_auroc", -bpd_test, -per_image_bpd(model, other, seed=seed + 1).cpu())
    _ood(ev, "ood_auroc_mnist", -bpd_test, -per_image_bpd(model, mnist_images, seed=seed + 2).cpu())
    n = _fid_sizes(train, cfg)
    samples = model.sample_images(n, generator=_gen(cfg, "samples", device)).cpu()
    _fid_block(ev, "", classifier, samples, test, _fid_real(train, n, cfg))
    ev.metrics.update(
        {
            "n_train": int(train.shape[0]),
            "n_test": int(test.shape[0]),
            "n_ood_other_classes": int(other.shape[0]),
            "n_ood_mnist": int(mnist_images.shape[0]),
            "class_index": int(fashion["class_index"]),
            "classifier_test_accuracy": float(classifier_info["test_accuracy"]),
        }
    )
    _image_baselines(
        ev, train, val, test, {"ood_auroc": other, "ood_auroc_mnist": mnist_images}, lam, classifier, cfg, n
    )
    ev.metrics["gaussian_bpd"] = ev.metrics["baseline_gaussian_test_bpd"]
    ev.notes.append(
        f"bpd: 8-bit pixel space, uniform dequantization, logit lambda {lam}, all Jacobians; FID: {n} generated vs "
        f"{test.shape[0]} test images in the features of a Fashion-MNIST classifier "
        f"(test accuracy {classifier_info['test_accuracy']:.4f}); floor: {n} training images vs the same test images"
    )
    return ev


def _image_baselines(
    ev: Evaluation,
    train: Tensor,
    val: Tensor,
    test: Tensor,
    ood_sets: Mapping[str, Tensor],
    lam: float,
    classifier: SmallCNN,
    cfg: EvaluateConfig,
    n_fid: int,
) -> None:
    """Gaussian and KDE in logit space: ``baseline_<name>_test_bpd``, one AUROC per OOD set, ``_fid``."""
    seed = cfg.seed + SEED_OFFSETS["dequant"]
    for name in ("gaussian", "kde"):
        # ridge None: the Gaussian's ridge is chosen on validation images (N < D for MNIST zeros).
        base, record = ImageBaseline.fit(
            name, train, val, lam, generator=_gen(cfg, name), ridge=None, max_centers=cfg.kde_max_centers
        )
        prefix = f"baseline_{name}_"
        bpd_test = base.bpd(test, make_generator(seed))
        ev.metrics[prefix + "test_bpd"], ev.metrics[prefix + "test_bpd_se"] = mean_and_se(bpd_test)
        for i, (key, images) in enumerate(ood_sets.items()):
            _ood(ev, prefix + key, -bpd_test, -base.bpd(images, make_generator(seed + 1 + i)), curve=False)
        _fid_block(ev, prefix, classifier, base.sample_images(n_fid, _gen(cfg, name)), test, None)
        if name == "gaussian":
            ev.metrics["baseline_gaussian_ridge"] = float(
                record["ridges"][int(torch.tensor(record["val_loglik"]).argmax())]
            )
        if name == "kde":
            ev.metrics["baseline_kde_bandwidth"] = float(base.base.bandwidth)  # type: ignore[union-attr]
            ev.notes.append(
                f"image KDE baseline: bandwidth {base.base.bandwidth:.4g} (logit space) chosen from "  # type: ignore[union-attr]
                f"{len(record['bandwidths'])} candidates on {val.shape[0]} validation images"
            )


@torch.no_grad()
def _energies(model: nn.Module, images: Tensor, device: torch.device, batch_size: int = 2000) -> Tensor:
    """EBM energies (N,) of uint8 images (N, 28, 28) or floats in [0, 1]."""
    from genmodels.ebm import images_to_float

    out = [
        model(images_to_float(images[i : i + batch_size]).to(device)).cpu()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out).to(torch.float64)


def evaluate_ebm(
    model: nn.Module,
    config: Mapping[str, Any],
    mnist: Mapping[str, Any],
    fashion: Mapping[str, Any],
    classifier: SmallCNN,
    classifier_info: Mapping[str, Any],
    cfg: EvaluateConfig,
    device: torch.device,
) -> Evaluation:
    """EBM on MNIST digit c: ``ood_auroc`` (held-out c vs the other digits, score = -energy),
    ``ood_auroc_noise`` (vs uniform noise), ``ood_auroc_fashion``, ``fid`` / ``fid_floor``, mean energies, baselines.

    Args:
        model: trained :class:`genmodels.ebm.EnergyMLP` on ``device``; config: its ``ebm`` config dict.
        mnist, fashion: prepared data dicts.
        classifier: the MNIST FID classifier; classifier_info: its checkpoint info.
    """
    from genmodels.ebm import sample_model

    ev = Evaluation()
    train, val, test, other = mnist["train"], mnist["val"], mnist["test"], mnist["other"]
    fashion_images = official_test_images(fashion)
    noise = (
        (torch.rand(test.shape[0], 28, 28, generator=_gen(cfg, "noise")) * 256).floor().clamp(0, 255).to(torch.uint8)
    )
    e_test = _energies(model, test, device)
    e_other, e_noise = _energies(model, other, device), _energies(model, noise, device)
    e_fashion = _energies(model, fashion_images, device)
    _ood(ev, "ood_auroc", -e_test, -e_other)
    _ood(ev, "ood_auroc_noise", -e_test, -e_noise)
    _ood(ev, "ood_auroc_fashion", -e_test, -e_fashion)
    n = _fid_sizes(train, cfg)
    with torch.enable_grad():  # Langevin needs input gradients
        samples = sample_model(model, config, n, generator=_gen(cfg, "samples", device), device=device)
    samples_u8 = _to_uint8(samples)
    _fid_block(ev, "", classifier, samples_u8, test, _fid_real(train, n, cfg))
    e_samples = _energies(model, samples.reshape(n, -1).clamp(0, 1), device)
    ev.metrics.update(
        {
            "energy_data": float(e_test.mean()),
            "energy_train": float(_energies(model, train, device).mean()),
            "energy_samples": float(e_samples.mean()),
            "energy_noise": float(e_noise.mean()),
            "energy_other_digits": float(e_other.mean()),
            "energy_fashion": float(e_fashion.mean()),
            "n_train": int(train.shape[0]),
            "n_test": int(test.shape[0]),
            "n_ood_other_digits": int(other.shape[0]),
            "n_ood_noise": int(noise.shape[0]),
            "n_ood_fashion": int(fashion_images.shape[0]),
            "class_index": int(mnist["class_index"]),
            "data_split": str(mnist["split"]),
            "classifier_test_accuracy": float(classifier_info["test_accuracy"]),
            "sample_steps": int(config.get("sample_steps", 0)),
        }
    )
    _image_baselines(
        ev,
        train,
        val,
        test,
        {"ood_auroc": other, "ood_auroc_noise": noise, "ood_auroc_fashion": fashion_images},
        cfg.image_logit_lambda,
        classifier,
        cfg,
        n,
    )
    ev.notes.append(
        f"OOD: {test.shape[0]} held-out digit-{int(mnist['class_index'])} images vs {other.shape[0]} other digits, "
        f"{noise.shape[0]} uniform-noise images, {fashion_images.shape[0]} Fashion-MNIST test images (score = -energy); "
        f"FID: {n} long-run Langevin samples vs {test.shape[0]} test images, MNIST classifier "
        f"(test accuracy {classifier_info['test_accuracy']:.4f}, trained on a split of the "
        "official test file: the training file is not available offline); floor: "
        f"{n} training images vs the same test images; baselines in logit space (lambda {cfg.image_logit_lambda})"
    )
    return ev


__all__ = [
    "SEED_OFFSETS",
    "Evaluation",
    "Points",
    "evaluate_ddpm",
    "evaluate_ebm",
    "evaluate_flow",
    "evaluate_realnvp2d",
    "official_test_images",
]
