"""The package as a library: a light ``import gradreg``, training without the book's extras, and a wheel whose
metadata says what it is (licence, URLs, typed, torch and numpy as its only required dependencies).

The import tests run in fresh interpreters (subprocesses), since this process has long imported everything.
"""

from __future__ import annotations

import email.parser
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import gradreg

ROOT = Path(__file__).resolve().parents[1]
#: What ``pip install gradreg`` does not bring: the book extra (and tqdm, which torch.hub imports if present).
BOOK_ONLY = ("scipy", "matplotlib", "tqdm", "mnist1d", "requests")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter that imports this checkout; it prints one JSON object."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_gradreg_loads_neither_the_book_dependencies_nor_the_lazy_submodules():
    result = _run(
        "import json, sys\n"
        "import torch\n"
        "before = set(sys.modules)\n"
        "import gradreg\n"
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "print(json.dumps({'new': new, 'all': sorted({m.split('.')[0] for m in sys.modules}),\n"
        "                  'gradreg': sorted(m for m in sys.modules if m.startswith('gradreg.'))}))\n"
    )
    assert not set(result["new"]) & set(BOOK_ONLY), f"import gradreg imported {set(result['new']) & set(BOOK_ONLY)}"
    assert not {"scipy", "matplotlib", "mnist1d"} & set(result["all"])  # not even through torch
    loaded = {name.split(".")[1] for name in result["gradreg"]}
    assert {"engine", "optim", "methods"} <= loaded
    assert not loaded & set(gradreg._LAZY), f"import gradreg loaded {sorted(loaded & set(gradreg._LAZY))}"


def test_every_lazy_submodule_loads_on_first_access_and_is_listed():
    result = _run(
        "import importlib, json, sys\n"
        "import gradreg\n"
        "report = {}\n"
        "for name in gradreg._LAZY:\n"
        "    full = 'gradreg.' + name\n"
        "    was_loaded = full in sys.modules\n"
        "    by_attribute = getattr(gradreg, name) is sys.modules[full]\n"
        "    by_from = importlib.import_module(full) is getattr(gradreg, name)\n"
        "    report[name] = [was_loaded, by_attribute, by_from, name in dir(gradreg), name in gradreg.__all__]\n"
        "from gradreg import dln\n"
        "try:\n"
        "    gradreg.no_such_module\n"
        "    missing = 'no error'\n"
        "except AttributeError as exc:\n"
        "    missing = str(exc)\n"
        "print(json.dumps({'report': report, 'dln': dln is gradreg.dln, 'missing': missing}))\n"
    )
    assert set(result["report"]) == set(gradreg._LAZY) == {
        "bench", "data", "diagnostics", "dln", "experiments", "flooding", "hessian", "models", "plotting"}
    for name, (was_loaded, by_attribute, by_from, in_dir, in_all) in result["report"].items():
        assert by_attribute and by_from and in_dir and in_all, name
        if name == "dln":
            assert not was_loaded  # nothing before it needs it: it was loaded by this first access
    assert result["dln"]
    assert result["missing"] == "module 'gradreg' has no attribute 'no_such_module'"


def test_training_needs_torch_and_numpy_only():
    """With the book's packages made unimportable, import gradreg, take GR steps, and get a clear message
    from what does need an extra."""
    blocked = repr(BOOK_ONLY)
    result = _run(
        "import importlib.abc, importlib.machinery, json, sys\n"
        "class Missing(importlib.abc.Loader):  # found, but importing it fails as if it were not installed\n"
        "    def create_module(self, spec):\n"
        "        raise ModuleNotFoundError(f'No module named {spec.name!r} (blocked by the test)', name=spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked}:\n"
        "            return importlib.machinery.ModuleSpec(name, Missing())\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "import gradreg as gr\n"
        "gr.setup(seed=0, style=False)\n"
        "model = torch.nn.Linear(3, 1)\n"
        "x, y = torch.randn(8, 3), torch.randn(8, 1)\n"
        "opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.01, method='central')\n"
        "def closure():\n"
        "    return torch.nn.functional.mse_loss(model(x), y)\n"
        "losses = [float(opt.step(closure)) for _ in range(3)]\n"
        "import numpy as np\n"
        "u = np.full(4, 0.1)\n"
        "d = gr.dln.dln_direction(u, u, np.eye(2, 4), np.ones(2), 'forward', 0.1, 0.1)[0]\n"
        "try:\n"
        "    gr.dln.gradient_flow(np.eye(2, 4), np.ones(2), 0.1)\n"
        "    message = 'no error'\n"
        "except ImportError as exc:\n"
        "    message = str(exc)\n"
        "print(json.dumps({'losses': losses, 'd': d.tolist(), 'message': message,\n"
        f"                  'book': sorted(m for m in sys.modules if m.split('.')[0] in {blocked})}}))\n"
    )
    assert result["losses"][-1] < result["losses"][0]
    assert len(result["d"]) == 4 and result["book"] == []
    assert "pip install scipy" in result["message"], result["message"]  # installable: PyPI names, or the git URL
    assert f'"gradreg[book] @ git+https://github.com/gradreg/gradreg.git@v{gradreg.__version__}"' in result["message"]


# ------------------------------------------------------------------------------------------------ packaging


def _project_text() -> str:
    return (ROOT / "pyproject.toml").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel, built from a copy of the sources in a temporary folder (no build/ left in the checkout)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build SPDX licence metadata")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gradreg", src / "gradreg", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(out), str(src)], capture_output=True, text=True, timeout=180,
    )
    assert build.returncode == 0, build.stderr
    (path,) = out.glob("gradreg-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(wheel.read(name).decode())


def test_wheel_metadata_has_the_licence_the_urls_and_the_version(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == "gradreg" and meta["Version"] == gradreg.__version__
    assert meta["License-Expression"] == "MIT"
    licence = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and wheel.read(licence[0]).decode().startswith("MIT License")
    urls = dict(entry.split(", ", 1) for entry in meta.get_all("Project-URL"))
    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert urls["Repository"] == repository and urls["Issues"] == f"{repository}/issues"
    assert set(urls) == {"Homepage", "Documentation", "Repository", "Issues"}
    assert "Typing :: Typed" in meta.get_all("Classifier")


def test_wheel_ships_py_typed_and_every_module(wheel):
    names = set(wheel.namelist())
    assert "gradreg/py.typed" in names
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "gradreg").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert not [n for n in names if n.startswith(("tests/", "chapters/", "book/"))]


def test_wheel_requires_torch_and_numpy_and_keeps_the_rest_in_extras(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    core = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert core == {"torch", "numpy"}
    book = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in requires if 'extra == "book"' in r}
    assert {"scipy", "matplotlib", "tqdm", "mnist1d"} <= book


def test_requirements_pin_torch_and_cover_the_book_extra():
    """requirements.txt is the pinned CPU environment: torch pinned, the package itself editable, every
    package of the book extra present (pinned or bounded)."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert "torch==2.13.0" in lines and "-e ." in lines
    names = {re.split(r"[ <>=!~;\[]", ln, maxsplit=1)[0].lower() for ln in lines if not ln.startswith("-")}
    book = re.search(r"^book = \[(.*)\]$", _project_text(), flags=re.MULTILINE).group(1)
    extra = {re.split(r"[ <>=!~;\[]", item.strip(' "'), maxsplit=1)[0].lower() for item in book.split(",")}
    assert extra <= names, f"requirements.txt lacks {sorted(extra - names)} of the book extra"
