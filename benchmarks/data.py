"""Data sets of the benchmark problems: scikit-learn's bundled digits, MNIST from IDX files.

Nothing here downloads anything. MNIST is read from IDX files (the format of the original
distribution, gzipped or not) in a directory the user names; the tests write small IDX files
with :func:`write_idx` and read them back with :func:`read_idx`.

IDX layout: two zero bytes, one type byte, one byte with the number of dimensions ``n``, then
``n`` big-endian ``int32`` sizes, then the data in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IDX_DTYPES",
    "MNIST_FILES",
    "Split",
    "load_digits_split",
    "load_mnist_images",
    "read_idx",
    "write_idx",
]

#: IDX type byte -> numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: The MNIST image files the ``mnist-ae`` problem reads (each may also end in ``.gz``).
MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one problem (inputs ``x``, targets ``y``)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain, or gzipped when the name ends in ``.gz``) into a numpy array.

    Raises:
        ValueError: if the header is malformed or the data size does not match it.
    """
    path = Path(path)
    with _open(path) as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (it must start with two zero bytes)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type byte 0x{code:02X}; known: {sorted(hex(c) for c in IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} of {dtype} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    code = next((c for c, d in IDX_DTYPES.items() if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize), None)
    if code is None:
        raise ValueError(f"array dtype {array.dtype} has no IDX type; use uint8, int8, int16, int32, float32 or float64")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.astype(IDX_DTYPES[code], copy=False).tobytes(order="C")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + body)
    return path


def _find(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_mnist_images(data_dir: str | Path | None, *, limit_train: int | None = None,
                      limit_test: int | None = None) -> Split:
    """MNIST images scaled to [0, 1] and flattened to 784, targets = inputs (autoencoder).

    Args:
        data_dir: directory holding ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
            (either may be gzipped, ``.gz``).
        limit_train, limit_test: keep only the first so many images.

    Raises:
        FileNotFoundError: naming the files expected (this never downloads anything).
    """
    if data_dir is None:
        raise FileNotFoundError(
            "mnist-ae reads MNIST from IDX files and never downloads: pass --data-dir DIR where DIR "
            f"holds {MNIST_FILES['train']}[.gz] and {MNIST_FILES['test']}[.gz]"
        )
    data_dir = Path(data_dir)
    found = {k: _find(data_dir, stem) for k, stem in MNIST_FILES.items()}
    missing = [f"{MNIST_FILES[k]}[.gz]" for k, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST files missing in {data_dir}: {', '.join(missing)} (expected {MNIST_FILES['train']}[.gz] "
            f"and {MNIST_FILES['test']}[.gz], the original IDX files; nothing is downloaded)"
        )
    out = []
    for key, limit in (("train", limit_train), ("test", limit_test)):
        images = read_idx(found[key])
        if images.ndim != 3:
            raise ValueError(f"{found[key]}: expected images of shape (n, rows, cols), got {images.shape}")
        images = images[:limit] if limit is not None else images
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        out.append(x)
    return Split(out[0], out[0], out[1], out[1])


def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 real images), pixels scaled to [0, 1].

    Returns ``(x_train, labels_train, x_test, labels_test)``, ``x`` flattened to 64 values; the
    split is a fixed random permutation (``seed``), the same for every method and run.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], labels[train], x[test], labels[test]
