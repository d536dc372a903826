"""The demo job: what a new user sees first."""
import numpy as np
import pandas as pd
import pyarrow.dataset as ds

import modelfactory
from modelfactory import demo
from modelfactory.cli import build_parser, main


def test_the_demo_models_learn_the_weekly_cycle_of_the_demo_data(tmp_path, capsys):
    """The demo data has weekends 20 % lower, and the demo trained `seasonal` with its daily default:
    scoring the demo data against the demo's own store flagged its weekends (3.7 % of all points).
    With four weeks of data it now learns a weekly season: clean points are flagged near the
    threshold's nominal rate, and the spikes the demo injects are found."""
    assert build_parser().parse_args(["demo"]).days == demo.DAYS  # the CLI's default is the module's
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--series", "60", "--scheduler", "inline", "--quiet"]) == 0
    scores = modelfactory.score(str(out / "data"), store=str(out / "store"), out=str(tmp_path / "scores"),
                                cluster="inline", progress=False)
    assert set(scores.groups["status"]) == {"ok"}
    got = ds.dataset(str(tmp_path / "scores"), partitioning="hive").to_table().to_pandas()
    # where the spikes are: the same data without them differs only there
    clean = demo.make_table(60, spikes=0).to_pandas()
    key = ["site", "ts"]
    both = got.merge(clean[key + ["value"]].rename(columns={"value": "clean"}), on=key)
    assert len(both) == len(got) == len(clean)
    spike = ~np.isclose(both["value"], both["clean"])
    assert spike.sum() == 2 * 60
    weekend = pd.to_datetime(both["ts"]).dt.day_of_week >= 5
    assert both.loc[~spike, "is_anomaly"].mean() < 0.003  # 0.037 with the daily season
    assert both.loc[~spike & weekend, "is_anomaly"].mean() < 0.003
    assert both.loc[spike, "is_anomaly"].mean() > 0.8


def test_a_short_demo_keeps_the_daily_season():
    # two weeks: two values a slot of a weekly season are too few to learn its spread
    assert demo.demo_params("seasonal", 14) == {} and demo.demo_params("seasonal", 28) == {"season_length": 168}
    assert demo.demo_params("holt_winters", 28) == {}
