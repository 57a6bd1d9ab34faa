"""Data: the IDX file format, MNIST / Fashion-MNIST, the bundled default set, binarization.

    from minivae.data import load_dataset
    ds = load_dataset("mnist10k")                    # bundled, offline: 9,000 train / 1,000 test
    ds = load_dataset("mnist", path="~/data/mnist")  # the four standard files in a directory
    ds = load_dataset("fashion-mnist")               # cache dir, downloaded (and verified) if missing
    ds.x_train  # (N, 784) float32 in [0, 1]      ds.y_train  # (N,) int64
    ds.x_test   # (M, 784) float32 in [0, 1]      ds.y_test   # (M,) int64

Everything here is host NumPy: the trainer moves one minibatch at a time to the backend.

IDX (LeCun's format): 2 zero bytes, a type code, the number of dimensions n, then n big-endian
uint32 sizes, then the data, big-endian, C order. :func:`read_idx` checks every one of those
and that the payload has exactly the announced length, so a truncated download is an error
with the file name in it, never a silently short array. It reads the header first and then
decompresses at most the announced size plus one byte, so memory is bounded by the header
(itself capped by ``MAX_IDX_BYTES``), never by what a gzip stream would inflate to.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

# IDX type code -> big-endian NumPy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}


class IDXError(ValueError):
    """An IDX file is corrupt, truncated or not what was expected (the message names it)."""


class DataNotFound(FileNotFoundError):
    """A data set is not on disk and could not be downloaded (the message says where to put it)."""


# -- IDX reader / writer ---------------------------------------------------------------------
# The largest payload read_idx accepts unless told otherwise. MNIST's training images are
# 47 MB, EMNIST's largest split 0.55 GB; a header that needs more is refused before anything is
# allocated or decompressed, so a forged header cannot make the reader ask for terabytes.
MAX_IDX_BYTES = 1 << 30
_CHUNK = 1 << 20   # bytes decompressed per read: memory grows with the data actually present


def _idx_header(head: bytes, name: str) -> tuple[np.dtype, tuple, int]:
    """The first 4 + 4 * ndim bytes of an IDX file -> (big-endian dtype, shape, header length).

    ``head`` may be just the 4-byte prefix: then the shape is () and the length says how many
    bytes the whole header needs (callers read the rest and call again)."""
    if len(head) < 4:
        raise IDXError(f"{name}: {len(head)} bytes is too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or code not in IDX_TYPES:
        raise IDXError(f"{name}: not an IDX file (magic number {head[:4].hex()}; expected 0000 "
                       f"then a type byte in {sorted(hex(c) for c in IDX_TYPES)} and a dimension count)")
    if ndim < 1:
        raise IDXError(f"{name}: IDX header declares 0 dimensions")
    n_head = 4 + 4 * ndim
    if len(head) < n_head:
        return np.dtype(IDX_TYPES[code]), (), n_head
    return np.dtype(IDX_TYPES[code]), struct.unpack(f">{ndim}I", head[4:n_head]), n_head


def _payload_size(dtype: np.dtype, shape: tuple, name: str, max_bytes: int) -> int:
    """Bytes the header's shape needs; IDXError when that exceeds ``max_bytes``."""
    size = math.prod(shape) * dtype.itemsize      # exact: Python integers do not overflow
    if size > max_bytes:
        raise IDXError(f"{name}: header claims shape {shape} of {dtype.name} ({size:,} bytes), "
                       f"more than the {max_bytes:,}-byte limit (minivae.data.MAX_IDX_BYTES); "
                       f"refusing a corrupt or forged header")
    return size


def _size_error(name, dtype, shape, head, expected, got) -> IDXError:
    what = "truncated" if got < expected else "has trailing bytes"
    more = "" if got <= expected else " or more"
    return IDXError(f"{name}: {what}: header says shape {shape} of {dtype.name} "
                    f"({head + expected} bytes), file has {head + got}{more} bytes")


def parse_idx(buf: bytes, name: str = "<bytes>", max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """IDX bytes -> array with the file's shape, in native byte order."""
    dtype, shape, head = _idx_header(bytes(buf[:4]), name)
    if len(buf) < head:
        raise IDXError(f"{name}: truncated IDX header ({len(buf)} bytes, need {head})")
    dtype, shape, head = _idx_header(bytes(buf[:head]), name)
    expected = _payload_size(dtype, shape, name, max_bytes)
    if len(buf) - head != expected:
        raise _size_error(name, dtype, shape, head, expected, len(buf) - head)
    return np.frombuffer(buf, dtype=dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_stream(f, name: str = "<stream>", max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX array from a binary stream ``f`` (already decompressed) -> NumPy array.

    Reads the header first, then at most the exact payload size it announces plus one byte,
    in chunks: a stream holding more is refused after that one extra byte ("has trailing
    bytes"), whatever it would inflate to, and a header that needs more than ``max_bytes``
    is refused before any payload is read. Memory is therefore bounded by the header's claim,
    itself bounded by ``max_bytes``, and by the data actually present."""
    prefix = _read_up_to(f, 4)
    _, _, head = _idx_header(prefix, name)
    header = prefix + _read_up_to(f, head - 4)
    if len(header) < head:
        raise IDXError(f"{name}: truncated IDX header ({len(header)} bytes, need {head})")
    dtype, shape, head = _idx_header(header, name)
    expected = _payload_size(dtype, shape, name, max_bytes)
    payload = _read_up_to(f, expected + 1)
    if len(payload) != expected:
        raise _size_error(name, dtype, shape, head, expected, len(payload))
    a = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return a.astype(dtype.newbyteorder("="), copy=False)


def _read_up_to(f, n: int) -> bytearray:
    """Up to ``n`` bytes of ``f`` (fewer only at its end), read ``_CHUNK`` bytes at a time."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def read_idx(path, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (raw or gzipped: detected by content) -> NumPy array.

    Raises :class:`IDXError`, naming the file, if it is malformed, truncated, longer than its
    header says, or its header needs more than ``max_bytes`` (see :func:`read_idx_stream`:
    a gzip bomb is refused after decompressing the announced size plus one byte)."""
    path = Path(path)
    name = str(path)
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raw.seek(0)
            return read_idx_stream(raw, name, max_bytes)
        raw.seek(0)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return read_idx_stream(f, name, max_bytes)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise IDXError(f"{path}: corrupt or truncated gzip data ({e})") from None


def write_idx(path, a, compress: bool | None = None) -> None:
    """Write array ``a`` as IDX; gzipped when ``compress`` (default: the name ends in .gz)."""
    a = np.asarray(a)
    code = _IDX_CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}; use one of "
                         f"{', '.join(np.dtype(t).name for t in IDX_TYPES.values())}")
    if a.ndim < 1 or a.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got {a.ndim}")
    buf = struct.pack(f">HBB{a.ndim}I", 0, code, a.ndim, *a.shape)
    buf += np.ascontiguousarray(a, dtype=IDX_TYPES[code]).tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(buf, mtime=0) if compress else buf)


# -- the data set object -----------------------------------------------------------------------
@dataclass
class Dataset:
    """A train/test split of flattened images in [0, 1] and integer labels (host arrays).

    x_train: (N, D) float32   y_train: (N,) int64   x_test: (M, D) float32   y_test: (M,) int64
    ``image_shape`` is (H, W) for plotting, with H * W = D.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple = (28, 28)
    classes: tuple = tuple(str(i) for i in range(10))

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self):
        return (f"Dataset({self.name!r}, train {self.x_train.shape}, test {self.x_test.shape}, "
                f"image {self.image_shape})")


def fingerprint(ds: Dataset) -> dict:
    """Short hashes of a data set's images, one per split: {"train": hex, "test": hex}. A
    checkpoint records them, so that resuming a run on other data is refused instead of
    training on quietly. The images only: the labels, which a VAE does not train on, color the
    latent figure and nothing else. 32 hex digits each (BLAKE2b, 128 bits, over the float32
    images and their shape); about 0.2 s for full MNIST."""
    out = {}
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        a = np.ascontiguousarray(x, dtype=np.float32)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{a.shape}".encode())
        h.update(a.data)
        out[split] = h.hexdigest()
    return out


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _images(path) -> tuple[np.ndarray, tuple]:
    """An IDX image file (magic 2051: uint8, (N, H, W)) -> ((N, H*W) float32 in [0, 1], (H, W))."""
    a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim != 3:
        raise IDXError(f"{path}: expected uint8 images of shape (N, H, W), got {a.dtype} {a.shape}")
    if a.shape[0] == 0:
        raise IDXError(f"{path} holds 0 images (header shape {a.shape}); a data set needs at least one")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise IDXError(f"{path}: images of {a.shape[1]} x {a.shape[2]} pixels hold no pixels")
    return (a.reshape(a.shape[0], -1).astype(np.float32) / np.float32(255.0)), a.shape[1:]


def _labels(path, n_classes=10) -> np.ndarray:
    """An IDX label file (magic 2049: uint8, (N,)) -> (N,) int64 in [0, n_classes)."""
    a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise IDXError(f"{path}: expected uint8 labels of shape (N,), got {a.dtype} {a.shape}")
    if a.size and int(a.max()) >= n_classes:
        raise IDXError(f"{path}: label {int(a.max())} is outside 0..{n_classes - 1}")
    return a.astype(np.int64)


def _pair(images, labels):
    x, hw = _images(images)
    y = _labels(labels)
    if len(x) != len(y):
        raise IDXError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x, y, tuple(hw)


# -- MNIST and Fashion-MNIST from a directory, or downloaded --------------------------------------
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Mirrors, tried in order, and checksums of the *gzipped* files as distributed. Neither
# LeCun's page nor Zalando's publishes a SHA-256, so each file is checked against two digests:
# MD5 as published by torchvision.datasets (MNIST, FashionMNIST) and, for Fashion-MNIST, by
# the Zalando README; SHA-256 as used by many independent loaders (MNIST: the same four values
# everywhere) or by a single one (Fashion-MNIST). A mismatch of either digest rejects the file.
SOURCES = {
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"),
        "checksums": {
            "train-images-idx3-ubyte.gz": {
                "sha256": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873"},
            "train-labels-idx1-ubyte.gz": {
                "sha256": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "md5": "d53e105ee54ea40749a09fcbcd1e9432"},
            "t10k-images-idx3-ubyte.gz": {
                "sha256": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "md5": "9fb629c4189551a2d022fa330f9573f3"},
            "t10k-labels-idx1-ubyte.gz": {
                "sha256": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "md5": "ec29112dd5afa0611ce80d1b7f02629c"},
        },
    },
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        "checksums": {
            "train-images-idx3-ubyte.gz": {
                "sha256": "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
                "md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d"},
            "train-labels-idx1-ubyte.gz": {
                "sha256": "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
                "md5": "25c81989df183df01b3e8a0aad5dffbe"},
            "t10k-images-idx3-ubyte.gz": {
                "sha256": "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
                "md5": "bef4ecab320f06d8554ea6380940ec79"},
            "t10k-labels-idx1-ubyte.gz": {
                "sha256": "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
                "md5": "bb300cfdad3c16e7a12a480ee83cd310"},
        },
    },
}
DATASETS = ("mnist10k", "mnist", "fashion-mnist")


def cache_dir() -> Path:
    """Where downloads go: ``$MINIVAE_DATA`` if set, else ``~/.cache/minivae``."""
    env = os.environ.get("MINIVAE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minivae"


def _find(directory: Path, stem: str) -> Path | None:
    """``stem.gz`` or plain ``stem`` (some tools unpack the files) in ``directory``."""
    for cand in (directory / (stem + ".gz"), directory / stem):
        if cand.is_file():
            return cand
    return None


def _missing_message(name: str, directory: Path, reason: str = "") -> str:
    mirror = SOURCES[name]["mirrors"][0]
    files = ", ".join(f + ".gz" for f in FILES)
    msg = f"{name} is not in {directory}"
    if reason:
        msg += f" and could not be downloaded ({reason})"
    return (msg + f". Put the four files {files} (from {mirror}) in {directory}, "
            f"or point --data-dir / path= at a directory holding them, "
            f"or set MINIVAE_DATA to choose the cache directory")


def load_dir(directory, name: str = "mnist") -> Dataset:
    """The four standard IDX files in ``directory`` (gzipped or not) -> :class:`Dataset`."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise DataNotFound(f"data directory {directory} (--data-dir / path=) is a file, not a "
                           f"directory: give the directory that holds the four {name} IDX files")
    if not directory.is_dir():
        raise DataNotFound(f"data directory {directory} does not exist")
    paths = [_find(directory, f) for f in FILES]
    if any(p is None for p in paths):
        missing = [f for f, p in zip(FILES, paths) if p is None]
        raise DataNotFound(f"{directory} lacks {', '.join(m + '[.gz]' for m in missing)} "
                           f"(the standard {name} file names)")
    x_train, y_train, hw = _pair(paths[0], paths[1])
    x_test, y_test, hw_test = _pair(paths[2], paths[3])
    if hw != hw_test:
        raise IDXError(f"{directory}: train images are {hw} but test images are {hw_test}")
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    return Dataset(name, x_train, y_train, x_test, y_test, hw, classes)


def _digests(path: Path) -> dict:
    h = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for d in h.values():
                d.update(chunk)
    return {k: d.hexdigest() for k, d in h.items()}


def verify(path, expected: dict) -> None:
    """Raise IDXError unless every checksum in ``expected`` ({"sha256": hex, ...}) matches."""
    got = _digests(Path(path))
    for algo, want in expected.items():
        if got[algo] != want:
            raise IDXError(f"{path}: {algo} is {got[algo]}, expected {want} "
                           f"(incomplete or altered download)")


def fetch(name: str, root=None, mirrors=None, opener=None, timeout: float = 30.0) -> Path:
    """Fetch the four files of ``name`` into ``root/name`` (default: :func:`cache_dir`),
    verifying each checksum; files already there and verified are kept. -> the directory.

    ``mirrors`` replaces the built-in list (base URLs ending in "/"; file:// works);
    ``opener(url, timeout=...)`` replaces ``urllib.request.urlopen`` (for tests).
    Raises :class:`DataNotFound` when no mirror delivers a file.
    """
    if name not in SOURCES:
        raise ValueError(f"no download source for {name!r}; choose one of {', '.join(SOURCES)}")
    src = SOURCES[name]
    mirrors = tuple(mirrors or src["mirrors"])
    opener = opener or urllib.request.urlopen
    target = Path(root).expanduser() if root else cache_dir()
    target = target / name
    target.mkdir(parents=True, exist_ok=True)
    for fname, sums in src["checksums"].items():
        dest = target / fname
        if dest.is_file():
            try:
                verify(dest, sums)
                continue
            except IDXError:
                dest.unlink()  # a stale partial file: fetch it again
        errors = []
        for base in mirrors:
            tmp = dest.with_name(dest.name + ".part")
            try:
                with opener(base + fname, timeout=timeout) as r, open(tmp, "wb") as f:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        f.write(chunk)
                verify(tmp, sums)
                os.replace(tmp, dest)
                break
            except (OSError, IDXError, ValueError) as e:  # URLError is an OSError
                errors.append(f"{base}: {e}")
                tmp.unlink(missing_ok=True)
        else:
            raise DataNotFound(_missing_message(name, target, "; ".join(errors)))
    return target


# -- the bundled default: the real MNIST test set, split 9,000 / 1,000 ------------------------------

def _bundled_split(n: int = 10_000, n_test: int = 1_000) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx (9000,), test_idx (1000,)) into the 10,000 MNIST test images, both sorted.

    The test indices are written out in ``minivae/datasets/mnist10k_test_indices.txt`` so the
    split never depends on a NumPy version; they were drawn once as
    ``sorted(np.random.default_rng(0).permutation(10000)[:1000])``. A random split rather than
    first/last because LeCun's test set is ordered: the first 5,000 digits are the cleaner
    (NIST SD-3) half, the last 5,000 the harder one.
    """
    text = resources.files("minivae.datasets").joinpath("mnist10k_test_indices.txt").read_text()
    body = " ".join(line for line in text.splitlines() if not line.startswith("#"))
    test = np.array([int(t) for t in body.split()], dtype=np.int64)
    if test.shape != (n_test,) or len(np.unique(test)) != n_test or test.min() < 0 or test.max() >= n:
        raise IDXError("minivae/datasets/mnist10k_test_indices.txt is damaged: expected "
                       f"{n_test} distinct indices in 0..{n - 1}")
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), np.sort(test)


def load_bundled() -> Dataset:
    """``mnist10k``: the MNIST test set shipped with minivae, 9,000 train / 1,000 test."""
    pkg = resources.files("minivae.datasets")
    with resources.as_file(pkg.joinpath("t10k-images-idx3-ubyte.gz")) as pi, \
            resources.as_file(pkg.joinpath("t10k-labels-idx1-ubyte.gz")) as pl:
        x, y, hw = _pair(pi, pl)
    tr, te = _bundled_split(len(x))
    return Dataset("mnist10k", x[tr], y[tr], x[te], y[te], hw)


def load_dataset(name: str = "mnist10k", path=None, download: bool = True) -> Dataset:
    """Load a data set by name -> :class:`Dataset` (host float32 images in [0, 1], int64 labels).

    name: "mnist10k" (bundled, offline), "mnist" or "fashion-mnist" (60,000 / 10,000).
    path: a directory holding the four standard IDX files; when None, the cache directory
          (:func:`cache_dir`)/<name>, fetched there first (:func:`fetch`) if missing and ``download``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "mnist10k":
        if path is not None:
            raise ValueError("mnist10k is bundled with minivae and takes no path; "
                             "use name='mnist' to read MNIST from a directory")
        return load_bundled()
    if path is not None:
        return load_dir(path, name)
    directory = cache_dir() / name
    if all(_find(directory, f) for f in FILES):
        return load_dir(directory, name)
    if not download:
        raise DataNotFound(_missing_message(name, directory))
    return load_dir(fetch(name), name)


# -- binarization ------------------------------------------------------------------------------------
BINARIZE = ("none", "static", "dynamic")


def binarize(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """One Bernoulli draw per pixel: x (N, D) in [0, 1] -> (N, D) float32 of 0s and 1s,
    P(1) = grey level. Used once, with a fixed seed, for "static" binarization and for the
    test set under "dynamic" (the training set is then redrawn on the device every epoch)."""
    u = np.random.default_rng(seed).random(x.shape, dtype=np.float32)
    return (u < x).astype(np.float32)
