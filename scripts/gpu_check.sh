#!/usr/bin/env bash
# The pipeline and the DDPM / RealNVP-2D benchmarks on a GPU machine whose Python has torch but
# not DVC, MLflow, diffusers or normflows, and which reaches no package registry (the device
# tool's H200: CPython 3.12, x86-64). Run from anywhere in the checkout; a copy at .gpu/gpu_check.sh
# works the same (the device tool sends the main checkout's working tree, where this file may not
# be committed yet: carry .gpu and run `bash .gpu/gpu_check.sh`):
#
#   bash scripts/gpu_check.sh                      # set-up, facts, then (a) (b) (c) below
#   T_PIPE=300 T_DDPM=90 T_RNVP=60 bash scripts/gpu_check.sh
#   GPU_CHECK_STEPS="ddpm rnvp" bash scripts/gpu_check.sh
#   GPU_CHECK_SETUP_ONLY=1 bash scripts/gpu_check.sh   # set-up and facts only
#
#   (a) python3 benchmarks/pipeline.py --json $OUT/pipe.json --log $OUT/pipe.log $PIPE_ARGS  (T_PIPE s, default 330)
#   (b) python3 benchmarks/bench_ddpm.py --repeats 3 $DDPM_ARGS                                (T_DDPM s, default 90)
#   (c) python3 benchmarks/bench_realnvp2d.py --repeats 3 $RNVP_ARGS                           (T_RNVP s, default 60)
#
# Each step has its own `timeout` (SIGTERM to the step's whole process group, so DVC and the
# stage it runs stop too; SIGKILL 15 s later); a failed or timed-out step does not stop the next.
#
# It needs the untracked bundle .gpu/ (git-ignored through .git/info/exclude; name `.gpu` in the
# device tool's `carry`):
#   .gpu/data/{mnist,fashion-mnist}/*.gz   a copy of ../shared/data (../shared does not travel)
#   .gpu/site.tar.xz  (or an unpacked .gpu/site/)   dvc, mlflow-skinny + sqlalchemy/alembic,
#       diffusers, normflows and every dependency the machine's image lacks, for CPython 3.12
#       manylinux x86-64 (torch, numpy, pandas, click, pyyaml, ... come from the image)
# Build it from scratch on a developer's machine (PyPI reachable; about 2 minutes, under 60 MiB):
#   bash scripts/gpu_bundle.sh          # BUNDLE_DIR=/tmp/somewhere bash scripts/gpu_bundle.sh: elsewhere
# It downloads the pinned packages of scripts/gpu_bundle.txt (versions from requirements.lock /
# requirements-bench.txt), trims them, copies ../shared/data and this file into .gpu/, and adds
# /.gpu/ to .git/info/exclude.
#
# What it sets up: PYTHONPATH = <site>:<repo> in front of what was there; data.*.mirror in
# params.yaml pointed at .gpu/data (the original params.yaml is put back on exit); a `dvc`
# (and `python`) entry point on PATH that runs this very interpreter (`python3 -m dvc`).
# Output: OUT (the device tool's $OUT; default ./gpu_out), at most 7 files written directly
# there: env.txt pipe.out pipe.log pipe.json ddpm.out rnvp.out summary.txt.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
T_PIPE="${T_PIPE:-330}"
T_DDPM="${T_DDPM:-90}"
T_RNVP="${T_RNVP:-60}"
STEPS="${GPU_CHECK_STEPS:-pipe ddpm rnvp}"
PY="$(command -v "${PYTHON:-python3}")" || { echo "error: no ${PYTHON:-python3} on PATH" >&2; exit 2; }
T0=$SECONDS

say() { echo "== [$((SECONDS - T0)) s] $*" | tee -a "$OUT/summary.txt"; }

# ---------------------------------------------------------------- site packages
TARBALL="$ROOT/.gpu/site.tar.xz"
if [ -d "$ROOT/.gpu/site/dvc" ]; then
  SITE="$ROOT/.gpu/site"
elif [ -f "$TARBALL" ]; then
  SITE="${GPU_SITE_DIR:-/tmp/genmodels_gpu_site}"
  stamp="$(stat -c '%s %Y' "$TARBALL")"
  if [ "$(cat "$SITE/.from" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE" "$SITE.part"
    mkdir -p "$SITE.part"
    # Python's tarfile + lzma: no xz binary needed.
    if "$PY" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter="data")' "$TARBALL" "$SITE.part"; then
      mv "$SITE.part/site" "$SITE" && rm -rf "$SITE.part" && echo "$stamp" > "$SITE/.from"
    else
      echo "error: could not unpack $TARBALL" >&2
    fi
  fi
else
  echo "error: neither .gpu/site/ nor .gpu/site.tar.xz: carry .gpu (see the header of $0)" >&2
  exit 2
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DVC_NO_ANALYTICS=1 MPLBACKEND=Agg GIT_PYTHON_REFRESH=quiet PYTHONUNBUFFERED=1
export GIT_AUTHOR_NAME="${GIT_AUTHOR_NAME:-gpu-check}" GIT_AUTHOR_EMAIL="${GIT_AUTHOR_EMAIL:-gpu-check@example.com}"
export GIT_COMMITTER_NAME="${GIT_COMMITTER_NAME:-gpu-check}" GIT_COMMITTER_EMAIL="${GIT_COMMITTER_EMAIL:-gpu-check@example.com}"

# ---------------------------------------------------------------- entry points on PATH
BIN="$(mktemp -d "${TMPDIR:-/tmp}/genmodels_gpu_bin.XXXXXX")"
printf '#!/bin/sh\nexec "%s" -m dvc "$@"\n' "$PY" > "$BIN/dvc"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$BIN/python"
chmod +x "$BIN/dvc" "$BIN/python"
export PATH="$BIN:$PATH"

# ---------------------------------------------------------------- data mirror
DATA="$ROOT/.gpu/data"
PARAMS_BACKUP="$BIN/params.yaml.orig"
cp params.yaml "$PARAMS_BACKUP"
restore() { cp "$PARAMS_BACKUP" "$ROOT/params.yaml" 2>/dev/null; rm -rf "$BIN"; }
trap restore EXIT
trap 'exit 130' INT TERM
if [ -f "$DATA/fashion-mnist/train-images-idx3-ubyte.gz" ] && [ -f "$DATA/mnist/t10k-images-idx3-ubyte.gz" ]; then
  sed -i "s#^\(\s*mirror:\s*\)\.\./shared/data#\1$DATA#" params.yaml
else
  echo "warning: $DATA lacks the IDX files; data.*.mirror left as it is" >&2
fi

# ---------------------------------------------------------------- facts
{
  echo "date: $(date -u +%FT%TZ)   host: $(uname -n)   repo: $ROOT   commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "python3: $PY   site: $SITE"
  echo "PATH: $PATH"
  echo "data.*.mirror: $(grep -E '^\s*mirror:' params.yaml | tr -s ' ' | tr '\n' ' ')"
  echo "git: $(git --version 2>&1)"
  echo "dvc (PATH entry point): $(command -v dvc) -> $(dvc --version 2>&1 | tail -1)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "nvidia-smi: not on PATH"; fi
  "$PY" - "$SITE" <<'EOF' 2>&1
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
          "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
except Exception as e:  # noqa: BLE001
    print("torch: FAILED", type(e).__name__, e)
for mod in ("numpy", "pandas", "scipy", "matplotlib", "yaml", "click", "psutil", "dvc", "dvc.repo", "mlflow",
            "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy", "alembic", "diffusers", "normflows", "genmodels"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod}: ok {getattr(m, '__version__', '')} ({(getattr(m, '__file__', '') or '').rsplit('/', 2)[0]})")
    except Exception as e:  # noqa: BLE001
        print(f"import {mod}: FAILED {type(e).__name__}: {e}")
# Requirements of the bundled packages that what is installed does not meet (extras ignored).
try:
    from packaging.requirements import Requirement
    bad = []
    for dist in md.distributions(path=[sys.argv[1]]):
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(r.name)
            except md.PackageNotFoundError:
                have = None
            if have is None or (r.specifier and not r.specifier.contains(have, prereleases=True)):
                bad.append(f"  {dist.metadata['Name']} needs {r} : found {have}")
    print("bundle requirements not met:", "none" if not bad else "\n" + "\n".join(sorted(set(bad))))
except Exception as e:  # noqa: BLE001
    print("requirement check: FAILED", type(e).__name__, e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
say "set-up done (site $SITE)"
if [ -n "${GPU_CHECK_SETUP_ONLY:-}" ]; then
  exit 0
fi

# ---------------------------------------------------------------- steps
step() {  # step NAME SECONDS LOGFILE CMD...
  local name="$1" limit="$2" log="$3"
  shift 3
  say "$name: start (limit ${limit} s): $*"
  local t=$SECONDS
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" = 124 ] && note=" (timed out)"
  [ "$rc" = 137 ] && note=" (killed after the time-out)"
  say "$name: rc=$rc$note after $((SECONDS - t)) s"
}

watch_stages() {  # note each "Running stage" line of pipe.log in summary.txt (+-2 s): stage times survive a time-out
  local seen=0 n
  while sleep 2; do
    n=$(grep -c "^Running stage" "$OUT/pipe.log" 2>/dev/null)
    n=${n:-0}
    if [ "$n" -gt "$seen" ]; then
      grep "^Running stage" "$OUT/pipe.log" | sed -n "$((seen + 1)),${n}p" | while IFS= read -r l; do say "  $l"; done
      seen=$n
    fi
  done
}

for s in $STEPS; do
  case "$s" in
    # shellcheck disable=SC2086  # *_ARGS are word-split on purpose
    pipe)
      watch_stages &
      watcher=$!
      step pipeline "$T_PIPE" "$OUT/pipe.out" "$PY" benchmarks/pipeline.py --json "$OUT/pipe.json" --log "$OUT/pipe.log" ${PIPE_ARGS:-}
      sleep 2
      kill "$watcher" 2>/dev/null
      wait "$watcher" 2>/dev/null
      ;;
    ddpm) step bench_ddpm "$T_DDPM" "$OUT/ddpm.out" "$PY" benchmarks/bench_ddpm.py --repeats 3 ${DDPM_ARGS:-} ;;
    rnvp) step bench_realnvp2d "$T_RNVP" "$OUT/rnvp.out" "$PY" benchmarks/bench_realnvp2d.py --repeats 3 ${RNVP_ARGS:-} ;;
    *) say "unknown step '$s' (pipe ddpm rnvp)" ;;
  esac
done
say "all done"
