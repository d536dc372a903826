"""The grouped-map kernel: call a user function on every group of a unit and collect its rows.

Part of the kernel (no Dask here).  The function gets a pandas slice of one per-unit
DataFrame, an Arrow slice, or a dict of numpy views; what it returns is collected
column by column and converted to Arrow once per unit, with a careful per-group
path that pins a bad return value on the group that produced it.
"""
from __future__ import annotations

import json
import time as _time
import weakref
from operator import attrgetter, itemgetter
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .exceptions import GROUP_ERRORS, describe_error
from .models.base import SkipGroup

__all__ = ["apply_groups", "to_table"]


def to_table(out, schema: pa.Schema, from_pandas: bool = False):
    """Turn one group's return value into a table of ``schema``; an Exception if it cannot.

    ``from_pandas``: a dict holds a DataFrame's columns, whose NaN and None are missing."""
    try:
        if isinstance(out, pa.RecordBatch):
            out = pa.Table.from_batches([out])
        if isinstance(out, pa.Table):
            got = out.column_names
            if sorted(got) != sorted(schema.names):
                raise _columns_error(got, schema)
            return _checked(out.select(schema.names).cast(schema), schema)
        if isinstance(out, dict):
            got = list(out)
            if sorted(got) != sorted(schema.names):
                raise _columns_error(got, schema)
            columns = [_dict_column(out[f.name], f, from_pandas) for f in schema]
            ones = [_is_one_value(out[f.name]) for f in schema]
            sizes = {len(c) for c, one in zip(columns, ones) if not one}
            if len(sizes) == 1:  # a scalar beside columns of one length is repeated, as pandas does
                n = sizes.pop()
                columns = [pa.repeat(c[0], n) if len(c) == 1 and n != 1 and one else c
                           for c, one in zip(columns, ones)]
            return _checked(pa.table(columns, schema=schema), schema)
        import pandas as pd

        if isinstance(out, pd.DataFrame):
            # as Spark's applyInPandas takes a frame: no columns and no rows is no rows; columns
            # labelled by no text (0, 1, ...: a RangeIndex) are the schema's, by position
            if len(out.columns) == 0 and len(out) == 0:
                return schema.empty_table()
            if len(out.columns) == len(schema) and not any(isinstance(c, str) for c in out.columns):
                out = out.set_axis(schema.names, axis=1)
            got = [str(c) for c in out.columns]
            if sorted(got) != sorted(schema.names):
                raise _columns_error(got, schema)
            for f in (f for f in schema if f.type.id in _LIST_IDS):
                try:
                    _no_text_rows(out[f.name].to_numpy(), f)
                except ValueError as err:
                    raise ValueError(f"column {f.name!r} ({f.type}): {err}") from None
            # a copy: Arrow takes numeric columns without copying, and a frame the function fills again
            # for the next group (or key) would change rows already taken
            return _checked(pa.Table.from_pandas(out[schema.names].copy(deep=True), schema=schema,
                                                 preserve_index=False), schema)
        raise TypeError(f"the function returned {type(out).__name__}; return a pandas DataFrame, "
                        "a dict of columns or a pyarrow Table")
    except Exception as err:  # noqa: BLE001
        return err


def _checked(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the schema's metadata (not pandas' of the returned frame, which would
    bring back the frame's dtypes in ``to_pandas``), after checking that no column the schema
    says is not nullable holds a null (Arrow does not check; the Parquet writer would fail
    the whole unit)."""
    for f, col in zip(schema, table.columns):
        if not f.nullable and col.null_count:
            raise ValueError(f"column {f.name!r} is not nullable in the schema, but {col.null_count} "
                             f"value{'s are' if col.null_count > 1 else ' is'} missing")
    return table.replace_schema_metadata(schema.metadata)


def _dict_column(value, field: pa.Field, from_pandas: bool) -> pa.Array:
    """One column of a returned dict, or an error that names it.  A nested column (a list,
    struct or map per row) is a sequence of its rows, which numpy would make one 2-d array."""
    try:
        value = _no_arrow_scalars(value, field)
        if pa.types.is_nested(field.type) and not isinstance(value, (pa.Array, pa.ChunkedArray)):
            rows = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
            _no_text_rows(rows, field)
            return pa.array(rows, type=field.type, from_pandas=from_pandas)
        a = _no_fixed_text(_as_1d(value))
        if a.dtype.kind in "biufcmM":  # Arrow would take its memory as it is: a buffer refilled later, rows changed
            a = a.copy()
        if pa.types.is_decimal(field.type) and a.dtype.kind in "iuf":  # numpy's numbers have no decimal path
            import decimal

            a = np.array([decimal.Decimal(str(x)) for x in a.tolist()], dtype=object)
        if a.dtype == object and not from_pandas:  # pandas' NA marker is never a value: missing
            import pandas as pd

            a = np.where(np.frompyfunc(lambda v: v is pd.NA or v is pd.NaT, 1, 1)(a).astype(bool), None, a)
        return pa.array(a, type=field.type, from_pandas=from_pandas) if len(a) else pa.array([], field.type)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"column {field.name!r} ({field.type}): {err}") from err


#: Arrow types whose value is a list: Arrow reads a str (or bytes) given for one as a list
#: of its characters (byte values).
_LIST_IDS = frozenset(t.id for t in (pa.list_(pa.null()), pa.large_list(pa.null()), pa.list_(pa.null(), 1),
                                     pa.list_view(pa.null()), pa.large_list_view(pa.null())))


def _no_text_rows(rows, field: pa.Field) -> None:
    """Refuse a str or bytes given as a row of a list column (``field``): Arrow would make
    ``'red'`` the list ``['r', 'e', 'd']`` and ``b'ab'`` the list ``[97, 98]``."""
    if field.type.id not in _LIST_IDS or (isinstance(rows, np.ndarray) and rows.dtype.kind not in "OUS"):
        return
    for i, v in enumerate(rows):
        if isinstance(v, (str, bytes)):
            raise ValueError(f"row {i} is the {type(v).__name__} {v!r}, not a list: a list column takes a "
                             f"list for each row ([{v!r}] for a row holding {v!r} alone)")


def _columns_error(got, schema) -> ValueError:
    missing = [c for c in schema.names if c not in got]
    extra = [c for c in got if c not in schema.names]
    twice = sorted({c for c in got if list(got).count(c) > 1}, key=list(got).index)
    return ValueError(f"returned columns {got} do not match the schema {schema.names}"
                      + (f"; missing {missing}" if missing else "")
                      + (f"; unexpected {extra}" if extra else "")
                      + (f"; more than one column named {', '.join(map(repr, twice))}" if twice else ""))


def _group_inputs(spec, groups):
    """Yield what the user function gets for each group, as cheaply as the input mode allows.

    A group gets the types it would get on its own (as in Spark's applyInPandas, which
    converts each group by itself): an integer or boolean column is float64 or objects in
    pandas and numpy only in the groups that hold a null in it, not in every group of a
    unit where some group does.  pandas: the groups of each combination of columns with and
    without nulls are converted together; numpy: each such column is converted twice, with
    and without its nulls.
    """
    starts, ends = groups.starts.tolist(), groups.ends.tolist()
    if spec.input == "arrow":
        tbl = groups.table
        for s, e in zip(starts, ends):
            yield tbl.slice(s, e - s)
        return
    risky, codes, patterns = _nulls_by_group(groups)
    if spec.input == "pandas":
        tbl = _index_as_column(groups.table)
        if not risky:
            cut = frame_slicer(tbl.to_pandas())
            for s, e in zip(starts, ends):
                yield cut(s, e)
            return
        # The groups of each pattern are gathered and converted together: every row is converted
        # once, however many patterns there are.
        lengths = groups.ends - groups.starts
        at = np.empty(len(lengths), dtype=np.int64)  # where each group starts in its pattern's frame
        cuts = []
        for code in range(len(patterns)):
            mine = np.flatnonzero(codes == code)
            first = np.concatenate(([0], np.cumsum(lengths[mine])))
            at[mine] = first[:-1]
            rows = np.arange(first[-1]) + np.repeat(groups.starts[mine] - first[:-1], lengths[mine])
            cuts.append(frame_slicer(_filled(tbl.take(pa.array(rows)), risky, patterns[code]).to_pandas()))
        for code, a, n in zip(codes.tolist(), at.tolist(), lengths.tolist()):
            yield cuts[code](a, a + n)
        return
    # numpy: a dict of column arrays (views, no copy where the type allows)
    columns = [(c, _writable(groups.numpy_column(c))) for c in groups.column_names]
    if not risky:
        for s, e in zip(starts, ends):
            yield {c: a[s:e] for c, a in columns}  # a comprehension: 0.4 µs; dict(zip(...)): 0.7
        return
    from .kernel import numpy_column

    filled = {c: _writable(numpy_column(_fill(groups.column(c)))) for c in risky}
    made: dict[int, list] = {}
    for s, e, code in zip(starts, ends, codes.tolist()):
        cols = made.get(code)
        if cols is None:
            clean = {c for c, has in zip(risky, patterns[code]) if not has}
            cols = made[code] = [(c, filled[c] if c in clean else a) for c, a in columns]
        yield {c: a[s:e] for c, a in cols}


def _nulls_by_group(groups) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """The columns whose pandas and numpy type depends on nulls (integers and booleans) that
    hold nulls in this unit; per group a code; per code a pattern: whether groups of that
    code have a null in each of those columns."""
    risky = [f.name for f in groups.schema if (pa.types.is_integer(f.type) or pa.types.is_boolean(f.type))
             and groups.null_count(f.name)]
    if not risky:
        return [], None, None
    has = np.empty((len(groups), len(risky)), dtype=bool)
    for j, c in enumerate(risky):
        nulls = np.concatenate(([0], np.cumsum(pc.is_null(groups.column(c)).to_numpy(zero_copy_only=False))))
        has[:, j] = (nulls[groups.ends] - nulls[groups.starts]) > 0
    patterns, codes = np.unique(has, axis=0, return_inverse=True)
    return risky, codes.reshape(-1), patterns


def _fill(col):
    """A column with its nulls replaced (by zero or False): for groups that have none."""
    return pc.fill_null(col, pa.scalar(False if pa.types.is_boolean(col.type) else 0, col.type))


def _filled(tbl: pa.Table, risky: list[str], pattern: np.ndarray) -> pa.Table:
    """``tbl`` with the columns of ``risky`` that ``pattern`` says have no nulls filled."""
    for c, has in zip(risky, pattern.tolist()):
        if not has:
            tbl = tbl.set_column(tbl.schema.get_field_index(c), tbl.schema.field(c), _fill(tbl[c]))
    return tbl


def _writable(a: np.ndarray) -> np.ndarray:
    """A numpy input a function may change in place (a zero-copy view of Arrow memory is read-only)."""
    return a if a.flags.writeable else a.copy()


def _index_as_column(tbl: pa.Table) -> pa.Table:
    """``tbl`` with a column that pandas wrote as the frame's index (``df.set_index("rid")
    .to_parquet()``: named in the file's pandas metadata) handed over as a column, as the numpy and
    arrow inputs and Spark hand it.  ``to_pandas`` made it the index, which the group frame replaces:
    the column was gone, even when it was the key or named in ``columns=``.  The rest of the
    metadata (the dtypes pandas wrote, ``Int64``...) is kept."""
    meta = tbl.schema.metadata or {}
    raw = meta.get(b"pandas")
    if raw is None or b'"index_columns": []' in raw:
        return tbl
    pandas_meta = json.loads(raw)
    index = pandas_meta.get("index_columns", ())
    names = {c.get("field_name"): c.get("name") for c in pandas_meta.get("columns", ()) if isinstance(c, dict)}
    # a RangeIndex is not a column of the file; an unnamed index (``__index_level_0__``: what a filtered
    # frame keeps) is no column of the data either, and stays the index the group frame replaces
    named = [c for c in index if isinstance(c, str) and names.get(c) is not None
             and not c.startswith("__index_level_")]
    if not named:
        return tbl
    pandas_meta["index_columns"] = [c for c in index if c not in named]
    return tbl.replace_schema_metadata({**meta, b"pandas": json.dumps(pandas_meta).encode()})


def frame_slicer(df) -> Callable[[int, int], Any]:
    """``cut(s, e)``: rows ``s:e`` of ``df`` as a DataFrame indexed ``0 .. e-s-1`` (as Spark's
    applyInPandas gives a group: its position in a unit means nothing), made the way pandas'
    own groupby makes its group frames (a BlockManager slice: about 6 µs a group cheaper than
    ``df.iloc[s:e]``).  Falls back to ``iloc`` if this pandas does it differently.

    Where pandas caches a frame's column Series (pandas 2 without copy-on-write), the columns
    the function read from recent groups are put in each new frame's cache as pandas itself
    would put them there on first access (see :func:`_column_cacher`)."""
    import pandas as pd

    try:
        mgr, make, index = df._mgr, df._constructor_from_mgr, pd.RangeIndex._simple_new
        m = mgr.get_slice(slice(0, 1), axis=1)
        m.axes[1] = index(range(len(m.axes[1])))
        probe = make(m, axes=m.axes)
        if (type(probe) is not type(df) or list(probe.columns) != list(df.columns)
                or not probe.index.equals(pd.RangeIndex(min(1, len(df))))):
            raise TypeError("unexpected slice")
    except Exception:  # noqa: BLE001 - internals moved: the public way
        return lambda s, e: df.iloc[s:e].reset_index(drop=True)

    def frame(s: int, e: int):
        m = mgr.get_slice(slice(s, e), axis=1)
        m.axes[1] = index(range(e - s))  # a new one per group: a user may rename it in place
        return make(m, axes=m.axes)

    cache = _column_cacher(df, frame)
    if cache is None:
        return frame
    wanted: list = []  # the labels to put in each frame's cache
    last = None  # the frame handed out last, its part in learning (0: none; 1, 2: first, second), its rows
    count = 0
    off = False

    def cut(s: int, e: int):
        nonlocal wanted, last, count, off
        if off:
            return frame(s, e)
        if last is not None:  # what the function read from the last group: pandas cached it
            f, step, rows = last
            seen = f._item_cache
            if f._attrs or not f._flags.allows_duplicate_labels or (_UNCLEARED in seen and f._mgr.axes[1] is not rows):
                # The function labels its frames: a column it reads after that carries the labels
                # (pandas' __finalize__), one cached before would not.  Or it changed the rows and
                # pandas left the cache as it was (rows added with .loc under a copy-on-write
                # option_context): a column cached before would not have them.  pandas makes
                # the columns from here.
                off, last, wanted = True, None, []
                return frame(s, e)
            if step == 1:
                wanted = [c for c in seen if c is not _UNCLEARED]
            elif step == 2:  # only what both learning frames read: not a column read now and then
                wanted = cache.usable([c for c in wanted if c in seen])
        f = frame(s, e)
        # The first two groups, and two in every RELEARN, start with an empty cache: so the labels
        # follow the function when it stops reading a column, and a column read in one group
        # (its own column of a wide table, or all of them in a ``df.items()``) is not built for
        # the groups after it.
        step = count % _RELEARN
        count += 1
        step = step + 1 if step < 2 else 0
        if wanted and not step:
            cache(f, wanted)
        # a key no label equals and no read returns: gone if pandas clears the frame's cache
        f._item_cache[_UNCLEARED] = None
        last = (f, step, f._mgr.axes[1])
        return f

    return cut


_RELEARN = 64
_UNCLEARED = object()


def _column_cacher(df, frame) -> Callable[[Any, list], None] | None:
    """``cache(f, labels)``: put in the column cache of ``f``, a group frame of ``df``, the
    Series that pandas would make and cache on the first ``f[label]`` of each label, the
    same way pandas makes them (``BlockManager.iget``, ``DataFrame._box_col_values``,
    ``Series._set_as_cached``) minus its lookups: 3–4 µs a column instead of 7–9 µs, the most
    of a short function's own time that a framework can save it (Spark's applyInPandas gives
    fresh frames).  A function that reads the column gets the cached Series, exactly as it
    would on its second read; one that never reads it costs the 3–4 µs, which is why
    :func:`frame_slicer` caches only the columns the function read from recent groups.

    ``cache.usable(keys)``: those of ``keys`` (what the function read a column by) it can
    cache: a label of ``df`` whose Series made here is what pandas makes itself on a probe
    frame.  A column is probed the first time it is asked about, so a unit pays for the
    columns its function reads, not for every column of a wide table (nor a slicer that hands
    out two groups, as one of each pattern of nulls in :func:`_group_inputs` may).  None where
    pandas keeps no such cache (copy-on-write, pandas 3), where the labels are not unique
    (pandas reads no cache then) or the frame has ``attrs`` (a column would carry them).
    """
    import pandas as pd

    try:
        import pandas._config as pd_config
        from pandas._libs.internals import BlockPlacement
        from pandas.core.internals.managers import SingleBlockManager

        if type(df) is not pd.DataFrame or pd_config.using_copy_on_write() \
                or getattr(pd_config, "warn_copy_on_write", lambda: False)():
            return None
        labels = df.columns
        if not labels.is_unique or len(df) == 0 or df.attrs or not df.flags.allows_duplicate_labels:
            return None
        blknos, blklocs = df._mgr.blknos, df._mgr.blklocs
    except Exception:  # noqa: BLE001 - this pandas keeps its columns otherwise
        return None

    set_attr, from_mgr, ref = object.__setattr__, type(df)._constructor_sliced._from_mgr, weakref.ref
    where: dict = {}  # key -> (block number, place in the block, label), or None: left to pandas
    probes: list = []  # two frames of df to compare a cached Series with pandas' own, made once

    def cache(f, wanted: list) -> None:
        m = f._mgr
        blocks, items, store, is_copy, back = m.blocks, m.axes[1], f._item_cache, f._is_copy, ref(f)
        places = BlockPlacement(slice(0, len(items)))
        for c in wanted:
            b, loc, label = where[c]
            blk = blocks[b]
            col = SingleBlockManager(type(blk)(blk.iget(loc), placement=places, ndim=1, refs=blk.refs), items)
            ser = from_mgr(col, col.axes)
            # what DataFrame._box_col_values, Series._set_as_cached and DataFrame._get_item_cache
            # set (NDFrame.__setattr__ sets these internal names with object.__setattr__): the
            # name is the frame's label, not the key it was read by (np.str_("v") reads "v");
            # __finalize__ copies nothing from a frame without attrs or flags, checked above
            set_attr(ser, "_name", label)
            set_attr(ser, "_cacher", (label, back))
            set_attr(ser, "_is_copy", is_copy)
            store[label] = ser

    def probed(c):
        """``where[c]`` if a Series cached for ``c`` is what pandas makes itself, else None."""
        try:
            j = labels.get_loc(c)
            if type(j) is not int:
                return None
            label = labels[j]
            where[c] = (int(blknos[j]), int(blklocs[j]), label)
            if not probes:
                n = min(2, len(df))
                probes.extend((frame(0, n), frame(0, n)))
            ours, theirs = probes
            cache(ours, [c])
            a, b = ours[c], theirs[c]
            pd.testing.assert_series_equal(a, b)
            held_a, held_b = ours._mgr.blocks[where[c][0]], theirs._mgr.blocks[where[c][0]]
            if (type(a) is not type(b) or type(a._mgr._block) is not type(b._mgr._block)
                    or type(a.name) is not type(b.name) or a.name != b.name
                    or (a.index is ours.index) != (b.index is theirs.index)
                    or a._cacher[0] != b._cacher[0] or a._cacher[1]() is not ours
                    or a._is_copy is not b._is_copy
                    or (a._mgr._block.refs is held_a.refs) != (b._mgr._block.refs is held_b.refs)
                    or np.shares_memory(a._values, held_a.values) != np.shares_memory(b._values, held_b.values)):
                return None
        except Exception:  # noqa: BLE001 - not as pandas makes them: leave the caching to pandas
            return None
        return where[c]

    def usable(keys) -> list:
        out = []
        for c in keys:
            w = where.get(c, False)
            if w is False:
                w = where[c] = probed(c)
            if w is not None:
                out.append(c)
        return out

    cache.usable = usable  # type: ignore[attr-defined]
    return cache


def _frame_columns(out, names, text: frozenset) -> list | None:
    """The columns of a returned DataFrame as arrays, without building a Series per column;
    None if one must be converted by ``Table.from_pandas`` to be converted the same way on
    every path (text into a column of another type: Arrow casts it, ``pa.array`` would not).

    The arrays are read off the frame's blocks (each block holds one or more columns:
    row ``k`` of its values is column ``mgr_locs[k]``), which is what
    ``DataFrame._get_column_array`` does column by column, minus the column-to-block map
    it builds on a fresh frame (about 3 µs of the 5 µs a one-row frame costs that way).
    Boxing each column as a Series would cost ~10 µs.  Falls back to the public way if
    this pandas keeps its columns otherwise.  ``text``: the positions of the schema's
    string columns.
    """
    cols = _block_columns(out, len(names))
    if cols is None:  # internals moved: the public way
        get = getattr(out, "_get_column_array", None)
        cols = [out[c].to_numpy() for c in names] if get is None else [get(j) for j in range(len(names))]
    for j, a in enumerate(cols):
        if type(a) is not np.ndarray:
            a = cols[j] = _plain(a, j in text)
            if a is None:
                return None
    return cols


def _plain(a, text: bool) -> np.ndarray | None:
    """An extension array as numpy: datetimes and durations as datetime64/timedelta64 (UTC
    for a time zone), which Arrow casts safely, as ``Table.from_pandas`` would (Python
    objects would lose a nanosecond timestamp's digits without a word); others (nullable
    ints, pandas 3's strings) as Python objects, missing values as None, which Arrow reads
    as null (their own NA markers, pd.NA or NaN, would not convert).  Arrow-backed strings
    go through their Arrow array (half the cost of ``to_numpy``); into a column that is not
    text: None."""
    arrow = getattr(a, "_pa_array", None)
    if isinstance(arrow, pa.ChunkedArray) and arrow.type.id in _STRING_IDS:
        if not text:
            return None
        out = np.empty(len(arrow), dtype=object)
        out[:] = arrow.to_pylist()
        return out
    if a.dtype.kind in "mM":
        return np.asarray(a._ndarray) if hasattr(a, "_ndarray") else np.asarray(a, dtype=f"{a.dtype.kind}8[ns]")
    return a.to_numpy(dtype=object, na_value=None)


_STRING_IDS = frozenset(t.id for t in (pa.string(), pa.large_string(), pa.string_view()))


def labels_check(names: list[str]) -> Callable[[Any], bool]:
    """``same(columns)``: whether a DataFrame's column labels are exactly ``names``.

    pandas 3 keeps string labels in an Arrow-backed Index, and listing one costs ~5 µs;
    comparing its Arrow array with the names' costs ~1 µs.  Other Indexes are listed.
    """
    ref: list = []  # the names as an Arrow array of the first Arrow-backed labels' string type

    def same(columns) -> bool:
        arrow = getattr(getattr(columns, "_data", None), "_pa_array", None)
        if isinstance(arrow, pa.ChunkedArray):
            if not ref and arrow.type.id in _STRING_IDS:
                ref.append(pa.chunked_array([pa.array(names, type=arrow.type)]))
            if ref and arrow.equals(ref[0]):  # another type or other labels: listed below
                return True
        return columns.tolist() == names

    return same


def _block_columns(out, n: int) -> list | None:
    """``out``'s ``n`` columns read off its blocks, or None if its manager is not made of blocks."""
    try:
        cols: list = [None] * n
        for blk in out._mgr.blocks:
            values, locs = blk.values, blk.mgr_locs.indexer
            locs = range(locs.start, locs.stop, locs.step or 1) if type(locs) is slice else locs.tolist()
            if values.ndim == 2:
                for k, j in enumerate(locs):
                    cols[j] = values[k]
            else:  # a one-column extension block
                (j,) = locs
                cols[j] = values
    except Exception:  # noqa: BLE001 - not a BlockManager as we know it
        return None
    return None if any(c is None for c in cols) else cols


def apply_groups(spec, groups):
    schema, func = spec.out_schema, spec.func
    names = schema.names
    width = len(names)
    # a dict's values in the schema's order, as a tuple (C-level; KeyError if one is missing)
    row_of = itemgetter(*names) if width > 1 else (lambda d: (d[names[0]],))
    same_labels = labels_check(names)
    n = len(groups)
    status, errors = ["ok"] * n, [None] * n  # overwritten for the groups that are not ok
    outs: list[tuple] = []  # per collected group: its columns' values, in the schema's order
    owners: list[int] = []  # group index of each of outs
    framed: list[bool] = []  # whether that one came from a DataFrame (pandas' missing values)
    text = frozenset(j for j, f in enumerate(schema) if f.type.id in _STRING_IDS)
    # group index -> its rows (or the error) from the careful path: converted as soon as it
    # returns, so a function that refills and returns one object gives every group its own
    careful: dict[int, Any] = {}
    slow: dict[int, Any] = {}  # group index -> collected values that the careful path converts
    frame_type = None  # the pandas DataFrame class, once a group has returned one
    # One clock reading per group: a group's seconds run from the end of the group
    # before it, so they include building its input (a slice: about a microsecond) and
    # collecting what it returned (converting a large frame, when it is not left to the end).
    perf = _time.perf_counter
    stamps = [perf()]
    stamp = stamps.append
    guard: _ReuseGuard | None = _ReuseGuard()  # None once the first groups show no object returned twice
    for i, arg in enumerate(_group_inputs(spec, groups)):
        try:  # the group's seconds end once its rows are collected (a large frame's conversion too)
            try:
                out = func(arg)
            except SkipGroup as err:
                status[i], errors[i] = "skipped", str(err)
                continue
            except GROUP_ERRORS as err:  # noqa: BLE001 - recorded per group
                status[i], errors[i] = "failed", describe_error(err)
                continue
            # Fast path: a dict or DataFrame with exactly the schema's columns is collected as
            # a tuple of its values (a dict's are checked all at once at the end; the tuple,
            # not the dict, so that a function may fill and return the same dict every time)
            # and converted once.
            kind = type(out)
            if kind is dict and len(out) == width:  # with every name found below: exactly the schema's
                try:
                    values = row_of(out)
                except KeyError:
                    careful[i] = to_table(out, schema)
                    continue
                if guard is not None:
                    values = guard(values, arg)
                    if guard.done:
                        guard = None
                outs.append(values)
                framed.append(False)
            elif kind is frame_type or (frame_type is None and _is_frame(out)):
                frame_type = kind
                cols = _frame_columns(out, names, text) if same_labels(out.columns) else None
                if cols is None:
                    careful[i] = to_table(out, schema)
                    continue
                # copies: a frame filled again and returned by the next group would change them (a
                # few hundred ns against the tens of µs a frame costs)
                outs.append(tuple(a.copy() if a.base is not None else a for a in cols))
                framed.append(True)
            else:
                careful[i] = to_table(out, schema)
                continue
            owners.append(i)
        finally:
            stamp(perf())
    tables, from_frame = [], set()  # from_frame: groups whose columns, now in a dict, came from a frame
    if owners:
        collected, bad, empty = _chunks(outs, names)
        for k in np.flatnonzero(bad):  # columns of other lengths, or a value that is no column:
            slow[owners[k]] = dict(zip(names, outs[k]))  # pinned on its group below
        if bad.any() or empty.any():  # no rows (an empty list is float64 to numpy): nothing to add
            keep = ~(bad | empty)
            owners, framed, outs = _kept(owners, keep), _kept(framed, keep), _kept(outs, keep)
            collected = [_kept(c, keep) for c in collected]
        try:
            if owners:
                tables.append(_collected_table(collected, framed, schema))
        except Exception:  # noqa: BLE001 - some group returned bad types: find it, group by group
            for k, i in enumerate(owners):
                slow[i] = dict(zip(names, outs[k]))  # as returned: the careful path converts them itself
                if framed[k]:
                    from_frame.add(i)
    for i in sorted(slow):
        careful[i] = to_table(slow[i], schema, from_pandas=i in from_frame)
    for i in sorted(careful):
        t = careful[i]
        if isinstance(t, Exception):
            status[i], errors[i] = "failed", describe_error(t, located=False)
        else:
            tables.append(t)
    result = pa.concat_tables(tables) if tables else schema.empty_table()
    return {"status": status, "error": errors, "seconds": np.diff(stamps)}, result


class _ReuseGuard:
    """What a dict's values go through on the fast path while the unit's first groups run.

    Values are converted when every group of the unit has run, as Python's own ``[f(g) for g
    in groups]`` keeps what ``f`` returns.  A function that fills one buffer again for each
    group and returns it (``buf[0] = m; return {"m": buf}``), a view of it or a Series over
    it, would give every group the last group's values.  So the values of the first
    :attr:`PROBE` groups are kept as copies, and the memory they use is watched (the arrays,
    and what a view, a Series or a list's items look into, other than the group's own input):
    once a later group returns some of it again, every group after it is copied too.  If none
    does, the rest go uncopied and unchecked (the guard is done): the array path pays nothing
    per group for it.  A function that begins to reuse a buffer only after its first groups is
    not caught: what a function returns must stay as it returned it (the guide says so)."""

    PROBE = 4

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.kept: list = []  # the originals watched: alive, so their ids stay theirs
        self.groups = 0
        self.copying = False
        self.done = False

    def __call__(self, values: tuple, arg) -> tuple:
        if not self.copying:
            inputs = _input_memory(arg)
            mine: set[int] = set()  # this group's: two columns cut from one array share it, and that is fine
            for v in values:
                for item in ([v, *v[:16]] if isinstance(v, list) else [v]):
                    mine.update(_memory(item, inputs))
            if mine & self.seen:
                self.copying = True
            self.seen |= mine
            self.kept.append(values)
            self.groups += 1
            if not self.copying and self.groups >= self.PROBE:
                self.done, self.seen, self.kept = True, set(), []
        return tuple(map(_copied, values))


def _input_memory(arg) -> set[int]:
    """Ids of the arrays whose memory the group's input ``arg`` uses (the unit's columns): a
    value that looks into them (``g["k"][:1]``, a pandas group's own column) is no buffer of
    the function's, whatever the groups after it return."""
    if type(arg) is dict:  # numpy input
        return {id(_owner(a)) for a in arg.values() if type(a) is np.ndarray}
    columns = getattr(arg, "columns", None)
    if columns is None or not hasattr(arg, "iloc"):  # an Arrow table: its memory is Arrow's
        return set()
    import contextlib

    out = set()
    for j in range(len(columns)):  # (a pandas frame: a few µs a column, for the probe's groups only)
        with contextlib.suppress(Exception):  # a column numpy cannot view: nothing to exempt
            out.add(id(_owner(np.asarray(arg.iloc[:, j]))))
    return out


def _memory(v, inputs: set[int]) -> list[int]:
    """Ids of what a returned value holds that can change after it is returned: an array and
    the array it looks into (not the group's input), a Series' (or any array-like's) array, a
    list; nothing for a value that cannot change (a number, a string, None, pd.NA)."""
    if type(v) in _SCALARS or v is None or isinstance(v, (str, bytes, tuple, np.generic)):
        return []
    a = v if type(v) is np.ndarray else None
    if a is None and not isinstance(v, list) and hasattr(v, "__array__"):
        try:
            a = np.asarray(v)
        except Exception:  # noqa: BLE001 - not an array after all
            a = None
    marks = [id(v)] if isinstance(v, (list, np.ndarray)) or a is not None else []
    if a is not None:
        owner = id(_owner(a))
        if owner not in inputs:
            marks.append(owner)
    return marks


def _owner(a: np.ndarray):
    """The object whose memory the array ``a`` uses (itself, if it owns it)."""
    return a if a.base is None else a.base


def _copied(v):
    if type(v) is np.ndarray:
        return v.copy()
    if isinstance(v, list):  # a list column's rows: copied too
        return [x.copy() if type(x) is np.ndarray else list(x) if isinstance(x, list) else x for x in v]
    copy = getattr(v, "copy", None)
    return copy() if callable(copy) and hasattr(v, "__array__") and not isinstance(v, np.generic) else v


def _chunks(outs: list[tuple], names: list[str]) -> tuple[list[list], np.ndarray, np.ndarray]:
    """The collected outputs as one list of 1-d arrays per column, a mask of the outputs
    that cannot join them (columns of different lengths, or a value that is no column: a
    ragged list), and a mask of those with no rows.  The values are checked in bulk (type,
    dimensions, length: a C loop each) rather than one by one; anything but a 1-d ndarray
    (a scalar, a list, a Series) becomes an array as ``np.atleast_1d`` makes it, and a
    scalar beside columns of one length is repeated to that length, as pandas'
    ``DataFrame`` repeats it."""
    bad = np.zeros(len(outs), dtype=bool)
    collected, lengths, scalars = [], [], []  # scalars: per column, which values were one value
    for j in range(len(names)):
        values = list(map(itemgetter(j), outs))
        kinds = set(map(type, values))
        one = None
        if len(kinds) == 1 and kinds <= _SCALARS:  # one row a group (a dict of scalars): in bulk
            kind = next(iter(kinds))
            column = np.array(values, dtype=object if issubclass(kind, (str, bytes)) else None)
            # Python ints past int64's range (uint64's) among ones in it come out as float64,
            # rounded: those are converted one by one, each as int64, uint64 or objects
            if not (kind is int and column.dtype.kind == "f"):
                values, kinds, one = list(column.reshape(-1, 1)), {np.ndarray}, True
        if kinds != {np.ndarray} or set(map(attrgetter("ndim"), values)) != {1}:
            one = np.fromiter(map(_is_one_value, values), dtype=bool, count=len(values))
            values = [v if type(v) is np.ndarray and v.ndim == 1 else _as_column(v) for v in values]
            for k in [k for k, v in enumerate(values) if v is None]:
                bad[k], values[k] = True, _NO_COLUMN
        collected.append(values)
        scalars.append(one)
        lengths.append(np.fromiter(map(len, values), dtype=np.int64, count=len(values)))
    uneven = np.zeros(len(outs), dtype=bool)
    for ln in lengths[1:]:
        uneven |= ln != lengths[0]
    if uneven.any() and any(one is not None for one in scalars):
        _repeat_scalars(np.flatnonzero(uneven & ~bad), collected, lengths, scalars, uneven)
    bad |= uneven
    return collected, bad, (lengths[0] == 0) & ~bad


def _is_one_value(v) -> bool:
    """Whether a returned value is one value (a scalar, a 0-d array) rather than a column."""
    if isinstance(v, (str, bytes)):
        return True
    if isinstance(v, (list, tuple, np.ndarray)):
        return getattr(v, "ndim", 1) == 0
    try:
        return np.ndim(v) == 0
    except Exception:  # noqa: BLE001 - e.g. a ragged sequence: no value
        return False


def _repeat_scalars(rows, collected, lengths, scalars, uneven) -> None:
    """In the outputs ``rows`` (whose columns differ in length), repeat each single value to
    the one length that all their other columns have, and clear their mark in ``uneven``."""
    for k in rows.tolist():
        one = [s is True or (s is not None and bool(s[k])) for s in scalars]
        others = {int(ln[k]) for ln, o in zip(lengths, one) if not o}
        if len(others) != 1:
            continue  # columns of different lengths, or only scalars: as before
        n = others.pop()
        for j, o in enumerate(one):
            if o and lengths[j][k] == 1:
                collected[j][k] = np.repeat(collected[j][k], n)
                lengths[j][k] = n
        uneven[k] = any(int(ln[k]) != n for ln in lengths)


_NO_COLUMN = np.zeros(0)
# the types of a value that is one row, converted together as numpy converts each alone
_SCALARS = frozenset({float, int, bool, str, np.float64, np.float32, np.int64, np.int32, np.bool_, np.str_})


def _no_arrow_scalars(value, field: pa.Field | None = None):
    """Arrow scalars (what indexing an Arrow input or ``pc.mean`` gives) as Python values, alone
    or in a list: numpy would keep them as objects Arrow cannot read back.  One for a nested
    ``field`` is one row of it; with no field to say so, a nested one stays as it is."""
    def plain(v):
        if isinstance(v, pa.Scalar) and (field is not None or not pa.types.is_nested(v.type)):
            return v.as_py()
        return v

    if isinstance(value, pa.Scalar):
        return [value.as_py()] if field is not None and pa.types.is_nested(field.type) else plain(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, pa.Scalar) for v in value):
        return [plain(v) for v in value]
    return value


def _as_column(v) -> np.ndarray | None:
    try:
        return _as_1d(_no_arrow_scalars(v))
    except Exception:  # noqa: BLE001 - e.g. a ragged list: its group takes the careful path
        return None


def _as_1d(v) -> np.ndarray:
    """``np.atleast_1d(v)``, but a str or bytes, or a list or tuple of them only, becomes
    an array of Python objects: numpy's fixed-width text drops trailing NUL characters
    ("a\\x00" became "a", b"x\\x00" b"x")."""
    if isinstance(v, (str, bytes)):
        return np.array([v], dtype=object)
    if type(v) in (list, tuple) and v and isinstance(v[0], (str, bytes)) \
            and all(isinstance(x, (str, bytes)) for x in v):
        return np.array(v, dtype=object)
    return np.atleast_1d(v)


def _no_fixed_text(a: np.ndarray) -> np.ndarray:
    """numpy's fixed-width text (``<U``: what ``np.array`` makes of strs) as Python strs.
    Arrow reads such an array up to a NUL character, and into a binary column takes each
    value's UCS-4 bytes up to the first zero byte ("ab" became b"a")."""
    return a.astype(object) if a.dtype.kind == "U" else a


def _kept(items: list, keep: np.ndarray) -> list:
    return [x for x, k in zip(items, keep.tolist()) if k]


def _collected_table(collected: list[list], framed: list[bool], schema: pa.Schema) -> pa.Table:
    """The fast path's chunks as one table.  Missing values follow the kind of return value,
    as on the careful path (``Table.from_pandas`` / ``pa.array``) and in Spark's applyInPandas:
    in a DataFrame's columns NaN and None are missing (null); in a dict of arrays a float
    NaN is a value."""
    every, some = all(framed), any(framed)
    mixed = some and not every
    rows_framed = None
    arrays = []
    for chunks, field in zip(collected, schema):
        if field.type.id in _LIST_IDS:
            for c in chunks:
                _no_text_rows(c, field)  # the careful path names the group
        dtypes = {c.dtype for c in chunks}
        if any(d.kind == "U" for d in dtypes):
            chunks = [_no_fixed_text(c) for c in chunks]
            dtypes = {c.dtype for c in chunks}
        kind = next(iter(dtypes)).kind if len(dtypes) == 1 else None
        if kind is None or (mixed and kind == "O"):
            # chunks of other dtypes (numpy would round int64 with float64, or int64 with
            # uint64, to float64), or objects from frames among objects from dicts: one by one
            arrays.append(pa.concat_arrays([pa.array(c, type=field.type, from_pandas=f)
                                            for c, f in zip(chunks, framed)]))
            continue
        values = np.concatenate(chunks)
        if every:
            arrays.append(pa.array(values, type=field.type, from_pandas=True))
        elif mixed and kind == "f":
            if rows_framed is None:
                rows_framed = np.repeat(np.asarray(framed), [len(c) for c in chunks])
            arrays.append(pa.array(values, type=field.type, mask=np.isnan(values) & rows_framed))
        else:
            arrays.append(pa.array(values, type=field.type))
    return _checked(pa.table(arrays, schema=schema), schema)


def _is_frame(out) -> bool:
    """A pandas DataFrame (exactly that class: subclasses take the careful path)."""
    import pandas as pd

    return type(out) is pd.DataFrame
