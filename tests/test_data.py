"""minivae.data: the IDX format, the loaders, the verified downloader, binarization."""
from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest

from minivae import data
from minivae.data import DataNotFound, IDXError, load_dataset, parse_idx, read_idx, write_idx


# -- IDX round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip_keeps_values_shape_and_dtype(tmp_path, dtype, name):
    a = (np.arange(2 * 3 * 5) * 7 % 101 - (0 if dtype.startswith("u") else 50)).astype(dtype)
    a = a.reshape(2, 3, 5)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == np.dtype(dtype) and b.shape == (2, 3, 5)
    np.testing.assert_array_equal(b, a)


def test_idx_header_is_the_published_format(tmp_path):
    # MNIST image files start 0x00000803 (2051) then big-endian sizes: pin our writer to that.
    write_idx(tmp_path / "x.idx", np.zeros((4, 28, 28), np.uint8))
    raw = (tmp_path / "x.idx").read_bytes()
    assert struct.unpack(">IIII", raw[:16]) == (2051, 4, 28, 28)
    assert len(raw) == 16 + 4 * 28 * 28


def test_gzip_is_detected_by_content_not_name(tmp_path):
    write_idx(tmp_path / "plain-but-named.gz", np.arange(5, dtype=np.uint8), compress=False)
    write_idx(tmp_path / "zipped-no-suffix", np.arange(5, dtype=np.uint8), compress=True)
    for f in ("plain-but-named.gz", "zipped-no-suffix"):
        np.testing.assert_array_equal(read_idx(tmp_path / f), np.arange(5))


# -- malformed files are rejected with the reason and the file name -----------------------------------
def _idx_bytes(a):
    return struct.pack(f">HBB{a.ndim}I", 0, 0x08, a.ndim, *a.shape) + a.astype(np.uint8).tobytes()


@pytest.mark.parametrize("bad, reason", [
    (b"\x00\x00", "too short"),
    (b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "not an IDX file"),    # wrong magic
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "not an IDX file"),    # unknown type
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    (_idx_bytes(np.zeros((3, 4)))[:-1], "truncated"),
    (_idx_bytes(np.zeros((3, 4))) + b"\x00", "trailing bytes"),
])
def test_malformed_idx_is_rejected(bad, reason):
    with pytest.raises(IDXError, match=reason):
        parse_idx(bad, "f.idx")


def test_truncated_and_corrupt_gzip_are_rejected_with_the_path(tmp_path):
    good = gzip.compress(_idx_bytes(np.zeros((50, 28, 28))))
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXError, match="cut.gz: corrupt or truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    bad = bytearray(good)
    bad[20:30] = b"\xff" * 10
    (tmp_path / "flipped.gz").write_bytes(bytes(bad))
    with pytest.raises(IDXError, match="flipped.gz"):
        read_idx(tmp_path / "flipped.gz")


# -- directory loader ---------------------------------------------------------------------------------
def _fake_mnist_dir(d, n_train=30, n_test=10, seed=0):
    """Write the four standard files with random pixels and labels; return what was written."""
    rng = np.random.default_rng(seed)
    xs = {k: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for k, n in (("train", n_train), ("t10k", n_test))}
    ys = {k: rng.integers(0, 10, n, dtype=np.uint8) for k, n in (("train", n_train), ("t10k", n_test))}
    d.mkdir(parents=True, exist_ok=True)
    for k in ("train", "t10k"):
        write_idx(d / f"{k}-images-idx3-ubyte.gz", xs[k])
        write_idx(d / f"{k}-labels-idx1-ubyte.gz", ys[k])
    return xs, ys


def test_load_dir_scales_pixels_and_keeps_labels(tmp_path):
    xs, ys = _fake_mnist_dir(tmp_path / "m")
    ds = load_dataset("mnist", path=tmp_path / "m")
    assert ds.x_train.shape == (30, 784) and ds.x_train.dtype == np.float32
    assert ds.y_test.shape == (10,) and ds.y_test.dtype == np.int64
    np.testing.assert_allclose(ds.x_train * 255.0, xs["train"].reshape(30, 784), atol=1e-4)
    np.testing.assert_array_equal(ds.y_test, ys["t10k"])


def test_load_dir_accepts_unpacked_files(tmp_path):
    xs, _ = _fake_mnist_dir(tmp_path / "m")
    for p in (tmp_path / "m").iterdir():           # gunzip all four in place
        p.with_suffix("").write_bytes(gzip.decompress(p.read_bytes()))
        p.unlink()
    ds = load_dataset("fashion-mnist", path=tmp_path / "m")
    assert ds.classes[0] == "T-shirt/top"
    np.testing.assert_allclose(ds.x_test * 255.0, xs["t10k"].reshape(10, 784), atol=1e-4)


def test_load_dir_names_missing_files_and_mismatched_counts(tmp_path):
    _fake_mnist_dir(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFound, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", path=tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(IDXError, match="10 images but .* 9 labels"):
        load_dataset("mnist", path=tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(IDXError, match="label 12"):
        load_dataset("mnist", path=tmp_path / "m")


def test_unknown_names_and_missing_directories_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DataNotFound, match="does not exist"):
        load_dataset("mnist", path=tmp_path / "nowhere")


# -- the bundled default set ----------------------------------------------------------------------------
def test_bundled_mnist10k_is_the_documented_split():
    ds = load_dataset("mnist10k")
    assert ds.x_train.shape == (9000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    # the whole MNIST test set: its published label counts, split without overlap
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    tr, te = data._bundled_split()
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 10_000
    np.testing.assert_array_equal(te, np.sort(np.random.default_rng(0).permutation(10000)[:1000]))
    # pixel mean of the published test set is 0.1325
    assert abs(np.concatenate([ds.x_train, ds.x_test]).mean() - 0.1325) < 5e-4


def test_bundled_data_keeps_its_license_note():
    from importlib import resources

    note = resources.files("minivae.datasets").joinpath("README.md").read_text()
    assert "Yann LeCun, Corinna Cortes and Christopher J.C." in note
    assert "Attribution-Share Alike 3.0" in note


# -- downloader, against local fixture files only ------------------------------------------------------------
@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// mirror of fake MNIST files, with the checksum table pointing at them."""
    src = tmp_path / "mirror"
    _fake_mnist_dir(src)
    sums = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                     "md5": hashlib.md5(p.read_bytes()).hexdigest()} for p in src.iterdir()}
    monkeypatch.setitem(data.SOURCES, "mnist", {"mirrors": (src.as_uri() + "/",), "checksums": sums})
    monkeypatch.setenv("MINIVAE_DATA", str(tmp_path / "cache"))
    return src


def test_download_fetches_verifies_and_caches(mirror, tmp_path):
    ds = load_dataset("mnist")                          # not in cache -> fetched from the mirror
    assert ds.x_train.shape == (30, 784)
    cached = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in mirror.iterdir())
    for p in mirror.iterdir():                           # a second load must not touch the mirror
        p.unlink()
    assert load_dataset("mnist").x_test.shape == (10, 784)


def test_download_rejects_a_file_whose_checksum_differs(mirror, tmp_path):
    p = mirror / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes() + b"tampered")
    with pytest.raises(DataNotFound, match="sha256 is .* expected"):
        data.fetch("mnist")
    assert not list((tmp_path / "cache" / "mnist").glob("*.part")), "partial file left behind"
    assert not (tmp_path / "cache" / "mnist" / "train-labels-idx1-ubyte.gz").exists()


def test_download_falls_back_to_the_next_mirror(mirror, tmp_path, monkeypatch):
    src = dict(data.SOURCES["mnist"])
    src["mirrors"] = ((tmp_path / "empty").as_uri() + "/", *src["mirrors"])
    monkeypatch.setitem(data.SOURCES, "mnist", src)
    assert data.fetch("mnist") == tmp_path / "cache" / "mnist"


def test_offline_error_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIVAE_DATA", str(tmp_path / "cache"))

    def offline(url, timeout=None):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFound) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path / "cache" / "fashion-mnist") in msg
    assert "train-images-idx3-ubyte.gz" in msg and "name resolution" in msg
    with pytest.raises(DataNotFound, match="Put the four files"):
        load_dataset("mnist", download=False)


def test_published_checksums_are_well_formed():
    for src in data.SOURCES.values():
        assert sorted(src["checksums"]) == sorted(f + ".gz" for f in data.FILES)
        for sums in src["checksums"].values():
            assert len(sums["sha256"]) == 64 and len(sums["md5"]) == 32
            int(sums["sha256"], 16), int(sums["md5"], 16)


# -- binarization ----------------------------------------------------------------------------------------------
def test_binarize_draws_bernoulli_with_the_grey_level_as_probability():
    x = np.tile(np.linspace(0, 1, 11, dtype=np.float32), (4000, 1))
    b = data.binarize(x, seed=1)
    assert set(np.unique(b).tolist()) == {0.0, 1.0} and b.dtype == np.float32
    np.testing.assert_allclose(b.mean(axis=0), x[0], atol=0.03)
    assert b[:, 0].max() == 0.0 and b[:, -1].min() == 1.0
    np.testing.assert_array_equal(b, data.binarize(x, seed=1))   # static: same seed, same draw
    assert not np.array_equal(b, data.binarize(x, seed=2))
