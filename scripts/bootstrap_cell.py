"""Write every chapter's Colab bootstrap cell (its first code cell) and its Colab runtime metadata.

    python scripts/bootstrap_cell.py          # rewrite chapters/*.ipynb (idempotent, deterministic)
    python scripts/bootstrap_cell.py --check  # exit 1 and name the chapters that differ

The cell installs the release the chapter was executed with (tag ``v<gradreg.__version__>``, which the README's
release step creates), falls back to the branch of ``_config.yml`` with a printed line saying so, and ends a failed
install in one message (what failed, what to try). The notebook metadata asks Colab for a GPU only when the
chapter uses one (:data:`USES_GPU`).
Only the bootstrap cell and the notebook metadata are touched; run it after every merge that edits chapters.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
#: Code that puts work on the runtime's device: the chapter's tensors (S.device), CUDA itself, or the experiment
#: runner (gradreg.experiments trains on the GPU when there is one). Chapter 3 (NumPy) has none.
USES_GPU = re.compile(r"\bS\.device\b|\bcuda\b|\bex\.(sweep|run)\(")
TAGS = ["nbval-skip", "remove-cell"]

CELL = '''\
# Colab / a fresh kernel: install gradreg, the release this chapter was executed with (else the {branch} branch)
try:
    import gradreg
except ImportError:
    import importlib, subprocess, sys
    SOURCES = {{"release v{version}": "gradreg[book] @ git+{url}.git@v{version}",
               "the {branch} branch": "gradreg[book] @ git+{url}.git@{branch}"}}
    for what, source in SOURCES.items():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], capture_output=True, text=True)
        if pip.returncode == 0:
            print(f"installed gradreg from {{what}}: {{source}}" + (
                "" if what.startswith("release") else " (release v{version} could not be installed; "
                "this chapter was executed with it, so some outputs may differ)"))
            break
    else:
        lines = [line for line in pip.stderr.splitlines() if line.strip() and not line.startswith("[notice]")]
        error = (lines or ["(no output)"])[-1]
        raise RuntimeError(
            f"could not install gradreg (tried release v{version}, then the {branch} branch); pip's last line: "
            f"{{error}}. Check that this runtime reaches github.com, then run: "
            f"pip install \\"{{source}}\\"") from None
    importlib.invalidate_caches()
    import gradreg
'''


def version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / "gradreg" / "__init__.py").read_text(), re.M)
    assert match, "gradreg/__init__.py sets no __version__"
    return match.group(1)


def repository() -> tuple[str, str]:
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    return repo["url"].removesuffix(".git"), repo["branch"]


def source_lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


def uses_gpu(notebook: dict) -> bool:
    return any(USES_GPU.search("".join(c["source"])) for c in notebook["cells"][1:] if c["cell_type"] == "code")


def rewrite(notebook: dict, cell_text: str) -> dict:
    """``notebook`` with its first code cell replaced by the bootstrap cell and its Colab metadata set."""
    boot = next(c for c in notebook["cells"] if c["cell_type"] == "code")
    boot["source"] = source_lines(cell_text)
    boot["metadata"] = {**boot.get("metadata", {}), "tags": TAGS}
    boot["outputs"] = []
    metadata = notebook["metadata"]
    colab = {key: value for key, value in metadata.get("colab", {}).items() if key != "gpuType"}
    metadata.pop("accelerator", None)
    if uses_gpu(notebook):
        metadata["accelerator"] = "GPU"
        colab["gpuType"] = "T4"
    metadata["colab"] = {"provenance": [], **colab}
    return notebook


def render(path: Path) -> str:
    url, branch = repository()
    notebook = rewrite(json.loads(path.read_text()), CELL.format(version=version(), url=url, branch=branch))
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report the chapters that differ; change nothing")
    args = parser.parse_args(argv)
    stale = [path for path in CHAPTERS if render(path) != path.read_text()]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: bootstrap cell or metadata out of date (run scripts/bootstrap_cell.py)")
        return 1 if stale else 0
    for path in stale:
        path.write_text(render(path))
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
