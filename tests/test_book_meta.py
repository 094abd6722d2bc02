"""Static checks that keep the chapters, the table of contents and the book's configuration in agreement.

These run in a fraction of a second, without building the book. They check:

* the configuration basics (_config.yml): the repository URL, the launch buttons, execution, offline MathJax,
  the bibliography, and the folders kept out of the build;
* that the repository URL is written in exactly one place of the configuration, and that every other mention
  of it (bootstrap cells, pip and Colab URLs in the pages and the README) agrees with it;
* that _toc.yml and chapters/*.ipynb agree in both directions, and that the intro links every chapter;
* for every chapter: the bootstrap cell, the kernelspec, stored outputs (strict nbval silently skips cells
  that were never run), no stored errors, and the "## Summary" and "## Exercises" sections;
* that the API reference documents every public module of ``gradreg``.

With no chapter present, the per-chapter tests are reported as skipped (empty parameter set) and the rest
still run.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = ROOT / "_config.yml"
TOC_PATH = ROOT / "_toc.yml"
CHAPTER_FILES = sorted((ROOT / "chapters").glob("*.ipynb"))
PIP_URL = re.compile(r"git\+(https://github\.com/[\w.-]+/[\w.-]+?)(?:\.git)?@([\w./-]+)")
COLAB_URL = re.compile(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w.-]+)/")


def _config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


def _toc() -> dict:
    return yaml.safe_load(TOC_PATH.read_text())


def toc_files() -> list[str]:
    """Every file listed (uncommented) in _toc.yml, without suffix, in reading order."""
    toc = _toc()
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)

    walk(toc)
    return files


def _version() -> str:
    """gradreg.__version__, read from the source (these checks import nothing)."""
    return re.search(r'^__version__ = "([^"]+)"', (ROOT / "gradreg" / "__init__.py").read_text(), re.M).group(1)


def _repo() -> tuple[str, str]:
    repo = _config()["repository"]
    return repo["url"], repo["branch"]


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


# --------------------------------------------------------------------------------------------- configuration


def test_config_basics():
    cfg = _config()
    url, branch = _repo()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), (
        f"repository.url must be https://github.com/OWNER/REPO (no trailing slash or .git): {url!r}"
    )
    assert branch, "repository.branch is empty"
    assert cfg["repository"].get("path_to_book", "") == "", (
        "the book's root is the repository root, so path_to_book must be empty (else Colab links break)"
    )
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert cfg["html"]["use_repository_button"] is True
    assert cfg["only_build_toc_files"] is True

    execute = cfg["execute"]
    assert execute["execute_notebooks"] == "force", "CI must re-execute every chapter"
    assert execute["timeout"] >= 600, "the per-cell timeout must leave room for slow machines"
    assert execute.get("allow_errors", False) is False

    excluded = set(cfg["exclude_patterns"])
    for pattern in (".venv", "_build", "tests", "gradreg", "scripts", "README.md", ".github"):
        assert pattern in excluded, f"exclude_patterns must keep {pattern!r} out of the book"

    extensions = set(cfg["parse"]["myst_enable_extensions"])
    assert {"dollarmath", "amsmath", "colon_fence", "deflist"} <= extensions

    sphinx = cfg["sphinx"]["config"]
    assert sphinx["intersphinx_mapping"] == {}, "the build must stay offline"
    static_dirs = [ROOT / d for d in sphinx["html_static_path"]]
    assert any((d / sphinx["mathjax_path"]).is_file() for d in static_dirs), (
        f"mathjax_path {sphinx['mathjax_path']!r} is not a file under {sphinx['html_static_path']}"
    )
    assert not sphinx["mathjax_path"].startswith("http"), "MathJax must be served by the book (offline)"
    for bib in cfg["bibtex_bibfiles"]:
        assert (ROOT / bib).is_file(), f"missing bibliography file {bib}"


def test_repository_url_lives_in_one_place():
    url, branch = _repo()
    owner_repo = url.removeprefix("https://github.com/")
    # In the configuration: once, in _config.yml's repository.url.
    for path in (CONFIG_PATH, TOC_PATH):
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        expected = 1 if path == CONFIG_PATH else 0
        assert text.count(owner_repo) == expected, f"{path.name} must mention {owner_repo} exactly {expected} time(s)"
    # Everywhere else, every pip-from-git and Colab URL must agree with it.
    texts = {p: p.read_text() for p in [*sorted((ROOT / "book").glob("*.md")), ROOT / "README.md"] if p.exists()}
    texts.update({p: p.read_text() for p in CHAPTER_FILES})
    for path, text in texts.items():
        for found_url, found_ref in PIP_URL.findall(text):
            assert found_url == url and found_ref in (branch, f"v{_version()}"), (
                f"{path.relative_to(ROOT)}: installs from {found_url}@{found_ref}, but _config.yml says {url} "
                f"and the ref must be the branch {branch!r} or this release's tag v{_version()}"
            )
        for found_repo, found_branch in COLAB_URL.findall(text):
            assert (found_repo, found_branch) == (owner_repo, branch), (
                f"{path.relative_to(ROOT)}: Colab link to {found_repo}@{found_branch}, expected {owner_repo}@{branch}"
            )


# --------------------------------------------------------------------------------------------- table of contents


def test_every_toc_entry_exists():
    toc = _toc()
    assert toc["format"] == "jb-book"
    assert toc["root"] == "book/intro"
    for name in toc_files():
        candidates = [ROOT / f"{name}{suffix}" for suffix in (".md", ".ipynb")]
        assert any(c.is_file() for c in candidates), f"_toc.yml lists {name}, but neither {name}.md nor .ipynb exists"


def test_front_matter_pages_are_in_the_toc():
    files = toc_files()
    for page in ("book/intro", "book/notation", "book/api", "book/references"):
        assert page in files, f"{page} is missing from _toc.yml"


def test_every_chapter_is_in_the_toc_in_order():
    listed = [f for f in toc_files() if f.startswith("chapters/")]
    on_disk = [f"chapters/{p.stem}" for p in CHAPTER_FILES]
    missing = [c for c in on_disk if c not in listed]
    assert not missing, f"chapters not listed (uncommented) in _toc.yml: {missing}"
    assert listed == sorted(listed), f"_toc.yml must list the chapters in the order of their numbers: {listed}"
    for path in CHAPTER_FILES:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"chapter name {path.name} is not NN_name.ipynb"


def test_intro_links_every_chapter_in_the_toc():
    intro = (ROOT / "book" / "intro.md").read_text()
    for chapter in (f for f in toc_files() if f.startswith("chapters/")):
        assert f"](../{chapter}.ipynb)" in intro, (
            f"book/intro.md's map of the chapters must link {chapter}: turn its title into "
            f"[title](../{chapter}.ipynb)"
        )


# --------------------------------------------------------------------------------------------- chapters


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.name)
def test_chapter_kernelspec_is_python3(path):
    kernelspec = _notebook(path).get("metadata", {}).get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec {kernelspec!r}, Colab and nbval need python3"


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.name)
def test_chapter_bootstrap_cell(path):
    """The bootstrap installs the release the chapter was executed with (tag v<__version__>, which the README's
    release step creates), else the branch; it is the cell scripts/bootstrap_cell.py writes (tests/test_install.py
    runs it)."""
    url, branch = _repo()
    tag = f"v{_version()}"
    code_cells = [c for c in _notebook(path)["cells"] if c["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code cell"
    boot = code_cells[0]
    src = _source(boot)
    assert "pip" in src, f"{path.name}: the first code cell must be the bootstrap cell (pip install gradreg)"
    found = PIP_URL.findall(src)
    assert found == [(url, tag), (url, branch)], f"{path.name}: bootstrap installs {found}, expected the tag {tag}, " \
        f"then the branch {branch}"
    missing = {"nbval-skip", "remove-cell"} - _tags(boot)
    assert not missing, f"{path.name}: the bootstrap cell lacks the tags {sorted(missing)}"


def test_bootstrap_cells_and_colab_metadata_are_the_scripts():
    """Every chapter's bootstrap cell and Colab metadata are what scripts/bootstrap_cell.py writes (a GPU is
    requested only by the chapters whose code uses one)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bootstrap_cell.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.name)
def test_chapter_says_what_runs_at_which_size(path):
    markdown = "\n".join(_source(c) for c in _notebook(path)["cells"][:4] if c["cell_type"] == "markdown")
    assert "GRADREG_FULL" in markdown, f"{path.name}: the chapter's header must say what runs at which size " \
        "(fast on a CPU, full on a GPU or with GRADREG_FULL=1)"


def test_readme_commands_are_what_ci_runs():
    """README's first code block: line 1 builds the book (threads unset), line 2 is the test command .ci/run runs."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "jupyter-book build --all -W -n --keep-going ." in commands[0]
    assert "NUM_THREADS" not in commands[0], "the book is built as a reader builds it: thread counts unset"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci == [commands[1]], f".ci/run must run the README's test command verbatim: {commands[1]!r}"


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.name)
def test_chapter_outputs_are_stored(path):
    unrun, errors = [], []
    for index, cell in enumerate(_notebook(path)["cells"]):
        if cell["cell_type"] != "code" or "nbval-skip" in _tags(cell):
            continue
        if cell.get("execution_count") is None:
            unrun.append(index)
        errors += [index for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not unrun, (
        f"{path.name}: code cells {unrun} have no stored execution (strict nbval would skip them silently); "
        "run .venv/bin/python scripts/execute_notebooks.py on the chapter"
    )
    assert not errors, f"{path.name}: code cells {errors} have an error stored as output"


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.name)
def test_chapter_has_summary_and_exercises(path):
    markdown = "\n".join(_source(c) for c in _notebook(path)["cells"] if c["cell_type"] == "markdown")
    for heading in ("## Summary", "## Exercises"):
        assert re.search(rf"^{heading}\s*$", markdown, flags=re.MULTILINE), f"{path.name} lacks a '{heading}' section"


# --------------------------------------------------------------------------------------------- API reference


def test_api_reference_documents_every_public_module():
    api = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. automodule:: ([\w.]+)\s*$", api, flags=re.MULTILINE))
    package = ROOT / "gradreg"
    public = {
        f"gradreg.{p.stem}" for p in package.glob("*.py") if not p.name.startswith("_")
    } | {f"gradreg.{p.name}" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(public - documented)
    assert not missing, f"book/api.md does not document {missing}: uncomment (or add) their automodule sections"
    def exists(module: str) -> bool:
        path = ROOT / Path(*module.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    stale = sorted(m for m in documented - public if not exists(m))
    assert not stale, f"book/api.md documents modules that do not exist: {stale}"


def test_api_reference_documents_the_top_level_names():
    """Every name in ``gradreg.__all__`` (other than submodules) has an entry, so ``gradreg.GR`` etc. resolve."""
    tree = ast.parse((ROOT / "gradreg" / "__init__.py").read_text())
    exported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported = list(ast.literal_eval(node.value))
    package = ROOT / "gradreg"
    names = [
        n for n in exported
        if not n.startswith("__") and not (package / f"{n}.py").exists() and not (package / n).is_dir()
    ]
    api = (ROOT / "book" / "api.md").read_text()
    missing = [
        n for n in names
        if not re.search(rf"^\.\. (?:py:\w+|auto\w+):: (?:gradreg\.)?{re.escape(n)}\s*$", api, flags=re.MULTILINE)
    ]
    assert not missing, f"book/api.md's top-level section lacks {missing} (exported by gradreg/__init__.py)"
