"""``python -m gradreg.bench``: its output, and every user error as an argparse usage error (exit 2, one line).

The usage errors are checked in-process (``main(argv)`` raises ``SystemExit(2)`` before anything runs); one
subprocess per kind of run checks the real command, its exit status and that no traceback is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradreg.bench.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path | None = None, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(str(p) for p in (extra_path, ROOT) if p is not None)
    return subprocess.run([sys.executable, "-m", "gradreg.bench", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": path})


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = _run(["--model", "mlp", "--depth", "2", "--batch-size", "8", "--repeats", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. runpy's "found in sys.modules" for a module run with -m
    assert "F-GR" in proc.stdout and "DB-GR" in proc.stdout and "two passes" in proc.stdout
    assert proc.stdout.splitlines()[0].startswith("gradreg.bench: MLP depth 2, width 512, batch 8")
    data = json.loads(out.read_text())
    assert data["config"]["depth"] == 2 and data["config"]["batch_size"] == 8
    assert data["methods"]["double"]["flop_units"] == 13


def test_cli_measures_a_model_of_your_own(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))\n"
    )
    proc = _run(["--model", "my_models:tiny", "--input-shape", "3,2,2", "--num-classes", "5", "--batch-size", "4",
                 "--repeats", "1", "--warmup", "0", "--no-memory", "--methods", "sgd,forward,double"],
                cwd=tmp_path, extra_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "my_models:tiny, batch 4" in proc.stdout and "DB-GR" in proc.stdout


def test_cli_breakdown(tmp_path):
    out = tmp_path / "b.json"
    proc = _run(["--breakdown", "--depth", "2", "--width", "32", "--batch-size", "4", "--repeats", "2",
                 "--warmup", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gradreg.bench --breakdown: MLP depth 2, width 32, batch 4")
    for row in ("pass1", "pass2", "profiled step", "unprofiled step", "profiled / unprofiled"):
        assert row in proc.stdout, row
    data = json.loads(out.read_text())
    assert set(data["breakdown"]) == {"two-passes", "forward"}
    assert len(data["breakdown"]["forward"]["splits_s"]) == 2


def test_a_usage_error_is_one_line_without_traceback(tmp_path):
    proc = _run(["--methods", "sgd,adam"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m gradreg.bench: error: argument --methods: unknown method 'adam': choose from "
        "sgd,two-passes,forward,backward,central,double,usam,sam,plain-sam,func-db")


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "sgd,adam"], "argument --methods: unknown method 'adam': choose from sgd,two-passes,"),
    (["--methods", ","], "argument --methods: no method given: choose one or more of sgd,"),
    (["--methods", ""], "argument --methods: no method given"),
    (["--methods", "sgd,sgd"], "argument --methods: a method is listed twice"),
    (["--model", "vgg"], "argument --model: model must be one of 'mlp', 'resnet18', 'transformer' or"),
    (["--model", "pkg:"], "argument --model: model must be one of"),
    (["--model", "no_such_module_xyz:build", "--input-shape", "3"], "--model no_such_module_xyz:build: cannot import"),
    (["--model", "gradreg.models:mlp"], "a model of your own needs --input-shape"),
    (["--input-shape", "3,32,32"], "--input-shape and --num-classes apply to a model of your own"),
    (["--model", "gradreg.models:mlp", "--input-shape", "3,x"], "argument --input-shape: must be positive integers"),
    (["--model", "gradreg.models:mlp", "--input-shape", "3,0"], "argument --input-shape: must be positive integers"),
    (["--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (["--repeats", "ten"], "argument --repeats: must be an integer >= 1, got 'ten'"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--depth", "0"], "argument --depth: must be an integer >= 1"),
    (["--width", "-5"], "argument --width: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--seq-len", "0"], "argument --seq-len: must be an integer >= 1"),
    (["--num-classes", "0"], "argument --num-classes: must be an integer >= 1"),
    (["--attention", "flash"], "argument --attention: invalid choice: 'flash'"),
    (["--device", "gpu0"], "argument --device: not a torch device: 'gpu0'"),
])
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_cuda_requested_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as info:
        main(["--device", "cuda"])
    assert info.value.code == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing folder", "a folder"])
def test_an_unwritable_json_path_fails_before_the_run(kind, tmp_path, capsys, monkeypatch):
    """Checked before anything is measured: the benchmark must not run for minutes and then fail."""
    import gradreg.bench.__main__ as cli

    ran = []
    monkeypatch.setattr(cli, "benchmark", lambda *a, **k: ran.append(1))
    path = tmp_path / "no" / "such" / "out.json" if kind == "missing folder" else tmp_path
    with pytest.raises(SystemExit) as info:
        main(["--json", str(path)])
    assert info.value.code == 2 and not ran
    err = capsys.readouterr().err
    assert f"--json {path}:" in err, err


def test_a_writable_json_path_is_left_as_it_was(tmp_path, monkeypatch):
    """The check before the run creates no file (and does not truncate an existing one)."""
    import gradreg.bench.__main__ as cli

    class Stop(Exception):
        pass

    def benchmark(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(cli, "benchmark", benchmark)
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("keep")
    for path in (new, old):
        with pytest.raises(Stop):
            main(["--json", str(path)])
    assert not new.exists() and old.read_text() == "keep"


@pytest.mark.parametrize("flag", ["--gamma", "--eps", "--rho"])
@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "x"])
def test_gamma_eps_rho_must_be_positive_numbers(flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        main([flag, value])
    assert info.value.code == 2 and f"argument {flag}: must be a finite number > 0" in capsys.readouterr().err


def test_gamma_eps_rho_reach_the_steps():
    """F-GR at γ = ε (c = 1), as users run it: the flags reach every row's configuration."""
    result = main(["--depth", "2", "--width", "8", "--batch-size", "4", "--methods", "forward,sam",
                         "--repeats", "1", "--warmup", "0", "--no-memory", "--no-flops", "--no-progress",
                         "--gamma", "0.1", "--eps", "0.1", "--rho", "0.2"])
    assert (result.config["gamma"], result.config["eps"], result.config["rho"]) == (0.1, 0.1, 0.2)
