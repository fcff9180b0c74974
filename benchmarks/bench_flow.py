"""Benchmark of the image flow on Fashion-MNIST class 0: speed, test bpd vs the Gaussian baseline, sweeps.

Usage (from the repository root; figures are printed, nothing is written unless ``--out``):

    python benchmarks/bench_flow.py speed                     # train steps/s, sampling images/s
    python benchmarks/bench_flow.py baseline                  # Gaussian baseline test bpd vs logit λ
    python benchmarks/bench_flow.py train -s epochs=20        # one training run: flow vs Gaussian test bpd
    python benchmarks/bench_flow.py sweep -s epochs=8 --grid "logit_lambda=0.05,0.01" --grid "whiten=fixed,none"

``-s key=value`` overrides the ``flow`` defaults of :class:`genmodels.configs.flow.FlowConfig`
(values parsed as YAML-ish scalars); ``--grid key=v1,v2`` sweeps a key (the cartesian product
of all grids). Data: ``--prepared data/prepared/fashion_mnist.pt`` when it exists, else the
IDX files under ``--idx-dir`` (class 0 of the official train file, a seeded 10% validation
split, class 0 of the official test file).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.configs.base import from_mapping, to_dict  # noqa: E402
from genmodels.configs.flow import FlowConfig  # noqa: E402
from genmodels.flows.image import dequantize  # noqa: E402
from genmodels.flows.imageflow import (  # noqa: E402
    build_model,
    gaussian_baseline,
    mean_and_se,
    per_image_bpd,
    train_flow,
)
from genmodels.training import make_generator  # noqa: E402


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = struct.unpack(">I", raw[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_data(prepared: Path | None, idx_dir: Path, class_index: int = 0) -> dict[str, torch.Tensor]:
    """uint8 ``train``/``val``/``test`` (N, 28, 28) of one Fashion-MNIST class."""
    if prepared is not None and prepared.is_file():
        from genmodels.data.images import load_prepared

        d = load_prepared(prepared)
        return {k: d[k] for k in ("train", "val", "test")}
    x_tr = _read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    y_tr = _read_idx(idx_dir / "train-labels-idx1-ubyte.gz")
    x_te = _read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")
    y_te = _read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")
    tr = x_tr[y_tr == class_index]
    perm = torch.randperm(tr.shape[0], generator=make_generator(0))
    n_val = tr.shape[0] // 10
    return {"train": tr[perm[n_val:]], "val": tr[perm[:n_val]], "test": x_te[y_te == class_index]}


def _parse_value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _config(overrides: dict[str, object]) -> FlowConfig:
    return from_mapping(FlowConfig, {**to_dict(FlowConfig()), **overrides}, "flow")


def bench_speed(data: dict[str, torch.Tensor], cfg: FlowConfig, steps: int) -> dict[str, float]:
    """Train steps/s at ``cfg.batch_size`` and sampling images/s (batches of 256)."""
    model = build_model(cfg)
    g = make_generator(0)
    model.initialize(dequantize(data["train"], g))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    batch = data["train"][: cfg.batch_size]

    def step() -> None:
        loss = model.bpd(dequantize(batch, g)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    step()  # warm-up (allocator, first-call overheads)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    train_sps = steps / (time.perf_counter() - t0)
    # CPU seconds per step (all threads): on a shared machine wall time overstates the cost;
    # threads / cpu_s_per_step is the rate an idle machine with perfect thread scaling would reach.
    cpu_per_step = (time.process_time() - c0) / steps
    model.eval()
    model.sample_images(16, generator=g)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 3.0:
        model.sample_images(256, generator=g, temperature=cfg.temperature)
        n += 256
    steps_per_epoch = math.ceil(data["train"].shape[0] / cfg.batch_size)
    return {
        "train_steps_per_s": train_sps,
        "train_cpu_s_per_step": cpu_per_step,
        "steps_per_epoch": steps_per_epoch,
        "est_idle_epoch_s": steps_per_epoch * cpu_per_step / torch.get_num_threads(),
        "sample_images_per_s": n / (time.perf_counter() - t0),
    }


def bench_baseline(
    data: dict[str, torch.Tensor], lambdas: list[float], shrinkages: list[float]
) -> list[dict[str, float]]:
    """Gaussian baseline test bpd over logit λ x covariance shrinkage."""
    rows = []
    for lam, shrink in itertools.product(lambdas, shrinkages):
        t0 = time.perf_counter()
        gauss = gaussian_baseline(data["train"], lam, generator=make_generator(1), shrinkage=shrink)
        m, se = mean_and_se(per_image_bpd(gauss, data["test"], seed=3))
        rows.append(
            {
                "logit_lambda": lam,
                "shrinkage": shrink,
                "test_bpd": m,
                "test_bpd_se": se,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_train(data: dict[str, torch.Tensor], cfg: FlowConfig, verbose: bool = True) -> dict[str, object]:
    t0, c0 = time.perf_counter(), time.process_time()

    def on_epoch(epoch: int, m: object) -> None:
        if verbose:
            print(
                f"  epoch {epoch:3d} train {m['train_bpd']:.4f} val {m['val_bpd']:.4f} "
                f"(median {m['val_bpd_median']:.4f}) ({time.perf_counter() - t0:.0f} s)"
            )

    res = train_flow(build_model(cfg), data["train"], data["val"], cfg, on_epoch=on_epoch)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    test, test_se = mean_and_se(per_image_bpd(res.model, data["test"], seed=cfg.seed + 3))
    gauss = gaussian_baseline(
        data["train"], cfg.logit_lambda, generator=make_generator(cfg.seed + 1), shrinkage=cfg.whiten_shrinkage
    )
    base, base_se = mean_and_se(per_image_bpd(gauss, data["test"], seed=cfg.seed + 3))
    last = res.history.rows[res.best_epoch - 1] if res.best_epoch else {}
    return {
        "test_bpd": test,
        "test_bpd_se": test_se,
        "baseline_test_bpd": base,
        "baseline_test_bpd_se": base_se,
        "best_val_bpd": res.best_val_bpd,
        "train_bpd_at_best": last.get("train_bpd", math.nan),
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # all threads; the wall time of an idle 1-thread run
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "baseline", "train", "sweep"])
    ap.add_argument("-s", "--set", action="append", default=[], help="flow key=value override")
    ap.add_argument("--grid", action="append", default=[], help="sweep key=v1,v2,...")
    ap.add_argument("--steps", type=int, default=20, help="timed train steps (speed)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared/fashion_mnist.pt"))
    ap.add_argument("--idx-dir", type=Path, default=Path("../shared/data/fashion-mnist"))
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    data = load_data(args.prepared, args.idx_dir)
    print(
        f"data: train {tuple(data['train'].shape)} val {tuple(data['val'].shape)} test {tuple(data['test'].shape)}; "
        f"torch threads {torch.get_num_threads()}"
    )
    result: object
    if args.mode == "speed":
        result = bench_speed(data, _config(overrides), args.steps)
    elif args.mode == "baseline":
        result = bench_baseline(data, [1e-6, 1e-3, 0.01, 0.05], [0.0, 0.01, 0.02, 0.03])
    elif args.mode == "train":
        result = {**overrides, **bench_train(data, _config(overrides))}
    else:
        grids = [(k, [_parse_value(v) for v in vs.split(",")]) for k, vs in (g.split("=", 1) for g in args.grid)]
        result = []
        for combo in itertools.product(*[vs for _, vs in grids]):
            point = dict(zip([k for k, _ in grids], combo))
            print(f"sweep point {point}")
            row = {**point, **bench_train(data, _config({**overrides, **point}), verbose=False)}
            print("  " + json.dumps(row))
            result.append(row)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
