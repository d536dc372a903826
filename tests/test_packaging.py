"""The lower bounds pyproject.toml declares admit no release the code cannot run on.

A user with an older environment gets what ``pip install`` accepts: a bound that is too low is a
crash on their first run (``pyarrow>=17`` let pyarrow 17 to 21 in, whose
``DatasetFactory.inspect()`` takes no ``fragments``: every ``train`` and ``demo`` stopped with
``error: internal error: TypeError: inspect() got an unexpected keyword argument 'fragments'``).
The suite runs on the newest releases, so these bounds are checked here against the first release of
each API the code relies on (found by running the demo and tests/test_kernel.py, test_train.py,
test_apply.py, test_score.py and test_store.py with the bound installed).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# distribution -> (first release with every API we use, what needs it)
NEEDED = {
    "pyarrow": ((22,), "DatasetFactory.inspect(fragments=0) in modelfactory.dataset._listing and "
                       "Run.to_pandas: the folder keys without opening a file"),
}


def lower_bounds() -> dict[str, tuple[int, ...]]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([0-9][0-9.]*)", dep)
        if m:
            bounds[m.group(1).lower()] = tuple(int(p) for p in m.group(2).split(".") if p)
    return bounds


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_declared_lower_bound_admits_no_release_without_the_apis_used(name):
    needed, why = NEEDED[name]
    declared = lower_bounds().get(name)
    assert declared is not None, f"pyproject.toml declares no lower bound for {name}"
    assert declared >= needed, (f"pyproject.toml allows {name} {'.'.join(map(str, declared))}, but the "
                                f"code needs {'.'.join(map(str, needed))}: {why}")


def test_dask_is_required_with_the_dataframe_extra():
    # The shuffle imports dask.dataframe. With dask 2024.12 (admitted by the bound) and only the
    # distributed extra, dask-expr was missing: every shuffle-mode run printed "FutureWarning: Dask
    # dataframe query planning is disabled because dask-expr is not installed ... This will raise in a
    # future version" and ran on the legacy implementation.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dask = [d for d in deps if re.match(r"^dask\b(?!-)", d)]
    assert len(dask) == 1, deps
    m = re.match(r"^dask\[([^]]*)\]", dask[0])
    extras = {e.strip() for e in m.group(1).split(",")} if m else set()
    assert {"dataframe", "distributed"} <= extras, dask[0]
