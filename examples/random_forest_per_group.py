"""A random forest per group: Spark's ``applyInPandas`` example, rewritten for modelfactory.

The Spark job this replaces fits one scikit-learn model per (store, item) in a pandas UDF::

    def train_model(pdf: pd.DataFrame) -> pd.DataFrame:
        ...  # fit a RandomForestRegressor on this group's rows, return one row of metrics

    result = (spark.read.parquet("s3://bucket/sales")
              .groupBy("store", "item")
              .applyInPandas(train_model, schema=SCHEMA))

With modelfactory the pandas function is the same; ``groupBy`` becomes ``by=``, the schema is the
same DDL string, and no JVM is involved.  A group whose function raises is recorded as ``failed``
(with its error) and the other groups finish.

    python examples/random_forest_per_group.py                      # 60 groups, a local Dask cluster
    python examples/random_forest_per_group.py --groups 2000 --out forests/   # write results as Parquet
    python examples/random_forest_per_group.py --out forests/ --overwrite     # replace what is in forests/
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import modelfactory

FEATURES = ["price", "promo", "temperature", "weekday"]
SCHEMA = "store string, item string, rows bigint, mae double, r2 double, top_feature string"


def make_sales(groups: int, days: int, seed: int = 0) -> pd.DataFrame:
    """Daily units sold per (store, item), driven differently in every group by price, promo, weather."""
    rng = np.random.default_rng(seed)
    frames = []
    for g in range(groups):
        day = pd.date_range("2025-01-01", periods=days, freq="D", tz="UTC")
        price = rng.uniform(2, 10) * rng.uniform(0.8, 1.2, days)
        promo = rng.random(days) < 0.15
        temperature = 15 + 10 * np.sin(2 * np.pi * np.arange(days) / 365) + rng.normal(0, 3, days)
        weekday = day.day_of_week.to_numpy()
        b = rng.normal(0, 1, 4)  # this group's own sensitivities
        units = (50 - 3 * abs(b[0]) * price + 20 * abs(b[1]) * promo + b[2] * temperature
                 + 8 * b[3] * (weekday >= 5) + rng.normal(0, 3, days))
        frames.append(pd.DataFrame({"store": f"store-{g % 5:02d}", "item": f"item-{g:04d}", "day": day,
                                    "price": price, "promo": promo.astype(np.int8),
                                    "temperature": temperature, "weekday": weekday,
                                    "units": np.maximum(units, 0)}))
    return pd.concat(frames, ignore_index=True)


def train_model(pdf: pd.DataFrame) -> pd.DataFrame:
    """The pandas function, unchanged from the Spark job: one group's rows in, one row of metrics out."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.metrics import mean_absolute_error, r2_score

    pdf = pdf.sort_values("day")
    cut = int(len(pdf) * 0.8)  # train on the first 80 % of the days, test on the rest
    train, test = pdf.iloc[:cut], pdf.iloc[cut:]
    model = RandomForestRegressor(n_estimators=50, max_depth=6, random_state=0, n_jobs=1)
    model.fit(train[FEATURES], train["units"])
    pred = model.predict(test[FEATURES])
    return pd.DataFrame({
        "store": [pdf["store"].iloc[0]], "item": [pdf["item"].iloc[0]], "rows": [len(pdf)],
        "mae": [mean_absolute_error(test["units"], pred)], "r2": [r2_score(test["units"], pred)],
        "top_feature": [FEATURES[int(np.argmax(model.feature_importances_))]],
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=60, help="(store, item) groups (default: %(default)s)")
    p.add_argument("--days", type=int, default=200, help="days of sales per group (default: %(default)s)")
    p.add_argument("--cluster", help="'inline', a scheduler address, or leave out for a LocalCluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default: %(default)s)")
    p.add_argument("--out", help="write the per-group results as Parquet into this new or empty folder instead of "
                                          "returning them")
    p.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mf-forest-") as tmp:
        data = Path(tmp) / "sales"
        make_sales(args.groups, args.days).to_parquet(data, partition_cols=["store"])
        try:
            run = modelfactory.apply(data, by=["store", "item"], func=train_model, schema=SCHEMA, time="day",
                                     out=args.out, overwrite=args.overwrite, cluster=args.cluster,
                                     workers=args.workers)
        except modelfactory.ModelFactoryError as e:  # bad input, say a non-empty --out: one line, as the CLI
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(run)
        result = run.to_pandas()
    print(f"fitted {len(result)} random forests: median R2 {result.r2.median():.3f}, "
          f"median MAE {result.mae.median():.2f} units")
    print("the most important feature, by number of groups:",
          result.top_feature.value_counts().to_dict())
    print("worst fits:")
    print(result.sort_values("r2").head(5).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    failed = run.groups[run.groups.status != "ok"]
    if len(failed):
        print(f"{len(failed)} groups failed:")
        print(failed.to_string(index=False))
    if args.out:
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
