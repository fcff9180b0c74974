#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine with Python 3.11, then runs a job.
#
#   bash scripts/run.sh repro [dvc repro args]   # the pipeline on params.yaml (the main job)
#   bash scripts/run.sh test  [pytest args]      # the test suite
#   bash scripts/run.sh env                      # only set up; prints the venv path
#   bash scripts/run.sh exec CMD [ARGS]          # any command inside the environment
#
# The virtualenv lives outside the clone, keyed by the hash of requirements.lock, so a second
# run (or another clone) with the same lock file reuses it: ${GENMODELS_CACHE:-~/.cache/genmodels}.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$ver" != "3.11" ]; then
  echo "error: Python 3.11 is required (found $py = $ver); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

key="$(sha256sum requirements.lock | cut -c1-16)"
cache="${GENMODELS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/genmodels}"
venv="$cache/venv-py$ver-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first run with this lock file: a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock
  touch "$venv/.complete"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
# The project root comes first on sys.path (stages insert it too), so the code that runs
# is always this checkout's, also inside DVC's temporary experiment copies.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export DVC_NO_ANALYTICS=1

job="${1:-}"
shift || true
case "$job" in
  repro) exec dvc repro "$@" ;;
  # Two pytest workers (pytest-xdist): most tests wait on subprocesses (dvc, mlflow, stage
  # start-up), so two cores finish the suite much sooner; GENMODELS_TEST_WORKERS=0 runs it serially.
  test) exec python -m pytest -n "${GENMODELS_TEST_WORKERS:-2}" "$@" ;;
  env) echo "$venv" ;;
  exec) exec "$@" ;;
  *) echo "usage: bash scripts/run.sh repro|test|env|exec ..." >&2; exit 2 ;;
esac
