"""CIFAR-10's download without torchvision, offline: a tiny tarball in the real layout, served from a file:// URL."""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch

import gradreg as gr


def tiny_tarball(path, n: int = 4) -> str:
    """cifar-10-python.tar.gz's layout (cifar-10-batches-py/ with six pickles) with ``n`` images each, plus a member
    outside the folder that must not be unpacked; returns its SHA-256."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in (*gr.data.CIFAR10_FILES, "../outside"):
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{gr.data.CIFAR10_FOLDER}/{name}" if name[0] != "." else "outside")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path, monkeypatch):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    monkeypatch.setattr(gr.data, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(gr.data, "CIFAR10_SHA256", tiny_tarball(archive))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # never needed
    return archive


def test_cifar10_downloads_checks_and_unpacks_the_tarball(served, tmp_path, capsys):
    data = gr.data.cifar10(tmp_path / "data", download=True)
    assert data.x.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert torch.equal(data.y_test, torch.arange(4))
    assert "downloading CIFAR-10" in capsys.readouterr().err  # progress shown
    assert not (tmp_path / "data" / "outside").exists()  # only the data folder is unpacked
    served.unlink()  # a second call reads the folder: no download
    assert torch.equal(gr.data.cifar10(tmp_path / "data", download=True).x, data.x)


def test_a_download_with_another_checksum_is_deleted_and_refused(served, tmp_path, monkeypatch):
    monkeypatch.setattr(gr.data, "CIFAR10_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256 is [0-9a-f]{64}, expected 0{64}"):
        gr.data.cifar10(tmp_path / "data", download=True)
    assert not list((tmp_path / "data").glob("cifar-10-python.tar.gz*"))  # nothing half-downloaded kept
