"""EBM benchmark at the defaults: training time, Langevin steps/s, OOD AUROCs beside naive baselines.

Usage:

    python benchmarks/bench_ebm.py [--params params.yaml] [--data data/prepared/mnist.pt] [--out /tmp/ebm_bench]

Trains ``train_ebm`` with the ``ebm`` section of params.yaml (the dataclass defaults where the
section is absent) on the prepared MNIST zeros (or, without a prepared file, on a seeded
70/10/20 split of the zeros of the official test file in ../shared/data), then reports:

* wall-clock training time and Langevin steps/s (batch = ebm.batch_size, 784-512-512-1 MLP);
* AUROC of -energy, held-out zeros vs digits 1-9 and vs uniform noise;
* the same AUROCs for a full-covariance Gaussian and a Gaussian KDE fitted on the same training
  zeros in the same [0, 1] pixel space (ridge and bandwidth chosen on the validation zeros);
* energy statistics of data, other digits, noise, buffer chains and long-run samples;
* a grid of long-run samples (PNG) under --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.configs import load_params  # noqa: E402
from genmodels.configs.base import to_dict  # noqa: E402
from genmodels.ebm import EnergyMLP, images_to_float, langevin, sample_model, train_ebm  # noqa: E402
from genmodels.metrics.baselines import GaussianBaseline, KDEBaseline  # noqa: E402
from genmodels.metrics.roc import auroc  # noqa: E402


def _idx(path: Path) -> torch.Tensor:
    raw = gzip.open(path).read()
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(n, rows, cols)
    return torch.frombuffer(bytearray(raw[8:]), dtype=torch.uint8).long()


def load_data(path: Path, mirror: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        from genmodels.data.images import load_prepared

        d = load_prepared(path)
        print(f"data: {path} (split {d['split']})")
        return {k: d[k] for k in ("train", "val", "test", "other")}
    x = _idx(mirror / "mnist/t10k-images-idx3-ubyte.gz")
    y = _idx(mirror / "mnist/t10k-labels-idx1-ubyte.gz")
    z = x[y == 0][torch.randperm(int((y == 0).sum()), generator=torch.Generator().manual_seed(0))]
    n_val, n_test = round(0.1 * len(z)), round(0.2 * len(z))
    print(f"data: zeros of {mirror}/mnist t10k, seeded split (no prepared file at {path})")
    return {"val": z[:n_val], "test": z[n_val : n_val + n_test], "train": z[n_val + n_test :], "other": x[y != 0]}


def steps_per_second(batch: int, n_steps: int = 60) -> float:
    model = EnergyMLP()
    x = torch.rand(batch, 784, generator=torch.Generator().manual_seed(0))
    kw = dict(step_size=10.0, noise_std=5e-3, grad_clip=0.03, generator=torch.Generator().manual_seed(1))
    langevin(model, x, n_steps=5, **kw)  # warm-up
    t = time.perf_counter()
    langevin(model, x, n_steps=n_steps, **kw)
    return n_steps / (time.perf_counter() - t)


def fit_gaussian(train: torch.Tensor, val: torch.Tensor) -> tuple[GaussianBaseline, float]:
    """Full-covariance Gaussian; 686 zeros < 784 pixels, so the ridge is chosen on val log-likelihood."""
    best = None
    for ridge in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        g = GaussianBaseline.fit(train, ridge)
        ll = float(g.log_prob(val).mean())
        if best is None or ll > best[0]:
            best = (ll, g, ridge)
    assert best is not None
    return best[1], best[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/prepared/mnist.pt", type=Path)
    ap.add_argument("--mirror", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"), type=Path)
    ap.add_argument("--out", default="/tmp/ebm_bench", type=Path)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = {}
    if Path(args.params).is_file():
        import yaml

        raw = yaml.safe_load(Path(args.params).read_text()) or {}
    cfg = load_params({"ebm": raw.get("ebm", {})}).ebm
    print("ebm config:", json.dumps(to_dict(cfg)))
    data = load_data(args.data, args.mirror)
    print({k: tuple(v.shape) for k, v in data.items()})
    args.out.mkdir(parents=True, exist_ok=True)

    sps = {b: steps_per_second(b) for b in sorted({64, 128, cfg.batch_size})}
    for b, s in sps.items():
        print(f"Langevin: {s:.1f} steps/s at batch {b} ({s * b:.0f} image-steps/s)")

    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    res = train_ebm(cfg, data["train"], data["val"], on_epoch=lambda e, m: rows.append({"epoch": e, **m}))
    train_s = time.perf_counter() - t0
    print(
        f"training: {train_s:.1f}s for {res.epochs_run} epochs (best epoch {res.best_epoch}), rollbacks {len(res.rollbacks)}"
    )

    model = res.model
    test, other = images_to_float(data["test"]), images_to_float(data["other"])
    noise = torch.rand(1000, 784, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(cfg.seed + 100)
    t = time.perf_counter()
    samples = sample_model(model, to_dict(cfg), 64, generator=g)
    sample_s = time.perf_counter() - t
    with torch.no_grad():
        e_test, e_other, e_noise = model(test), torch.cat([model(b) for b in other.split(2048)]), model(noise)
        e_train = model(images_to_float(data["train"]))
        e_samples = model(samples)
        e_buffer = model(res.checkpoint["buffer"]["examples"].float())
    out: dict[str, float] = {
        "train_seconds": train_s,
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "rollbacks": len(res.rollbacks),
        "langevin_steps_per_s_batch_%d" % cfg.batch_size: sps[cfg.batch_size],
        "sample_seconds_64x%d" % cfg.sample_steps: sample_s,
        "ood_auroc": auroc(-e_test, -e_other),
        "ood_auroc_noise": auroc(-e_test, -e_noise),
    }
    for name, e in (
        ("train", e_train),
        ("test", e_test),
        ("other", e_other),
        ("noise", e_noise),
        ("samples", e_samples),
        ("buffer", e_buffer),
    ):
        out[f"energy_{name}_mean"] = float(e.mean())
        out[f"energy_{name}_std"] = float(e.std())

    # Final (last-epoch) weights too: the best-by-val-loss choice is not the only one a user sees.
    final = EnergyMLP(784, cfg.hidden, cfg.activation)
    final.load_state_dict(res.checkpoint["final_model"])
    with torch.no_grad():
        ft, fo, fn = final(test), torch.cat([final(b) for b in other.split(2048)]), final(noise)
    out["final_epoch_ood_auroc"] = auroc(-ft, -fo)
    out["final_epoch_ood_auroc_noise"] = auroc(-ft, -fn)

    trainf, valf = images_to_float(data["train"]), images_to_float(data["val"])
    gauss, ridge = fit_gaussian(trainf, valf)
    out["baseline_gaussian_ridge"] = ridge
    out["baseline_gaussian_ood_auroc"] = auroc(gauss.log_prob(test), gauss.log_prob(other))
    out["baseline_gaussian_ood_auroc_noise"] = auroc(gauss.log_prob(test), gauss.log_prob(noise))
    kde, record = KDEBaseline.fit(trainf, valf)
    out["baseline_kde_bandwidth"] = kde.bandwidth
    out["baseline_kde_ood_auroc"] = auroc(kde.log_prob(test), kde.log_prob(other))
    out["baseline_kde_ood_auroc_noise"] = auroc(kde.log_prob(test), kde.log_prob(noise))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(images: torch.Tensor, path: Path) -> None:
        x = images.reshape(-1, 28, 28)[:64].clamp(0, 1)
        grid = x.reshape(8, 8, 28, 28).permute(0, 2, 1, 3).reshape(8 * 28, 8 * 28)
        plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)

    save(samples, args.out / "samples_long_run.png")
    save(res.checkpoint["buffer"]["examples"][:64], args.out / "buffer.png")
    (args.out / "train.csv").write_text(res.history.to_csv())
    (args.out / "bench_ebm.json").write_text(json.dumps(out, indent=2) + "\n")
    for k, v in out.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"sample grids: {args.out / 'samples_long_run.png'}, {args.out / 'buffer.png'}")


if __name__ == "__main__":
    main()
