"""Killing a training stage under `dvc repro` and running `dvc repro` again resumes and reaches
the same result as an uninterrupted run (the EBM and the image flow; the 2D models' stage tests
do the same with the stage script).

What a user does: `dvc repro` is interrupted (SIGKILL of the whole process group, the harshest
case: no handler runs), nothing DVC would take as a valid output is left, and the next
`dvc repro` continues from `.resume/<stage>.pt` to the byte-identical checkpoint, metrics and
per-epoch series of a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

CASES = {
    "train_ebm": {
        "prepare": "prepare@mnist",
        "section": "ebm",
        "params": {
            "hidden": [64],
            "epochs": 8,
            "batch_size": 32,
            "buffer_size": 128,
            "langevin_steps": 20,
            "lr": 1e-3,
            "sample_every": 4,
            "sample_steps": 10,
            "patience": 50,
        },
        "model": "models/ebm/model.pt",
    },
    "train_flow": {
        "prepare": "prepare@fashion_mnist",
        "section": "flow",
        "params": {
            "n_layers": 2,
            "hidden_units": 16,
            "n_hidden": 1,
            "epochs": 8,
            "batch_size": 256,
            "patience": 50,
            "sample_every": 4,
            "n_samples": 16,
            "eval_batch_size": 500,
        },
        "model": "models/flow/model.pt",
    },
}


def _kill_when_resumable(proc: subprocess.Popen[str], resume: Path, min_epoch: int, timeout: float) -> int | None:
    """SIGKILL ``proc``'s process group once the resume file holds epoch >= ``min_epoch``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if resume.is_file():
            try:
                state = torch.load(resume, weights_only=True)
            except Exception:  # noqa: BLE001 - replaced while being read; look again
                continue
            if int(state["epoch"]) >= min_epoch:
                os.killpg(proc.pid, signal.SIGKILL)
                return int(state["epoch"])
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("stage", sorted(CASES))
def test_dvc_repro_after_a_killed_training_stage_resumes_to_the_same_result(dvc_project, stage: str) -> None:  # noqa: ANN001
    case = CASES[stage]
    proj = dvc_project
    root = proj.root
    section = case["section"]
    proj.write_params({section: case["params"]})
    proj.commit("tiny params")
    proj.dvc("repro", case["prepare"])

    # The uninterrupted reference, written beside the DVC outputs (not tracked by dvc.lock).
    proj.python(
        f"stages/{stage}.py",
        "--model-dir",
        "ref/model",
        "--plots-dir",
        "ref/plots",
        "--metrics",
        "ref/metrics.json",
    )
    assert not (root / f".resume/{stage}.pt").exists()

    resume = root / f".resume/{stage}.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", stage],
        cwd=root,
        env=proj.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: the kill takes dvc and the stage together
    )
    killed_at = _kill_when_resumable(proc, resume, 2, timeout=600)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < case["params"]["epochs"], "the run finished before it was killed"
    # Nothing DVC would take as this stage's valid output: no checkpoint, no lock entry.
    assert not (root / case["model"]).exists()
    status = proj.dvc("status", stage).stdout
    assert stage in status and "up to date" not in status, status

    out = proj.dvc("repro", stage)
    assert proj.ran_stages(out) == [stage]
    epochs_printed = [
        int(line.split("] epoch ")[1].split(":")[0]) for line in out.stderr.splitlines() if f"[{stage}] epoch " in line
    ]
    assert epochs_printed and epochs_printed[0] == killed_at + 1, epochs_printed  # continued, not restarted
    assert (root / case["model"]).read_bytes() == (root / "ref/model/model.pt").read_bytes()
    assert (root / f"metrics/{stage}.json").read_text() == (root / "ref/metrics.json").read_text()
    series = (root / f"plots/{section}/train.csv").read_text()
    assert series == (root / "ref/plots/train.csv").read_text()
    assert len(series.splitlines()) == 1 + case["params"]["epochs"]
    assert not resume.exists()
    assert proj.dvc("status", stage).stdout.strip().endswith("up to date.")


def test_atomic_save_bytes_depend_on_values_not_on_object_identity(tmp_path: Path) -> None:
    """A history restored from a file (fresh string objects) saves to the same bytes as one built
    in memory (shared key objects): pickle memoises by identity, atomic_save canonicalises."""
    import io
    import pickle

    from genmodels.training import atomic_save

    keys = ["train_loss", "val_loss"]
    built = {"history": [{k: float(i) for k in keys} for i in range(3)], "w": torch.arange(4.0)}
    # Equal values, but each row's key strings are objects of their own (as rows read from a
    # resume file next to rows appended in memory are).
    restored = {"history": [pickle.loads(pickle.dumps(row)) for row in built["history"]], "w": built["w"]}
    assert restored["history"][0].keys() == built["history"][0].keys()
    assert next(iter(restored["history"][0])) is not next(iter(restored["history"][1]))
    raw_a, raw_b = io.BytesIO(), io.BytesIO()
    torch.save(built, raw_a)
    torch.save(restored, raw_b)
    assert raw_a.getvalue() != raw_b.getvalue()  # the problem is real with plain torch.save
    atomic_save(built, tmp_path / "a.pt")
    atomic_save(restored, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], built["w"])
