"""IDX parsing, checksum verification and the source order (raw dir, mirror, download)."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from genmodels.data.idx import DATASETS, DataFileError, FileSpec, locate, parse_idx, read_verified, write_idx


def test_parse_idx_of_a_file_written_here(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.int32)
    write_idx(images, tmp_path / "x.gz")
    write_idx(labels, tmp_path / "y.gz")
    with gzip.open(tmp_path / "x.gz") as fh:
        raw = fh.read()
    # header by hand: 0 0 0x08 3, then dims big-endian
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert int.from_bytes(raw[4:8], "big") == 7
    np.testing.assert_array_equal(parse_idx(raw), images)
    with gzip.open(tmp_path / "y.gz") as fh:
        np.testing.assert_array_equal(parse_idx(fh.read()), labels)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc", "bad magic"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "unknown element type"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "truncated or corrupted"),
        (b"\x00\x00\x08\x02\x00", "truncated IDX header"),
    ],
)
def test_parse_idx_rejects_malformed(raw: bytes, fragment: str) -> None:
    with pytest.raises(DataFileError, match=fragment):
        parse_idx(raw, "some.gz")


def test_real_mirror_files_verify(shared_data: Path) -> None:
    for dataset, folder in (("mnist", "mnist"), ("fashion-mnist", "fashion-mnist")):
        spec = DATASETS[dataset]["test-labels"]
        arr, digest = read_verified(shared_data / folder / spec.name, spec)
        assert digest == spec.sha256
        assert arr.shape == (10000,) and arr.min() == 0 and arr.max() == 9


def test_corrupted_copy_of_a_mirror_file_is_rejected_naming_file_and_digests(tmp_path: Path, shared_data: Path) -> None:
    spec = DATASETS["mnist"]["test-labels"]
    with gzip.open(shared_data / "mnist" / spec.name) as fh:
        raw = bytearray(fh.read())
    raw[100] ^= 0xFF  # one flipped byte inside the payload
    bad = tmp_path / "raw" / "mnist" / spec.name
    bad.parent.mkdir(parents=True)
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.raises(DataFileError) as info:
        locate("mnist", "test-labels", raw_dir=tmp_path / "raw", mirror=shared_data, allow_download=False)
    msg = str(info.value)
    assert str(bad) in msg and spec.sha256 in msg and "checksum mismatch" in msg
    # the good mirror copy was NOT used as a silent substitute for the bad raw file


def test_truncated_gzip_is_rejected(tmp_path: Path, shared_data: Path) -> None:
    spec = DATASETS["mnist"]["test-labels"]
    data = (shared_data / "mnist" / spec.name).read_bytes()
    bad = tmp_path / spec.name
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match="corrupted or truncated"):
        read_verified(bad, spec)


def test_gzip_md5_verification_for_files_without_known_sha(tmp_path: Path) -> None:
    write_idx(np.zeros((2, 2), np.uint8), tmp_path / "f.gz")
    with pytest.raises(DataFileError, match="gzip md5 is .* expected 0{32}"):
        read_verified(tmp_path / "f.gz", FileSpec("f.gz", gzip_md5="0" * 32))


def test_missing_everywhere_names_file_and_how_to_get_it(tmp_path: Path, shared_data: Path) -> None:
    with pytest.raises(DataFileError) as info:
        locate("mnist", "train-images", raw_dir=tmp_path / "raw", mirror=shared_data, allow_download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and "data.mnist.split: test" in msg and str(tmp_path / "raw" / "mnist") in msg


@pytest.fixture
def http_mirror(shared_data: Path, tmp_path: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving a copy of the mirror (one file deliberately corrupted)."""
    root = tmp_path / "www"
    shutil.copytree(shared_data / "mnist", root / "mnist")
    (root / "bad").mkdir()
    (root / "bad" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_local_http_server(http_mirror: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    # first URL 404s, second serves the file: the fallback order is honoured
    got = locate("mnist", "test-labels", raw_dir=raw, mirror=None, urls=(http_mirror + "/missing/", http_mirror + "/mnist/"), log=lambda m: None)
    assert got.source == "download" and got.path == raw / "mnist" / "t10k-labels-idx1-ubyte.gz"
    assert got.sha256 == DATASETS["mnist"]["test-labels"].sha256
    # a second call finds it in data/raw without the server
    again = locate("mnist", "test-labels", raw_dir=raw, mirror=None, urls=(), allow_download=False)
    assert again.source == "raw"


def test_bad_download_is_rejected_and_not_kept(http_mirror: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    with pytest.raises(DataFileError, match="corrupted or truncated"):
        locate("mnist", "test-labels", raw_dir=raw, mirror=None, urls=(http_mirror + "/bad/",), log=lambda m: None)
    assert not (raw / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
