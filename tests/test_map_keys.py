"""map_keys: the keys func gets, keys refused up front, duplicates, the output folder, SystemExit."""
from __future__ import annotations

import datetime
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import modelfactory
from modelfactory.exceptions import ModelFactoryError, StoreError


# --- 1. the key func gets ---------------------------------------------------------------------
def test_dict_keys_reach_func_as_the_dicts_passed():
    seen = []

    def f(key):
        seen.append(key)
        return key["app"] + key["site"]

    keys = [{"app": "a", "site": "s1"}, {"site": "s2", "app": "b"}]
    run = modelfactory.map_keys(keys, func=f, cluster="inline")
    assert seen == keys and all(type(k) is dict for k in seen)
    # dicts compare without order: the names reach func in the order of `by` (the first key's)
    assert [list(k) for k in seen] == [["app", "site"], ["app", "site"]]
    assert run.summary["counts"] == {"ok": 2, "failed": 0, "skipped": 0}
    assert run.results == {("a", "s1"): "as1", ("b", "s2"): "bs2"}  # results: the values, in `by` order
    assert list(run.groups.columns[:2]) == ["app", "site"]


def test_one_name_dict_keys_reach_func_as_dicts():
    run = modelfactory.map_keys([{"app": "a"}, {"app": "b"}], func=lambda k: sorted(k.items()), cluster="inline")
    assert run.results == {"a": [("app", "a")], "b": [("app", "b")]}


def test_dict_keys_with_by_still_reach_func_as_dicts():
    run = modelfactory.map_keys([{"app": "a", "site": 1}], by=["application", "site_id"],
                                func=lambda k: k["site"], cluster="inline")
    assert run.results == {("a", 1): 1}
    assert list(run.groups.columns[:2]) == ["application", "site_id"]


def test_scalar_and_tuple_keys_reach_func_unchanged():
    assert modelfactory.map_keys([("a", 1)], func=lambda k: k, cluster="inline").results == {("a", 1): ("a", 1)}
    assert modelfactory.map_keys([1, 2], func=lambda k: k * 10, cluster="inline").results == {1: 10, 2: 20}


def test_one_part_tuple_keys_reach_func_as_tuples():
    run = modelfactory.map_keys([("a",), ("b",)], func=lambda k: k, cluster="inline")
    assert run.results == {"a": ("a",), "b": ("b",)}


@pytest.mark.parametrize("keys, match", [
    ([{"app": "a", "site": "s1"}, {"app": "b"}],
     r"key #1 \{'app': 'b'\} has the names app; every dict key must have the names of the first: app, site"),
    ([{"app": "a"}, {"app": "b", "site": "x"}],
     (r"key #1 \{'app': 'b', 'site': 'x'\} has the names app, site; every dict key must have the names of the "
      r"first: app")),
    ([{"app": "a"}, "b"], r"key #1 'b' is a str, but key #0 is a dict"),
    (["b", {"app": "a"}], r"key #1 \{'app': 'a'\} is a dict, but key #0 is a scalar"),
    ([("a", 1), "b"], r"key #1 'b' is a str, but key #0 is a tuple"),
    ([("a", 1), ("b",)], r"key #1 \('b',\) has 1 part\(s\); key #0 has 2"),
    ([1, "a", 2.5], r"key #1 'a': its value 'a' \(str\) does not go with the earlier keys' \(int64\)"),
    ([("a", 1), ("b", "x")], (r"key #1 \('b', 'x'\): its 'key1' value 'x' \(str\) does not go with the "
                              r"earlier keys' \(int64\)")),
    ([{"app": "a", "n": 1}, {"app": "b", "n": "2"}], r"key #1 \{'app': 'b', 'n': '2'\}: its 'n' value '2'"),
    ([{}], r"key #0 \{\} has no parts"),
    ([()], r"key #0 \(\) has no parts"),
    ([{1: "a"}], r"key #0 \{1: 'a'\}: dict keys name their parts with strings"),
    ([[1, 2]], r"key #0 \[1, 2\] is a list; keys are scalars, tuples or dicts \(pass a tuple\)"),
    # a naive time beside zoned ones was taken as UTC without a word
    ([datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), datetime.datetime(2026, 1, 1, 5)],
     (r"key #0 datetime.datetime\(2026, 1, 1, 0, 0, tzinfo=datetime.timezone.utc\) has a time with a time zone "
      r"and key #1 datetime.datetime\(2026, 1, 1, 5, 0\) one without: a time without a zone could be UTC or local")),
    ([("a", np.datetime64("2026-01-01T05")), ("b", pd.Timestamp("2026-01-01", tz="Europe/Paris"))],
     r"key #1 .* has a 'key1' time with a time zone and key #0 .* one without"),
    # a null key ran, and the group table showed a NaN key
    (["a", None, "b"], r"key #1 None: its value is missing; keys must not be null \(None, NaN, NA or NaT\)"),
    (["a", float("nan")], r"key #1 nan: its value is missing"),  # what a column's unique() gives
    (["a", pd.NA], r"key #1 <NA>: its value is missing"),
    ([pd.Timestamp("2026-01-01"), pd.NaT], r"key #1 NaT: its value is missing"),
    # a zoned column's unique(): NaT was called a time without a zone
    ([pd.Timestamp("2026-01-01", tz="UTC"), pd.NaT], r"key #1 NaT: its value is missing"),
    ([{"user": "a"}, {"user": None}], r"key #1 \{'user': None\}: its 'user' value is missing"),
    ([1.5, float("nan")], r"key #1 nan: its value is missing"),
    ([None, None], r"key #0 None: its value is missing"),
    # a datetime after a date was cut to its day (the key and run.results lost 05:00)
    ([datetime.date(2026, 1, 1), datetime.datetime(2026, 1, 2, 5)],
     r"key #1 datetime.datetime\(2026, 1, 2, 5, 0\): its value .* \(datetime\) does not go with the earlier keys' \(date\)"),
    ([("a", datetime.datetime(2026, 1, 2, 5)), ("b", datetime.date(2026, 1, 1))],
     r"key #1 \('b', datetime.date\(2026, 1, 1\)\): its 'key1' value .* \(date\) does not go with"),
])
def test_bad_keys_are_refused_up_front_naming_the_key(keys, match):
    called = []
    with pytest.raises(ModelFactoryError, match=match):
        modelfactory.map_keys(keys, func=called.append, cluster="inline")
    assert called == []


def test_ints_and_floats_mix_as_floats():
    assert modelfactory.map_keys([1, 2.5], func=str, cluster="inline").results == {1.0: "1", 2.5: "2.5"}


# --- 2. duplicates ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, match", [
    (["a", "a", "b", "a"], r"map_keys got 1 key more than once: 'a' \(3 times\)"),
    ([("a", 1), ("b", 2), ("a", 1), ("b", 2)], (r"map_keys got 2 keys more than once: \('a', 1\) \(2 times\), "
                                                r"\('b', 2\) \(2 times\)")),
    ([{"app": "a", "site": "s"}, {"site": "s", "app": "a"}],
     r"map_keys got 1 key more than once: \{'app': 'a', 'site': 's'\} \(2 times\)"),
])
def test_duplicate_keys_are_refused_naming_one_and_its_count(keys, match):
    called = []
    with pytest.raises(ModelFactoryError, match=match + r".*each key once"):
        modelfactory.map_keys(keys, func=called.append, cluster="inline")
    assert called == []


def test_a_key_holding_an_unhashable_value_is_refused():
    with pytest.raises(ModelFactoryError, match=r"key #0 \('a', \[1\]\) holds a value that cannot be hashed"):
        modelfactory.map_keys([("a", [1]), ("b", [2])], func=str, cluster="inline")


# --- 3. the output folder ------------------------------------------------------------------------------
def _rows(key):
    return pd.DataFrame({"v": [key * 10]})


def test_out_must_be_new_or_empty_and_overwrite_replaces_it(tmp_path):
    out = str(tmp_path / "out")
    first = modelfactory.map_keys(range(5), func=_rows, schema={"v": "int64"}, out=out, cluster="inline",
                                  keys_per_unit=1)
    assert sorted(first.to_pandas()["v"]) == [0, 10, 20, 30, 40]
    with pytest.raises(StoreError, match=r"is not empty; pick a new folder or pass overwrite=True\.$"):  # no flag
        modelfactory.map_keys([100, 200], func=_rows, schema={"v": "int64"}, out=out, cluster="inline")
    assert sorted(first.to_pandas()["v"]) == [0, 10, 20, 30, 40]  # the refused run left it alone
    second = modelfactory.map_keys([100, 200], func=_rows, schema={"v": "int64"}, out=out, cluster="inline",
                                   overwrite=True, keys_per_unit=1)
    assert sorted(second.to_pandas()["v"]) == [1000, 2000]
    assert sorted(second.groups["key"]) == [100, 200]


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        modelfactory.map_keys([1], func=_rows, schema={"v": "int64"}, out=str(f), cluster="inline", overwrite=True)
    assert f.read_text() == "x"


def test_out_without_schema_leaves_the_folder_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ModelFactoryError, match="out= needs schema="):
        modelfactory.map_keys([1], func=_rows, out=str(out), cluster="inline", overwrite=True)
    assert (out / "keep").read_text() == "x"


# --- 4. SystemExit ---------------------------------------------------------------------------------------
def _exits(key):
    if key == "a":
        sys.exit(1)
    if key == "b":
        raise SystemExit("no data for b")
    return key.upper()


def _exits_rows(key):
    return pd.DataFrame({"k": [_exits(key)]})


def test_system_exit_fails_its_key_only_inline():
    run = modelfactory.map_keys(["a", "b", "c"], func=_exits, cluster="inline")
    assert run.summary["counts"] == {"ok": 1, "failed": 2, "skipped": 0}
    assert run.results == {"c": "C"}
    err = run.groups.set_index("key")["error"]
    assert err["a"].startswith("SystemExit: 1") and err["b"].startswith("SystemExit: no data for b")


def test_system_exit_fails_its_key_only_on_a_cluster(client):
    run = modelfactory.map_keys(["a", "b", "c"], func=_exits_rows, schema="k string", cluster=client,
                                keys_per_unit=1)
    assert run.summary["counts"] == {"ok": 1, "failed": 2, "skipped": 0}
    assert run.to_pandas()["k"].tolist() == ["C"]
    err = run.groups.set_index("key")["error"]
    assert err["a"].startswith("SystemExit: 1") and err["b"].startswith("SystemExit: no data for b")


def test_keyboard_interrupt_is_not_swallowed():
    def f(key):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        modelfactory.map_keys(["a"], func=f, cluster="inline")


def test_keys_that_are_one_key_once_stored_and_ints_too_big_are_refused():
    with pytest.raises(ModelFactoryError, match=r"map_keys got 1 key more than once: 'a' \(2 times\)"):
        modelfactory.map_keys(["a", b"a"], func=lambda k: 1, cluster="inline")  # one binary value once stored
    with pytest.raises(ModelFactoryError, match=r"key #1 1180591620717411303424: its value .* does not fit in a "
                                                r"64-bit integer, the type of a key column; pass it as text"):
        modelfactory.map_keys([1, 2**70], func=lambda k: 1, cluster="inline")



def test_keys_of_2_to_the_63_and_more_are_a_uint64_column(client, tmp_path):
    # Arrow infers int64: such ids (a uint64 key column of data) were refused as too big "for a 64-bit
    # integer", and [2**63, 5] named the key 5 as the one that did not fit
    keys = [2**63, 5, 2**64 - 1]
    run = modelfactory.map_keys(keys, func=lambda k: k + 1 if k < 2**64 - 1 else 0, cluster=client)
    assert run.groups["key"].dtype == np.uint64 and sorted(run.groups["key"]) == sorted(keys)
    assert run.results == {2**63: 2**63 + 1, 5: 6, 2**64 - 1: 0}
    modelfactory.map_keys(keys, func=lambda k: pd.DataFrame({"k": [str(k)]}), schema="k string",
                          out=str(tmp_path / "o"), cluster="inline")
    groups = pq.read_table(tmp_path / "o" / "_groups")
    assert groups.schema.field("key").type == pa.uint64() and sorted(groups["key"].to_pylist()) == sorted(keys)
    with pytest.raises(ModelFactoryError, match=r"key #0 18446744073709551616: its value .* does not fit"):
        modelfactory.map_keys([2**64, 5], func=lambda k: 1, cluster="inline")
    # each fits one 64-bit type, but no type holds both: the message says so, naming both keys
    with pytest.raises(ModelFactoryError, match=r"key #1 9223372036854775808 has a value of 2\*\*63 or more, "
                                                r"which only an unsigned .* key #2 -1 a negative one"):
        modelfactory.map_keys([3, 2**63, -1], func=lambda k: 1, cluster="inline")

# --- 5. the group table's rows --------------------------------------------------------------------
def _n_rows(key):
    if key == "bad":
        raise ValueError("no data for bad")
    if key == "wrong":
        return pd.DataFrame({"k": [key], "other": [1]})  # not the schema: fails its key
    return pd.DataFrame({"k": [key] * len(key), "i": range(len(key))})


@pytest.mark.parametrize("where", ["inline", "out", "cluster"])
def test_the_group_table_counts_the_rows_each_key_returned(tmp_path, where, request):
    """Every key had rows 0 in the group table (run.groups, out/_groups/), whatever it returned."""
    cluster = request.getfixturevalue("client") if where == "cluster" else "inline"
    out = str(tmp_path / "o") if where == "out" else None
    run = modelfactory.map_keys(["a", "bbb", "cc", "bad", "wrong"], func=_n_rows, schema="k string, i bigint",
                                out=out, cluster=cluster, keys_per_unit=2)
    g = run.groups.set_index("key")
    assert g["rows"].to_dict() == {"a": 1, "bbb": 3, "cc": 2, "bad": 0, "wrong": 0}
    assert g.loc[["bad", "wrong"], "status"].tolist() == ["failed", "failed"]
    assert run.summary["rows"] == len(run.to_pandas()) == 6


def test_a_frame_or_buffer_filled_again_for_every_key_gives_each_key_its_own_rows():
    # the rows were converted after every key of the unit had run: each key got the last key's
    row, buf = pd.DataFrame({"k": ["?"], "m": [0.0]}), np.zeros(1)

    def frame(key):
        row.loc[0, "k"], row.loc[0, "m"] = key, float(len(key))
        return row

    def array(key):
        buf[0] = float(len(key))
        return {"k": [key], "m": buf}

    for func in (frame, array):
        run = modelfactory.map_keys(["a", "bb", "ccc"], func=func, by="key", schema="k string, m double",
                                    cluster="inline")
        assert sorted(run.to_pandas().values.tolist()) == [["a", 1.0], ["bb", 2.0], ["ccc", 3.0]], func.__name__


# --- keys_per_unit ------------------------------------------------------------------------------
@pytest.mark.parametrize("per", [-1, -2, 0, 1.5, "2", True])
def test_keys_per_unit_must_be_a_whole_number_of_at_least_one(per):
    # -1 and -2 ran no key at all (an empty slice of the keys: "0 groups", results {}), 0 fell back to
    # the default unseen, 1.5 and "2" were a bare TypeError from range()
    from modelfactory.exceptions import ClusterError

    called = []
    with pytest.raises(ClusterError, match=rf"keys_per_unit must be an integer >= 1 .*; got {per!r} "):
        modelfactory.map_keys(["a", "b", "c"], func=called.append, cluster="inline", keys_per_unit=per)
    assert called == []


def test_keys_per_unit_sets_the_keys_of_each_unit():
    run = modelfactory.map_keys(["a", "b", "c"], func=str.upper, cluster="inline", keys_per_unit=2)
    assert run.results == {"a": "A", "b": "B", "c": "C"} and run.summary["units"] == 2
