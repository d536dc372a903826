"""Bad or uneven input data: files whose schemas differ, keys both in folders and files,
null keys without statistics, a key named twice, and paths that cannot be opened.

Each is refused up front with a clear error (nothing written to the store), or read
the one well-defined way (safe type widening, missing columns as null)."""
from __future__ import annotations

import importlib.util
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from _data import metrics_table

import modelfactory
from modelfactory.cli import main
from modelfactory.dataset import check_columns, discover, read_files
from modelfactory.exceptions import (
    DatasetError,
    ModelFactoryError,
    SchemaError,
    StoreError,
)

ARGS = {"by": ["app", "site"], "time": "ts", "target": "value"}


def _site(site: str, hours: int = 72) -> pa.Table:
    """One (app, site) series of 72 hourly rows, written with pyarrow (string keys)."""
    t = metrics_table(series=1, hours=hours, apps=1).drop_columns(["day"])
    return t.set_column(t.schema.get_field_index("site"), "site", pa.array([site] * t.num_rows))


def _with(t: pa.Table, name: str, arr) -> pa.Table:
    arr = arr if isinstance(arr, (pa.Array, pa.ChunkedArray)) else pa.array(arr)
    i = t.schema.get_field_index(name)
    return t.set_column(i, name, arr) if i >= 0 else t.append_column(name, arr)


def _files(folder, *tables, **kw) -> str:
    folder.mkdir(parents=True)
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i}.parquet", **kw)
    return str(folder)


def _refused(tmp_path, data, exc, match, **kw):
    store = tmp_path / "refused-store"
    with pytest.raises(exc, match=match):
        modelfactory.train(data, store=str(store), cluster="inline", **{**ARGS, **kw})
    assert not store.exists()


# ---------------------------------------------------------------------------
# 1. files whose schemas differ: unified from all the footers, not the first file's
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["narrow-first", "wide-first"])
@pytest.mark.parametrize("column, narrow, wide", [
    ("value", lambda a: a.cast(pa.int64()), pa.float64()),
    ("value", lambda a: pa.nulls(len(a), pa.null()), pa.float64()),  # an all-null target: type null
    ("value", lambda a: a.cast(pa.int64()).cast(pa.int32()), pa.float64()),
    ("ts", lambda a: a.cast(pa.timestamp("us", tz="UTC")), pa.timestamp("us", tz="UTC")),  # the others: ms
])
def test_types_that_widen_safely_are_unified_in_any_file_order(tmp_path, order, column, narrow, wide):
    a, b = _site("s1"), _site("s2")
    if column == "value":
        a = _with(a, "value", pa.array([float(i) for i in range(a.num_rows)]))  # whole numbers: cast exactly
    a = _with(a, column, narrow(a[column].combine_chunks()))
    tables = (a, b) if order == "narrow-first" else (b, a)
    path = _files(tmp_path / "d", *tables)
    info = discover(path)
    got = info.schema.field(column).type
    assert got == wide, got
    assert not info.conflicts
    for f in info.files:  # each file reads, cast to the one schema
        t = read_files(info.source, (f.path,), ["site", column])
        assert t.schema.field(column).type == got and t.num_rows == 72
    run = modelfactory.train(path, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["rows"] == 144 and run.summary["counts"]["failed"] == 0
    assert not modelfactory.ModelStore(str(tmp_path / "s")).pending()


@pytest.mark.parametrize("order", [0, 1])
def test_key_types_that_conflict_are_refused_naming_both_types_and_files(tmp_path, order):
    a = _with(_site("s1"), "site", pa.array([1] * 72))
    tables = (a, _site("s2")) if order == 0 else (_site("s2"), a)
    path = _files(tmp_path / "d", *tables)
    ia, ib = (0, 1) if order == 0 else (1, 0)
    first, second = ("int64", "string") if order == 0 else ("string", "int64")
    _refused(tmp_path, path, SchemaError,
             rf"key column 'site' has conflicting types in the files of '.*': {first} in '.*part-{min(ia, ib)}"
             rf"\.parquet' but {second} in '.*part-{max(ia, ib)}\.parquet'.*Rewrite the files")


def test_a_key_int_in_one_file_and_float_in_another_names_both_files(tmp_path):
    # int64 and double widen safely to double, which a key must not be: saying just "the key column
    # 'site' is double" sent the user looking for a float in files that mostly hold integers
    a, b = _with(_site("s1"), "site", pa.array([1] * 72)), _with(_site("s2"), "site", pa.array([2.0] * 72))
    path = _files(tmp_path / "d", a, b)
    _refused(tmp_path, path, SchemaError,
             r"key column 'site' has different types in the files of '.*' \(int64 in '.*part-0\.parquet', double "
             r"in '.*part-1\.parquet', e\.g\.\), which read together as double, and floating-point keys are refused")
    path = _files(tmp_path / "all-float", _with(_site("s1"), "site", pa.array([1.0] * 72)), b)
    _refused(tmp_path, path, SchemaError, r"The key column 'site' is double; floating-point keys are refused")


def test_a_target_int_in_one_file_and_string_in_another_is_refused(tmp_path):
    a = _with(_site("s1"), "value", pa.array(["x"] * 72))
    path = _files(tmp_path / "d", _site("s2"), a)
    _refused(tmp_path, path, SchemaError, r"target column 'value' has conflicting types .*: double in .* but string in")


def test_naive_and_zoned_timestamps_conflict(tmp_path):
    a = _site("s1")
    a = _with(a, "ts", a["ts"].cast(pa.timestamp("s")))
    path = _files(tmp_path / "d", a, _site("s2"))
    _refused(tmp_path, path, SchemaError, r"time column 'ts' has conflicting types .*timestamp\[ms\] in .*part-0.parquet' "
             r"but timestamp\[ms, tz=UTC\] in .*part-1.parquet': times with a time zone and without one.*tz_localize")


@pytest.mark.parametrize("names", [("UTC", "+00:00"), ("+00:00", "Etc/UTC"), ("Etc/UTC", "UTC")])
def test_utc_under_two_names_is_one_zone(tmp_path, names):
    """pyarrow writes datetime.timezone.utc as "+00:00", pandas, Polars and Spark's readers say "UTC": files
    of both were refused as "conflicting types ... neither converts safely to the other"."""
    a, b = _site("s1"), _site("s2")
    a = _with(a, "ts", a["ts"].cast(pa.timestamp("ms", tz=names[0])))
    b = _with(b, "ts", b["ts"].cast(pa.timestamp("us", tz=names[1])))
    path = _files(tmp_path / "d", a, b)
    info = discover(path)
    assert not info.conflicts and info.schema.field("ts").type == pa.timestamp("us", tz=names[0])
    run = modelfactory.train(path, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    scored = modelfactory.score(path, store=str(tmp_path / "s"), out=str(tmp_path / "o"), cluster="inline")
    assert scored.summary["counts"]["ok"] == 2
    got = pa.concat_tables(pq.read_table(f) for f in sorted((tmp_path / "o").glob("part-*.parquet"))).sort_by([("site", "ascending"), ("ts", "ascending")])
    want = [t["ts"].cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist() for t in (a, b)]  # sorted by site
    assert got["ts"].cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist() == want[0] + want[1]


def test_a_year_2300_beside_nanoseconds_in_another_name_of_utc_is_refused_before_anything_runs(tmp_path):
    """Microseconds tz=UTC holding 2300-01-01 beside nanoseconds tz=+00:00: the unified nanosecond
    type cannot hold it; the check looked for a file of exactly the unified type, found none, and the
    cast failed mid-run ("a work unit failed outside any group")."""
    import datetime as dt

    far = pa.table({"app": ["x"] * 3, "ts": pa.array([dt.datetime(2300, 1, 1, h) for h in range(3)],
                                                      pa.timestamp("us", tz="UTC")), "value": [1.0, 2, 3]})
    near = pa.table({"app": ["y"] * 3, "ts": pa.array([1, 2, 3], pa.timestamp("ns", tz="+00:00")), "value": [1.0, 2, 3]})
    pq.write_table(far, tmp_path / "a.parquet")
    pq.write_table(near, tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match=rf"time column 'ts' has conflicting types .*: timestamp\[us, tz=UTC\] in "
                                          rf"'{tmp_path / 'a.parquet'}' but timestamp\[ns, tz=\+00:00\] in "
                                          rf"'{tmp_path / 'b.parquet'}'"):
        modelfactory.apply(str(tmp_path), by="app", func=lambda df: df.head(1), schema="app string, value double",
                           time="ts", cluster="inline")


def test_two_different_zones_still_conflict(tmp_path):
    a, b = _site("s1"), _site("s2")
    a = _with(a, "ts", a["ts"].cast(pa.timestamp("ms", tz="Europe/Paris")))
    path = _files(tmp_path / "d", a, b)
    _refused(tmp_path, path, SchemaError, r"time column 'ts' has conflicting types .*Europe/Paris.*: two time zones\. "
             r"Both convert exactly, .* write the times of every file in the same zone \(pandas: ts\.dt\.tz_convert")


@pytest.mark.parametrize("typ", [pa.binary(), pa.large_binary(), pa.list_(pa.string())])
def test_keys_of_bytes_or_lists_are_refused_up_front(tmp_path, typ):
    # bytes keys trained and scored, then `report` and `plot` ended in an internal UnicodeDecodeError
    a = _site("s1")
    a = _with(a, "site", pa.array([[v] for v in a["site"].to_pylist()]) if pa.types.is_list(typ)
              else a["site"].cast(typ))
    path = _files(tmp_path / "d", a)
    what = r"\(bytes\): keys are shown, typed and matched as text" if not pa.types.is_list(typ) else "one value per row"
    _refused(tmp_path, path, SchemaError, rf"The key column 'site' is .*{what}")


def test_a_conflict_in_a_column_the_job_does_not_use_is_ignored(tmp_path):
    a = _with(_site("s1"), "x1", pa.array(["text"] * 72))
    path = _files(tmp_path / "d", a, _site("s2"))
    run = modelfactory.train(path, store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["counts"]["ok"] == 2
    with pytest.raises(SchemaError, match="requested column 'x1' has conflicting types"):  # apply reads all
        modelfactory.apply(path, by=["site"], func=lambda d: d[["site"]].head(1), schema="site string",
                           cluster="inline")


def test_a_column_missing_from_some_files_reads_as_null(tmp_path, caplog):
    """The choice (as Spark's mergeSchema): the column is in the dataset, null in the files without it."""
    path = _files(tmp_path / "d", _site("s1").drop_columns(["x1"]), _site("s2"))
    info = discover(path)
    assert "x1" in info.schema.names and info.missing["x1"][0] == 1 and info.missing["x1"][1].endswith("part-0.parquet")
    with caplog.at_level(logging.WARNING, logger="modelfactory.dataset"):
        check_columns(info, by=("app", "site"), time="ts", target="value", features=("x1",))
    assert "feature column 'x1' is missing from 1 of the 2 files" in caplog.text
    t = read_files(info.source, tuple(f.path for f in info.files), ["site", "x1"])
    nulls = pc.is_null(t["x1"]).to_pylist()
    assert [s for s, n in zip(t["site"].to_pylist(), nulls) if n] == ["s1"] * 72 and nulls.count(False) == 72
    run = modelfactory.train(path, store=str(tmp_path / "s"), model="isolation_forest", features=["x1"],
                             cluster="inline", **ARGS)
    assert run.summary["counts"]["failed"] == 0


def test_a_key_missing_from_some_files_is_refused(tmp_path):
    path = _files(tmp_path / "d", _site("s1").drop_columns(["app"]), _site("s2"))
    _refused(tmp_path, path, SchemaError, r"key column 'app' is missing from 1 of the 2 files of .*part-0\.parquet")


# ---------------------------------------------------------------------------
# 2. a key both as a partition folder and inside the files
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("values, typ", [(["a", "b"], pa.large_string()), (["1", "2"], pa.string()),
                                         (["1", "2"], pa.int64()), (["a", "b"], pa.string())])
def test_a_key_both_in_folders_and_files_is_refused(tmp_path, values, typ):
    for v in values:
        (tmp_path / "d" / f"app={v}").mkdir(parents=True)
        col = pa.array([int(v)] * 72, typ) if typ == pa.int64() else pa.array([v] * 72, typ)
        pq.write_table(_with(_site("s1"), "app", col), tmp_path / "d" / f"app={v}" / "part-0.parquet")
    _refused(tmp_path, str(tmp_path / "d"), SchemaError,
             r"Columns \['app'\] appear both as partition folders and inside the files under .*app=.*part-0\.parquet"
             r".*Drop the column from the files")


@pytest.mark.parametrize("root", ["d", "zapp=x/d"])  # "zapp=x" holds "app=", and is no app= folder
def test_a_file_beside_the_key_folders_is_told_to_move_into_one(tmp_path, root):
    # the advice was to drop its 'app' column, which would leave its rows without a key
    (tmp_path / root / "app=a").mkdir(parents=True)
    pq.write_table(_site("s1").drop_columns(["app"]), tmp_path / root / "app=a" / "part-0.parquet")
    pq.write_table(_site("s2"), tmp_path / root / "loose.parquet")  # its app is a column
    _refused(tmp_path, str(tmp_path / root), SchemaError,
             r"'.*/d/loose\.parquet' is not inside any app=… folder, while other files under .* are \(its 'app' is a "
             r"column of the file\): one dataset has one layout\. Move it into the app=<value>/ folder of its rows")


# ---------------------------------------------------------------------------
# 3. null keys in files written without statistics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("stats", [False, ["app", "value"]], ids=["no-statistics", "no-site-statistics"])
def test_null_keys_without_statistics_are_still_refused(tmp_path, stats):
    t = pa.concat_tables([_site("s1"), _site("s2"), _with(_site("x"), "site", pa.nulls(72, pa.string()))])
    path = _files(tmp_path / "d", t, write_statistics=stats, row_group_size=100)
    assert pq.ParquetFile(f"{path}/part-0.parquet").metadata.row_group(0).column(1).statistics is None
    _refused(tmp_path, path, SchemaError, r"has 72 null value\(s\) in 'site'. Group keys must not be null")
    with pytest.raises(SchemaError, match=r"72 null value\(s\) in 'site'"):
        modelfactory.apply(path, by=["site"], func=lambda d: d[["site"]].head(1), schema="site string",
                           cluster="inline")


# ---------------------------------------------------------------------------
# 4. a column named twice
# ---------------------------------------------------------------------------
def test_a_key_named_twice_is_refused_up_front(tmp_path):
    path = _files(tmp_path / "d", _site("s1"))
    _refused(tmp_path, path, ModelFactoryError, r"by names 'app' more than once \(app, app, site\)",
             by=["app", "app", "site"])
    _refused(tmp_path, path, ModelFactoryError, r"by names 'site' more than once", by="site,app,site")
    _refused(tmp_path, path, ModelFactoryError, r"features names 'x1' more than once", model="isolation_forest",
             features=["x1", "x1"])
    with pytest.raises(ModelFactoryError, match="by names 'site' more than once"):
        modelfactory.apply(path, by=["site", "site"], func=lambda d: d[["site"]].head(1), schema="site string",
                           cluster="inline")


# ---------------------------------------------------------------------------
# 5. paths that cannot be opened: one error line, exit 2, nothing written
# ---------------------------------------------------------------------------
def _cli(tmp_path, capsys, data, store):
    code = main(["train", data, "--by", "app,site", "--time", "ts", "--target", "value", "--store", store,
                 "--scheduler", "inline", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_an_unknown_protocol_is_a_clear_error(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "s4://bucket/data", str(tmp_path / "s"))
    assert "Unknown storage protocol 's4://' in 's4://bucket/data'" in err and "typo" in err
    assert not (tmp_path / "s").exists()
    path = _files(tmp_path / "d", _site("s1"))
    err = _cli(tmp_path, capsys, path, "s4://bucket/store")
    assert "Unknown storage protocol 's4://' in 's4://bucket/store'" in err
    with pytest.raises(DatasetError, match="Unknown storage protocol"):
        discover("s4://bucket/data")
    with pytest.raises(StoreError, match="Unknown storage protocol"):
        modelfactory.ModelStore("s4://bucket/store").runs()


def test_a_protocol_whose_package_is_missing_names_the_package(tmp_path, capsys, monkeypatch):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "mfnope",
                        {"class": "mf_no_such_package.FS", "err": "Please install mf_no_such_package"})
    err = _cli(tmp_path, capsys, "mfnope://bucket/data", str(tmp_path / "s"))
    assert "'mfnope://bucket/data' needs the package 'mf_no_such_package', which is not installed" in err
    assert "pip install mf_no_such_package" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_gs_without_gcsfs(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "gs://bucket/data", str(tmp_path / "s"))
    assert "'gs://bucket/data' needs the package 'gcsfs'" in err and "pip install gcsfs" in err


@pytest.mark.parametrize("where", ["store", "parent"])
def test_a_store_that_is_a_file_is_a_clear_error(tmp_path, capsys, where):
    path = _files(tmp_path / "d", _site("s1"))
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    store = blocker if where == "store" else blocker / "store"
    err = _cli(tmp_path, capsys, path, str(store))
    assert f"'{blocker}' is a file, not a folder. Pick a folder" in err
    assert blocker.read_text() == "keep me"
    with pytest.raises(StoreError, match="is a file, not a folder"):
        modelfactory.train(path, store=str(store), cluster="inline", **ARGS)


def test_pandas_written_files_mixing_int_and_float_values_train(tmp_path):
    """The reviewer's case as pandas 3 writes it (large_string keys, pandas metadata)."""
    rng = pd.date_range("2026-01-05", periods=72, freq="h", tz="UTC")
    a = pd.DataFrame({"app": "a", "site": "s1", "ts": rng, "value": range(72)})
    b = pd.DataFrame({"app": "a", "site": "s2", "ts": rng, "value": [100.5] * 72})
    (tmp_path / "d").mkdir()
    a.to_parquet(tmp_path / "d" / "part-0.parquet", index=False)
    b.to_parquet(tmp_path / "d" / "part-1.parquet", index=False)
    run = modelfactory.train(str(tmp_path / "d"), store=str(tmp_path / "s"), cluster="inline", **ARGS)
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}


def test_a_filter_on_a_column_only_some_files_have(tmp_path):
    """The filter is bound to the columns of all the files, not the first one's."""
    import pyarrow.dataset as ds

    path = _files(tmp_path / "d", _site("s1").drop_columns(["x1"]), _site("s2"))
    info = discover(path, filter=ds.field("x1") > -100)
    assert len(info.files) == 2 and info.missing["x1"][0] == 1
    run = modelfactory.apply(path, by=["site"], func=lambda d: d[["site"]].head(1), schema="site string",
                             filter=ds.field("x1") > -100, cluster="inline")
    assert run.to_pandas().site.tolist() == ["s2"]
    with pytest.raises(SchemaError, match=r"The filter \(nope == 1\) does not fit the dataset at .*Columns: app, "):
        discover(path, filter=ds.field("nope") == 1)


def test_timestamps_a_nanosecond_column_cannot_hold_are_refused_before_anything_runs(tmp_path):
    """One file in microseconds with a year-2300 value, another in nanoseconds: the unified
    nanosecond type cannot hold it, and the cast used to fail mid-run."""
    import datetime as dt

    import pyarrow.parquet as pq

    import modelfactory
    from modelfactory.exceptions import SchemaError

    far = pa.table({"app": ["x"] * 3, "ts": pa.array([dt.datetime(2300, 1, 1, h) for h in range(3)], pa.timestamp("us")),
                    "value": [1.0, 2, 3]})
    near = pa.table({"app": ["y"] * 3, "ts": pa.array([1, 2, 3], pa.timestamp("ns")), "value": [1.0, 2, 3]})
    pq.write_table(far, tmp_path / "a.parquet")
    pq.write_table(near, tmp_path / "b.parquet")
    with pytest.raises(SchemaError, match=rf"The time column 'ts' has conflicting types .*: timestamp\[us\] in "
                                          rf"'{tmp_path / 'a.parquet'}' but timestamp\[ns\] in '{tmp_path / 'b.parquet'}'"):
        modelfactory.apply(str(tmp_path), by="app", func=lambda df: df.head(1), schema="app string, value double",
                           time="ts", cluster="inline")
    # within the range, units still widen
    pq.write_table(far.set_column(1, "ts", pa.array([dt.datetime(2200, 1, 1, h) for h in range(3)], pa.timestamp("us"))),
                   tmp_path / "a.parquet")
    run = modelfactory.apply(str(tmp_path), by="app", func=lambda df: df[["app", "value"]].head(1),
                             schema="app string, value double", time="ts", cluster="inline")
    assert run.summary["counts"]["ok"] == 2


def test_timestamps_beyond_year_9999_in_a_coarse_unit_do_not_break_discovery(tmp_path):
    """Footer statistics past year 9999 cannot become Python datetimes: the check must not crash."""
    import pyarrow.parquet as pq

    from modelfactory.dataset import discover

    pq.write_table(pa.table({"app": ["a", "b"], "ts": pa.array([0, 20000 * 365 * 86400 * 1000], pa.timestamp("ms")),
                             "value": [1.0, 2.0]}), tmp_path / "a.parquet")
    assert discover(str(tmp_path)).schema.field("ts").type == pa.timestamp("ms")


def test_a_pandas_index_stored_in_the_files_stays_a_column_on_the_shuffle_path(tmp_path):
    import modelfactory

    for d in range(2):
        (tmp_path / f"day={d}").mkdir()
        df = pd.DataFrame({"app": [f"a{k % 2}" for k in range(4)], "value": [1.0, 2, 3, 4]},
                          index=pd.Index([f"r{d}{k}" for k in range(4)], name="row"))
        df.to_parquet(tmp_path / f"day={d}" / "p.parquet")  # the index is stored as the column "row"
    got = {}
    for unit_rows in (None, 2):
        run = modelfactory.apply(str(tmp_path), by="app", func=lambda g: g[["app"]].head(1).assign(n=len(g)),
                                 schema="app string, n bigint", cluster="inline", unit_rows=unit_rows)
        assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}, run.groups
        got[run.summary["mode"]] = run.to_pandas().sort_values("app").reset_index(drop=True)
    assert set(got) == {"files", "shuffle"}
    pd.testing.assert_frame_equal(got["files"], got["shuffle"])


def test_a_csv_file_is_told_to_become_parquet_not_to_leave_its_folder(tmp_path, capsys):
    """A first-time user's commonest mistake, `train metrics.csv ...`, was told to "Move files that
    are not Parquet out of the folder (or start their names with '_' or '.')": there is no folder."""
    t = _site("eu-1")
    t.to_pandas().to_csv(tmp_path / "metrics.csv", index=False)
    assert main(["train", str(tmp_path / "metrics.csv"), "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "store"), "--scheduler", "inline", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: Cannot open the Parquet dataset at '{tmp_path / 'metrics.csv'}'")
    assert "modelfactory reads Parquet only: write the data as Parquet first (a CSV file: " in err[0]
    assert "out of the folder" not in err[0] and not (tmp_path / "store").exists()
    # a stray CSV file in a folder of Parquet files is still told to move out of the folder
    (tmp_path / "data").mkdir()
    pq.write_table(t, tmp_path / "data" / "part-0.parquet")
    (tmp_path / "data" / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"Move files that are not Parquet out of the folder"):
        discover(str(tmp_path / "data"))


def test_an_empty_parquet_file_is_named_as_empty_not_as_a_file_of_another_format(tmp_path, capsys):
    """A part-1.parquet of 0 bytes (just created by its writer) was told "Move files that are not
    Parquet out of the folder", and alone "write the data as Parquet first (a CSV file: ...)"."""
    (tmp_path / "folder").mkdir()
    pq.write_table(_site("eu-1"), tmp_path / "folder" / "part-0.parquet")
    (tmp_path / "folder" / "part-1.parquet").write_bytes(b"")
    (tmp_path / "alone.parquet").write_bytes(b"")
    for data in ("folder", "alone.parquet"):
        assert main(["train", str(tmp_path / data), "--by", "app,site", "--time", "ts", "--target", "value",
                     "--store", str(tmp_path / "store"), "--scheduler", "inline", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "It is empty (0 bytes): a file still being written" in err[0], err
        assert "part-1.parquet" in err[0] or data == "alone.parquet"
        assert "not Parquet" not in err[0] and "as Parquet first" not in err[0]
    assert not (tmp_path / "store").exists()


def test_a_parquet_file_cut_short_is_named_as_one_not_as_a_file_of_another_format(tmp_path, capsys):
    """A data.parquet whose upload stopped halfway was told "modelfactory reads Parquet only: write
    the data as Parquet first (a CSV file: ...)", and in a folder to move it out as not Parquet."""
    t = _site("eu-1")
    pq.write_table(t, tmp_path / "whole.parquet")
    cut = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "data.parquet").write_bytes(cut[: len(cut) // 2])
    assert main(["train", str(tmp_path / "data.parquet"), "--by", "app,site", "--time", "ts", "--target", "value",
                 "--store", str(tmp_path / "store"), "--scheduler", "inline", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "begins as a Parquet file but its end (the footer) is missing" in err[0]
    assert "write the data as Parquet first" not in err[0] and not (tmp_path / "store").exists()
    (tmp_path / "folder").mkdir()
    pq.write_table(t, tmp_path / "folder" / "part-0.parquet")
    (tmp_path / "folder" / "part-1.parquet").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(DatasetError, match=r"part-1.parquet.*begins as a Parquet file but its end"):
        discover(str(tmp_path / "folder"))


def test_the_timestamp_range_check_reads_the_stored_integers_as_the_datetimes_said(tmp_path, monkeypatch):
    """`_beyond_ns` reads a coarse timestamp column's footer statistics as the integers stored, in
    the file's own unit (a stored Arrow schema may give another type); it must flag exactly the
    files the slower reading through datetimes flagged."""
    import datetime as dt

    from modelfactory import dataset

    us = [dt.datetime(y, 1, 1) for y in (1677, 1678, 2262, 2263, 2300)]
    tables = {f"{unit}-{y.year}": pa.table({"ts": pa.array([dt.datetime(2000, 1, 1), y], pa.timestamp(unit))})
              for unit in ("s", "ms", "us") for y in us}
    tables["ns"] = pa.table({"ts": pa.array([1, 2], pa.timestamp("ns"))})
    flagged = {}
    for raw in (True, False):
        if not raw:
            monkeypatch.setattr(dataset, "_raw_ns", lambda column: None)
        got = set()
        for name, t in tables.items():
            pq.write_table(t, tmp_path / f"{name}.parquet")
            f = pq.ParquetFile(tmp_path / f"{name}.parquet")
            if dataset._beyond_ns(f.metadata, f.schema_arrow):
                got.add(name)
        flagged[raw] = got
    assert flagged[True] == flagged[False] == {f"{u}-{y}" for u in ("s", "ms", "us") for y in (1677, 2263, 2300)}


def test_footers_read_slowly_are_read_by_threads_with_the_same_outcome(tmp_path, monkeypatch):
    """Local footers are read in the caller's thread while they come fast; once they come slowly
    (a network mount) the rest go to a pool of threads: the same files, in the same order."""
    from modelfactory import dataset

    for i in range(12):
        (tmp_path / f"app=a{i:02d}").mkdir()
        pq.write_table(pa.table({"ts": pa.array([i, i + 1], pa.timestamp("ms")), "value": [1.0, 2.0 + i]}),
                       tmp_path / f"app=a{i:02d}" / "p.parquet")
    pools = []

    class Counted(dataset.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dataset, "ThreadPoolExecutor", Counted)
    fast = dataset.discover(str(tmp_path))
    assert pools == []
    monkeypatch.setattr(dataset, "_FAST_FOOTER", 0.0)  # every footer is "slow": the pool takes over after 4
    slow = dataset.discover(str(tmp_path))
    assert len(pools) == 1
    assert slow.files == fast.files and len(fast.files) == 12 and slow.schema == fast.schema


def test_a_listing_that_fails_for_the_files_versions_is_an_error_not_another_fingerprint(tmp_path):
    # swallowed, the footers' sizes stood in for the files' (and no versions): the fingerprint of
    # unchanged input changed, and a resume started over or was refused
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelfactory.dataset import _stamps, discover

    pq.write_table(pa.table({"k": ["a"], "v": [1.0]}), tmp_path / "x.parquet")
    assert discover(str(tmp_path)).fingerprint() == discover(str(tmp_path)).fingerprint()  # unchanged: the same

    class Hangs:  # an fsspec filesystem whose listing fails (botocore's errors are not OSErrors)
        def find(self, path, detail=False):
            raise RuntimeError("the storage hung up")

    with pytest.raises(DatasetError, match=r"Cannot list the files under 'bucket/data' for their sizes and versions: "
                                           r"RuntimeError: the storage hung up\. Try again once the storage answers\."):
        _stamps(Hangs(), "bucket/data", ["bucket/data/x.parquet"], False)


def test_a_path_inside_a_key_folder_says_to_point_above_it_and_filter(tmp_path):
    """score data/app=app-00 said only that 'app' is not a column: its value is in the path."""
    from modelfactory.exceptions import SchemaError

    data = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=2, apps=2)
    with pytest.raises(SchemaError, match=r"The key column 'app' is not in the dataset at .*app=app-00'\. Columns: "
                                          r"site, ts, value\. The path is inside the partition folder app=app-00: point "
                                          r"at the dataset's own folder \(above the app= folders\) and select with "
                                          r"--where \"app = 'app-00'\""):
        modelfactory.train(f"{data}/app=app-00", by=["app", "site"], time="ts", target="value",
                           store=str(tmp_path / "s"), cluster="inline")
