"""The `train_ebm` stage CLI, for real, on tiny params in a throw-away git + DVC repo."""

from __future__ import annotations

import json
import sqlite3

import torch

from genmodels.ebm import EnergyMLP, load_trained


TINY_EBM = {
    "hidden": [32],
    "epochs": 3,
    "batch_size": 32,
    "buffer_size": 128,
    "langevin_steps": 5,
    "lr": 1e-3,
    "sample_every": 2,
    "sample_steps": 10,
}


def test_train_ebm_stage_runs_logs_and_is_reproducible(dvc_project) -> None:  # noqa: ANN001 - fixture type
    proj = dvc_project
    root = proj.root
    proj.write_params({"ebm": TINY_EBM})
    proj.commit("ebm stage")

    proc = proj.dvc("repro", "train_ebm")
    assert "train_ebm" in proj.ran_stages(proc)

    # Checkpoint: loadable with weights_only, the configured architecture, buffer and RNG inside.
    model, config = load_trained(root / "models/ebm/model.pt", "cpu")
    assert isinstance(model, EnergyMLP) and config["hidden"] == [32]
    ckpt = torch.load(root / "models/ebm/model.pt", weights_only=True)
    assert ckpt["buffer"]["examples"].shape == (128, 784)
    assert {"optimizer", "g_data", "g_langevin", "final_model", "history"} <= set(ckpt)

    # Per-epoch series with energies of data vs samples and the rollbacks column.
    lines = (root / "plots/ebm/train.csv").read_text().splitlines()
    header = lines[0].split(",")
    for col in ("epoch", "train_loss", "val_loss", "energy_real", "energy_fake", "rollbacks"):
        assert col in header
    assert len(lines) == 1 + 3
    metrics = json.loads((root / "metrics/train_ebm.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["rollbacks"] == 0
    assert 1 <= metrics["best_epoch"] <= 3
    assert (root / "plots/ebm/samples.png").stat().st_size > 0
    assert sorted(p.name for p in (root / "plots/ebm/buffer").iterdir()) == ["epoch_0002.png", "epoch_0003.png"]
    assert not (root / ".resume/train_ebm.pt").exists()  # removed after the outputs are written

    # MLflow: one finished run tagged with the stage, per-epoch metrics with steps 1..3.
    db = sqlite3.connect(root / "mlflow.db")
    runs = db.execute(
        "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'stage' AND t.value = 'train_ebm'"
    ).fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    steps = db.execute(
        "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_loss' ORDER BY step", (runs[0][0],)
    ).fetchall()
    assert [s for (s,) in steps] == [1, 2, 3]
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (runs[0][0],)).fetchall())
    assert params["ebm.langevin_steps"] == "5"
    db.close()

    # Nothing changed -> nothing re-runs; same params + seed -> byte-identical outputs.
    first = {p: (root / p).read_bytes() for p in ("metrics/train_ebm.json", "plots/ebm/train.csv")}
    weights = ckpt["model"]
    assert "train_ebm" not in proj.ran_stages(proj.dvc("repro", "train_ebm"))
    proj.dvc("repro", "--force", "--single-item", "train_ebm")
    for p, b in first.items():
        assert (root / p).read_bytes() == b, p
    again = torch.load(root / "models/ebm/model.pt", weights_only=True)["model"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_train_ebm_stage_rejects_bad_params_before_training(dvc_project) -> None:  # noqa: ANN001
    proj = dvc_project
    proj.write_params({"ebm": {**TINY_EBM, "reinit_prob": 1.5}})
    proc = proj.python("stages/train_ebm.py", check=False)
    assert proc.returncode == 2
    assert "ebm.reinit_prob" in proc.stderr and "Traceback" not in proc.stderr
    assert not (proj.root / "models/ebm/model.pt").exists()


def test_train_ebm_stage_fails_clearly_on_repeated_divergence(dvc_project) -> None:  # noqa: ANN001
    proj = dvc_project
    proj.write_params({"ebm": {**TINY_EBM, "lr": 1e4, "max_energy": 50.0, "max_rollbacks": 1}})
    proj.python("stages/prepare.py", "mnist")
    proc = proj.python("stages/train_ebm.py", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "rolled back" in proc.stderr and "diverged at epoch 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The last good state survives for inspection or a resume with better params.
    snap = torch.load(proj.root / ".resume/train_ebm.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in snap["model"].values())
    assert not (proj.root / "models/ebm/model.pt").exists()
