"""Shared fixtures: a small build of the embedded data (first rows of the real source file)."""

import pytest


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory):
    from stellarlm.data.embedded import build_embedded

    return build_embedded(tmp_path_factory.mktemp("embedded"), max_stars=3000, progress=False)
