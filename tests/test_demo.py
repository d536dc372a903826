"""The demo job: what a new user sees first."""
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

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


@pytest.mark.parametrize("model, days, need", [("seasonal", 1, 2), ("ets", 2, 3)])
def test_too_few_days_for_the_model_are_refused_before_the_dataset_is_written(tmp_path, capsys, model, days, need):
    # every series was skipped (too short) after the dataset was written: exit 2, "fitted no model"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--series", "3", "--days", str(days), "--model", model,
                 "--scheduler", "inline"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --days {days} gives each series {days * 24} hourly points, and {model} needs "
                          f"at least ") and err.endswith(f": pass --days {need} or more.\n") and not out.exists()
    assert main(["demo", "--out", str(out), "--series", "3", "--days", str(need), "--model", model,
                 "--scheduler", "inline", "--quiet"]) == 0


def test_a_demo_of_a_model_that_scores_only_after_its_training_leaves_it_a_day_to_score(tmp_path, capsys):
    # `demo --model holt_winters` trained on every row, and the guide's next step, score OUT/data,
    # then skipped every series: "none of its rows is after the end of training"
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--series", "4", "--days", "14", "--model", "holt_winters",
                 "--scheduler", "inline"]) == 0
    said = capsys.readouterr().out
    assert "writing 4 hourly series x 14 days, plus 1 day for score (not trained on: holt_winters scores only rows " \
           "after its training)," in said
    assert set(modelfactory.ModelStore(str(out / "store")).groups()["rows"]) == {14 * 24}
    scores = modelfactory.score(str(out / "data"), store=str(out / "store"), out=str(tmp_path / "scores"),
                                cluster="inline")
    assert scores.summary["counts"] == {"ok": 4, "failed": 0, "skipped": 0}


def test_a_demo_into_an_earlier_demo_replaces_its_data_and_refuses_other_files(tmp_path, capsys):
    """A 40-series demo written over a 300-series one trained 280 groups: Arrow's writer replaced
    only the app= folders it wrote, and the old series of the others were trained beside the new."""
    out, base = tmp_path / "d", ["--scheduler", "inline", "--quiet", "--json"]
    assert main(["demo", "--out", str(out), "--series", "300", "--days", "2", *base]) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--series", "40", "--days", "2", *base]) == 0
    assert '"groups": 40' in capsys.readouterr().out
    assert ds.dataset(str(out / "data"), partitioning="hive").count_rows() == 40 * 48
    # a folder of other files: refused, and they are left as they were
    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    (other / "metrics.csv").write_text("ts,value\n")
    assert main(["demo", "--out", str(other.parent), "--series", "4", "--days", "2", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds files that are not the demo's (metrics.csv)" in err
    assert [p.name for p in other.iterdir()] == ["metrics.csv"]
    # a file of the user's put beside an earlier demo's: refused, not removed with the demo's
    notes = out / "data" / "notes" / "important.txt"
    notes.parent.mkdir()
    notes.write_text("keep me")
    with pytest.raises(modelfactory.exceptions.StoreError, match=r"not the demo's \(notes/important.txt\)"):
        demo.write_dataset(str(out / "data"), series=4, days=2)
    assert notes.read_text() == "keep me" and ds.dataset(str(out / "data" / "app=app-00")).count_rows() > 0
    # a write that stopped half-way (the marker goes first): the next demo replaces it
    notes.unlink()
    notes.parent.rmdir()
    for f in (out / "data").glob("app=*/*.parquet"):
        f.unlink()
    assert [p.name for p in (out / "data").iterdir() if p.is_file()] == ["_demo.json"]
    demo.write_dataset(str(out / "data"), series=4, days=2)
    assert ds.dataset(str(out / "data"), partitioning="hive").count_rows() == 4 * 48


def test_a_demo_stopped_by_ctrl_c_says_to_run_the_demo_again(tmp_path, capsys, monkeypatch):
    """A Ctrl-C during the demo's training said "train --resume RUN": a command the user never ran,
    which demo has no flag for and which a train of one's own refuses (the demo's hidden filter)."""
    out = tmp_path / "d"
    monkeypatch.setattr(modelfactory.api, "run_units", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["demo", "--out", str(out), "--series", "4", "--days", "2", "--scheduler", "inline", "--quiet"]) == 130
    [line] = capsys.readouterr().err.splitlines()
    pending = modelfactory.ModelStore(str(out / "store")).pending()[0]["run_id"]
    assert line == (f"error: interrupted; the demo's run {pending} was not committed; run the demo again to start "
                    f"over (`models gc --store {out / 'store'} --pending` removes the unfinished run)")
    monkeypatch.undo()
    assert main(["models", "gc", "--store", str(out / "store"), "--pending"]) == 0
    assert modelfactory.ModelStore(str(out / "store")).pending() == []
