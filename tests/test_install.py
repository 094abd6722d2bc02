"""Installs that work or say why: the chapters' bootstrap cell, run against a stand-in pip, and the sdist, whose
core unit tests run from the unpacked archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: A stand-in for ``python -m pip``: the sources in FAIL fail; any other "installs" a stub gradreg into SITE.
FAKE_PIP = '''
import os, pathlib, sys
source = sys.argv[-1]
if any(ref in source for ref in os.environ["FAIL"].split()):
    sys.stderr.write("error: pathspec did not match any file(s) known to git\\n")
    sys.exit(1)
package = pathlib.Path(os.environ["SITE"], "gradreg")
package.mkdir(parents=True)
(package / "__init__.py").write_text("SOURCE = %r\\n" % source)
'''


def bootstrap_source() -> str:
    notebook = json.loads((ROOT / "chapters" / "01_computing_gr.ipynb").read_text())
    return "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])


def run_bootstrap(tmp_path: Path, fail: str) -> subprocess.CompletedProcess:
    """The bootstrap cell in a Python without site-packages (no gradreg), ``pip`` the stand-in."""
    (tmp_path / "fake" / "pip").mkdir(parents=True)
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP)
    (tmp_path / "site").mkdir()
    cell = bootstrap_source() + "\nprint('imported', gradreg.SOURCE)\n"
    env = {"PATH": os.environ.get("PATH", ""), "FAIL": fail, "SITE": str(tmp_path / "site"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(tmp_path / "site")])}
    return subprocess.run([sys.executable, "-S", "-c", cell], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_bootstrap_installs_the_release_when_it_exists(tmp_path):
    done = run_bootstrap(tmp_path, fail="")
    assert done.returncode == 0, done.stderr
    import gradreg

    assert f"imported gradreg[book] @ git+https://github.com/gradreg/gradreg.git@v{gradreg.__version__}" in done.stdout


def test_bootstrap_falls_back_to_the_branch_and_says_so(tmp_path):
    done = run_bootstrap(tmp_path, fail="@v")
    assert done.returncode == 0, done.stderr
    assert "installed gradreg from the main branch" in done.stdout and "could not be installed" in done.stdout
    assert "imported gradreg[book] @ git+https://github.com/gradreg/gradreg.git@main" in done.stdout


def test_a_failed_bootstrap_ends_in_one_clear_message(tmp_path):
    done = run_bootstrap(tmp_path, fail="@v @main")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: could not install gradreg (tried release v"), done.stderr
    assert "pathspec did not match" in last and "github.com" in last and "pip install" in last
    assert "ModuleNotFoundError" not in done.stderr and "During handling" not in done.stderr


def test_the_sdist_runs_its_core_unit_tests_without_nbval(tmp_path):
    """The sdist carries tests/helpers.py and the pytest configuration; its unit tests run from the unpacked archive
    (a few of test_optim.py's, with nbval disabled: pyproject's --nbval options stay inert, see conftest.py)."""
    pytest.importorskip("build")
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (archive,) = tmp_path.glob("gradreg-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        assert {"tests/helpers.py", "conftest.py", "nbval_sanitize.cfg", "tests/test_optim.py"} <= names
        tar.extractall(tmp_path, filter="data")
    unpacked = archive.with_name(archive.name.removesuffix(".tar.gz"))
    env = {**os.environ, "PYTHONPATH": str(unpacked), "OMP_NUM_THREADS": "1", "PYTEST_ADDOPTS": "-p no:nbval"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_optim.py",
                           "-k", "state_dict"], cwd=unpacked, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert str(unpacked) in subprocess.run([sys.executable, "-c", "import gradreg; print(gradreg.__file__)"],
                                           cwd=unpacked, env=env, capture_output=True, text=True).stdout


def test_chapter_5_on_a_gpu_starts_a_short_preset_never_the_paper_sweep():
    """Colab's GPU runtime (full size) gets the preset ``cifar10-short``, under 1 % of the paper-scale sweep's
    work (epochs × training images × gradient passes); the 45-run sweep is only a command."""
    import gradreg.experiments as ex

    notebook = json.loads((ROOT / "chapters" / "05_generalization.ipynb").read_text())
    (line,) = [line for cell in notebook["cells"] if cell["cell_type"] == "code"
               for line in "".join(cell["source"]).splitlines() if line.startswith("NAME = S.size(")]
    full = eval(line.split("=", 1)[1].split("#")[0], {"S": type("Full", (), {"size": lambda fast, full: full})})
    passes = {"sgd": 1, "forward": 2, "backward": 2, "double": 3}

    def work(configs) -> int:
        return sum(c.epochs * (c.train_size or 50_000) * passes[c.method] for c in configs)

    assert full == "cifar10-short" and {c.dataset for c in ex.preset(full)} == {"cifar10"}
    assert work(ex.preset(full)) < 0.01 * work(ex.preset("cifar10"))
    assert {(c.method, c.gamma, c.eps) for c in ex.preset(full)} == {(c.method, c.gamma, c.eps)
                                                                     for c in ex.preset("cifar10")}


def test_import_gradreg_imports_no_trainer_framework():
    code = ("import sys, gradreg, gradreg.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
