"""minivae.data under hostile or degenerate input: memory bounded by the header, one-line errors.

A gzip bomb here is built from many copies of one small gzip member (1 MiB of zeros compresses
to about 1 KB, and a gzip file may hold any number of members, read back to back), so a file
of a few MB that inflates to GiBs is written in milliseconds. Memory is measured with
tracemalloc, which sees every bytes/bytearray/NumPy buffer the reader allocates: the reader that
decompressed everything first would show the whole inflated size.
"""
from __future__ import annotations

import gzip
import io
import struct
import time
import tracemalloc

import numpy as np
import pytest

from minivae import data
from minivae.cli import main
from minivae.data import DataNotFound, IDXError, load_dataset, read_idx, read_idx_stream, write_idx

MiB = 1 << 20


def _header(*shape, code=0x08):
    return struct.pack(f">HBB{len(shape)}I", 0, code, len(shape), *shape)


def _bomb(path, header: bytes, mib_of_zeros: int):
    """A gzip file: the IDX header, then ``mib_of_zeros`` MiB of zero bytes (multi-member)."""
    member = gzip.compress(b"\0" * MiB, compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(mib_of_zeros):
            f.write(member)
    return path


def _peak_bytes(fn):
    """(what fn raised or returned, peak bytes allocated while it ran)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test to inspect
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Counting(io.RawIOBase):
    """A read-only stream that counts the bytes handed out."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def readable(self):
        return True

    def read(self, n=-1):
        b = self.f.read(n)
        self.n += len(b)
        return b


# -- bounded memory -------------------------------------------------------------------------------
def test_the_reported_bomb_is_refused_in_a_fraction_of_a_second_and_its_header_size(tmp_path):
    """The issue's case: 60,000 MNIST images announced (47 MB), 3 GiB of zeros behind them,
    in a 3 MB file. It used to take 180 s and 15.8 GB before being rejected."""
    path = _bomb(tmp_path / "train-images-idx3-ubyte.gz", _header(60_000, 28, 28), 3 * 1024)
    assert path.stat().st_size < 4 * MiB
    t0 = time.perf_counter()
    err, peak = _peak_bytes(lambda: read_idx(path))
    seconds = time.perf_counter() - t0
    assert isinstance(err, IDXError), err
    assert "has trailing bytes" in str(err) and str(path) in str(err) and "\n" not in str(err)
    expected = 16 + 60_000 * 28 * 28
    assert peak < 2 * expected, f"peak {peak / MiB:.0f} MiB for a {expected / MiB:.0f} MiB claim"
    assert seconds < 10, f"{seconds:.1f} s"


def test_memory_follows_the_header_not_the_inflated_size(tmp_path):
    # a 784 KB claim in front of 1 GiB of zeros
    path = _bomb(tmp_path / "x.gz", _header(1000, 28, 28), 1024)
    err, peak = _peak_bytes(lambda: read_idx(path))
    assert isinstance(err, IDXError) and "trailing bytes" in str(err)
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_reading_stops_one_byte_after_the_announced_payload(tmp_path):
    path = _bomb(tmp_path / "x.gz", _header(1000, 28, 28), 64)
    with gzip.open(path, "rb") as g:
        counted = Counting(g)
        with pytest.raises(IDXError, match="trailing bytes"):
            read_idx_stream(counted, "x.gz")
    assert counted.n == 16 + 1000 * 28 * 28 + 1
    # an honest file: header and payload, then one empty read to see the end
    a = np.arange(1000 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(1000, 28, 28)
    counted = Counting(io.BytesIO(_header(1000, 28, 28) + a.tobytes()))
    np.testing.assert_array_equal(read_idx_stream(counted, "ok"), a)
    assert counted.n == 16 + a.size


def test_an_absurd_header_is_refused_before_any_payload_is_read():
    counted = Counting(io.BytesIO(_header(2**32 - 1, 2**32 - 1, 2**32 - 1) + b"\0" * 100))
    with pytest.raises(IDXError, match=r"more than the 1,073,741,824-byte limit"):
        read_idx_stream(counted, "huge")
    assert counted.n == 16


def test_the_limit_can_be_lowered_and_applies_to_parse_idx_too(tmp_path):
    write_idx(tmp_path / "a.idx", np.zeros((10, 10), np.uint8))
    with pytest.raises(IDXError, match="100 bytes.*more than the 99-byte limit"):
        read_idx(tmp_path / "a.idx", max_bytes=99)
    assert read_idx(tmp_path / "a.idx", max_bytes=100).shape == (10, 10)
    with pytest.raises(IDXError, match="more than the 1,073,741,824-byte limit"):
        data.parse_idx(_header(70_000, 128, 128, code=0x0D), "f.idx")   # 4.6 GB of float32


def test_a_big_claim_with_little_data_allocates_only_what_is_there(tmp_path):
    # 500 MB announced (inside the limit), 1 KB present: truncated, and no 500 MB buffer
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(_header(500_000, 1000) + b"\1" * 1024, mtime=0))
    err, peak = _peak_bytes(lambda: read_idx(path))
    assert isinstance(err, IDXError) and "truncated" in str(err), err
    assert peak < 8 * MiB, f"peak {peak / MiB:.0f} MiB"


def test_raw_files_are_bounded_the_same_way(tmp_path):
    path = tmp_path / "raw.idx"
    path.write_bytes(_header(10, 28, 28) + b"\0" * (10 * 784 + 5000))
    with pytest.raises(IDXError, match=r"raw.idx: has trailing bytes.*\(7856 bytes\), file has 7857 or more"):
        read_idx(path)


# -- small data messages ---------------------------------------------------------------------------
def _dir_with(d, n_train=0, hw=(28, 28)):
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", np.zeros((n_train, *hw), np.uint8))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(n_train, np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    return d


def test_a_file_of_zero_images_says_so(tmp_path):
    d = _dir_with(tmp_path / "m", n_train=0)
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte.gz holds 0 images") as e:
        load_dataset("mnist", path=d)
    assert "reshape" not in str(e.value)


def test_images_without_pixels_are_refused(tmp_path):
    d = _dir_with(tmp_path / "m", n_train=4, hw=(0, 28))
    with pytest.raises(IDXError, match=r"images of 0 x 28 pixels hold no pixels"):
        load_dataset("mnist", path=d)


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "mnist.gz"
    f.write_bytes(b"not a directory")
    with pytest.raises(DataNotFound, match=r"mnist.gz \(--data-dir / path=\) is a file, not a directory"):
        load_dataset("mnist", path=f)


@pytest.mark.parametrize("case, message", [
    ("zero", "holds 0 images"),
    ("file", "is a file, not a directory"),
])
def test_the_cli_prints_one_line(tmp_path, capsys, case, message):
    target = _dir_with(tmp_path / "m") if case == "zero" else tmp_path / "f"
    if case == "file":
        target.write_bytes(b"x")
    code = main(["train", "--data", "mnist", "--data-dir", str(target), "--epochs", "1",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("minivae train: error: ") and message in err and "\n" not in err, err
