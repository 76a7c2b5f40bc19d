"""Sphinx configuration of the conceptkit API documentation (built from the numpydoc docstrings).

Build: ``.venv/bin/python -m sphinx -b html -n -W --keep-going docs docs/_build/html`` (``make docs``-style; the
test ``tests/docs/test_docs_build.py`` runs the same strict build with the fast ``dummy`` builder).

Strictness: ``nitpicky`` is on, so every cross-reference to *our* packages (``concepts``, ``sae``, ``cbm``,
``evaluation``) must resolve, and with ``-W`` a broken one fails the build. References to other libraries
(torch, numpy, pandas, sklearn, ...) cannot be checked offline (no intersphinx inventories), so they are
ignored by ``nitpick_ignore_regex`` below.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "concepts").is_dir():
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "conceptkit"
author = "conceptkit authors"
copyright = "conceptkit authors"  # noqa: A001
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# autodoc / autosummary
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_mock_imports: list[str] = []
add_module_names = False

# numpydoc-style docstrings, read by napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_preprocess_types = False
napoleon_use_ivar = True  # "Attributes" sections as fields: no second description of documented properties

# strict references to our own packages only
nitpicky = True
OWN = r"(concepts|sae|cbm|evaluation)\b"
nitpick_ignore_regex = [
    (r"py:.*", rf"(?!{OWN}|~{OWN}).*"),  # anything that is not one of our packages (torch, numpy, pandas, ...)
    (r"py:.*", r"(concepts|sae|cbm|evaluation)\.\S*\.(Tensor|ndarray|DataFrame|Series|Module|Path)"),
]

html_theme = "alabaster"
html_static_path: list[str] = []
html_title = "conceptkit API"
# "more than one target found" for a short name such as ``Generator`` that a package re-exports
# (``concepts.generators.Generator`` is ``concepts.generators.base.Generator``): both targets are the same object.
suppress_warnings = ["autosummary.import_cycle", "ref.python"]

OWN_PACKAGES = ("concepts", "sae", "cbm", "evaluation")

# numpydoc writes fitted attributes with a trailing underscore (``n_features_in_``) and sizes as ``|D|``; in
# reStructuredText those are a hyperlink reference and a substitution. Escape them outside inline literals and roles.
_LITERAL = re.compile(r"(``.+?``|:[\w:.-]+:`[^`]*`|`[^`]*`_{0,2})")
_TRAILING_UNDERSCORE = re.compile(r"(?<![\w`\\])([A-Za-z][A-Za-z0-9_]*?[A-Za-z0-9])_(?![\w`])")
_SUBSTITUTION = re.compile(r"(?<![\w\\])\|([^|\s][^|]*?)\|(?!\w)")


def _escape_line(line: str) -> str:
    parts = _LITERAL.split(line)
    for i in range(0, len(parts), 2):  # even parts are outside literals and roles
        parts[i] = _SUBSTITUTION.sub(r"\\|\1\\|", _TRAILING_UNDERSCORE.sub(r"\1\\_", parts[i]))
    return "".join(parts)


def _process_docstring(app, what, name, obj, options, lines):  # noqa: ANN001
    lines[:] = [_escape_line(line) for line in lines]


def _skip_member(app, what, name, obj, skip, options):  # noqa: ANN001
    """Skip methods that come from other libraries (sklearn's generated ``set_*_request``, torch's ``forward``
    docstrings of ``autograd.Function``) or that have no docstring of their own."""
    target = getattr(obj, "fget", None) or getattr(obj, "__func__", None) or obj
    if what in ("class", "exception") and callable(target):
        module = getattr(target, "__module__", None)
        if not (isinstance(module, str) and module.split(".")[0] in OWN_PACKAGES):
            return True
        if getattr(target, "__doc__", None) is None:
            return True
    return None


def _resolve_reexport(app, env, node, contnode):  # noqa: ANN001
    """Resolve ``pkg.NAME`` to the one documented ``pkg.<submodule>.NAME`` when ``pkg`` re-exports it.

    autodoc cannot document data a package imports from a submodule (``concepts.world.DEFAULT_RULES`` is
    documented as ``concepts.world.rules.DEFAULT_RULES``); a reference to the public path is still correct.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    if target.split(".")[0] not in OWN_PACKAGES or "." not in target:
        return None
    package, _, last = target.rpartition(".")
    objects = env.get_domain("py").objects
    found = [name for name in objects if name.startswith(package + ".") and name.endswith("." + last)]
    if len(found) != 1:
        return None
    from sphinx.util.nodes import make_refnode

    entry = objects[found[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, found[0])


def setup(app):  # noqa: ANN001
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("missing-reference", _resolve_reexport)
