"""RealNVP 2D speed, side by side with normflows' RealNVP on the same configuration.

Usage::

    python benchmarks/bench_realnvp2d.py [--device auto] [--steps 30] [--repeats 3]

Both models: 14 affine couplings alternating which coordinate is transformed, each
conditioner an MLP 1 -> 128 -> 128 -> 2 (ReLU, zero-initialised output layer, one net giving
shift and log-scale), standard normal base, Adam 1e-3, batch 2048, float32. The peer is
normflows' ``AffineCouplingBlock`` + ``Permute(swap)`` stack trained with ``forward_kld``
(its README's RealNVP recipe). It is a benchmark-only dependency (``requirements-bench.txt``).
Our training step is the trainer's (fused Adam, gradient clipping, weight average); the peer
runs ``torch.optim.Adam`` as given (on the CPU a loop over its parameter tensors) and, in a
third row, with the fused kernel ours uses, so the speed-up without the optimiser's share
is printed too.

Printed figures (median of ``--repeats`` timed runs after a warm-up):

* training steps/s (shuffled minibatches drawn from 65,536 points held on the device),
* log_prob evaluation time of 16,384 test points,
* sampling points/s (65,536 points per call).

Training steps are timed over whole chunks with one synchronisation at the end, so the
figure includes everything a real epoch does except the per-epoch validation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from genmodels.configs.realnvp2d import RealNVP2DConfig
from genmodels.flows.realnvp2d import init_model
from genmodels.training import configure_torch, make_generator, resolve_device, update_average

N_TRAIN, N_TEST, N_SAMPLE = 65536, 16384, 65536


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (warm-up is the caller's)."""
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_steps(  # noqa: ANN202
    loss_fn: Callable[[Tensor], Tensor],
    params,  # noqa: ANN001
    x: Tensor,
    batch: int,
    steps: int,
    seed: int,
    *,
    grad_clip: float = 0.0,
    ema_decay: float = 0.0,
    fused: bool = False,
):
    """A closure running ``steps`` Adam steps; ``grad_clip`` / ``ema_decay`` add what the
    realnvp2d trainer does per step with those params (clip the global norm, update the EMA);
    ``fused``: Adam's fused kernel, as the trainer uses it (torch's default on the CPU is a loop
    over the parameter tensors)."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=1e-3, fused=fused)
    gen = make_generator(seed, x.device)
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else []

    def run() -> None:
        done = 0
        total = torch.zeros((), device=x.device)
        while done < steps:
            perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
            for idx in perm.split(batch):
                if done == steps:
                    break
                loss = loss_fn(x.index_select(0, idx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
                opt.step()
                if ema:
                    update_average(ema, params, ema_decay, done)
                total += loss.detach()
                done += 1
        if not torch.isfinite(total):
            raise RuntimeError("benchmark training diverged")

    return run


def build_normflows(cfg: RealNVP2DConfig) -> nn.Module:
    import normflows as nf

    flows = []
    for _ in range(cfg.n_layers):
        param_map = nf.nets.MLP([1] + [cfg.hidden_units] * cfg.n_hidden + [2], init_zeros=True)
        flows.append(nf.flows.AffineCouplingBlock(param_map))
        flows.append(nf.flows.Permute(2, mode="swap"))
    base = nf.distributions.base.DiagGaussian(2, trainable=False)
    return nf.NormalizingFlow(base, flows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peer", action="store_true", help="only time genmodels (no normflows installed)")
    args = ap.parse_args()

    configure_torch(0, deterministic=False)  # the stages' allocator settings, for both sides
    device = resolve_device(args.device)
    cfg = RealNVP2DConfig()
    g = torch.Generator().manual_seed(0)
    x_train = (torch.randn(N_TRAIN, 2, generator=g) * torch.tensor([2.0, 0.5])).to(device)
    x_test = (torch.randn(N_TEST, 2, generator=g) * torch.tensor([2.0, 0.5])).to(device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"layers={cfg.n_layers} net={cfg.n_hidden}x{cfg.hidden_units} batch={cfg.batch_size}"
    )

    # Both implementations' jobs are timed round-robin (A, B, A, B, ...) so that a change in
    # machine load during the run hits both alike; each figure is the median over repeats.
    jobs: dict[str, dict[str, Callable[[], object]]] = {}
    ours = init_model(cfg, x_train.cpu()).to(device)
    sg = make_generator(0, device)
    jobs["genmodels"] = {
        # with the defaults' gradient clipping and weight average, as the trainer runs a step
        "train": _train_steps(
            lambda xb: -ours.log_prob(xb).mean(),
            ours.parameters(),
            x_train,
            cfg.batch_size,
            args.steps,
            1,
            grad_clip=cfg.grad_clip,
            ema_decay=cfg.ema_decay,
            fused=True,
        ),
        "log_prob": lambda: ours.log_prob(x_test),
        "sample": lambda: ours.sample(N_SAMPLE, generator=sg),
    }
    if not args.skip_peer:
        import normflows as nf

        torch.manual_seed(0)
        peer = build_normflows(cfg).to(device)
        jobs[f"normflows {nf.__version__}"] = {
            "train": _train_steps(peer.forward_kld, peer.parameters(), x_train, cfg.batch_size, args.steps, 1),
            "log_prob": lambda: peer.log_prob(x_test),
            "sample": lambda: peer.sample(N_SAMPLE),
        }
        # the peer's training step with the optimiser kernel ours uses, for a like-for-like figure
        jobs[f"normflows {nf.__version__}, fused Adam"] = {
            "train": _train_steps(peer.forward_kld, peer.parameters(), x_train, cfg.batch_size, args.steps, 1, fused=True),
        }
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in j} for n, j in jobs.items()}
    for what in ("train", "log_prob", "sample"):
        grad = torch.enable_grad() if what == "train" else torch.no_grad()
        with grad:
            timed = [name for name in jobs if what in jobs[name]]
            for name in timed:
                jobs[name][what]()  # warm-up
            for _ in range(args.repeats):
                for name in timed:
                    times[name][what].append(_timeit(jobs[name][what], device, 1))
    nan = float("nan")
    results = {
        name: {
            "steps_s": args.steps / statistics.median(t["train"]),
            "logprob_ms": statistics.median(t["log_prob"]) * 1e3 if t.get("log_prob") else nan,
            "sample_pts_s": N_SAMPLE / statistics.median(t["sample"]) if t.get("sample") else nan,
        }
        for name, t in times.items()
    }

    print(f"{'implementation':<32}{'train steps/s':>15}{'log_prob 16k (ms)':>20}{'sample pts/s':>15}")
    for name, r in results.items():
        print(f"{name:<32}{r['steps_s']:>15.2f}{r['logprob_ms']:>20.1f}{r['sample_pts_s']:>15.0f}")
    if len(results) >= 2:
        a, b, *rest = results.values()
        print(
            f"ratio genmodels/peer: train {a['steps_s'] / b['steps_s']:.2f}x, "
            f"log_prob {b['logprob_ms'] / a['logprob_ms']:.2f}x, sampling {a['sample_pts_s'] / b['sample_pts_s']:.2f}x"
        )
        for c in rest:
            print(f"ratio genmodels/peer with fused Adam: train {a['steps_s'] / c['steps_s']:.2f}x")


if __name__ == "__main__":
    main()
