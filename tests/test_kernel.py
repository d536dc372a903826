"""The kernel's group splitting: every row in exactly one group, groups contiguous and in time order."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfactory.dataset import DECODE, ENCODED
from modelfactory.kernel import split_groups

rows = st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(0, 3), st.integers(0, 50)),
                min_size=0, max_size=80)


@given(rows, st.booleans(), st.booleans())
@settings(max_examples=300, deadline=None)
def test_split_groups_partitions_the_rows(data, presort, encoded):
    if presort:
        data = sorted(data, key=lambda r: (r[0] is None, r[0] or "", r[1], r[2]))
    k = pa.array([r[0] for r in data], pa.string())
    k_field = pa.field("k", pa.string())
    if encoded:  # as read_files(encode=...) gives it: dictionary-encoded, marked for decoding
        k, k_field = k.dictionary_encode(), pa.field("k", ENCODED, metadata=DECODE)
    table = pa.table([k, pa.array([r[1] for r in data], pa.int64()), pa.array([r[2] for r in data], pa.timestamp("s")),
                      pa.array(np.arange(len(data)))],
                     schema=pa.schema([k_field, ("j", pa.int64()), ("t", pa.timestamp("s")), ("i", pa.int64())]))
    g = split_groups(table, ("k", "j"), "t")
    views = {name: list(g.numpy_column(name)) for name in ("k", "j", "i")}  # before .table is built
    columns = {name: g.column(name).to_pylist() for name in ("k", "j", "t", "i")}
    assert g.table.schema.field("k").type == pa.string() and g.keys.schema.field("k").type == pa.string()
    assert g.table.num_rows == len(data)
    assert sorted(g.table["i"].to_pylist()) == list(range(len(data)))  # nothing lost or repeated
    for name in ("k", "j", "i"):  # numpy views (string keys from the split's own encoding) match the table
        assert views[name] == list(g.numpy_column(name)) == g.table[name].to_pylist()
    for name, values in columns.items():
        assert values == g.table[name].to_pylist() == g.column(name).to_pylist()
    keys = g.key_tuples()
    assert len(set(keys)) == len(keys) == len({(r[0], r[1]) for r in data})
    for (s, e), key in zip(zip(g.starts, g.ends), keys):
        part = g.table.slice(s, e - s)
        assert set(zip(part["k"].to_pylist(), part["j"].to_pylist())) == {key}
        ts = part["t"].cast(pa.int64()).to_pylist()
        assert ts == sorted(ts)


@pytest.mark.parametrize("key_type", [pa.string(), pa.float64()], ids=["codes", "compared"])
def test_a_missing_time_neither_hides_a_step_back_nor_ties_nanosecond_times(key_type):
    # With a null anywhere in the unit the times came out as float64: NaN beside a step back hid
    # it ("in order", rows handed over unsorted), and float64 rounds ns epochs into ties
    base = 1_772_409_600 * 10**9  # 2026-03-02
    hour = 3600 * 10**9
    k = ["a", "a", "a", "b", "b", "c"] if key_type == pa.string() else [1.0, 1.0, 1.0, 2.0, 2.0, 3.0]
    t = [base + 5 * hour, None, base + 3 * hour, base + 20, base + 10, base]
    table = pa.table({"k": pa.array(k, key_type), "t": pa.array(t, pa.timestamp("ns")), "i": range(6)})
    g = split_groups(table, ("k",), "t")
    assert g.column("i").to_pylist() == [2, 0, 1, 4, 3, 5]  # each group in time order, the missing time last


def test_string_keys_stay_with_their_rows_when_so_many_keys_that_the_rows_are_sorted_by_value():
    """Eleven keys of 80 values each span more than one int64 code can number: the split sorts
    by value instead, and a string key's numpy view is each row's own value (before bf7022e the
    view kept the encoding from before the sort: 79 of 80 groups got another group's key)."""
    p = np.random.default_rng(0).permutation(np.repeat(np.arange(80), 2))  # each key twice, apart
    cols = {"k": [f"s{i:03d}" for i in p], **{f"j{j}": p for j in range(10)}}
    table = pa.table(cols)
    g = split_groups(table, tuple(cols))
    assert len(g) == 80
    assert list(g.numpy_column("k")) == g.table["k"].to_pylist() == [f"s{i:03d}" for i in g.numpy_column("j0")]


# ---------------------------------------------------------------------------
# apply_groups: what a user function returns, collected on the fast path or
# pinned on the group that returned it
# ---------------------------------------------------------------------------
def _apply(func, input="pandas", schema="k string, n bigint, m double"):
    from types import SimpleNamespace

    from modelfactory.grouped_map import apply_groups
    from modelfactory._schema import parse_schema

    table = pa.table({"k": ["a", "a", "b", "c", "c", "c", "d"], "v": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]})
    spec = SimpleNamespace(out_schema=parse_schema(schema), func=func, input=input)
    rows, result = apply_groups(spec, split_groups(table, ("k",)))
    return rows, result.to_pydict()


def test_a_groups_seconds_include_converting_what_it_returned(monkeypatch):
    """The clock was read as the function returned, and converting its rows (a million text values:
    seconds) was charged to the group after it: the slow group looked fast, the next one slow."""
    import time

    import pandas as pd

    from modelfactory import grouped_map

    real = grouped_map.to_table

    def slow_conversion(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_map, "to_table", slow_conversion)

    def func(df):
        k = df["k"].iloc[0]
        frame = pd.DataFrame({"k": [k], "n": [len(df)], "m": [df["v"].mean()]})
        return frame[["m", "n", "k"]] if k == "b" else frame  # b's columns in another order: converted at once

    rows, out = _apply(func)
    assert rows["status"] == ["ok"] * 4 and sorted(out["k"]) == ["a", "b", "c", "d"]
    assert rows["seconds"][1] >= 0.2, rows["seconds"]  # b's own conversion, not c's


def test_a_returned_frame_with_a_column_twice_is_told_so():
    """A frame with two columns "m" for a schema with one was "returned columns ['k', 'n', 'm', 'm']
    do not match the schema ['k', 'n', 'm']", without the word that says what is wrong."""
    import pandas as pd

    def func(df):
        return pd.DataFrame([[df["k"].iloc[0], len(df), 1.0, 2.0]], columns=["k", "n", "m", "m"])

    rows, out = _apply(func)
    assert set(rows["status"]) == {"failed"} and out["k"] == []
    assert rows["error"][0].endswith("more than one column named 'm'"), rows["error"][0]


def test_apply_groups_collects_frames_and_dicts_and_pins_bad_returns():
    import pandas as pd

    class Frame(pd.DataFrame):
        pass

    def func(df):
        k = df["k"].iloc[0]
        if k == "a":  # the usual fast path
            return pd.DataFrame({"k": [k], "n": [len(df)], "m": [df["v"].mean()]})
        if k == "b":  # columns in another order, and a subclass: the careful path, still ok
            return Frame({"m": [df["v"].mean()], "n": [len(df)], "k": [k]})
        if k == "c":  # a dict with columns of different lengths
            return {"k": [k, k], "n": [1], "m": [1.0, 2.0]}
        return {"k": np.array([k]), "n": np.array([1]), "m": np.array([7.0]), "extra": np.array([0])}

    rows, out = _apply(func)
    assert rows["status"] == ["ok", "ok", "failed", "failed"]
    assert rows["error"][0] is None and rows["error"][1] is None
    assert "named n expected length 2 but got length 1" in rows["error"][2]
    assert "unexpected ['extra']" in rows["error"][3]
    assert sorted(zip(out["k"], out["n"], out["m"])) == [("a", 2, 1.5), ("b", 1, 3.0)]
    assert len(rows["seconds"]) == 4 and (np.asarray(rows["seconds"]) >= 0).all()


def test_apply_groups_numpy_input_skips_and_failures_keep_their_rows():
    import modelfactory
    from modelfactory.models.base import SkipGroup

    # the docstrings of apply and map_keys name it so (it was only in modelfactory.models)
    assert modelfactory.SkipGroup is SkipGroup

    def func(g):
        if g["k"][0] == "b":
            raise SkipGroup("one row is not enough")
        if g["k"][0] == "d":
            raise RuntimeError("boom")
        return {"k": g["k"][:1], "n": np.array([len(g["v"])]), "m": np.array([g["v"].mean()])}

    rows, out = _apply(func, input="numpy")
    assert rows["status"] == ["ok", "skipped", "ok", "failed"]
    assert rows["error"][1] == "one row is not enough" and "RuntimeError: boom" in rows["error"][3]
    assert out == {"k": ["a", "c"], "n": [2, 3], "m": [1.5, 5.0]}


def test_dict_values_of_every_kind_are_checked_together_and_a_bad_one_fails_only_its_group():
    """A dict's values are checked all at once after the unit's groups ran: scalars, lists and
    Series beside arrays are taken as ``np.atleast_1d`` makes them, and the group whose value
    cannot be a column (2-d), or whose columns differ in length, fails alone."""
    import pandas as pd

    def func(g):
        k = g["k"][0]
        m = float(np.mean(g["v"]))
        return {"a": {"k": k, "n": 2, "m": m},  # scalars
                "b": {"k": [k], "n": [1], "m": pd.Series([m])},  # a list and a Series
                "c": {"k": np.array([k, k]), "n": np.array([3, 3]), "m": np.array([[m, m]])},  # 2-d
                "d": {"k": np.array([k]), "n": np.array([1, 1]), "m": np.array([m])}}[k]  # uneven

    rows, out = _apply(func, input="numpy")
    assert rows["status"] == ["ok", "ok", "failed", "failed"], rows["error"]
    assert "expected length 1 but got length 2" in rows["error"][3]
    assert out == {"k": ["a", "b"], "n": [2, 1], "m": [1.5, 3.0]}
    # the same value kinds mixed with DataFrames, which take the other branch of the check
    rows, out = _apply(lambda g: pd.DataFrame(func(g)) if g["k"][0] == "b" else func(g), input="numpy")
    assert rows["status"] == ["ok", "ok", "failed", "failed"]
    assert out == {"k": ["a", "b"], "n": [2, 1], "m": [1.5, 3.0]}


def test_dicts_of_scalars_are_one_row_a_group_converted_together_as_each_alone_would_be():
    """When every group returns one value of one scalar type per column (the natural one-row
    return of a numpy function), the column is converted in one go, with the types numpy gives
    each value alone; a value the schema cannot hold fails only its group, and a dict with as
    many names as the schema but another name is pinned on its group with the names."""
    def func(g):
        k = g["k"][0]
        return {"k": k, "n": len(g["v"]), "m": g["v"].mean()}  # str, int, np.float64

    rows, out = _apply(func, input="numpy")
    assert rows["status"] == ["ok"] * 4
    assert out == {"k": ["a", "b", "c", "d"], "n": [2, 1, 3, 1], "m": [1.5, 3.0, 5.0, 7.0]}

    def odd(g):
        k = g["k"][0]
        if k == "b":
            return {"k": k, "n": 2**70, "m": 1.0}  # too big for the bigint column
        if k == "c":
            return {"k": k, "n": 3, "x": 1.0}  # as many names, one of them not the schema's
        return {"k": np.str_(k), "n": np.int32(len(g["v"])), "m": np.float32(0.5)}

    rows, out = _apply(odd, input="numpy")
    assert rows["status"] == ["ok", "failed", "failed", "ok"], rows["error"]
    assert "int64" in rows["error"][1] and "'n'" in rows["error"][1]
    assert "unexpected ['x']" in rows["error"][2] and "missing ['m']" in rows["error"][2]
    assert out == {"k": ["a", "d"], "n": [2, 1], "m": [0.5, 0.5]}

    flags = _apply(lambda g: {"k": g["k"][0], "n": 1, "m": bool(g["v"][0] > 2)}, input="numpy")[1]
    assert flags["m"] == [0.0, 1.0, 1.0, 1.0]  # booleans into a double column, as numpy casts them


def test_a_scalar_beside_columns_is_repeated_to_their_length_as_pandas_repeats_it():
    """{"k": key, "n": count, "m": values} failed every group ("expected length 1 but got length 2"),
    where pd.DataFrame of the same dict repeats the scalars: now they are repeated on the fast path
    and the careful one alike.  Only single values are: a one-element array beside longer columns,
    columns of two lengths, or a value that is no column still fail their group."""
    import pandas as pd

    from modelfactory._schema import parse_schema
    from modelfactory.grouped_map import to_table

    def func(g):
        k = g["k"][0]
        if k == "c":
            return {"k": np.array([k]), "n": 3, "m": g["v"]}  # a one-element array is a column
        if k == "d":
            return {"k": k, "n": 1, "m": g["v"][:0]}  # no rows
        return {"k": k, "n": len(g["v"]), "m": g["v"]}

    rows, out = _apply(func, input="numpy")
    assert rows["status"] == ["ok", "ok", "failed", "ok"], rows["error"]
    assert "expected length 1 but got length 3" in rows["error"][2]
    expected = {"k": ["a", "a", "b"], "n": [2, 2, 1], "m": [1.0, 2.0, 3.0]}
    assert out == expected
    assert pd.DataFrame(func({"k": np.array(["a", "a"]), "v": np.array([1.0, 2.0])})).to_dict("list") == {
        k: v[:2] for k, v in expected.items()}  # what pandas makes of the same dict

    def broken(g):
        k = g["k"][0]
        if k == "a":
            return {"k": k, "n": [[1], [1, 2]], "m": g["v"]}  # ragged: no column
        if k == "b":
            return {"k": k, "n": np.array([1, 2]), "m": np.array([1.0, 2.0, 3.0])}  # two lengths
        return {"k": k, "n": 7, "m": g["v"]}

    rows, out = _apply(broken, input="numpy")
    assert rows["status"] == ["failed", "failed", "ok", "ok"], rows["error"]
    assert out == {"k": ["c", "c", "c", "d"], "n": [7, 7, 7, 7], "m": [4.0, 5.0, 6.0, 7.0]}
    schema = parse_schema("k string, n bigint, m double")
    assert to_table({"k": "a", "n": 2, "m": [1.0, 2.0]}, schema).to_pydict() == {
        "k": ["a", "a"], "n": [2, 2], "m": [1.0, 2.0]}
    assert isinstance(to_table({"k": ["a"], "n": 2, "m": [1.0, 2.0]}, schema), Exception)


def test_python_ints_past_int64_among_small_ones_are_not_rounded_on_the_way_through_floats():
    """numpy makes [1, 2**63 + 1] one float64 array (rounding the big one to 2**63), where each
    alone is an int64 and a uint64 array: in a uint64 column every value arrives exact, and in
    a double column the one a double cannot hold fails its group, as it does when it is alone."""
    from modelfactory._schema import parse_schema

    big = {"a": 1, "b": 2**63 + 1, "c": 3, "d": 2**64 - 1}
    func = lambda g: {"k": g["k"][0], "n": big[g["k"][0]]}  # noqa: E731
    rows, out = _apply(func, input="numpy", schema=parse_schema({"k": "string", "n": pa.uint64()}))
    assert rows["status"] == ["ok"] * 4
    assert out["n"] == [1, 2**63 + 1, 3, 2**64 - 1]

    rows, out = _apply(func, input="numpy", schema="k string, n double")
    assert rows["status"] == ["ok", "failed", "ok", "failed"], rows["error"]
    assert "9223372036854775809" in rows["error"][1]
    assert out["n"] == [1.0, 3.0]


def test_text_returned_as_strs_reaches_binary_and_string_columns_whole_on_every_path():
    """numpy makes strs fixed-width text (``<U``), which Arrow read into a binary column as
    b"a" for "ab" (the UCS-4 bytes up to the first zero) and into a string column cut at a
    NUL: a list of strs, a str in one group and an np.str_ in another, and a dict subclass
    (the careful path) all arrive whole, as the Python strs they were."""
    from modelfactory._schema import parse_schema

    schema = parse_schema({"k": "string", "b": "binary", "s": "string"})

    def func(g):
        k = str(g["k"][0])
        text = {"a": "ab", "b": "é", "c": "x\x00y", "d": "long text"}[k]
        if k == "a":
            return {"k": [k, k], "b": [text, "cd"], "s": [text, "cd"]}  # lists of strs: two rows
        if k == "d":
            return type("Row", (dict,), {})(k=k, b=text, s=text)  # a dict subclass: the careful path
        return {"k": k, "b": np.str_(text) if k == "b" else text, "s": text}

    rows, out = _apply(func, input="numpy", schema=schema)
    assert rows["status"] == ["ok"] * 4, rows["error"]
    assert out["b"] == [b"ab", b"cd", "é".encode(), b"x\x00y", b"long text"]
    assert out["s"] == ["ab", "cd", "é", "x\x00y", "long text"]


def test_text_ending_in_nul_characters_reaches_arrow_whole_on_every_path():
    """numpy's fixed-width text drops trailing NULs: "a\\x00" became "a" and b"x\\x00" b"x",
    marked ok, given as a scalar (bytes even on the fast path), in a list, in a tuple, repeated
    beside a column, or from a dict subclass (the careful path)."""
    from modelfactory._schema import parse_schema

    schema = parse_schema({"k": "string", "b": "binary", "s": "string"})

    def func(g):
        k = str(g["k"][0])
        if k == "a":
            return {"k": k, "b": b"x\x00", "s": "a\x00"}
        if k == "b":
            return {"k": [k], "b": [b"x\x00"], "s": ["a\x00"]}
        if k == "c":
            return {"k": (k, k), "b": (b"x\x00", b"y"), "s": ("a\x00", "b")}
        if k == "d":
            return {"k": [k, k], "b": b"x\x00", "s": "a\x00"}  # repeated beside the key column
        return type("Row", (dict,), {})(k=[k], b=[b"x\x00"], s="a\x00")  # the careful path

    rows, out = _apply(func, input="numpy", schema=schema)
    assert rows["status"] == ["ok"] * 4, rows["error"]
    assert out["k"] == ["a", "b", "c", "c", "d", "d"]
    assert out["b"] == [b"x\x00", b"x\x00", b"x\x00", b"y", b"x\x00", b"x\x00"]
    assert out["s"] == ["a\x00", "a\x00", "a\x00", "b", "a\x00", "a\x00"]
    rows, out = _apply(lambda g: func({"k": ["e"]}), input="numpy", schema=schema)
    assert rows["status"] == ["ok"] * 4 and out["b"] == [b"x\x00"] * 4 and out["s"] == ["a\x00"] * 4


def test_a_text_value_where_a_list_column_takes_a_list_fails_its_group_not_split_into_characters():
    """Arrow reads a str where a list column takes a list as the list of its characters (and
    bytes as their codes): {"k": key, "tags": ["red", "blue"]}, which failed its group before
    scalars were repeated, became two rows tagged ['r', 'e', 'd'] and ['b', 'l', 'u', 'e'],
    marked ok; so did a one-row ["red"], from a dict or a DataFrame.  Such a group now fails,
    naming the column and the value; a list of lists is rows of lists, as before."""
    import pandas as pd

    from modelfactory._schema import parse_schema
    from modelfactory.grouped_map import to_table

    class Frame(pd.DataFrame):
        pass

    def func(g, text):
        k = g["k"][0]
        if k == "a":
            return {"k": k, "tags": text}
        if k == "b":
            return {"k": k, "tags": [["red", "blue"]]}  # one row
        if k == "c":
            return pd.DataFrame({"k": [k], "tags": ["red"]})
        return Frame({"k": [k], "tags": ["red"]})  # the careful path

    for input, text in [("numpy", ["red", "blue"]), ("pandas", np.array(["red", "blue"]))]:
        g = (lambda df: {"k": df["k"].to_numpy()}) if input == "pandas" else (lambda d: d)
        rows, out = _apply(lambda x: func(g(x), text), input=input, schema="k string, tags array<string>")
        assert rows["status"] == ["failed", "ok", "failed", "failed"], rows["error"]
        assert "column 'tags'" in rows["error"][0] and "'red'" in rows["error"][0]
        assert out == {"k": ["b"], "tags": [["red", "blue"]]}
    rows, out = _apply(lambda d: {"k": d["k"][0], "tags": np.array(["red", "blue"])}, input="numpy",
                       schema="k string, tags array<string>")  # every group: numpy's fixed-width text
    assert rows["status"] == ["failed"] * 4 and out == {"k": [], "tags": []}
    schema = parse_schema("k string, tags array<string>, codes array<bigint>")
    assert isinstance(to_table({"k": "a", "tags": [["x"]], "codes": [b"xy"]}, schema), ValueError)
    assert isinstance(to_table({"k": ["a"], "tags": ["xy"], "codes": [[1, 2]]}, schema), ValueError)
    assert to_table({"k": "a", "tags": [["xy"]], "codes": [[1, 2]]}, schema).to_pydict() == {
        "k": ["a"], "tags": [["xy"]], "codes": [[1, 2]]}


def test_a_dict_filled_again_for_every_group_a_ragged_value_and_no_rows_are_each_collected_right():
    """Values are read when the unit's groups have run: a function that fills and returns the
    same dict every time still gets each group's own row; a ragged list fails only its group;
    a group that returns no rows (empty lists, float64 to numpy) is ok and adds none."""
    same: dict = {}

    def refill(g):
        same.update(k=g["k"][:1], n=np.array([len(g["v"])]), m=np.array([g["v"].mean()]))
        return same

    rows, out = _apply(refill, input="numpy")
    assert rows["status"] == ["ok"] * 4
    assert out == {"k": ["a", "b", "c", "d"], "n": [2, 1, 3, 1], "m": [1.5, 3.0, 5.0, 7.0]}

    def odd(g):
        k = g["k"][0]
        if k == "b":
            return {"k": [[k], [k, k]], "n": [1, 2], "m": [1.0, 2.0]}  # ragged: no column
        if k == "c":
            return {"k": [], "n": [], "m": []}
        return {"k": [k], "n": [len(g["v"])], "m": [float(g["v"].mean())]}

    rows, out = _apply(odd, input="numpy")
    assert rows["status"] == ["ok", "failed", "ok", "ok"], rows["error"]
    assert rows["error"][1].startswith("ValueError: column 'k' (string): ")
    assert out == {"k": ["a", "d"], "n": [2, 1], "m": [1.5, 7.0]}
    # the careful path (one group's value at a time) takes no rows alike, and names a bad column
    from modelfactory._schema import parse_schema
    from modelfactory.grouped_map import to_table

    schema = parse_schema("k string, n bigint, m double")
    assert to_table({"k": [], "n": [], "m": []}, schema).num_rows == 0
    assert str(to_table({"k": ["a"], "n": ["x"], "m": [1.0]}, schema)).startswith("column 'n' (int64): ")


def test_a_unit_runs_with_one_blas_thread_and_restores_the_pools():
    from threadpoolctl import threadpool_info, threadpool_limits

    from modelfactory.kernel import one_thread

    with threadpool_limits(2):
        assert threadpool_info() and all(p["num_threads"] == 2 for p in threadpool_info())
        for _ in range(2):  # the second time through the kept controller
            with one_thread():
                assert all(p["num_threads"] == 1 for p in threadpool_info())
            assert all(p["num_threads"] == 2 for p in threadpool_info())


def test_group_frames_equal_iloc_slices_indexed_from_zero():
    import pandas as pd

    from modelfactory.grouped_map import frame_slicer

    df = pa.table({"k": ["a", "a", "b", None], "t": pa.array([1, 2, 3, 4], pa.timestamp("ms", "UTC")),
                   "v": [1.0, None, 3.0, 4.0], "n": pa.array([1, 2, None, 4], pa.int64())}).to_pandas()
    cut = frame_slicer(df)
    for s, e in [(0, 2), (2, 3), (3, 4), (0, 4), (2, 2)]:
        got = cut(s, e)
        assert type(got) is pd.DataFrame
        pd.testing.assert_frame_equal(got, df.iloc[s:e].reset_index(drop=True))
        assert type(got.index) is pd.RangeIndex
    # each group has its own index: renaming one in place leaves the others alone
    a, b = cut(0, 2), cut(2, 4)
    a.index.name = "renamed"
    assert b.index.name is None and cut(0, 2).index.name is None


def _caches_columns() -> bool:
    """Whether this pandas caches a frame's column Series (pandas 2 without copy-on-write)."""
    import pandas._config as pd_config

    if not hasattr(pd_config, "using_copy_on_write"):  # pandas 3: always copy-on-write
        return False
    return not (pd_config.using_copy_on_write() or getattr(pd_config, "warn_copy_on_write", lambda: False)())


def _cached(frame) -> list:
    """The labels of the columns in ``frame``'s column cache (not the slicer's marker)."""
    import modelfactory.grouped_map as gm

    return [c for c in frame._item_cache if c is not getattr(gm, "_UNCLEARED", None)]


def _unit_frame(groups: int):
    return pa.table({"k": [f"g{i // 2}" for i in range(2 * groups)],
                     "t": pa.array(range(2 * groups), pa.timestamp("ms", "UTC")),
                     "v": [float(i) for i in range(2 * groups)],
                     "n": pa.array([i if i % 3 else None for i in range(2 * groups)], pa.int64()),
                     "c": pa.array(["x", "y"] * groups).dictionary_encode()}).to_pandas()


def _each_group(monkeypatch, func, groups: int, *, cached: bool, unit=None) -> list:
    """``func`` on each of ``groups`` two-row group frames of ``unit`` (default
    ``_unit_frame(groups)``), with the column cache or with it off (pandas' own caching)."""
    import modelfactory.grouped_map as gm

    unit = _unit_frame(groups) if unit is None else unit
    if not cached:
        monkeypatch.setattr(gm, "_column_cacher", lambda df, frame: None)
    cut = gm.frame_slicer(unit)
    monkeypatch.undo()
    return [func(cut(2 * i, 2 * i + 2)) for i in range(groups)]


def test_group_frames_behave_the_same_with_the_columns_the_function_read_cached(monkeypatch):
    """Reads, in-place writes through a column, ``.loc`` writes and new columns give the same
    results, the same warnings and the same unit frame with and without the cached columns."""
    import warnings

    import pandas as pd

    def func(df):
        df["n"].fillna(-9.0, inplace=True)  # chained, on a cached column: pandas 2 writes through the cache
        total = df["v"].sum()
        df["v"] *= 2  # through the (cached) Series
        col = df["n"]
        col.iloc[0] = -5.0  # chained: pandas 2 writes through and warns
        df.loc[df.index[-1], "v"] = -1.0
        df["w"] = df.v + df["t"].dt.hour
        return total, df["k"].iloc[0], df["c"].tolist(), df["v"].tolist(), df["n"].tolist(), df["w"].tolist()

    def run(cached: bool):
        unit = _unit_frame(80)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = _each_group(monkeypatch, func, 80, cached=cached, unit=unit)
        return out, [(w.category.__name__, str(w.message), w.lineno) for w in seen], unit

    got, got_warnings, got_unit = run(cached=True)
    want, want_warnings, want_unit = run(cached=False)
    assert repr(got) == repr(want)  # NaN == NaN
    assert got_warnings == want_warnings
    pd.testing.assert_frame_equal(got_unit, want_unit)
    assert want[0][3] == [0.0, -1.0] and want[5][0] == 21.0


def test_group_frames_cache_what_the_function_read_from_recent_groups():
    import pytest

    import modelfactory.grouped_map as gm

    unit = _unit_frame(gm._RELEARN + 3)
    cut = gm.frame_slicer(unit)
    if not _caches_columns():  # pandas 3: every frame's column is a new Series; nothing to cache
        assert gm._column_cacher(unit, cut) is None
        pytest.skip("this pandas keeps no column cache (copy-on-write)")
    first = cut(0, 2)
    assert not _cached(first)  # nothing read yet: nothing cached
    first["v"], first.k, first["n"]  # noqa: B018 - reads, as a function would
    second = cut(2, 4)
    assert not _cached(second)  # the second group learns too
    second["v"], second.k  # noqa: B018 - not "n": it is not cached for the groups after
    for i in range(2, gm._RELEARN):
        f = cut(2 * i, 2 * i + 2)
        assert _cached(f) == ["v", "k"]  # cached before the function runs
        assert f["v"].tolist() == [2.0 * i, 2.0 * i + 1] and f.k.name == "k"
        assert f["v"] is f._item_cache["v"]
    # every RELEARN-th group starts empty again, so a column the function stopped reading is dropped
    again = cut(2 * gm._RELEARN, 2 * gm._RELEARN + 2)
    assert not _cached(again)
    again["v"]  # noqa: B018
    again = cut(2 * gm._RELEARN + 2, 2 * gm._RELEARN + 4)
    assert not _cached(again)
    again["v"]  # noqa: B018
    assert _cached(cut(2 * gm._RELEARN + 4, 2 * gm._RELEARN + 6)) == ["v"]


def test_group_frames_give_a_column_the_labels_the_function_put_on_its_frame(monkeypatch):
    """pandas copies a frame's ``attrs`` and ``flags`` into a column Series when it first makes
    it: a function that labels its frame and then reads a column sees the labels on it, with
    or without the cache."""
    import modelfactory.grouped_map as gm

    def func(df):
        df.attrs["unit"] = "kg"
        if len(df.attrs) == 1:
            df.flags.allows_duplicate_labels = False
        v = df["v"]
        return v.attrs, v.flags.allows_duplicate_labels, (v * 2).attrs, df["k"].attrs

    want = _each_group(monkeypatch, func, gm._RELEARN + 5, cached=False)
    assert want[3] == ({"unit": "kg"}, False, {"unit": "kg"}, {"unit": "kg"})
    assert _each_group(monkeypatch, func, gm._RELEARN + 5, cached=True) == want


def test_group_frames_cache_only_the_columns_the_function_keeps_reading():
    """A column read in one group is not built for every group after it: a function that reads
    its own column in each group (a wide table), or all of them now and then (``df.items()``,
    ``to_dict``), would otherwise pay for up to 64 columns a group it does not read."""
    import pytest

    import modelfactory.grouped_map as gm

    if not _caches_columns():
        pytest.skip("this pandas keeps no column cache (copy-on-write)")
    groups = 2 * gm._RELEARN
    unit = _unit_frame(groups)
    for j in range(40):
        unit[f"x{j}"] = float(j)
    cut = gm.frame_slicer(unit)
    handed = []
    for i in range(groups):
        f = cut(2 * i, 2 * i + 2)
        handed.append(_cached(f))
        f["v"], f[f"x{i % 40}"]  # noqa: B018 - the column and a column of its own
        if i % 10 == 3:
            f.to_dict("list")  # every column, now and then
    assert max(map(len, handed)) <= 2, max(handed, key=len)
    assert sum("v" in h for h in handed) >= groups // 4  # still cached where it helps


def test_group_frames_give_the_rows_added_under_a_copy_on_write_context(monkeypatch):
    """Under copy-on-write pandas adds a row with ``.loc`` without clearing the frame's column
    cache: a column cached before would not have the row.  A function that does it (every
    group, as functions do) gets its columns made by pandas, with the row, as without the cache."""
    import contextlib

    import pandas as pd

    def copy_on_write():  # pandas 3 always copies on write, and deprecates the option (Pandas4Warning)
        if int(pd.__version__.split(".")[0]) >= 3:
            return contextlib.nullcontext()
        return pd.option_context("mode.copy_on_write", True)

    def func(df):
        with copy_on_write():
            df.loc[len(df)] = df.iloc[0]
        return len(df), df["v"].tolist(), df["k"].tolist()

    want = _each_group(monkeypatch, func, 8, cached=False)
    assert want[4] == (3, [8.0, 9.0, 8.0], ["g4", "g4", "g4"])
    assert _each_group(monkeypatch, func, 8, cached=True) == want


def test_group_frames_name_a_column_by_its_label_whatever_key_read_it(monkeypatch):
    """``df[np.str_("v")]`` (a name from a numpy array) reads column "v": pandas names the
    Series by the frame's label, a ``str``, and so does the cache."""

    def func(df):
        return [(type(df[c].name), repr(df[c].name), repr(df[c].to_frame().columns[0]))
                for c in np.array(["v", "k"])] + [repr(df["v"].name)]

    want = _each_group(monkeypatch, func, 8, cached=False)
    assert want[5] == [(str, "'v'", "'v'"), (str, "'k'", "'k'"), "'v'"]
    assert _each_group(monkeypatch, func, 8, cached=True) == want


def test_group_frames_probe_only_the_columns_the_function_reads(monkeypatch):
    """The check that a cached column is what pandas makes runs for the columns the function
    reads, when they are first cached: not for all 300 columns of a wide unit, nor at all
    for a slicer that hands out two groups (one per pattern of nulls may)."""
    import pandas as pd
    import pytest

    import modelfactory.grouped_map as gm

    if not _caches_columns():
        pytest.skip("this pandas keeps no column cache (copy-on-write)")
    probed = []
    compare = pd.testing.assert_series_equal
    monkeypatch.setattr(pd.testing, "assert_series_equal", lambda a, b, **kw: (probed.append(a.name), compare(a, b, **kw)))
    wide = pa.Table.from_pandas(_unit_frame(10), preserve_index=False)
    for j in range(300):
        wide = wide.append_column(f"x{j}", pa.array(np.full(20, float(j))))
    unit = wide.to_pandas()
    cut = gm.frame_slicer(unit)
    for i in range(2):
        cut(2 * i, 2 * i + 2)["v"]  # noqa: B018
    assert probed == []
    for i in range(2, 10):
        f = cut(2 * i, 2 * i + 2)
        assert f["v"].tolist() == [2.0 * i, 2.0 * i + 1]
    assert probed == ["v"]
    assert _cached(f) == ["v"]  # cached all the same


def test_group_frames_leave_the_column_cache_to_pandas_where_it_would_differ():
    import pandas as pd

    import modelfactory.grouped_map as gm

    def frames(df):
        return lambda s, e: df.iloc[s:e]

    unit = _unit_frame(3)
    assert (gm._column_cacher(unit, frames(unit)) is not None) == _caches_columns()
    if _caches_columns():
        with pd.option_context("mode.copy_on_write", True):
            assert gm._column_cacher(unit, frames(unit)) is None
    twice = pd.DataFrame([[1.0, 2.0]], columns=["a", "a"])  # pandas reads no cache for these
    assert gm._column_cacher(twice, frames(twice)) is None
    labelled = _unit_frame(3)
    labelled.attrs["source"] = "x"  # a column would carry these (``__finalize__``)
    assert gm._column_cacher(labelled, frames(labelled)) is None


def test_apply_groups_collects_extension_columns_and_their_missing_values():
    import pandas as pd

    def func(df):
        k = df["k"].iloc[0]
        if k == "c":  # plain numpy columns in one group, pandas extension arrays in the others
            return pd.DataFrame({"k": np.array([k], dtype=object), "n": np.array([len(df)]), "m": [df["v"].mean()]})
        return pd.DataFrame({"k": pd.array([k], dtype="string"), "n": pd.array([len(df)], dtype="Int64"),
                             "m": pd.array([df["v"].mean()], dtype="Float64")})

    rows, out = _apply(func)
    assert rows["status"] == ["ok"] * 4
    assert out == {"k": ["a", "b", "c", "d"], "n": [2, 1, 3, 1], "m": [1.5, 3.0, 5.0, 7.0]}

    def with_missing(df):  # nullable Int64 holding <NA>: collected as null, not a failed group
        return pd.DataFrame({"k": pd.array([df["k"].iloc[0]], dtype="string"),
                             "n": pd.array([None if len(df) == 1 else len(df)], dtype="Int64"),
                             "m": [float(len(df))]})

    rows, out = _apply(with_missing)
    assert rows["status"] == ["ok"] * 4
    assert out == {"k": ["a", "b", "c", "d"], "n": [2, None, 3, None], "m": [2.0, 1.0, 3.0, 1.0]}


def test_returned_frames_columns_read_off_their_blocks_equal_the_public_columns():
    import pandas as pd

    from modelfactory.grouped_map import _block_columns, _frame_columns

    base = pd.DataFrame({"a": ["x", "y"], "b": [1.5, None], "c": ["u", "v"], "d": [1, 2],
                         "t": pd.to_datetime(["2026-01-01", "2026-01-02"]).tz_localize("UTC"),
                         "e": pd.array([1, None], dtype="Int64"), "f": pd.Categorical(["p", "q"])})
    unconsolidated = pd.DataFrame({"a": ["x", "y"]})
    for name, values in [("b", [1.0, 2.0]), ("c", ["u", "v"]), ("d", [3.0, 4.0])]:
        unconsolidated[name] = values  # one block per column added, not merged
    frames = [base, base[["f", "d", "a", "t", "b", "e", "c"]], base.iloc[1:], unconsolidated,
              pd.DataFrame({"k": ["a"], "n": [1], "m": [0.5]})]
    assert len(unconsolidated._mgr.blocks) > 2  # the case the block walk must order correctly
    for frame in frames:
        names = frame.columns.tolist()
        assert _block_columns(frame, len(names)) is not None
        got = _frame_columns(frame, names, frozenset(range(len(names))))
        for col, name in zip(got, names):
            public = frame[name].array  # what the column is, through the public API
            if public.dtype.kind == "M":  # datetime64, in UTC: Arrow casts it safely
                want = pd.DatetimeIndex(public).tz_localize(None).to_numpy() if public.tz is None \
                    else pd.DatetimeIndex(public).tz_convert("UTC").tz_localize(None).to_numpy()
            elif isinstance(public, pd.arrays.NumpyExtensionArray):
                want = public.to_numpy()
            else:
                want = public.to_numpy(dtype=object, na_value=None)
            assert type(col) is np.ndarray and col.dtype == want.dtype, name
            assert pd.isna(col).tolist() == pd.isna(want).tolist(), name
            assert col[~pd.isna(col)].tolist() == want[~pd.isna(want)].tolist(), name
    # pandas 3's Arrow-backed text into a column that is not text: left to Table.from_pandas,
    # which casts it as Arrow does ("42" -> 42), so a group converts the same on every path
    text = pd.DataFrame({"k": pd.array(["42"], dtype="string[pyarrow]")})
    assert _frame_columns(text, ["k"], frozenset()) is None
    assert _frame_columns(text, ["k"], frozenset([0]))[0].tolist() == ["42"]


def test_missing_values_follow_the_kind_of_value_returned_on_every_path():
    """A DataFrame's NaN and None are missing (null), as in Table.from_pandas and Spark's
    applyInPandas; a float NaN in a dict of arrays is a value.  Whichever path a group takes."""
    import math

    import pandas as pd

    def frames(df):
        k = df["k"].iloc[0]
        out = pd.DataFrame({"k": [None if k == "b" else k], "n": [float("nan") if k == "c" else len(df)],
                            "m": [float("nan")]})
        return out[["m", "n", "k"]] if k == "d" else out  # d: other column order, the careful path

    rows, out = _apply(frames)
    assert rows["status"] == ["ok"] * 4
    assert out == {"k": ["a", None, "c", "d"], "n": [2, 1, None, 1], "m": [None] * 4}

    def mixed(df):
        k = df["k"].iloc[0]
        if k in ("a", "c"):
            return pd.DataFrame({"k": [k], "n": [len(df)], "m": [float("nan")]})
        return {"k": np.array([k], dtype=object), "n": np.array([len(df)]), "m": np.array([float("nan")])}

    rows, out = _apply(mixed)
    assert rows["status"] == ["ok"] * 4 and out["k"] == ["a", "b", "c", "d"]
    assert out["m"][0] is None and out["m"][2] is None  # from frames
    assert math.isnan(out["m"][1]) and math.isnan(out["m"][3])  # from dicts

    def one_bad(df):  # b returns text for a double: the fast path falls back group by group
        k = df["k"].iloc[0]
        return pd.DataFrame({"k": [k], "n": [len(df)], "m": ["oops" if k == "b" else float("nan")]})

    rows, out = _apply(one_bad)
    assert rows["status"] == ["ok", "failed", "ok", "ok"]
    assert out == {"k": ["a", "c", "d"], "n": [2, 3, 1], "m": [None] * 3}


def test_column_labels_and_string_columns_are_read_alike_from_every_kind_of_index_and_array():
    import pandas as pd

    from modelfactory.grouped_map import _plain, labels_check

    same = labels_check(["k", "n", "m"])
    for dtype in (object, "string[pyarrow]", "string[python]", "str"):
        assert same(pd.Index(["k", "n", "m"], dtype=dtype)), dtype
        assert not same(pd.Index(["k", "m", "n"], dtype=dtype)), dtype
        assert not same(pd.Index(["k", "n"], dtype=dtype)), dtype
        assert not same(pd.Index(["k", "n", "m", "x"], dtype=dtype)), dtype
    assert not same(pd.Index([0, 1, 2]))

    class Unlistable:  # Arrow-backed labels that fail if listed: the check must compare arrays
        def __init__(self, index):
            self._data = index._data

        def tolist(self):
            raise AssertionError("the labels were listed")

    assert same(Unlistable(pd.Index(["k", "n", "m"], dtype="string[pyarrow]")))
    pandas3 = int(pd.__version__.split(".")[0]) >= 3  # "str" is pandas 3's string dtype (numpy's before)
    for dtype in ("string[pyarrow]", "string[python]", "Int64", *(["str"] if pandas3 else [])):
        values = ["a", None, "c"] if dtype != "Int64" else [1, None, 3]
        got = _plain(pd.array(values, dtype=dtype), True)
        assert type(got) is np.ndarray and got.dtype == object and got.tolist() == values, dtype


def test_chunks_of_other_dtypes_are_converted_exactly_and_keep_their_missing_values():
    import pandas as pd

    big = 2**53 + 1  # not a float64

    def ints(df):  # int64 in most groups, a float NaN in one: numpy alone would round big
        k = df["k"].iloc[0]
        return pd.DataFrame({"k": [k], "n": [float("nan")] if k == "b" else [big], "m": [1.0]})

    rows, out = _apply(ints)
    assert rows["status"] == ["ok"] * 4 and out["n"] == [big, None, big, big]

    def signs(df):  # uint64 and int64 chunks side by side
        k = df["k"].iloc[0]
        n = np.array([2**62 + 1], np.uint64) if k in ("a", "c") else np.array([2**62 + 3], np.int64)
        return {"k": np.array([k], dtype=object), "n": n, "m": np.array([1.0])}

    rows, out = _apply(signs)
    assert out["n"] == [2**62 + 1, 2**62 + 3, 2**62 + 1, 2**62 + 3]

    def objects(df):  # a frame's object column holding NaN, among dicts: null, as pandas means it
        k = df["k"].iloc[0]
        if k == "a":
            return pd.DataFrame({"k": [k], "n": [1], "m": pd.Series([float("nan")], dtype=object)})
        return {"k": np.array([k], dtype=object), "n": np.array([1]), "m": np.array([1.0], dtype=object)}

    rows, out = _apply(objects)
    assert rows["status"] == ["ok"] * 4 and out["m"] == [None, 1.0, 1.0, 1.0]


def test_an_error_is_described_on_one_line():
    from modelfactory.exceptions import describe_error

    try:
        raise OSError("Couldn't deserialize thrift: x\nDeserializing page header failed.\n")
    except OSError as err:
        text = describe_error(err)
    assert "\n" not in text
    assert text.startswith("OSError: Couldn't deserialize thrift: x; Deserializing page header failed. (at ")


def test_arrow_scalars_returned_from_an_arrow_input_are_their_values():
    """With input="arrow", t["k"][0] and pc.mean(t["v"]) are Arrow scalars: numpy kept them as
    objects and every group failed ("Expected a string or bytes dtype"); they are now their
    values, alone, in a list, or as one row of a list column."""
    import pyarrow.compute as pc

    from modelfactory._schema import parse_schema
    from modelfactory.grouped_map import to_table

    def func(t):
        return {"k": t["k"][0], "n": pa.scalar(t.num_rows), "m": pc.mean(t["v"])}

    rows, out = _apply(func, input="arrow")
    assert rows["status"] == ["ok"] * 4, rows["error"]
    assert out == {"k": ["a", "b", "c", "d"], "n": [2, 1, 3, 1], "m": [1.5, 3.0, 5.0, 7.0]}
    schema = parse_schema("k string, tags array<string>")
    assert to_table({"k": [pa.scalar("a")], "tags": pa.scalar(["x", "y"])}, schema).to_pydict() == {
        "k": ["a"], "tags": [["x", "y"]]}


def test_numbers_into_a_decimal_column_are_exact_or_fail_their_group():
    """A Python or numpy int or float returned into a decimal column failed with Arrow's "Got
    bytestring of length 8 (expected 16)"; it is now the decimal it reads as, and one that the
    column's scale cannot hold fails its group saying so."""
    import decimal

    from modelfactory._schema import parse_schema

    schema = parse_schema("k string, n bigint, m decimal(10,2)")
    values = {"a": 1.5, "b": 2, "c": np.float64(0.1), "d": 1.555}
    rows, out = _apply(lambda g: {"k": g["k"][0], "n": 1, "m": values[g["k"][0]]}, input="numpy", schema=schema)
    assert rows["status"] == ["ok", "ok", "ok", "failed"], rows["error"]
    assert "data loss" in rows["error"][3]
    assert out["m"] == [decimal.Decimal("1.50"), decimal.Decimal("2.00"), decimal.Decimal("0.10")]


def test_an_error_in_code_sent_by_value_is_placed_by_line_and_function():
    # cloudpickle leaves such code no file: "(at <dynamic-code>:10 in _score)" pointed nowhere
    import pickle

    import cloudpickle

    from modelfactory.exceptions import describe_error

    def broken(x):
        raise ValueError(f"scoring is broken for {x}")

    sent = pickle.loads(cloudpickle.dumps(broken))
    assert sent.__code__.co_filename == "<dynamic-code>"
    try:
        sent(3)
    except ValueError as err:
        line = broken.__code__.co_firstlineno + 1
        assert describe_error(err) == (f"ValueError: scoring is broken for 3 (at line {line} of broken, in code sent "
                                       "by value from the client)")


def test_the_reuse_guard_is_done_after_its_probe_when_nothing_comes_back():
    # two columns cut from one fresh array, a pd.NA, a view of the group's input: nothing a later
    # group returns again, so the guard stops (it copied every later group: +1.6 µs a group)
    import pandas as pd

    from modelfactory.grouped_map import _ReuseGuard

    guard, data = _ReuseGuard(), np.arange(100.0)
    for i in range(_ReuseGuard.PROBE):
        arg = {"v": data[i * 10:(i + 1) * 10]}
        both = np.array([arg["v"].mean(), arg["v"].std()])
        guard((both[:1], both[1:], pd.NA, arg["v"][:1], "text", 3), arg)
    assert guard.done and not guard.copying
    again, buf = _ReuseGuard(), np.zeros(1)
    for i in range(2):
        again((buf,), {"v": data})
    assert again.copying and not again.done


def test_the_reuse_guard_takes_a_pandas_groups_own_columns_as_its_input():
    # a pandas group's columns (g["v"], a view of the unit's frame) turned copying on for every
    # group: a Series copy each, +31 µs a group
    import pandas as pd

    from modelfactory.grouped_map import _ReuseGuard, frame_slicer

    unit = pd.DataFrame({"g": np.repeat(np.arange(6), 5), "v": np.arange(30.0)})
    cut, guard = frame_slicer(unit), _ReuseGuard()
    for i in range(_ReuseGuard.PROBE):
        g = cut(i * 5, (i + 1) * 5)
        guard((g["g"], g["v"] * 2), g)
    assert guard.done and not guard.copying
