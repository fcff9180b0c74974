"""DDPM 2D quality at the defaults on every built-in 2D set (a benchmark, not a test).

For each set: train with the ``ddpm`` defaults (early stopping on the validation ELBO), then
print the full ELBO bound on held-out points (``nll_bound``, all L terms), the true entropy,
the gap, the energy distance and sliced Wasserstein distance of 16,384 samples (full chain
and strided; the mean over ``--sample-draws`` noise seeds, with its standard error) next to
their real-vs-real floors at the same sample size (the mean of ``--floor-draws`` real draws
against the test split, with its standard error, and the closed-form ED expectation over test
sets, :func:`genmodels.metrics.sample.real_vs_real_floors`), and training time.
``--compare`` repeats the run for the ``mean``, ``eps`` and ``x0`` parameterisations.

Usage:

    python benchmarks/quality_ddpm.py [--sets two_moons rings ...] [--epochs N] [--elbo-points 4096]
        [--strided 100 250 500] [--sample-draws 8] [--compare two_moons] [-s key=value ...]

``-s key=value`` overrides any ``ddpm`` params key (e.g. ``-s ema_decay=0.99``). Goals (issue 4):
``nll_bound - true_entropy <= 0.10`` nats on two_moons, eight_gaussians, pinwheel, two_spirals,
rings; ED and SWD within 2x of their floors; training <= 2 CPU minutes.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.configs.base import from_mapping  # noqa: E402
from genmodels.configs.ddpm import DDPMConfig  # noqa: E402
from genmodels.data.points2d import get_distribution, make_splits  # noqa: E402
from genmodels.diffusion import config_dict, nll_bound, sample, train_ddpm  # noqa: E402
from genmodels.metrics.sample import (  # noqa: E402
    DEFAULT_PROJECTIONS,
    mmd2_and_energy,
    random_directions,
    real_vs_real_floors,
    reference_sums,
    sliced_wasserstein2,
    sorted_projections,
)
from genmodels.training import make_generator  # noqa: E402

SETS = ("two_moons", "eight_gaussians", "pinwheel", "two_spirals", "rings", "checkerboard")
N_SAMPLES = 16384


def parse_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def run_one(
    name: str,
    cfg: DDPMConfig,
    elbo_points: int,
    strided: list[int],
    device: torch.device,
    full: bool = True,
    floor_draws: int = 8,
    sample_draws: int = 8,
) -> dict[str, float]:
    sp = make_splits(name, 65536, 8192, 16384, 0)
    dist = get_distribution(name)
    entropy, entropy_se = dist.entropy()
    t0 = time.perf_counter()
    res = train_ddpm(cfg, sp.train, sp.val, device=device)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    bound = nll_bound(res.model, sp.test[:elbo_points].to(device), generator=make_generator(1, device))
    elbo_s = time.perf_counter() - t1
    row = {
        "epochs": res.epochs_run,
        "best_epoch": res.best_epoch,
        "train_s": train_s,
        "elbo_s": elbo_s,
        "nll_bound": bound.double().mean().item(),
        "nll_bound_se": bound.double().std().item() / elbo_points**0.5,
        "entropy": entropy,
        "entropy_se": entropy_se,
    }
    row["gap"] = row["nll_bound"] - entropy
    g_real = make_generator(12345)
    real = [dist.sample(N_SAMPLES, g_real) for _ in range(floor_draws)]
    # floors once per set: the mean of the real draws' metrics against the test split
    ref = reference_sums(sp.test)
    directions = random_directions(DEFAULT_PROJECTIONS, 2, torch.Generator().manual_seed(0))
    test_sorted = sorted_projections(sp.test, directions)
    floors = real_vs_real_floors(real, ref, directions, test_sorted=test_sorted)
    for k in ("energy_distance", "swd"):
        row[f"{k}_floor"] = floors[k + "_floor"]
        row[f"{k}_floor_se"] = floors[k + "_floor_se"]
    row["energy_distance_floor_unconditional"] = floors["energy_distance_floor_unconditional"]
    samplers = [("full", cfg.n_steps)] if full else []
    for label, steps in (*samplers, *((f"s{k}", k) for k in strided)):
        # As many sampler draws (noise seeds 2, 3, ...) as the floor has real draws: one draw's
        # ED moves by about its own size from seed to seed (pinwheel's full chain: 7.83e-4,
        # 5.03e-4, 1.77e-4), as the real draws behind the floor do, so model and floor are both
        # means over draws of the same size against the same test split.
        eds, swds, secs = [], [], []
        for k in range(sample_draws):
            t2 = time.perf_counter()
            gen = sample(
                res.model,
                N_SAMPLES,
                sampling_steps=steps,
                eta=cfg.sampling_eta,
                generator=make_generator(2 + k, device),
            ).cpu()
            secs.append(time.perf_counter() - t2)
            eds.append(mmd2_and_energy(gen, sp.test, ref=ref)[1])
            swds.append(sliced_wasserstein2(gen, sp.test, directions=directions, y_sorted=test_sorted))
        row[f"{label}_pts_per_s"] = N_SAMPLES / statistics.median(secs)
        for key, vals in (("energy_distance", eds), ("swd", swds)):
            row[f"{label}_{key}"] = statistics.fmean(vals)
            row[f"{label}_{key}_se"] = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--epochs", type=int, default=None, help="override the maximum number of epochs")
    ap.add_argument("--elbo-points", type=int, default=4096)
    ap.add_argument(
        "--strided", type=int, nargs="+", default=[DDPMConfig().sampling_steps], help="strided samplers' step counts"
    )
    ap.add_argument("--compare", nargs="*", default=[], help="sets on which to compare mean / eps / x0")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="ddpm key=value")
    ap.add_argument("--skip-full", action="store_true", help="only the strided sampler (faster)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--floor-draws", type=int, default=8, help="real draws averaged for each floor (>= 2)")
    ap.add_argument("--sample-draws", type=int, default=8, help="sampler draws (noise seeds) averaged per sampler")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raw = {**config_dict(DDPMConfig()), **parse_overrides(args.overrides)}
    if args.epochs is not None:
        raw["epochs"] = args.epochs
    base = from_mapping(DDPMConfig, raw, "ddpm")
    print(f"device {device}; ddpm params: {config_dict(base)}")
    header = (
        f"{'set':16s} {'param':5s} {'ep':>4s} {'train_s':>8s} {'nll_bound':>10s} {'H':>8s} {'gap':>7s} "
        f"{'ED full':>9s} {'(se)':>8s} {'ED floor':>9s} {'(se)':>8s} {'SWD full':>9s} {'(se)':>8s} {'SWD floor':>9s} "
        f"{'(se)':>8s} {'pts/s full':>10s} {'ED uncond':>9s}"
        + "".join(
            f" {'ED s' + str(k):>9s} {'(se)':>8s} {'SWD s' + str(k):>9s} {'(se)':>8s} {'pts/s s' + str(k):>10s}"
            for k in args.strided
        )
    )
    print(header)
    jobs = [(name, base.parameterization) for name in args.sets]
    jobs += [(name, p) for name in args.compare for p in ("mean", "eps", "x0") if (name, p) not in jobs]
    for name, param in jobs:
        cfg = from_mapping(DDPMConfig, {**config_dict(base), "parameterization": param}, "ddpm")
        r = run_one(
            name, cfg, args.elbo_points, args.strided, device, full=not args.skip_full, floor_draws=args.floor_draws,
            sample_draws=args.sample_draws,
        )
        for k in ("full_energy_distance", "full_energy_distance_se", "full_swd", "full_swd_se", "full_pts_per_s"):
            r.setdefault(k, float("nan"))
        print(
            f"{name:16s} {param:5s} {r['epochs']:4d} {r['train_s']:8.1f} {r['nll_bound']:10.4f} {r['entropy']:8.4f} "
            f"{r['gap']:7.4f} {r['full_energy_distance']:9.2e} {r['full_energy_distance_se']:8.1e} "
            f"{r['energy_distance_floor']:9.2e} {r['energy_distance_floor_se']:8.1e} {r['full_swd']:9.2e} "
            f"{r['full_swd_se']:8.1e} {r['swd_floor']:9.2e} {r['swd_floor_se']:8.1e} "
            f"{r['full_pts_per_s']:10.0f} {r['energy_distance_floor_unconditional']:9.2e}"
            + "".join(
                f" {r[f's{k}_energy_distance']:9.2e} {r[f's{k}_energy_distance_se']:8.1e} {r[f's{k}_swd']:9.2e} "
                f"{r[f's{k}_swd_se']:8.1e} {r[f's{k}_pts_per_s']:10.0f}"
                for k in args.strided
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
