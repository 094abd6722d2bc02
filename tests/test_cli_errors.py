"""Every user error of ``python -m gradreg.experiments`` and ``python -m gradreg.bench`` is an argparse usage error:
exit status 2, ``usage:`` on stderr, no traceback (in-process, plus one subprocess per command); and warnings of
dependencies do not reach either command's output."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gradreg.bench import __main__ as bench_cli
from gradreg.experiments import __main__ as experiments_cli

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
TINY = ["--train-size", "64", "--width", "8", "--epochs", "1", "--no-progress"]

EXPERIMENTS = [
    pytest.param(["run", "--results", "{file}"], "{file} is a regular file, not a folder", id="results-file"),
    pytest.param(["run", "--results", "{file}/sub"], "{file} is a regular file, not a folder", id="results-under-file"),
    pytest.param(["run", "--results", "/proc/gradreg-results"], "--results /proc/gradreg-results: cannot be written",
                 id="results-proc"),
    pytest.param(["summary", "--results", "{file}"], "{file} is a regular file", id="summary-results-file"),
    pytest.param(["run", "--device", "cuda"], "argument --device: 'cuda': CUDA is not available here",
                 id="device-cuda", marks=NO_CUDA),
    pytest.param(["run", "--device", "bogus"], "argument --device: not a torch device: 'bogus'", id="device-bogus"),
    pytest.param(["run", "--device", "meta"], "argument --device: 'meta': choose cpu, cuda", id="device-meta"),
    pytest.param(["run", "--methods", "sgd", "sgd"], "--methods: sgd is listed twice", id="methods-twice"),
    pytest.param(["run", "--seeds", "0", "0"], "--seeds: 0 is listed twice", id="seeds-twice"),
    pytest.param(["run", "--methods", "double", "--gamma", "0.1", "0.1"], "--gamma: 0.1 is listed twice",
                 id="gamma-twice"),
    pytest.param(["run", "--methods", "forward", "--gamma", "0.1", "--eps", "0.1", "0.10"], "--eps: 0.1 is listed",
                 id="eps-twice"),
    pytest.param(["run", "--train-size", "100000", "--epochs", "1"],
                 "--train-size 100000: the mnist1d training set has 4000 examples", id="train-size-too-large"),
    pytest.param(["run", "--jobs", "0"], "argument --jobs: must be an integer >= 1", id="jobs-zero"),
    pytest.param(["run", "--dataset", "cifar10", "--model", "mlp", "--epochs", "1"], "--dataset cifar10: ",
                 id="cifar10-missing"),
]


@pytest.mark.parametrize(("argv", "needle"), EXPERIMENTS)
def test_experiments_user_errors_are_usage_errors(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADREG_DATA", str(tmp_path / "no-data"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    fill = lambda s: s.replace("{file}", str(tmp_path / "file"))  # noqa: E731
    ran = []
    monkeypatch.setattr(experiments_cli, "sweep", lambda *a, **k: ran.append(1))
    with pytest.raises(SystemExit) as info:
        experiments_cli.main([fill(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage:" in err and "Traceback" not in err, err
    assert fill(needle) in err, err
    assert not ran


def _write_models(folder: Path) -> None:
    (folder / "mymod.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n    return nn.Linear(3, 2)\n"
        "def not_a_module():\n    return 42\n"
        "def broken():\n    raise RuntimeError('my bug')\n"
    )


BENCH = [
    pytest.param(["--model", "mymod:nosuchfn", "--input-shape", "3"], "module 'mymod' has no function 'nosuchfn'",
                 id="model-function-missing"),
    pytest.param(["--model", "mymod:not_a_module", "--input-shape", "3"], "returned int, not a torch.nn.Module",
                 id="model-not-a-module"),
    pytest.param(["--model", "mymod:broken", "--input-shape", "3"], "calling it raised RuntimeError: my bug",
                 id="model-function-fails"),
    pytest.param(["--device", "cuda"], "argument --device: 'cuda': CUDA is not available here", id="device-cuda",
                 marks=NO_CUDA),
    pytest.param(["--device", "bogus"], "argument --device: not a torch device", id="device-bogus"),
    pytest.param(["--device", "meta"], "argument --device: 'meta': choose cpu, cuda", id="device-meta"),
    pytest.param(["--json", "{file}/sub.json"], "--json {file}/sub.json: cannot be written", id="json-under-file"),
    pytest.param(["--json", "/proc/gradreg.json"], "--json /proc/gradreg.json: cannot be written", id="json-proc"),
]


@pytest.mark.parametrize(("argv", "needle"), BENCH)
def test_bench_user_errors_are_usage_errors(argv, needle, tmp_path, monkeypatch, capsys):
    _write_models(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymod", None)
    (tmp_path / "file").write_text("x")
    fill = lambda s: s.replace("{file}", str(tmp_path / "file"))  # noqa: E731
    ran = []
    monkeypatch.setattr(bench_cli, "benchmark", lambda *a, **k: ran.append(1))
    with pytest.raises(SystemExit) as info:
        bench_cli.main([fill(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage:" in err and "Traceback" not in err, err
    assert fill(needle) in err, err
    assert not ran


@pytest.mark.parametrize(("module", "argv"), [
    ("gradreg.experiments", ["run", "--seeds", "0", "0", "--results", "{file}"]),
    ("gradreg.bench", ["--model", "mymod:not_a_module", "--input-shape", "3"]),
])
def test_the_real_commands_exit_2_without_traceback(module, argv, tmp_path):
    _write_models(tmp_path)
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "usage:" in done.stderr and "Traceback" not in done.stderr, done.stderr


# ------------------------------------------------------------------------------------- dependencies' warnings


def _noisy_dependency(folder: Path):
    """A module outside gradreg that warns, as torch does with a FutureWarning."""
    (folder / "fakedep.py").write_text(
        "import warnings\n"
        "def work():\n    warnings.warn('fakedep: this will change', FutureWarning, stacklevel=1)\n"
    )
    sys.modules.pop("fakedep", None)
    import fakedep

    return fakedep


class _Result:
    def table(self) -> str:
        return "table"

    def to_dict(self) -> dict:
        return {}


def test_dependency_warnings_do_not_reach_the_bench_output(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    fakedep = _noisy_dependency(tmp_path)
    with warnings.catch_warnings(record=True) as seen:  # the control: outside the command it warns
        warnings.simplefilter("always")
        fakedep.work()
    assert [str(w.message) for w in seen] == ["fakedep: this will change"]

    def benchmark(*args, **kwargs):
        fakedep.work()
        return _Result()

    monkeypatch.setattr(bench_cli, "benchmark", benchmark)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bench_cli.main(["--no-progress"])
    assert not [w for w in seen if "fakedep" in str(w.message)]
    assert capsys.readouterr().out.strip() == "table"


def test_dependency_warnings_do_not_reach_the_experiments_output(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    fakedep = _noisy_dependency(tmp_path)

    def sweep(*args, **kwargs):
        fakedep.work()
        return []

    monkeypatch.setattr(experiments_cli, "sweep", sweep)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert experiments_cli.main(["run", *TINY, "--results", str(tmp_path / "r")]) == 0
    assert not [w for w in seen if "fakedep" in str(w.message)]
    assert "Warning" not in capsys.readouterr().err
