"""The `train_classifier` and `evaluate` stage CLIs for real, on tiny params, in a temporary git + DVC
copy of the project: every key the issue lists, floors and baselines beside them, entropy keys
absent for a CSV point set, byte-identical reruns, ROC curves that integrate to the AUROC."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


TINY_MODELS: dict[str, Any] = {
    "realnvp2d": {"n_layers": 2, "hidden_units": 16, "epochs": 2, "batch_size": 256},
    "ddpm": {"n_steps": 50, "hidden_units": 16, "epochs": 2, "batch_size": 128, "sampling_steps": 10},
    "flow": {"n_layers": 2, "hidden_units": 16, "n_hidden": 1, "epochs": 1, "batch_size": 512, "sample_every": 0},
    "ebm": {"hidden": [32], "epochs": 1, "batch_size": 32, "buffer_size": 128, "langevin_steps": 5, "sample_steps": 10},
}
TINY_EVAL: dict[str, Any] = {
    "classifier": {"epochs": 2, "max_train": 2000, "batch_size": 64, "feature_dim": 16},
    "evaluate": {
        "n_samples": 200,
        "swd_projections": 16,
        "n_fid": 40,
        "kde_max_centers": 200,
        "kde_grid": 7,
        "timing_points": 32,
        "nll_bound_points": 32,
    },
}

POINT_KEYS = {"mmd", "energy_distance", "swd", "mmd_floor", "energy_distance_floor", "swd_floor"}
POINT_KEYS |= {k + "_se" for k in POINT_KEYS if k.endswith("_floor")} | {"floor_draws"}
POINT_KEYS |= {"mmd_floor_unconditional", "energy_distance_floor_unconditional"}
ENTROPY_KEYS = {"true_entropy", "kl_gap", "sample_logp", "sample_logp_floor"}


def setup_params(proj, overrides: dict[str, Any]) -> str:  # noqa: ANN001 - DvcProject
    """Write tiny params (models + evaluation); return the params file the stages read."""
    proj.write_params({**overrides, **TINY_EVAL})
    return "params.yaml"


def metrics(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / "metrics" / f"{name}.json").read_text())


@pytest.mark.slow
def test_evaluate_2d_models(dvc_project) -> None:  # noqa: ANN001 - fixture from conftest
    proj, root = dvc_project, dvc_project.root
    pfile = setup_params(proj, {"realnvp2d": TINY_MODELS["realnvp2d"], "ddpm": TINY_MODELS["ddpm"]})
    proj.python("stages/prepare.py", "points2d")
    proj.python("stages/train_realnvp2d.py")
    proj.python("stages/train_ddpm.py")
    proj.python("stages/evaluate.py", "realnvp2d", "--params", pfile)
    first = (root / "metrics" / "realnvp2d.json").read_bytes()
    proj.python("stages/evaluate.py", "ddpm", "--params", pfile)

    m = metrics(root, "realnvp2d")
    assert {"test_nll", "true_entropy", "kl_gap", "sample_logp"} | POINT_KEYS <= set(m)
    assert m["kl_gap"] == pytest.approx(m["test_nll"] - m["true_entropy"], abs=1e-12)
    assert m["n_samples"] == 200 and m["n_test"] == 256 and m["floor_source"] == "true_distribution"
    for name in ("gaussian", "kde"):
        for k in ("test_nll", "kl_gap", "mmd", "energy_distance", "swd", "sample_logp"):
            assert math.isfinite(m[f"baseline_{name}_{k}"]), (name, k)
    # The V-statistics are >= 0 and a real-vs-real floor is small (O(1/n + 1/m)); a 2-epoch model is above it.
    assert 0 < m["mmd_floor"] < m["mmd"] and 0 < m["energy_distance_floor"] < m["energy_distance"]
    # Each floor is the mean over evaluate.floor_draws real draws, with its standard error.
    assert m["floor_draws"] == 4
    assert all(0 < m[k + "_floor_se"] < m[k + "_floor"] for k in ("mmd", "energy_distance", "swd"))
    # The test NLL in the metrics is the checkpoint's, recomputed through the library.
    from genmodels.flows.realnvp2d import load_trained, nll

    model, _ = load_trained(root / "models" / "realnvp2d" / "model.pt")
    test = torch.load(root / "data" / "prepared" / "points2d.pt", weights_only=True)["test"]
    assert m["test_nll"] == pytest.approx(float(nll(model, test).double().mean()), rel=1e-6)

    d = metrics(root, "ddpm")
    assert {"nll_bound", "kl_gap_bound"} <= set(d) and not any("seconds" in k for k in d)
    timing = json.loads((root / "metrics" / "timing" / "ddpm.json").read_text())  # wall-clock, kept apart
    assert timing["sampling_seconds_per_1k"] > 0 and timing["sampling_seconds_per_1k_strided"] > 0
    assert POINT_KEYS | {f"{k}_strided" for k in ("mmd", "energy_distance", "swd", "sample_logp")} <= set(d)
    assert d["kl_gap_bound"] == pytest.approx(d["nll_bound"] - d["true_entropy"], abs=1e-12)
    assert d["sampling_steps_full"] == 50 and d["sampling_steps_strided"] == 10 and d["nll_bound_points"] == 32
    # Same data, same evaluation seed: the floors and baselines are the same numbers for both models.
    for k in ("mmd_floor", "swd_floor", "baseline_gaussian_test_nll", "baseline_kde_mmd"):
        assert d[k] == m[k], k

    # Same params + seed on the CPU: byte-identical metrics.
    proj.python("stages/evaluate.py", "realnvp2d", "--params", pfile)
    assert (root / "metrics" / "realnvp2d.json").read_bytes() == first

    # MLflow has the run with its params and metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("genmodels")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "evaluate@ddpm"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["evaluate.n_samples"] == "200"
    assert runs[0].data.metrics["nll_bound"] == pytest.approx(d["nll_bound"])


@pytest.mark.slow
def test_evaluate_csv_point_set_has_no_entropy_keys(dvc_project, tmp_path) -> None:  # noqa: ANN001
    proj, root = dvc_project, dvc_project.root
    g = np.random.default_rng(0)
    pts = np.concatenate([g.normal(0, 0.3, (600, 2)), g.normal(2, 0.5, (600, 2))])
    csv = tmp_path / "points.csv"
    csv.write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in pts))
    pts2d = {"name": "csv", "csv_path": str(csv), "n_train": 700, "n_val": 200, "n_test": 300}
    pfile = setup_params(proj, {"data": {"points2d": pts2d}, "realnvp2d": TINY_MODELS["realnvp2d"]})
    proj.python("stages/prepare.py", "points2d")
    proj.python("stages/train_realnvp2d.py")
    proj.python("stages/evaluate.py", "realnvp2d", "--params", pfile)
    m = metrics(root, "realnvp2d")
    assert not ENTROPY_KEYS & set(m), sorted(ENTROPY_KEYS & set(m))
    assert not any(k.endswith(("kl_gap", "sample_logp")) for k in m)
    assert POINT_KEYS | {"test_nll", "baseline_gaussian_test_nll", "baseline_kde_test_nll"} <= set(m)
    assert m["floor_source"] == "train_subset" and m["point_set"] == "csv"


def _auc_from_csv(path: Path) -> float:
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    assert rows[0].tolist() == [0.0, 0.0] and rows[-1].tolist() == [1.0, 1.0]
    return float(np.trapezoid(rows[:, 1], rows[:, 0]))


@pytest.mark.slow
def test_classifier_and_image_models(dvc_project) -> None:  # noqa: ANN001
    proj, root = dvc_project, dvc_project.root
    pfile = setup_params(proj, {"flow": TINY_MODELS["flow"], "ebm": TINY_MODELS["ebm"]})
    for ds in ("mnist", "fashion_mnist"):
        proj.python("stages/prepare.py", ds)
        proj.python("stages/train_classifier.py", ds, "--params", pfile)
        c = metrics(root, f"classifier_{ds}")
        assert c["test_accuracy"] > 0.5, c  # 10 classes: chance is 0.1
        assert (root / "models" / "classifier" / f"{ds}.pt").is_file()
    assert metrics(root, "classifier_mnist")["train_source"] == "test_file_split"
    assert metrics(root, "classifier_fashion_mnist")["train_source"] == "train_file"
    assert metrics(root, "classifier_mnist")["n_test"] == 2000  # 20 % of the 10,000-image test file

    proj.python("stages/train_flow.py")
    proj.python("stages/train_ebm.py")
    proj.python("stages/evaluate.py", "flow", "--params", pfile)
    proj.python("stages/evaluate.py", "ebm", "--params", pfile)

    f = metrics(root, "flow")
    need = {
        "test_bpd",
        "gaussian_bpd",
        "ood_auroc",
        "ood_auroc_mnist",
        "fid",
        "fid_floor",
        "fid_n_generated",
        "fid_n_real",
    }
    assert need <= set(f)
    for name in ("gaussian", "kde"):
        for k in ("test_bpd", "ood_auroc", "ood_auroc_mnist", "fid"):
            assert math.isfinite(f[f"baseline_{name}_{k}"]), (name, k)
    assert f["gaussian_bpd"] == f["baseline_gaussian_test_bpd"]
    assert f["fid_n_generated"] == 40 and f["fid_n_real"] == f["n_test"] and f["n_ood_mnist"] == 10000
    assert 0 < f["test_bpd"] < 8.5 and f["fid_floor"] < f["baseline_kde_fid"] + f["fid"]
    for key in ("ood_auroc", "ood_auroc_mnist"):
        assert _auc_from_csv(root / "plots" / "roc" / "flow" / f"{key}.csv") == pytest.approx(f[key], abs=0.01)

    e = metrics(root, "ebm")
    need = {"ood_auroc", "ood_auroc_noise", "ood_auroc_fashion", "fid", "fid_floor"}
    need |= {"energy_data", "energy_samples", "energy_noise"}
    assert need <= set(e)
    for name in ("gaussian", "kde"):
        for k in ("test_bpd", "ood_auroc", "ood_auroc_noise", "ood_auroc_fashion", "fid"):
            assert math.isfinite(e[f"baseline_{name}_{k}"]), (name, k)
    assert e["n_train"] == 686 and e["fid_n_generated"] == 40 and e["data_split"] == "test"
    # The validated ridge keeps the Gaussian's bits/dim sane although 686 zeros < 784 pixels.
    assert e["baseline_gaussian_test_bpd"] < 8.0
    for key in ("ood_auroc", "ood_auroc_noise", "ood_auroc_fashion"):
        assert _auc_from_csv(root / "plots" / "roc" / "ebm" / f"{key}.csv") == pytest.approx(e[key], abs=0.01)
