"""A local Sphinx extension for the book (loaded from _config.yml by ``sphinx.local_extensions``).

**Docstrings written with plain-text math.** ``gradreg``'s docstrings write absolute values the way a reader
does, ``T = |θ| + η``. In reStructuredText ``|θ|`` is a substitution reference, which fails the build
("Undefined substitution referenced"). :func:`_escape_absolute_values` escapes such bars outside inline
literals and roles before the docstring is parsed, so ``|θ|`` is shown as written.

**Constants.** A module-level constant without a doc comment would be shown with its type's docstring
(for a tuple: "Built-in immutable sequence..."); :func:`_drop_type_docstring` drops that.

**Two JavaScript errors** that the browser test (tests/test_book.py) found on every page of a stock
Jupyter Book 1.0.4 build with Sphinx 7.4 and pydata-sphinx-theme 0.15.4:

* ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. Inline scripts that an extension
  adds after the HTML builder started (sphinx-thebe, sphinx-togglebutton) are added again by Sphinx 7.4's
  ``prepare_writing``, once with filename ``None`` and once with ``""``, so its duplicate check misses them
  and each page declares the same ``const`` twice. :func:`_dedupe_scripts` keeps the first of each.
* ``Got invalid theme mode: . Resetting to auto.`` on a visitor's first page: the theme reads its light/dark
  mode from ``localStorage``, falling back to ``html_context["default_mode"]``, which Jupyter Book leaves
  empty. ``_config.yml`` sets it (``html_context: {default_mode: light}``).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

# |x| with no space just inside the bars, outside ``literals`` and `roles`: an absolute value, not a
# substitution (the book defines no substitutions in docstrings).
_ABSOLUTE_VALUE = re.compile(r"(?<![\\|\w])\|(?=[^\s|])([^|`\n]{1,40}?)(?<=[^\s|])\|(?![\w|])")
_LITERAL_OR_ROLE = re.compile(r"(``.+?``|`[^`]*`)")


def _drop_type_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """A constant without a doc comment (``METHODS = (...)``) would show its type's docstring (tuple's)."""
    if what in {"data", "attribute"} and obj is not None and isinstance(type(obj).__doc__, str):
        if "\n".join(lines).strip() == inspect.cleandoc(type(obj).__doc__).strip():
            lines.clear()


def _escape_absolute_values(app, what, name, obj, options, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        if "|" not in line or line.lstrip().startswith(("|", "+")):  # line blocks and tables stay as they are
            continue
        parts = _LITERAL_OR_ROLE.split(line)
        parts[::2] = [_ABSOLUTE_VALUE.sub(r"\\|\1\\|", part) for part in parts[::2]]
        lines[i] = "".join(parts)


def _script_key(script: Any) -> tuple:
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    priority = getattr(script, "priority", 500)
    return (filename, priority, tuple(sorted((k, str(v)) for k, v in attributes.items())))


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _script_key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # the builder's own list: it restores it from its backup after each page


def setup(app) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _drop_type_docstring)
    app.connect("autodoc-process-docstring", _escape_absolute_values)
    app.connect("html-page-context", _dedupe_scripts, priority=999)  # after every other handler
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
