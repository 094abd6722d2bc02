"""The chapter runtime: the size switch, seeding, and the result cache."""

from __future__ import annotations

import pytest
import torch

import gradreg as gr
from gradreg import runtime


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("0", False), ("off", False)])
def test_size_switch_reads_gradreg_full(monkeypatch, value, expected):
    monkeypatch.setenv("GRADREG_FULL", value)
    assert runtime.full_size() is expected
    assert gr.setup(seed=0, style=False).size("fast", "full") == ("full" if expected else "fast")


def test_size_switch_defaults_to_cuda_availability_and_rejects_garbage(monkeypatch):
    monkeypatch.delenv("GRADREG_FULL", raising=False)
    assert runtime.full_size() is torch.cuda.is_available()
    monkeypatch.setenv("GRADREG_FULL", "maybe")
    with pytest.raises(ValueError, match="GRADREG_FULL must be one of"):
        runtime.full_size()


def test_setup_seeds_torch():
    gr.setup(seed=3, style=False)
    first = torch.rand(3)
    gr.setup(seed=3, style=False)
    assert torch.equal(first, torch.rand(3))


def test_cache_stores_in_full_mode_and_recomputes_in_fast_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADREG_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"value": torch.arange(3)}

    monkeypatch.setenv("GRADREG_FULL", "1")
    first = runtime.cached("demo", {"a": 1}, compute)
    again = runtime.cached("demo", {"a": 1}, compute)
    assert len(calls) == 1 and torch.equal(first["value"], again["value"])
    runtime.cached("demo", {"a": 2}, compute)  # another config is another entry
    assert len(calls) == 2
    monkeypatch.setenv("GRADREG_FULL", "0")
    runtime.cached("demo", {"a": 1}, compute)
    assert len(calls) == 3


def test_setup_picks_one_thread_at_the_fast_size_and_keeps_an_explicit_choice(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("GRADREG_FULL", "0")
        monkeypatch.setattr(runtime, "_TORCH_THREADS", runtime.MAX_THREADS + 3)
        fast = gr.setup(seed=0, style=False)
        assert (fast.threads, fast.threads_why) == (1, "fast size") and "threads=1 (fast size)" in repr(fast)
        monkeypatch.setenv("GRADREG_FULL", "1")
        assert gr.setup(seed=0, style=False).threads == runtime.MAX_THREADS  # full size: torch's default, capped
        monkeypatch.setattr(runtime, "_TORCH_THREADS", 1)
        assert gr.setup(seed=0, style=False).threads == 1  # never above torch's own choice
        assert gr.setup(seed=0, style=False, threads=2).threads == 2 == torch.get_num_threads()
        above = runtime.MAX_THREADS + 2
        monkeypatch.setenv("OMP_NUM_THREADS", str(above))
        monkeypatch.setattr(runtime, "_TORCH_THREADS", above)  # what torch read from the environment at start
        chosen = gr.setup(seed=0, style=False)
        assert chosen.threads == above and f"threads={above} (OMP_NUM_THREADS)" in repr(chosen)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="threads must be an integer >= 1"):
                gr.setup(seed=0, style=False, threads=bad)
    finally:
        torch.set_num_threads(before)


def test_unlabelled_axes_are_found_and_shared_or_figure_labels_count():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, sharey=True)
    a.plot([1, 2])
    b.plot([2, 1])
    a.set_ylabel("loss")
    a.set_xlabel("step")
    assert runtime.unlabelled_axes(fig) == ["axes 1 ('') has no x label"]  # y is shared with a labelled axes
    fig.supxlabel("step")
    assert runtime.unlabelled_axes(fig) == []
    drawing, ax = plt.subplots()
    ax.set_axis_off()
    assert runtime.unlabelled_axes(drawing) == []
    plt.close("all")
