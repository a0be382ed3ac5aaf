"""Doctests (collected by ``pytest``, see pyproject) run in a temporary directory, so the small files
the examples write do not land in the checkout; built data sets stay in the checkout's ``data/``
(``$STELLARLM_DATA`` if set), so ``load_embedded()`` builds only once."""

import importlib.util
import os
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

# the compiled parser's examples need numba (the ``survey`` extra); without it the module is a no-op
collect_ignore = [] if importlib.util.find_spec("numba") else ["stellarlm/data/fast_floats.py"]


@pytest.fixture(autouse=True)
def _doctest_in_tmp_dir(request, tmp_path, monkeypatch):
    if isinstance(request.node, DoctestItem):
        data = os.environ.get("STELLARLM_DATA") or Path(request.config.rootpath, "data")
        monkeypatch.setenv("STELLARLM_DATA", str(Path(data).resolve()))
        monkeypatch.chdir(tmp_path)
    yield
