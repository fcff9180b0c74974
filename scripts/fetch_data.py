"""Download and verify the canonical IDX files into a mirror folder laid out as `<dest>/<dataset>/<file>.gz`.

    python scripts/fetch_data.py --dest data/mirror [--dataset mnist --dataset fashion-mnist]

For machines with internet access (a hosted CI runner, a laptop): the folder can then serve
as `data.<dataset>.mirror` or as GENMODELS_SHARED_DATA for the tests. Files already present
and valid are kept; each file is verified (sha256 of the decompressed bytes or published md5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genmodels.configs.data import FASHION_URLS, MNIST_URLS  # noqa: E402
from genmodels.data.idx import DATASETS, DataFileError, locate  # noqa: E402

URLS = {"mnist": MNIST_URLS, "fashion-mnist": FASHION_URLS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, required=True)
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="default: all")
    args = ap.parse_args()
    failed = 0
    for dataset in args.dataset or sorted(DATASETS):
        for key, spec in DATASETS[dataset].items():
            try:
                got = locate(dataset, key, raw_dir=args.dest, mirror=None, urls=URLS[dataset], allow_download=True)
            except DataFileError as err:
                print(f"error: {err}", file=sys.stderr)
                failed += 1
                continue
            print(f"{dataset}/{spec.name}: {got.source}, sha256 {got.sha256}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
