"""Shared fixtures: the real data mirror and a throw-away git + DVC copy of the project.

``dvc_project`` gives each test its own copy of the project (code, dvc.yaml, params.yaml)
in a fresh git repository with DVC initialised, tiny params, the real ``../shared/data``
mirror, and a private SQLite MLflow store. Tests run the real stage CLIs and real
``dvc repro`` in it: nothing is mocked.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GENMODELS_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()

# Small enough that every stage runs in seconds on 2 CPU cores.
TINY_PARAMS: dict[str, Any] = {
    "common": {"device": "cpu", "seed": 0, "num_threads": 1},
    "data": {
        "mnist": {"split": "test", "mirror": str(SHARED_DATA), "download": False},
        "fashion_mnist": {"split": "train", "mirror": str(SHARED_DATA), "download": False},
        "points2d": {"name": "two_moons", "n_train": 512, "n_val": 128, "n_test": 256, "seed": 0, "entropy_samples": 8192},
    },
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

# What a project copy needs (everything git tracks that the pipeline reads).
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "genmodels", ".dvcignore", "pyproject.toml"]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class DvcProject:
    """A temporary git + DVC copy of the project.

    Attributes:
        root: its folder.
        env: environment for commands (the test interpreter's bin dir first on PATH, so the
            ``python`` in dvc.yaml is this venv's; MLflow store inside ``root``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.com",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com",
            "DVC_NO_ANALYTICS": "1",
            "PYTHONHASHSEED": "0",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def write_params(self, overrides: Mapping[str, Any] | None = None, *, raw: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write params.yaml = the project's params + TINY_PARAMS + ``overrides`` (or exactly ``raw``)."""
        if raw is None:
            base = yaml.safe_load((REPO / "params.yaml").read_text())
            raw = deep_merge(deep_merge(base, TINY_PARAMS), overrides or {})
        (self.root / "params.yaml").write_text(yaml.safe_dump(dict(raw), sort_keys=False))
        return dict(raw)

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run a command in the project; on ``check`` failure the assertion shows its output."""
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    def python(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run ``python <args>`` with this venv's interpreter."""
        return self.run(sys.executable, *args, check=check, timeout=timeout)

    def dvc(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)

    def commit(self, message: str = "update") -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)

    def ran_stages(self, proc: subprocess.CompletedProcess[str]) -> list[str]:
        """Names of the stages a ``dvc repro`` output says it ran."""
        out = []
        for line in proc.stdout.splitlines():
            if line.startswith("Running stage '"):
                out.append(line.split("'")[1])
        return out


def copy_project(root: Path) -> None:
    """Copy what the pipeline reads (``PROJECT_FILES``) from this checkout into a new folder ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data mirror (``../shared/data``); its absence is a set-up error, not a skip."""
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        raise RuntimeError(f"data mirror not found at {SHARED_DATA}; set GENMODELS_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture
def dvc_project(tmp_path: Path, shared_data: Path) -> DvcProject:
    """A fresh git + DVC repo holding a copy of the project with tiny params (not yet committed runs)."""
    root = tmp_path / "project"
    copy_project(root)
    (root / ".gitignore").write_text(
        "/data/raw/\n/data/prepared/\n/models/\n/mlflow.db\n/mlartifacts/\n/mlruns/\n/.resume/\n/.locks/\n__pycache__/\n"
    )
    proj = DvcProject(root)
    proj.run("git", "init", "-q", "-b", "main")
    proj.dvc("init", "-q")
    proj.dvc("config", "core.autostage", "true")
    proj.write_params()
    proj.commit("init")
    return proj
