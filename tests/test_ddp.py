"""DistributedDataParallel helpers and the RealNVP 2D trainer under ``torchrun`` (2 CPU processes, gloo).

The references are computed independently in a single process: the full-batch gradient by
plain autograd, and the single-process training run by the unmodified trainer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from genmodels.configs.realnvp2d import RealNVP2DConfig
from genmodels.distributed import DistInfo, local_loss_weight, shard_bounds, shard_indices, wrap_ddp
from genmodels.flows.realnvp2d import init_model

REPO = Path(__file__).resolve().parents[1]

# Tiny RealNVP: a few ms per step, so 2 processes x a few epochs fit in seconds on a loaded CPU.
TINY = {"n_layers": 4, "n_hidden": 1, "hidden_units": 16, "epochs": 4, "batch_size": 64, "patience": 100, "seed": 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _points(n: int, seed: int) -> torch.Tensor:
    """Two-moons points: far from Gaussian, so every epoch of training improves the NLL and the
    best-validation weights are the last ones (what the equivalence test compares)."""
    from genmodels.data.points2d import get_distribution

    return get_distribution("two_moons").sample(n, torch.Generator().manual_seed(seed)).float()


# --------------------------------------------------------------------------- single-process properties


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (5, 3), (1, 2), (0, 4), (64, 1)])
def test_shard_indices_partition_the_global_batch(n: int, world: int) -> None:
    idx = torch.randperm(max(n, 1))[:n]
    shards = [shard_indices(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shards), idx)  # rank order gives the global batch back
    sizes = [s.numel() for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n,world", [(10, 2), (7, 2), (5, 3), (1, 2), (0, 4), (64, 1), (31, 2), (15, 4)])
def test_shard_bounds_are_the_shard_indices_cut(n: int, world: int) -> None:
    idx = torch.arange(n)
    for r in range(world):
        start, stop = shard_bounds(n, r, world)
        assert torch.equal(idx[start:stop], shard_indices(idx, r, world))


def test_shard_indices_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard_indices(torch.arange(4), 2, 2)


def test_local_loss_weight_makes_averaged_shard_gradients_equal_the_global_mean() -> None:
    """Simulate DDP's averaging by hand: mean over ranks of the weighted local gradients."""
    cfg = RealNVP2DConfig(**TINY)
    x = _points(11, 0)  # uneven shards (6 + 5)
    model = init_model(cfg, x)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = torch.autograd.grad(-model.log_prob(x).mean(), params)
    world = 2
    acc = [torch.zeros_like(p) for p in params]
    for r in range(world):
        idx = shard_indices(torch.arange(11), r, world)
        loss = -model.log_prob(x[idx]).sum() * local_loss_weight(11, world)
        for a, g in zip(acc, torch.autograd.grad(loss, params), strict=True):
            a += g / world
    for a, g in zip(acc, ref, strict=True):
        torch.testing.assert_close(a, g, rtol=1e-5, atol=1e-7)


def test_single_process_wrap_is_identity() -> None:
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model, DistInfo(0, 0, 1, torch.device("cpu"), "")) is model


# --------------------------------------------------------------------------- 2 processes, gloo

_GRAD_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from genmodels.configs.realnvp2d import RealNVP2DConfig
    from genmodels.distributed import (MethodAsForward, all_reduce_mean, all_reduce_sum, cleanup,
        init_from_env, local_loss_weight, shard_indices, unwrap, wrap_ddp)
    from genmodels.flows.realnvp2d import init_model

    cfg = RealNVP2DConfig(**json.loads(sys.argv[2]))
    info = init_from_env("cpu")
    assert info.world_size == 2 and info.backend == "gloo"
    s = all_reduce_sum(torch.tensor([float(info.rank + 1)]))
    m = all_reduce_mean(torch.tensor([float(info.rank)]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 2, generator=g) * torch.tensor([2.0, 0.5])
    # Different init seeds per rank: DDP must broadcast rank 0's weights.
    torch.manual_seed(1000 + info.rank)
    flow = init_model(cfg, x) if info.rank == 0 else init_model(RealNVP2DConfig(**{**json.loads(sys.argv[2]), "seed": 99}), x)
    ddp = wrap_ddp(MethodAsForward(flow, "log_prob"), info)
    idx = shard_indices(torch.arange(13), info.rank, info.world_size)
    loss = -ddp(x[idx]).sum() * local_loss_weight(13, info.world_size)
    loss.backward()
    grads = {n: p.grad.tolist() for n, p in unwrap(ddp).module.named_parameters() if p.grad is not None}
    weights = {n: p.detach().tolist() for n, p in flow.named_parameters()}
    with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as fh:
        json.dump({"sum": s.item(), "mean": m.item(), "grads": grads, "weights": weights}, fh)
    cleanup()
    """
)


def test_gloo_two_processes_collectives_and_ddp_gradient(tmp_path: Path) -> None:
    """Across 2 gloo ranks: all-reduce values, broadcast weights, and the DDP gradient of the
    sharded, weighted loss equals the single-process full-batch gradient."""
    script = tmp_path / "worker.py"
    script.write_text(_GRAD_WORKER)
    _torchrun(script, str(tmp_path), json.dumps(TINY))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["sum"] == r1["sum"] == 3.0
    assert r0["mean"] == r1["mean"] == 0.5
    assert r0["weights"] == r1["weights"]  # rank 1's different init was replaced by rank 0's

    cfg = RealNVP2DConfig(**TINY)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 2, generator=g) * torch.tensor([2.0, 0.5])
    flow = init_model(cfg, x)
    (-flow.log_prob(x).mean()).backward()
    ref = {n: p.grad for n, p in flow.named_parameters() if p.grad is not None}
    assert set(ref) == set(r0["grads"]) == set(r1["grads"])
    for n, gref in ref.items():
        for r in (r0, r1):
            torch.testing.assert_close(torch.tensor(r["grads"][n]), gref, rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------- the RealNVP 2D trainer

_TRAIN_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[3])
    from test_ddp import _points
    from genmodels.configs.realnvp2d import RealNVP2DConfig
    from genmodels.distributed import cleanup, init_from_env
    from genmodels.flows.realnvp2d import train_realnvp2d

    torch.set_num_threads(1)
    cfg = RealNVP2DConfig(**json.loads(sys.argv[2]))
    info = init_from_env("cpu")
    res = train_realnvp2d(cfg, _points(1000, 1), _points(200, 2), device="cpu", dist=info)
    torch.save({"state": res.model.state_dict(), "rows": res.history.rows}, f"{sys.argv[1]}/rank{info.rank}.pt")
    cleanup()
    """
)

# float32 all-reduce sums the shard gradients in another order than one backward pass; over
# a few dozen Adam steps that drifts by ~1e-6 relative. 1e-4 on weights/losses is far below
# any real difference (one extra step at lr 1e-3 moves weights by ~1e-3).
DDP_RTOL, DDP_ATOL = 1e-4, 1e-5


def test_realnvp2d_trainer_two_gloo_ranks_match_single_process(tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 (gloo) vs one process, same global batch (1000 points in
    batches of 64, the last one uneven): per-epoch losses and final weights agree."""
    from genmodels.flows.realnvp2d import train_realnvp2d

    script = tmp_path / "train_worker.py"
    script.write_text(_TRAIN_WORKER)
    cfg = {**TINY, "lr": 0.005}
    _torchrun(script, str(tmp_path), json.dumps(cfg), str(Path(__file__).parent))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    ref = train_realnvp2d(RealNVP2DConfig(**cfg), _points(1000, 1), _points(200, 2), device="cpu")
    assert ref.best_epoch == TINY["epochs"]  # so the returned weights are the last epoch's
    ref_state = ref.model.state_dict()
    assert len(r0["rows"]) == len(ref.history.rows) == TINY["epochs"]
    for got, want in zip(r0["rows"], ref.history.rows, strict=True):
        for k in ("train_loss", "val_loss", "lr"):
            assert abs(got[k] - want[k]) <= DDP_ATOL + DDP_RTOL * abs(want[k]), (k, got, want)
    worst = 0.0
    for k, v in ref_state.items():
        torch.testing.assert_close(r0["state"][k], v, rtol=DDP_RTOL, atol=DDP_ATOL, msg=k)
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ranks hold identical weights
        worst = max(worst, float((r0["state"][k] - v).abs().max()))
    print(
        f"DDP (2 gloo ranks) vs single process: max |dweight| = {worst:.3g}, "
        f"final val NLL {r0['rows'][-1]['val_loss']:.6f} vs {ref.history.rows[-1]['val_loss']:.6f}"
    )
    # The training moved the weights far more than the DDP/single-process difference.
    init = init_model(RealNVP2DConfig(**cfg), _points(1000, 1)).state_dict()
    moved = max(float((ref_state[k] - init[k]).abs().max()) for k in ref_state)
    assert moved > 1000 * max(worst, 1e-9), (moved, worst)


@pytest.mark.slow
def test_train_realnvp2d_stage_under_torchrun(dvc_project: Any) -> None:
    """The real stage CLI under torchrun (2 gloo ranks): one MLflow run (rank 0), one set of
    outputs, and the same test NLL as the plain single-process stage within the tolerance."""
    from test_experiments import add_realnvp2d_stage, mlflow_runs

    proj = dvc_project
    add_realnvp2d_stage(proj)
    proj.dvc("repro", "prepare@points2d")
    proj.python("stages/train_realnvp2d.py")
    single = json.loads((proj.root / "metrics/train_realnvp2d.json").read_text())
    for out in ("metrics/train_realnvp2d.json", "models/realnvp2d/model.pt"):
        (proj.root / out).unlink()
    proj.env.update({"OMP_NUM_THREADS": "1"})
    proj.run(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "stages/train_realnvp2d.py",
    )  # fmt: skip
    multi = json.loads((proj.root / "metrics/train_realnvp2d.json").read_text())
    assert (proj.root / "models/realnvp2d/model.pt").is_file()
    assert multi["epochs_run"] == single["epochs_run"]
    assert abs(multi["test_nll"] - single["test_nll"]) <= DDP_ATOL + DDP_RTOL * abs(single["test_nll"])
    runs = mlflow_runs(proj.root / "mlflow.db", "train_realnvp2d")
    assert sorted(r.data.tags.get("world_size") for r in runs) == ["1", "2"]  # rank 1 logged nothing
    assert all(r.info.status == "FINISHED" for r in runs)


# --------------------------------------------------------------------------- DDPM and image flow stages

# Tiny settings for the two stages under torchrun. Odd global batches (93 of 512 points, 101 of
# 700 images) give every step uneven shards (47 + 46, 51 + 50) and a short last batch.
DDP_DDPM = {
    "n_steps": 50,
    "hidden_units": 16,
    "epochs": 3,
    "batch_size": 93,
    "patience": 50,
    "sampling_steps": 10,
    "elbo_points": 64,
    "n_samples": 256,
}
DDP_FLOW = {
    "n_layers": 2,
    "hidden_units": 16,
    "n_hidden": 1,
    "epochs": 3,
    "batch_size": 101,
    "patience": 50,
    "sample_every": 2,
    "n_samples": 16,
    "eval_batch_size": 500,
}
# The EBM: batches of 31 of 193 zeros give uneven shards (16 + 15 images and Langevin chains)
# and a short last batch (7 = 4 + 3); 3 epochs = 21 Adam steps.
DDP_EBM = {
    "hidden": [32],
    "epochs": 3,
    "batch_size": 31,
    "buffer_size": 128,
    "langevin_steps": 5,
    "lr": 1e-3,
    "patience": 50,
    "sample_every": 2,
    "sample_steps": 10,
}
DDP_EBM_SLICE = {"train": 193, "val": 40, "test": 40}
# Tolerance: DDP_RTOL/DDP_ATOL above, for the same reason. The ranks sum shard gradients (and,
# for the DDPM, the importance-sampling statistics) in another float32 order than one backward
# pass does; nothing else differs (same permutation, steps, noise, dequantisation). Measured
# here after 18 (DDPM) / 21 (flow) Adam steps: max |dweight| ~5e-8 (DDPM) and ~2e-6 (flow: its
# coupling MLPs start with zero output layers, so their hidden layers see near-zero gradients
# that Adam normalises, amplifying relative rounding), |dloss| <= 5e-7; that is <= ~15% of the
# tolerance. One Adam step at lr 1e-3 moves a weight by up to 1e-3, so a real difference (a
# missing or doubled step, a mis-sliced batch, other noise) lands far above the tolerance;
# `_compare_runs` also asserts that training moved the weights >= 100x the DDP difference.


@pytest.fixture(scope="module")
def ddp_stage_project(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Any:
    """A project copy (stages, genmodels, tiny params, private MLflow store) with the 2D points,
    the Fashion-MNIST T-shirts and a slice of the MNIST zeros prepared from the real mirror by the
    prepare stage's library calls (in-process: a `prepare` subprocess costs seconds of MLflow
    start-up, each time)."""
    from conftest import DvcProject, copy_project

    from genmodels.configs import load_params
    from genmodels.data.images import prepare_images
    from genmodels.data.points2d import get_distribution, make_splits

    root = tmp_path_factory.mktemp("ddp_stages")
    copy_project(root)
    proj = DvcProject(root)
    # The T-shirts of the official test file split 700/100/200: real images, seconds per epoch.
    raw = proj.write_params(
        {"ddpm": DDP_DDPM, "flow": DDP_FLOW, "ebm": DDP_EBM, "data": {"fashion_mnist": {"split": "test"}}}
    )
    params = load_params(raw)
    out = root / "data" / "prepared"
    out.mkdir(parents=True)
    pc = params.data.points2d
    splits = make_splits(pc.name, pc.n_train, pc.n_val, pc.n_test, pc.seed)
    entropy, entropy_se = get_distribution(pc.name).entropy(n=pc.entropy_samples, seed=pc.seed + 1)
    torch.save(
        {"train": splits.train, "val": splits.val, "test": splits.test, "name": pc.name,
         "true_entropy": entropy, "true_entropy_se": entropy_se},
        out / "points2d.pt",
    )  # fmt: skip
    fm = params.data.fashion_mnist
    prepared = prepare_images(
        "fashion_mnist",
        fm,
        raw_dir=root / "data" / "raw",
        mirror=shared_data,
        seed=params.common.seed,
        log=lambda m: None,
    )
    torch.save(prepared.to_dict(), out / "fashion_mnist.pt")
    # MNIST zeros (split of the official test file), cut to a slice that trains in a second.
    zeros = prepare_images(
        "mnist", params.data.mnist, raw_dir=root / "data" / "raw", mirror=shared_data, seed=params.common.seed,
        log=lambda m: None,
    ).to_dict()  # fmt: skip
    for split, k in DDP_EBM_SLICE.items():
        assert zeros[split].shape[0] >= k
        zeros[split] = zeros[split][:k].clone()
    torch.save(zeros, out / "mnist.pt")
    proj.params = params
    return proj


def _torchrun_stage(proj: Any, script: str) -> tuple[str, str]:
    """``torchrun --nproc_per_node 2`` (gloo) of a stage script in ``proj``; returns the stderr
    of rank 0 and of rank 1 (torchrun's per-rank log files, ``--tee`` keeps them on the console too)."""
    logs = proj.root / "torchrun_logs" / Path(script).stem
    proj.env.update({"OMP_NUM_THREADS": "1"})
    proj.run(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "--log-dir", str(logs), "--tee", "3", script,
    )  # fmt: skip
    per_rank = [sorted(logs.rglob(f"attempt_0/{r}/stderr.log")) for r in (0, 1)]
    assert all(len(p) == 1 for p in per_rank), per_rank
    return per_rank[0][0].read_text(), per_rank[1][0].read_text()


def _assert_one_rank0_run(proj: Any, stage: str) -> Any:
    """Exactly one finished MLflow run of ``stage`` (rank 0's, tagged world_size 2), one logged checkpoint."""
    from test_experiments import mlflow_runs

    runs = mlflow_runs(proj.root / "mlflow.db", stage)
    assert len(runs) == 1, [r.data.tags for r in runs]  # rank 1 opened no run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("world_size") == "2"
    assert len(list((proj.root / "mlartifacts").rglob(f"{run.info.run_id}/**/model.pt"))) == 1
    return run


def _read_csv_rows(path: Path) -> list[dict[str, float]]:
    lines = path.read_text().strip().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, line.split(",")), strict=True)) for line in lines[1:]]


def _compare_runs(
    got_rows: list[dict[str, float]],
    want_rows: list[dict[str, Any]],
    keys: tuple[str, ...],
    got_state: dict[str, torch.Tensor],
    want_state: dict[str, torch.Tensor],
    init_state: dict[str, torch.Tensor],
    label: str,
) -> None:
    """Per-epoch losses and weights within DDP_RTOL/DDP_ATOL; training moved the weights far more."""
    assert len(got_rows) == len(want_rows)
    worst_loss = 0.0
    for got, want in zip(got_rows, want_rows, strict=True):
        assert got["epoch"] == want["epoch"]
        for k in keys:
            assert abs(got[k] - want[k]) <= DDP_ATOL + DDP_RTOL * abs(want[k]), (k, got, want)
            worst_loss = max(worst_loss, abs(got[k] - want[k]))
    assert set(got_state) == set(want_state)
    worst = used = 0.0
    worst_key = ""
    for k, v in want_state.items():
        torch.testing.assert_close(got_state[k], v, rtol=DDP_RTOL, atol=DDP_ATOL, msg=k)
        diff = (got_state[k].double() - v.double()).abs()
        if diff.numel() == 0:
            continue
        if float(diff.max()) > worst:
            worst, worst_key = float(diff.max()), k
        used = max(used, float((diff / (DDP_ATOL + DDP_RTOL * v.double().abs())).max()))
    moved = max(float((want_state[k].double() - init_state[k].double()).abs().max()) for k in want_state)
    print(f"{label}: DDP (2 gloo ranks) vs single process: max |dweight| {worst:.3g} in {worst_key} ({used:.1%} of the tolerance), "
          f"max |dloss| {worst_loss:.3g}; training moved weights by up to {moved:.3g}")  # fmt: skip
    assert moved > 100 * max(worst, 1e-9), (moved, worst)


def test_train_ddpm_stage_under_torchrun_matches_single_process(ddp_stage_project: Any) -> None:
    """`torchrun --nproc_per_node 2 stages/train_ddpm.py` (gloo): rank 0 alone logs and writes,
    and its checkpoint and per-epoch losses equal a single-process training with the same global
    batch (the unmodified trainer, in this process) within DDP_RTOL/DDP_ATOL."""
    from genmodels.diffusion import load_trained
    from genmodels.diffusion.model import build_model, reset_parameters
    from genmodels.diffusion.train import config_dict, train_ddpm
    from genmodels.training import make_generator

    proj = ddp_stage_project
    rank0, rank1 = _torchrun_stage(proj, "stages/train_ddpm.py")
    assert rank0.count("[train_ddpm] epoch ") == DDP_DDPM["epochs"] and rank0.count("[train_ddpm] done") == 1
    assert "epoch" not in rank1 and "done" not in rank1 and "MLflow" not in rank1  # rank 1 trained silently
    _assert_one_rank0_run(proj, "train_ddpm")
    assert not (proj.root / ".resume" / "train_ddpm.pt").exists()  # rank 0 removed the one resume file

    cfg = proj.params.ddpm
    data = torch.load(proj.root / "data/prepared/points2d.pt", weights_only=True)
    ref = train_ddpm(cfg, data["train"], data["val"], device="cpu")
    model, _ = load_trained(proj.root / "models/ddpm/model.pt", "cpu")
    metrics = json.loads((proj.root / "metrics/train_ddpm.json").read_text())
    assert metrics["best_epoch"] == ref.best_epoch and metrics["epochs_run"] == ref.epochs_run == DDP_DDPM["epochs"]
    init = build_model(config_dict(cfg))
    reset_parameters(init.net, make_generator(cfg.seed, "cpu"))
    _compare_runs(
        _read_csv_rows(proj.root / "plots/ddpm/train.csv"), ref.history.rows, ("train_loss", "val_loss", "lr"),
        model.state_dict(), ref.model.state_dict(), init.state_dict(), "DDPM",
    )  # fmt: skip


def test_train_flow_stage_under_torchrun_matches_single_process(ddp_stage_project: Any) -> None:
    """`torchrun --nproc_per_node 2 stages/train_flow.py` (gloo) on real Fashion-MNIST T-shirts:
    rank 0 alone logs and writes, and its checkpoint and per-epoch bpds equal a single-process
    training with the same global batch within DDP_RTOL/DDP_ATOL."""
    from genmodels.data.images import load_prepared
    from genmodels.flows.image import dequantize
    from genmodels.flows.imageflow import build_model, load_trained, train_flow
    from genmodels.training import make_generator

    proj = ddp_stage_project
    rank0, rank1 = _torchrun_stage(proj, "stages/train_flow.py")
    assert rank0.count("[train_flow] epoch ") == DDP_FLOW["epochs"] and rank0.count("[train_flow] test bpd") == 1
    assert "epoch" not in rank1 and "test bpd" not in rank1 and "MLflow" not in rank1
    run = _assert_one_rank0_run(proj, "train_flow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{proj.root / 'mlflow.db'}")
    figures = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures"))
    # each sample grid once (rank 0's on_samples), none from rank 1
    assert figures == ["bpd.png", "samples.png", "samples_epoch_0002.png", "samples_epoch_0003.png", "samples_t1.png"]
    assert not (proj.root / ".resume" / "train_flow.pt").exists()

    cfg = proj.params.flow
    data = load_prepared(proj.root / "data/prepared/fashion_mnist.pt")
    ref = train_flow(build_model(cfg), data["train"], data["val"], cfg, device="cpu")
    model, _ = load_trained(proj.root / "models/flow/model.pt", "cpu")
    metrics = json.loads((proj.root / "metrics/train_flow.json").read_text())
    assert metrics["best_epoch"] == ref.best_epoch and metrics["epochs_run"] == ref.epochs_run == DDP_FLOW["epochs"]
    # The weights training starts from: built, then data-initialised as the trainer does it.
    init = build_model(cfg)
    init.initialize(dequantize(data["train"], make_generator(cfg.seed + 1)), shrinkage=cfg.whiten_shrinkage)
    _compare_runs(
        _read_csv_rows(proj.root / "plots/flow/train.csv"), ref.history.rows,
        ("train_loss", "val_loss", "val_bpd_median", "lr"),
        model.state_dict(), ref.model.state_dict(), init.state_dict(), "image flow",
    )  # fmt: skip


# --------------------------------------------------------------------------- the EBM (replay buffer, Langevin)

_EBM_WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_ddp import _ebm_cases
    from genmodels.distributed import cleanup, init_from_env
    from genmodels.ebm import train_ebm

    torch.set_num_threads(1)
    info = init_from_env("cpu")
    out = {}
    for name, (cfg, train, val, resume) in _ebm_cases(sys.argv[1]).items():
        called = []
        res = train_ebm(
            cfg, train, val, device="cpu", dist=info, resume_path=resume,
            on_epoch=lambda e, m: called.append(("epoch", e)), on_samples=lambda e, s: called.append(("samples", e)),
            on_rollback=lambda ev: called.append(("rollback", ev.epoch)),
        )
        out[name] = {"checkpoint": res.checkpoint, "rows": res.history.rows, "called": called}
    torch.save(out, f"{sys.argv[1]}/ebm_rank{info.rank}.pt")
    cleanup()
    """
)


def _ebm_cases(folder: str) -> dict[str, tuple[Any, torch.Tensor, torch.Tensor, Path | None]]:
    """The EBM trainings compared under torchrun: an even split (batch 32: 16 + 16, EMA and lr
    decay) with a last batch of one image (1 + 0: rank 1 moves no chain and still takes part),
    a divergence rolled back (batch 15: uneven 8 + 7 and a last batch of 3 = 2 + 1), and a run
    resumed on both ranks from a single-process resume file (``<folder>/ebm_resume.pt``)."""
    import dataclasses

    from test_ebm_train import TINY, rings

    even = dataclasses.replace(TINY, batch_size=32, buffer_size=96, lr_decay=0.9)
    return {
        "even": (even, rings(97, 0), rings(16, 1), None),
        "rollback": (
            dataclasses.replace(TINY, batch_size=15, lr=10.0, max_energy=50.0, rollback_lr_factor=1e-4, max_rollbacks=2),
            rings(48, 0), rings(16, 1), None,
        ),
        "resumed": (even, rings(97, 0), rings(16, 1), Path(folder) / "ebm_resume.pt"),
    }  # fmt: skip


def _ebm_compare(got: dict[str, Any], want: dict[str, Any], label: str) -> str:
    """Weights (best, final, final average), buffer chains and per-epoch series within
    DDP_RTOL/DDP_ATOL, random streams equal; returns the largest differences as a line."""
    keys = ("train_loss", "val_loss", "cd_loss", "reg_loss", "energy_real", "energy_fake", "val_energy_real",
            "val_energy_fake", "max_abs_energy", "lr", "rollbacks")  # fmt: skip
    # what -> [max |diff|, where, largest share of the tolerance, where]
    worst: dict[str, list[Any]] = {}

    def note(what: str, where: str, got_t: torch.Tensor, want_t: torch.Tensor) -> None:
        diff = (got_t.double() - want_t.double()).abs()
        share = float((diff / (DDP_ATOL + DDP_RTOL * want_t.double().abs())).max())
        w = worst.setdefault(what, [-1.0, "", -1.0, ""])
        if float(diff.max()) > w[0]:
            w[0:2] = [float(diff.max()), where]
        if share > w[2]:
            w[2:4] = [share, where]

    assert len(got["rows"]) == len(want["rows"]), label
    for g_row, w_row in zip(got["rows"], want["rows"], strict=True):
        assert g_row["epoch"] == w_row["epoch"], label
        for k in keys:
            assert abs(g_row[k] - w_row[k]) <= DDP_ATOL + DDP_RTOL * abs(w_row[k]), (label, k, g_row, w_row)
            note("series", k, torch.tensor(g_row[k]), torch.tensor(w_row[k]))
    for part in ("model", "final_model", "final_eval_model"):
        for k, v in want[part].items():
            torch.testing.assert_close(got[part][k], v, rtol=DDP_RTOL, atol=DDP_ATOL, msg=f"{label} {part} {k}")
            note("weight", f"{part}.{k}", got[part][k], v)
    chains, ref_chains = got["buffer"]["examples"], want["buffer"]["examples"]
    torch.testing.assert_close(chains, ref_chains, rtol=DDP_RTOL, atol=DDP_ATOL, msg=f"{label} buffer")
    note("buffer", "chains", chains, ref_chains)
    # Every random stream advanced exactly as in one process (no extra or missing draws).
    assert torch.equal(got["buffer"]["generator"], want["buffer"]["generator"]), label
    assert torch.equal(got["g_data"], want["g_data"]) and torch.equal(got["g_langevin"], want["g_langevin"]), label
    same = ("best_epoch", "epochs_run", "rollbacks")
    assert [got[k] for k in same] == [want[k] for k in same], label
    return f"EBM {label}: DDP (2 gloo ranks) vs single process: " + ", ".join(
        f"max |d{what}| {d:.3g} ({d_at}; at most {share:.1%} of the tolerance, {share_at})"
        for what, (d, d_at, share, share_at) in worst.items()
    )


def test_ebm_trainer_two_gloo_ranks_match_single_process(tmp_path: Path) -> None:
    """train_ebm on 2 gloo ranks vs one process, same global batch: best and final weights, the
    replay buffer, the per-epoch series and the generator states agree (DDP_RTOL/DDP_ATOL); a
    divergence is rolled back on both ranks alike, a resume file is read by both ranks, the
    ranks hold identical weights and buffers, and rank 1 calls no callback."""
    from genmodels.ebm import train_ebm
    from genmodels.ebm.trainer import RESUME_KIND

    cases = _ebm_cases(str(tmp_path))
    cfg, train, val, resume = cases["resumed"]
    assert resume is not None

    class Interrupted(Exception):
        pass

    def stop_after_1(epoch: int, metrics: object) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        train_ebm(cfg, train, val, resume_path=resume, on_epoch=stop_after_1)
    assert torch.load(resume, weights_only=True)["epoch"] == 1

    script = tmp_path / "ebm_worker.py"
    script.write_text(_EBM_WORKER)
    _torchrun(script, str(tmp_path), str(Path(__file__).parent))
    r0 = torch.load(tmp_path / "ebm_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ebm_rank1.pt", weights_only=True)

    for name, (cfg, train, val, _) in cases.items():
        ref = train_ebm(cfg, train, val)  # uninterrupted (a resumed run is byte-identical to it)
        got = {**r0[name]["checkpoint"], "rows": r0[name]["rows"]}
        line = _ebm_compare(got, {**ref.checkpoint, "rows": ref.history.rows}, name)
        # The ranks hold the same state bit for bit (all-reduced gradients, gathered chains).
        for part in ("final_model", "final_eval_model", "model"):
            for k, v in got[part].items():
                assert torch.equal(v, r1[name]["checkpoint"][part][k]), (name, part, k)
        assert torch.equal(got["buffer"]["examples"], r1[name]["checkpoint"]["buffer"]["examples"]), name
        assert r1[name]["called"] == [], name  # callbacks are rank 0's
        first = 2 if name == "resumed" else 1  # the resumed run continues after the file's epoch 1
        epochs_called = [c for c in r0[name]["called"] if c[0] == "epoch"]
        assert epochs_called == [("epoch", e) for e in range(first, cfg.epochs + 1)], name
        print(line)
    assert [c for c in r0["rollback"]["called"] if c[0] == "rollback"] == [("rollback", 1)]
    # Rank 0 alone kept writing the resume file: it holds rank 0's final state.
    snap = torch.load(resume, weights_only=True)
    assert snap["kind"] == RESUME_KIND and snap["epoch"] == cfg.epochs
    assert all(torch.equal(snap["model"][k], v) for k, v in r0["resumed"]["checkpoint"]["final_model"].items())


def test_train_ebm_stage_under_torchrun_matches_single_process(ddp_stage_project: Any) -> None:
    """`torchrun --nproc_per_node 2 stages/train_ebm.py` (gloo) on real MNIST zeros, batch 31
    (uneven shards, a short last batch): rank 0 alone logs and writes, and its checkpoint (best
    and final weights, replay buffer) and per-epoch series equal a single-process training with
    the same global batch within DDP_RTOL/DDP_ATOL."""
    from mlflow.tracking import MlflowClient

    from genmodels.data.images import load_prepared
    from genmodels.ebm import build_model, train_ebm
    from genmodels.ebm.trainer import _init_weights
    from genmodels.training import make_generator

    proj = ddp_stage_project
    rank0, rank1 = _torchrun_stage(proj, "stages/train_ebm.py")
    assert rank0.count("[train_ebm] epoch ") == DDP_EBM["epochs"] and rank0.count("[train_ebm] done") == 1
    assert "epoch" not in rank1 and "done" not in rank1 and "MLflow" not in rank1  # rank 1 trained silently
    run = _assert_one_rank0_run(proj, "train_ebm")
    client = MlflowClient(tracking_uri=f"sqlite:///{proj.root / 'mlflow.db'}")
    figures = sorted(Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures"))
    # each buffer grid once (rank 0's on_samples), none from rank 1
    assert figures == ["buffer_epoch_0002.png", "buffer_epoch_0003.png", "samples.png", "train_curves.png"]
    assert sorted(p.name for p in (proj.root / "plots/ebm/buffer").iterdir()) == ["epoch_0002.png", "epoch_0003.png"]
    assert not (proj.root / ".resume" / "train_ebm.pt").exists()  # rank 0 removed the one resume file

    cfg = proj.params.ebm
    data = load_prepared(proj.root / "data/prepared/mnist.pt")
    assert data["train"].shape[0] == DDP_EBM_SLICE["train"]
    ref = train_ebm(cfg, data["train"], data["val"], device="cpu")
    ckpt = torch.load(proj.root / "models/ebm/model.pt", weights_only=True)
    metrics = json.loads((proj.root / "metrics/train_ebm.json").read_text())
    assert metrics["best_epoch"] == ref.best_epoch and metrics["epochs_run"] == ref.epochs_run == DDP_EBM["epochs"]
    rows = _read_csv_rows(proj.root / "plots/ebm/train.csv")
    print(_ebm_compare({**ckpt, "rows": rows}, {**ref.checkpoint, "rows": ref.history.rows}, "stage"))
    init = build_model(ckpt["config"])
    _init_weights(init, make_generator(cfg.seed, "cpu"))
    _compare_runs(
        rows, ref.history.rows, ("train_loss", "val_loss", "energy_real", "energy_fake"),
        ckpt["final_model"], ref.checkpoint["final_model"], init.state_dict(), "EBM (final weights)",
    )  # fmt: skip
