"""DDPM 2D speed at the defaults: training steps/s, full-ELBO time, sampling points/s
(full chain and strided), side by side with a loop over diffusers' ``DDPMScheduler.step``
driving the same network.

Usage:

    python benchmarks/bench_ddpm.py [--n-samples 16384] [--train-steps 30] [--elbo-points 1024]
        [--threads 0] [--skip-peer]

The peer (``diffusers``, benchmark-only, pinned in requirements-bench.txt) gets the same
schedule (``trained_betas`` = our beta^2, ``variance_type='fixed_large'`` = our ``beta2``
reverse variance, epsilon prediction) and the same eps-parameterised network; both loops
run under ``torch.inference_mode``. Times are wall-clock medians of ``--repeats`` runs.

Our full chain runs at the default ``sampling_precision: auto`` (bfloat16 network on a CPU
with AMX, float32 elsewhere) and, for comparison, with ``float32``; the peer runs the float32
network as given and, for comparison, under ``torch.autocast`` to bfloat16 (what a user of the
peer could switch on). ``--precision`` sets what "ours" runs at.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.configs.base import from_mapping  # noqa: E402
from genmodels.configs.ddpm import DDPMConfig  # noqa: E402
from genmodels.data.points2d import make_splits  # noqa: E402
from genmodels.diffusion import (  # noqa: E402
    build_model,
    config_dict,
    nll_bound,
    reset_parameters,
    sample,
    sampling_dtype,
    train_ddpm,
)
from genmodels.diffusion.elbo import elbo_estimate  # noqa: E402
from genmodels.training import configure_torch, make_generator  # noqa: E402


def _median_time(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(cfg: DDPMConfig, steps: int, device: torch.device) -> float:
    """Optimiser steps/s on batches of ``cfg.batch_size`` (the trainer's inner loop)."""
    model = build_model(config_dict(cfg)).to(device)
    reset_parameters(model.net, make_generator(0))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # as the trainer
    g = make_generator(0, device)
    data = torch.randn(cfg.batch_size * 4, 2, generator=g, device=device)

    def run(n: int) -> None:
        for i in range(n):
            x = data[(i % 4) * cfg.batch_size : (i % 4 + 1) * cfg.batch_size]
            t = torch.randint(1, cfg.n_steps + 1, (x.shape[0],), generator=g, device=device)
            noise = torch.randn(x.shape, generator=g, device=device)
            loss = elbo_estimate(model, x, t, noise).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(3)  # warm-up
    t0 = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - t0)


def peer_diffusers(model, n: int, seed: int, autocast: bool = False) -> torch.Tensor:  # noqa: ANN001
    """Full-chain sampling with diffusers' DDPMScheduler.step and the same (eps) network
    (``autocast``: the network's calls under ``torch.autocast`` to bfloat16)."""
    from diffusers import DDPMScheduler

    s = model.schedule
    sched = DDPMScheduler(
        num_train_timesteps=s.n_steps,
        trained_betas=s.beta2[1:].double().cpu().numpy(),
        variance_type="fixed_large",
        prediction_type="epsilon",
        clip_sample=False,
    )
    dev = model.shift.device
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(n, 2, generator=g, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        for t in sched.timesteps:  # diffusers' step t (0-based) is our step t + 1
            eps = model.net(x, (t + 1).reshape(1).to(dev)).float()
            x = sched.step(eps, t, x, generator=g).prev_sample
    return model.unstandardize(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=16384)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--elbo-points", type=int, default=1024, help="full ELBO on this many points (x L steps)")
    ap.add_argument("--strided", type=int, nargs="*", default=[100, 250, 500])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="ours (default: auto)")
    args = ap.parse_args()
    # As every stage does (configure_torch): thread count and the tuned CPU allocator, which
    # both samplers share in this one process.
    configure_torch(args.threads, deterministic=False)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = DDPMConfig()
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}; defaults: L={cfg.n_steps}, "
          f"hidden {cfg.hidden_units} x {cfg.n_hidden}, batch {cfg.batch_size}")

    sps = bench_train(cfg, args.train_steps, dev)
    epoch_s = (65536 / cfg.batch_size) / sps
    print(f"train: {sps:.1f} steps/s ({epoch_s:.2f} s per epoch of 65,536 points)")

    # A briefly trained eps network (20 epochs on 16,384 two_moons points, seconds): with random
    # weights the eps chain diverges (|x| ~ 1e6 by t = 1) and its activations underflow to
    # denormals: the last 500 steps took 336.6 ms each against 9.1 ms for the first 500 (16,384
    # points), and the timings measured denormal arithmetic.
    # Trained, every x_t stays within a few units, as in real use.
    sp = make_splits("two_moons", 65536, 8192, 16384, 0)
    eps_cfg = from_mapping(DDPMConfig, {**config_dict(cfg), "parameterization": "eps", "epochs": 20}, "ddpm")
    model = train_ddpm(eps_cfg, sp.train[:16384], sp.val[:2048], device=dev).model.eval()
    x = torch.randn(args.elbo_points, 2, generator=make_generator(2)).to(dev)
    el = _median_time(lambda: nll_bound(model, x, generator=make_generator(3, dev)), args.repeats)
    print(f"full ELBO ({cfg.n_steps} terms/point): {el:.2f} s for {args.elbo_points} points "
          f"-> {el * 16384 / args.elbo_points:.1f} s for 16,384 points")

    n = args.n_samples
    prec = args.precision
    dtype = str(sampling_dtype(prec, dev)).removeprefix("torch.")
    print(f"ours: sampling_precision {prec} -> network in {dtype} on {dev.type}")
    for S in args.strided:
        st = _median_time(
            lambda S=S: sample(model, n, sampling_steps=S, generator=make_generator(5, dev), precision=prec), args.repeats
        )
        print(f"sampling, strided {S} steps, ours: {n / st:,.0f} points/s ({st:.3f} s for {n})")
    jobs = {f"ours ({dtype})": lambda: sample(model, n, generator=make_generator(4, dev), precision=prec)}
    if dtype != "float32":
        jobs["ours (float32)"] = lambda: sample(model, n, generator=make_generator(4, dev), precision="float32")
    if not args.skip_peer:
        import diffusers

        peer = f"diffusers {diffusers.__version__} DDPMScheduler.step loop"
        jobs[peer] = lambda: peer_diffusers(model, n, 4)
        jobs[f"{peer}, autocast bfloat16"] = lambda: peer_diffusers(model, n, 4, autocast=True)
    # Full chains timed round-robin (ours, peer, ours, peer, ...): a change of machine load
    # during the run hits both alike; each figure is the median of --repeats runs.
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(max(args.repeats, 1)):
        for name, fn in jobs.items():
            times[name].append(_median_time(fn, 1))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        runs = ", ".join(f"{v:.2f}" for v in times[name])
        print(f"sampling, full chain ({cfg.n_steps} steps), {name}: {n / t:,.0f} points/s ({t:.2f} s for {n}; runs {runs})")
    if not args.skip_peer:
        ours = med[f"ours ({dtype})"]
        print(f"  -> ours ({dtype}) / peer (float32, as given) = {med[peer] / ours:.2f}x")
        if "ours (float32)" in med:
            print(f"  -> ours (float32) / peer (float32) = {med[peer] / med['ours (float32)']:.2f}x")
        print(f"  -> ours ({dtype}) / peer under autocast bfloat16 = {med[peer + ', autocast bfloat16'] / ours:.2f}x")
        # The same chain from the same seed: both draw x_L, then one (n, 2) noise per step for
        # t >= 2, so with the same network they must give the same points up to float rounding
        # (float32 against float32), or up to the 16-bit network's rounding.
        b = peer_diffusers(model, 4096, 6)
        for p in dict.fromkeys([prec, "float32"]):
            a = sample(model, 4096, generator=make_generator(6, dev), precision=p)
            rel = float((a - b).abs().max() / a.std())
            print(f"  check, same seed: max |ours ({p}) - peer (float32)| = {rel:.2e} x the samples' std")

if __name__ == "__main__":
    main()
