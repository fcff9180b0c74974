"""stages/_common.run_stage: the fast exit keeps everything a normal exit guarantees.

Each case runs a small click command through ``run_stage`` in a fresh interpreter and checks
the exit status, that buffered stdout/stderr arrive, that a non-daemon thread finished its
write and that atexit handlers ran: the parts of interpreter shutdown a stage relies on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
sys.path[:0] = [{stages!r}, {repo!r}]
import click
from _common import fail, run_stage

out = Path({out!r})

@click.command()
@click.argument("mode")
def main(mode: str) -> None:
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    def late() -> None:
        time.sleep(0.5)
        (out / "thread.txt").write_text("done")
    threading.Thread(target=late).start()
    sys.stdout.write("partial line without newline")  # stays in the buffer until flushed
    sys.stderr.write("to stderr")
    if mode == "fail":
        fail("bad input")
    if mode == "message":
        sys.exit("plain message")
    if mode == "bug":
        raise ValueError("a bug keeps its traceback")

run_stage(main)
"""


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "stage.py"
    script.write_text(_SCRIPT.format(stages=str(REPO / "stages"), repo=str(REPO), out=str(tmp_path)))
    return subprocess.run(
        [sys.executable, str(script), mode], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize(
    ("mode", "code", "stderr_part"),
    [("ok", 0, "to stderr"), ("fail", 2, "error: bad input"), ("message", 1, "plain message")],
)
def test_run_stage_exit_code_buffers_threads_and_atexit(tmp_path: Path, mode: str, code: int, stderr_part: str) -> None:
    proc = _run(tmp_path, mode)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "partial line without newline"
    assert stderr_part in proc.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"  # joined before the exit
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_run_stage_lets_a_bug_raise_with_its_traceback(tmp_path: Path) -> None:
    proc = _run(tmp_path, "bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ValueError: a bug keeps its traceback" in proc.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_run_stage_exits_normally_under_a_profiler(tmp_path: Path) -> None:
    """cProfile writes its stats at the normal exit: the fast exit must not skip that."""
    script = tmp_path / "stage.py"
    script.write_text(_SCRIPT.format(stages=str(REPO / "stages"), repo=str(REPO), out=str(tmp_path)))
    stats = tmp_path / "stage.prof"
    proc = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), str(script), "fail"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # (cProfile's runner swallows SystemExit, so the status is its own, not the stage's)
    assert "error: bad input" in proc.stderr
    assert stats.stat().st_size > 0
