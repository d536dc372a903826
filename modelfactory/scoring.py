"""The scoring kernel: what one work unit does to score new rows with stored models.

Like :mod:`modelfactory.kernel`, plain functions with no Dask in them.  A unit
reads its slice of the new data, finds the store parts that hold models for
its groups (through the run's leaf index, so it never reads the whole store),
verifies their checksums, and scores every group.  Groups without a usable
model are reported as ``skipped`` with the reason, never dropped.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time as _time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._io import Location, PartInfo, hive_folder, parquet_bytes
from .dataset import read_files
from .exceptions import GROUP_ERRORS, StoreError
from .kernel import (STATUS, Groups, JobSpec, UnitResult, _floats, _problems, _times, describe_error, one_thread,
                     split_groups)
from .models.base import SeriesBatch, checked_scores
from .plan import WorkUnit

__all__ = ["ModelSource", "score_unit", "score_table", "SCORE_COLUMNS", "loose_key_matches", "loose_key_hint"]

SCORE_COLUMNS = ("expected", "lower", "upper", "score", "is_anomaly")


def no_model_reason(run_id: str) -> str:
    """The reason of a group skipped because run ``run_id`` holds no model under its key."""
    return f"no model for this group in run {run_id}"


@dataclass(frozen=True)
class ModelSource:
    """Where a scoring unit finds its models: one committed run of a store."""

    store: Location
    run_id: str
    model: str
    serializer: str
    parts: tuple  # manifest part dicts
    index: dict  # leaf key (tuple) -> indices into parts; empty: every part may hold any group
    leaf_keys: tuple[str, ...]  # the key columns that the index is keyed by
    trust: bool = False
    # An index too big to send with every unit (a folder per group: a million leaves pickle to
    # some 20 MB, and Dask sends and unpickles a task's arguments once per task): ``index`` is
    # empty, and each worker process reads it from the run's manifest once (:func:`leaf_lookup`),
    # checked against this digest of the manifest the client verified.
    index_digest: str = ""
    # A run trained without key folders (its groups spread over the units by Dask's shuffle):
    # per part the shuffle partition it holds (None: any group), out of ``n_buckets``, and the
    # stored key types that the partition was computed from.  Empty: read every part.
    buckets: tuple = ()
    n_buckets: int = 0
    key_types: tuple = ()


def load_model_rows(src: ModelSource, groups: Groups, by: tuple[str, ...],
                    extra: tuple[str, ...] = ()) -> dict[tuple, dict]:
    """Read the stored rows for the unit's groups: {key tuple: {"status", "error", "model", *extra}}.

    Only the parts that the run's leaf index names for these groups are read,
    each checked against its checksum.  The unit's keys are matched as the
    stored key types (see :func:`stored_keys`), but the dict is keyed by the
    unit's own key tuples (:meth:`Groups.key_tuples`).
    """
    from .store import read_part

    mine = groups.key_tuples()
    lookup = leaf_lookup(src)
    if lookup and src.leaf_keys:
        # The index holds the values of the training data's Hive folders, which are text:
        # a leaf of an int64 column (7) is looked up as its text ("7").
        pos = [by.index(k) for k in src.leaf_keys]
        leaves = {tuple(str(k[i]) for i in pos) for k in mine}  # the index is keyed by text
        wanted = sorted({i for leaf in leaves for i in lookup.get(leaf, ())})
    else:
        wanted = _bucket_parts(src, groups, by)
    names = ["status", "error", "model", *extra]
    out: dict[tuple, dict] = {}
    as_stored: dict[tuple, tuple] = {}  # stored key types -> (value set per key, stored tuple -> unit's tuple)
    todo, done = list(wanted), set()
    placed = 0  # groups of the parts read that sit in the partition the manifest names for their part
    while todo:
        i = todo.pop(0)
        done.add(i)
        t = read_part(src.store, src.parts[i])
        t = _plain(t.select([*by, *[c for c in names if c in t.column_names]]), by)
        if src.n_buckets and i < len(src.buckets) and src.buckets[i] is not None:
            placed += t.num_rows
        if len(done) < len(src.parts) and not _holds_its_bucket(src, i, t, by):
            # the shuffle's partitions cannot be computed again here (another Dask or pandas than
            # training had, other key types): any part may hold any of the unit's groups
            import logging

            logging.getLogger("modelfactory").warning(
                "part %s of run %s holds groups of other shuffle partitions than the manifest says: "
                "reading every part of the run", src.parts[i].get("path"), src.run_id)
            todo = [j for j in range(len(src.parts)) if j not in done]
        types = tuple(t.schema.field(k).type for k in by)
        if types not in as_stored:
            as_stored[types] = stored_keys(groups.keys, mine, by, types, src.run_id)
        value_sets, unit_key = as_stored[types]
        mask = None
        for k in by:  # keep only this unit's groups
            m = pc.is_in(t[k], value_set=value_sets[k])
            mask = m if mask is None else pc.and_(mask, m)
        t = t.filter(mask)
        cols = [t[k].to_pylist() for k in by]
        values = {c: (t[c].to_pylist() if c in t.column_names else [None] * t.num_rows) for c in names}
        for j, key in enumerate(zip(*cols)):
            if key in unit_key:
                out[unit_key[key]] = {c: values[c][j] for c in names}
        if not todo and placed < 2 and len(out) < len(mine) and len(done) < len(src.parts) and not lookup:
            # The parts read held fewer than two groups where the manifest says: an empty part agrees
            # with any hash, and one group with another Dask's hash once in n.  That is too little to
            # tell that this Dask hashes as training's did, and a group with a model must not be
            # called skipped: the unit reads the other parts too.
            placed = 2
            todo = [j for j in range(len(src.parts)) if j not in done]
    return out


#: Leaves up to which a run's leaf index travels with each unit (:attr:`ModelSource.index`);
#: past it, each worker process reads it from the manifest once (about 0.5 MB pickled here).
INLINE_LEAVES = 20_000


def lookup_of(parts_leaves: list) -> dict[tuple, list[int]]:
    """{leaf as a tuple of text: the indices of the parts that hold it}, from a manifest's
    ``index["parts"]`` (per part, its leaves)."""
    lookup: dict = {}
    for i, leaves in enumerate(parts_leaves):
        for leaf in leaves:  # as text: Hive folder values, whatever type the data's keys have
            lookup.setdefault(tuple(str(v) for v in leaf), []).append(i)
    return lookup


_lookups: dict[tuple, dict] = {}  # this process's leaf indexes read from manifests (the last two)
_lookups_lock = threading.Lock()


def leaf_lookup(src: ModelSource) -> dict[tuple, list[int]]:
    """The leaf index of ``src``: the one it carries, or, for a big one, the one in its run's
    manifest, read once per process (per run) and checked against :attr:`ModelSource.index_digest`."""
    if src.index or not src.index_digest:
        return src.index
    import json

    from .exceptions import IntegrityError
    from .store import _digest_of, leaf_index

    key = (src.store.url, src.run_id, src.index_digest)
    with _lookups_lock:  # the unit threads of a worker read it once between them
        if key not in _lookups:
            rel = f"runs/{src.run_id}/manifest.json"
            body = json.loads(src.store.read_bytes(rel))
            body.pop("checksum", None)
            if _digest_of(body) != src.index_digest:
                raise IntegrityError(f"The manifest of run {src.run_id!r} in {src.store.url!r} changed after this "
                                     "job read it: it was rewritten meanwhile. Run the job again.")
            while len(_lookups) >= 2:
                _lookups.pop(next(iter(_lookups)))
            _lookups[key] = lookup_of(leaf_index(body)["parts"])
        return _lookups[key]


def _bucket_parts(src: ModelSource, groups: Groups, by: tuple[str, ...]) -> list[int]:
    """The parts that can hold the unit's groups, for a run without a leaf index: with the
    shuffle partitions of the run (:attr:`ModelSource.buckets`), the parts of the partitions its
    keys (as the stored key types) hash to, and those that hold any group; else every part."""
    every = list(range(len(src.parts)))
    if not (src.n_buckets and src.key_types and len(src.buckets) == len(src.parts)):
        return every
    from .run import shuffle_buckets

    cast, _ = keys_as_stored(groups.keys, by, src.key_types, src.run_id)
    keys = pa.table(dict(zip(by, cast)))
    some_null = functools.reduce(pc.or_, [pc.is_null(c) for c in cast])
    keys = keys.filter(pc.invert(some_null))  # a value with no stored equivalent matches no model
    mine = shuffle_buckets(keys, src.n_buckets) if keys.num_rows else np.zeros(0, np.int64)
    if mine is None:
        return every
    hit = set(np.unique(mine).tolist())
    return [i for i, b in enumerate(src.buckets) if b is None or b in hit]


def _holds_its_bucket(src: ModelSource, i: int, part: pa.Table, by: tuple[str, ...]) -> bool:
    """Whether every group of part ``i`` (its key columns as read) hashes to the partition that
    the manifest names for it; True for a run without partitions, or a part of any group."""
    b = src.buckets[i] if src.n_buckets and i < len(src.buckets) else None
    if b is None or not part.num_rows:
        return True
    from .run import shuffle_buckets

    got = shuffle_buckets(part.select(list(by)), src.n_buckets)
    return got is not None and bool((got == b).all())


def _plain(table: pa.Table, by) -> pa.Table:
    """``table`` with its dictionary-encoded (categorical) key columns as their values:
    ``is_in`` takes no dictionary (as in :func:`modelfactory.kernel.keys_condition`)."""
    for k in by:
        i = table.schema.get_field_index(k)
        if pa.types.is_dictionary(table.schema.field(i).type):
            col = table[k]
            table = table.set_column(i, pa.field(k, col.type.value_type), col.cast(col.type.value_type))
    return table


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    return str(t)


# Key types that differ between the data and a store but whose values convert exactly, so a key
# is matched as the stored type: 7 and "7" (a Hive folder), timestamps in any unit, or in any two
# time zones (never a zone and none: check_key_type), dates and their ISO text.
_CONVERTIBLE = {frozenset(p) for p in (("integer",), ("string",), ("timestamp",), ("date",),
                                        ("integer", "string"), ("date", "string"))}


def check_key_type(name: str, data: pa.DataType, stored: pa.DataType, run_id: str) -> None:
    """Refuse a key column whose type in the data cannot be matched with its type in the store.
    A column of type null (pandas writes an empty text column so: an empty scoring window) holds
    no value to match, and null keys are refused where rows have them."""
    from .exceptions import SchemaError

    if pa.types.is_null(data):
        return
    if pa.types.is_timestamp(data) and pa.types.is_timestamp(stored) and (data.tz is None) != (stored.tz is None):
        zoned, naive = ("the data", f"run {run_id} of the store") if data.tz else (f"run {run_id} of the store", "the data")
        raise SchemaError(
            f"The key column {name!r} is {data} in the data but {stored} in run {run_id} of the store: times "
            f"with a time zone ({zoned}) and without one ({naive}) cannot be matched, since which instants the "
            f"times without a zone mean is not known (local wall-clock times read as UTC would give every "
            f"group another group's model). Write {name!r} as {stored} (pandas: .dt.tz_localize(...) or "
            ".dt.tz_convert('UTC').dt.tz_localize(None)), or train again on data like this.")
    if frozenset((_kind(data), _kind(stored))) not in _CONVERTIBLE:
        raise SchemaError(
            f"The key column {name!r} is {data} in the data but {stored} in run {run_id} of the store: "
            f"its values cannot be matched with the stored keys. Cast {name!r} to {stored} (or train "
            "again on data like this).")


def stored_keys(keys: pa.Table, tuples: list[tuple], by: tuple[str, ...], types: tuple,
                run_id: str) -> tuple[dict, dict]:
    """The unit's keys (one row per group; ``tuples``: the same as Python tuples) as the stored
    key types: per key column the values to look for, and {stored key tuple: the unit's key
    tuple}.  A value that has no exact equivalent of the stored type (``"07"`` or ``"x"`` for
    an int64 key, a timestamp with nanoseconds for a microsecond one) matches no stored key."""
    cast, changed = keys_as_stored(keys, by, types, run_id)
    stored = zip(*[c.to_pylist() for c in cast]) if changed else tuples  # the same values, unless cast
    unit_key = {s: key for s, key in zip(stored, tuples) if None not in s}
    return {k: pc.unique(c.drop_null()) for k, c in zip(by, cast)}, unit_key


def keys_as_stored(keys: pa.Table, by: tuple[str, ...], types, run_id: str) -> tuple[list[pa.Array], bool]:
    """Each key column of ``keys``, decoded, as its stored type in ``types``: null where a value
    has no exact equivalent there.  Returns the columns and whether any had to be cast.  Pairs of
    types that can never match are refused (:func:`check_key_type`)."""
    cast, changed = [], False
    for k, to in zip(by, types):
        col = keys[k].combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if pa.types.is_null(col.type):  # an empty text column as pandas writes it: no value to match
            col, changed = pa.nulls(len(col), to), True
        elif col.type != to:
            check_key_type(k, col.type, to, run_id)
            col, changed = _exactly(col, to), True
        cast.append(col)
    return cast, changed


_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError)


def _exactly(col: pa.Array, to: pa.DataType) -> pa.Array:
    """``col`` cast to ``to``, null where a value does not convert there and back unchanged."""
    out = _cast_or_null(col, to)
    try:
        same = pc.fill_null(pc.equal(pc.cast(out, col.type), col), False)
    except _CAST_ERRORS:
        return pa.nulls(len(col), to)
    return pc.if_else(same, out, pa.nulls(len(out), to))


def _cast_or_null(col: pa.Array, to: pa.DataType) -> pa.Array:
    """``col`` cast to ``to``, null where a value does not convert at all ("x" to an integer).
    A failing cast is retried on each half: a few such values among a million cost a few dozen
    casts, not one a value."""
    try:
        return pc.cast(col, to)
    except _CAST_ERRORS:
        if len(col) <= 1:
            return pa.nulls(len(col), to)
    if len(col) <= 16:  # mostly failures, likely: one cast a value from here, not two
        return pa.concat_arrays([_cast_or_null(col.slice(j, 1), to) for j in range(len(col))])
    half = len(col) // 2
    return pa.concat_arrays([_cast_or_null(col.slice(0, half), to), _cast_or_null(col.slice(half), to)])


def stored_key_types(src: ModelSource, by: tuple[str, ...]) -> dict[str, pa.DataType]:
    """The key types of a committed run, from the footer of its first part (nothing else is read)."""
    from .store import part_key_types

    return part_key_types(src.store, src.parts[0], by) if src.parts else {}


def check_key_types(src: ModelSource, by: tuple[str, ...], schema: pa.Schema) -> None:
    """Refuse, before any unit runs, data whose key types cannot be matched with the store's."""
    for k, stored in stored_key_types(src, by).items():
        if k in schema.names and schema.field(k).type != stored:
            check_key_type(k, schema.field(k).type, stored, src.run_id)


def _decode(src: ModelSource, blob: bytes):
    if src.serializer == "native":
        from .models import stored_class

        return stored_class(src.model).from_bytes(blob)
    from .store import unpickle_model

    return unpickle_model(blob, src.run_id)


def _score_all(fitted: list, batch: SeriesBatch, cols: dict, status: list, errors: list,
               seconds: np.ndarray) -> None:
    """Score every group that has a model, in one batch per model class when the class can;
    a batch that raises is scored again group by group, so only the bad groups fail (a class
    that scores in batches only, with no ``_score`` of its own, fails all its groups with the
    batch's error)."""
    from .models.base import Model

    by_class: dict[type, list[int]] = {}
    for i, m in enumerate(fitted):
        if m is not None:
            by_class.setdefault(type(m), []).append(i)
    for cls, idx in by_class.items():
        t0 = _time.perf_counter()
        mine = set(idx)
        try:
            # held to the rules of Model.score: a class of the user's may score in batches its own way
            out = checked_scores(cls.score_batch([m if i in mine else None for i, m in enumerate(fitted)], batch),
                                 len(batch.values), f"{getattr(cls, '__name__', 'the model')}.score_batch",
                                 "one value per row of the batch")
            for i in idx:
                s, e = int(batch.offsets[i]), int(batch.offsets[i + 1])
                for c in SCORE_COLUMNS:
                    cols[c][s:e] = out[c][s:e]
                status[i] = "ok"
            lengths = np.diff(batch.offsets)[idx].astype(np.float64)
            seconds[idx] = (_time.perf_counter() - t0) * lengths / max(1.0, lengths.sum())
        except GROUP_ERRORS as batch_err:  # noqa: BLE001 - find the group(s) responsible
            alone = getattr(cls, "_score", None) is not Model._score  # it can score one group by itself
            for i in idx:
                if not alone:  # every group of the batch fails with the batch's own error
                    status[i], errors[i] = "failed", describe_error(batch_err)
                    continue
                t1 = _time.perf_counter()
                y, t, X = batch.series(i)
                try:
                    out = fitted[i].score(y, t=t, X=X)
                    s, e = int(batch.offsets[i]), int(batch.offsets[i + 1])
                    for c in SCORE_COLUMNS:
                        cols[c][s:e] = out[c]
                    status[i] = "ok"
                except GROUP_ERRORS as err:  # noqa: BLE001 - recorded per group
                    status[i], errors[i] = "failed", describe_error(err)
                seconds[i] = _time.perf_counter() - t1


def _fail_repeated_times(groups: Groups, raw: np.ndarray, seconds: np.ndarray, fitted: list, status: list,
                         errors: list) -> None:
    """Fail the groups whose model is one of a series in time and whose rows repeat a time, as
    training fails them: most often a key missing from ``by`` (or a batch of rows appended
    twice), whose rows were scored, each counted as an anomaly twice, without a word.  ``raw``
    and ``seconds``: the time column as :func:`kernel._times` gives them."""
    from .kernel import _needs_time, repeated_times

    timed = np.array([m is not None and _needs_time(m) for m in fitted], dtype=bool)
    if not timed.any():
        return
    name = getattr(fitted[int(np.flatnonzero(timed)[0])], "name", "the model")
    for i, why in repeated_times(raw, seconds, groups, name, only=timed).items():
        fitted[i], status[i], errors[i] = None, "failed", why


def _nothing_scored(cols: dict, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per group (rows ``starts[i]:ends[i]``), whether the model scored none of its rows: no
    expected value, no score, no flag; False for a group of no rows.  (holt_winters, ets,
    sarimax and autoencoder do not score the training range: a group scored on its own training
    rows was ``ok`` with 0 anomalies, a 50-sigma spike in it unseen.)  In bulk: a million groups
    are a unit's work, and one check each would cost seconds."""
    return _none_in_group(np.isfinite(cols["expected"]) | (cols["score"] > 0) | cols["is_anomaly"], starts, ends)


def _all_missing(y: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per group, whether every one of its values is missing (NaN: a null read as one); False for
    a group of no rows.  An infinite value is a value (it scores 1)."""
    return _none_in_group(~np.isnan(y), starts, ends)


def _none_in_group(some: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Per group (rows ``starts[i]:ends[i]``), whether ``some`` holds for none of its rows; False
    for a group of no rows."""
    out = np.zeros(len(starts), dtype=bool)
    rows = ends > starts
    if rows.any():
        out[rows] = ~np.logical_or.reduceat(some, starts[rows])
    return out


def _unscored_reason(model, t: np.ndarray | None, n: int) -> str:
    name = getattr(model, "name", type(model).__name__)
    last, step = getattr(model, "t_last_", None), getattr(model, "step_", 0)
    if t is not None and last is not None and step and len(t) and int(np.max(t)) < int(last) + int(step) / 2:
        end = np.datetime64(int(last), "s").astype(str)
        return (f"none of its {n} rows is after the end of training ({end} UTC): {name} scores only "
                f"rows after it, not its own training range; score newer rows (or train 'seasonal', "
                f"which scores any time)")
    if getattr(model, "input", None) == "window" and last is not None:  # the autoencoder
        end = np.datetime64(int(last), "s").astype(str)
        return (f"none of its {n} rows could be scored: {name} reconstructs a point from windows of "
                f"{model.window} steps of mostly real values, and these rows come after a gap since the end "
                f"of training ({end} UTC) with too few steps around them: score at least {model.window} "
                f"consecutive steps at a time")
    return (f"none of its {n} rows could be scored: {name} expected no value for any of them "
            f"(for a forest, rows whose features are all missing; for a forecasting model, rows at or "
            f"before the end of training or too far after it)")


def score_unit(spec: JobSpec, unit: WorkUnit) -> UnitResult:
    t0 = _time.perf_counter()
    table = read_files(spec.source, unit.paths, list(spec.columns), spec.filter, encode=spec.by, known=unit.known)
    return score_table(spec, unit.id, table, t0=t0)


def score_table(spec: JobSpec, unit_id: str, table: pa.Table, *, t0: float | None = None) -> UnitResult:
    t0 = _time.perf_counter() if t0 is None else t0
    src: ModelSource = spec.models
    with one_thread():
        groups = split_groups(table, spec.by, spec.time)
        models = load_model_rows(src, groups, spec.by)
        tbl = groups.table
        y = _floats(tbl[spec.target])
        t, unusable, raw = _times(spec, groups) if spec.time else (None, {}, None)
        X = np.column_stack([_floats(tbl[f]) for f in spec.features]) if spec.features else None
        n = tbl.num_rows
        cols = {c: np.full(n, np.nan) for c in SCORE_COLUMNS[:4]}
        cols["is_anomaly"] = np.zeros(n, dtype=bool)
        ng = len(groups)
        status: list = [None] * ng
        errors: list = [None] * ng
        seconds = np.zeros(ng)
        fitted: list = [None] * ng
        for i, key in enumerate(groups.key_tuples()):
            row = models.get(key)
            if row is None:
                status[i], errors[i] = "skipped", no_model_reason(src.run_id)
            elif row["status"] != "ok":
                status[i] = "skipped"
                errors[i] = f"no model: training {row['status']} in run {src.run_id} ({row['error']})"
            elif i in unusable:  # a missing time: the group fails alone, as in training
                status[i], errors[i] = "failed", unusable[i]
            else:
                try:
                    fitted[i] = _decode(src, row["model"])
                except Exception as err:  # noqa: BLE001 - recorded per group
                    status[i], errors[i] = "failed", describe_error(err)
        if t is not None:
            _fail_repeated_times(groups, raw, t, fitted, status, errors)
        batch = SeriesBatch(y, np.concatenate((groups.starts, [n])), t, X)
        _score_all(fitted, batch, cols, status, errors, seconds)
        for i in [i for i, st in enumerate(status) if st is None]:  # stored bytes that hold no model
            status[i], errors[i] = "failed", "the stored model bytes decode to no model (None)"
        for i in np.flatnonzero(_nothing_scored(cols, groups.starts, groups.ends)).tolist():
            if status[i] == "ok" and getattr(fitted[i], "expects_what_it_scores", False):
                s, e = int(groups.starts[i]), int(groups.ends[i])
                status[i], errors[i] = "skipped", _unscored_reason(fitted[i], None if t is None else t[s:e], e - s)
        # A series gone silent (every value missing) was "ok, 0 anomalies": a healthy one, to read.
        # It is skipped, and its rows are still written: the expected band of rows yet to come (a
        # forecast's use) has no values either.
        silent = np.zeros(ng, dtype=bool)
        for i in np.flatnonzero(_all_missing(y, groups.starts, groups.ends)).tolist():
            # (a detector that does not read the target scores its rows on their features)
            if status[i] == "ok" and fitted[i].judges_target():
                silent[i] = True
                status[i] = "skipped"
                errors[i] = (f"every one of its {int(groups.ends[i] - groups.starts[i])} {spec.target!r} values is "
                             "missing (NaN or null): nothing to score; its rows carry the expected values")
        scored = np.repeat(np.array([st == "ok" for st in status], dtype=bool), groups.ends - groups.starts)
        written = scored | np.repeat(silent, groups.ends - groups.starts)
        flags = cols["is_anomaly"] & scored
        anomalies = np.add.reduceat(flags, groups.starts).astype(np.int64) if n else np.zeros(0, np.int64)
        # fmax: a NaN score (a user's score_batch) is not a group's largest
        top = np.fmax.reduceat(np.where(scored, cols["score"], -1.0), groups.starts) if n else np.zeros(0)
        max_score = [float(v) if v >= 0 else None for v in top.tolist()]
    res = UnitResult(unit_id, groups=len(groups), rows=n, anomalies=int(anomalies.sum()))
    for st in STATUS:
        res.counts[st] = status.count(st)
    gt = groups.keys.append_column("status", pa.array(status, pa.string()))
    gt = gt.append_column("error", pa.array(errors, pa.string()))
    gt = gt.append_column("rows", pa.array((groups.ends - groups.starts).astype(np.int64)))
    gt = gt.append_column("seconds", pa.array(np.asarray(seconds, dtype=np.float64)))
    gt = gt.append_column("anomalies", pa.array(anomalies))
    gt = gt.append_column("max_score", pa.array(max_score, pa.float64()))
    bad = [i for i, s_ in enumerate(status) if s_ == "failed"][:5]
    res.errors = [(tuple(groups.keys.slice(i, 1).to_pylist()[0].values()), errors[i]) for i in bad]
    res.problems, res.problems_cut = _problems(gt)
    out = tbl.filter(pa.array(written))
    idx = np.flatnonzero(written)
    for c in SCORE_COLUMNS:
        out = out.append_column(c, pa.array(cols[c][idx]))
    res.parts = _write_scores(spec, unit_id, out, gt)
    res.seconds = _time.perf_counter() - t0
    return res


def _write_scores(spec: JobSpec, unit_id: str, scores: pa.Table, groups: pa.Table) -> list[PartInfo]:
    """Scored rows partitioned like the input (Hive folders), plus the unit's group table."""
    from ._io import write_parquet
    from .kernel import check_claim

    check_claim(spec, unit_id)
    sink: Location = spec.sink
    # without the input's schema metadata: Spark takes a file's columns from the row schema it
    # wrote there, which lists the input's columns, so it would not see the scores at all
    scores, groups = scores.replace_schema_metadata(None), groups.replace_schema_metadata(None)
    parts = [write_parquet(sink, f"{spec.groups_prefix}{unit_id}.parquet", groups)]
    keys = [k for k in spec.source.partition_keys if k in scores.column_names]
    if scores.num_rows == 0:
        return parts
    if not keys:
        parts.append(write_parquet(sink, f"{spec.data_prefix}{unit_id}.parquet", scores))
        return parts
    # One file per partition folder, named after the unit so a rerun overwrites it.
    for key, sub in _by_partition(scores, keys):
        folder = hive_folder(keys, key)
        data = parquet_bytes(sub.drop_columns(keys))
        rel = f"{folder}/{spec.data_prefix}{unit_id}.parquet"
        sink.write_bytes(rel, data)
        parts.append(PartInfo(rel, len(data), hashlib.sha256(data).hexdigest(), sub.num_rows))
    return parts


def _by_partition(table: pa.Table, keys: list[str]):
    g = split_groups(table.select(keys).append_column("__row", pa.array(np.arange(table.num_rows))), tuple(keys))
    rows = g.table["__row"]
    for i, key in enumerate(g.key_tuples()):
        s, e = int(g.starts[i]), int(g.ends[i])
        yield key, table.take(rows.slice(s, e - s))


# ---------------------------------------------------------------------------
# keys that match a stored key only loosely
# ---------------------------------------------------------------------------
def loose_key_matches(store: Location, parts, by: tuple[str, ...], missing: pa.Table,
                      found: pa.Table) -> tuple[list[int], tuple[dict, dict, dict] | None]:
    """Which groups that found no model (``missing``: their keys, as the data has them) have
    a key that a stored group of ``parts`` has in another type or format (:func:`_loose`):
    ``"07"`` and ``7``, ``"7"`` and ``"07"``, ``"Checkout"`` and ``"checkout "``, an epoch time
    in milliseconds and the same in seconds.  A stored key that loosely matches a group that
    did find a model (``found``) is left out: the data holds both spellings, and the one
    without a model is a group of its own.

    Returns the rows of ``missing`` that match, and one example: (the data's key, the stored
    key, the stored key types).  Only the key columns of the parts are read (no checksum: this
    is a hint, the models are not used).  Scoring itself never matches keys loosely: two
    spellings of a key may be two series, and only the user can tell.
    """
    if not missing.num_rows or not parts:
        return [], None
    stored = _stored_keys(store, parts, by)
    if stored is None:
        return [], None
    return _loose_hits(missing, stored, found, by)


def _stored_keys(store: Location, parts, by: tuple[str, ...], also: tuple[str, ...] = ()) -> pa.Table | None:
    """The key columns of the run's ``parts`` (the readable ones), and the columns ``also``
    (``status``), or None if none can be read."""
    import pyarrow.parquet as pq

    # Only the footer and the key columns' bytes: opened with fsspec's defaults, an object
    # store's file reads ahead in blocks of 50 MB, so every part was downloaded whole (its
    # models too: 2.4 MB a part of 1,500 groups, 1.6 GB for a run of a million series).
    # Unbuffered, pyarrow asks for the footer, then the key columns in one coalesced range.
    opts = {} if store.is_local else {"cache_type": "none"}

    def keys_of(part: dict) -> pa.Table | None:
        try:
            with store.fs.open(store.path(part["path"]), "rb", **opts) as f:
                return _plain(pq.read_table(f, columns=[*by, *also], pre_buffer=True), by)
        except (OSError, KeyError, pa.ArrowException):  # a part gone or damaged: its checked read says so
            return None

    from concurrent.futures import ThreadPoolExecutor

    # a few requests a part: on an object store, one after the other, seconds for a run of a few hundred parts
    with ThreadPoolExecutor(max_workers=min(16, len(parts))) as pool:
        tables = [t for t in pool.map(keys_of, parts) if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _loose_hits(missing: pa.Table, stored: pa.Table, found: pa.Table,
                by: tuple[str, ...]) -> tuple[list[int], tuple[dict, dict, dict] | None]:
    """:func:`loose_key_matches` on the key columns ``stored`` read already."""
    names = [f"k{i}" for i in range(len(by))]
    loose_missing = _loose_table(missing, by, names).append_column("_m", pa.array(np.arange(missing.num_rows)))
    loose_stored = _loose_table(stored, by, names).append_column("_s", pa.array(np.arange(stored.num_rows)))
    if found.num_rows:
        taken = _loose_table(found, by, names).group_by(names).aggregate([])
        loose_stored = loose_stored.join(taken, names, join_type="left anti")
    hits = loose_missing.join(loose_stored, names, join_type="inner")
    if not hits.num_rows:
        return [], None
    hits = hits.sort_by([("_m", "ascending"), ("_s", "ascending")])
    m, s_ = hits["_m"][0].as_py(), hits["_s"][0].as_py()
    example = (missing.slice(m, 1).to_pylist()[0], stored.slice(s_, 1).to_pylist()[0],
               {k: stored.schema.field(k).type for k in by})
    return sorted(set(hits["_m"].to_pylist())), example


def loose_key_hint(store: Location, parts, by: tuple[str, ...], key: dict) -> str | None:
    """For a ``key`` (values as text, as ``--key`` gives them) that names no group of the run whose
    ``parts`` these are: the hint :func:`loose_key_reason` gives scoring, when a stored key matches
    it in another type or format (``site=7`` for ``"07"``), with the ``--key`` that names it; else
    None.  None too when the key names a group exactly: whatever failed, it was not the key."""
    from .plot import format_key

    if not parts or set(key) != set(by):
        return None
    stored = _stored_keys(store, parts, by)
    if stored is None or _names_exactly(stored, by, key):
        return None
    want = pa.table({k: pa.array([str(key[k])], pa.string()) for k in by})
    _, example = _loose_hits(want, stored, want.slice(0, 0), by)
    if example is None:
        return None
    _, theirs, types = example
    diffs = [k for k in by if str(key[k]) != str(theirs[k])] or list(by)
    shown = "; ".join(f"{k!r} is {str(key[k])!r} in --key but {theirs[k]!r} ({types[k]}) in the run" for k in diffs)
    return (f"Its key matches one of the run's written in another type or format (e.g. {shown}): keys match "
            f"exactly, so give the key as the run has it: --key {format_key(theirs)}.")


def _names_exactly(stored: pa.Table, by: tuple[str, ...], key: dict) -> bool:
    """Whether the stored keys hold ``key`` as :meth:`ModelStore.load` looks it up (each value
    converted to its column's type)."""
    from .store import typed_key_value

    mask = None
    for k in by:
        try:
            value = typed_key_value(k, key[k], stored.schema.field(k).type, "")
        except StoreError:  # it does not convert to the stored type: no stored key is it
            return False
        m = pc.fill_null(pc.equal(stored[k], value), False)
        mask = m if mask is None else pc.and_(mask, m)
    return bool(pc.any(mask).as_py())


def loose_key_reason(run_id: str, by: tuple[str, ...], example: tuple[dict, dict, dict], data_types: dict,
                     n: int) -> tuple[str, str]:
    """What to say about the ``n`` groups :func:`loose_key_matches` found: their skip reason (one
    text for all of them, so a report or the CLI counts them as one cause) and the job's one
    warning.  Both name the key columns that differ, one value of each side with its type, and
    what to do."""
    data, stored, stored_types = example
    diffs = [k for k in by if data[k] != stored[k] or _kind(data_types[k]) != _kind(stored_types[k])] or list(by)
    shown = "; ".join(f"{k!r} is {data[k]!r} ({data_types[k]}) in the data but {stored[k]!r} ({stored_types[k]}) in "
                      f"the run" for k in diffs)
    cols = ", ".join(repr(k) for k in diffs)
    tail = (f"e.g. {shown}: scoring matches keys exactly, so write {cols} in the data as training had it (cast or "
            "reformat it), or train again on data like this")
    reason = (f"{no_model_reason(run_id)}, but its key matches one of the run's written in another type or format "
              f"({_others(n - 1)}{tail})")
    warning = (f"{n:,} group{'s' if n > 1 else ''} found no model in run {run_id}, but {'their keys match' if n > 1 else 'its key matches'} keys of "
               f"the run written in another type or format ({tail})")
    return reason, warning


def _others(n: int) -> str:
    return "" if n < 1 else "as does 1 other group; " if n == 1 else f"as do {n:,} other groups; "


def _loose_table(t: pa.Table, by: tuple[str, ...], names: list[str]) -> pa.Table:
    return pa.table({n: _loose(t[k].combine_chunks()) for n, k in zip(names, by)})


def _loose(col: pa.Array) -> pa.Array:
    """A key column as text in a loose form where common respellings of one value meet: whole
    numbers (and text of digits) without a ``+`` or leading zeros, epoch integers in
    milliseconds, microseconds or nanoseconds as seconds (times in any unit, too), text in
    lower case without surrounding spaces, dates as ISO text."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_integer(t):
        return _int_text(col)
    if pa.types.is_timestamp(t):
        return _int_text(pc.cast(pc.cast(col, pa.timestamp("ns", t.tz), safe=False), pa.int64()))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
        digits = pc.fill_null(pc.match_substring_regex(text, r"^[+-]?\d{1,18}$"), False)
        as_int = _int_text(pc.cast(pc.if_else(digits, text, "0"), pa.int64()))
        return pc.if_else(digits, as_int, text)
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())


def _int_text(col: pa.Array) -> pa.Array:
    """Whole numbers as text, those large enough to be epoch times finer than seconds (from
    1e11, the year 5138 in seconds) as the whole seconds they are, when they are."""
    try:
        a = np.asarray(pc.fill_null(pc.cast(col, pa.int64()), 0))
    except pa.ArrowInvalid:  # a uint64 beyond int64: no epoch time
        return pc.cast(col, pa.string())
    out, size = a.copy(), np.abs(a)
    for low, high, unit in ((10**11, 10**14, 10**3), (10**14, 10**17, 10**6), (10**17, None, 10**9)):
        m = (size >= low) & ((size < high) if high else True) & (a % unit == 0)
        out[m] = a[m] // unit
    return pc.if_else(pc.is_null(col), pa.scalar(None, pa.string()), pa.array(out).cast(pa.string()))
