"""Data sets for the chapters and the experiment runner.

* MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package: offline, seconds on a CPU.
* CIFAR-10, read from the standard ``cifar-10-batches-py`` folder (the "python version" of the data set) with
  numpy's unpickler, and downloaded (``download=True``) from the standard tarball with the standard library, its
  SHA-256 checked: no torchvision needed.

Augmentation for images (:func:`random_crop_flip`) runs in torch on whole batches, driven by an explicit
``torch.Generator``, so an interrupted training run can restore it exactly.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gradreg._optional import require

DATA_ENV = "GRADREG_DATA"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: The SHA-256 of that tarball (170 498 071 bytes; its MD5 is c58f30108f718f92721af3b95e74349a, torchvision's).
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of a classification task (inputs float, labels int64)."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Dataset:
        return Dataset(
            self.x.to(device, dtype), self.y.to(device), self.x_test.to(device, dtype), self.y_test.to(device),
            self.num_classes,
        )

    def subset(self, n_train: int, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (the generators already shuffle)."""
        n_test = len(self.x_test) if n_test is None else n_test
        return Dataset(self.x[:n_train], self.y[:n_train], self.x_test[:n_test], self.y_test[:n_test],
                       self.num_classes)


@lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    mnist1d_data = require("mnist1d.data", extra="book", purpose="MNIST-1D (gradreg.data.mnist1d)")
    args = mnist1d_data.get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    return mnist1d_data.make_dataset(args)  # procedural: no download (mnist1d's get_dataset would fetch a pickle)


def mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, 80 % train / 20 % test, made offline.

    The defaults reproduce the standard set (4000 train, 1000 test, seed 42).
    """
    arrays = _mnist1d_arrays(num_samples, seed)
    return Dataset(
        torch.as_tensor(arrays["x"], dtype=torch.float32), torch.as_tensor(arrays["y"], dtype=torch.int64),
        torch.as_tensor(arrays["x_test"], dtype=torch.float32), torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        10,
    )


def data_dir() -> Path:
    """Where data sets that must be downloaded live: ``GRADREG_DATA``, else ``~/.cache/gradreg/data``."""
    return Path(os.environ.get(DATA_ENV, Path.home() / ".cache" / "gradreg" / "data"))


def _missing_cifar10(root: Path, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR-10 was not found: {root / CIFAR10_FOLDER} lacks {', '.join(missing)}.\n"
        f"gradreg reads the 'python version' of CIFAR-10: the folder {CIFAR10_FOLDER}/ with the pickled files "
        f"{', '.join(CIFAR10_FILES)}. To get it, either\n"
        f"  * download {CIFAR10_URL} (163 MB) and unpack it into {root}:\n"
        f"      mkdir -p {root} && tar -xzf cifar-10-python.tar.gz -C {root}\n"
        f"  * or let gradreg download it: cifar10(download=True) (the same tarball, its SHA-256 checked);\n"
        f"  * or point root= (or the environment variable {DATA_ENV}) at the folder that contains {CIFAR10_FOLDER}/."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, path: Path, sha256: str, *, what: str = "") -> Path:
    """Download ``url`` to ``path`` (through ``path.part``) with a progress line on stderr, unless ``path`` already
    has the SHA-256 ``sha256``; a download with another checksum is deleted and raises ``ValueError``."""
    if path.is_file() and _sha256(path) == sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part, digest, done = path.with_name(path.name + ".part"), hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            share = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f} %)" if total else " MB"
            print(f"\rdownloading {what or url}: {done / 1e6:.1f}{share}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if digest.hexdigest() != sha256:
        part.unlink()
        raise ValueError(f"{url}: the download's SHA-256 is {digest.hexdigest()}, expected {sha256} (a truncated or "
                         f"altered file; deleted). Try again, or download it yourself into {path.parent}")
    part.replace(path)
    return path


def _download_cifar10(root: Path) -> None:
    """The CIFAR-10 tarball into ``root`` (checked), unpacked there; the folder only, nothing outside it."""
    archive = download(CIFAR10_URL, root / CIFAR10_ARCHIVE, CIFAR10_SHA256, what="CIFAR-10")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[0] == CIFAR10_FOLDER]
        tar.extractall(root, members=members, filter="data")


def _unpickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _normalize(images: np.ndarray) -> Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(images).float() / 255 - mean) / std


def cifar10(root: str | Path | None = None, *, download: bool = False) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009): 50 000 training and 10 000 test images, 3×32×32, normalized per channel.

    Reads ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (``root`` defaults to :func:`data_dir`).
    Where the files are missing, ``download=True`` downloads ``CIFAR10_URL`` into ``root`` (163 MB, progress
    on stderr, SHA-256 checked) and unpacks it; otherwise a :class:`FileNotFoundError` says where to put them.
    There is never a silent substitute.
    """
    root = data_dir() if root is None else Path(root)
    missing = [name for name in CIFAR10_FILES if not (root / CIFAR10_FOLDER / name).is_file()]
    if missing and download:
        _download_cifar10(root)
        missing = [name for name in CIFAR10_FILES if not (root / CIFAR10_FOLDER / name).is_file()]
    if missing:
        raise _missing_cifar10(root, missing)
    train = [_unpickle(root / CIFAR10_FOLDER / name) for name in CIFAR10_FILES[:-1]]
    x_test, y_test = _unpickle(root / CIFAR10_FOLDER / CIFAR10_FILES[-1])
    return Dataset(
        _normalize(np.concatenate([images for images, _ in train])),
        torch.from_numpy(np.concatenate([labels for _, labels in train])),
        _normalize(x_test), torch.from_numpy(y_test), 10,
    )


def random_crop_flip(x: Tensor, generator: torch.Generator, *, padding: int = 4,
                     fill: tuple[float, ...] | None = None) -> Tensor:
    """The standard CIFAR augmentation on a batch (N, C, H, W): pad by ``padding`` on every side with ``fill``
    (per channel; default: a black pixel after CIFAR-10's normalization), crop a random H×W window, and flip
    it horizontally with probability ½. Offsets and flips are drawn from ``generator`` (on the CPU)."""
    n, c, h, w = x.shape
    if fill is None:
        fill = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
    if len(fill) != c:
        raise ValueError(f"fill must have one value per channel ({c}), got {len(fill)}")
    padded = torch.empty(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype, device=x.device)
    padded[:] = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    padded[:, :, padding:padding + h, padding:padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(h)).to(x.device)                      # (n, h)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = (left[:, None] + cols).to(x.device)                                # (n, w)
    index_n = torch.arange(n, device=x.device)[:, None, None, None]
    index_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[index_n, index_c, rows[:, None, :, None], cols[:, None, None, :]]
