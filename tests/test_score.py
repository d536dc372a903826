"""Train -> score -> anomalies on a real LocalCluster; models and data meet on the workers."""
from __future__ import annotations

import hashlib
import json
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from _data import metrics_table, write

import modelfactory
import modelfactory.models.base
import modelfactory.models.seasonal
from modelfactory.demo import make_table
from modelfactory.exceptions import IntegrityError, StoreError

CUT = pa.scalar(pd.Timestamp("2026-01-19T00:00:00", tz="UTC"), pa.timestamp("s", tz="UTC"))


@pytest.fixture
def history_and_new(tmp_path):
    """14 days to train on, 2 more days to score, with a spike injected into two series."""
    t = make_table(60, days=16, apps=4, spikes=0)
    old = t.filter(pc.less(t["ts"], CUT))
    new = t.filter(pc.greater_equal(t["ts"], CUT)).to_pandas()
    for site in ("site-00007", "site-00042"):
        i = new.index[new.site == site][5]
        new.loc[i, "value"] += 20 * new.loc[new.site == site, "value"].std()
    extra = new[new.site == "site-00001"].assign(site="site-99999")  # a group with no model
    new = pd.concat([new, extra], ignore_index=True)
    return (write(old, tmp_path / "old", ["app"]),
            write(pa.Table.from_pandas(new, preserve_index=False), tmp_path / "new", ["app"]))


def test_train_then_score_finds_the_spikes(history_and_new, tmp_path, client):
    old, new = history_and_new
    store, out = str(tmp_path / "store"), tmp_path / "scores"
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster=client,
                       params={"season_length": 24})
    run = modelfactory.score(new, store=store, out=str(out), cluster=client)
    assert run.summary["counts"] == {"ok": 60, "failed": 0, "skipped": 1}
    assert run.out == str(out) and run.store is None  # where its rows are, by name
    g = run.groups.set_index("site")
    assert g.loc["site-99999", "status"] == "skipped"
    assert g.loc["site-99999", "error"].startswith("no model for this group in run ")
    scores = pd.read_parquet(out)
    assert len(scores) == 60 * 48
    assert {"expected", "lower", "upper", "score", "is_anomaly", "app", "site", "ts", "value"} <= set(scores.columns)
    assert sorted(p.name for p in out.glob("app=*")) == [f"app=app-0{i}" for i in range(4)]
    flagged = scores[scores.is_anomaly]
    assert {"site-00007", "site-00042"} <= set(flagged.site)
    assert len(flagged) < 0.02 * len(scores)  # few false alarms on clean data
    top = json.loads((out / "_anomalies.json").read_text())
    assert {r["site"] for r in top[:2]} == {"site-00007", "site-00042"}
    assert ((scores.lower <= scores.expected) & (scores.expected <= scores.upper)).all()


@pytest.mark.parametrize("model", ["seasonal", "holt_winters"])
def test_a_group_whose_values_are_all_missing_is_skipped_not_healthy(tmp_path, model):
    """A metric that went silent (its rows there, every value NaN or null) was scored `ok` with 0
    anomalies, every row `score 0.0`: the same as a healthy series.  It is skipped with the
    reason, its rows still written with their expected values (the band of hours yet to come, a
    forecast's use, has no values either); one with some values missing is still scored."""
    t = make_table(3, days=16, apps=1, spikes=0)
    old = t.filter(pc.less(t["ts"], CUT))
    new = t.filter(pc.greater_equal(t["ts"], CUT)).to_pandas()
    new.loc[new.site == "site-00001", "value"] = np.nan
    new.loc[new.index[new.site == "site-00002"][::2], "value"] = np.nan
    new["value"] = new["value"].astype("float64")
    new.loc[new.index[new.site == "site-00001"][:3], "value"] = None  # nulls count as missing too
    store, out = str(tmp_path / "store"), tmp_path / "scores"
    modelfactory.train(write(old, tmp_path / "old", ["app"]), by=["app", "site"], time="ts", target="value",
                       store=store, model=model, cluster="inline", params={"season_length": 24})
    run = modelfactory.score(write(pa.Table.from_pandas(new, preserve_index=False), tmp_path / "new", ["app"]),
                             store=store, out=str(out), cluster="inline")
    g = run.groups.set_index("site")
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 1}, g
    assert g.loc["site-00001", "status"] == "skipped"
    assert g.loc["site-00001", "error"] == ("every one of its 48 'value' values is missing (NaN or null): nothing to "
                                            "score; its rows carry the expected values")
    assert g.loc["site-00001", "anomalies"] == 0 and pd.isna(g.loc["site-00001", "max_score"])
    # its rows are written still: the expected band of rows whose values are yet to come
    rows = pd.read_parquet(out)
    silent = rows[rows.site == "site-00001"]
    assert len(rows) == 3 * 48 and len(silent) == 48
    assert silent.expected.notna().all() and (silent.score == 0).all() and not silent.is_anomaly.any()


def test_rows_that_repeat_a_time_fail_their_group_in_scoring_as_in_training(tmp_path):
    # A key left out of by= (or a batch appended twice): training failed the group, scoring
    # scored every row and counted each anomaly twice, without a word
    t = make_table(3, days=16, apps=1, spikes=0)
    t = t.append_column("load", pc.multiply(t["value"], 2.0))
    old = t.filter(pc.less(t["ts"], CUT))
    new = t.filter(pc.greater_equal(t["ts"], CUT)).to_pandas()
    new = pd.concat([new, new[new.site == "site-00001"].iloc[:3]], ignore_index=True)
    store = str(tmp_path / "store")
    for model, params in (("seasonal", {"season_length": 24}), ("isolation_forest", {})):
        modelfactory.train(write(old, tmp_path / "old", ["app"]), by=["app", "site"], time="ts", target="value",
                           store=store, model=model, cluster="inline", params=params,
                           features=["load"] if model == "isolation_forest" else None)
        run = modelfactory.score(write(pa.Table.from_pandas(new, preserve_index=False), tmp_path / "new", ["app"]),
                                 store=store, out=str(tmp_path / model), cluster="inline")
        g = run.groups.set_index("site")
        if model == "seasonal":
            assert run.summary["counts"] == {"ok": 2, "failed": 1, "skipped": 0}, g
            assert g.loc["site-00001", "error"] == (
                "3 row(s) repeat a timestamp of this group, and 'seasonal' models one value per time: is a key "
                "missing from by=, or do the rows need aggregating first?")
        else:  # a model of rows, not of a series in time: each row is scored
            assert run.summary["counts"]["ok"] == 3, g


def test_scoring_reads_only_the_parts_it_needs(history_and_new, tmp_path):
    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline",
                       unit_rows=15 * 336)  # one app per unit, one part per app
    man = modelfactory.ModelStore(store).manifest()
    assert man["index"]["keys"] == ["app"] and len(man["parts"]) == 4
    assert man["index"]["parts"] == [[["app-00"]], [["app-01"]], [["app-02"]], [["app-03"]]]
    # Damage the part of app-03: scoring app-00 alone never reads it ...
    part = tmp_path / "store" / man["parts"][3]["path"]
    part.write_bytes(part.read_bytes()[:-10])
    run = modelfactory.score(new, store=store, out=str(tmp_path / "s0"), cluster="inline",
                             filter=pc.field("app") == "app-00")
    assert run.summary["counts"]["ok"] == 15
    # ... while scoring everything refuses the damaged part by name.
    with pytest.raises(IntegrityError, match=f"Part '{man['parts'][3]['path']}' .* does not match its checksum"):
        modelfactory.score(new, store=store, out=str(tmp_path / "s1"), cluster="inline")


def test_a_score_stopped_before_writing_anything_leaves_its_folder_as_it_was_for_the_rerun(history_and_new,
                                                                                        tmp_path):
    # its claim (_run_id) stayed alone in the folder, and the rerun that the error asked for was
    # refused as "unfinished output ... pass --overwrite"
    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    (part,) = modelfactory.ModelStore(store).manifest()["parts"]
    path = tmp_path / "store" / part["path"]
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    out = tmp_path / "scores"
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        modelfactory.score(new, store=store, out=str(out), cluster="inline")
    assert not [p for p in out.rglob("*")]
    path.write_bytes(good)  # repaired: the same command again
    assert modelfactory.score(new, store=store, out=str(out), cluster="inline").summary["counts"]["ok"] == 60


def test_score_refuses_a_non_empty_output(history_and_new, tmp_path):
    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(StoreError, match="is not empty"):
        modelfactory.score(new, store=store, out=str(tmp_path / "busy"), cluster="inline")


def test_a_model_whose_series_sent_no_row_is_reported_not_dropped(history_and_new, tmp_path, capsys, caplog):
    # A series that goes silent (a pod deleted, an exporter down) sends no row at all: its group
    # was in neither the input nor the output, and score said "ok" for the rest without a word of
    # the model it had and could not use.  A filter that leaves a model out by its keys is the
    # user's choice, not silence.
    from modelfactory.cli import main

    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    data = pd.read_parquet(new)
    app = data.loc[data.site == "site-00003", "app"].iloc[0]
    gone = str(tmp_path / "gone")
    write(pa.Table.from_pandas(data[data.site != "site-00003"].astype({"app": str}), preserve_index=False),
          tmp_path / "gone", ["app"])
    with caplog.at_level("WARNING", logger="modelfactory.api"):
        run = modelfactory.score(gone, store=store, out=str(tmp_path / "s1"), cluster="inline")
    assert run.summary["counts"] == {"ok": 59, "failed": 0, "skipped": 1}  # site-99999: no model
    silent = run.summary["models_without_rows"]
    assert silent["models"] == 1 and silent["examples"] == [f"app={app},site=site-00003"]
    assert [r.getMessage() for r in caplog.records if "had no row" in r.getMessage()] == [silent["warning"]]
    assert silent["warning"].startswith(f"1 of the 60 models of run {run.summary['model_run']} had no row")
    assert json.loads((tmp_path / "s1" / "_manifest.json").read_text())["summary"]["models_without_rows"]["models"] == 1
    # the CLI: one warning line of its own, and the job still succeeds
    assert main(["score", gone, "--store", store, "--out", str(tmp_path / "s2"), "--scheduler", "inline"]) == 0
    err = capsys.readouterr().err
    assert err.count("had no row") == 1 and f"warning: {silent['warning'].split(' of run ')[0]}" in err
    # left out by a filter on its keys (with a time window beside it): not counted
    others = (pc.field("app") != app) & (pc.field("ts") >= CUT)
    run = modelfactory.score(gone, store=store, out=str(tmp_path / "s3"), cluster="inline", filter=others)
    assert "models_without_rows" not in run.summary and run.summary["counts"]["ok"] == 45
    # a time window alone leaves every model in, as does a term that is False on a null whatever the
    # keys (it hid the silent model, as if the user had left it out)
    for i, window in enumerate([pc.field("ts") >= CUT, ~pc.field("value").is_null(),
                                (pc.field("app") == app) & pc.field("value").is_valid()]):
        run = modelfactory.score(gone, store=store, out=str(tmp_path / f"w{i}"), cluster="inline", filter=window)
        assert run.summary["models_without_rows"]["models"] == 1, window
    # a key condition OR'ed with another leaves out no model for certain: every one without rows is named
    run = modelfactory.score(gone, store=store, out=str(tmp_path / "or"), cluster="inline",
                             filter=(pc.field("app") == app) | (pc.field("value") > 1e9))
    assert run.summary["models_without_rows"]["models"] == 46


def test_scoring_an_empty_window_scores_nothing_and_succeeds(history_and_new, tmp_path):
    # Scheduled scoring: the window written since the last run may hold no rows (Spark writes an
    # empty part file). It was "has 1 Parquet file(s) but no rows", exit 2, paging whoever is on
    # call, while a --where that kept no rows scored 0 groups and succeeded.
    import pyarrow.parquet as pq

    from modelfactory.cli import main

    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    window = tmp_path / "window" / "app=app-00"
    window.mkdir(parents=True)
    # the file's own columns: pyarrow 22 adds app from the file's app=... folder unless told not to
    empty = pq.read_table(next((tmp_path / "new").glob("app=*/*.parquet")), partitioning=None).slice(0, 0)
    pq.write_table(empty, window / "part-0.parquet")
    run = modelfactory.score(str(tmp_path / "window"), store=store, out=str(tmp_path / "s1"), cluster="inline")
    assert run.summary["groups"] == 0 and run.summary["rows"] == 0 and len(run.groups) == 0
    manifest = json.loads((tmp_path / "s1" / "_manifest.json").read_text())
    assert manifest["summary"]["groups"] == 0
    assert manifest["schema"] is None  # a score run has no output schema: JSON null, not the text "None"
    assert main(["score", str(tmp_path / "window"), "--store", store, "--out", str(tmp_path / "s2"),
                 "--scheduler", "inline", "--quiet"]) == 0
    # pandas writes an empty frame's text columns as type null: "The key column 'site' is null in the
    # data but string in run ...", exit 2, for the same empty window
    pq.write_table(pa.Table.from_pandas(empty.to_pandas().astype({"site": object}).iloc[0:0],
                                        preserve_index=False), window / "part-0.parquet")
    assert pq.read_schema(window / "part-0.parquet").field("site").type == pa.null()
    run = modelfactory.score(str(tmp_path / "window"), store=store, out=str(tmp_path / "s3"), cluster="inline")
    assert run.summary["groups"] == 0 and run.summary["rows"] == 0


def test_a_where_on_a_partition_key_that_keeps_no_folder_is_an_empty_window_too(history_and_new, tmp_path):
    # The guide: "A window with no rows (its files hold none, or --where keeps none) scores nothing
    # and succeeds". A --where on a time column did; one on a partition folder key (a scheduled job's
    # `--where "day = '2026-03-04'"` before that day's folder is written) was "error: No files under
    # ... match filter", exit 2. Training on nothing is still refused.
    from modelfactory.cli import main
    from modelfactory.exceptions import DatasetError

    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    run = modelfactory.score(new, store=store, out=str(tmp_path / "s1"), cluster="inline",
                             filter=pc.field("app") == "app-09")
    assert run.summary["groups"] == 0 and run.summary["rows"] == 0 and len(run.groups) == 0
    assert not list((tmp_path / "s1").glob("app=*"))
    assert main(["score", new, "--store", store, "--out", str(tmp_path / "s2"), "--scheduler", "inline",
                 "--quiet", "--where", "app in (app-08, app-09)"]) == 0
    assert json.loads((tmp_path / "s2" / "_manifest.json").read_text())["summary"]["groups"] == 0
    with pytest.raises(DatasetError, match="match filter"):
        modelfactory.train(new, by=["app", "site"], time="ts", target="value", store=store, cluster="inline",
                           filter=pc.field("app") == "app-09")


def test_times_without_a_zone_are_not_scored_with_models_trained_on_times_with_one(tmp_path):
    # A new writer stores the window's times as naive local wall-clock times: they were read as UTC,
    # every point fell in another season slot, and 20 series scored 479 anomalies instead of 13, all
    # "ok" (discover refuses naive and zoned files mixed in one dataset, for the same reason).
    import pyarrow.parquet as pq

    from modelfactory.exceptions import SchemaError

    df = make_table(20, days=12, apps=2).to_pandas()
    train, new = df[df.ts < "2026-01-15"], df[df.ts >= "2026-01-15"]
    paths = {}
    for name, frame in [("train", train), ("utc", new), ("berlin", new.assign(ts=new.ts.dt.tz_convert("Europe/Berlin"))),
                        ("naive_local", new.assign(ts=new.ts.dt.tz_convert("America/New_York").dt.tz_localize(None)))]:
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / name / "x.parquet")
        paths[name] = str(tmp_path / name)
    store = str(tmp_path / "store")
    modelfactory.train(paths["train"], by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    runs = {w: modelfactory.score(paths[w], store=store, out=str(tmp_path / f"o-{w}"), cluster="inline")
            for w in ("utc", "berlin")}
    assert runs["utc"].summary["anomalies"] == runs["berlin"].summary["anomalies"]  # a zone is a zone
    with pytest.raises(SchemaError, match=r"The time column 'ts' of .*naive_local' has no time zone \(timestamp\[.*\]\), "
                                          r"but run .* was trained on times with one \(timestamp\[.*, tz=UTC\]\).*"
                                          r"tz_localize\('UTC'\)"):
        modelfactory.score(paths["naive_local"], store=store, out=str(tmp_path / "o-naive"), cluster="inline")
    assert not (tmp_path / "o-naive").exists()
    # plot scores a group of given data with the store's model: the same refusal
    from modelfactory.plot import load_series

    key = {"app": "app-00", "site": "site-00000"}
    assert len(load_series(store, key, data=paths["berlin"]).frame) == 48
    with pytest.raises(SchemaError, match=r"naive_local' has no time zone"):
        load_series(store, key, data=paths["naive_local"])
    # the reverse: trained on times without a zone, scored on times with one
    naive_store = str(tmp_path / "naive-store")
    modelfactory.train(paths["naive_local"], by=["app", "site"], time="ts", target="value", store=naive_store,
                       cluster="inline")
    with pytest.raises(SchemaError, match=r"has time zone UTC .* trained on times without one"):
        modelfactory.score(paths["utc"], store=naive_store, out=str(tmp_path / "o-rev"), cluster="inline")


def test_a_retrain_on_times_of_the_other_kind_is_refused(tmp_path):
    # retrain carried the base run's models (fitted on times with a zone) into a run recorded as
    # trained on naive times: scoring naive local times, refused with the base run, was then
    # accepted by the new run's models, "ok", every point in another season slot
    import pyarrow.parquet as pq

    from modelfactory.exceptions import SchemaError

    df = make_table(4, days=6, apps=1).to_pandas()
    for name, frame in [("zoned", df), ("naive", df.assign(ts=df.ts.dt.tz_convert("America/New_York")
                                                                 .dt.tz_localize(None)))]:
        (tmp_path / name).mkdir()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / name / "x.parquet")
    args = dict(by=["app", "site"], time="ts", target="value", store=str(tmp_path / "store"), cluster="inline")
    base = modelfactory.train(str(tmp_path / "zoned"), **args)
    for retrain in ("failed", "changed"):
        with pytest.raises(SchemaError, match=r"'ts' of .*naive' has no time zone .* but run .* was trained on "
                                              r"times with one"):
            modelfactory.train(str(tmp_path / "naive"), base=base.id, retrain=retrain, **args)
    assert modelfactory.ModelStore(args["store"]).runs() == [base.id]


@pytest.mark.timeout(120)
def test_an_out_folder_that_cannot_be_written_at_the_commit_is_one_error_line(tmp_path):
    # The disk of out= fills up as the score commits (here a file size limit: the parts fit, the
    # _manifest.json listing 400 of them does not): it was "error: internal error: OSError: [Errno
    # 27] File too large", status 1, naming no file; it is a StoreError naming the file, status 2.
    import subprocess
    import sys

    from _data import metrics_table

    from modelfactory.cli import main

    data = write(metrics_table(series=200, hours=48, apps=200), tmp_path / "d", ["app", "site"])
    store, out = str(tmp_path / "store"), str(tmp_path / "scores")
    assert main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "-q"]) == 0
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (30000, 30000))\n"
              "from modelfactory.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "score", data, "--store", store, "--out", out,
                           "--scheduler", "inline", "--unit-rows", "48", "-q"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: Cannot write '_manifest.json' in the output folder '{out}' (OSError: ")
    assert "was not committed (no _manifest.json)" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "scores" / "_manifest.json").exists()


class OneByOne(modelfactory.models.seasonal.SeasonalProfile):
    """seasonal without its vectorised score_batch: scored one group at a time."""

    score_batch = classmethod(modelfactory.models.base.Model.score_batch.__func__)


def test_batch_scoring_equals_scoring_group_by_group(history_and_new, tmp_path):
    old, new = history_and_new
    out = {}
    for name, model in (("batch", "seasonal"), ("loop", OneByOne)):
        store = str(tmp_path / f"store-{name}")
        modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, model=model,
                           cluster="inline")
        modelfactory.score(new, store=store, out=str(tmp_path / name), cluster="inline", trust=True)
        out[name] = pd.read_parquet(tmp_path / name).sort_values(["app", "site", "ts"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(out["batch"], out["loop"])


def test_an_output_folder_that_overlaps_the_store_or_the_data_is_refused_and_nothing_is_deleted(
        history_and_new, tmp_path):
    old, new = history_and_new
    store = str(tmp_path / "store")
    run = modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    refused = {store: "is the model store", new: "is the input data", str(tmp_path): "holds the input data",
               f"{new}/app=app0": "is inside the input data", f"{store}/scores": "is inside the model store"}
    for out, how in refused.items():
        with pytest.raises(modelfactory.ModelFactoryError, match=f"output folder '{out}' {how}"):
            modelfactory.score(new, store=store, out=out, overwrite=True, cluster="inline")
    with pytest.raises(modelfactory.ModelFactoryError, match=f"output folder '{new}' is the input data"):
        modelfactory.apply(new, by=["app", "site"], func=len, schema="n bigint", out=new, overwrite=True,
                           cluster="inline")
    with pytest.raises(modelfactory.ModelFactoryError, match="model store '.*/new/store' is inside the input data"):
        modelfactory.train(new, by=["app", "site"], time="ts", target="value", store=f"{new}/store",
                           cluster="inline")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert modelfactory.ModelStore(store).latest() == run.id


def _two_shards(shard_type: str = "int64") -> pd.DataFrame:
    t = make_table(2, days=3, apps=1, spikes=0).to_pandas()
    t["shard"] = (t["site"].str[-1].astype("int64") + 1).astype(shard_type)  # 1, 2
    t["day"] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(t["shard"].astype("int64"), unit="D")
    return t


def _trained_on_flat(tmp_path, key: str) -> tuple[pd.DataFrame, str]:
    """The two shards written as one flat file, and a store trained on it by ``key``."""
    t = _two_shards()
    t.to_parquet(tmp_path / "flat.parquet")
    store = str(tmp_path / "store")
    modelfactory.train(str(tmp_path / "flat.parquet"), by=[key], time="ts", target="value", store=store,
                       cluster="inline")
    return t, store


def test_score_matches_key_columns_whose_type_differs_from_training(tmp_path):
    t = _two_shards()
    t.to_parquet(tmp_path / "flat.parquet")  # shard: int64
    t.to_parquet(tmp_path / "hive", partition_cols=["shard"])  # shard: a Hive folder, read as a string
    for train_on in ("flat.parquet", "hive"):
        store = str(tmp_path / f"store-{train_on}")
        modelfactory.train(str(tmp_path / train_on), by=["shard"], time="ts", target="value", store=store,
                           cluster="inline")
        for score_on in ("flat.parquet", "hive"):
            out = str(tmp_path / f"scores-{train_on}-{score_on}")
            s = modelfactory.score(str(tmp_path / score_on), store=store, out=out, cluster="inline")
            assert s.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}, (train_on, score_on)
    store = str(tmp_path / "store-day")
    modelfactory.train(str(tmp_path / "flat.parquet"), by=["day"], time="ts", target="value", store=store,
                       cluster="inline")  # day: timestamp[us, tz=UTC]
    for name, conv in [("ns", lambda s: s.astype("datetime64[ns, UTC]")),
                       ("ms-paris", lambda s: s.dt.tz_convert("Europe/Paris").astype("datetime64[ms, Europe/Paris]"))]:
        t.assign(day=conv(t["day"])).to_parquet(tmp_path / f"{name}.parquet")
        s = modelfactory.score(str(tmp_path / f"{name}.parquet"), store=store, out=str(tmp_path / f"o-{name}"),
                               cluster="inline")
        assert s.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}, name


def test_score_refuses_a_key_column_whose_type_cannot_be_matched(tmp_path):
    from modelfactory.exceptions import SchemaError

    t, store = _trained_on_flat(tmp_path, "day")
    t.assign(day=t["day"].dt.strftime("%Y-%m-%d")).to_parquet(tmp_path / "text.parquet")
    with pytest.raises(SchemaError, match=r"The key column 'day' is (large_)?string in the data but "
                                          r"timestamp\[[nu]s, tz=UTC\] in run .* of the store.*Cast 'day' to"):
        modelfactory.score(str(tmp_path / "text.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    assert not (tmp_path / "o").exists()


def test_time_keys_with_and_without_a_zone_are_not_matched(tmp_path):
    # Local wall-clock slots trained without a zone, scored with their zone: read as UTC, every
    # slot would meet the model of the slot an hour away, and be scored "ok" with it.
    from modelfactory.exceptions import SchemaError

    t = make_table(1, days=3, apps=1, spikes=0).to_pandas()
    slots = pd.date_range("2026-01-05 00:00", periods=4, freq="h", unit="us")
    t = pd.concat([t.assign(slot=s, value=t["value"] + 10 * i) for i, s in enumerate(slots)], ignore_index=True)
    t.to_parquet(tmp_path / "naive.parquet")
    store = str(tmp_path / "store")
    modelfactory.train(str(tmp_path / "naive.parquet"), by=["slot"], time="ts", target="value", store=store,
                       cluster="inline")
    t.assign(slot=t["slot"].dt.tz_localize("Europe/Berlin")).to_parquet(tmp_path / "zoned.parquet")
    with pytest.raises(SchemaError, match=r"The key column 'slot' is timestamp\[us, tz=Europe/Berlin\] in the data "
                                          r"but timestamp\[us\] in run .*: times with a time zone \(the data\) and "
                                          r"without one \(run .*\) cannot be matched.*tz_localize"):
        modelfactory.score(str(tmp_path / "zoned.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    with pytest.raises(SchemaError, match="times with a time zone .* and without one .* cannot be matched"):
        modelfactory.train(str(tmp_path / "zoned.parquet"), by=["slot"], time="ts", target="value", store=store,
                           retrain="failed", cluster="inline")
    assert not (tmp_path / "o").exists() and len(modelfactory.ModelStore(store).runs()) == 1
    # the other way round: trained with a zone (UTC days), scored without one
    (tmp_path / "utc").mkdir()
    t, store = _trained_on_flat(tmp_path / "utc", "day")
    t.assign(day=t["day"].dt.tz_localize(None)).to_parquet(tmp_path / "naive-days.parquet")
    with pytest.raises(SchemaError, match=r"timestamp\[.s\] in the data but timestamp\[.s, tz=UTC\] in run .*"
                                          r"with a time zone \(run .*\) and without one \(the data\)"):
        modelfactory.score(str(tmp_path / "naive-days.parquet"), store=store, out=str(tmp_path / "o"),
                           cluster="inline")


def test_keys_that_mostly_convert_are_cast_in_bulk_and_an_empty_window_of_type_null_scores_nothing(tmp_path):
    from modelfactory.scoring import _exactly, keys_as_stored

    col = pa.array([str(i) for i in range(100_000)])
    bad = pa.array(["x" if i in (5, 77_777) else str(i) for i in range(100_000)])
    assert _exactly(col, pa.int64()).to_pylist() == list(range(100_000))
    assert _exactly(bad, pa.int64()).to_pylist() == [None if i in (5, 77_777) else i for i in range(100_000)]
    assert _exactly(pa.array(["7", "07", "x", None, "9" * 30]), pa.int64()).to_pylist() == [7, None, None, None, None]
    cast, changed = keys_as_stored(pa.table({"k": pa.nulls(3)}), ("k",), (pa.string(),), "r")
    assert changed and cast[0].type == pa.string() and cast[0].null_count == 3
    # a scheduled score of an empty window, written by pandas 2 as a column of type null
    _, store = _trained_on_flat(tmp_path, "site")
    empty = pa.table({"site": pa.nulls(0), "ts": pa.array([], pa.timestamp("us", tz="UTC")),
                      "value": pa.array([], pa.float64())})
    import pyarrow.parquet as pq

    pq.write_table(empty, tmp_path / "window.parquet")
    s = modelfactory.score(str(tmp_path / "window.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    assert s.summary["counts"] == {"ok": 0, "failed": 0, "skipped": 0}


def test_a_string_key_that_is_not_an_exact_int_matches_no_model(tmp_path):
    t, store = _trained_on_flat(tmp_path, "shard")
    t.assign(shard=t["shard"].map({1: "01", 2: "2"})).to_parquet(tmp_path / "text.parquet")
    s = modelfactory.score(str(tmp_path / "text.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    g = s.groups.set_index("shard")
    assert g.loc["2", "status"] == "ok" and g.loc["01", "status"] == "skipped"
    assert g.loc["01", "error"].startswith("no model for this group")


def _sites(t: pd.DataFrame, names: dict) -> pd.DataFrame:
    return t.assign(site=t["site"].map(names))


# (site as trained, site as scored, how written): a key that only a respelling tells apart
_RESPELT = {
    "int for zero-padded text": ({"site-00000": "07", "site-00001": "08"}, {"site-00000": 7, "site-00001": 8}, None),
    "text without the padding": ({"site-00000": "07", "site-00001": "08"}, {"site-00000": "7", "site-00001": "8"}, None),
    "another case": ({"site-00000": "checkout", "site-00001": "search"},
                     {"site-00000": "Checkout", "site-00001": "Search"}, None),
    "epoch ms for s": ({"site-00000": 1767225600, "site-00001": 1767312000},
                       {"site-00000": 1767225600000, "site-00001": 1767312000000}, None),
    "hive folders": ({"site-00000": "07", "site-00001": "08"}, {"site-00000": "7", "site-00001": "8"}, "site"),
}


@pytest.mark.parametrize("case", list(_RESPELT))
def test_groups_whose_keys_are_respelt_since_training_are_skipped_saying_so(tmp_path, case):
    """A key written in another type or format than in training (7 for "07") matches no model;
    the skip reason says which key, one value of each side, and what to do (nothing is matched).
    A group new since training is skipped as before."""
    trained, scored, folders = _RESPELT[case]
    t = make_table(3, days=3, apps=1, spikes=0).to_pandas()
    new_key = 99 if isinstance(scored["site-00000"], int) else "x99"
    old = _sites(t[t.site != "site-00002"], trained)
    new = _sites(t, {**scored, "site-00002": new_key})
    suffix = "" if folders else ".parquet"
    for name, frame in (("old", old), ("new", new)):
        frame.to_parquet(tmp_path / f"{name}{suffix}", partition_cols=[folders] if folders else None)
    store = str(tmp_path / "store")
    r = modelfactory.train(str(tmp_path / f"old{suffix}"), by=["site"], time="ts", target="value", store=store,
                           cluster="inline")
    s = modelfactory.score(str(tmp_path / f"new{suffix}"), store=store, out=str(tmp_path / "o"), cluster="inline")
    g = s.groups
    g.index = g.site.astype(str)
    assert s.summary["counts"] == {"ok": 0, "failed": 0, "skipped": 3}
    assert s.summary["key_mismatch"]["groups"] == 2
    pairs = [(f"'site' is {scored[k]!r} (", f"in the data but {trained[k]!r} (") for k in scored]
    for site in scored.values():
        why = g.loc[str(site), "error"]
        assert why.startswith(f"no model for this group in run {r.id}, but its key matches one of the run's written "
                              "in another type or format (as does 1 other group; e.g. ")
        assert any(a in why and b in why for a, b in pairs)  # one value of each side
        assert "write 'site' in the data as training had it" in why
    assert g.loc[str(new_key), "error"] == f"no model for this group in run {r.id}"
    assert s.summary["key_mismatch"]["warning"].startswith(f"2 groups found no model in run {r.id}, but their keys")


def test_a_respelt_key_beside_the_trained_spelling_is_a_group_of_its_own(tmp_path):
    """Data that holds both "07" (with its model) and 7: 7 is another group, not a respelling."""
    t = make_table(2, days=3, apps=1, spikes=0).to_pandas()
    t["site"] = t["site"].map({"site-00000": "07", "site-00001": "08"})
    t.to_parquet(tmp_path / "old.parquet")
    both = pd.concat([t[t.site == "07"], t[t.site == "08"].assign(site="7")])
    both.to_parquet(tmp_path / "new.parquet")
    store = str(tmp_path / "store")
    r = modelfactory.train(str(tmp_path / "old.parquet"), by=["site"], time="ts", target="value", store=store,
                           cluster="inline")
    s = modelfactory.score(str(tmp_path / "new.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    g = s.groups.set_index("site")
    assert g.loc["07", "status"] == "ok"
    assert g.loc["7", "error"] == f"no model for this group in run {r.id}"
    assert "key_mismatch" not in s.summary


def test_a_respelt_key_column_is_named_among_several(tmp_path):
    """With keys app and site, the reason names the one column written otherwise (site), not app."""
    t = make_table(4, days=3, apps=2, spikes=0).to_pandas()
    t["site"] = t["site"].str[-2:]  # "00", "01", ...: zero-padded text
    t.to_parquet(tmp_path / "old.parquet")
    t.assign(site=t["site"].astype("int64")).to_parquet(tmp_path / "new.parquet")
    store = str(tmp_path / "store")
    r = modelfactory.train(str(tmp_path / "old.parquet"), by=["app", "site"], time="ts", target="value",
                           store=store, cluster="inline")
    s = modelfactory.score(str(tmp_path / "new.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    g = s.groups
    assert s.summary["counts"]["skipped"] == 4 and s.summary["key_mismatch"]["groups"] == 4
    assert g["error"].nunique() == 1  # one cause, one text
    why = g["error"][0]
    assert why.startswith(f"no model for this group in run {r.id}, but its key matches")
    import re

    assert re.search(r"; e\.g\. 'site' is (\d) \(int64\) in the data but '0\1' \((large_)?string\) in the run: ", why), why


def test_a_categorical_key_scores_and_retrains(tmp_path):
    t = _two_shards()
    t["cat"] = t["site"].astype("category")  # a Parquet dictionary column
    t.to_parquet(tmp_path / "d.parquet")
    data, store = str(tmp_path / "d.parquet"), str(tmp_path / "store")
    for by in (["cat"], ["cat", "day"]):
        modelfactory.train(data, by=by, time="ts", target="value", store=store, cluster="inline")
        s = modelfactory.score(data, store=store, out=str(tmp_path / "o"), overwrite=True, cluster="inline")
        assert s.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
        r = modelfactory.train(data, by=by, time="ts", target="value", store=store, cluster="inline",
                               retrain="failed")
        assert r.summary["counts"]["ok"] == 2
        assert sum(modelfactory.ModelStore(store).manifest()["lineage"]["carried_over"].values()) == 2


def test_a_score_run_over_hive_folders_gives_back_its_partition_keys(tmp_path):
    t = make_table(4, days=3, apps=2, spikes=0).to_pandas()
    t["app"] = t["app"].map({"app-00": "a,b c", "app-01": "07"})  # text to escape; digits stay text
    data = write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "data", ["app"])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    s = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline")
    got = s.to_pandas()
    assert len(got) == len(t) and got["app"].map(type).eq(str).all()
    assert sorted(got.groupby(["app", "site"]).size().index) == sorted(t.groupby(["app", "site"]).size().index)
    assert set(got.columns) >= {"app", "site", "ts", "value", "expected", "score", "is_anomaly"}


def test_outputs_do_not_carry_the_inputs_footer_schema(tmp_path):
    """Spark writes its row schema into each file's footer (``org.apache.spark.sql.parquet.row.
    metadata``) and reads a file's columns from it.  The store's parts, the scores, and the group
    tables of ``score`` and ``apply`` used to carry the input's footer metadata: Spark then read
    ``_groups/`` as the input's columns (app, ts, value: all null; no status, no error) and the
    scores without ``expected``, ``score`` or ``is_anomaly``.  pandas' metadata was carried too."""
    import glob
    import json

    import pyarrow.parquet as pq

    t = make_table(4, days=3, apps=2, spikes=0)
    spark = json.dumps({"type": "struct", "fields": [
        {"name": n, "type": "string", "nullable": True, "metadata": {}} for n in ("site", "ts", "value", "h")]})
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), "org.apache.spark.version": "4.0.0",
                                   "org.apache.spark.sql.parquet.row.metadata": spark})
    data = write(t, tmp_path / "data", ["app"])
    store, scores, applied = (str(tmp_path / n) for n in ("store", "scores", "applied"))
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    modelfactory.score(data, store=store, out=scores, cluster="inline")
    modelfactory.apply(data, by=["app", "site"], func=lambda df: df[["app", "site"]].head(1),
                       schema="app string, site string", out=applied, cluster="inline")
    files = [f for d in (store, scores, applied) for f in glob.glob(f"{d}/**/*.parquet", recursive=True)]
    assert len(files) == 1 + 3 + 2  # store part; 2 score folders + _groups; apply part + _groups
    carried = {f: sorted(k.decode() for k in pq.read_schema(f).metadata or {}) for f in files}
    assert not {f: keys for f, keys in carried.items() if keys}, carried


def test_to_pandas_gives_number_like_folder_keys_back_as_written(tmp_path):
    """Folder keys that all look like numbers (``app=007``, ``app=12``) were inferred as integers
    by pyarrow and turned back into text: ``Run.to_pandas()`` said ``"7"`` for the group that
    ``run.groups``, the store and the input call ``"007"``, so no join on the keys matched."""
    t = make_table(4, days=3, apps=2, spikes=0).to_pandas()
    t["app"] = t["app"].map({"app-00": "007", "app-01": "12"})
    data = write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "data", ["app"])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    s = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline")
    got = s.to_arrow()
    assert got.schema.field("app").type == pa.string()
    assert sorted(set(got["app"].to_pylist())) == ["007", "12"] == sorted(set(s.groups["app"]))
    assert len(s.to_pandas().merge(s.groups, on=["app", "site"])) == len(t)


def test_group_tables_keep_their_keys_as_columns_when_pandas_wrote_them_as_an_index(tmp_path):
    """``df.set_index(["app", "site"]).to_parquet(...)`` marks the key columns as pandas' index in
    the footer.  The group tables carried that footer: ``run.groups``, ``ModelStore.groups()`` and
    ``pd.read_parquet("scores/_groups")`` gave the keys as the index, not as columns, and
    ``plot --scores`` said the groups were "keyed by " nothing."""
    from modelfactory.plot import load_series

    df = make_table(4, days=3, apps=2, spikes=0).to_pandas()
    (tmp_path / "data").mkdir()
    df.set_index(["app", "site"]).to_parquet(tmp_path / "data" / "part-0.parquet")
    data, store, out = str(tmp_path / "data"), str(tmp_path / "store"), str(tmp_path / "o")
    run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    s = modelfactory.score(data, store=store, out=out, cluster="inline")
    for groups in (run.groups, modelfactory.ModelStore(store).groups(), s.groups, pd.read_parquet(f"{out}/_groups")):
        assert list(groups.columns[:3]) == ["app", "site", "status"] and len(groups) == 4
    key = {"app": df.app.iloc[0], "site": df.site.iloc[0]}
    assert len(load_series(out, key).frame) == (df.site == key["site"]).sum()


@pytest.mark.timeout(60)
def test_an_overwrite_that_cannot_reach_its_cluster_leaves_the_scores_it_would_replace(by_app, tmp_path):
    """A scheduled `score --overwrite` whose scheduler is down must not delete the last good
    scores before it finds out: nothing ran, so nothing already committed may be damaged."""
    from _servers import NotAScheduler

    from modelfactory.exceptions import ClusterError

    store, out = str(tmp_path / "store"), tmp_path / "scores"
    modelfactory.train(by_app, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    modelfactory.score(by_app, store=store, out=str(out), cluster="inline")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    server = NotAScheduler("http400")
    try:
        for job in (lambda: modelfactory.score(by_app, store=store, out=str(out), overwrite=True, cluster=server.address),
                    lambda: modelfactory.apply(by_app, by=["app", "site"], func=len, schema="n bigint", out=str(out),
                                               overwrite=True, cluster=server.address),
                    lambda: modelfactory.map_keys(["a", "b"], func=len, schema="n bigint", out=str(out),
                                                  overwrite=True, cluster=server.address)):
            with pytest.raises(ClusterError, match="did not answer with a Dask handshake"):
                job()
            assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        server.close()


def _in_call(thread, name: str) -> bool:
    """Whether ``thread`` is inside a call of a function named ``name`` right now."""
    import sys

    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


@pytest.mark.timeout(120)
def test_a_job_without_overwrite_never_empties_a_folder_another_job_committed_while_its_cluster_started(
        by_app, tmp_path):
    # Two scheduled jobs given the same new folder, no --overwrite: B checks that the folder is
    # empty, then waits for its scheduler; A scores into the folder and commits meanwhile. B then
    # emptied the folder anyway (A's committed scores gone, exit 0), though only --overwrite may.
    import socket
    import threading
    import time

    from distributed import LocalCluster

    store, out = str(tmp_path / "store"), tmp_path / "scores"
    modelfactory.train(by_app, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box: dict = {}

    def job_b():
        try:
            box["run"] = modelfactory.score(by_app, store=store, out=str(out), cluster=f"tcp://127.0.0.1:{port}")
        except StoreError as err:
            box["error"] = err

    th = threading.Thread(target=job_b)
    th.start()
    deadline = time.monotonic() + 30
    while not _in_call(th, "check_scheduler"):  # B found the folder empty, and waits for its scheduler
        assert th.is_alive() and time.monotonic() < deadline, box
        time.sleep(0.01)
    a = modelfactory.score(by_app, store=store, out=str(out), cluster="inline",
                           filter=pc.field("app") == "app-00")  # A: another window of the input
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, scheduler_port=port,
                      dashboard_address=":0"):
        th.join(60)
    assert "run" not in box, "a job without overwrite replaced the scores another job had committed"
    assert "not empty any more" in str(box["error"]) and "Nothing was removed" in str(box["error"])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == a.id


class _SlowInThreadA(modelfactory.models.seasonal.SeasonalProfile):
    """Seasonal, but scoring sleeps in the thread named "A" (the slow job of the test below)."""

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        import threading
        import time

        if threading.current_thread().name == "A":
            time.sleep(0.5)
        return super().score_batch(models, batch, **kwargs)


@pytest.mark.timeout(120)
def test_two_overwrites_of_one_folder_at_once_never_commit_rows_that_are_not_all_the_manifests(tmp_path):
    # A scheduled `score --overwrite` starts again (another window of the same files) while the
    # one before is still writing into the same folder. Same input, so the same file names: the
    # names-only check saw every file it wrote, and the slow job committed its _manifest.json
    # (its rows, its checksums) over files that were partly the other job's rows, exit 0.
    import threading
    import time

    data = write(metrics_table(series=12, hours=72, apps=6), tmp_path / "d", ["app"])
    store, out = str(tmp_path / "store"), tmp_path / "out"
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", model=_SlowInThreadA, store=store,
                       cluster="inline")
    kw = dict(store=store, out=str(out), overwrite=True, cluster="inline", unit_rows=144, trust=True)
    box: dict = {}

    def slow_job():
        try:
            box["run"] = modelfactory.score(data, **kw)
        except StoreError as err:
            box["error"] = err

    th = threading.Thread(target=slow_job, name="A")
    th.start()
    deadline = time.monotonic() + 60
    while len(list(out.glob("_groups/*.parquet"))) < 2:  # the slow job is under way
        assert th.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    try:  # the later job may refuse too; it must never commit a mix either
        modelfactory.score(data, filter=pc.field("ts") >= CUT_72, **kw)
    except StoreError as err:
        assert "changed while run" in str(err)
    th.join(60)
    assert "run" not in box, "the slow job committed a folder that another job had emptied and written to"
    assert "changed while run" in str(box["error"]) and "was not committed" in str(box["error"])
    # whatever _manifest.json the folder holds describes exactly its files
    if (out / "_manifest.json").exists():
        man = json.loads((out / "_manifest.json").read_text())
        files = {str(p.relative_to(out)) for p in out.rglob("*.parquet") if not p.name.startswith(".")}
        assert files == {p["path"] for p in man["parts"]}
        for p in man["parts"]:
            assert hashlib.sha256((out / p["path"]).read_bytes()).hexdigest() == p["sha256"], p["path"]


def test_a_folder_claimed_by_another_job_as_this_one_commits_is_left_uncommitted(by_app, tmp_path, monkeypatch):
    # The overlapping job empties and claims the folder in the moment between this job's last
    # check of the folder and its _manifest.json: the manifest stood over the other job's files
    # for good (if that job then died). The other job's claim is made there, at that moment.
    from modelfactory import result

    out = tmp_path / "out"
    kw = dict(by=["app", "site"], func=lambda df: df.head(1)[["app", "site", "value"]],
              schema="app string, site string, value double", out=str(out), overwrite=True, cluster="inline")
    checked = result.check_output

    def then_claimed(sink, run_id, results):
        checked(sink, run_id, results)
        result.claim_output(sink, "20260101T000000000Z-0other")

    monkeypatch.setattr(result, "check_output", then_claimed)
    with pytest.raises(StoreError, match=r"changed while run .*run 20260101T000000000Z-0other emptied it"):
        modelfactory.apply(by_app, **kw)
    assert not (out / "_manifest.json").exists() and not (out / "_run_id").exists()
    monkeypatch.undo()
    run = modelfactory.apply(by_app, **kw)
    assert (out / "_manifest.json").exists() and run.summary["counts"]["ok"] == 12


def test_a_file_rewritten_by_a_late_attempt_of_its_unit_is_checksummed_again_for_the_manifest(by_app, tmp_path,
                                                                                            monkeypatch):
    # A worker presumed dead that was still running a unit rewrites its files after the job took
    # the unit's result: same names, other bytes (other seconds in _groups/). _manifest.json listed
    # the sizes and checksums of the first attempt's bytes.
    import pyarrow.parquet as pq

    from modelfactory import result

    out = tmp_path / "out"
    checked = result.check_output

    def after_a_late_rewrite(sink, run_id, results):
        victim = out / results[0].parts[0].path
        t = pq.read_table(victim)
        pq.write_table(t.replace_schema_metadata({"late": "attempt" * 10}), victim)
        checked(sink, run_id, results)

    monkeypatch.setattr(result, "check_output", after_a_late_rewrite)
    modelfactory.apply(by_app, by=["app", "site"], func=lambda df: df.head(1)[["app", "site", "value"]],
                       schema="app string, site string, value double", out=str(out), cluster="inline")
    man = json.loads((out / "_manifest.json").read_text())
    for p in man["parts"]:
        data = (out / p["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (p["bytes"], p["sha256"]), p["path"]


CUT_72 = pa.scalar(pd.Timestamp("2026-03-04T00:00:00", tz="UTC"), pa.timestamp("s", tz="UTC"))


def test_columns_named_as_a_column_score_writes_are_refused_before_anything_is_written(tmp_path):
    # a target named `score` (or a feature `upper`, a key `anomalies`) was scored "ok", into files
    # with two columns of that name: the model's score beside the value, which pandas, to_pandas
    # and the report then could not read (Can't unify schema with duplicate field names), and
    # `plot --store` drew the model's score as the series
    from modelfactory.exceptions import SchemaError
    from modelfactory.plot import load_series
    from modelfactory.store import _digest_of

    clash = "has the name of a column (of the group table )?that score writes"
    for rename, args, what in [
            ({"value": "score"}, dict(by=["app", "site"], target="value"), "The target column 'score'"),
            ({"x1": "upper"}, dict(by=["app", "site"], target="value", features=["x1"], model="random_forest"),
             "The feature column 'upper'"),
            ({"site": "anomalies"}, dict(by=["app", "site"], target="value"), "The key column 'anomalies'")]:
        (old, new), = rename.items()
        folder = tmp_path / new
        folder.mkdir()
        metrics_table(series=3).to_pandas().rename(columns=rename).to_parquet(folder / "a.parquet")
        store, out, data = str(folder / "store"), folder / "scores", str(folder / "a.parquet")
        named = {k: ([new if c == old else c for c in v] if isinstance(v, list) else new if v == old else v)
                 for k, v in args.items()}
        # a run that could never be scored is not made
        with pytest.raises(SchemaError, match=f"{what} {clash}"):
            modelfactory.train(data, time="ts", store=store, cluster="inline", **named)
        assert not (folder / "store").exists()
        # a run committed before train refused such names: its spec names the column
        metrics_table(series=3).to_pandas().to_parquet(folder / "orig.parquet")
        run = modelfactory.train(str(folder / "orig.parquet"), time="ts", store=store, cluster="inline", **args)
        path = folder / "store" / "runs" / run.id / "manifest.json"
        body = json.loads(path.read_text())
        body.pop("checksum")
        body["spec"].update({k: v for k, v in named.items() if k in ("target", "features", "by")})
        body["checksum"] = _digest_of(body)
        path.write_text(json.dumps(body))
        if new != "anomalies":
            with pytest.raises(SchemaError, match=f"{what} of run {run.id} {clash}"):
                load_series(store, "app=app0,site=s000", data=data)
        with pytest.raises(SchemaError, match=f"{what} of run .* {clash}"):
            modelfactory.score(data, store=store, out=str(out), cluster="inline")
        assert not out.exists()


def test_a_key_named_as_a_score_column_is_refused_by_train_and_score(tmp_path):
    # a key named `expected` (or `score`, `lower`...) was trained and scored "ok", into files with two
    # columns 'expected' (the key, and the model's expected value) that no reader could open
    # ("Can't unify schema with duplicate field names"); the scored rows hold the keys too
    from modelfactory.exceptions import SchemaError
    from modelfactory.store import _digest_of

    t = metrics_table(series=3).to_pandas().rename(columns={"site": "expected"})
    t.to_parquet(tmp_path / "a.parquet")
    data, store, out = str(tmp_path / "a.parquet"), str(tmp_path / "store"), tmp_path / "scores"
    clash = "The key column 'expected' (of run .* )?has the name of a column that score writes beside it"
    with pytest.raises(SchemaError, match=clash):
        modelfactory.train(data, by=["app", "expected"], time="ts", target="value", store=store, cluster="inline")
    assert not (tmp_path / "store").exists()
    # a run committed before train refused such a key
    metrics_table(series=3).to_pandas().to_parquet(tmp_path / "orig.parquet")
    run = modelfactory.train(str(tmp_path / "orig.parquet"), by=["app", "site"], time="ts", target="value",
                             store=store, cluster="inline")
    path = tmp_path / "store" / "runs" / run.id / "manifest.json"
    body = json.loads(path.read_text())
    body.pop("checksum")
    body["spec"]["by"] = ["app", "expected"]
    body["checksum"] = _digest_of(body)
    path.write_text(json.dumps(body))
    with pytest.raises(SchemaError, match=clash):
        modelfactory.score(data, store=store, out=str(out), cluster="inline")
    assert not out.exists()


@pytest.mark.parametrize("model", ["holt_winters", "autoencoder"])
def test_a_group_scored_only_on_its_training_range_is_skipped_with_the_reason(tmp_path, model):
    """holt_winters, ets, sarimax and autoencoder score only rows after the end of training: scoring
    the training data itself (to find anomalies in the history) gave every group ``ok`` with 0
    anomalies, a planted 50-sigma spike unseen and nothing saying no row had been scored."""
    t = metrics_table(series=4, hours=24 * 7, apps=2)
    data = write(t, tmp_path / "data", ["app"])
    newer = t.set_column(t.schema.get_field_index("ts"), "ts",
                         pc.add(t["ts"], pa.scalar(pd.Timedelta(days=7), pa.duration("s"))))
    later = write(newer.filter(pc.equal(newer["site"], "s000")), tmp_path / "later", ["app"])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, model=model,
                       cluster="inline")
    g = modelfactory.score(data, store=store, out=str(tmp_path / "scores"), cluster="inline").groups
    assert set(g.status) == {"skipped"}
    assert g.error.str.contains("after the end of training (2026-03-08T23:00:00 UTC)", regex=False).all()
    # rows after the end of training are scored as before
    g = modelfactory.score(later, store=store, out=str(tmp_path / "later-scores"), cluster="inline").groups
    assert g.status.tolist() == ["ok"]


class _Detector(modelfactory.models.Model):
    """A user detector that expects nothing: NaN ``expected``, score 1 on values above a limit."""

    name = "limit_detector"
    params: ClassVar = {"limit": modelfactory.models.Param(1000.0, float), **modelfactory.models.base.SCORING_PARAMS}
    state_attrs = ("seen_",)

    def _fit(self, y, t, X):
        self.seen_ = len(y)

    def _score(self, y, t, X):
        hit = y > self.limit
        nan = np.full(y.shape, np.nan)
        return {"expected": nan, "lower": nan, "upper": nan, "score": hit.astype(float), "is_anomaly": hit}


def test_a_detector_that_expects_nothing_keeps_its_groups_ok(tmp_path):
    """Only models that say so (the built-ins) have a group with no expected value reported skipped:
    a user detector that scored every row 0 is ok, with its rows written."""
    t = metrics_table(series=2, hours=48, apps=1)
    data = write(t, tmp_path / "data", ["app"])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, model=_Detector,
                       cluster="inline")
    run = modelfactory.score(data, store=store, out=str(tmp_path / "scores"), cluster="inline", trust=True)
    assert run.groups.status.tolist() == ["ok", "ok"] and len(run.to_pandas()) == 96


def test_a_few_autoencoder_rows_after_a_gap_are_skipped_saying_how_many_to_score(tmp_path):
    t = metrics_table(series=1, hours=24 * 7, apps=1)
    store = str(tmp_path / "store")
    modelfactory.train(write(t, tmp_path / "data", ["app"]), by=["app", "site"], time="ts", target="value",
                       store=store, model="autoencoder", cluster="inline")
    later = t.slice(0, 6).set_column(t.schema.get_field_index("ts"), "ts",
                                     pc.add(t.slice(0, 6)["ts"], pa.scalar(pd.Timedelta(days=10), pa.duration("s"))))
    g = modelfactory.score(write(later, tmp_path / "later", ["app"]), store=store, out=str(tmp_path / "scores"),
                           cluster="inline").groups
    assert g.status.tolist() == ["skipped"]
    assert "score at least 24 consecutive steps at a time" in g.error[0]


def _flat_history(tmp_path, series=1200):
    """Hourly series in one flat folder: the keys are ordinary columns (no key folders)."""
    return write(metrics_table(series=series, hours=48, apps=10), tmp_path / "flat", [])


def _counting_part_reads(monkeypatch) -> list[str]:
    """The paths of the store parts read in this process (the real reader, counted)."""
    import modelfactory.store

    reads: list[str] = []
    real = modelfactory.store.read_part

    def read_part(location, part, columns=None):
        reads.append(part["path"])
        return real(location, part, columns)

    monkeypatch.setattr(modelfactory.store, "read_part", read_part)
    return reads


def test_scoring_without_key_folders_reads_each_part_once_not_once_per_unit(tmp_path, client, monkeypatch):
    """A run trained on data without key folders spread its groups over its parts by Dask's hash
    of their keys: every scoring unit read (and checksummed) every part, parts x units reads (36
    for 6 units of 6 parts).  Now a unit reads the parts of the partitions its keys hash to."""
    data, store = _flat_history(tmp_path), str(tmp_path / "store")
    # trained with the p2p shuffle of a real cluster; scored in this process, where reads are counted
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster=client, unit_rows=10_000)
    man = modelfactory.ModelStore(store).manifest()
    assert man["summary"]["mode"] == "shuffle" and len(man["parts"]) == 6
    reads = _counting_part_reads(monkeypatch)
    for unit_rows in (10_000, 15_000):  # 6 units; 4 units made 6 (the run's partitions), not 4 x 6 reads
        reads.clear()
        run = modelfactory.score(data, store=store, out=str(tmp_path / f"o{unit_rows}"), cluster="inline",
                                 unit_rows=unit_rows)
        assert run.summary["mode"] == "shuffle" and run.summary["units"] == 6
        assert run.summary["counts"] == {"ok": 1200, "failed": 0, "skipped": 0}
        assert sorted(reads) == sorted(p["path"] for p in man["parts"])  # each part once
    assert sorted(man["buckets"]["parts"]) == list(range(6)) and man["buckets"]["n"] == 6


def test_scoring_keys_of_another_type_or_in_key_folders_still_reads_each_part_once(tmp_path, client, monkeypatch):
    """Trained without key folders on an int64 ``shard``; scored with ``shard`` as text, or in
    ``shard=`` folders. The scoring shuffle hashed the keys as read (text), so its partitions held
    groups of every training partition (35 reads for 6 units of 6 parts), and units of folders
    did too (34). Now the shuffle hashes the keys as the run's types, and data in key folders
    is shuffled too."""
    t = metrics_table(series=600, hours=48, apps=1).to_pandas()
    t["shard"] = t["site"].str[1:].astype("int64")
    t = t.drop(columns=["app", "site"])
    data, store = write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "flat", []), str(tmp_path / "s")
    modelfactory.train(data, by=["shard"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster="inline", unit_rows=5_000)
    man = modelfactory.ModelStore(store).manifest()
    assert man["summary"]["mode"] == "shuffle" and len(man["parts"]) == 6
    text = write(pa.Table.from_pandas(t.assign(shard=t["shard"].astype(str)), preserve_index=False),
                 tmp_path / "text", [])
    folders = write(pa.Table.from_pandas(t, preserve_index=False), tmp_path / "folders", ["shard"])
    reads = _counting_part_reads(monkeypatch)
    for name, where in (("text", text), ("folders", folders)):
        reads.clear()
        run = modelfactory.score(where, store=store, out=str(tmp_path / f"o-{name}"), cluster="inline",
                                 unit_rows=5_000)
        assert run.summary["mode"] == "shuffle" and run.summary["units"] == 6, name
        assert run.summary["counts"] == {"ok": 600, "failed": 0, "skipped": 0}, name
        assert sorted(reads) == sorted(p["path"] for p in man["parts"]), name  # each part once
    # keys no int64 holds: no model, and spread over the units as before (all null once cast, they
    # hashed alike: every row in one partition, a whole dataset on one worker)
    unheld = write(pa.Table.from_pandas(t.assign(shard="s" + t["shard"].astype(str)), preserve_index=False),
                   tmp_path / "unheld", [])
    run = modelfactory.score(unheld, store=store, out=str(tmp_path / "o-unheld"), cluster="inline", unit_rows=5_000)
    assert run.summary["counts"] == {"ok": 0, "failed": 0, "skipped": 600} and run.summary["units"] == 6
    import pyarrow.parquet as pq

    per_unit = [pq.read_metadata(f).num_rows for f in sorted((tmp_path / "o-unheld" / "_groups").glob("*.parquet"))]
    assert sum(per_unit) == 600 and max(per_unit) < 300, per_unit
    # on a real cluster's p2p shuffle, the scores are those of the data as trained
    run = modelfactory.score(folders, store=store, out=str(tmp_path / "o-c"), cluster=client, unit_rows=5_000)
    same = modelfactory.score(data, store=store, out=str(tmp_path / "o-same"), cluster="inline", unit_rows=5_000)
    assert run.summary["counts"] == same.summary["counts"] == {"ok": 600, "failed": 0, "skipped": 0}
    got, want = (pd.read_parquet(tmp_path / o).astype({"shard": "int64"}).sort_values(["shard", "ts"])
                 for o in ("o-c", "o-same"))
    np.testing.assert_allclose(got["expected"].to_numpy(), want["expected"].to_numpy())


def test_files_whose_key_and_target_types_widen_train_and_score_without_key_folders(tmp_path):
    """Files written by two writers (a key of int32 in one and int64 in the other, the target of
    float32 and float64) are one dataset of the wider types.  The check of the target's type at
    scoring had shadowed the function that widens them: train and score stopped with
    AttributeError ("'DataType' object has no attribute 'startswith'")."""
    import pyarrow.parquet as pq

    t = metrics_table(series=300, hours=48, apps=10)
    sid = pc.cast(pc.utf8_slice_codeunits(t["site"], 1), pa.int64())
    t = t.set_column(t.schema.get_field_index("site"), "site", pc.subtract(sid, 150))  # negative keys too
    first = pc.less(t["ts"], pa.scalar(pd.Timestamp("2026-03-03", tz="UTC"), t["ts"].type))
    older, newer = t.filter(first), t.filter(pc.invert(first))
    older = older.set_column(older.schema.get_field_index("site"), "site", older["site"].cast(pa.int32()))
    older = older.set_column(older.schema.get_field_index("value"), "value", older["value"].cast(pa.float32()))
    (tmp_path / "d").mkdir()
    pq.write_table(older, tmp_path / "d" / "older.parquet")
    pq.write_table(newer, tmp_path / "d" / "newer.parquet")
    data, store = str(tmp_path / "d"), str(tmp_path / "store")
    run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                             store=store, cluster="inline", unit_rows=3_000)
    assert run.summary["counts"] == {"ok": 300, "failed": 0, "skipped": 0}
    assert run.summary["mode"] == "shuffle" and (run.groups["rows"] == 48).all()  # no group split over units
    scored = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline", unit_rows=2_000)
    assert scored.summary["counts"] == {"ok": 300, "failed": 0, "skipped": 0}


def test_groups_without_a_model_cost_no_extra_reads_and_are_skipped(tmp_path, monkeypatch):
    data, store = _flat_history(tmp_path), str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster="inline", unit_rows=10_000)
    more = write(metrics_table(series=1300, hours=48, apps=10), tmp_path / "more", [])  # 100 new series
    reads = _counting_part_reads(monkeypatch)
    run = modelfactory.score(more, store=store, out=str(tmp_path / "o"), cluster="inline", unit_rows=10_000)
    assert run.summary["counts"] == {"ok": 1200, "failed": 0, "skipped": 100}
    assert run.summary["units"] == 12 and len(reads) == 12  # one part per unit


def test_a_run_whose_parts_do_not_hold_their_partitions_is_read_whole_and_old_manifests_as_before(tmp_path,
                                                                                                monkeypatch):
    """The partitions are Dask's hash of the keys: should another Dask (or pandas) hash them
    otherwise, the parts a unit reads do not hold the keys the manifest says, and the unit reads
    every part rather than call groups that have a model `skipped`.  A manifest without partitions
    (earlier versions) is read whole, as before."""
    import dataclasses

    import modelfactory.store
    from modelfactory.api import model_source
    from modelfactory.dataset import read_files
    from modelfactory.kernel import split_groups
    from modelfactory.scoring import load_model_rows

    data = _flat_history(tmp_path)
    st, man, info, src = _trained_flat(data, str(tmp_path / "store"), unit_rows=10_000)
    assert src.n_buckets == 6
    first = man["parts"][src.buckets.index(0)]
    sites = modelfactory.store.read_part(st.location, first, columns=["site"])["site"].to_pylist()[:50]
    unit = split_groups(read_files(info.source, [f.path for f in info.files], ["app", "site", "ts"],
                                   pc.field("site").isin(sites)), ("app", "site"), "ts")  # 50 groups of partition 0
    reads = _counting_part_reads(monkeypatch)
    assert len(load_model_rows(src, unit, ("app", "site"))) == 50
    assert reads == [first["path"]]
    shifted = dataclasses.replace(src, buckets=tuple((b + 1) % 6 for b in src.buckets))
    reads.clear()
    rows = load_model_rows(shifted, unit, ("app", "site"))
    assert len(rows) == 50 and all(r["status"] == "ok" for r in rows.values()) and len(reads) == 6
    old = dict(man)
    del old["buckets"]
    reads.clear()
    assert len(load_model_rows(model_source(st, old, info, trust=False), unit, ("app", "site"))) == 50
    assert len(reads) == 6


def _trained_flat(data: str, store: str, *, unit_rows: int):
    """A seasonal run of ``data`` (no key folders: shuffled) in ``store``: the store, the run's
    manifest, the data's DatasetInfo and the ModelSource a scoring unit gets."""
    from modelfactory.api import model_source
    from modelfactory.dataset import discover

    modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster="inline", unit_rows=unit_rows)
    st = modelfactory.ModelStore(store)
    man = st.manifest()
    info = discover(data)
    return st, man, info, model_source(st, man, info, trust=False)


def test_parts_of_one_group_or_none_do_not_vouch_for_the_partitions(tmp_path):
    """Four large groups shuffled into ten partitions: six parts hold no group, four hold one.
    Should this Dask hash the keys otherwise than training's (the manifest's partitions shifted
    here), a unit read the one part its group hashed to: an empty part agrees with any hash, a
    part of one group with another hash once in ten, and the group, which has a model, came out
    `skipped` (no model).  Fewer than two groups placed as the manifest says: the unit reads on."""
    import dataclasses

    from modelfactory.dataset import read_files
    from modelfactory.kernel import split_groups
    from modelfactory.scoring import load_model_rows

    data = write(metrics_table(series=4, hours=48, apps=2), tmp_path / "flat", [])
    _, man, info, src = _trained_flat(data, str(tmp_path / "store"), unit_rows=20)
    assert src.n_buckets == 10 and sorted(p["rows"] for p in man["parts"]).count(0) == 6
    table = read_files(info.source, [f.path for f in info.files], ["app", "site", "ts"])
    for site in ["s000", "s001", "s002", "s003"]:
        unit = split_groups(table.filter(pc.equal(table["site"], site)), ("app", "site"), "ts")
        for shift in range(10):  # as another hash would place them
            moved = dataclasses.replace(src, buckets=tuple((b + shift) % 10 for b in src.buckets))
            rows = load_model_rows(moved, unit, ("app", "site"))
            assert [r["status"] for r in rows.values()] == ["ok"], (site, shift)


def test_loading_one_model_of_a_run_without_key_folders_reads_the_part_of_its_partition(tmp_path, monkeypatch):
    """ModelStore.load read the parts of such a run in turn until one held the key: a key of the
    last part cost a read of every part.  Now its partition's part is read first."""
    import modelfactory.store

    data, store = _flat_history(tmp_path), str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster="inline", unit_rows=10_000)
    st = modelfactory.ModelStore(store)
    man = st.manifest()
    last = modelfactory.store.read_part(st.location, man["parts"][-1], columns=["app", "site"]).slice(0, 3)
    reads = _counting_part_reads(monkeypatch)
    for key in last.to_pylist():
        reads.clear()
        assert st.load(key).is_fitted
        assert reads == [man["parts"][-1]["path"]]
    reads.clear()
    with pytest.raises(StoreError, match="No group"):  # a key of no group is still looked for everywhere
        st.load({"app": "app0", "site": "nope"})
    assert sorted(reads[:6]) == sorted(p["path"] for p in man["parts"])


def test_a_feature_that_was_a_number_in_training_and_is_boolean_now_is_refused(tmp_path):
    """A feature of floats in training read as booleans at scoring was taken as 0 and 1 against the
    forest fitted on the floats: every row scored `ok`, its expected value wrong. Integers where
    floats were stay accepted, and runs stored before the types were recorded are not checked."""
    from modelfactory.exceptions import SchemaError

    df = metrics_table(series=3, hours=72).to_pandas()
    df["x1"] = df["x1"].astype(float) * 10.0
    pq_train = tmp_path / "train.parquet"
    df.to_parquet(pq_train)
    store = str(tmp_path / "store")
    run = modelfactory.train(str(pq_train), by=["app", "site"], time="ts", target="value", features=["x1"],
                             model="random_forest", store=store, cluster="inline")
    assert modelfactory.ModelStore(store).manifest(run.id)["input"]["value_types"] == {"value": "double",
                                                                                       "x1": "double"}
    as_bool = tmp_path / "bool.parquet"
    df.assign(x1=df["x1"] > 5).to_parquet(as_bool)
    with pytest.raises(SchemaError, match=(r"The column 'x1' of .* is bool, but run '.*' was trained on it as double: "
                                           r"its booleans would be read as 0 and 1 against a model fitted on numbers")):
        modelfactory.score(str(as_bool), store=store, out=str(tmp_path / "o1"), cluster="inline")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(SchemaError, match="The column 'x1' of .* is bool, but run '.*' was trained on it as double"):
        modelfactory.train(str(as_bool), by=["app", "site"], time="ts", target="value", features=["x1"],
                           model="random_forest", store=store, cluster="inline", retrain="changed")
    as_int = tmp_path / "int.parquet"
    df.assign(x1=df["x1"].round().astype("int64")).to_parquet(as_int)
    scored = modelfactory.score(str(as_int), store=store, out=str(tmp_path / "o2"), cluster="inline")
    assert scored.summary["counts"]["ok"] == 3
    # a run committed before the types were recorded is scored as before
    path = tmp_path / "store" / "runs" / run.id / "manifest.json"
    from modelfactory.store import _digest_of

    body = json.loads(path.read_text())
    body.pop("checksum")
    body["input"].pop("value_types")
    body["checksum"] = _digest_of(body)
    path.write_text(json.dumps(body))
    assert modelfactory.score(str(as_bool), store=store, out=str(tmp_path / "o3"),
                              cluster="inline").summary["counts"]["ok"] == 3


def test_a_big_leaf_index_is_read_from_the_manifest_by_each_worker_not_sent_with_every_unit(
        tmp_path, client, monkeypatch):
    """A run with a folder per group has a leaf per group: at a million, the index pickled to
    22 MB, sent and unpickled once per unit.  Past INLINE_LEAVES, the units carry the manifest's
    digest instead, and each worker process reads the index from the store once."""
    import pickle

    import modelfactory.scoring
    from modelfactory.api import model_source
    from modelfactory.dataset import discover

    data = write(metrics_table(series=12, hours=72, apps=2), tmp_path / "d", ["app", "site"])
    store = str(tmp_path / "s")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline",
                       unit_rows=1)
    st = modelfactory.ModelStore(store)
    man = st.manifest()
    small = model_source(st, man, discover(data), trust=False)
    monkeypatch.setattr(modelfactory.scoring, "INLINE_LEAVES", 5)
    big = model_source(st, man, discover(data), trust=False)
    assert len(small.index) == 12 and not big.index and big.index_digest
    assert modelfactory.scoring.leaf_lookup(big) == small.index  # what a worker reads: the same index
    assert len(pickle.dumps(big)) < len(pickle.dumps(small))
    reads = _counting_part_reads(monkeypatch)
    one = write(metrics_table(series=12, hours=72, apps=2).filter(pc.equal(
        metrics_table(series=12, hours=72, apps=2)["site"], "s003")), tmp_path / "one", ["app", "site"])
    s = modelfactory.score(one, store=store, out=str(tmp_path / "o1"), cluster="inline")
    assert s.summary["counts"] == {"ok": 1, "failed": 0, "skipped": 0} and len(reads) == 1, reads
    for cluster in ("inline", client):
        s = modelfactory.score(data, store=store, out=str(tmp_path / f"o-{cluster!s:.6}"), cluster=cluster)
        assert s.summary["counts"] == {"ok": 12, "failed": 0, "skipped": 0}
    # a manifest rewritten after the job read it is not trusted for the index
    path = tmp_path / "s" / "runs" / man["run_id"] / "manifest.json"
    body = json.loads(path.read_text())
    body["index"]["parts"].reverse()
    path.write_text(json.dumps(body))
    modelfactory.scoring._lookups.clear()
    from modelfactory.exceptions import IntegrityError

    with pytest.raises(IntegrityError, match="changed after this job read it"):
        modelfactory.scoring.leaf_lookup(big)


@pytest.mark.parametrize("layout", ["app folders", "flat, shuffled"])
def test_score_keeps_columns_of_the_data_such_as_a_request_id(tmp_path, client, layout):
    """Scored rows held the keys, time, target and features only: a flagged request could not be
    told by its id (and key and time are not unique in request logs).  keep= (--keep) carries more
    columns of the data into them, row for row, in files mode and through the scoring shuffle."""
    t = metrics_table(series=40, hours=48, apps=4)
    t = t.append_column("req", pa.array([f"r{i:06d}" for i in range(t.num_rows)]))
    data = write(t, tmp_path / "d", ["app"] if layout == "app folders" else [])
    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", params={"season_length": 24},
                       store=store, cluster=client if layout.endswith("shuffled") else "inline", unit_rows=600)
    run = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline", unit_rows=600,
                             keep="req")
    assert run.summary["mode"] == ("files" if layout == "app folders" else "shuffle")
    assert run.summary["spec"]["keep"] == ["req"] and run.summary["counts"]["ok"] == 40
    got = run.to_pandas()
    assert sorted(got["req"]) == sorted(t["req"].to_pylist())
    want = t.to_pandas().set_index("req")
    got = got.set_index("req").loc[want.index]
    assert (got["value"].to_numpy() == want["value"].to_numpy()).all()
    assert (got["site"].astype(str).to_numpy() == want["site"].to_numpy()).all()


def test_score_refuses_a_kept_column_it_cannot_keep(tmp_path, capsys):
    from modelfactory.cli import main

    t, store = _trained_on_flat(tmp_path, "shard")
    t.assign(score=1.0).to_parquet(tmp_path / "new.parquet")
    base = ["score", str(tmp_path / "new.parquet"), "--store", store, "--scheduler", "inline", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "o1"), "--keep", "req_id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The kept (keep=, --keep) column 'req_id' is not in the dataset at ") and \
        err.count("\n") == 1
    assert main([*base, "--out", str(tmp_path / "o2"), "--keep", "score"]) == 2
    assert "The kept column 'score' of" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_unit_that_outlives_its_committed_run_writes_nothing(tmp_path, monkeypatch):
    """A worker taken for lost (paused past the scheduler's worker TTL) ran on after its unit ran
    again elsewhere and the run committed, and rewrote that unit's files, of the same names, under
    the manifest's checksums (the review's repro: a SIGSTOP, then SIGCONT). A unit's attempt that
    finds its run committed writes nothing."""
    import modelfactory.scoring as scoring

    seen = []
    real = scoring.score_unit

    def recording(spec, unit):
        seen.append((spec, unit))
        return real(spec, unit)

    monkeypatch.setattr(scoring, "score_unit", recording)
    _, store = _trained_on_flat(tmp_path, "shard")
    out = tmp_path / "o"
    modelfactory.score(str(tmp_path / "flat.parquet"), store=store, out=str(out), cluster="inline")
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    spec, unit = seen[0]
    with pytest.raises(StoreError, match=r"was committed while its unit .* still ran here .* wrote nothing"):
        real(spec, unit)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_overwrite_refuses_an_output_folder_in_another_model_store(tmp_path):
    """--out other-store/runs --overwrite (a slip of the path) emptied another model store's runs;
    the job's own store was kept apart, other stores were not."""
    _, store = _trained_on_flat(tmp_path, "shard")
    other = str(tmp_path / "other")
    modelfactory.train(str(tmp_path / "flat.parquet"), by=["shard"], time="ts", target="value", store=other,
                       cluster="inline")
    runs = sorted(p.name for p in (tmp_path / "other" / "runs").iterdir())
    for out in (other, f"{other}/runs", f"{other}/runs/{runs[0]}", f"{other}/runs/{runs[0]}/parts"):
        with pytest.raises(StoreError, match=r"(is|lies inside) a model store .*: overwrite would delete its runs\. "
                                             r"Nothing was removed"):
            modelfactory.score(str(tmp_path / "flat.parquet"), store=store, out=out, overwrite=True,
                               cluster="inline")
    assert sorted(p.name for p in (tmp_path / "other" / "runs").iterdir()) == runs
    assert modelfactory.ModelStore(other).latest() == runs[0]
    (tmp_path / "other" / "LATEST").unlink()  # a store whose runs fitted nothing has no LATEST
    with pytest.raises(StoreError, match=r"lies inside a model store"):
        modelfactory.score(str(tmp_path / "flat.parquet"), store=store, out=f"{other}/runs", overwrite=True,
                           cluster="inline")
    (tmp_path / "other" / "notes").mkdir()  # beside runs/: emptying it removes no run
    (tmp_path / "other" / "notes" / "a.txt").write_text("x")
    modelfactory.score(str(tmp_path / "flat.parquet"), store=store, out=f"{other}/notes", overwrite=True,
                       cluster="inline")
    # a folder that holds another job's store (--out jobs/errors for jobs/errors/scores): emptied,
    # with the store in it, and the job said "ok"
    nested = str(tmp_path / "jobs" / "errors" / "store")
    modelfactory.train(str(tmp_path / "flat.parquet"), by=["shard"], time="ts", target="value", store=nested,
                       cluster="inline")
    (tmp_path / "jobs" / "errors" / "notes.txt").write_text("x")
    for out in (tmp_path / "jobs" / "errors", tmp_path / "jobs"):
        with pytest.raises(StoreError, match=rf"holds the model store '{nested}' \(its LATEST or runs/\): overwrite "
                                             r"would delete its runs\. Nothing was removed"):
            modelfactory.score(str(tmp_path / "flat.parquet"), store=store, out=str(out), overwrite=True,
                               cluster="inline")
    assert modelfactory.ModelStore(nested).latest() and (tmp_path / "jobs" / "errors" / "notes.txt").exists()


def test_a_detector_without_the_target_scores_groups_whose_target_is_missing(tmp_path):
    """isolation_forest with include_target=False: a group whose new target values were all
    missing was 'skipped, nothing to score' with 0 anomalies, while its written rows were flagged.
    A group none of whose rows could be scored (their features all missing) is still skipped."""
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"user": np.repeat(["a", "b"], n), "f1": rng.normal(size=2 * n), "f2": rng.normal(size=2 * n),
                       "value": rng.normal(size=2 * n)})
    df.loc[df.user == "b", "value"] = np.nan  # b: trained without a target value
    df.to_parquet(tmp_path / "train.parquet")
    store = str(tmp_path / "s")
    modelfactory.train(str(tmp_path / "train.parquet"), by="user", target="value", features=["f1", "f2"],
                       model="isolation_forest", params={"include_target": False}, store=store, cluster="inline")
    new = df.groupby("user").head(5).copy()
    new["value"] = np.nan
    new.loc[new.index[[0, 5]], "f1"] = 60.0
    new.to_parquet(tmp_path / "new.parquet")
    run = modelfactory.score(str(tmp_path / "new.parquet"), store=store, out=str(tmp_path / "o"), cluster="inline")
    g = run.groups.set_index("user")
    assert g["status"].tolist() == ["ok", "ok"] and (g["anomalies"] >= 1).all()
    rows = run.to_pandas()
    assert rows["is_anomaly"].sum() == g["anomalies"].sum() == run.summary["anomalies"]
    assert rows.loc[rows.f1 == 60.0, "is_anomaly"].all()
    new.loc[new.user == "a", ["f1", "f2"]] = np.nan  # nothing to isolate a's rows on (review Q)
    new.to_parquet(tmp_path / "blind.parquet")
    run = modelfactory.score(str(tmp_path / "blind.parquet"), store=store, out=str(tmp_path / "o2"), cluster="inline")
    g = run.groups.set_index("user")
    assert g.loc["a", "status"] == "skipped" and "none of its 5 rows could be scored" in g.loc["a", "error"]
    assert g.loc["b", "status"] == "ok"


def test_plot_reads_the_time_and_target_of_scores_that_keep_more_columns(tmp_path):
    """Scores kept a timestamp and a number after the features (keep=): plot and report guessed
    the time and target from the columns' order, and took the kept ones."""
    from modelfactory.plot import load_series

    rng = np.random.default_rng(0)
    n = 200
    pd.DataFrame({"user": "a", "bytes": rng.lognormal(8, .3, n), "latency": rng.gamma(4, 20, n),
                  "at": pd.date_range("2026-01-01", periods=n, freq="min"),
                  "status": rng.integers(200, 205, n)}).to_parquet(tmp_path / "r.parquet")
    store, out = str(tmp_path / "s"), str(tmp_path / "o")
    modelfactory.train(str(tmp_path / "r.parquet"), by="user", target="bytes", features=["latency"],
                       model="isolation_forest", store=store, cluster="inline")
    modelfactory.score(str(tmp_path / "r.parquet"), store=store, out=out, cluster="inline", keep="at,status")
    s = load_series(out, "user=a")
    assert (s.time, s.target) == (None, "bytes")
    # one of the two named: the summary gives the other (the target was left to a guess, which failed)
    assert load_series(out, "user=a", time="at").target == "bytes"


def test_a_window_whose_target_is_all_null_typed_skips_its_groups_as_missing(history_and_new, tmp_path):
    """pandas writes a column of None as Parquet type null: a window of such files stopped the whole
    score with "the target holds only nulls in every file of <the dataset>" (not true of the dataset,
    and not what the same window of NaN does: its groups are skipped, saying why)."""
    from modelfactory.exceptions import SchemaError

    old, new = history_and_new
    store = str(tmp_path / "store")
    modelfactory.train(old, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    window = pd.read_parquet(new).astype({"app": str})
    window = window[window.app == window.app.iloc[0]].assign(value=None)
    path = write(pa.Table.from_pandas(window, preserve_index=False), tmp_path / "window", ["app"])
    assert pa.types.is_null(modelfactory.dataset.discover(path).schema.field("value").type)
    run = modelfactory.score(path, store=store, out=str(tmp_path / "s"), cluster="inline")
    assert run.summary["counts"]["ok"] == 0 and run.summary["counts"]["skipped"] == window.site.nunique()
    assert set(run.groups["error"]) >= {"every one of its 48 'value' values is missing (NaN or null): nothing to "
                                        "score; its rows carry the expected values"}
    with pytest.raises(SchemaError, match="holds only nulls in every file of .* the job reads"):
        modelfactory.train(path, by=["app", "site"], time="ts", target="value", store=str(tmp_path / "s2"),
                           cluster="inline")
