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
    g = torch.Generator().manual_seed(seed)
    # An anisotropic, shifted Gaussian blob: the flow has something to learn.
    return torch.randn(n, 2, generator=g) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])


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
