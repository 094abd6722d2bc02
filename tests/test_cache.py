"""``gradreg.runtime.cached``: read back with ``weights_only=True`` (no code from the file runs), gradreg's
dataclasses, tuples and arrays round-trip, and a bad or foreign cache file is recomputed with a warning naming it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gradreg import runtime
from gradreg.experiments.training import History


class Evil:
    """Unpickling this would run code; ``weights_only=True`` refuses it."""

    ran = False

    def __reduce__(self):
        return (Evil._run, ())

    @staticmethod
    def _run():
        Evil.ran = True
        return "ran"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_results_round_trip_and_are_read_with_weights_only(cache, monkeypatch):
    value = {"h": [History([0, 1], [1.0, 0.5], [1.1, 0.6], [0.1, 0.2])], "pair": (1, "a"),
             "array": np.arange(3.0), "tensor": torch.ones(2), "version": torch.__version__}
    first = runtime.cached("x", {"a": 1}, lambda: value, enabled=True)
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or original(*a, **k))
    again = runtime.cached("x", {"a": 1}, lambda: pytest.fail("recomputed"), enabled=True)
    assert loads == [True]
    assert again["h"] == first["h"] and isinstance(again["h"][0], History) and again["pair"] == (1, "a")
    assert np.array_equal(again["array"], value["array"]) and torch.equal(again["tensor"], value["tensor"])
    assert type(again["version"]) is str


def test_a_foreign_or_broken_cache_file_is_recomputed_with_a_warning_and_runs_no_code(cache):
    runtime.cached("y", {}, lambda: 1, enabled=True)
    (path,) = cache.glob("y-*.pt")
    for content in ("pickle", "garbage", "empty"):
        if content == "pickle":
            torch.save({"result": Evil()}, path)
        else:
            path.write_bytes(b"" if content == "empty" else b"garbage")
        with pytest.warns(UserWarning, match=f"{path} cannot be used"):
            assert runtime.cached("y", {}, lambda: 2, enabled=True) == 2
        assert not Evil.ran
        assert runtime.cached("y", {}, lambda: pytest.fail("recomputed"), enabled=True) == 2


def test_what_cannot_be_stored_is_refused_before_writing(cache):
    @dataclasses.dataclass
    class Local:
        x: int

    with pytest.raises(TypeError, match="only gradreg's dataclasses"):
        runtime.cached("z", {}, lambda: Local(1), enabled=True)
    with pytest.raises(TypeError, match="cannot store a set"):
        runtime.cached("z", {}, lambda: {1, 2}, enabled=True)
    assert not list(cache.glob("z-*"))
