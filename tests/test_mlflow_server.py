"""Team set-up: stages log to a real ``mlflow server`` on loopback chosen by ``MLFLOW_TRACKING_URI``,
and fail fast with the URI in the message when the server is down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_experiments import add_realnvp2d_stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and a served artifact root; yields its URI."""
    port = _free_port()
    store = tmp_path / "server" / "mlflow.db"
    artifacts = tmp_path / "server" / "artifacts"
    store.parent.mkdir(parents=True)
    log = (tmp_path / "server" / "server.log").open("w")
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # first start creates the schema; slow on a loaded machine
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(
                    f"mlflow server did not come up:\n{(tmp_path / 'server' / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(1)
        yield uri
    finally:
        # Only the process group this fixture started (uvicorn/gunicorn workers included).
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_stage_logs_to_tracking_server(dvc_project: Any, mlflow_server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    proj = dvc_project
    add_realnvp2d_stage(proj)
    proj.env["MLFLOW_TRACKING_URI"] = mlflow_server
    proj.dvc("repro", "train_realnvp2d")
    assert not (proj.root / "mlflow.db").exists()  # nothing went to the local store

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("genmodels")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train_realnvp2d'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["device"] == "cpu"
    assert run.data.tags["git_commit"] == proj.run("git", "rev-parse", "HEAD").stdout.strip()
    assert run.data.params["realnvp2d.n_layers"] == "2"
    # Per-epoch history with steps, and the final metric equal to the DVC metrics file.
    hist = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in hist) == [1, 2]
    import json

    final = json.loads((proj.root / "metrics/train_realnvp2d.json").read_text())
    assert abs(run.data.metrics["test_nll"] - final["test_nll"]) < 1e-9
    # The checkpoint went through the server's artifact proxy: download it and compare bytes.
    dst = tmp_path / "download"
    dst.mkdir()
    local = client.download_artifacts(run.info.run_id, "model/model.pt", str(dst))
    assert Path(local).read_bytes() == (proj.root / "models/realnvp2d/model.pt").read_bytes()


def test_unreachable_server_fails_fast_naming_the_uri(dvc_project: Any) -> None:
    proj = dvc_project
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proj.env["MLFLOW_TRACKING_URI"] = uri
    t0 = time.monotonic()
    proc = proj.python("stages/prepare.py", "points2d", check=False, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert uri in proc.stderr and "unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Seconds, not MLflow's minutes of retries (the bound includes interpreter start-up under load).
    assert elapsed < 90, elapsed
    assert not (proj.root / "data/prepared/points2d.pt").exists()
