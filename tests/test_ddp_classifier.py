"""The `train_classifier` stage (the FID's CNN) under ``torchrun`` (2 CPU processes, gloo).

The real stage script runs under ``python -m torch.distributed.run --nproc_per_node 2`` on a
few hundred real MNIST images; the reference is the unmodified single-process trainer on the
same data and global batch, in this process.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

# 301 training images (the seeded subset of MNIST's 8,000) in global batches of 75: every full
# batch splits 38 + 37 over the two ranks and the last batch holds one image, so rank 1's last
# shard is empty (it still takes part in DDP's all-reduce with zero gradients). Tiny widths keep
# each step at a few ms; the 2,000 held-out test images are evaluated once, by rank 0.
TINY_CLF = {"channels": [4, 8], "feature_dim": 8, "epochs": 2, "batch_size": 75, "max_train": 301, "lr": 0.002}

# Tolerance, as in tests/test_ddp.py: the ranks' shard gradients are summed by gloo's all-reduce
# in another float32 order than one backward pass over the global batch (and each rank's conv
# runs on a smaller batch); nothing else differs (same subset, permutation, initial weights; the
# CNN has no BatchNorm, dropout or augmentation, so nothing is per-rank or per-batch random).
# Adam normalises the gradients, so relative rounding of small gradient components turns into
# absolute weight differences of order lr * 1e-6 per step. Measured here after 10 Adam steps:
# max |dweight| and |dloss| ~1e-7, a few % of the tolerance. One Adam step at lr 2e-3 moves weights
# by up to 2e-3, so a real difference (a missing or doubled step, a mis-sliced or mis-weighted
# batch) lands far above it; the test also asserts that training moved the weights >= 100x the
# DDP difference.
DDP_RTOL, DDP_ATOL = 1e-4, 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mnist_split(shared_data: Path, fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """The stage's MNIST data with ``split: test``, rebuilt from the library: a seeded split of the test file."""
    from genmodels.data.idx import as_tensor, locate
    from genmodels.metrics.classifier import seeded_split

    def get(key: str) -> torch.Tensor:
        found = locate("mnist", key, raw_dir=Path("/nonexistent"), mirror=shared_data, allow_download=False)
        return as_tensor(found.array)

    return seeded_split(get("test-images"), get("test-labels").long(), fraction, seed)


def _csv_rows(path: Path) -> list[dict[str, float]]:
    lines = path.read_text().strip().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, line.split(",")), strict=True)) for line in lines[1:]]


def test_train_classifier_stage_under_torchrun_matches_single_process(tmp_path: Path, shared_data: Path) -> None:
    """`torchrun --nproc_per_node 2 stages/train_classifier.py mnist` (gloo): one MLflow run (rank
    0's, tagged world_size 2), rank 1 silent, one set of outputs; the checkpoint's weights and
    the per-epoch losses equal a single-process training of the same global batch within
    DDP_RTOL/DDP_ATOL."""
    from conftest import DvcProject
    from test_experiments import mlflow_runs

    from genmodels.configs import load_params
    from genmodels.metrics.classifier import load_classifier, train_classifier

    proj = DvcProject(tmp_path)  # only its environment and params writer: no git/DVC needed here
    params = load_params(proj.write_params({"classifier": TINY_CLF}))
    proj.env.pop("DVC_ROOT", None)  # the MLflow store is then <tmp_path>/mlflow.db
    proj.env.update({"OMP_NUM_THREADS": "1"})
    logs = tmp_path / "torchrun_logs"
    t0 = time.perf_counter()
    proj.run(
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "--log-dir", str(logs), "--tee", "3",
        str(REPO / "stages" / "train_classifier.py"), "mnist", "--raw-dir", str(tmp_path / "raw"),
    )  # fmt: skip
    torchrun_s = time.perf_counter() - t0
    rank0, rank1 = (sorted(logs.rglob(f"attempt_0/{r}/stderr.log")) for r in (0, 1))
    assert len(rank0) == len(rank1) == 1, (rank0, rank1)
    rank0_err, rank1_err = rank0[0].read_text(), rank1[0].read_text()
    assert rank0_err.count("[train_classifier@mnist] epoch ") == TINY_CLF["epochs"]
    assert rank0_err.count("[train_classifier@mnist] test accuracy") == 1
    assert "train_classifier" not in rank1_err and "MLflow" not in rank1_err  # rank 1 trained silently

    # One set of outputs, nothing else (no per-rank files, no downloads into --raw-dir).
    written = sorted(
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_relative_to(logs) and p.parts[len(tmp_path.parts)] not in ("mlartifacts", ".locks")
    )
    assert written == [
        "metrics/classifier_mnist.json",
        "mlflow.db",
        "models/classifier/mnist.pt",
        "params.yaml",
        "plots/classifier/mnist.csv",
    ], written
    runs = mlflow_runs(tmp_path / "mlflow.db", "train_classifier@mnist")
    assert len(runs) == 1, [r.data.tags for r in runs]  # rank 1 opened no run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("world_size") == "2"
    assert len(list((tmp_path / "mlartifacts").rglob(f"{run.info.run_id}/**/mnist.pt"))) == 1

    # The single-process reference: the unmodified trainer on the same data and global batch.
    clf = params.classifier
    train_x, train_y, test_x, test_y = _mnist_split(shared_data, clf.mnist_test_fraction, clf.seed)
    kwargs: dict[str, Any] = {
        "batch_size": clf.batch_size,
        "lr": clf.lr,
        "channels": tuple(clf.channels),
        "feature_dim": clf.feature_dim,
        "max_train": clf.max_train,
        "seed": clf.seed,
    }
    ref = train_classifier(train_x, train_y, test_x, test_y, epochs=clf.epochs, **kwargs)
    init = train_classifier(train_x, train_y, test_x[:1], test_y[:1], epochs=0, **kwargs).model.state_dict()
    model, info = load_classifier(tmp_path / "models/classifier/mnist.pt")
    metrics = json.loads((tmp_path / "metrics/classifier_mnist.json").read_text())
    assert metrics["n_train"] == info["n_train"] == ref.n_train == TINY_CLF["max_train"]
    assert metrics["n_test"] == ref.n_test == 2000
    # Accuracies count argmaxes: equal unless a float-rounding difference flips a near tie (<= 1 image).
    assert abs(metrics["test_accuracy"] - ref.test_accuracy) <= 1 / ref.n_test + 1e-12, (metrics, ref.test_accuracy)

    got_rows = _csv_rows(tmp_path / "plots/classifier/mnist.csv")
    assert [r["epoch"] for r in got_rows] == [r["epoch"] for r in ref.history] == [1.0, 2.0]
    worst_loss = 0.0
    for got, want in zip(got_rows, ref.history, strict=True):
        assert abs(got["train_loss"] - want["train_loss"]) <= DDP_ATOL + DDP_RTOL * abs(want["train_loss"]), (got, want)
        assert abs(got["train_accuracy"] - want["train_accuracy"]) <= 1 / ref.n_train + 1e-12, (got, want)
        worst_loss = max(worst_loss, abs(got["train_loss"] - want["train_loss"]))
    want_state, got_state = ref.model.state_dict(), model.state_dict()
    assert set(got_state) == set(want_state)
    worst, used = 0.0, 0.0
    for k, v in want_state.items():
        torch.testing.assert_close(got_state[k], v, rtol=DDP_RTOL, atol=DDP_ATOL, msg=k)
        diff = (got_state[k].double() - v.double()).abs()
        worst = max(worst, float(diff.max()))
        used = max(used, float((diff / (DDP_ATOL + DDP_RTOL * v.double().abs())).max()))
    moved = max(float((want_state[k] - init[k]).abs().max()) for k in want_state)
    print(
        f"classifier: DDP (2 gloo ranks) vs single process: max |dweight| {worst:.3g} ({used:.1%} of the tolerance), "
        f"max |dloss| {worst_loss:.3g}; training moved weights by up to {moved:.3g}; torchrun took {torchrun_s:.1f}s"
    )
    assert moved > 100 * max(worst, 1e-9), (moved, worst)
