"""Glue shared by the stage scripts: params, torch set-up, MLflow tracking, output writing, errors,
the prepared 2D points and the 2D training stages' start and figures.

Stage scripts parse paths (click), read params, call ``genmodels``, log and write. This
module holds the parts they share so each stage stays thin. It is the only place that
talks to MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import torch
import yaml

from genmodels.configs import ConfigError, Params, flatten, load_params, to_dict
from genmodels.training import (
    CheckpointError,
    History,
    NonFiniteLossError,
    atomic_write_text,
    configure_torch,
    resolve_device,
    resume_path,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2


class TrackingError(RuntimeError):
    """The MLflow tracking server/store cannot be reached or written."""


# --------------------------------------------------------------------------- errors


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from genmodels.data.idx import DataFileError
    from genmodels.data.points2d import PointSetError

    return (
        ConfigError,
        DataFileError,
        PointSetError,
        CheckpointError,
        NonFiniteLossError,
        TrackingError,
        FileNotFoundError,
        PermissionError,
    )


def stage_main(fn: F) -> F:
    """Decorator for a stage's click callback: known errors become one clear message + exit 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _known_errors() as err:
            fail(str(err))
        except OSError as err:
            # Unwritable or full output folder, a path that is a file, ...: the message names the path.
            fail(f"cannot read or write {err.filename or 'a file'}: {err.strerror or err}")
        except RuntimeError as err:
            if "common.device" in str(err):
                fail(str(err))
            raise

    return wrapper  # type: ignore[return-value]


def run_stage(cli: click.Command) -> NoReturn:
    """Run ``cli`` as the process's entry point (``if __name__ == "__main__"``) and exit fast.

    Finalising an interpreter that has loaded torch, MLflow and SQLAlchemy (module teardown,
    garbage collection of everything still referenced) takes about 2 s on these CPUs: longer
    than the work of most smoke-params stages, 18 times per pipeline. By the time the command
    returns, every output is closed and renamed into place and the MLflow run has ended, so
    this does what a normal exit does that matters (join non-daemon threads, run the atexit
    handlers, flush stdio) and then leaves with ``os._exit``, skipping the teardown.

    An exception that escapes click (a bug) is re-raised: it keeps its traceback and the
    normal exit path. Tests call the click commands directly, so this is never in their way.
    """
    try:
        cli.main(standalone_mode=True)  # click always ends with SystemExit here
        code: int | str | None = 0
    except SystemExit as done:
        code = done.code
    if sys.getprofile() is not None or sys.gettrace() is not None:
        # cProfile, pyinstrument, coverage, a debugger: they write their results at the normal
        # exit, so give them one.
        raise SystemExit(code)
    if isinstance(code, str):  # sys.exit("message"): what Python prints, with status 1
        print(code, file=sys.stderr)
        code = 1
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the documented handlers, run as a normal exit would
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


# --------------------------------------------------------------------------- params


def load_params_or_exit(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """Parse and validate the whole ``params.yaml`` before any work.

    Exits with a message naming the key on any invalid value (via :func:`stage_main`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (run the stage from the project root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(str(path), "<unparsable>", f"valid YAML ({err})") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(str(path), raw, "a mapping of sections")
    return load_params(raw)


def setup_torch(params: Params) -> torch.device:
    """Threads, determinism and the device from ``common`` (fails early for cuda without GPU)."""
    configure_torch(params.common.num_threads, params.common.deterministic)
    return resolve_device(params.common.device)


# --------------------------------------------------------------------------- paths


def project_root() -> Path:
    """The project's *original* root, also when DVC runs a queued experiment in a temp copy.

    ``dvc exp run --queue`` executes each experiment in ``<root>/.dvc/tmp/exps/tmpXXXX``;
    anything resolved relative to that folder (a ``sqlite:///mlflow.db`` store) would land in
    a throw-away copy. So we walk out of ``.dvc/tmp/exps``.
    """
    cwd = Path(os.environ.get("DVC_ROOT", os.getcwd())).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def resolve_input(path: str) -> Path:
    """A path from params: as given if absolute or present relative to the working directory,
    else relative to the project's original root (queued DVC experiments run in a temp copy,
    where a relative path to something outside the repository, like ``../shared/data``, breaks)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return project_root() / p


# --------------------------------------------------------------------------- output writing


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Sorted, indented JSON written atomically; non-finite floats become null (JSON has no NaN)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    atomic_write_text(json.dumps(clean(dict(data)), indent=2, sort_keys=True) + "\n", path)


def write_csv(path: str | os.PathLike[str], history: History) -> None:
    """Per-epoch series as CSV for ``dvc plots`` (atomic)."""
    atomic_write_text(history.to_csv(), path)


# --------------------------------------------------------------------------- 2D point sets (stages that read points2d.pt)


def load_points2d(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The prepared 2D point set that ``prepare@points2d`` writes: ``train``, ``val``, ``test``
    tensors (N, 2), ``name``, and for a built-in set ``true_entropy``(``_se``).

    A missing file, or one without the three splits of shape (N, 2), fails here with the file's
    name and the command that (re)makes it, before a stage trains or evaluates anything.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prepared 2D points not found; run `dvc repro prepare@points2d` first")
    data = torch.load(p, map_location="cpu", weights_only=True)
    for split in ("train", "val", "test"):
        t = data.get(split) if isinstance(data, dict) else None
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != 2:
            raise FileNotFoundError(f"{p}: no '{split}' tensor of shape (N, 2); re-run `dvc repro prepare@points2d`")
    return data


@dataclass
class Points2DStart:
    """What a 2D training stage (``train_realnvp2d``, ``train_ddpm``) starts from.

    Attributes:
        params: the checked params; dist: this process's place in a (torchrun) job, with its
        device; train, val, test: (N, 2) splits; name: the point set's name; entropy: its true
        entropy (None for a CSV); resume: the stage's resume-state path.
    """

    params: Params
    dist: Any  # genmodels.distributed.DistInfo
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    name: str
    entropy: float | None
    resume: Path


def start_points2d_training(stage: str, params_path: str, data_path: Path) -> Points2DStart:
    """Params, torch set-up, the process group, the checked 2D points and the resume path, in
    the order every 2D training stage needs them (bad params or data fail before any work)."""
    # imported here: the stages that never train (prepare) do not depend on it in dvc.yaml
    from genmodels.distributed import init_from_env

    params = load_params_or_exit(params_path)
    # Under `torchrun --nproc_per_node N` this joins the process group (gloo on CPU, nccl on
    # CUDA, one GPU per rank); run plainly it is a single process and changes nothing.
    dist_info = init_from_env(setup_torch(params))
    data = load_points2d(data_path)
    train, val, test = data["train"], data["val"], data["test"]
    name = str(data.get("name", "unknown"))
    click.echo(
        f"[{stage}] 2D set '{name}': train {train.shape[0]}, val {val.shape[0]}, test {test.shape[0]}; "
        f"device {dist_info.device}",
        err=True,
    )
    resume = resume_path(Path.cwd(), stage)
    if dist_info.is_main and resume.is_file():
        click.echo(f"[{stage}] found resume state {resume}; continuing from it if its config matches", err=True)
    entropy = float(data["true_entropy"]) if "true_entropy" in data else None
    return Points2DStart(params, dist_info, train, val, test, name, entropy, resume)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported here, not at module load:
    stages that draw nothing should not pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_points_panels(panels: Sequence[tuple[str, torch.Tensor]], path: Path, title: str) -> Any:
    """The 2D training stages' three-panel scatter figure: data | a noise-space view | samples.

    ``panels``: three (name, points (N, 2)) pairs; the first and last share data-unit limits,
    the middle one (latent or diffused points, standard-normal-like) is shown on [-4, 4]^2.
    Written to ``path`` (PNG) without timestamps, so that the same params and seed give
    byte-identical files; returns the figure (the caller logs it, then closes it).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (name, pts) in zip(axes, panels, strict=True):
        p = pts.detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4, rasterized=True)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal")
    lim = [min(a.get_xlim()[0] for a in (axes[0], axes[2])), max(a.get_xlim()[1] for a in (axes[0], axes[2]))]
    for ax in (axes[0], axes[2]):
        ax.set_xlim(lim)
        ax.set_ylim(lim)
    axes[1].set_xlim(-4, 4)
    axes[1].set_ylim(-4, 4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return fig


def save_loss_curves(
    rows: Sequence[Mapping[str, float]],
    path: Path,
    *,
    entropy: float | None,
    what: str,
    terms: torch.Tensor | None = None,
) -> Any:
    """Train/val loss per epoch (``rows``: History rows with ``epoch``, ``train_loss``,
    ``val_loss``), labelled ``train <what>`` / ``val <what>``, with the true entropy as a dashed
    line when known; beside it, when ``terms`` (L,) is given, the mean ELBO term per diffusion
    step on a log scale. Written to ``path`` (PNG, no timestamps); returns the figure.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if terms is not None else 1, figsize=(10 if terms is not None else 5, 3.5))
    ax = axes[0] if terms is not None else axes
    ep = [r["epoch"] for r in rows]
    ax.plot(ep, [r["train_loss"] for r in rows], label=f"train {what}")
    ax.plot(ep, [r["val_loss"] for r in rows], label=f"val {what}")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label="true entropy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.legend()
    if terms is not None:
        ax = axes[1]
        ax.semilogy(range(1, terms.shape[0] + 1), terms.clamp_min(1e-12).cpu().numpy())
        ax.set_xlabel("step t")
        ax.set_ylabel("mean ELBO term (nats, w/o constants)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return fig


def close_figure(fig: Any) -> None:
    """Release a figure from pyplot's registry once it is saved and logged."""
    _pyplot().close(fig)


# --------------------------------------------------------------------------- MLflow


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store at an absolute path in the project root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (seconds, not minutes of retries) when an http(s) tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-configured URI
            if resp.status != 200:
                raise TrackingError(f"MLflow tracking server {uri} answered {resp.status} on /health")
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {err}. "
            "Start it (see README, 'Team set-up') or unset MLFLOW_TRACKING_URI to use the local SQLite store."
        ) from None


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class _SqliteLock:
    """Inter-process lock serialising writes to a SQLite MLflow store.

    ``dvc queue start -j N`` runs stages in parallel processes that all write the one
    store; SQLite allows one writer at a time and MLflow's first-use schema migration is
    not safe under concurrency, so every write goes through this ``flock``.
    """

    def __init__(self, uri: str) -> None:
        self.path: Path | None = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            self.path = db.parent / ".locks" / (db.name + ".lock")
            self.path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        with self.path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class StageRun:
    """An open MLflow run of one stage. Use through :func:`mlflow_run`.

    Every write is serialised by :class:`_SqliteLock` for SQLite stores.
    """

    def __init__(self, client: Any, run_id: str, lock: _SqliteLock, stage: str) -> None:
        self.client = client
        self.run_id = run_id
        self._lock = lock
        self.stage = stage

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock():
            return fn(*args, **kwargs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Finite numeric metrics only (NaN/inf and non-numbers are skipped: MLflow rejects some)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in sorted(metrics.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), 1000):
            self._call(self.client.log_batch, self.run_id, metrics=items[i : i + 1000])

    def on_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Training callback: per-epoch metrics with ``step = epoch``."""
        self.log_metrics(metrics, step=epoch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._call(self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib figure as ``figures/<name>`` in the run."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            fig.savefig(p, dpi=100, bbox_inches="tight")
            self.log_artifact(p, "figures")

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=str))
            self.log_artifact(p)


@contextlib.contextmanager
def mlflow_run(stage: str, params: Params, sections: Sequence[str], device: torch.device | str) -> Iterator[StageRun]:
    """Open an MLflow run for ``stage`` with its params sections logged and the standard tags.

    Tags: ``stage``, ``git_commit``, ``dvc_exp_name`` / ``dvc_exp_baseline_rev`` (when DVC runs
    the stage as an experiment), ``device``. The run ends ``FINISHED`` or, on an exception,
    ``FAILED`` (the exception propagates).

    Raises:
        TrackingError: an http(s) tracking server is unreachable (checked in seconds).
    """
    # Fail fast instead of MLflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = tracking_uri()
    _check_reachable(uri)
    import mlflow
    from mlflow.tracking import MlflowClient

    root = project_root()
    lock = _SqliteLock(uri)
    client = MlflowClient(tracking_uri=uri)
    name = params.common.mlflow_experiment
    with lock():
        try:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                artifact_location = None
                if uri.startswith("sqlite:///") or uri.startswith("file:"):
                    # Absolute artifact root beside the store (a relative ./mlruns would scatter
                    # artifacts into DVC's temp experiment folders).
                    artifact_location = (root / "mlartifacts").as_uri()
                exp_id = client.create_experiment(name, artifact_location=artifact_location)
            else:
                exp_id = exp.experiment_id
        except mlflow.exceptions.MlflowException as err:
            raise TrackingError(f"MLflow store {uri}: {err}") from None
        exp_name = os.environ.get("DVC_EXP_NAME", "")
        tags = {
            "stage": stage,
            "git_commit": _git_commit(Path.cwd()),
            "mlflow.source.git.commit": _git_commit(Path.cwd()),
            "device": str(device),
            "dvc_exp_name": exp_name,
            "dvc_exp_baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
            "mlflow.runName": f"{stage}@{exp_name}" if exp_name else stage,
        }
        run = client.create_run(exp_id, tags=tags)
    sr = StageRun(client, run.info.run_id, lock, stage)
    logged: dict[str, Any] = {}
    for s in sections:
        logged.update(flatten(to_dict(getattr(params, s)), s))
    logged.update(flatten(to_dict(params.common), "common"))
    sr.log_params(logged)
    click.echo(f"[{stage}] MLflow run {run.info.run_id} in {uri} (experiment '{name}')", err=True)
    status = "FAILED"
    try:
        yield sr
        status = "FINISHED"
    finally:
        with contextlib.suppress(Exception):
            sr._call(client.set_terminated, sr.run_id, status)


def section_params(params: Params, *sections: str) -> dict[str, Any]:
    """Flattened ``{section.key: value}`` for the given sections (for logging/metrics files)."""
    out: dict[str, Any] = {}
    for s in sections:
        out.update(flatten(to_dict(getattr(params, s)), s))
    return out
