"""Pictures of scored series: the values, the expected value and band, the anomalies marked.

:func:`plot_series` draws one group from any of:

- a **scores folder** written by :func:`modelfactory.score` (or the score
  :class:`~modelfactory.api.Run` it returned): the scored rows are read back;
- a **model store** (a :class:`~modelfactory.store.ModelStore`, its path, or a
  train ``Run``): the group's model is loaded and scores its training data (or
  ``data=``, any dataset with the same columns) on the spot, in this process;
- a pandas DataFrame of scored rows.

:func:`load_series` returns the same rows as a DataFrame without drawing.
matplotlib is imported only to draw (``pip install -e '.[plot]'`` in a checkout);
with ``out=`` the figure is drawn off-screen (no pyplot, no display needed).

``python -m modelfactory plot`` is the command-line front end (:func:`add_parser`).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .exceptions import DatasetError, ModelFactoryError, SchemaError, StoreError

__all__ = ["plot_series", "load_series", "Series", "parse_key", "format_key", "add_parser"]

#: Columns of a scores group table (``out/_groups/``) that are not group keys.
GROUP_META = ("status", "error", "rows", "seconds", "anomalies", "max_score")
SCORE_COLUMNS = ("expected", "lower", "upper", "score", "is_anomaly")
#: Not ``pip install 'modelfactory[plot]'``: the ``modelfactory`` on PyPI is another project.
PLOT_HINT = ("install the plot extra from your modelfactory checkout, pip install -e '.[plot]' (or "
             "pip install matplotlib; the 'modelfactory' on PyPI is another project)")
_EXAMPLES_SHOWN = 5


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------
def parse_key(key: Mapping[str, Any] | str) -> dict[str, str]:
    """A group key as a dict of strings, from a dict or from ``"app=a,site=b"``.

    A comma or backslash inside a value is written ``\\,`` or ``\\\\``.

    >>> parse_key("app=checkout, site=eu-west-1")
    {'app': 'checkout', 'site': 'eu-west-1'}
    >>> parse_key({"app": "checkout", "shard": 7})
    {'app': 'checkout', 'shard': '7'}
    >>> parse_key(r"label=a\\,b")
    {'label': 'a,b'}
    """
    from .store import parse_key as parse  # one parser for the CLI, the store and plots

    return parse(key, error=SchemaError)


def _count(n: int, one: str, many: str) -> str:
    """``"1 anomaly"``, ``"2 anomalies"``, ``"1,000 anomalies"``."""
    return f"{n:,} {one if n == 1 else many}"


def format_key(key: Mapping[str, Any]) -> str:
    """The ``"app=a,site=b"`` form of a key (the inverse of :func:`parse_key`).

    A comma or backslash in a value is written ``\\,`` or ``\\\\``, a space that starts or
    ends it ``\\ ``.

    >>> format_key({"app": "a", "site": "x,y"})
    'app=a,site=x\\\\,y'
    >>> parse_key(format_key({"app": "a", "site": "x,y"}))
    {'app': 'a', 'site': 'x,y'}
    >>> format_key({"app": " spaced ", "site": "s0"})
    'app=\\\\ spaced\\\\ ,site=s0'
    """
    def esc(v: Any) -> str:
        s = str(v).replace("\\", "\\\\").replace(",", "\\,")
        core = s.strip()  # whitespace that starts or ends a value is escaped, or parse_key would drop it
        if not core:
            return "".join("\\" + c for c in s)
        head, tail = s[: s.index(core)], s[s.index(core) + len(core):]
        return "".join("\\" + c for c in head) + core + "".join("\\" + c for c in tail)

    return ",".join(f"{k}={esc(v)}" for k, v in key.items())


def _match_key(groups: pd.DataFrame, by: list[str], want: dict[str, str], where: str) -> pd.Series:
    """The one row of ``groups`` whose keys equal ``want`` (compared as text)."""
    unknown = [k for k in want if k not in by]
    if unknown:
        raise SchemaError(f"The groups of {where} are keyed by {', '.join(by)}; {unknown[0]!r} is not one of them. "
                          f"Give a key like {format_key(dict.fromkeys(by, '...'))!r}.")
    mask = np.ones(len(groups), dtype=bool)
    for k, v in want.items():
        mask &= _equal_to_text(groups[k], v)
    hits = groups[mask]
    if len(hits) == 1:
        return hits.iloc[0]
    if len(hits) == 0:
        sample = groups
        if "anomalies" in groups.columns:
            sample = groups.sort_values("anomalies", ascending=False, kind="stable")
        shown = "; ".join(format_key({k: r[k] for k in by}) for _, r in sample.head(_EXAMPLES_SHOWN).iterrows())
        raise DatasetError(f"No group {format_key(want)} in {where} ({len(groups):,} groups). "
                           f"Some that exist: {shown or 'none'}.")
    shown = "; ".join(format_key({k: r[k] for k in by}) for _, r in hits.head(_EXAMPLES_SHOWN).iterrows())
    raise SchemaError(f"The key {format_key(want)} matches {len(hits):,} groups in {where}: {shown}"
                      f"{'; ...' if len(hits) > _EXAMPLES_SHOWN else ''}. Name every key column "
                      f"({', '.join(by)}).")


def _equal_to_text(col: pd.Series, v: str) -> np.ndarray:
    """Where the key column ``col`` equals the text ``v``: as text (``str`` of each value), or
    else as the column's type, as ``models show --key`` reads a key (``2026-01-02T00:00:00Z`` or
    ``2026-01-02`` for a time key, UTC unless an offset is given; ``true`` for a boolean)."""
    text = col.astype(str).to_numpy() == v
    if text.any() or not len(col):
        return text
    try:
        if pd.api.types.is_bool_dtype(col.dtype):
            typed: Any = {"true": True, "false": False, "1": True, "0": False}[v.strip().lower()]
        elif pd.api.types.is_datetime64_any_dtype(col.dtype):
            typed = pd.Timestamp(v)
            zoned = getattr(col.dtype, "tz", None) is not None
            if zoned and typed.tz is None:
                typed = typed.tz_localize("UTC")
            elif not zoned and typed.tz is not None:
                typed = typed.tz_convert("UTC").tz_localize(None)
        elif pd.api.types.is_numeric_dtype(col.dtype):
            typed = float(v)
        else:
            return text
    except (KeyError, ValueError, TypeError):
        return text
    return np.asarray((col == typed).fillna(False), dtype=bool)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------------------
# loading one series
# ---------------------------------------------------------------------------
@dataclass
class Series:
    """The scored rows of one group, ready to draw.

    ``frame`` has the time column (if any), the target and ``expected``,
    ``lower``, ``upper``, ``score``, ``is_anomaly``, sorted by time.
    """

    key: dict[str, Any]
    frame: pd.DataFrame
    time: str | None
    target: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def anomalies(self) -> int:
        return int(self.frame["is_anomaly"].sum())

    def __repr__(self) -> str:
        return (f"<Series {format_key(self.key)}: {len(self.frame):,} rows, {_count(self.anomalies, 'anomaly', 'anomalies')}, "
                f"from {self.source}>")


def load_series(scores: Any, key: Mapping[str, Any] | str, *, run: str = "latest", data: str | None = None,
                time: str | None = None, target: str | None = None, start: Any = None, end: Any = None,
                trust: bool = False, storage_options: dict | None = None, filter: Any = None) -> Series:
    """The scored rows of one group (see :func:`plot_series` for the arguments).

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=4, days=3)
    >>> _ = modelfactory.train(f"{d}/data", by="app,site", time="ts", target="value",
    ...                        store=f"{d}/store", cluster="inline")
    >>> _ = modelfactory.score(f"{d}/data", store=f"{d}/store", out=f"{d}/scores", cluster="inline")
    >>> s = load_series(f"{d}/scores", "app=app-00,site=site-00000")
    >>> len(s.frame), s.time, s.target
    (72, 'ts', 'value')
    >>> list(s.frame.columns)
    ['ts', 'value', 'expected', 'lower', 'upper', 'score', 'is_anomaly']
    """
    want = parse_key(key)
    kind, src = _resolve(scores, run, storage_options)
    if kind == "frame":
        series = _from_frame(src, want, time, target, filter)
    elif kind == "scores":
        series = ScoresFolder(src, storage_options).series(want, time=time, target=target, filter=filter)
    else:
        series = _from_store(src, run, want, data, trust, storage_options, filter)
    return _window(series, start, end)


def _resolve(scores: Any, run: str, storage_options: dict | None) -> tuple[str, Any]:
    """Which kind of source ``scores`` is: ("frame", df), ("scores", url) or ("store", ModelStore)."""
    from .api import Run
    from .store import ModelStore

    if isinstance(scores, pd.DataFrame):
        return "frame", scores
    if isinstance(scores, ModelStore):
        return "store", scores
    if isinstance(scores, Run):
        if scores.kind == "score" and getattr(scores, "_out", None) is not None:
            return "scores", scores._out.url
        if scores.kind == "train" and scores.store is not None:
            return "store", scores.store
        raise ModelFactoryError(f"A {scores.kind} run has no series to draw: pass a score run, its "
                                "output folder, or a model store.")
    if not isinstance(scores, (str, os.PathLike)):
        raise ModelFactoryError(f"Expected a scores folder, a model store or a DataFrame of scored rows; "
                                f"got {type(scores).__name__}.")
    from ._io import Location

    url = os.fspath(scores)
    loc = Location.of(url, storage_options)
    fs = loc.fs
    if not fs.exists(loc.root):
        raise DatasetError(f"No scores folder at {url!r}. Pass the out= folder of modelfactory.score "
                           "(python -m modelfactory score ... --out DIR), or a model store.")
    if loc.exists("_groups") or loc.exists("_manifest.json"):
        return "scores", url
    if loc.exists("LATEST") or loc.exists("runs"):
        return "store", ModelStore(url, storage_options=storage_options)
    raise DatasetError(f"{url!r} is neither a scores folder (it has no _groups/ folder nor "
                       "_manifest.json) nor a model store (no LATEST file). Pass the out= folder of "
                       "modelfactory.score, or a model store.")


def _from_frame(df: pd.DataFrame, want: dict[str, str], time: str | None, target: str | None,
                filter: Any = None) -> Series:
    missing = [c for c in SCORE_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(f"The DataFrame is not scored rows: it lacks {', '.join(missing)}. "
                          "Pass the output of modelfactory.score.")
    unknown = [k for k in want if k not in df.columns]
    if unknown:
        raise SchemaError(f"The DataFrame has no key column {unknown[0]!r}. "
                          f"Columns: {', '.join(map(str, df.columns))}.")
    mask = np.ones(len(df), dtype=bool)
    for k, v in want.items():
        mask &= _equal_to_text(df[k], v)
    rows = df[mask]
    if filter is not None and not rows.empty:
        rows = _filtered_frame(rows, filter)
        if rows.empty:
            raise DatasetError(f"No rows for {format_key(want)} in the DataFrame where {filter}.")
    if rows.empty:
        by = list(want)
        shown = "; ".join(format_key(dict(zip(by, map(str, k if isinstance(k, tuple) else (k,)))))
                          for k in df.groupby(by, observed=True).size().index[:_EXAMPLES_SHOWN])
        raise DatasetError(f"No rows for {format_key(want)} in the DataFrame. Some keys: {shown or 'none'}.")
    time, target = _guess_columns(list(rows.columns), rows.dtypes.to_dict(), set(want), time, target, "the DataFrame")
    if time is not None and rows[time].duplicated().any():
        raise SchemaError(f"The key {format_key(want)} matches more than one series in the DataFrame (some "
                          "times repeat). Name every key column.")
    return _series(want, rows, time, target, "a DataFrame")


def _filtered_frame(rows: pd.DataFrame, filter: Any) -> pd.DataFrame:
    """The rows of ``rows`` where ``filter`` (a pyarrow expression) holds."""
    import pyarrow.dataset as ds

    try:
        mask = ds.dataset(pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False)
                          .append_column("__row", pa.array(np.arange(len(rows))))).to_table(
            columns=["__row"], filter=filter)["__row"].to_numpy()
    except (pa.ArrowException, TypeError) as err:
        raise SchemaError(f"The filter {filter} cannot be applied to the DataFrame ({err}).") from err
    return rows.iloc[np.sort(mask)]


def _guess_columns(names: list[str], types: dict, skip: set[str], time: str | None, target: str | None,
                   where: str) -> tuple[str | None, str]:
    """Time and target of scored rows: score writes keys, time, target, features, then the scores."""
    def is_time(t) -> bool:
        return (pa.types.is_timestamp(t) if isinstance(t, pa.DataType)
                else pd.api.types.is_datetime64_any_dtype(t))

    def is_num(t) -> bool:
        if isinstance(t, pa.DataType):
            return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        return pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)

    for role, col in (("time", time), ("target", target)):
        if col is not None and col not in names:
            raise SchemaError(f"The {role} column {col!r} is not in {where}. Columns: {', '.join(names)}.")
    rest = [c for c in names if c not in skip and c not in SCORE_COLUMNS]
    if time is None:
        time = next((c for c in rest if is_time(types[c])), None)
    if target is None:
        after = rest[rest.index(time) + 1:] if time in rest else rest
        target = next((c for c in after if is_num(types[c])), None)
        if target is None:
            raise SchemaError(f"Cannot tell the target column of {where}: pass target=... (CLI: --target).")
    return time, target


def _series(key: dict, rows: pd.DataFrame, time: str | None, target: str, source: str) -> Series:
    cols = [c for c in (time, target, *SCORE_COLUMNS) if c]
    frame = rows[cols]
    if time:
        frame = frame.sort_values(time, kind="stable")
    frame = frame.reset_index(drop=True)
    frame["is_anomaly"] = frame["is_anomaly"].fillna(False).astype(bool)
    return Series(key, frame, time, target, source)


class ScoresFolder:
    """A scores folder written by :func:`modelfactory.score`, read lazily.

    ``groups`` is its group table (keys, status, error, rows, seconds,
    anomalies, max_score); :meth:`series` reads the scored rows of one group,
    pruning partition folders by the key.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        from ._io import Location

        self.url = os.fspath(url)
        self.storage_options = storage_options
        self.location = Location.of(self.url, storage_options)
        if not self.location.fs.exists(self.location.root):
            raise DatasetError(f"No scores folder at {self.url!r}. Pass the out= folder of modelfactory.score "
                               "(python -m modelfactory score ... --out DIR).")
        if not self.location.exists("_groups"):
            raise DatasetError(f"The scores folder {self.url!r} has no _groups/ table: it is not the output "
                               "of modelfactory.score, or the scoring run did not finish.")
        if not self.location.exists("_manifest.json"):  # written last: the run did not end
            raise DatasetError(f"The scores folder {self.url!r} has no _manifest.json: its scoring run did not "
                               "finish (it was stopped, is still running, or refused to commit), so it may hold "
                               "only part of the groups. Score again into it with overwrite=True (--overwrite).")
        self._groups: pd.DataFrame | None = None
        self._info = None

    @property
    def groups(self) -> pd.DataFrame:
        if self._groups is None:
            import pyarrow.dataset as ds

            loc = self.location
            self._groups = ds.dataset(loc.path("_groups"), filesystem=loc.fs,
                                      format="parquet").to_table().to_pandas()
        return self._groups

    @property
    def by(self) -> list[str]:
        return [c for c in self.groups.columns if c not in GROUP_META]

    def manifest(self) -> dict:
        """``_manifest.json`` (the score run's summary), or ``{}`` if missing or unreadable."""
        import json

        try:
            return json.loads(self.location.read_bytes("_manifest.json"))
        except (OSError, ValueError):
            return {}

    def series(self, key: Mapping[str, Any] | str, *, time: str | None = None,
               target: str | None = None, filter: Any = None) -> Series:
        import pyarrow.compute as pc

        from .dataset import discover

        where = f"the scores at {self.url!r}"
        row = _match_key(self.groups, self.by, parse_key(key), where)
        key = {k: _plain(row[k]) for k in self.by}
        if row["status"] != "ok":
            raise DatasetError(f"Group {format_key(key)} was not scored ({row['status']}: {row['error']}).")
        if self._info is None:
            self._info = discover(self.url, storage_options=self.storage_options)
        info, schema = self._info, self._info.schema
        missing = [c for c in SCORE_COLUMNS if c not in schema.names]
        if missing:
            raise DatasetError(f"{self.url!r} holds no scored rows (no {', '.join(missing)} columns): it is "
                               "not the output of modelfactory.score.")
        pkeys = info.source.partition_keys
        expr = None
        for k, v in key.items():
            if k not in schema.names:
                continue
            t = schema.field(k).type
            scalar = pa.scalar(str(v)) if k in pkeys else pa.scalar(v).cast(t)
            e = pc.field(k) == scalar
            expr = e if expr is None else expr & e
        files = [f.path for f in info.files
                 if all(p is None or k not in key or str(key[k]) == p for k, p in zip(pkeys, f.partition))]
        table = _read(info.source, tuple(files), schema.names, expr, filter, f"the scores at {self.url!r}")
        if table.num_rows == 0:
            if filter is not None:
                raise DatasetError(f"No scored rows of group {format_key(key)} in {self.url!r} where {filter}.")
            raise DatasetError(f"The scores at {self.url!r} list group {format_key(key)} but hold no rows for it.")
        types = {n: schema.field(n).type for n in schema.names}
        names = [n for n in schema.names if n not in pkeys]  # file columns, in the order score wrote them
        # the job's own columns, as its summary records them: the features and the columns kept
        # (keep=: a request id, a timestamp of its own) are neither its time nor its target
        spec = self.manifest().get("summary", {}).get("spec", {})
        if spec.get("target") in names:  # what the caller did not name
            target = target if target is not None else spec["target"]
            time = time if time is not None else spec.get("time") if spec.get("time") in names else None
        skip = {*self.by, *spec.get("features", ()), *spec.get("keep", ())} - {time, target}
        time, target = _guess_columns(names, types, skip, time, target, where)
        return _series(key, table.to_pandas(), time, target, f"scores {self.url}")


def _from_store(store, run: str, want: dict[str, str], data: str | None, trust: bool,
                storage_options: dict | None, filter: Any = None) -> Series:
    import pyarrow.compute as pc

    from .dataset import check_columns, check_time_zone, discover

    man = store.manifest(run)
    sp = man["spec"]
    by = list(sp["by"])
    where = f"run {man['run_id']} of {store.location.url!r}"
    row = _match_key(store.groups(man["run_id"]), by, want, where)
    key = {k: _plain(row[k]) for k in by}
    if row["status"] != "ok":
        raise StoreError(f"Group {format_key(key)} has no model in {where}: {row['status']} ({row['error']}).")
    model = store.load(key, man["run_id"], trust=trust)
    rows_filter, note = _rows_to_draw(man, data, filter)
    url = data or man["input"]["url"]
    opts = storage_options if storage_options is not None else dict(store.location.storage_options)
    pkeys = set(man["input"].get("partition_keys", ())) if data is None else None
    pfilter = None
    for k, v in key.items():
        if pkeys is not None and k in pkeys:
            e = pc.field(k) == pa.scalar(str(v))
            pfilter = e if pfilter is None else pfilter & e
    try:
        info = discover(url, storage_options=opts, filter=pfilter)
    except DatasetError as err:
        if data is not None:
            raise
        raise DatasetError(f"Cannot read the training data of {where} ({err}) Pass the data to score "
                           "instead: data=... (CLI: --data DATA).") from err
    feats = tuple(sp.get("features") or ())
    from .api import TRAIN_AGAIN, _refuse_reserved_names, scored_columns

    # a target named `score` (a run committed before train refused it) was drawn as the model's score
    _refuse_reserved_names("score", scored=scored_columns(sp["time"], sp["target"], feats),
                           of=f" of run {man['run_id']}", fix=TRAIN_AGAIN)
    check_columns(info, by=tuple(by), time=sp["time"], target=sp["target"], features=feats)
    check_time_zone(info, sp["time"], man)
    expr = None
    for k, v in key.items():
        t = info.schema.field(k).type
        s = pa.scalar(str(v)) if k in info.source.partition_keys else pa.scalar(v).cast(t)
        e = pc.field(k) == s
        expr = e if expr is None else expr & e
    cols = [c for c in dict.fromkeys([*by, sp["time"], sp["target"], *feats]) if c]
    table = _read(info.source, tuple(f.path for f in info.files), cols, expr, rows_filter, repr(url))
    if table.num_rows == 0:
        raise DatasetError(f"No rows for group {format_key(key)} in {url!r}"
                           + (f" where {rows_filter}." if rows_filter is not None else "."))
    df = table.to_pandas()
    if sp["time"]:
        df = df.sort_values(sp["time"], kind="stable").reset_index(drop=True)
    from .kernel import _floats, _seconds

    sorted_tbl = pa.Table.from_pandas(df, preserve_index=False)
    t = _seconds(sorted_tbl[sp["time"]]) if sp["time"] else None
    X = np.column_stack([_floats(sorted_tbl[f]) for f in feats]) if feats else None
    out = model.score(_floats(sorted_tbl[sp["target"]]), t=t, X=X)
    if not np.isfinite(np.asarray(out["expected"], dtype=float)).any():
        # an empty band titled "0 anomalies" looked like a clean series
        raise DatasetError(
            f"The {sp['model']} model of group {format_key(key)} scores none of its {len(df):,} rows in {url!r}"
            + (": forecasting models (holt_winters, ets, sarimax, autoencoder with input='window') do not "
               "score points at or before the end of their training. Pass newer rows to score: data=... "
               "(CLI: --data DATA), or draw the scores folder of a score run." if data is None else
               " (all at or before the end of its training for a forecasting model, or without features)."))
    for c in SCORE_COLUMNS:
        df[c] = out[c]
    s = _series(key, df, sp["time"], sp["target"], f"model run {man['run_id']} on {url}")
    s.notes.append("scored in this process with the stored model")
    if note:
        s.notes.append(note)
    return s


def _read(source, files: tuple, columns: list[str], key_expr: Any, filter: Any, where: str) -> pa.Table:
    """The rows of one group (``key_expr``) of ``files`` where ``filter`` holds; a filter that
    does not fit the columns (one it names is not there, a value of another type) is a
    SchemaError naming it, not an internal error."""
    from .dataset import read_files

    expr = key_expr if filter is None else filter if key_expr is None else key_expr & filter
    try:
        return read_files(source, files, columns, expr)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        if filter is None:
            raise
        raise SchemaError(f"The filter {filter} does not fit the rows of {where}: {str(err).splitlines()[0]}. "
                          "Name columns it has, with values of their types.") from err


def _rows_to_draw(man: dict, data: str | None, filter: Any) -> tuple[Any, str]:
    """The filter of the rows a store's model scores for a plot, and a note on it.

    On the run's own training data, the rows the run was fitted on: those its ``filter``
    (``--where``) kept, and of those the ones ``filter`` keeps.  (They were all drawn: groups
    of other environments, days the run left out.)  On other ``data``, what ``filter`` keeps."""
    from .store import stored_filter

    trained = (man.get("spec") or {}).get("filter")
    if data is not None or not trained:
        return filter, ""
    expr = stored_filter((man.get("input") or {}).get("filter"))
    if expr is None:  # a run of an earlier version (its filter as text only), or another pyarrow's
        if filter is None:
            raise DatasetError(
                f"Run {man['run_id']} was trained on the rows of its input where {trained}, and its manifest does "
                "not hold that filter in a form this version can apply (the run is older, or its pyarrow another): "
                "drawing its input would draw rows the model never saw. Give the rows to draw: filter=... (CLI: "
                "--where, as the run's --where was) or data=... (--data).")
        return filter, f"the run's own filter ({trained}) could not be read back: drawn where {filter}"
    return (expr if filter is None else expr & filter), f"the rows where {trained}, as the run was trained"



def _window(series: Series, start: Any, end: Any) -> Series:
    if start is None and end is None:
        return series
    if series.time is None:
        raise SchemaError("start/end need a time column; these scored rows have none.")
    def utc(x: Any) -> pd.Timestamp:
        try:
            t = pd.Timestamp(x)
        except ValueError as err:
            raise SchemaError(f"start/end must be times like 2026-01-19T06:00; got {x!r}.") from err
        return t.tz_localize("UTC") if t.tzinfo is None else t

    ts = pd.to_datetime(series.frame[series.time], utc=True)
    mask = np.ones(len(ts), dtype=bool)
    if start is not None:
        mask &= (ts >= utc(start)).to_numpy()
    if end is not None:
        mask &= (ts <= utc(end)).to_numpy()
    if not mask.any():
        window = (f"between {start} and {end}" if start is not None and end is not None
                  else f"from {start} on" if start is not None else f"up to {end}")
        held = f": its rows run from {ts.min():%Y-%m-%d %H:%M} to {ts.max():%Y-%m-%d %H:%M} UTC" if len(ts) else ""
        raise DatasetError(f"No rows of {format_key(series.key)} {window}{held}.")
    series.frame = series.frame[mask].reset_index(drop=True)
    return series


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------
def _matplotlib():
    import importlib

    try:
        importlib.import_module("matplotlib")
        # its drawing backend too: matplotlib may import while its compiled parts (agg, ft2font) do not
        importlib.import_module("matplotlib.backends.backend_agg")
    except ImportError as err:
        raise ModelFactoryError(f"Plotting needs matplotlib, which cannot be imported ({err}): {PLOT_HINT}") from err


def new_figure(figsize: tuple[float, float] = (10.0, 3.6), dpi: int = 100):
    """An off-screen matplotlib Figure (no pyplot: safe in threads and without a display)."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw(series: Series, ax, *, title: str | None = None):
    """Draw ``series`` on the matplotlib Axes ``ax``; return ``ax`` (see :func:`png_bytes`)."""
    df = series.frame
    if series.time:
        x = pd.to_datetime(df[series.time], utc=True).dt.tz_localize(None).to_numpy()
        ax.set_xlabel(f"{series.time} (UTC)", parse_math=False)
    else:
        x = np.arange(len(df))
        ax.set_xlabel("row")
    y = df[series.target].to_numpy(dtype=float)
    lower, upper = df["lower"].to_numpy(dtype=float), df["upper"].to_numpy(dtype=float)
    flags = df["is_anomaly"].to_numpy(dtype=bool)
    ax.fill_between(x, lower, upper, color="C0", alpha=0.18, linewidth=0, label="expected band")
    ax.plot(x, df["expected"].to_numpy(dtype=float), color="C0", linewidth=1.0, linestyle="--", label="expected")
    ax.plot(x, y, color="0.15", linewidth=0.9, label=series.target)
    ax.scatter(x[flags], y[flags], color="C3", s=28, zorder=3, label=f"anomaly ({int(flags.sum())})")
    ax.set_ylabel(series.target, parse_math=False)
    if title is None:  # text from data ('$' in a key or column) is drawn as typed, never as mathtext
        ax.set_title(f"{format_key(series.key)}: {_count(int(flags.sum()), 'anomaly', 'anomalies')}", fontsize="medium", loc="left",
                     parse_math=False)
    else:
        ax.set_title(title, fontsize="medium", loc="left")
    legend = ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize="small", ncols=4, frameon=False,
                       borderaxespad=0.1, handlelength=1.5, columnspacing=1.0)
    for text in legend.get_texts():  # the target's name is a label
        text.set_parse_math(False)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if series.time:
        import matplotlib.dates as mdates

        loc = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(loc)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(loc))
    return ax


def png_bytes(series: Series, *, figsize: tuple[float, float] = (10.0, 3.6), dpi: int = 100,
              title: str | None = None) -> bytes:
    """``series`` drawn as PNG bytes (off-screen).

    >>> import pandas as pd
    >>> rows = pd.DataFrame({"site": "a", "ts": pd.date_range("2026-01-05", periods=3, freq="h", tz="UTC"),
    ...                      "value": [1.0, 5.0, 1.2], "expected": 1.0, "lower": 0.0, "upper": 2.0,
    ...                      "score": [0.1, 0.99, 0.2], "is_anomaly": [False, True, False]})
    >>> s = load_series(rows, "site=a")    # scored rows in a DataFrame work too
    >>> s
    <Series site=a: 3 rows, 1 anomaly, from a DataFrame>
    >>> png_bytes(s)[:4]
    b'\\x89PNG'
    """
    import io

    fig = new_figure(figsize, dpi)
    draw(series, fig.add_subplot(), title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_series(scores: Any, key: Mapping[str, Any] | str, ax=None, out: str | os.PathLike | None = None, *,
                run: str = "latest", data: str | None = None, time: str | None = None,
                target: str | None = None, start: Any = None, end: Any = None, title: str | None = None,
                figsize: tuple[float, float] = (10.0, 3.6), dpi: int = 100, trust: bool = False,
                storage_options: dict | None = None, filter: Any = None):
    """Draw one group's series, its expected value and band, and its anomalies.

    Parameters
    ----------
    scores : str, Run, ModelStore or pandas.DataFrame
        A scores folder (the ``out=`` of :func:`modelfactory.score`) or the
        score Run; or a model store (path, ``ModelStore`` or train Run): then
        the group's model scores its training data (or ``data``) here; or a
        DataFrame of scored rows.
    key : dict or str
        The group, ``{"app": "a", "site": "s1"}`` or ``"app=a,site=s1"``.  A
        subset of the key columns is enough when it names one group.
    ax : matplotlib Axes, optional
        Draw here.  Default: a new figure (pyplot's, so notebooks show it;
        with ``out`` an off-screen one).
    out : path, optional
        Save the picture there (PNG, SVG or PDF by the extension).
    run : str
        With a store: the run to take models from (default: the latest).
    data : str, optional
        With a store: the dataset to score (default: the run's training data).
    time, target : str, optional
        Column names, when they cannot be told from the scored rows.
    start, end : str or timestamp, optional
        Only draw this time window (UTC unless an offset is given).
    trust : bool
        With a store of pickled user models: allow loading them (it runs code
        from the store; only if you trust who wrote it).
    filter : pyarrow.dataset.Expression, optional
        Only draw the rows where it holds (as ``filter=`` of train and score).
        A store's model scoring its own training data draws only the rows the
        run was trained on (those the run's ``filter`` kept), and of those the
        ones ``filter`` keeps.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import modelfactory, tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=4, days=3)
    >>> _ = modelfactory.train(f"{d}/data", by="app,site", time="ts", target="value",
    ...                        store=f"{d}/store", cluster="inline")
    >>> _ = modelfactory.score(f"{d}/data", store=f"{d}/store", out=f"{d}/scores", cluster="inline")
    >>> ax = plot_series(f"{d}/scores", "app=app-00,site=site-00000", out=f"{d}/series.png")
    >>> ax.get_title(loc="left")
    'app=app-00,site=site-00000: 2 anomalies'
    >>> plot_series(f"{d}/store", {"site": "site-00001"})   # doctest: +SKIP
    <Axes: title={'left': 'app=app-01,site=site-00001: 0 anomalies'}, ...>
    """
    series = load_series(scores, key, run=run, data=data, time=time, target=target, start=start, end=end,
                         trust=trust, storage_options=storage_options, filter=filter)
    return _plot(series, ax, out, title=title, figsize=figsize, dpi=dpi)


def _plot(series: Series, ax, out, *, title: str | None = None, figsize=(10.0, 3.6), dpi: int = 100):
    _matplotlib()
    if ax is None:
        if out is not None:
            ax = new_figure(figsize, dpi).add_subplot()
        else:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=figsize, dpi=dpi, layout="constrained")
    draw(series, ax, title=title)
    if out is not None:
        path = os.path.expanduser(os.fspath(out))  # "--out=~/p.png": no shell expands that ~
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ModelFactoryError(f"Cannot write {path!r}: the folder {parent!r} does not exist.")
        ext = os.path.splitext(path)[1][1:].lower()
        if ext and ext not in ax.figure.canvas.get_supported_filetypes():
            raise ModelFactoryError(f"Cannot write {path!r}: matplotlib cannot write .{ext} files. "
                                    "Use .png, .svg or .pdf.")
        try:
            ax.figure.savefig(path)
        except ValueError as err:  # the extension is known: something in the picture could not be drawn
            raise ModelFactoryError(f"Cannot draw {format_key(series.key)} into {path!r}: {err}") from err
        except OSError as err:  # a folder by that name, a read-only or full disk, no permission
            raise ModelFactoryError(f"Cannot write {path!r}: {err.strerror or err}.") from err
    return ax


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
_EPILOG = """\
examples:
  python -m modelfactory plot --scores scores/ --key app=checkout,site=eu-1 --out series.png
  python -m modelfactory plot --store models/ --key site=eu-1 --out fit.png
  python -m modelfactory plot --store models/ --data data/today --key app=checkout,site=eu-1 \\
      --start 2026-01-19T06:00 --out today.svg

With --store, the group's stored model scores its training data (or --data) in this process.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` command to ``subparsers``; return its parser.

    >>> sub = argparse.ArgumentParser(prog="python -m modelfactory").add_subparsers()
    >>> args = add_parser(sub).parse_args(["--scores", "scores/", "--key", "app=a,site=b"])
    >>> args.out, args.key, args.func is run_command
    ('series.png', 'app=a,site=b', True)
    """
    p = subparsers.add_parser(
        "plot", help="draw one series with its expected band and anomalies (PNG/SVG/PDF)",
        description="Draw one group's series, the expected value and band, and the anomalies marked.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", metavar="DIR", help="a scores folder (the --out of `score`)")
    src.add_argument("--store", metavar="STORE", help="a model store: score the group with its stored model")
    p.add_argument("--key", required=True, metavar="NAME=VALUE,...",
                   help="the group, e.g. app=checkout,site=eu-1 (a subset is enough if it names one group)")
    p.add_argument("--out", default="series.png", help="image file, its format by its extension: .png, .svg, .pdf (or any other matplotlib writes, .jpg too) (default: %(default)s)")
    p.add_argument("--run", default="latest", help="with --store: the run id (default: latest)")
    p.add_argument("--data", metavar="DATA", help="with --store: the dataset to score (default: the training data)")
    p.add_argument("--start", help="draw from this time on (ISO-8601, UTC unless an offset is given)")
    p.add_argument("--end", help="draw up to this time")
    p.add_argument("--trust", action="store_true", help="with --store: allow loading pickled user models")
    p.add_argument("--time", help="time column (default: found from the scored rows)")
    p.add_argument("--target", help="target column (default: found from the scored rows)")
    p.add_argument("--where", action="append", default=[], metavar="CONDITION",
                   help="draw only the rows where CONDITION holds, as train's and score's --where (repeatable); "
                        "with --store on its training data, only the rows the run's own --where kept are drawn")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace, storage_options: dict | None = None) -> int:
    """Run ``plot`` from parsed ``args``: write the picture, print one line, return 0."""
    return draw_command(args, load_command(args, storage_options))


def load_command(args: argparse.Namespace, storage_options: dict | None = None) -> "Series":
    """The series ``plot``'s ``args`` name (all the reading a ``plot`` does)."""
    source = args.scores if args.scores is not None else args.store
    return load_series(source, args.key, run=args.run, data=args.data, time=args.time, target=args.target,
                       start=args.start, end=args.end, trust=args.trust, storage_options=storage_options,
                       filter=_where_filter(args, storage_options))


def _where_filter(args: argparse.Namespace, storage_options: dict | None):
    """``plot``'s ``--where`` as a filter, its time literals typed as the columns of the rows it reads."""
    where = getattr(args, "where", None)
    if not where:
        return None
    from .dataset import column_types
    from .store import ModelStore
    from .where import parse_where as _where

    url = args.scores or args.data
    if url is None:
        url = ModelStore(args.store, storage_options=storage_options).manifest(args.run)["input"]["url"]
    return _where(where, column_types(url, storage_options))


def draw_command(args: argparse.Namespace, series: "Series") -> int:
    """Draw ``series`` into ``args.out``; print one line; return 0."""
    _plot(series, None, args.out)
    print(f"wrote {args.out}: {format_key(series.key)}, {len(series.frame):,} points, "
          f"{_count(series.anomalies, 'anomaly', 'anomalies')}")
    return 0


class _CallableModule(type(os)):
    """This module, callable as :func:`plot_series` (``modelfactory.plot(...)``): bound to the
    function, ``modelfactory.plot`` hid the module, so ``import modelfactory.plot as p`` gave the
    function and ``modelfactory.plot.load_series`` an AttributeError."""

    def __call__(self, *args, **kwargs):
        return plot_series(*args, **kwargs)


import sys as _sys

_sys.modules[__name__].__class__ = _CallableModule
