"""Your own model class, trained once per group by ``modelfactory.train(model=MyModel)``.

A model subclasses :class:`modelfactory.models.Model` and declares:

- ``params``: its hyperparameters, as ``Param(default, type, low=..., high=...)``; ``train`` checks
  them before anything runs, and ``fit`` does on a model used by itself ("The 'k' parameter of
  TukeyFences must be a finite float >= 0.5. Got 0.1 instead.");
- ``state_attrs``: the fitted attributes (ending in ``_``), which the store saves;
- ``_fit(y, t, X)``: fit one series (values, int64 seconds or None, features or None);
- ``_score(y, t, X)``: return ``expected``, ``lower``, ``upper``, ``score`` (0..1) and ``is_anomaly``.

This one flags values outside Tukey's fences (``[Q1 - k IQR, Q3 + k IQR]``): no time column needed,
robust to the outliers it is meant to find.

    python examples/custom_model.py                    # 100 series, a local Dask cluster
    python examples/custom_model.py --series 5000 --k 3
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

import modelfactory
from modelfactory.models import Model, Param
from modelfactory.models.base import robust_score


class TukeyFences(Model):
    """Anomalous: below ``Q1 - k * IQR`` or above ``Q3 + k * IQR`` of the training values."""

    name = "tukey"
    min_rows = 20  # fewer values: the group is skipped, with this reason
    params: ClassVar = {"k": Param(3.0, float, low=0.5, doc="fence distance in IQRs (1.5 mild, 3 far out)")}
    state_attrs = ("q1_", "median_", "q3_")

    def _fit(self, y, t, X):
        self.q1_, self.median_, self.q3_ = (float(q) for q in np.nanpercentile(y, [25, 50, 75]))

    def _score(self, y, t, X):
        iqr = max(self.q3_ - self.q1_, 1e-9 * (1 + abs(self.median_)))
        n = len(y)
        lower, upper = self.q1_ - self.k * iqr, self.q3_ + self.k * iqr
        return {
            "expected": np.full(n, self.median_),
            "lower": np.full(n, lower),
            "upper": np.full(n, upper),
            "score": robust_score((y - self.median_) / (iqr / 1.349)),  # IQR / 1.349 = sigma for normal data
            "is_anomaly": (y < lower) | (y > upper),
        }


def make_data(series: int, days: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hourly demo metrics: ``days`` to train on, then one more day with some values five times too high."""
    df = modelfactory.demo.make_table(series, days=days + 1, seed=seed, spikes=0).to_pandas()
    cut = df.ts.min() + pd.Timedelta(days=days)
    history, new = df[df.ts < cut], df[df.ts >= cut].copy()
    rng = np.random.default_rng(seed)
    wild = rng.choice(new.index, size=max(1, series // 20), replace=False)
    new.loc[wild, "value"] *= 5
    return history, new


@contextlib.contextmanager
def dask_cluster(address: str | None, workers: int):
    """The ``cluster=`` to pass: the given address (or 'inline'), else one local_cluster() for both calls."""
    if address:
        yield address
        return
    from distributed import Client

    from modelfactory.run import local_cluster  # the one a job makes: 1 thread a worker, quiet logs

    with local_cluster(workers) as lc, Client(lc) as client:
        yield client


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=100, help="series (default %(default)s)")
    p.add_argument("--days", type=int, default=7, help="days of history (default %(default)s)")
    p.add_argument("--k", type=float, default=3.0, help="Tukey's k (default %(default)s)")
    p.add_argument("--cluster", help="'inline', a scheduler address, or leave out for a LocalCluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default %(default)s)")
    args = p.parse_args(argv)

    history, new = make_data(args.series, args.days)
    # 1. One series, in plain Python: the scikit-learn contract (fit returns the model).
    one = history[history.site == history.site.iloc[0]]
    model = TukeyFences(k=args.k).fit(one.value.to_numpy())
    print(f"{model} on {one.site.iloc[0]}: fences [{model.q1_ - args.k * (model.q3_ - model.q1_):.1f}, "
          f"{model.q3_ + args.k * (model.q3_ - model.q1_):.1f}]")

    with tempfile.TemporaryDirectory(prefix="mf-custom-") as tmp, dask_cluster(args.cluster, args.workers) as cluster:
        work = Path(tmp)
        history.to_parquet(work / "history", partition_cols=["app"])
        new.to_parquet(work / "new", partition_cols=["app"])
        # 2. One model per group, on the cluster: the class travels to the workers with the task.
        run = modelfactory.train(work / "history", by=["app", "site"], target="value", model=TukeyFences,
                                 params={"k": args.k}, store=work / "store", cluster=cluster)
        print(run)
        # 3. User models are stored pickled: scoring them runs their code, so say you trust the store.
        scores = modelfactory.score(work / "new", store=work / "store", out=work / "scores", trust=True,
                                    cluster=cluster)
        print(scores)
        g = scores.groups
        top = g[g.anomalies > 0].sort_values(["anomalies", "max_score"], ascending=False)
        print(f"{int(g.anomalies.sum())} anomalous points in {len(top)} series "
              f"({max(1, args.series // 20)} values were multiplied by 5); the top ones:")
        print(top.head(5)[["app", "site", "rows", "anomalies", "max_score"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
