"""Every built-in model through the real runner, in-process: train, store, load, score."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

import modelfactory
from modelfactory import demo
from modelfactory.exceptions import ModelError

SERIES, DAYS = 3, 7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("e2e") / "data")
    return demo.write_dataset(path, series=SERIES, days=DAYS)


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory) -> str:
    """The demo data plus two feature columns (hour of day as sine and cosine)."""
    table = demo.make_table(SERIES, days=DAYS)
    hours = pc.cast(table["ts"], pa.int64()).to_numpy() // 3600 % 24
    table = table.append_column("hsin", pa.array(np.sin(2 * np.pi * hours / 24)))
    table = table.append_column("hcos", pa.array(np.cos(2 * np.pi * hours / 24)))
    path = str(tmp_path_factory.mktemp("e2e_features") / "data")
    ds.write_dataset(table, path, format="parquet", partitioning=ds.partitioning(
        pa.schema([("app", pa.string())]), flavor="hive"))
    return path


CASES = [
    ("seasonal", {}, False),
    ("holt_winters", {}, False),
    ("ets", {"season_length": 24, "maxiter": 50}, False),
    ("sarimax", {"season_length": 24, "seasonal_d": 0, "seasonal_q": 0, "maxiter": 50}, False),
    ("autoencoder", {"max_iter": 100}, False),
    ("isolation_forest", {"n_estimators": 20}, True),
    ("random_forest", {"n_estimators": 20}, True),
]


@pytest.mark.parametrize("name, params, features", CASES, ids=[c[0] for c in CASES])
def test_train_load_and_score(name, params, features, data, feature_data, tmp_path):
    store = str(tmp_path / "store")
    run = modelfactory.train(feature_data if features else data, by=["app", "site"], time="ts", target="value",
                             features=["hsin", "hcos"] if features else (), model=name, params=params,
                             store=store, cluster="inline")
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}, run.groups
    model = modelfactory.ModelStore(store).load({"app": "app-00", "site": "site-00000"})
    assert type(model) is modelfactory.models.registry[name] and model.is_fitted
    t_end = np.datetime64("2026-01-05T00:00:00", "s") + np.timedelta64(DAYS * 24, "h")
    t = t_end + np.arange(6).astype("timedelta64[h]")
    hours = np.arange(6) % 24
    X = np.column_stack([np.sin(2 * np.pi * hours / 24), np.cos(2 * np.pi * hours / 24)])
    y = np.asarray(model.score(np.zeros(6), t=t, X=X)["expected"])  # typical values
    res = model.score(np.r_[y[:5], y[5] + 1e4], t=t, X=X)
    assert np.isfinite(res["expected"]).all()
    if name == "isolation_forest":  # isolation is bounded by the training extremes: no magnitude
        assert res["score"][5] >= res["score"][:5].max()
    else:
        assert res["is_anomaly"][5] and res["score"][5] > 0.99
    # +-inf (a broken rate upstream) scored 0 and was never flagged; NaN (missing) still is not
    res = model.score(np.r_[y[:3], np.inf, -np.inf, np.nan], t=t, X=X)
    assert res["is_anomaly"].tolist() == [False] * 3 + [True, True, False], res
    assert res["score"][3:5].tolist() == [1.0, 1.0]
    if name != "isolation_forest":  # which scores a row by its features, whatever its target
        assert res["score"][5] == 0.0


def test_seasonal_batch_scoring_flags_infinite_values_as_one_series_does():
    from modelfactory.models.base import SeriesBatch

    cls = modelfactory.models.registry["seasonal"]
    t = 1_767_571_200 + 3600 * np.arange(72)
    y = 10 + np.sin(2 * np.pi * np.arange(72) / 24)
    models = cls.fit_batch({}, SeriesBatch(np.r_[y, y], np.array([0, 72, 144]), np.r_[t, t]))
    new_t = t[-1] + 3600 * np.arange(1, 5)
    new = np.array([10.0, np.inf, np.nan, -np.inf])
    batch = SeriesBatch(np.r_[new, new], np.array([0, 4, 8]), np.r_[new_t, new_t])
    fast = cls.score_batch([models[0], None], batch)
    one = models[0].score(new, t=new_t)
    assert fast["is_anomaly"].tolist() == one["is_anomaly"].tolist() + [False] * 4 == [False, True, False, True] + [False] * 4
    assert fast["score"][:4].tolist() == one["score"].tolist() and fast["score"][[1, 3]].tolist() == [1.0, 1.0]


def test_feature_model_without_features_fails_before_fitting(data, tmp_path):
    with pytest.raises(ModelError, match="needs feature columns"):
        modelfactory.train(data, by=["app", "site"], time="ts", target="value", model="random_forest",
                           store=str(tmp_path / "s"), cluster="inline")
    # the autoencoder's needs depend on its input parameter: checked before anything runs too
    with pytest.raises(ModelError, match="Model 'autoencoder' needs a time column"):
        modelfactory.train(data, by=["app", "site"], target="value", model="autoencoder",
                           store=str(tmp_path / "s2"), cluster="inline")
    with pytest.raises(ModelError, match="Model 'autoencoder' needs feature columns"):
        modelfactory.train(data, by=["app", "site"], time="ts", target="value", model="autoencoder",
                           params={"input": "features"}, store=str(tmp_path / "s3"), cluster="inline")
    assert not (tmp_path / "s2").exists() or not list((tmp_path / "s2").rglob("manifest.json"))


def test_too_long_season_skips_every_group_with_the_reason(data, tmp_path):
    run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", model="holt_winters",
                             params={"season_length": 24 * 30}, store=str(tmp_path / "s"), cluster="inline")
    groups = run.groups
    assert (groups.status == "skipped").all()
    assert groups.error.str.contains("holt_winters needs at least 1440 non-missing values").all()


def test_short_groups_are_skipped_with_the_reason(data, tmp_path):
    run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", model="holt_winters",
                             params={"season_length": 24, "min_seasons": 8}, store=str(tmp_path / "s"),
                             cluster="inline")
    g = run.groups
    assert (g.status == "skipped").all()
    assert g.error.str.contains("needs at least 192 non-missing values").all()


@pytest.mark.parametrize("model", ["seasonal", "holt_winters"])
def test_a_group_whose_times_cannot_be_used_fails_alone_not_with_its_batch(model, tmp_path):
    import pandas as pd

    table = demo.make_table(4, days=DAYS).to_pandas()
    sites = sorted(table["site"].unique())
    table.loc[table.index[table.site == sites[1]][5:9], "ts"] = pd.NaT  # 4 missing times
    repeated = table[table.site == sites[2]].copy()  # the same series twice: a key missing from by
    table = pd.concat([table, repeated.assign(value=repeated["value"] + 1)], ignore_index=True)
    path = tmp_path / "data.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
    run = modelfactory.train(str(path), by=["app", "site"], time="ts", target="value", model=model,
                             store=str(tmp_path / "store"), cluster="inline", unit_rows=10**6)
    assert run.summary["units"] == 1  # every group in one batch
    g = run.groups.set_index("site")
    assert g.loc[sites[1], "status"] == "failed"
    assert g.loc[sites[1], "error"].startswith("the time column 'ts' has 4 missing value(s) in this group: fill them, or "
                                               "leave those rows out (filter=\"ts is not null\", CLI: --where \"ts is "
                                               "not null\")")
    assert g.loc[sites[2], "status"] == "failed"
    assert f"row(s) repeat a timestamp of this group, and {model!r} models one value per time" \
        in g.loc[sites[2], "error"]
    assert (g.drop(index=[sites[1], sites[2]])["status"] == "ok").all()


@pytest.mark.parametrize("model,params,unit,expect", [
    ("autoencoder", {"min_values": 24, "window": 12}, "s", "repeat a timestamp of this group, and 'autoencoder'"),
    ("holt_winters", {}, "ms", "repeat a timestamp of this group to the second (models see whole seconds)"),
])
def test_repeated_times_fail_the_group_for_every_model_of_a_series_in_time(model, params, unit, expect, tmp_path):
    """autoencoder (input="window") models one value per time too, but a group with repeated
    timestamps trained ok: the check asked the class (needs_time is False: it depends on the
    input) and one of each pair was silently dropped.  Millisecond times 500 ms apart passed
    the check, and the models, which see whole seconds, silently kept one row per second."""
    import pandas as pd
    import pyarrow.parquet as pq

    table = demo.make_table(2, days=DAYS).to_pandas()
    sites = sorted(table["site"].unique())
    bad = table[table.site == sites[0]]
    if unit == "s":
        table = pd.concat([table, bad.iloc[10:13]], ignore_index=True)
    else:  # a second row half a second after three of the rows
        table = pd.concat([table, bad.iloc[10:13].assign(ts=bad.ts.iloc[10:13] + pd.Timedelta("500ms"))],
                          ignore_index=True)
    path = tmp_path / "data.parquet"
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.set_column(arrow.schema.get_field_index("ts"), "ts", arrow["ts"].cast(pa.timestamp(unit, "UTC")))
    pq.write_table(arrow, path)
    run = modelfactory.train(str(path), by=["app", "site"], time="ts", target="value", model=model, params=params,
                             store=str(tmp_path / "store"), cluster="inline")
    g = run.groups.set_index("site")
    assert g.loc[sites[0], "status"] == "failed"
    assert g.loc[sites[0], "error"].startswith("3 row(s) " + expect.split(" ", 1)[0])
    assert expect in g.loc[sites[0], "error"]
    assert g.loc[sites[1], "status"] == "ok"


def test_a_group_scored_with_missing_times_fails_alone(data, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    store = str(tmp_path / "store")
    modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    table = ds.dataset(data, partitioning="hive").to_table().to_pandas()
    table["app"] = table["app"].astype(str)
    site = sorted(table["site"].unique())[1]
    table.loc[table.index[table.site == site][3:5], "ts"] = pd.NaT
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp_path / "new.parquet")
    run = modelfactory.score(str(tmp_path / "new.parquet"), store=store, out=str(tmp_path / "scores"),
                             cluster="inline")
    g = run.groups.set_index("site")
    assert g.loc[site, "status"] == "failed"
    assert "the time column 'ts' has 2 missing value(s) in this group" in g.loc[site, "error"]
    assert (g.drop(index=site)["status"] == "ok").all()
    assert site not in set(run.to_pandas()["site"])


def test_a_group_carried_over_by_a_retrain_is_not_failed_for_its_new_times(data, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    store = str(tmp_path / "store")
    base = modelfactory.train(data, by=["app", "site"], time="ts", target="value", store=store, cluster="inline")
    table = ds.dataset(data, partitioning="hive").to_table().to_pandas()
    table["app"] = table["app"].astype(str)
    site = min(table["site"].unique())
    table.loc[table.index[table.site == site][3], "ts"] = pd.NaT
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp_path / "new.parquet")
    run = modelfactory.train(str(tmp_path / "new.parquet"), by=["app", "site"], time="ts", target="value",
                             store=store, cluster="inline", retrain="failed")
    assert run.summary["counts"] == {"ok": SERIES, "failed": 0, "skipped": 0}
    st = modelfactory.ModelStore(store)
    assert st.manifest(run.id)["lineage"]["carried_over"] == {base.id: SERIES}  # all carried, none refitted
    assert st.load({"app": table.loc[table.site == site, "app"].iloc[0], "site": site}).is_fitted


def test_a_model_registered_by_name_is_stored_so_a_process_without_the_registration_loads_it(data, tmp_path):
    from modelfactory.models import _USER, register_model
    from modelfactory.models.seasonal import SeasonalProfile

    class Registered(SeasonalProfile):
        pass

    register_model("registered_for_e2e", Registered)
    try:
        store = str(tmp_path / "s")
        run = modelfactory.train(data, by=["app", "site"], time="ts", target="value", model="registered_for_e2e",
                                 store=store, cluster="inline")
        assert run.summary["counts"]["ok"] == SERIES
        key = run.groups.iloc[0][["app", "site"]].to_dict()
    finally:
        _USER.pop("registered_for_e2e")  # as in a later process, or a worker, that never registered it
    st = modelfactory.ModelStore(store)
    assert st.manifest()["spec"]["serializer"] == "pickle"
    assert type(st.load(key, trust=True)).__name__ == "Registered"
    scored = modelfactory.score(data, store=store, out=str(tmp_path / "o"), cluster="inline", trust=True)
    assert scored.summary["counts"]["ok"] == SERIES


def _local_cycle(start: str, hours: int):
    """Hourly traffic whose daily cycle follows Berlin's wall clock, noise 1, amplitude 30."""
    import pandas as pd

    ts = pd.date_range(start, periods=hours, freq="h", tz="Europe/Berlin")
    rng = np.random.default_rng(0)
    value = 100 + 30 * np.sin(2 * np.pi * ts.hour.to_numpy() / 24) + rng.normal(0, 1, hours)
    return pa.table({"app": ["web"] * hours, "ts": pa.array(ts, pa.timestamp("us", tz="Europe/Berlin")),
                     "value": value})


def test_seasonal_tz_keeps_a_local_daily_cycle_in_its_slots_across_dst(tmp_path):
    """Traffic that follows local time, trained the two weeks before the spring clock change and
    scored the two days after it: with slots in UTC, seasonal flagged about 30 of 48 ordinary hours
    (every hour sat one slot off); with tz='Europe/Berlin' the slots follow the wall clock."""
    import pyarrow.parquet as pq

    for name, table in (("train", _local_cycle("2024-03-17", 14 * 24)),
                        ("new", _local_cycle("2024-03-31", 48))):
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "part.parquet")
    flagged = {}
    for tz in (None, "Europe/Berlin"):
        store = str(tmp_path / f"store-{tz is None}")
        run = modelfactory.train(str(tmp_path / "train"), by=["app"], time="ts", target="value",
                                 model="seasonal", params={"tz": tz}, store=store, cluster="inline")
        assert run.summary["counts"]["ok"] == 1, run.groups
        scores = modelfactory.score(str(tmp_path / "new"), store=store, out=store + "-scores",
                                    cluster="inline").to_pandas()
        assert len(scores) == 48
        flagged[tz] = int(scores["is_anomaly"].sum())
    assert flagged[None] >= 20 and flagged["Europe/Berlin"] <= 1, flagged


def test_seasonal_tz_must_be_a_zone_name(tmp_path):
    with pytest.raises(ModelError, match="IANA time zone name such as 'Europe/Berlin'.*'Europe/Berln'"):
        modelfactory.train(str(tmp_path), by=["app"], time="ts", target="value", model="seasonal",
                           params={"tz": "Europe/Berln"}, store=str(tmp_path / "s"), cluster="inline")
