"""Parquet datasets as other tools write them: the keys of every output are the keys that went in."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _data import metrics_table

import modelfactory
from modelfactory.exceptions import DatasetError, SchemaError

TRAIN = dict(time="ts", target="value", model="seasonal", cluster="inline")


def _as_view(table: pa.Table, names) -> pa.Table:
    """The columns ``names`` as string_view, the type Polars 1.38 stores in its Parquet files."""
    for n in names:
        i = table.schema.get_field_index(n)
        table = table.set_column(i, n, table.column(n).cast(pa.string_view()))
    return table


def test_string_view_columns_as_polars_writes_them_train_score_and_apply(tmp_path):
    t = metrics_table(series=4, apps=2)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(_as_view(t.slice(0, 144), ["app", "site", "day"]), data / "polars.parquet")
    pq.write_table(t.slice(144), data / "pyarrow.parquet")  # plain strings beside them
    assert pq.read_schema(data / "polars.parquet").field("site").type == pa.string_view()
    keys = sorted(set(zip(t.column("app").to_pylist(), t.column("site").to_pylist())))

    alone = modelfactory.train(str(data / "polars.parquet"), by=["app", "site"], store=str(tmp_path / "st1"), **TRAIN)
    assert sorted(zip(alone.groups.app, alone.groups.site)) == [("app0", "s000"), ("app1", "s001")] and set(alone.groups.status) == {"ok"}

    run = modelfactory.train(str(data), by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    assert run.summary["counts"] == {"ok": 4, "failed": 0, "skipped": 0}
    assert sorted(zip(run.groups.app, run.groups.site)) == keys
    stored = modelfactory.ModelStore(str(tmp_path / "store")).table()
    assert stored.schema.field("site").type == pa.string()

    scores = modelfactory.score(str(data), store=str(tmp_path / "store"), out=str(tmp_path / "scores"),
                                cluster="inline")
    assert sorted(zip(scores.groups.app, scores.groups.site)) == keys
    assert set(scores.groups.status) == {"ok"}

    def first_day(df):
        return pd.DataFrame({"site": [df.site.iloc[0]], "day": [df.day.min()], "n": [len(df)]})

    # a filter on a string_view column: pyarrow cannot compare its statistics with a string
    out = modelfactory.apply(str(data), by="site", func=first_day, schema="site string, day string, n int64",
                             filter=ds.field("day") != "2026-03-02", cluster="inline").to_pandas()
    assert sorted(out.site) == sorted(s for _, s in keys)
    assert set(out.day) == {"2026-03-03"} and set(out.n) == {48}


def test_paths_under_the_home_folder_are_expanded(tmp_path, monkeypatch):
    """``store="~/models"`` wrote a folder named ``~`` in the working directory (and ``data="~/data"``
    was "No file or folder at '<cwd>/~/data'"); pandas and fsspec expand the ``~``."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    modelfactory.demo.write_dataset(str(home / "data"), series=4, days=3)
    run = modelfactory.train("~/data", by=["app", "site"], store="~/models", **TRAIN)
    assert run.summary["counts"]["ok"] == 4
    scores = modelfactory.score("~/data/", store="~/models", out="~/scores", cluster="inline")
    assert scores.summary["counts"]["ok"] == 4
    assert (home / "models" / "LATEST").exists() and (home / "scores" / "_manifest.json").exists()
    assert list(work.iterdir()) == []
    assert modelfactory.ModelStore("~/models").latest() == run.id


def test_file_urls_as_pathlib_writes_them_are_decoded(tmp_path):
    """``Path.as_uri()`` percent-encodes: ``file:///…/my%20metrics`` was "No file or folder", and a
    store at such a URL was written under a folder literally named ``my%20models``."""
    base = tmp_path / "a b"
    modelfactory.demo.write_dataset(str(base / "my metrics"), series=4, days=3)
    run = modelfactory.train((base / "my metrics").as_uri(), by=["app", "site"],
                             store=(base / "my models").as_uri(), **TRAIN)
    assert run.summary["counts"]["ok"] == 4
    scores = modelfactory.score((base / "my metrics").as_uri(), store=(base / "my models").as_uri(),
                                out=(base / "my scores").as_uri(), cluster="inline")
    assert scores.summary["counts"]["ok"] == 4
    assert sorted(p.name for p in base.iterdir()) == ["my metrics", "my models", "my scores"]
    assert modelfactory.ModelStore(str(base / "my models")).latest() == run.id


def test_a_list_of_files_is_refused_with_what_to_do(tmp_path):
    """A list of files (as pandas and pyarrow take them) was a bare TypeError from os.fspath."""
    data = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=3)
    files = [str(p) for p in sorted((tmp_path / "data").rglob("*.parquet"))]
    with pytest.raises(DatasetError, match=r"The data must be one path or URL .*got list \['.*put them in one folder"):
        modelfactory.train(files, by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    with pytest.raises(DatasetError, match="got list"):
        modelfactory.apply(files, by="app", func=len, schema="n int64", cluster="inline")
    assert not (tmp_path / "store").exists() and data


@pytest.mark.parametrize("where, said", [("app=__HIVE_DEFAULT_PARTITION__", "in app=__HIVE_DEFAULT_PARTITION__ folders"),
                                         (".", "in no app=… folder")])
def test_null_partition_keys_name_their_files_and_a_filter_leaves_them_out(tmp_path, where, said):
    """Spark writes null (and empty) values to key=__HIVE_DEFAULT_PARTITION__ folders; a stray file
    beside the key folders has no key either.  The refusal said only "72 null value(s) in 'app'",
    and the filter it suggested did not help for a stray file (its rows were still counted)."""
    data = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=3)
    stray = tmp_path / "data" / where / "stray.parquet"
    stray.parent.mkdir(exist_ok=True)
    # the file's own columns: pyarrow 22 adds app from the file's app=... folder unless told not to
    t = pq.read_table(next((tmp_path / "data").glob("app=*/*.parquet")), partitioning=None)
    pq.write_table(t, stray)
    with pytest.raises(SchemaError, match=rf"{t.num_rows} null value\(s\) in 'app' \(1 file\(s\) {said}, "
                                          rf"e\.g\. '{stray}'\).*filter= \(e\.g\. ds\.field\('app'\)\.is_valid\(\); on the command line --where \"app is not null\"\)"):
        modelfactory.train(data, by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    run = modelfactory.train(data, by=["app", "site"], store=str(tmp_path / "store"),
                             filter=ds.field("app").is_valid(), **TRAIN)
    assert run.summary["counts"] == {"ok": 4, "failed": 0, "skipped": 0}


def test_null_keys_in_the_files_can_be_left_out_with_a_filter_as_the_refusal_says(tmp_path):
    """The footers count every null; a filter that leaves the null rows out was refused all the same."""
    t = metrics_table(series=4, apps=2)
    site = pc.if_else(pc.equal(t["site"], "s002"), pa.scalar(None, pa.string()), t["site"])
    (tmp_path / "data").mkdir()
    pq.write_table(t.set_column(t.schema.get_field_index("site"), "site", site), tmp_path / "data" / "p.parquet")
    with pytest.raises(SchemaError, match=r"72 null value\(s\) in 'site'\. .*ds\.field\('site'\)\.is_valid\(\)"):
        modelfactory.train(str(tmp_path / "data"), by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    for keep in (ds.field("site").is_valid(), ds.field("site") != "s002", ~ds.field("site").is_null()):
        run = modelfactory.train(str(tmp_path / "data"), by=["app", "site"], store=str(tmp_path / "store"),
                                 filter=keep, **TRAIN)
        assert sorted(run.groups.site) == ["s000", "s001", "s003"] and set(run.groups.status) == {"ok"}
    # a filter that keeps some of them is still refused, with the count it keeps
    with pytest.raises(SchemaError, match=r"24 null value\(s\) in 'site'"):
        modelfactory.train(str(tmp_path / "data"), by=["app", "site"], store=str(tmp_path / "store"),
                           filter=ds.field("ts") < pa.scalar(t["ts"][24].as_py(), t["ts"].type), **TRAIN)


@pytest.mark.parametrize("view", [False, True])
def test_the_null_key_recount_under_a_filter_does_not_hold_the_keys_in_memory(tmp_path, view):
    # A few null keys in every file and --where "site is not null", as the refusal says: the
    # recount read every kept row's key into one table on the client (432 MB of Arrow memory for
    # these 4 million keys of 100 bytes; tens of GB for a large dataset) just to count its nulls.
    # With string_view keys (Polars) and a filter on them, all the files' columns were read at once.
    import subprocess
    import sys

    import numpy as np

    n = 1_000_000
    site = pc.binary_join_element_wise(pa.array(np.char.add("s", (np.arange(n) % 1000).astype(str))),
                                       pa.scalar("x" * 100), "")
    site = pc.if_else(pa.array(np.arange(n) % 250_000 == 0), pa.scalar(None, pa.string()), site)
    t = pa.table({"site": site.cast(pa.string_view()) if view else site, "value": np.arange(n, dtype=np.float64)})
    for i in range(4):
        pq.write_table(t, tmp_path / f"p{i}.parquet", row_group_size=16384)
    script = ("import sys, pyarrow as pa, pyarrow.dataset as ds\n"
              "from modelfactory.dataset import discover\n"
              "info = discover(sys.argv[1], null_check=('site',), filter=ds.field('site') != 'none')\n"
              "kept = discover(sys.argv[1], null_check=('site',), filter=ds.field('value') < 500_000)\n"
              "print(info.null_counts['site'], kept.null_counts['site'], pa.default_memory_pool().max_memory() >> 20)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    left, kept, peak_mb = map(int, done.stdout.split())
    assert (left, kept) == (0, 8), done.stderr
    assert peak_mb < 300, f"{peak_mb} MB of Arrow memory to count 16 null keys (the keys alone: 420 MB)"


def test_partition_folders_whose_key_starts_with_an_underscore_are_data(tmp_path):
    """``_tenant=acme/`` folders were skipped as hidden (pyarrow's ignore prefix "_"), and their
    groups were missing from every output with no word; Spark reads them (a name with "=" is a
    partition) and skips only ``_SUCCESS``, ``_temporary/``, ``_metadata``, dot files and
    ``._COPYING_`` files."""
    t = metrics_table(series=4, apps=2)
    data = tmp_path / "data"
    for app, sub in (("app0", "_dt=2026-03-02"), ("app1", ".")):  # app0's groups were left out
        rows = t.filter(pc.equal(t["app"], app)).drop_columns(["app"])
        (data / f"app={app}" / sub).mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, data / f"app={app}" / sub / "part-00000.snappy.parquet")
    pq.write_table(t.drop_columns(["app"]).slice(0, 72), data / "app=app0" / "_dt=2026-03-02" / "p._COPYING_")
    (data / "_SUCCESS").write_bytes(b"")
    (data / "_temporary" / "0").mkdir(parents=True)
    (data / "_temporary" / "0" / "part-00009.parquet").write_bytes(b"PAR1 half written")
    (data / "app=app1" / ".part-00000.snappy.parquet.crc").write_bytes(b"crc")
    pq.write_metadata(t.drop_columns(["app"]).schema, data / "_common_metadata")
    keys = sorted(set(zip(t.column("app").to_pylist(), t.column("site").to_pylist())))

    run = modelfactory.train(str(data), by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    assert sorted(zip(run.groups.app, run.groups.site)) == keys and set(run.groups.status) == {"ok"}
    assert run.summary["rows"] == t.num_rows
    out = modelfactory.apply(str(data), by=["app", "site"], func=lambda df: pd.DataFrame({"n": [len(df)]}),
                             schema="n int64", cluster="inline")
    assert sorted(zip(out.groups.app, out.groups.site)) == keys and out.to_pandas()["n"].sum() == t.num_rows
    assert modelfactory.dataset.discover(str(data)).source.partition_keys == ("app", "_dt")
    scores = modelfactory.score(str(data), store=str(tmp_path / "store"), out=str(tmp_path / "scores"),
                                cluster="inline")
    assert sorted(zip(scores.groups.app, scores.groups.site)) == keys and set(scores.groups.status) == {"ok"}
    # the scored rows of "_dt=…" folders read back too (Run.to_arrow skipped "_" folders: 0 rows of app0)
    assert scores.to_pandas().groupby("app").size().to_dict() == {a: int(pc.sum(pc.equal(t["app"], a)).as_py())
                                                                 for a in ("app0", "app1")}


def test_a_wildcard_path_says_wildcards_are_not_expanded(tmp_path):
    data = modelfactory.demo.write_dataset(str(tmp_path / "data"), series=4, days=3)
    with pytest.raises(DatasetError, match=r"No file or folder at '.*/app=\*/part-0\.parquet'\. .*Wildcards are "
                                           r"not expanded: point at the folder .*filter="):
        modelfactory.train(f"{data}/app=*/part-0.parquet", by=["app", "site"], store=str(tmp_path / "st"), **TRAIN)
    with pytest.raises(DatasetError) as err:
        modelfactory.train(f"{data}/nothing-here", by=["app", "site"], store=str(tmp_path / "st"), **TRAIN)
    assert "Wildcards" not in str(err.value)


def test_scores_go_to_folders_named_as_spark_names_them(tmp_path):
    """A value of 30 Chinese characters is a 95-byte folder name as Spark writes it; pyarrow's encoding
    of the scores' folder made it 275 bytes, past the 255 a file name may have, and the whole score
    run stopped ("File name too long").  Folder names now escape what Spark escapes, nothing more."""
    values = ["服务" * 15, "a b", "x/y", "k=v", "50%", "#1", "tab\there", "ünï", "", "a+b", ".."]
    t = metrics_table(series=len(values), apps=1)
    site = pa.array([values[int(s[1:])] for s in t["site"].to_pylist()])
    t = t.set_column(t.schema.get_field_index("site"), "site", site)
    data = tmp_path / "data"
    for v in values:  # Spark's layout: its own escaping
        folder = data / ("site=" + "".join(f"%{ord(c):02X}" if c in '/=%#\t' else c for c in v))
        folder.mkdir(parents=True)
        pq.write_table(t.filter(pc.equal(t["site"], v)).drop_columns(["site"]), folder / "part-00000.snappy.parquet")
    assert len(f"site={values[0]}".encode()) < 255 < len(("site=" + "%E6%9C%8D%E5%8A%A1" * 15).encode())
    run = modelfactory.train(str(data), by=["app", "site"], store=str(tmp_path / "store"), **TRAIN)
    assert run.summary["counts"] == {"ok": len(values), "failed": 0, "skipped": 0}
    scores = modelfactory.score(str(data), store=str(tmp_path / "store"), out=str(tmp_path / "scores"),
                                cluster="inline")
    assert sorted(scores.groups.site) == sorted(values) and set(scores.groups.status) == {"ok"}
    back = ds.dataset(str(tmp_path / "scores"), format="parquet", partitioning="hive").to_table()
    assert sorted(set(back["site"].to_pylist())) == sorted(values) and back.num_rows == t.num_rows
    assert (tmp_path / "scores" / "site=a b").is_dir() and (tmp_path / "scores" / "site=x%2Fy").is_dir()
