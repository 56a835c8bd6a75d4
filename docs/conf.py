"""Sphinx configuration of the curvkit documentation.

The build is offline: intersphinx reads the small local inventories in ``_static/`` (written by
``make_inventories.py``), never the network. ``scripts/test.sh`` builds the HTML with warnings as
errors and runs every ``testcode``/``doctest`` block of these pages with the ``doctest`` builder.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE))

import curvkit  # noqa: E402

project = "curvkit"
author = "the curvkit developers"
copyright = "2026, the curvkit developers"
release = curvkit.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "curvkit_docs",
]

exclude_patterns = ["_build", "examples/**/README.md", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path: list[str] = []
root_doc = "index"
default_role = "math"
nitpicky = True
pygments_style = "sphinx"

# -- autodoc / napoleon -------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = False
autodoc_default_options = {"show-inheritance": True}
autosummary_generate = False
add_module_names = False
python_use_unqualified_type_names = True
autodoc_typehints_format = "fully-qualified"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

# -- intersphinx: local inventories only (CI has no network except PyPI) -------------------------
intersphinx_mapping = {
    "torch": ("https://docs.pytorch.org/docs/stable/", str(HERE / "_static" / "torch-objects.inv")),
    "python": ("https://docs.python.org/3/", str(HERE / "_static" / "python-objects.inv")),
    "opt_einsum": ("https://dgasmith.github.io/opt_einsum/", str(HERE / "_static" / "opt_einsum-objects.inv")),
}
intersphinx_timeout = 1

# -- doctest: the examples in these pages run as tests -----------------------------------------
doctest_test_doctest_blocks = ""  # only explicit testcode/doctest directives run
doctest_global_setup = f"""
import pathlib
import torch
import curvkit
DOCS = pathlib.Path({str(HERE)!r})
torch.manual_seed(0)
"""

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"curvkit {release}"
html_theme_options = {
    "description": "Second-order optimizers for PyTorch, built from parts",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}

# -- curvkit_docs: API coverage ------------------------------------------------------------------
#: Packages whose every public name (``__all__`` of the package and its submodules) must be
#: documented; the build fails with a list of what is missing.
curvkit_api_packages = ["curvkit", "curvkit_kfac", "curvkit_shampoo", "curvkit_kbfgs"]
