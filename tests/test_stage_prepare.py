"""The prepare stage for real: dvc repro in a temporary git + DVC repo with the real data mirror."""

from __future__ import annotations

import json

import torch

from conftest import DvcProject


def test_dvc_repro_prepare_then_noop_then_only_points2d(dvc_project: DvcProject) -> None:
    proc = dvc_project.dvc("repro", "prepare")
    assert sorted(dvc_project.ran_stages(proc)) == ["prepare@fashion_mnist", "prepare@mnist", "prepare@points2d"]
    assert "split = test" in proc.stderr  # the MNIST split choice is printed
    root = dvc_project.root

    mnist = torch.load(root / "data/prepared/mnist.pt", weights_only=True)
    # all 980 zeros of the official test file, split without overlap
    assert mnist["train"].shape[0] + mnist["val"].shape[0] + mnist["test"].shape[0] == 980
    assert mnist["train"].dtype == torch.uint8 and mnist["train"].shape[1:] == (28, 28)
    flat = torch.cat([mnist[k].flatten(1) for k in ("train", "val", "test")])
    assert torch.unique(flat, dim=0).shape[0] == 980
    assert mnist["other"].shape[0] == 10000 - 980 and int((mnist["other_labels"] == 0).sum()) == 0

    fashion = torch.load(root / "data/prepared/fashion_mnist.pt", weights_only=True)
    assert fashion["train"].shape[0] + fashion["val"].shape[0] == 6000 and fashion["test"].shape[0] == 1000

    pts = torch.load(root / "data/prepared/points2d.pt", weights_only=True)
    assert pts["train"].shape == (512, 2) and pts["test"].shape == (256, 2)
    meta = json.loads((root / "metrics/data/points2d.json").read_text())
    assert abs(meta["true_entropy"] - pts["true_entropy"]) < 1e-12 and 0 < meta["true_entropy_se"] < 0.05

    data_json = json.loads((root / "metrics/data/mnist.json").read_text())
    assert data_json["split"] == "test" and data_json["test_file_class_0"] == 980
    assert data_json["sha256_test-images"] == "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"

    # MLflow got one run per stage, with the split logged
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["genmodels"])
    assert sorted(runs["tags.stage"]) == ["prepare@fashion_mnist", "prepare@mnist", "prepare@points2d"]
    assert set(runs["params.data.mnist.split"].dropna()) == {"test"}

    dvc_project.commit("prepared")
    assert dvc_project.ran_stages(dvc_project.dvc("repro", "prepare")) == []

    params = dvc_project.write_params({"data": {"points2d": {"n_train": 600}}})
    assert params["data"]["points2d"]["n_train"] == 600
    assert dvc_project.ran_stages(dvc_project.dvc("repro", "prepare")) == ["prepare@points2d"]
    assert torch.load(root / "data/prepared/points2d.pt", weights_only=True)["train"].shape == (600, 2)


def test_prepare_is_byte_identical_across_runs(dvc_project: DvcProject) -> None:
    dvc_project.python("stages/prepare.py", "points2d")
    first = (dvc_project.root / "data/prepared/points2d.pt").read_bytes()
    dvc_project.python("stages/prepare.py", "points2d")
    assert (dvc_project.root / "data/prepared/points2d.pt").read_bytes() == first


def test_bad_params_fail_before_work_with_the_key(dvc_project: DvcProject) -> None:
    dvc_project.write_params({"data": {"mnist": {"class_index": 11}}})
    proc = dvc_project.python("stages/prepare.py", "mnist", check=False)
    assert proc.returncode == 2
    assert "params key 'data.mnist.class_index': got 11; expected an integer from 0 to 9" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (dvc_project.root / "data/prepared/mnist.pt").exists()


def test_unavailable_split_fails_naming_the_file(dvc_project: DvcProject) -> None:
    dvc_project.write_params({"data": {"mnist": {"split": "train"}}})
    proc = dvc_project.python("stages/prepare.py", "mnist", check=False)
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte.gz not found" in proc.stderr and "data.mnist.split: test" in proc.stderr


def test_bad_csv_fails_naming_the_row(dvc_project: DvcProject) -> None:
    csv = dvc_project.root / "points.csv"
    csv.write_text("x,y\n" + "0.1,0.2\n" * 40 + "0.3,oops\n")
    dvc_project.write_params({"data": {"points2d": {"name": "csv", "csv_path": "points.csv"}}})
    proc = dvc_project.python("stages/prepare.py", "points2d", check=False)
    assert proc.returncode == 2
    assert "points.csv, row 42: non-numeric value" in proc.stderr


def test_csv_source_has_no_entropy(dvc_project: DvcProject) -> None:
    csv = dvc_project.root / "points.csv"
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 2, generator=g)
    csv.write_text("".join(f"{a:.6f},{b:.6f}\n" for a, b in rows.tolist()))
    dvc_project.write_params({"data": {"points2d": {"name": "csv", "csv_path": "points.csv"}}})
    dvc_project.python("stages/prepare.py", "points2d")
    pts = torch.load(dvc_project.root / "data/prepared/points2d.pt", weights_only=True)
    assert "true_entropy" not in pts
    assert pts["train"].shape[0] + pts["val"].shape[0] + pts["test"].shape[0] == 200
    meta = json.loads((dvc_project.root / "metrics/data/points2d.json").read_text())
    assert "true_entropy" not in meta and meta["csv_rows"] == 200
