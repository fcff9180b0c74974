"""Pieces every trainer shares: device choice, seeding, atomic checkpoints, resume, early stopping.

Conventions (all four models follow them):

* Training code never logs anywhere itself. It takes an ``on_epoch(epoch, metrics)``
  callback; the stage script turns that into MLflow metrics and a CSV series.
* Randomness comes from explicit ``torch.Generator`` objects seeded from the params, so the
  same params and seed give byte-identical results on the CPU, and the generator states
  go into the resume checkpoint.
* Files are written atomically (temp file + ``os.replace``): an interrupted stage never
  leaves a half-written checkpoint that DVC or a resume could take as valid.
* Checkpoints are plain dicts of tensors and builtins, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

EpochCallback = Callable[[int, Mapping[str, float]], None]
"""``on_epoch(epoch, metrics)``: called once per finished epoch (epoch counts from 1)."""


class NonFiniteLossError(RuntimeError):
    """A loss or statistic became NaN/inf; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, not a checkpoint, or for another model/config."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error.

    Raises:
        RuntimeError: ``cuda`` requested but ``torch.cuda.is_available()`` is false.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "params key 'common.device': got 'cuda' but no CUDA GPU is visible to PyTorch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); set common.device to 'auto' or 'cpu'"
        )
    return torch.device(requested)


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=...)`` without its import cost.

    Since torch 2.6 the public function also sets ``torch._inductor.config.deterministic``,
    and importing that config pulls in dynamo and inductor: about 2 s per stage process on
    these CPUs, the largest start-up cost of a smoke run. Nothing here compiles with
    inductor, so when it has not been imported yet only the ATen flag (which is what eager
    kernels consult) is set; if inductor is already loaded, or the private setter is gone in
    a future torch, the public function is used.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        return
    setter(mode, warn_only=warn_only)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of handing it back to the kernel.

    PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold
    (128 KiB at start; a 4,096 x 64 float32 activation is 1 MiB) with a fresh ``mmap`` and
    returns the top of the heap to the kernel once more than the trim threshold is free, so a
    training step that allocates and frees the same few MiB every iteration page-faults its
    activations in anew each time. Measured on these CPUs: a DDPM forward pass (batch 4,096,
    5 x 64, one thread) took 5.2-5.4 ms, 3.2-3.3 ms with the thresholds raised.

    Raises the mmap threshold to 32 MiB (glibc's maximum) and the trim threshold and top pad
    so the heap keeps up to 256 MiB free. Results are unchanged (only where memory comes
    from). A no-op returning False where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    return bool(ok)


def configure_torch(num_threads: int = 0, deterministic: bool = True) -> None:
    """Thread count, deterministic algorithms and the CPU allocator, set once at the start of a stage."""
    tune_cpu_allocator()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if deterministic:
        # warn_only: a few CUDA kernels have no deterministic version; they warn instead of failing.
        _set_deterministic(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _umask_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp's 0600 is too strict for outputs)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def canonical(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose strings are interned (tensors are not copied).

    Pickle memoises objects by identity, so two equal payloads whose strings are distinct
    objects in one and shared in the other (a history restored from a resume file against one
    built in memory) serialise to different bytes. Interning every string makes the bytes a
    function of the values only, which keeps a resumed run's checkpoint byte-identical.
    """
    if isinstance(obj, str):
        return sys.intern(str(obj))
    if isinstance(obj, Mapping):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(canonical(v) for v in obj)
    return obj


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` of :func:`canonical` ``(obj)`` to a temp file in the same folder, then
    ``os.replace`` (atomic on POSIX): equal values give equal bytes, and no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(canonical(obj), fh)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write text atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike[str], *, kind: str, config: Mapping[str, Any], **payload: Any) -> None:
    """Save ``{'kind', 'config', **payload}`` atomically (see :func:`atomic_save`).

    Args:
        kind: model name (``realnvp2d``, ``ddpm``, ``ebm``, ``flow``) checked on load.
        config: the plain-dict config that rebuilds the model.
        payload: state dicts, tensors, numbers (nothing that needs unpickling code).
    """
    atomic_save({"kind": kind, "config": dict(config), **payload}, path)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str,
    config: Mapping[str, Any] | None = None,
    map_location: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check it is the expected one.

    Args:
        kind: expected model name.
        config: when given, the checkpoint's config must equal it (a checkpoint from
            another config would silently produce wrong results).

    Raises:
        CheckpointError: file missing, not a torch checkpoint, refused by the safe
            unpickler (e.g. a pickle that would run code), or kind/config mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file; run the training stage first (dvc repro)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a safe checkpoint"
        text = str(err).strip()
        if text.startswith("Weights only load failed") and "\n" in text:
            # torch's refusal opens with advice to reload with weights_only=False, which is exactly
            # what must not be done with an untrusted file; keep only what it refused and why.
            body = text.split("\n", 1)[1].split("Check the documentation")[0]
            body = body.split("your use case:")[-1].replace("WeightsUnpickler error:", "")
            first = "refused: " + " ".join(body.split())
        elif not zipfile.is_zipfile(path):
            first = "not a torch checkpoint at all: torch.save writes a zip archive and this file is not one"
        else:
            first = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path}: not a loadable genmodels checkpoint ({type(err).__name__}: {first[:300]}); "
            "it is loaded with weights_only=True, so files holding arbitrary Python objects are refused"
        ) from None
    if not isinstance(obj, dict) or "kind" not in obj or "config" not in obj:
        raise CheckpointError(f"checkpoint {path}: not a genmodels checkpoint (no 'kind'/'config' entries)")
    if obj["kind"] != kind:
        raise CheckpointError(f"checkpoint {path}: holds a '{obj['kind']}' model, expected '{kind}'")
    if config is not None and dict(obj["config"]) != dict(config):
        diff = sorted(k for k in set(obj["config"]) | set(config) if obj["config"].get(k) != config.get(k))
        detail = ", ".join(f"{k}: checkpoint {obj['config'].get(k)!r} vs params {config.get(k)!r}" for k in diff[:5])
        raise CheckpointError(f"checkpoint {path}: was trained with another config ({detail}); retrain it (dvc repro)")
    return obj


@torch.no_grad()
def update_average(average: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    """One step of an exponential moving average of weights: ``average += (1 - d) (params - average)``
    with the warm-up ``d = min(decay, (1 + step) / (10 + step))`` (TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates = step``), so that early on the average is
    not dominated by the initial weights. ``average`` and ``params``: matching tensor lists."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    torch._foreach_lerp_(average, params, 1.0 - d)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values`` (N,) and its standard error ``std / sqrt(N)`` (unbiased std; NaN for
    N < 2), in float64 on the CPU: every reported "mean +- se" (test NLL, bits/dim, metric draws,
    floors) is this one computation, whatever device produced the values."""
    v = values.detach().to("cpu", torch.float64)
    se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


def check_finite(value: float, what: str, epoch: int) -> None:
    """Raise :class:`NonFiniteLossError` when ``value`` is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} became {value} at epoch {epoch}; the last good checkpoint is kept")


@dataclass
class EarlyStopping:
    """Track the best validation loss; ``step`` returns True when training should stop.

    Attributes:
        patience: epochs without an improvement larger than ``min_delta`` before stopping.
    """

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; True when patience is exhausted."""
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    @property
    def improved(self) -> bool:
        """Whether the last ``step`` set a new best."""
        return self.bad_epochs == 0

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


@dataclass
class History:
    """Per-epoch metrics, kept in the resume state so a resumed run's series is complete."""

    rows: list[dict[str, float]] = field(default_factory=list)

    def append(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.rows.append({"epoch": float(epoch), **{k: float(v) for k, v in metrics.items()}})

    def to_csv(self) -> str:
        """CSV text with a header; columns in first-seen order."""
        cols: list[str] = []
        for r in self.rows:
            cols.extend(c for c in r if c not in cols)
        lines = [",".join(cols)]
        for r in self.rows:
            lines.append(",".join(_fmt(r.get(c)) for c in cols))
        return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def generator_state(g: torch.Generator) -> torch.Tensor:
    """State of ``g`` as a CPU uint8 tensor (safe for ``weights_only`` checkpoints)."""
    return g.get_state().cpu()


def set_generator_state(g: torch.Generator, state: torch.Tensor) -> None:
    """Restore a state saved by :func:`generator_state` (CPU and CUDA generators take a CPU tensor)."""
    g.set_state(state.cpu())


def resume_path(root: str | os.PathLike[str], stage: str) -> Path:
    """Where a stage keeps its resume state: ``<root>/.resume/<stage>.pt``.

    The file is deliberately not a DVC output: DVC deletes a stage's outputs before
    running it, and the resume state has to survive exactly that. It is removed when the
    stage finishes, and ignored when its config differs from the current params.
    """
    return Path(root) / ".resume" / f"{stage}.pt"
