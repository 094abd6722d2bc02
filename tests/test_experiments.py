"""The experiment runner: configs and their errors, results on disk and their reuse, exact resume after an
interruption, the summary statistics against scipy, the command line; CIFAR-10 from a fake pickle folder."""

from __future__ import annotations

import math
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

import gradreg as gr
from gradreg.experiments import (
    RunConfig,
    RunRecord,
    best,
    grid,
    load_results,
    paired_difference,
    preset,
    run,
    runner,
    summarize,
    sweep,
)
from gradreg.experiments import __main__ as cli
from gradreg.experiments.summary import Row, mean_se

TINY = dict(train_size=96, width=16, epochs=3, batch_size=32)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_data_cache():
    runner._dataset.cache_clear()
    yield
    runner._dataset.cache_clear()


def _write_fake_cifar(root: Path, n: int = 8, skip: tuple[str, ...] = ()) -> dict[str, tuple[np.ndarray, list]]:
    """The real format: pickled dicts with b"data" (n × 3072 uint8, channel-major) and b"labels"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in gr.data.CIFAR10_FILES:
        if name in skip:
            continue
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = (batch[b"data"], batch[b"labels"])
    return written


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(("kwargs", "needles"), [
    (dict(method="fgr"), ["method must be one of", "'forward'", "'fgr'"]),
    (dict(method="forward", eps=0.1), ["needs gamma"]),
    (dict(method="forward", gamma=0.1), ["needs eps"]),
    (dict(method="sgd", eps=0.1), ["eps applies to method in", "'central'", "leave eps unset"]),
    (dict(method="double", gamma=0.1, rho=0.05), ["rho applies to method in ('sam',)"]),
    (dict(method="forward", gamma=0.1, eps=-0.1), ["eps must be a finite number > 0"]),
    (dict(method="double", gamma=-1.0), ["gamma must be a finite number >= 0"]),
    (dict(method="flooding", flood=math.nan), ["flood must be a finite number"]),
    (dict(dataset="mnist"), ["dataset must be one of ('mnist1d', 'cifar10')"]),
    (dict(model="resnet18"), ["model must be one of ('mlp', 'cnn1d')", "dataset='mnist1d'"]),
    (dict(epochs=0), ["epochs must be an integer > 0"]),
    (dict(batch_size=12.5), ["batch_size must be an integer"]),
    (dict(schedule="step"), ["schedule must be one of ('cosine', 'constant')"]),
    (dict(augment=True), ["augment applies to dataset='cifar10'"]),
    (dict(dataset="cifar10", model="resnet18", width=64), ["width applies to model in"]),
    (dict(model="cnn1d", depth=3), ["depth applies to model='mlp' only"]),
    (dict(seed=True), ["seed must be an integer"]),
])
def test_bad_configs_are_rejected_with_the_argument_and_allowed_values(kwargs, needles):
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs).resolved()
    for needle in needles:
        assert needle in str(info.value)


def test_resolved_fills_defaults_and_names_runs_uniquely():
    plain = RunConfig(method="forward", gamma=0.1, eps=0.05)
    explicit = RunConfig(method="forward", gamma=0.1, eps=0.05, width=512, depth=2, augment=False)
    assert plain.resolved() == explicit.resolved() == plain.resolved().resolved()
    assert plain.run_id == explicit.run_id
    assert plain.run_id.startswith("mnist1d-mlp-forward-gamma0.1-eps0.05-seed0-")
    others = [RunConfig(method="forward", gamma=0.1, eps=0.05, seed=1), RunConfig(method="forward", gamma=0.1,
              eps=0.05, lr=0.05), RunConfig(method="backward", gamma=0.1, eps=0.05)]
    assert len({plain.run_id, *(c.run_id for c in others)}) == 4
    assert RunConfig(dataset="cifar10", model="resnet18").resolved().augment is True
    assert RunConfig.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        RunConfig.from_dict({"method": "sgd", "gama": 0.1})


def test_grid_takes_only_the_hyperparameters_each_method_uses():
    configs = grid(["sgd", "double", "forward", "sam"], gammas=[0.01, 0.1], epss=[0.05, 0.5, 1.0], rhos=[0.05],
                   seeds=[0, 1], epochs=5)
    counts = {m: sum(c.method == m for c in configs) for m in ("sgd", "double", "forward", "sam")}
    assert counts == {"sgd": 2, "double": 4, "forward": 12, "sam": 2}
    assert all(c.epochs == 5 for c in configs)
    assert len({c.run_id for c in configs}) == len(configs)
    with pytest.raises(ValueError, match="method='flooding' needs flood: give at least one value in floods"):
        grid(["flooding"])
    with pytest.raises(ValueError, match="method must be one of"):
        grid(["adam"])


def test_presets_are_valid_and_distinct():
    for name in gr.experiments.PRESETS:
        configs = preset(name)
        assert len({c.run_id for c in configs}) == len(configs)
        assert all(len({c.seed for c in configs if c.setting == s.setting}) >= 5 for s in configs)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("imagenet")


# ------------------------------------------------------------------------------------------------ runs on disk


def test_run_writes_config_version_and_metrics_and_reuses_them(tmp_path, monkeypatch):
    config = RunConfig(method="forward", gamma=0.1, eps=0.1, **TINY)
    record = run(config, tmp_path)
    path = tmp_path / f"{config.run_id}.json"
    assert path.is_file() and not list(tmp_path.glob("*.ckpt.pt"))
    stored = RunRecord.load(path)
    assert stored.config == config.resolved() and stored.meta["gradreg"] == gr.__version__
    assert stored.history["epoch"] == [1, 2, 3]
    assert stored.history == record.history and stored.final == record.final
    assert stored.final["steps"] == 3 * 3 and not stored.final["diverged"]
    assert stored.final["sharpness"] > 0 and stored.final["grad_norm"] > 0
    assert stored.history["lr"][0] == 0.1 and stored.history["lr"][-1] < 0.1  # cosine

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "_Trainer", no_training)
    again = run(config, tmp_path)
    assert again.history == record.history
    assert [r.config for r in sweep([config], tmp_path)] == [config.resolved()]
    assert [r.config.run_id for r in load_results(tmp_path)] == [config.run_id]


class Interrupt(Exception):
    pass


def _interrupt_after(k: int):
    def hook(epoch, metrics):
        if epoch == k:
            raise Interrupt
    return hook


def _without_times(history):
    return {k: v for k, v in history.items() if k != "seconds"}


@pytest.mark.parametrize("config", [
    RunConfig(method="sgd", **TINY),
    RunConfig(method="forward", gamma=0.1, eps=0.1, **TINY),
    RunConfig(method="backward", gamma=0.1, eps=0.05, model="cnn1d", train_size=64, width=4, epochs=3),
    RunConfig(method="sam", rho=0.05, **TINY),
    RunConfig(method="flooding", flood=1.5, **TINY),
], ids=lambda c: c.method)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path, config):
    whole = run(config, tmp_path / "whole", keep_checkpoint=True)
    state_whole = torch.load(tmp_path / "whole" / f"{config.run_id}.ckpt.pt", weights_only=True)
    rng_whole = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut", on_epoch_end=_interrupt_after(2))
    assert not (tmp_path / "cut" / f"{config.run_id}.json").exists()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the process moves on: other random numbers
    resumed = run(config, tmp_path / "cut", keep_checkpoint=True)
    state_cut = torch.load(tmp_path / "cut" / f"{config.run_id}.ckpt.pt", weights_only=True)

    assert resumed.meta["resumed_from_epoch"] == 2 and whole.meta["resumed_from_epoch"] is None
    assert _without_times(resumed.history) == _without_times(whole.history)
    assert resumed.final == whole.final
    for part in ("model", "optimizer", "scheduler"):
        flat_whole, flat_cut = _flatten(state_whole[part]), _flatten(state_cut[part])
        assert flat_whole.keys() == flat_cut.keys()
        for key, value in flat_whole.items():
            assert _equal(value, flat_cut[key]), f"{part} {key}"
    assert torch.equal(state_whole["generator"], state_cut["generator"])
    assert torch.equal(rng_whole[0], torch.get_rng_state())
    assert np.array_equal(rng_whole[1], np.random.get_state()[1]) and rng_whole[2] == random.getstate()


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


@pytest.mark.parametrize("flood", [None, 0.5, 5.0])
def test_train_step_flooding_is_sgd_on_the_flooded_loss(flood):
    """Against gradreg.flooding.flooded and a hand-written SGD step: descent above b, ascent below."""
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    start = [p.detach().clone() for p in model.parameters()]
    loss = runner.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, flood)
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 3).double()
    plain = torch.nn.functional.cross_entropy(reference(x), y)
    objective = plain if flood is None else gr.flooding.flooded(plain, flood)
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    for p, p0, g in zip(model.parameters(), start, grads):
        assert torch.allclose(p.detach(), p0 - 0.1 * g, rtol=0, atol=1e-15)
    assert float(loss) == float(plain.detach())
    if flood == 5.0:  # below the flood level: the step ascends
        with torch.no_grad():
            assert float(torch.nn.functional.cross_entropy(model(x), y)) > float(plain)


def test_paired_runs_share_initialization_and_data_order(tmp_path):
    a = runner._Trainer(RunConfig(method="sgd", **TINY).resolved(), torch.device("cpu"), False)
    b = runner._Trainer(RunConfig(method="forward", gamma=0.1, eps=0.1, **TINY).resolved(), torch.device("cpu"), False)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_a_diverging_run_is_recorded_not_raised(tmp_path):
    for config in (RunConfig(method="sgd", lr=1e4, momentum=0.0, schedule="constant", **TINY),
                   RunConfig(method="forward", gamma=10.0, eps=10.0, lr=1e4, schedule="constant", **TINY)):
        record = run(config, tmp_path)
        assert record.final["diverged"] is True and record.final["test_acc"] is None
        assert record.history["batch_loss"][-1] is None
    rows = summarize(load_results(tmp_path))
    assert all(math.isnan(r.mean) and r.diverged == 1 for r in rows) and best(rows) == {}


# ------------------------------------------------------------------------------------------------ summary


def _row(method: str, values: dict[int, float], **kwargs) -> Row:
    setting = RunConfig(method=method, **kwargs)
    mean, se = mean_se(list(values.values()))
    return Row(setting, tuple(values), tuple(values.values()), mean, se, 0)


def test_mean_se_and_paired_interval_agree_with_scipy():
    rng = np.random.default_rng(3)
    a_values, b_values = rng.normal(0.6, 0.02, 7), rng.normal(0.59, 0.02, 7)
    a = _row("double", dict(enumerate(a_values)), gamma=0.1)
    b = _row("sgd", dict(enumerate(b_values)))
    assert a.mean == pytest.approx(a_values.mean(), rel=1e-12)
    assert a.se == pytest.approx(stats.sem(a_values), rel=1e-12)
    for confidence in (0.9, 0.95, 0.99):
        diff = paired_difference(a, b, confidence=confidence)
        reference = stats.ttest_rel(a_values, b_values).confidence_interval(confidence)
        assert (diff.low, diff.high) == pytest.approx((reference.low, reference.high), rel=1e-10)
        assert diff.mean == pytest.approx((a_values - b_values).mean(), rel=1e-12) and diff.n == 7
    # pairing by seed, not by position: shuffled seeds give the same interval
    shuffled = _row("sgd", {s: b_values[s] for s in (6, 2, 0, 5, 1, 4, 3)})
    assert paired_difference(a, shuffled) == paired_difference(a, b)
    # only shared seeds are paired
    partial = _row("sgd", {0: 0.5, 1: 0.4, 9: 0.1})
    assert paired_difference(a, partial).n == 2
    with pytest.raises(ValueError, match="at least 2 seeds shared"):
        paired_difference(a, _row("sgd", {0: 0.5, 8: 0.1}))
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_difference(a, b, confidence=95)


def test_summarize_groups_seeds_and_best_picks_per_method(tmp_path):
    records = []
    for method, kwargs, accs in (("forward", dict(gamma=0.1, eps=0.1), [0.5, 0.6]),
                                 ("forward", dict(gamma=0.1, eps=0.5), [0.7, 0.8]),
                                 ("sgd", {}, [0.4, 0.6])):
        for seed, acc in enumerate(accs):
            records.append(RunRecord(RunConfig(method=method, seed=seed, **kwargs).resolved(), [],
                                     {"test_acc": acc, "test_loss": 1 - acc, "diverged": False}, {}))
    rows = summarize(records)
    assert [(r.label, r.seeds) for r in rows] == [("forward γ=0.1 ε=0.1", (0, 1)), ("forward γ=0.1 ε=0.5", (0, 1)),
                                                  ("sgd", (0, 1))]
    assert rows[1].mean == pytest.approx(0.75) and rows[1].se == pytest.approx(0.05)
    chosen = best(rows)
    assert chosen["forward"].setting.eps == 0.5 and chosen["sgd"] is rows[2]
    assert best(summarize(records, "test_loss"), higher=False)["forward"].setting.eps == 0.5
    with pytest.raises(ValueError, match="metric must be one of"):
        summarize(records, "accuracy")


# ------------------------------------------------------------------------------------------------ command line


def test_cli_help_runs_without_warnings():
    done = subprocess.run([sys.executable, "-m", "gradreg.experiments", "run", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--methods" in done.stdout and "flooding" in done.stdout and done.stderr == ""


@pytest.mark.parametrize(("argv", "needle"), [
    (["run", "--methods", "fgr"], "invalid choice: 'fgr'"),
    (["run", "--methods", "forward", "--gamma", "0.1"], "method='forward' needs eps"),
    (["run", "--methods", "sgd", "double", "--gamma", "0.1", "--eps", "0.1"], "--eps applies to --methods forward"),
    (["run", "--methods", "sgd", "forward", "--gamma", "0.1", "--eps", "0.1", "--dry-run"], ""),
    (["run", "--dataset", "cifar10", "--model", "cnn1d"], "model must be one of ('resnet18', 'mlp')"),
    (["run", "--preset", "mnist1d", "--epochs", "3"], "--preset mnist1d cannot be combined with --epochs"),
    (["run", "--epochs", "ten"], "invalid int value: 'ten'"),
    (["summary", "--results", "/nonexistent/folder"], "no finished runs"),
])
def test_cli_rejects_bad_configurations_with_usage_errors(argv, needle, capsys):
    if not needle:
        assert cli.main(argv) == 0
        return
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m gradreg.experiments") and needle in err


def test_cli_trains_a_sweep_and_summarizes_it(tmp_path, capsys):
    argv = ["run", "--methods", "sgd", "backward", "--gamma", "0.1", "--eps", "0.1", "--seeds", "0", "1",
            "--train-size", "64", "--width", "8", "--epochs", "1", "--results", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "backward γ=0.1 ε=0.1" in out and len(list(tmp_path.glob("*.json"))) == 4
    assert cli.main(["summary", "--results", str(tmp_path), "--metric", "sharpness"]) == 0
    out = capsys.readouterr().out
    assert "lowest mean sharpness" in out and out.count("sgd") == 2


# ------------------------------------------------------------------------------------------------ data, models


def test_cifar10_reads_the_pickle_folder(tmp_path, monkeypatch):
    written = _write_fake_cifar(tmp_path, n=6)
    data = gr.data.cifar10(tmp_path)
    assert data.x.shape == (30, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32) and data.num_classes == 10
    raw, labels = written["data_batch_2"]
    image = raw[1].reshape(3, 32, 32).astype(np.float64) / 255  # channel-major rows of 1024 pixels
    expected = (image - np.array(gr.data.CIFAR10_MEAN)[:, None, None]) / np.array(gr.data.CIFAR10_STD)[:, None, None]
    assert np.allclose(data.x[7].numpy(), expected, atol=1e-6)
    assert data.y[7] == labels[1] and data.y.dtype == torch.int64
    assert data.y_test.tolist() == written["test_batch"][1]
    monkeypatch.setenv("GRADREG_DATA", str(tmp_path))
    assert torch.equal(gr.data.cifar10().x, data.x)


def test_cifar10_missing_says_where_to_put_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        gr.data.cifar10(tmp_path / "nothing")
    message = str(info.value)
    for needle in ("cifar-10-batches-py", "data_batch_1", "test_batch", gr.data.CIFAR10_URL, "download=True",
                   "GRADREG_DATA", str(tmp_path / "nothing")):
        assert needle in message
    _write_fake_cifar(tmp_path / "partial", skip=("test_batch",))
    with pytest.raises(FileNotFoundError, match="lacks test_batch"):
        gr.data.cifar10(tmp_path / "partial")


def test_runner_trains_on_cifar10_with_augmentation_and_resumes_exactly(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path / "data", n=16)
    monkeypatch.setenv("GRADREG_DATA", str(tmp_path / "data"))
    config = RunConfig(method="forward", gamma=0.1, eps=0.1, dataset="cifar10", model="mlp", width=8, epochs=3,
                       batch_size=32)
    assert config.resolved().augment is True
    whole = run(config, tmp_path / "whole")
    with pytest.raises(Interrupt):
        run(config, tmp_path / "cut", on_epoch_end=_interrupt_after(1))
    resumed = run(config, tmp_path / "cut")
    assert _without_times(resumed.history) == _without_times(whole.history) and resumed.final == whole.final
    no_augment = run(RunConfig(**{**config.to_dict(), "augment": False}), tmp_path / "plain")
    assert no_augment.history["batch_loss"][0] != whole.history["batch_loss"][0]


def test_random_crop_flip_matches_a_per_image_reference():
    n = 16
    x = torch.randn(n, 3, 6, 7)
    out = gr.data.random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, fill=(1.0, 2.0, 3.0))
    g = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    for i in range(n):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        for c, value in enumerate((1.0, 2.0, 3.0)):
            padded[c][torch.nn.functional.pad(torch.zeros(6, 7), (2, 2, 2, 2), value=1.0).bool()] = value
        crop = padded[:, top[i]:top[i] + 6, left[i]:left[i] + 7]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)
    assert flip.any() and not flip.all()
    with pytest.raises(ValueError, match="fill must have one value per channel"):
        gr.data.random_crop_flip(x, g, fill=(0.0,))


def test_missing_mnist1d_names_the_extra(monkeypatch):
    gr.data._mnist1d_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r'MNIST-1D .* pip install [a-z ]*mnist1d.* "gradreg\[book\] @ git\+https://'):
        gr.data.mnist1d()
    gr.data._mnist1d_arrays.cache_clear()


def test_models_for_every_dataset():
    data = gr.data.mnist1d().subset(4)
    for model, params in (("mlp", 40 * 512 + 512 + 512 * 10 + 10), ("cnn1d", 9610)):
        net = runner.build_model(RunConfig(model=model).resolved(), data)
        assert net(data.x).shape == (4, 10) and sum(p.numel() for p in net.parameters()) == params
    images = gr.data.Dataset(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 3, 32, 32),
                             torch.zeros(1, dtype=torch.int64), 10)
    mlp = runner.build_model(RunConfig(dataset="cifar10", model="mlp", width=8).resolved(), images)
    assert mlp(images.x).shape == (2, 10)


def test_train_classifier_still_trains():
    data = gr.data.mnist1d().subset(128, 64)
    torch.manual_seed(0)
    model = gr.models.mlp(40, 16, 2, 10)
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.01, eps=0.01)
    history = gr.experiments.train_classifier(model, optimizer, data, steps=20, batch_size=32, eval_every=10)
    assert history.step == [0, 10, 20] and history.train_loss[-1] < history.train_loss[0]
