"""The `train_ddpm` stage CLI, for real, on tiny params in a throw-away git + DVC repo:
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

from genmodels.diffusion import load_trained, nll_bound
from genmodels.training import make_generator


TINY_DDPM = {
    "n_steps": 50,
    "hidden_units": 16,
    "epochs": 3,
    "batch_size": 128,
    "patience": 50,
    "sampling_steps": 10,
    "elbo_points": 64,
    "n_samples": 256,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_ddpm_stage_runs_logs_and_is_reproducible(dvc_project) -> None:  # noqa: ANN001 - fixture
    proj = dvc_project
    root = proj.root
    proj.write_params({"ddpm": TINY_DDPM})
    proj.commit("ddpm stage")

    proc = proj.dvc("repro", "train_ddpm")
    ran = proj.ran_stages(proc)
    assert "train_ddpm" in ran and "prepare@points2d" in ran
    assert not any(s.startswith(("prepare@mnist", "prepare@fashion")) for s in ran)

    # Checkpoint: weights_only, rebuilds the configured model, which reproduces the reported bound.
    model, config = load_trained(root / "models/ddpm/model.pt", "cpu")
    assert config["n_steps"] == 50 and config["hidden_units"] == 16 and config["parameterization"] == "mean"
    data = torch.load(root / "data/prepared/points2d.pt", weights_only=True)
    metrics = json.loads((root / "metrics/train_ddpm.json").read_text())
    bound = nll_bound(model, data["test"][:64], generator=make_generator(config["seed"] + 200))
    assert math.isclose(metrics["nll_bound"], bound.double().mean().item(), rel_tol=0, abs_tol=1e-5)
    assert math.isclose(metrics["kl_gap_bound"], metrics["nll_bound"] - data["true_entropy"], abs_tol=1e-9)
    assert metrics["kl_gap_bound"] > 0  # a bound on the NLL is never below the entropy (3 epochs: far above)
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3 and metrics["data"] == "two_moons"
    # 3 epochs of a 16-unit network: its samples are measurably worse than a real draw
    for k in ("energy_distance", "swd"):
        assert metrics[k] > metrics[k + "_floor"], k
    assert "mmd" in metrics and "sample_logp" in metrics

    lines = (root / "plots/ddpm/train.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "train_loss", "val_loss", "lr"] and len(lines) == 1 + 3
    assert min(float(line.split(",")[2]) for line in lines[1:]) == metrics["best_val_loss"]
    for png in ("samples.png", "train_curves.png"):
        assert (root / "plots/ddpm" / png).stat().st_size > 1000
    assert not (root / ".resume/train_ddpm.pt").exists()

    # MLflow: one finished run tagged with the stage, per-epoch metrics at steps 1..3, params, model.
    db = sqlite3.connect(root / "mlflow.db")
    runs = db.execute(
        "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
        "WHERE t.key = 'stage' AND t.value = 'train_ddpm'"
    ).fetchall()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    run_id = runs[0][0]
    steps = db.execute(
        "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'val_loss' ORDER BY step", (run_id,)
    ).fetchall()
    assert [s for (s,) in steps] == [1, 2, 3]
    params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
    assert params["ddpm.n_steps"] == "50" and params["ddpm.seed"] == "689"
    finals = {k for (k,) in db.execute("SELECT key FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()}
    assert {"nll_bound", "kl_gap_bound", "train_seconds", "sampling_seconds_per_1000"} <= finals
    db.close()
    assert len(list((root / "mlartifacts").rglob("model.pt"))) == 1

    # Unchanged -> nothing re-runs; forced re-run -> byte-identical outputs.
    first = {p: _sha(root / p) for p in ("metrics/train_ddpm.json", "plots/ddpm/train.csv", "models/ddpm/model.pt")}
    assert "train_ddpm" not in proj.ran_stages(proj.dvc("repro", "train_ddpm"))
    proj.dvc("repro", "--force", "--single-item", "train_ddpm")
    for p, h in first.items():
        assert _sha(root / p) == h, p

    # The sample command: the full chain at each precision equals the library's sampler from the
    # same seed (parsed back from the CSV), strided works, and a repeat is byte-identical.
    from genmodels.diffusion import sample

    for prec in ("float32", "bfloat16"):
        proj.python("stages/sample.py", "ddpm", "--n", "300", "--seed", "5", "--precision", prec, "--out", f"{prec}.csv")
        rows = (root / f"{prec}.csv").read_text().splitlines()
        assert rows[0] == "x,y" and len(rows) == 301
        got = torch.tensor([[float(v) for v in r.split(",")] for r in rows[1:]])
        ref = sample(model, 300, generator=make_generator(5), precision=prec)
        assert torch.equal(got, ref), prec  # the CSV holds each float exactly (repr of the double)
    proj.python("stages/sample.py", "ddpm", "--n", "300", "--seed", "5", "--precision", "bfloat16", "--out", "again.csv")
    assert _sha(root / "again.csv") == _sha(root / "bfloat16.csv")
    proj.python("stages/sample.py", "ddpm", "--n", "40", "--sampling-steps", "5", "--out", "strided.csv")
    assert len((root / "strided.csv").read_text().splitlines()) == 41
    proc = proj.python("stages/sample.py", "realnvp2d", "--precision", "bfloat16", "--out", "r.csv", check=False)
    assert proc.returncode == 2 and "--precision applies to ddpm only" in proc.stderr


def test_train_ddpm_stage_rejects_bad_params_before_training(dvc_project) -> None:  # noqa: ANN001
    proj = dvc_project
    proj.write_params({"ddpm": {**TINY_DDPM, "parametrization": "eps"}})
    proc = proj.python("stages/train_ddpm.py", check=False)
    assert proc.returncode == 2
    assert "ddpm.parametrization" in proc.stderr and "parameterization" in proc.stderr
    assert "Traceback" not in proc.stderr
    proj.write_params({"ddpm": {**TINY_DDPM, "sampling_steps": 51}})
    proc = proj.python("stages/train_ddpm.py", check=False)
    assert proc.returncode == 2 and "ddpm.sampling_steps" in proc.stderr and "Traceback" not in proc.stderr
    proj.write_params({"ddpm": TINY_DDPM})
    proc = proj.python("stages/train_ddpm.py", check=False)  # params fine, data not prepared
    assert proc.returncode == 2 and "prepare@points2d" in proc.stderr and "Traceback" not in proc.stderr
    assert not (proj.root / "models/ddpm/model.pt").exists()


def test_train_ddpm_resume_after_kill_gives_identical_checkpoint(dvc_project) -> None:  # noqa: ANN001
    """SIGKILL the stage mid-training, run it again: the final checkpoint equals an uninterrupted run's."""
    proj = dvc_project
    root = proj.root
    cfg = {**TINY_DDPM, "epochs": 12, "batch_size": 64}
    proj.write_params({"ddpm": cfg, "data": {"points2d": {"n_train": 4096, "n_val": 512, "n_test": 256}}})
    proj.python("stages/prepare.py", "points2d")

    proj.python("stages/train_ddpm.py", "--model-dir", "ref", "--metrics", "ref/metrics.json")
    reference = (root / "ref/model.pt").read_bytes()
    ref_metrics = (root / "ref/metrics.json").read_text()

    resume = root / ".resume/train_ddpm.pt"
    proc = subprocess.Popen(
        [sys.executable, "stages/train_ddpm.py"],
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
            try:
                state = torch.load(resume, weights_only=True)
            except Exception:  # noqa: BLE001 - replaced while reading; look again
                continue
            if state["epoch"] >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = state["epoch"]
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < cfg["epochs"], "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "models/ddpm/model.pt").exists()

    out = proj.python("stages/train_ddpm.py")
    assert "found resume state" in out.stderr
    assert (root / "models/ddpm/model.pt").read_bytes() == reference
    assert (root / "metrics/train_ddpm.json").read_text() == ref_metrics
    lines = (root / "plots/ddpm/train.csv").read_text().splitlines()
    assert len(lines) == 1 + 12  # the resumed run's series is complete
    assert not resume.exists()
