"""The bad-input matrix: each case fails early with its specific message and a non-zero exit,
and destroys nothing that was already produced."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DvcProject
from genmodels.training import CheckpointError, load_checkpoint, save_checkpoint


class _Hostile:
    """Unpickling this would run a shell command (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _stage_fails(proj: DvcProject, *args: str, env: dict[str, str] | None = None) -> str:
    if env:
        proj.env.update(env)
    proc = proj.python(*args, check=False, timeout=600)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # The message a user sees (`pytest -rP tests/test_bad_inputs.py` lists them all).
    print("\n".join(line for line in proc.stderr.splitlines() if line.startswith("error:")))
    return proc.stderr


@pytest.mark.parametrize(
    ("case", "overrides", "fragment"),
    [
        (
            "unknown key",
            {"ddpm": {"lr_decya": 0.9}},
            "params key 'ddpm.lr_decya' (value 0.9) is not a known key; the keys under 'ddpm' are",
        ),
        (
            "wrong type",
            {"realnvp2d": {"batch_size": "big"}},
            "params key 'realnvp2d.batch_size': got 'big'; expected an integer",
        ),
        ("cuda without GPU", {"common": {"device": "cuda"}}, "common.device"),
        (
            "missing mirror",
            {"data": {"mnist": {"mirror": "/nonexistent/mirror"}}},
            "t10k-images-idx3-ubyte.gz not found",
        ),
    ],
)
def test_params_and_environment_errors(dvc_project: DvcProject, case: str, overrides: dict, fragment: str) -> None:
    if case == "cuda without GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda is valid here")
    dvc_project.write_params(overrides)
    assert fragment in _stage_fails(dvc_project, "stages/prepare.py", "mnist")


@pytest.mark.parametrize(
    ("case", "text", "fragment"),
    [
        ("NaN in CSV", "x,y\n" + "0.5,0.5\n" * 30 + "nan,0.1\n", "row 32: non-finite value"),
        ("empty CSV", "", "only 0 data rows"),
    ],
)
def test_bad_csv(dvc_project: DvcProject, case: str, text: str, fragment: str) -> None:
    (dvc_project.root / "pts.csv").write_text(text)
    dvc_project.write_params({"data": {"points2d": {"name": "csv", "csv_path": "pts.csv"}}})
    assert fragment in _stage_fails(dvc_project, "stages/prepare.py", "points2d")


@pytest.mark.parametrize(
    "stage", [("stages/train_realnvp2d.py",), ("stages/train_ddpm.py",), ("stages/evaluate.py", "ddpm")]
)
@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "prepared 2D points not found; run `dvc repro prepare@points2d` first"),
        ("3 columns", "no 'train' tensor of shape (N, 2); re-run `dvc repro prepare@points2d`"),
        ("not a dict", "no 'train' tensor of shape (N, 2)"),
    ],
)
def test_bad_prepared_points(dvc_project: DvcProject, stage: tuple[str, ...], case: str, fragment: str) -> None:
    """Every stage that reads data/prepared/points2d.pt checks it before training or evaluating
    anything (one shared loader), and names the file and the command that remakes it."""
    path = dvc_project.root / "data/prepared/points2d.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "3 columns":
        torch.save({"train": torch.zeros(8, 3), "val": torch.zeros(4, 2), "test": torch.zeros(4, 2)}, path)
    elif case == "not a dict":
        torch.save(torch.zeros(8, 2), path)
    msg = _stage_fails(dvc_project, *stage)
    assert f"error: {Path('data/prepared/points2d.pt')}: {fragment}" in msg, msg[-2000:]
    assert not (dvc_project.root / "models").exists()  # failed before anything was written


@pytest.mark.parametrize("damage", ["truncated", "wrong magic"])
def test_damaged_idx_in_raw_dir(dvc_project: DvcProject, shared_data: Path, damage: str) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    raw = dvc_project.root / "data" / "raw" / "mnist"
    raw.mkdir(parents=True)
    if damage == "truncated":
        data = (shared_data / "mnist" / name).read_bytes()
        (raw / name).write_bytes(data[: len(data) // 3])
        fragment = "corrupted or truncated"
    else:
        with gzip.open(shared_data / "mnist" / name) as fh:
            body = bytearray(fh.read())
        body[2] = 0x07  # element-type byte of the magic number
        with gzip.open(raw / name, "wb") as fh:
            fh.write(bytes(body))
        fragment = "checksum mismatch"  # verification runs before parsing: the digests name the file
    msg = _stage_fails(dvc_project, "stages/prepare.py", "mnist")
    assert fragment in msg and str(Path("data/raw/mnist") / name) in msg


def test_unwritable_output_folder_keeps_existing_outputs(dvc_project: DvcProject) -> None:
    dvc_project.python("stages/prepare.py", "points2d")
    good = (dvc_project.root / "data/prepared/points2d.pt").read_bytes()
    blocker = dvc_project.root / "not_a_dir"
    blocker.write_text("a file where the output folder should be")
    msg = _stage_fails(dvc_project, "stages/prepare.py", "points2d", "--out-dir", "not_a_dir/prepared")
    assert "not_a_dir" in msg
    assert (dvc_project.root / "data/prepared/points2d.pt").read_bytes() == good


def test_unreachable_tracking_server_fails_fast(dvc_project: DvcProject) -> None:
    msg = _stage_fails(dvc_project, "stages/prepare.py", "points2d", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert "http://127.0.0.1:9" in msg and "unreachable" in msg
    assert not (dvc_project.root / "data/prepared/points2d.pt").exists()


def _tiny_realnvp_checkpoint(path: Path) -> None:
    from genmodels.configs import RealNVP2DConfig
    from genmodels.flows.realnvp2d import build_model, save_trained

    cfg = RealNVP2DConfig(n_layers=2, hidden_units=8)
    save_trained(path, build_model(cfg), cfg)


def test_checkpoint_of_another_model_is_refused(dvc_project: DvcProject) -> None:
    ckpt = dvc_project.root / "rnvp.pt"
    _tiny_realnvp_checkpoint(ckpt)
    msg = _stage_fails(dvc_project, "stages/sample.py", "ddpm", "--checkpoint", "rnvp.pt", "--out", "x.csv")
    assert "holds a 'realnvp2d' model, expected 'ddpm'" in msg
    assert not (dvc_project.root / "x.csv").exists()


def test_file_that_is_not_a_checkpoint(dvc_project: DvcProject) -> None:
    (dvc_project.root / "notes.pt").write_text("these are my notes, not weights")
    msg = _stage_fails(dvc_project, "stages/sample.py", "realnvp2d", "--checkpoint", "notes.pt", "--out", "x.csv")
    assert "not a loadable genmodels checkpoint" in msg and "this file is not one" in msg


def test_hostile_pickle_is_refused_and_does_not_execute(dvc_project: DvcProject, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"kind": "realnvp2d", "config": {}, "model": _Hostile(marker)}, dvc_project.root / "evil.pt")
    msg = _stage_fails(dvc_project, "stages/sample.py", "realnvp2d", "--checkpoint", "evil.pt", "--out", "x.csv")
    assert "weights_only=True" in msg and "refused: Trying to load unsupported GLOBAL" in msg and "system" in msg
    assert "weights_only=False" not in msg  # no advice to do the unsafe thing
    assert not marker.exists()


def test_checkpoint_from_another_config(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, kind="ddpm", config={"n_steps": 2500, "hidden_units": 64}, model={})
    with pytest.raises(CheckpointError, match=r"another config \(hidden_units: checkpoint 64 vs params 32\)"):
        load_checkpoint(path, kind="ddpm", config={"n_steps": 2500, "hidden_units": 32})
    shutil.copy(path, tmp_path / "d.pt")
    assert (
        load_checkpoint(tmp_path / "d.pt", kind="ddpm", config={"n_steps": 2500, "hidden_units": 64})["kind"] == "ddpm"
    )
