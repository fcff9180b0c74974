#!/usr/bin/env bash
# Builds the untracked bundle .gpu/ that scripts/gpu_check.sh needs on the device tool's GPU machine
# (CPython 3.12, x86-64, torch preinstalled, no package registry), from scratch, on a developer's
# machine (Debian, PyPI reachable; a Python 3.12 is used when there is one, else any python3 with pip
# downloads and installs for 3.12 through --python-version/--platform):
#
#   bash scripts/gpu_bundle.sh                          # writes <checkout>/.gpu
#   BUNDLE_DIR=/tmp/bundle_test bash scripts/gpu_bundle.sh
#
#   .gpu/data/            a copy of DATA_SRC (default ../shared/data beside the checkout)
#   .gpu/site.tar.xz      site/ = the packages of scripts/gpu_bundle.txt (versions from
#                         requirements.lock / requirements-bench.txt), installed with pip --target
#                         --no-deps --no-compile from manylinux x86-64 cp312 wheels, then trimmed:
#                         no bin/, no __pycache__, no <package>/test(s)/, diffusers reduced to its
#                         top-level modules + schedulers/ + utils/ (all that DDPMScheduler needs), and
#                         `strip -g` on every shared library that carries DWARF (.debug_info)
#   .gpu/gpu_check.sh     a copy of scripts/gpu_check.sh
#
# It also adds /.gpu/ to .git/info/exclude when missing, prints the sizes, and fails (leaving the
# old bundle in place) when the whole exceeds GPU_BUNDLE_LIMIT_MIB (default 60: what travels to the
# device machine, working tree included, is capped at 64 MiB).
# Other settings: PYTHON (the interpreter that runs pip), DATA_SRC, GPU_BUNDLE_WHEELS (keep the
# wheels in this folder; default: a temporary one, removed). CPU-heavy steps run under `nice -n 10`
# and xz uses one thread (-T1): the machine is shared. Needs binutils (strip, readelf); xz is
# optional (Python's lzma is used without it).
set -euo pipefail
shopt -s nullglob

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="$ROOT/scripts/gpu_bundle.txt"
BUNDLE_DIR="${BUNDLE_DIR:-$ROOT/.gpu}"
DATA_SRC="${DATA_SRC:-$ROOT/../shared/data}"
LIMIT_MIB="${GPU_BUNDLE_LIMIT_MIB:-60}"
TARGET=(--python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
T0=$SECONDS

die() { echo "gpu_bundle: error: $*" >&2; exit 1; }
say() { echo "== [$((SECONDS - T0)) s] $*"; }

# ---------------------------------------------------------------- tools and inputs
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
else
  PY=""
  for c in python3.12 python3; do
    # a pyenv shim for a version that is not installed exits non-zero here
    if "$c" -c 'import pip' >/dev/null 2>&1; then PY="$c"; break; fi
  done
  [ -n "$PY" ] || die "no python3.12 or python3 with pip on PATH (set PYTHON)"
fi
export PIP_ROOT_USER_ACTION=ignore  # as root here, and into --target: no venv warning
PIP=(nice -n 10 "$PY" -m pip --disable-pip-version-check --no-input)
# pip, less the warnings about file:// indexes of this machine's pip.conf that do not exist
pip_() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location 'file://.* is ignored" || true; }; }
command -v strip >/dev/null && command -v readelf >/dev/null \
  || die "strip and readelf are needed (apt-get install binutils)"
[ -f "$LIST" ] || die "no $LIST"
for d in mnist fashion-mnist; do
  ls "$DATA_SRC/$d/"*.gz >/dev/null 2>&1 || die "no $DATA_SRC/$d/*.gz (set DATA_SRC to the data mirror)"
done
case "$(cd "$(dirname "$BUNDLE_DIR")" 2>/dev/null && pwd)/$(basename "$BUNDLE_DIR")" in
  /|"$ROOT"|"$ROOT/"|"${HOME:-/nonexistent}") die "BUNDLE_DIR=$BUNDLE_DIR is not a place for the bundle" ;;
esac
if [ -d "$BUNDLE_DIR" ]; then
  for e in "$BUNDLE_DIR"/* "$BUNDLE_DIR"/.[!.]*; do
    case "$(basename "$e")" in data|site|site.tar.xz|gpu_check.sh) ;;
      *) die "$BUNDLE_DIR holds $(basename "$e"), which a bundle does not: not replacing it" ;; esac
  done
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/genmodels_gpu_bundle.XXXXXX")"
KEEP_BUILD=0
trap '[ "$KEEP_BUILD" = 1 ] || rm -rf "$BUILD"' EXIT
WHEELS="${GPU_BUNDLE_WHEELS:-$BUILD/wheels}"
if [ -d "$WHEELS" ] && [ -n "$(ls -A "$WHEELS")" ]; then
  # a folder kept from an earlier run: emptied, so that it holds this list's wheels alone (pip's
  # own cache makes the downloads again cheap)
  rm -f "$WHEELS"/*.whl
fi
mkdir -p "$WHEELS"
say "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'), $("${PIP[@]}" --version | cut -d' ' -f1-2)"

# ---------------------------------------------------------------- the pinned list
"$PY" - "$LIST" "$ROOT/requirements.lock" "$ROOT/requirements-bench.txt" "$BUILD" <<'EOF'
import re, sys
lst, locks, build = sys.argv[1], sys.argv[2:4], sys.argv[4]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {}
for f in locks:
    for line in open(f):
        line = line.split("#")[0].strip()
        if "==" in line:
            n, v = line.split("==", 1)
            pins[norm(n)] = v.strip()
wheel, sdist, seen, bad = [], [], set(), []
for line in open(lst):
    words = line.split("#")[0].split()
    if not words:
        continue
    spec, kind = words[0], (words[1] if len(words) > 1 else "wheel")
    name, _, ver = spec.partition("==")
    ver = ver or pins.get(norm(name))
    if not ver:
        bad.append(name)
        continue
    if norm(name) in seen:
        sys.exit(f"gpu_bundle: error: {name} twice in {lst}")
    seen.add(norm(name))
    (sdist if kind == "sdist" else wheel).append(f"{name}=={ver}")
if bad:
    sys.exit(f"gpu_bundle: error: no version for {', '.join(bad)}: pin it in {lst} (name==version)")
open(f"{build}/wheel.txt", "w").write("\n".join(wheel) + "\n")
open(f"{build}/sdist.txt", "w").write("\n".join(sdist) + "\n" if sdist else "")
print(f"{len(wheel)} wheels + {len(sdist)} built from sdist")
EOF
NPKG=$(cat "$BUILD/wheel.txt" "$BUILD/sdist.txt" | grep -c .)

# ---------------------------------------------------------------- download
say "pip download (cp312 manylinux x86-64 wheels, --no-deps) into $WHEELS"
pip_ download -q --no-deps --only-binary=:all: "${TARGET[@]}" \
  -d "$WHEELS" -r "$BUILD/wheel.txt"
if [ -s "$BUILD/sdist.txt" ]; then
  say "pip wheel (no wheel on PyPI): $(tr '\n' ' ' < "$BUILD/sdist.txt")"
  nb=()
  while read -r s; do nb+=(--no-binary "${s%%==*}"); done < "$BUILD/sdist.txt"
  pip_ wheel -q --no-deps "${nb[@]}" -w "$WHEELS" -r "$BUILD/sdist.txt"
fi
whls=("$WHEELS"/*.whl)
[ "${#whls[@]}" = "$NPKG" ] || die "${#whls[@]} wheels in $WHEELS for $NPKG packages"

# ---------------------------------------------------------------- install and trim
say "pip install --target (--no-deps --no-index --no-compile)"
SITE="$BUILD/site"
pip_ install -q --no-deps --no-index --no-compile --only-binary=:all: "${TARGET[@]}" \
  --target "$SITE" "${whls[@]}"
say "trim"
rm -rf "$SITE/bin"
find "$SITE" -depth -type d -name __pycache__ -exec rm -rf {} +
for d in "$SITE"/*/tests "$SITE"/*/test; do [ -d "$d" ] && rm -rf "$d"; done
[ -f "$SITE/diffusers/schedulers/scheduling_ddpm.py" ] || die "no diffusers/schedulers/scheduling_ddpm.py"
for d in "$SITE"/diffusers/*/; do
  case "$(basename "$d")" in schedulers|utils) ;; *) rm -rf "$d" ;; esac
done
nstrip=0
while IFS= read -r -d '' f; do
  # (grep without -q reads all of readelf's output: with -q, readelf's SIGPIPE fails the pipe)
  if readelf -S "$f" 2>/dev/null | grep '\.debug_info' >/dev/null; then
    nice -n 10 strip -g "$f"
    nstrip=$((nstrip + 1))
  fi
done < <(find "$SITE" -type f \( -name '*.so' -o -name '*.so.*' \) -print0)
ndist=$(find "$SITE" -maxdepth 1 -type d -name '*.dist-info' | wc -l)
[ "$ndist" = "$NPKG" ] || die "$ndist *.dist-info in site/ for $NPKG packages"
for p in dvc mlflow sqlalchemy alembic diffusers normflows; do
  [ -d "$SITE/$p" ] || die "site/$p missing"
done
say "site/: $ndist packages, $nstrip shared libraries stripped of debug info, $(du -sb "$SITE" | cut -f1) bytes"

# ---------------------------------------------------------------- assemble
STAGE="$BUILD/bundle"
mkdir -p "$STAGE"
say "site.tar.xz (one xz thread, nice 10)"
TAR_PY='import sys, tarfile
def reset(ti):
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti
out = sys.argv[2]
if out == "-":
    t = tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT)
else:  # no xz binary: Python lzma, same preset
    t = tarfile.open(out, mode="w:xz", preset=6, format=tarfile.PAX_FORMAT)
with t:
    t.add(sys.argv[1], arcname="site", filter=reset)  # tarfile adds folders in sorted order'
if command -v xz >/dev/null; then
  nice -n 10 "$PY" -c "$TAR_PY" "$SITE" - | nice -n 10 xz -T1 -6 -c > "$STAGE/site.tar.xz"
else
  nice -n 10 "$PY" -c "$TAR_PY" "$SITE" "$STAGE/site.tar.xz"
fi
cp -r "$DATA_SRC" "$STAGE/data"
chmod -R u+w "$STAGE/data"
cp "$ROOT/scripts/gpu_check.sh" "$STAGE/gpu_check.sh"

sz() { du -sb "$1" | cut -f1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
total=$(sz "$STAGE")
echo "sizes:"
for e in data site.tar.xz gpu_check.sh; do
  printf '  %-14s %10d bytes  %s\n' "$e" "$(sz "$STAGE/$e")" "$(mib "$(sz "$STAGE/$e")")"
done
printf '  %-14s %10d bytes  %s (limit %d MiB)\n' total "$total" "$(mib "$total")" "$LIMIT_MIB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  KEEP_BUILD=1
  die "the bundle is $(mib "$total"), over the $LIMIT_MIB MiB limit: $BUNDLE_DIR left as it was; the new one is in $STAGE"
fi

# ---------------------------------------------------------------- put in place
rm -rf "$BUNDLE_DIR"
mkdir -p "$(dirname "$BUNDLE_DIR")"
mv "$STAGE" "$BUNDLE_DIR"
if EXCL="$(git -C "$ROOT" rev-parse --git-common-dir 2>/dev/null)"; then
  case "$EXCL" in /*) ;; *) EXCL="$ROOT/$EXCL" ;; esac
  EXCL="$EXCL/info/exclude"
  mkdir -p "$(dirname "$EXCL")"
  if ! grep -qxF '/.gpu/' "$EXCL" 2>/dev/null; then
    echo '/.gpu/' >> "$EXCL"
    echo "added /.gpu/ to $EXCL"
  fi
fi
say "done: $BUNDLE_DIR"
