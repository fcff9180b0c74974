"""Team set-up: a DVC remote (a local folder standing in for S3/GCS/SSH) and a git remote share
data, checkpoints and experiments: ``dvc push`` / ``git clone`` + ``dvc pull`` reproduce the
outputs without re-running anything, and ``dvc exp push`` / ``dvc exp pull`` carry an experiment."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import DvcProject
from test_experiments import add_realnvp2d_stage

OUTPUTS = [
    "data/prepared/points2d.pt",
    "models/realnvp2d/model.pt",
    "plots/realnvp2d/samples.png",
    "metrics/train_realnvp2d.json",
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_push_clone_pull_reproduces_outputs_without_rerun(dvc_project: Any, tmp_path: Path) -> None:
    proj = dvc_project
    add_realnvp2d_stage(proj)
    proj.dvc("repro", "train_realnvp2d")
    remote = tmp_path / "dvc-remote"
    origin = tmp_path / "origin.git"
    proj.dvc("remote", "add", "-d", "team", str(remote))
    proj.commit("results + remote")
    proj.run("git", "init", "-q", "--bare", "-b", "main", str(origin))
    proj.run("git", "remote", "add", "origin", str(origin))
    proj.run("git", "push", "-q", "origin", "main")
    proj.dvc("push")
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push wrote nothing to the remote"
    want = {f: _digest(proj.root / f) for f in OUTPUTS}

    # A teammate: fresh clone, own (empty) cache, pull.
    mate = DvcProject(tmp_path / "mate")
    mate.env = dict(proj.env)
    proj.run("git", "clone", "-q", "-b", "main", str(origin), str(mate.root))
    assert not (mate.root / "models/realnvp2d/model.pt").exists()
    # Targets: this test ran only part of the pipeline (a full one is plain `dvc pull`).
    mate.dvc("pull", "--with-deps", "train_realnvp2d")
    got = {f: _digest(mate.root / f) for f in OUTPUTS}
    assert got == want
    status = mate.dvc("status", "--with-deps", "train_realnvp2d").stdout
    assert "up to date" in status, status
    rep = mate.dvc("repro", "train_realnvp2d")
    assert mate.ran_stages(rep) == [], rep.stdout  # nothing re-run: outputs match dvc.lock
    assert not (mate.root / "mlflow.db").exists()  # and so nothing was logged either

    # An experiment travels through `dvc exp push` (git refs + its cached outputs).
    proj.dvc("exp", "run", "-n", "lr-up", "-S", "realnvp2d.lr=0.004", "train_realnvp2d")
    exp_metrics = json.loads((proj.root / "metrics/train_realnvp2d.json").read_text())
    exp_model = _digest(proj.root / "models/realnvp2d/model.pt")
    assert exp_model != want["models/realnvp2d/model.pt"]
    proj.dvc("exp", "push", "origin", "lr-up")
    mate.dvc("exp", "pull", "origin", "lr-up")
    doc = json.loads(mate.dvc("exp", "show", "--json", "--no-pager").stdout)
    revs = [r for b in doc for e in (b.get("experiments") or []) for r in e["revs"] if r["name"] == "lr-up"]
    assert len(revs) == 1
    data = revs[0]["data"]
    assert data["params"]["params.yaml"]["data"]["realnvp2d"]["lr"] == 0.004
    assert data["metrics"]["metrics/train_realnvp2d.json"]["data"]["test_nll"] == exp_metrics["test_nll"]
    # Its outputs are in the DVC remote: on a branch made from the experiment, with the
    # teammate's cache wiped, `dvc pull` brings back exactly the experiment's checkpoint.
    # (`dvc exp apply lr-up` does the same in a project whose whole pipeline has run; here
    # the image data sets were never prepared, so a full checkout would report them missing.)
    mate.dvc("exp", "branch", "lr-up", "lr-up-branch")
    mate.run("git", "checkout", "-q", "lr-up-branch")
    shutil.rmtree(mate.root / ".dvc" / "cache", ignore_errors=True)
    (mate.root / "models/realnvp2d/model.pt").unlink()  # the baseline's copy
    # --force: the workspace still holds the baseline's figures, which DVC would not overwrite.
    mate.dvc("pull", "--force", "--with-deps", "train_realnvp2d")
    assert _digest(mate.root / "models/realnvp2d/model.pt") == exp_model
