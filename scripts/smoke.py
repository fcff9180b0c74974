"""The smoke pipeline: the whole DAG on tiny params (params.smoke.yaml merged into params.yaml).

    python scripts/smoke.py --in-place    # merge into this checkout's params.yaml and dvc repro (CI runners)
    python scripts/smoke.py               # only print the merged params

The smoke params keep every stage and code path but shrink data, widths and epochs, so the
whole pipeline runs in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base`` (nested mappings merged, the rest replaced)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def merge_smoke_params(params_file: Path, smoke_file: Path) -> dict[str, Any]:
    """Rewrite ``params_file`` with ``smoke_file`` merged in; returns the result."""
    merged = deep_merge(yaml.safe_load(params_file.read_text()), yaml.safe_load(smoke_file.read_text()) or {})
    params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-place", action="store_true", help="rewrite params.yaml here and run dvc repro")
    args = ap.parse_args()
    if not args.in_place:
        merged = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), yaml.safe_load((REPO / "params.smoke.yaml").read_text()))
        print(yaml.safe_dump(merged, sort_keys=False))
        return 0
    merge_smoke_params(REPO / "params.yaml", REPO / "params.smoke.yaml")
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
