"""IDX files (the MNIST/Fashion-MNIST format): parse, verify, locate or download.

Sources are searched in order: ``data/raw/<dataset>/``, a mirror folder
(``<mirror>/<dataset>/``), then a download from the configured base URLs into
``data/raw/<dataset>/``. Every file is verified before use: by the sha256 of its
*decompressed* bytes where that is known (it holds for re-compressed copies too), else by
the md5 of the gzip file as published. A mismatch is an error naming the file and both
digests; nothing is ever substituted silently.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataFileError(RuntimeError):
    """A data file is missing everywhere, corrupted, or not a valid IDX file."""


@dataclass(frozen=True)
class FileSpec:
    """A canonical IDX file and how to verify it."""

    name: str
    sha256: str | None = None  # of the decompressed bytes
    gzip_md5: str | None = None  # of the published .gz file
    size: int | None = None  # decompressed bytes


# sha256 of decompressed bytes: ../shared/data/README.md. MNIST training files: only the
# published gzip md5 is known here (the offline mirror does not hold them).
DATASETS: dict[str, dict[str, FileSpec]] = {
    "mnist": {
        "train-images": FileSpec("train-images-idx3-ubyte.gz", gzip_md5="f68b3c2dcbeaaa9fbdd348bbdeb94873", size=47040016),
        "train-labels": FileSpec("train-labels-idx1-ubyte.gz", gzip_md5="d53e105ee54ea40749a09fcbcd1e9432", size=60008),
        "test-images": FileSpec(
            "t10k-images-idx3-ubyte.gz",
            sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            size=7840016,
        ),
        "test-labels": FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            size=10008,
        ),
    },
    "fashion-mnist": {
        "train-images": FileSpec(
            "train-images-idx3-ubyte.gz",
            sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            size=47040016,
        ),
        "train-labels": FileSpec(
            "train-labels-idx1-ubyte.gz",
            sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            size=60008,
        ),
        "test-images": FileSpec(
            "t10k-images-idx3-ubyte.gz",
            sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            size=7840016,
        ),
        "test-labels": FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            size=10008,
        ),
    },
}

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode decompressed IDX bytes into an array.

    Header: two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension.

    Raises:
        DataFileError: bad magic, unknown type, or a payload that does not match the header.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFileError(f"{source}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; expected 0000 08 0n)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise DataFileError(f"{source}: not an IDX file (unknown element type 0x{code:02x})")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataFileError(f"{source}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = raw[4 + 4 * ndim :]
    if len(payload) != expected:
        raise DataFileError(f"{source}: IDX payload has {len(payload)} bytes, header {shape} needs {expected} (truncated or corrupted file)")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write ``array`` as a gzip IDX file (uint8 or big-endian int32), for tests and tools."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    dt = np.dtype(array.dtype)
    if dt not in codes:
        raise ValueError(f"write_idx supports uint8 and int32, got {dt}")
    header = bytes([0, 0, codes[dt], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(dt.newbyteorder(">")).tobytes()
    # mtime=0: the same array always gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(header + body)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_verified(path: Path, spec: FileSpec) -> tuple[np.ndarray, str]:
    """Decompress, verify and parse one file; returns the array and the sha256 of its decompressed bytes.

    Raises:
        DataFileError: unreadable gzip, checksum mismatch (both digests named), bad IDX.
    """
    if spec.sha256 is None and spec.gzip_md5 is not None:
        got_md5 = _md5(path)
        if got_md5 != spec.gzip_md5:
            raise DataFileError(f"{path}: checksum mismatch: gzip md5 is {got_md5}, expected {spec.gzip_md5}. Delete the file and fetch it again.")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise DataFileError(f"{path}: cannot decompress ({err}); the file is corrupted or truncated. Delete it and fetch it again.") from None
    digest = hashlib.sha256(raw).hexdigest()
    if spec.sha256 is not None and digest != spec.sha256:
        raise DataFileError(
            f"{path}: checksum mismatch: sha256 of the decompressed bytes is {digest}, expected {spec.sha256}. Delete the file and fetch it again."
        )
    return parse_idx(raw, str(path)), digest


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Fetch ``url`` to ``dest`` atomically (temp file in the same folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:  # noqa: S310 - http(s) only, validated in params
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Located:
    """A verified IDX file: its array, where it came from, and its decompressed sha256."""

    array: np.ndarray
    path: Path
    source: str  # "raw", "mirror" or "download"
    sha256: str


def locate(
    dataset: str,
    key: str,
    *,
    raw_dir: Path,
    mirror: Path | None,
    urls: tuple[str, ...] = (),
    allow_download: bool = True,
    log: Callable[[str], None] = print,
) -> Located:
    """Find, verify and parse ``DATASETS[dataset][key]``: ``raw_dir``, then ``mirror``, then a download.

    Raises:
        DataFileError: the file is in none of the places (message says how to get it) or
            fails verification.
    """
    spec = DATASETS[dataset][key]
    tried: list[str] = []
    for source, folder in (("raw", raw_dir / dataset), ("mirror", mirror / dataset if mirror else None)):
        if folder is None:
            continue
        candidate = folder / spec.name
        tried.append(str(candidate))
        if candidate.is_file():
            arr, digest = read_verified(candidate, spec)
            return Located(arr, candidate, source, digest)
    errors: list[str] = []
    if allow_download:
        dest = raw_dir / dataset / spec.name
        for base in urls:
            url = base.rstrip("/") + "/" + spec.name
            try:
                log(f"downloading {url} -> {dest}")
                download(url, dest)
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                errors.append(f"{url}: {err}")
                continue
            try:
                arr, digest = read_verified(dest, spec)
            except DataFileError:
                dest.unlink(missing_ok=True)  # never keep a bad download where it would be found next time
                raise
            return Located(arr, dest, "download", digest)
    how = (
        f"Put {spec.name} into {raw_dir / dataset}/ (or the mirror folder data.*.mirror), "
        f"or allow a download (data.*.download: true) from a reachable mirror"
    )
    detail = f" Looked in: {', '.join(tried)}." + (f" Downloads failed: {'; '.join(errors)}." if errors else "")
    if dataset == "mnist" and key.startswith("train"):
        how += "; or set data.mnist.split: test to train on a split of the official test file (the offline default)"
    raise DataFileError(f"{dataset} file {spec.name} not found.{detail} {how}.")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A contiguous torch tensor sharing nothing with ``array``."""
    return torch.from_numpy(np.ascontiguousarray(array)).clone()
