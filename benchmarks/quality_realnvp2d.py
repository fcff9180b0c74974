"""RealNVP 2D quality at the defaults: train on each built-in 2D set, print test NLL vs true entropy.

Usage::

    python benchmarks/quality_realnvp2d.py                      # all six sets, seed defaults
    python benchmarks/quality_realnvp2d.py --sets two_moons --epochs 50   # a shorter probe
    python benchmarks/quality_realnvp2d.py --sets rings -s ema_decay=0.999 # any realnvp2d key

For each set it draws the default splits (``data.points2d``: 65,536 / 8,192 / 16,384 points,
seed 0), trains ``realnvp2d`` with its defaults (early stopping on the validation NLL), and
prints ``test_nll``, the Monte-Carlo true entropy ``H`` (with its standard error), the KL
gap ``test_nll - H`` (with the standard error of the test NLL), the goal, epochs run and the
training wall time. The goals come from issue 4: gap <= 0.03 nats, 0.10 on checkerboard.

Two more columns estimate the same KL divergence ``KL(p || q) = E_p[log p - log q]`` with far
less noise: ``kl_pop`` on 2^20 fresh draws from the true density (seed 7, not the data's) and
``kl_test`` on the test split itself, each the mean of the per-point difference
``log p(x) - log q(x)`` with its standard error. The difference varies much less from point to
point than ``-log q`` alone (whose spread sets ``nll_se``), and ``kl_pop`` is free of the test
split's own sampling luck, which the issue's gap carries (``test_nll - H`` = ``kl_test`` plus
the test split's ``mean(-log p) - H``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality_ddpm import parse_overrides  # noqa: E402  (same folder)

from genmodels.configs.base import from_mapping, to_dict  # noqa: E402
from genmodels.configs.data import POINTS2D_NAMES, Points2DConfig  # noqa: E402
from genmodels.configs.realnvp2d import RealNVP2DConfig  # noqa: E402
from genmodels.data.points2d import Distribution2D, get_distribution, make_splits  # noqa: E402
from genmodels.flows.realnvp2d import nll, train_realnvp2d  # noqa: E402
from genmodels.training import mean_and_se, resolve_device  # noqa: E402

GOALS = {name: (0.10 if name == "checkerboard" else 0.03) for name in POINTS2D_NAMES}
N_POP = 1 << 20


def paired_kl(dist: Distribution2D, x: torch.Tensor, nll_x: torch.Tensor) -> tuple[float, float]:
    """``mean(log p(x) - log q(x))`` over the points ``x`` (N, 2) drawn from ``p``, given the
    model's ``nll_x = -log q(x)`` (N,), and its standard error: an unbiased estimate of
    ``KL(p || q)`` (float64 sums)."""
    return mean_and_se(dist.log_prob(x).double() + nll_x.double().cpu())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(POINTS2D_NAMES), choices=POINTS2D_NAMES)
    ap.add_argument("--epochs", type=int, default=None, help="override the maximum epochs (default: params default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[], help="realnvp2d key=value")
    ap.add_argument("--save-dir", type=Path, default=None, help="write each trained model's state dict here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    data_cfg = Points2DConfig()
    raw = {**to_dict(RealNVP2DConfig()), **parse_overrides(args.overrides)}
    if args.epochs is not None:
        raw["epochs"] = args.epochs
    cfg = from_mapping(RealNVP2DConfig, raw, "realnvp2d")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} config={cfg}")
    header = f"{'set':<16}{'test_nll':>10}{'H':>10}{'H_se':>8}{'kl_gap':>9}{'nll_se':>8}{'goal':>6}{'ok':>4}"
    header += f"{'epochs':>8}{'best':>6}{'train_s':>9}{'kl_pop':>9}{'se':>8}{'kl_test':>9}{'se':>8}"
    rows = []
    for name in args.sets:
        splits = make_splits(name, data_cfg.n_train, data_cfg.n_val, data_cfg.n_test, data_cfg.seed)
        dist = get_distribution(name)
        h, h_se = dist.entropy()
        t0 = time.perf_counter()
        res = train_realnvp2d(cfg, splits.train, splits.val, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        # -log q of the test split once: its mean is the test NLL, and it enters the paired KL
        test_q = nll(res.model, splits.test.to(device)).cpu()
        test_nll, nll_se = mean_and_se(test_q)
        gap = test_nll - h
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save(res.model.state_dict(), args.save_dir / f"realnvp2d_{name}.pt")
        pop = dist.sample(N_POP, torch.Generator().manual_seed(7))
        kl_pop, kl_pop_se = paired_kl(dist, pop, nll(res.model, pop.to(device)))
        kl_test, kl_test_se = paired_kl(dist, splits.test, test_q)
        ok = "yes" if gap <= GOALS[name] else "NO"
        row = f"{name:<16}{test_nll:>10.4f}{h:>10.4f}{h_se:>8.4f}{gap:>9.4f}{nll_se:>8.4f}{GOALS[name]:>6.2f}{ok:>4}"
        row += f"{res.epochs_run:>8}{res.best_epoch:>6}{secs:>9.1f}"
        row += f"{kl_pop:>9.4f}{kl_pop_se:>8.4f}{kl_test:>9.4f}{kl_test_se:>8.4f}"
        rows.append(row)
        print(header if len(rows) == 1 else "", row, sep="\n" if len(rows) == 1 else "", flush=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
