"""The API documentation (docs/, Sphinx autodoc + autosummary over the numpydoc docstrings) builds strictly.

The build runs with ``-n -W`` (nitpicky, warnings are errors) and the ``dummy`` builder, which reads every module,
parses every docstring and resolves every cross-reference like the HTML builder but writes nothing. So a
docstring that breaks reStructuredText, or a reference to an object of ``concepts``/``sae``/``cbm``/``evaluation``
that does not exist, fails this test. References to other libraries (torch, numpy, ...) cannot be checked
offline and are ignored by ``docs/conf.py``; the second test checks both sides of that scope on a small page.

HTML: ``.venv/bin/python -m sphinx -b html -n -W --keep-going docs docs/_build/html``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _sphinx(src: Path, out: Path) -> subprocess.CompletedProcess:
    paths = [str(src), str(ROOT), os.environ.get("PYTHONPATH", "")]  # src: modules written beside a mini project
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [sys.executable, "-m", "sphinx", "-b", "dummy", "-n", "-W", "--keep-going", "-q", "-E", str(src), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=str(src))


def _mini_project(tmp_path: Path, docstring: str) -> Path:
    """A one-page project with our conf.py documenting ``probe_module.probe`` (whose docstring is given)."""
    src = tmp_path / "mini"
    src.mkdir(parents=True)
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "probe_module.py").write_text(f'def probe():\n    """{docstring}\n    """\n')
    (src / "index.rst").write_text("Probe\n=====\n\n.. autofunction:: concepts.naming.top_names\n\n"
                                   ".. autofunction:: probe_module.probe\n")
    return src


def test_api_docs_build_without_warnings(tmp_path):
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "generated"))
    res = _sphinx(src, tmp_path / "out")
    assert res.returncode == 0, f"docs build failed:\n{res.stderr[-6000:]}"
    pages = {p.stem for p in (src / "generated").glob("*.rst")}
    for package in ("concepts", "sae", "cbm", "evaluation"):
        assert package in pages
    assert {"concepts.bank", "concepts.world.world", "sae.topk", "cbm.sparse", "evaluation.blindspots",
            "evaluation.erasure.leace", "evaluation.fidelity"} <= pages


def test_strictness_covers_our_references_only(tmp_path):
    good = _mini_project(tmp_path / "good", (
        "Probe.\n\n    See :func:`concepts.naming.top_names`, :func:`~concepts.naming.top_names`, :class:`torch.Tensor`"
        " and\n    :class:`pandas.DataFrame`; fitted attributes such as n_features_in_ and sizes such as |D|"
        " stay text."))
    res = _sphinx(good, tmp_path / "good_out")
    assert res.returncode == 0, res.stderr[-4000:]

    bad = _mini_project(tmp_path / "bad", "Probe.\n\n    See :func:`concepts.naming.no_such_function`.")
    res = _sphinx(bad, tmp_path / "bad_out")
    assert res.returncode != 0
    assert "concepts.naming.no_such_function" in res.stderr
