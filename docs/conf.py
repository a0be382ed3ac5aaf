"""Sphinx configuration of the stellarlm API reference (``sphinx-build -W -b html docs docs/_build/html``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # a source checkout documents itself

project = "stellarlm"
author = "the stellarlm developers"
copyright = "2026, the stellarlm developers"
from stellarlm import __version__ as release  # noqa: E402

version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections say the types; signatures stay readable
autodoc_default_options = {"undoc-members": False, "show-inheritance": False}
# only the .rst pages are sources: docs/ also holds markdown notes and figures
exclude_patterns = ["_build", "tasks", "*.md"]
html_theme = "alabaster"
html_static_path = []
nitpicky = False
