"""Root conftest: applies to the tests and to the doctests in the package."""
from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_basetemp(tmp_path_factory):
    """What the tests, the doctests and the processes they start make with ``tempfile`` (the
    doctests' ``mkdtemp()``, the notebooks' work folders, Dask's scratch space) goes under pytest's
    base temporary folder, which pytest prunes to the last three runs, not into /tmp for good."""
    folder = str(tmp_path_factory.mktemp("tempfile"))
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", folder)
    patch.setattr(tempfile, "tempdir", folder)
    yield folder
    patch.undo()
