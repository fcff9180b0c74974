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
from genmodels.distributed import DistInfo, local_loss_weight, shard_indices, wrap_ddp
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
