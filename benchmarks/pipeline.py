"""Benchmark the whole pipeline: per-stage wall time and peak memory, the no-op repro, and
which stages one model's params change re-runs.

    python benchmarks/pipeline.py                 # the default params, in a temp copy of this checkout
    python benchmarks/pipeline.py --smoke         # the tiny CI params (params.smoke.yaml merged in)
    python benchmarks/pipeline.py --in-place      # run in this checkout (updates its outputs and dvc.lock)
    python benchmarks/pipeline.py --smoke --twice # a second `dvc repro --force`: sha256 of every output of both runs
    python benchmarks/pipeline.py --log run.log   # also keep DVC's and the stages' full output

Prints a table; `--json FILE` also writes the figures. Timings are wall-clock on whatever
machine runs it (the budget of the project is stated for 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from smoke import merge_smoke_params  # noqa: E402

COPY = ["dvc.yaml", "params.yaml", "params.smoke.yaml", "stages", "genmodels", ".dvcignore", "pyproject.toml", "sweeps.yaml"]


def make_copy(dest: Path) -> Path:
    """A fresh git + DVC repo with this checkout's pipeline files (no outputs, no dvc.lock)."""
    dest.mkdir(parents=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for ds in ("mnist", "fashion_mnist"):  # the mirror beside *this* checkout
        mirror = params["data"][ds]["mirror"]
        if not Path(mirror).is_absolute():
            params["data"][ds]["mirror"] = str((REPO / mirror).resolve())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    for cmd in (["git", "init", "-q", "-b", "main"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@example.com")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of every pipeline output (checkpoints, prepared data, metrics, CSV series, figures),
    except ``metrics/timing/``: wall-clock figures, kept apart because they never repeat."""
    out = {}
    for folder in ("models", "data/prepared", "metrics", "plots"):
        for p in sorted((root / folder).rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not rel.startswith("metrics/timing/"):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def repro(root: Path, *args: str, log: Path | None = None) -> tuple[float, dict[str, dict[str, float]], str]:
    """Run `dvc repro <args>`; returns total seconds, {stage: {seconds, peak_rss_mib}}, output.

    With ``log``, every line of DVC's and the stages' output is appended there as it comes (the
    stages' warnings, e.g. PyTorch's notes on CUDA ops without a deterministic kernel, are
    otherwise only shown when the run fails)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *args], cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    stages: dict[str, dict[str, float]] = {}
    current: list[str | None] = [None]
    started: dict[str, float] = {}
    stop = threading.Event()

    def sample_memory() -> None:
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            stage = current[0]
            if stage is not None:
                try:
                    rss = sum(p.memory_info().rss for p in parent.children(recursive=True) if "dvc" not in " ".join(p.cmdline()[:3]))
                except psutil.Error:
                    rss = 0
                s = stages.setdefault(stage, {"seconds": 0.0, "peak_rss_mib": 0.0})
                s["peak_rss_mib"] = max(s["peak_rss_mib"], rss / 2**20)
            time.sleep(0.1)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    lines = []
    assert proc.stdout is not None
    sink = log.open("a") if log is not None else None
    if sink is not None:
        sink.write(f"$ dvc repro {' '.join(args)}\n")
    for line in proc.stdout:
        lines.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()
        now = time.perf_counter()
        if line.startswith("Running stage '") or line.startswith("Stage '") or "Updating lock file" in line:
            if current[0] is not None and current[0] in started:
                stages.setdefault(current[0], {"seconds": 0.0, "peak_rss_mib": 0.0})["seconds"] = now - started[current[0]]
            if line.startswith("Running stage '"):
                name = line.split("'")[1]
                current[0] = name
                started[name] = now
            else:
                current[0] = None
    proc.wait()
    if sink is not None:
        sink.close()
    total = time.perf_counter() - t0
    stop.set()
    sampler.join()
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return total, stages, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="merge params.smoke.yaml (the CI params) into params.yaml")
    ap.add_argument("--in-place", action="store_true", help="run in this checkout instead of a temp copy")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--change", default="ddpm.lr", help="a params key to perturb for the selective re-run check")
    ap.add_argument("--twice", action="store_true", help="run `dvc repro --force` again and compare every output's sha256")
    ap.add_argument("--log", type=Path, help="append the full output of every dvc repro (stages' stderr included) here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = REPO if args.in_place else make_copy(Path(tmp) / "project")
        if args.smoke:
            merge_smoke_params(root / "params.yaml", root / "params.smoke.yaml")
        total, stages, _ = repro(root, "--force", log=args.log)
        hashes = [output_hashes(root)]
        if args.twice:
            repro(root, "--force", log=args.log)
            hashes.append(output_hashes(root))
        noop_total, noop_stages, _ = repro(root, log=args.log)
        # selective re-run: perturb one key and ask DVC which stages it would run
        params_file = root / "params.yaml"
        original = params_file.read_text()
        p = yaml.safe_load(original)
        section, key = args.change.split(".", 1)
        p[section][key] = p[section][key] * 1.5 if isinstance(p[section][key], float) else p[section][key] + 1
        params_file.write_text(yaml.safe_dump(p, sort_keys=False))
        dry = subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry"], cwd=root, env=_env(), capture_output=True, text=True)
        would_run = [ln.split("'")[1] for ln in dry.stdout.splitlines() if ln.startswith("Running stage '")]
        params_file.write_text(original)

    print(f"\n{'stage':32s} {'seconds':>9s} {'peak RSS MiB':>13s}")
    for name, s in stages.items():
        print(f"{name:32s} {s['seconds']:9.1f} {s['peak_rss_mib']:13.0f}")
    train = sum(s["seconds"] for n, s in stages.items() if n.startswith("train_") and not n.startswith("train_classifier"))
    print(f"{'total dvc repro --force':32s} {total:9.1f}")
    print(f"{'  of which model training':32s} {train:9.1f}")
    print(f"{'  the rest':32s} {total - train:9.1f}")
    print(f"{'no-op dvc repro':32s} {noop_total:9.1f}   (stages run: {len(noop_stages)})")
    print(f"changing {args.change} would re-run: {', '.join(would_run) or 'nothing'}")
    if args.twice:
        first, second = hashes
        print(f"\n{'output':52s} {'sha256 run 1':>16s} {'sha256 run 2':>16s}")
        for name in sorted(first.keys() | second.keys()):
            a, b = first.get(name, "-"), second.get(name, "-")
            print(f"{name:52s} {a[:16]:>16s} {b[:16]:>16s}{'' if a == b else '  DIFFERS'}")
        same = sum(first.get(k) == second.get(k) for k in first.keys() | second.keys())
        print(f"{same} of {len(first.keys() | second.keys())} outputs byte-identical between the two runs")
    if args.json:
        args.json.write_text(
            json.dumps({"stages": stages, "total_s": total, "training_s": train, "noop_s": noop_total, "change": args.change, "would_run": would_run, "hashes": hashes}, indent=2)
        )


if __name__ == "__main__":
    main()
