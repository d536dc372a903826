"""A deterministic synthetic metrics dataset, and the ``demo`` job that trains on it.

Hourly series with a daily cycle, a weekly cycle, noise and a few injected
spikes, Hive-partitioned by ``app``: ``app=app-03/part-0.parquet`` with columns
``site``, ``ts``, ``value``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from ._io import Location
from .exceptions import StoreError

__all__ = ["make_table", "write_dataset", "demo_params", "DAYS"]

#: Days of data the demo writes by default: four weeks, so that ``seasonal`` can learn the weekly
#: cycle with four values in each hour of the week.
DAYS = 28
#: The file :func:`write_dataset` leaves beside the data, by which it knows a folder it may replace
#: ("_" and no "=": not data, by Spark's rule, to every reader).
MARKER = "_demo.json"
#: The data files :func:`write_dataset` writes (Arrow's names): the only files it removes.
_DEMO_FILE = re.compile(r"app=[^/]+/part-\d+\.parquet")

_START = np.datetime64("2026-01-05T00:00:00", "s")  # a Monday


def make_table(series: int = 10_000, *, days: int = DAYS, apps: int | None = None, seed: int = 0,
               start: np.datetime64 = _START, spikes: int = 2) -> pa.Table:
    """The demo data as one Arrow table: ``app``, ``site``, ``ts``, ``value``.

    >>> make_table(4, days=1).num_rows
    96
    """
    rng = np.random.default_rng(seed)
    apps = apps or max(1, min(20, series // 10 or 1))
    n = days * 24
    sid = np.repeat(np.arange(series), n)
    hour = np.tile(np.arange(n), series)
    level = rng.uniform(50, 500, series)
    amp = rng.uniform(0.1, 0.5, series) * level
    noise = rng.uniform(0.02, 0.08, series) * level
    phase = rng.uniform(0, 2 * np.pi, series)
    daily = np.sin(2 * np.pi * (hour % 24) / 24 + phase[sid])
    weekend = ((hour // 24) % 7 >= 5) * -0.2
    value = level[sid] + amp[sid] * daily + level[sid] * weekend + noise[sid] * rng.standard_normal(sid.size)
    if spikes and n > 48:
        for k in range(spikes):
            at = rng.integers(n // 2, n, series)
            value[np.arange(series) * n + at] += (8 + 4 * k) * noise * rng.choice([-1, 1], series)
    app_of = (np.arange(series) % apps).astype(np.int32)
    apps_names = pa.array([f"app-{i:02d}" for i in range(apps)])
    sites = pa.array([f"site-{i:05d}" for i in range(series)])
    return pa.table({
        "app": pa.DictionaryArray.from_arrays(pa.array(app_of[sid]), apps_names).cast(pa.string()),
        "site": pa.DictionaryArray.from_arrays(pa.array(sid.astype(np.int32)), sites).cast(pa.string()),
        "ts": pa.array(start + hour.astype("timedelta64[h]"), pa.timestamp("s", tz="UTC")),
        "value": pa.array(value),
    })


def write_dataset(path: str, series: int = 10_000, *, days: int = DAYS, apps: int | None = None,
                  seed: int = 0, storage_options: dict | None = None, **kwargs) -> str:
    """Write the demo dataset at ``path``, Hive-partitioned by ``app``; return the path.

    The folder then holds this dataset and nothing else: a demo dataset written there before (it
    leaves a ``_demo.json``, written first) is replaced, file by file.  A folder that holds anything
    else is refused, and nothing in it is removed: Arrow's writer replaced only the ``app=``
    folders it wrote, so a smaller demo written over a larger one was trained on the rows of both.

    >>> import tempfile, pyarrow.dataset as ds
    >>> path = write_dataset(tempfile.mkdtemp() + "/data", series=30, days=2, apps=3)
    >>> ds.dataset(path, partitioning="hive").count_rows()
    1440
    >>> _ = write_dataset(path, series=10, days=1, apps=2)
    >>> ds.dataset(path, partitioning="hive").count_rows()
    240
    """
    table = make_table(series, days=days, apps=apps, seed=seed, **kwargs)
    loc = Location.of(path, storage_options)
    fs = loc.fs
    held = loc.sizes()
    others = sorted(p for p in held if p != MARKER and not _DEMO_FILE.fullmatch(p))
    if held and (MARKER not in held or others):
        shown = others or sorted(held)
        listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
        why = ("Pick another folder, or remove them" if MARKER in held else
               "Pick another folder, or empty this one (if it is an earlier demo's data: a version before the "
               f"{MARKER} marker, or a write that stopped before it, remove the folder)")
        raise StoreError(f"{loc.url!r} holds files that are not the demo's ({listed}): the demo writes its data "
                         f"into a folder of its own, and removes only what it wrote there. {why}.")
    if held:  # an earlier demo's files, and only they
        fs.rm([loc.path(p) for p in held])
        if loc.is_local:  # its app= folders, empty now
            for folder in sorted({loc.path(p.split("/", 1)[0]) for p in held if "/" in p}):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
    fs.makedirs(loc.root, exist_ok=True)
    # first: a write that stops half-way leaves a folder the next demo knows for its own
    loc.write_bytes(MARKER, json.dumps({"series": series, "days": days, "seed": seed}).encode())
    part = ds.partitioning(pa.schema([("app", pa.string())]), flavor="hive")
    ds.write_dataset(table, loc.root, filesystem=fs, format="parquet", partitioning=part,
                     existing_data_behavior="delete_matching",
                     min_rows_per_group=128 * 1024, max_rows_per_group=1024 * 1024,
                     file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"))
    return path


def demo_params(model: str, days: int) -> dict:
    """Parameters the demo trains ``model`` with on ``days`` of its data.

    The data has a weekly cycle (weekends 20 % lower), and ``seasonal``'s default season is a
    day: with it, the weekends of the training data itself stood out, 3.7 % of all points
    flagged when the demo data was scored.  With four weeks or more, ``seasonal`` gets a weekly
    season (168 hours: four values a slot, enough for its spread); with fewer, its daily default.
    Other models keep their defaults.

    >>> demo_params("seasonal", 28), demo_params("seasonal", 14), demo_params("holt_winters", 28)
    ({'season_length': 168}, {}, {})
    """
    return {"season_length": 7 * 24} if model == "seasonal" and days >= 28 else {}
