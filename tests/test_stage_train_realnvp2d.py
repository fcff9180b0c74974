"""The `train_realnvp2d` stage CLI, for real, on tiny params in a throw-away git + DVC repo:
outputs, MLflow run, reproducibility, bad params, and resume after a SIGKILL."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch

from genmodels.flows.realnvp2d import load_trained, mean_nll


TINY_RNVP = {"n_layers": 4, "hidden_units": 16, "epochs": 3, "batch_size": 128, "patience": 50}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_realnvp2d_stage_runs_logs_and_is_reproducible(dvc_project) -> None:  # noqa: ANN001 - fixture
    proj = dvc_project
    root = proj.root
    proj.write_params({"realnvp2d": TINY_RNVP})
    proj.commit("realnvp2d stage")

    proc = proj.dvc("repro", "train_realnvp2d")
    ran = proj.ran_stages(proc)
    assert "train_realnvp2d" in ran and "prepare@points2d" in ran
    assert not any(s.startswith(("prepare@mnist", "prepare@fashion")) for s in ran)

    # Checkpoint: weights_only, rebuilds the configured model, which reproduces the reported NLL.
    model, config = load_trained(root / "models/realnvp2d/model.pt", "cpu")
    assert config["n_layers"] == 4 and config["hidden_units"] == 16
    data = torch.load(root / "data/prepared/points2d.pt", weights_only=True)
    metrics = json.loads((root / "metrics/train_realnvp2d.json").read_text())
    nll, _ = mean_nll(model, data["test"])
    assert math.isclose(metrics["test_nll"], nll, rel_tol=0, abs_tol=1e-6)
    assert math.isclose(metrics["kl_gap"], metrics["test_nll"] - data["true_entropy"], abs_tol=1e-9)
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3 and metrics["data"] == "two_moons"

    lines = (root / "plots/realnvp2d/train.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "train_loss", "val_loss", "lr"] and len(lines) == 1 + 3
    assert min(float(line.split(",")[2]) for line in lines[1:]) == metrics["best_val_loss"]
    for png in ("samples.png", "train_curves.png"):
        assert (root / "plots/realnvp2d" / png).stat().st_size > 1000
    assert not (root / ".resume/train_realnvp2d.pt").exists()  # removed after the outputs are written

    # MLflow: one finished run tagged with the stage, per-epoch metrics at steps 1..3, params, model.
    db = sqlite3.connect(root / "mlflow.db")
    runs = db.execute(
        "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'stage' AND t.value = 'train_realnvp2d'"
    ).fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    run_id = runs[0][0]
    steps = db.execute(
        "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_loss' ORDER BY step", (run_id,)
    ).fetchall()
    assert [s for (s,) in steps] == [1, 2, 3]
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
    assert params["realnvp2d.n_layers"] == "4" and params["realnvp2d.seed"] == "42"
    finals = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()}
    assert {"test_nll", "kl_gap", "train_seconds"} <= finals
    db.close()
    artifacts = list((root / "mlartifacts").rglob("model.pt")) + list((root / "mlartifacts").rglob("samples.png"))
    assert len(artifacts) == 2

    # Unchanged -> nothing re-runs; forced re-run -> byte-identical outputs.
    first = {p: _sha(root / p) for p in ("metrics/train_realnvp2d.json", "plots/realnvp2d/train.csv")}
    weights = torch.load(root / "models/realnvp2d/model.pt", weights_only=True)["model"]
    assert "train_realnvp2d" not in proj.ran_stages(proj.dvc("repro", "train_realnvp2d"))
    proj.dvc("repro", "--force", "--single-item", "train_realnvp2d")
    for p, h in first.items():
        assert _sha(root / p) == h, p
    again = torch.load(root / "models/realnvp2d/model.pt", weights_only=True)["model"]
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_train_realnvp2d_stage_rejects_bad_params_before_training(dvc_project) -> None:  # noqa: ANN001
    proj = dvc_project
    proj.write_params({"realnvp2d": {**TINY_RNVP, "n_layer": 3}})
    proc = proj.python("stages/train_realnvp2d.py", check=False)
    assert proc.returncode == 2
    assert "realnvp2d.n_layer" in proc.stderr and "n_layers" in proc.stderr and "Traceback" not in proc.stderr
    proj.write_params({"realnvp2d": TINY_RNVP})
    proc = proj.python("stages/train_realnvp2d.py", check=False)  # params fine, data not prepared
    assert proc.returncode == 2 and "prepare@points2d" in proc.stderr and "Traceback" not in proc.stderr
    assert not (proj.root / "models/realnvp2d/model.pt").exists()


def test_train_realnvp2d_resume_after_kill_gives_identical_checkpoint(dvc_project) -> None:  # noqa: ANN001
    """SIGKILL the stage mid-training, run it again: the final checkpoint equals an uninterrupted run's."""
    proj = dvc_project
    root = proj.root
    # Enough work per epoch that the kill lands between the first resume save and the end.
    cfg = {"n_layers": 6, "hidden_units": 32, "epochs": 14, "batch_size": 64, "patience": 50}
    proj.write_params({"realnvp2d": cfg, "data": {"points2d": {"n_train": 4096, "n_val": 512, "n_test": 256}}})
    proj.python("stages/prepare.py", "points2d")

    proj.python("stages/train_realnvp2d.py", "--model-dir", "ref")
    reference = (root / "ref/model.pt").read_bytes()

    resume = root / ".resume/train_realnvp2d.pt"
    proc = subprocess.Popen(
        [sys.executable, "stages/train_realnvp2d.py"],
        cwd=root,
        env=proj.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed_at = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if resume.is_file():
            state = torch.load(resume, weights_only=True)
            if state["epoch"] >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = state["epoch"]
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < cfg["epochs"], "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "models/realnvp2d/model.pt").exists()

    out = proj.python("stages/train_realnvp2d.py")
    assert "found resume state" in out.stderr
    first_epoch_line = [line for line in out.stderr.splitlines() if "] epoch " in line][0]
    assert int(first_epoch_line.split("] epoch ")[1].split(":")[0]) >= killed_at + 1  # continued, not restarted
    assert (root / "models/realnvp2d/model.pt").read_bytes() == reference
    assert not resume.exists()
