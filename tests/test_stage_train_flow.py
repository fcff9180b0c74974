"""The `train_flow` stage CLI for real, on tiny params, in a temporary git + DVC copy of the project."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from genmodels.flows.imageflow import load_trained, mean_and_se, per_image_bpd


TINY_FLOW = {
    "n_layers": 2,
    "hidden_units": 16,
    "n_hidden": 1,
    "epochs": 3,
    "batch_size": 512,
    "patience": 5,
    "sample_every": 2,
    "n_samples": 16,
    "eval_batch_size": 500,
}


@pytest.mark.slow
def test_train_flow_stage_in_dvc_repo(dvc_project) -> None:  # noqa: ANN001 - fixture from conftest
    root: Path = dvc_project.root
    dvc_project.write_params({"flow": TINY_FLOW})
    dvc_project.commit("tiny flow")

    proc = dvc_project.dvc("repro", "train_flow")
    assert "train_flow" in dvc_project.ran_stages(proc)

    metrics = json.loads((root / "metrics" / "train_flow.json").read_text())
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3
    for key in ("test_bpd", "best_val_bpd", "baseline_gaussian_test_bpd"):
        assert math.isfinite(metrics[key]) and 0 < metrics[key] < 8.5, key
    # the whitened flow starts at the Gaussian baseline: a few tiny steps cannot move it far from it
    assert abs(metrics["best_val_bpd"] - metrics["baseline_gaussian_val_bpd"]) < 0.2

    # the checkpoint reproduces the reported test bpd through the library
    model, cfg = load_trained(root / "models" / "flow" / "model.pt")
    assert cfg.hidden_units == 16 and cfg.n_layers == 2
    test = torch.load(root / "data" / "prepared" / "fashion_mnist.pt", weights_only=True)["test"]
    again, _ = mean_and_se(per_image_bpd(model, test, seed=cfg.seed + 3, batch_size=cfg.eval_batch_size))
    assert abs(again - metrics["test_bpd"]) < 1e-9

    rows = (root / "plots" / "flow" / "train.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "train_loss", "val_loss"] and len(rows) == 1 + 3
    # the checkpoint holds the best epoch of the series
    vals = [float(r.split(",")[2]) for r in rows[1:]]
    assert metrics["best_val_bpd"] == min(vals) and vals.index(min(vals)) + 1 == metrics["best_epoch"]
    from PIL import Image

    grid = Image.open(root / "plots" / "flow" / "samples.png")
    assert grid.mode == "L" and grid.size == (4 * 30 + 2, 4 * 30 + 2)
    assert not (root / ".resume" / "train_flow.pt").exists()  # removed once the outputs are written

    # MLflow: params, per-epoch series with steps, final metrics, sample grids and the model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("genmodels")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "train_flow"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["flow.hidden_units"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bpd")] == [1, 2, 3]
    assert abs(run.data.metrics["test_bpd"] - metrics["test_bpd"]) < 1e-9
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"samples_epoch_0002.png", "samples_epoch_0003.png", "samples.png", "bpd.png"} <= figures
    assert [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")] == ["model.pt"]

    # nothing changed -> nothing re-runs; a flow param change re-runs train_flow only
    assert "train_flow" not in dvc_project.ran_stages(dvc_project.dvc("repro", "train_flow"))
    first = (root / "metrics" / "train_flow.json").read_bytes()
    dvc_project.write_params({"flow": {**TINY_FLOW, "lr": 0.002}})
    ran = dvc_project.ran_stages(dvc_project.dvc("repro", "train_flow"))
    assert ran == ["train_flow"]
    assert (root / "metrics" / "train_flow.json").read_bytes() != first

    # same params + seed on the CPU -> byte-identical metrics and checkpoint
    ckpt = (root / "models" / "flow" / "model.pt").read_bytes()
    metrics_bytes = (root / "metrics" / "train_flow.json").read_bytes()
    dvc_project.dvc("repro", "--force", "--single-item", "train_flow")
    assert (root / "metrics" / "train_flow.json").read_bytes() == metrics_bytes
    assert (root / "models" / "flow" / "model.pt").read_bytes() == ckpt


def test_train_flow_stage_rejects_bad_params(dvc_project) -> None:  # noqa: ANN001
    dvc_project.write_params({"flow": {**TINY_FLOW, "logit_lambda": 0.7}})
    proc = dvc_project.python("stages/train_flow.py", check=False)
    assert proc.returncode == 2
    assert "flow.logit_lambda" in proc.stderr and "Traceback" not in proc.stderr
    assert not (dvc_project.root / "models" / "flow").exists()
