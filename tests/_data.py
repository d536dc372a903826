"""Small datasets for the tests, written with pyarrow into tmp folders."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds


def metrics_table(series: int = 12, hours: int = 72, apps: int = 3, seed: int = 0) -> pa.Table:
    """Hourly series: app, site, day (string), ts, value, x1 (a feature)."""
    rng = np.random.default_rng(seed)
    sid = np.repeat(np.arange(series), hours)
    h = np.tile(np.arange(hours), series)
    ts = np.datetime64("2026-03-02T00:00:00", "s") + h.astype("timedelta64[h]")
    value = 100 + 10 * np.sin(2 * np.pi * (h % 24) / 24) + sid + rng.normal(0, 1, sid.size)
    return pa.table({
        "app": pa.array([f"app{i % apps}" for i in sid]),
        "site": pa.array([f"s{i:03d}" for i in sid]),
        "day": pa.array(pd.to_datetime(ts).strftime("%Y-%m-%d").to_numpy().astype(str)),
        "ts": pa.array(ts, pa.timestamp("s", tz="UTC")),
        "value": pa.array(value),
        "x1": pa.array(rng.normal(size=sid.size)),
    })


def write(table: pa.Table, path, partition_by=(), **kw) -> str:
    part = (ds.partitioning(pa.schema([(k, pa.string()) for k in partition_by]), flavor="hive")
            if partition_by else None)
    ds.write_dataset(table, str(path), format="parquet", partitioning=part,
                     existing_data_behavior="overwrite_or_ignore", **kw)
    return str(path)


#: A user model's module (a file the tests write, then make unimportable where they need to).
MEAN_MODEL_SOURCE = """
from typing import ClassVar

import numpy as np

from modelfactory.models import Model


class Mean(Model):
    name = "mean"
    params: ClassVar = {}
    state_attrs = ("mean_",)

    def _fit(self, y, t, X):
        self.mean_ = float(np.nanmean(y))

    def _score(self, y, t, X):
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, self.mean_ - 1),
                "upper": np.full(n, self.mean_ + 1), "score": np.zeros(n), "is_anomaly": np.zeros(n, bool)}
"""
