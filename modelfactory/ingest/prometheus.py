"""Download Prometheus range-query history into a Hive-partitioned Parquet dataset.

Data flow: :func:`prometheus` validates its arguments into one frozen
:class:`PrometheusSpec`, cuts the time range into :class:`Chunk` objects on a
fixed grid, maps :func:`_fetch_chunk` over them with a bounded thread pool, then
commits the staged files.  :func:`_fetch_chunk` is private: called alone it would
stage files into a folder whose lock it does not hold, for a dataset whose
definition it has not checked, and leave the commit to its caller.

Chunk grid.  Evaluation timestamps are multiples of ``step`` since the epoch,
and chunk ``k`` holds the evaluation steps ``[k * CHUNK_POINTS, (k + 1) * CHUNK_POINTS)``.
Each (chunk, partition) becomes one file whose name derives from
``(query, step, chunk start)``.  Re-running a range, or extending it, rewrites
that file with the fresh rows plus the old rows at times they do not cover:
never a duplicate, and never a loss of rows the server no longer holds.  Files
are staged under a hidden temporary name and renamed only after every chunk
succeeded, so a failed run leaves nothing behind; those of a killed run are
removed by the next ingest into the folder, once it holds the lock.

One folder, one dataset.  The first commit records the query, step and partition labels
in ``_ingest.json``; a later ingest with another query or step is refused before any
query (its files would sit beside the first ones, read as one dataset), unless it is told
to start over (``overwrite``).  An ingest holds the folder's lock (:mod:`._lock`) from its
checks to its commit, so two never merge into the same files at once.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import numbers
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from http.client import HTTPException
from typing import Any, Union

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .._io import Location, _is_local, error_text, hive_folder
from ..exceptions import IngestError
from ._lock import FolderLock

__all__ = ["prometheus", "plan_chunks", "PrometheusSpec", "Chunk",
           "ChunkResult", "IngestSummary", "MAX_POINTS", "CHUNK_POINTS"]

log = logging.getLogger(__name__)

#: Prometheus refuses a query_range whose series would hold more than this many points.
MAX_POINTS = 11_000
#: Evaluation steps per chunk (and per file): this fixes the chunk grid, never change it.
CHUNK_POINTS = 11_000
#: The dataset's definition (query, step, by), written at its first commit.
DEFINITION_NAME = "_ingest.json"
#: The name of a file an ingest writes: chunk start, then a hash of (query, step, chunk start).
_INGEST_FILE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{16})\.parquet$")
#: The hidden name a file is staged under (:func:`_stage`) until the commit renames it.
_STAGED_FILE = re.compile(r"^\.\d{8}T\d{6}Z-[0-9a-f]{16}\.parquet\.[0-9a-f]{32}\.tmp$")
#: The hidden name ``_ingest.json`` is written under before it is renamed (:func:`_write_definition`).
_DEFINITION_TMP = re.compile(r"^\._ingest\.json\.[0-9a-f]{32}\.tmp$")
TOKEN_ENV = "MODELFACTORY_PROM_TOKEN"
PASSWORD_ENV = "MODELFACTORY_PROM_PASSWORD"
_BACKOFF_S = 0.5  # first retry delay, doubled per attempt
_RETRY_STATUS = frozenset({429, 500, 502, 503})  # not 504: a proxy's timeout, see _timed_out
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")
_UNIT_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1_000, 1)
_YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z
_SECRET_HEADER = re.compile(r"auth|token|key|secret|passw|cookie", re.I)
#: An HTTP header name: a token of RFC 9110 (letters, digits and !#$%&'*+-.^_`|~).
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: What an HTTP header value cannot hold: control characters but the tab (line breaks above all).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

TimeLike = Union[datetime, str, int, float]
StepLike = Union[str, int, float, timedelta]


@dataclass(frozen=True)
class PrometheusSpec:
    """Everything :func:`_fetch_chunk` needs: validated, picklable, secrets kept out of ``repr``."""

    api_url: str            #: ``.../api/v1/query_range``, without user info
    display_url: str        #: the server as shown in messages (no user info, no query string)
    query: str
    step_ms: int
    by: tuple[str, ...]     #: partition columns, in directory order
    out: str
    max_points: int = MAX_POINTS
    timeout_s: float = 120.0
    retries: int = 3
    verify_tls: bool = True
    ca_file: str | None = None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    overwrite: bool = False  #: start the dataset over: no merging with, and no keeping of, earlier files


@dataclass(frozen=True)
class Chunk:
    """One grid cell: evaluation timestamps ``first_ms, first_ms + step, ..., last_ms``."""

    start_ms: int  #: grid start (names the file)
    first_ms: int
    last_ms: int


@dataclass(frozen=True)
class ChunkResult:
    """What :func:`_fetch_chunk` did; ``staged`` holds (temporary, final) paths to commit."""

    series: frozenset
    rows: int
    requests: int
    staged: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class IngestSummary:
    """Outcome of :func:`prometheus`; ``rows`` counts points fetched in this run."""

    series: int
    rows: int
    files: int
    chunks: int
    requests: int
    seconds: float
    out: str

    def __str__(self) -> str:
        n = lambda count, word: f"{count} {word}{'' if count == 1 else 's'}"  # noqa: E731
        return (f"Ingested {self.series} series, {n(self.rows, 'row')} into {n(self.files, 'file')} "
                f"under {self.out} ({n(self.chunks, 'chunk')}, {n(self.requests, 'request')}, "
                f"{self.seconds:.1f} s).")


def prometheus(
    url: str, query: str, start: TimeLike, end: TimeLike, step: StepLike, *,
    by: Sequence[str] | str, out: str | os.PathLike,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    bearer_token: str | None = None, bearer_token_file: str | os.PathLike | None = None,
    basic_auth_user: str | None = None, basic_auth_password: str | None = None,
    basic_auth_password_file: str | os.PathLike | None = None,
    verify_tls: bool = True, ca_file: str | os.PathLike | None = None,
    concurrency: int = 4, max_points: int = MAX_POINTS,
    timeout: float = 120.0, retries: int = 3,
    storage_options: dict | None = None, overwrite: bool = False,
) -> IngestSummary:
    """Run a PromQL range query and write the result as Hive-partitioned Parquet.

    Parameters
    ----------
    url : str
        Root of the Prometheus HTTP API, e.g. ``http://prometheus:9090`` or
        ``https://mimir.example/prometheus``.  ``user:password@`` in the URL is basic auth.
    query : str
        PromQL expression evaluated with ``/api/v1/query_range``.
    start, end : datetime, str, int or float
        Inclusive range: a datetime (naive means UTC), ISO-8601 text, unix
        seconds (numpy numbers too), or ``"now"`` / ``"now-3d"``.  Evaluation
        timestamps are the multiples of ``step`` since the epoch inside the range.
    step : str, int, float or timedelta
        Resolution: seconds (numpy numbers too) or a Prometheus duration (``"30s"``,
        ``"5m"``, ``"1h"``).
    by : sequence of str
        Labels that become partition directories (``app=.../site=.../``);
        every series must carry them.  ``__name__`` is spelled ``metric``.
    out : str or path-like
        Dataset root, local path or any fsspec URL (``s3://bucket/prom``).
    headers : mapping or list of (name, value) pairs, optional
        Extra HTTP headers, e.g. ``{"X-Scope-OrgID": "tenant-1"}``.
    bearer_token, bearer_token_file : str, optional
        Bearer token, or a file holding it.  Default: ``$MODELFACTORY_PROM_TOKEN``.
    basic_auth_user, basic_auth_password, basic_auth_password_file : str, optional
        Basic auth; the password defaults to ``$MODELFACTORY_PROM_PASSWORD``.
    verify_tls : bool
        Verify the server certificate (default).  ``ca_file`` adds a CA bundle.
    concurrency : int
        Chunks fetched at once (threads, one request in flight each).
    max_points : int
        Points per series per request, at most 11,000 (Prometheus' cap).
    timeout, retries : float, int
        Seconds per request; retries of connection errors and HTTP 429/5xx.  A request that
        times out once connected is not retried (it would time out again): narrow the query.
    storage_options : dict, optional
        Passed to ``fsspec.core.url_to_fs`` for ``out``.
    overwrite : bool
        Start the dataset in ``out`` over: delete the files of earlier ingests (once every
        chunk of this one has been fetched) and record this query and step.  Without it, an
        ingest with another query, step or ``by`` than the one that wrote ``out`` is refused.

    Returns
    -------
    IngestSummary

    Raises
    ------
    IngestError
        Bad arguments, unreachable server, HTTP or PromQL errors, no series,
        missing ``by`` labels, non-matrix results, ``out`` holding another query's
        dataset, another ingest writing to ``out``.  No file is committed then.

    Examples
    --------
    Needs a server, so not run as a doctest::

        prometheus("http://prometheus:9090", "sum by (app, site) (up)", "now-3d", "now", "5m",
                   by=["app", "site"], out="data/up")
    """
    started = time.monotonic()
    # numpy's numbers (a start from a DataFrame, np.int64(300)) are no int or float, and a
    # pathlib.Path no str: each was refused as not what it is ("must be unix seconds"), while
    # train took them; taken here as the plain values they stand for, every check below holds
    start, end, step, max_points, timeout, retries, concurrency = map(
        _plain, (start, end, step, max_points, timeout, retries, concurrency))
    out, bearer_token_file, basic_auth_password_file, ca_file = (
        os.fspath(p) if isinstance(p, os.PathLike) else p
        for p in (out, bearer_token_file, basic_auth_password_file, ca_file))
    spec = _make_spec(url, query, step, by, out, headers, bearer_token, bearer_token_file,
                      basic_auth_user, basic_auth_password, basic_auth_password_file,
                      verify_tls, ca_file, max_points, timeout, retries, storage_options, overwrite)
    if not isinstance(concurrency, int) or concurrency < 1:
        raise IngestError(f"concurrency must be an int >= 1. Got {concurrency!r} instead.")
    try:
        Location.of(spec.out, spec.storage_options).check_bucket(IngestError)  # a typo must not make a bucket
        _check_not_a_store(spec)
        _check_not_a_file(spec)
    except IngestError:
        raise
    except Exception as err:  # noqa: BLE001 - an unknown protocol, a missing package, no endpoint
        raise IngestError(f"Cannot write to out={spec.out!r}: {error_text(err)}. Check the path, the "
                          "endpoint and the credentials (storage_options).") from err
    now = datetime.now(timezone.utc)
    chunks = plan_chunks(_parse_time(start, "start", now), _parse_time(end, "end", now), spec.step_ms)
    fs, root = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
    made: set[str] = set()  # the partition folders this ingest makes (a local disk), until it commits
    with _locked(spec, fs, root) as lock, _removed_if_empty_on_failure(made):
        _remove_leftovers(spec, fs, root)
        earlier = _check_dataset(spec, fs, root)
        spec = _as_recorded(spec, earlier)
        log.info("ingesting %s from %s in %d chunks", spec.query, spec.display_url, len(chunks))
        results = _run_chunks(spec, chunks, concurrency, made)
        series = frozenset().union(*(r.series for r in results))
        if not series:
            raise IngestError(
                f"The query {spec.query!r} returned no series between {_iso(chunks[0].first_ms)} and "
                f"{_iso(chunks[-1].last_ms)} from {spec.display_url}. Check the metric name and label "
                "matchers (try it in the Prometheus UI) and that the range holds data.")
        staged = [s for r in results for s in r.staged]
        try:
            lock.check()  # taken over meanwhile: the other ingest's files may be merged into these
        except IngestError:
            _discard(fs, staged)
            raise
        _commit(spec, staged, earlier)
    return IngestSummary(series=len(series), rows=sum(r.rows for r in results), files=len(staged),
                         chunks=len(chunks), requests=sum(r.requests for r in results),
                         seconds=time.monotonic() - started, out=spec.out)


def _plain(value: Any) -> Any:
    """A number of another type than int or float (numpy's, a Fraction) as the int or float it is;
    anything else as it is (bool too: True is no number of seconds)."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def plan_chunks(start_ms: int, end_ms: int, step_ms: int) -> list[Chunk]:
    """Cut ``[start_ms, end_ms]`` into chunks of the fixed grid (see the module doc).

    >>> [(c.first_ms, c.last_ms) for c in plan_chunks(10_500, 30_000, 1)][:2]
    [(10500, 10999), (11000, 21999)]
    """
    first = -(-start_ms // step_ms) * step_ms
    last = end_ms // step_ms * step_ms
    if first > last:
        raise IngestError(
            f"No evaluation step between start={_iso(start_ms)} and end={_iso(end_ms)} with "
            f"step={_seconds(step_ms)}s: end must be after start; widen the range or lower step.")
    span = CHUNK_POINTS * step_ms
    return [Chunk(k * span, max(first, k * span), min(last, (k + 1) * span - step_ms))
            for k in range(first // span, last // span + 1)]


class _Stopped(Exception):
    """A chunk not fetched (or not staged): the ingest was interrupted."""


def _fetch_chunk(spec: PrometheusSpec, chunk: Chunk, stop: threading.Event | None = None,
                 made: set[str] | None = None) -> ChunkResult:
    """Fetch one chunk (in requests of at most ``spec.max_points`` points) and stage its files.

    Staged files carry hidden temporary names (ignored by Parquet readers) until
    the caller renames each ``(tmp, final)`` pair in ``ChunkResult.staged``.  Only
    :func:`prometheus` calls it, holding the folder's lock (the next lock holder
    deletes staged files it finds) after checking the dataset's definition.  Once
    ``stop`` is set (Ctrl-C), it sends no more requests and stages nothing.  The folders it
    makes are added to ``made``.
    """
    opener = _opener(spec)
    series: dict[tuple, tuple[list[int], list[float]]] = {}
    requests, a = 0, chunk.first_ms
    while a <= chunk.last_ms:
        if stop is not None and stop.is_set():
            raise _Stopped
        b = min(chunk.last_ms, a + (spec.max_points - 1) * spec.step_ms)
        for item in _query_range(spec, opener, a, b, stop):
            key = tuple(sorted((item.get("metric") or {}).items()))
            if "values" not in item:
                raise IngestError(f"Series {_fmt(key)} has no float samples (native histograms are "
                                  "not supported): wrap the query, e.g. histogram_quantile(0.9, ...).")
            ts, vals = series.setdefault(key, ([], []))
            try:
                for t, v in item["values"]:
                    ts.append(round(float(t) * 1000))
                    vals.append(float(v))
            except (TypeError, ValueError) as err:
                raise IngestError(f"Series {_fmt(key)} from {spec.display_url} holds a malformed "
                                  f"sample ({err}): is url a Prometheus-compatible API?") from err
        requests, a = requests + 1, b + spec.step_ms
    _check_labels(spec, series)
    groups: dict[tuple[str, ...], list[tuple]] = {}
    for key in series:
        labels = {_col(k): v for k, v in key}
        groups.setdefault(tuple(labels[c] for c in spec.by), []).append(key)
    fs, root = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
    if _is_local(fs):
        _check_folder_names(spec, groups)
    staged: list[tuple[str, str]] = []
    try:
        for values, keys in sorted(groups.items()):
            if stop is not None and stop.is_set():
                raise _Stopped
            staged.append(_stage(spec, fs, root, chunk, values, _table(spec, sorted(keys), series), made))
    except BaseException:
        _discard(fs, staged)
        raise
    return ChunkResult(frozenset(series), sum(len(t) for t, _ in series.values()), requests,
                       tuple(staged))


# -- running -------------------------------------------------------------------------------


def __getattr__(name: str) -> Any:
    if name == "fetch_chunk":  # public until it was found to skip the lock and the definition check
        raise AttributeError(
            "fetch_chunk is no longer public: called on its own it skipped the folder's lock and the check "
            "of the dataset's definition, and left its files uncommitted. Call prometheus(...), which fetches "
            "the chunks in parallel (concurrency=) under the lock and commits them.")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_chunks(spec: PrometheusSpec, chunks: list[Chunk], concurrency: int,
                made: set[str] | None = None) -> list[ChunkResult]:
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(chunks)))
    futures = [pool.submit(_fetch_chunk, spec, c, stop, made) for c in chunks]
    try:
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:  # a chunk failed: the others send no more requests
            stop.set()
        for f in pending:
            f.cancel()
        wait(futures)
    except BaseException:
        # Ctrl-C (or SIGTERM, which the CLI turns into it): the pool went on to fetch every chunk
        # still queued, for as long as they took, and left their staged files behind
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)  # the requests under way end (or time out)
        _discard_staged(spec, futures)
        raise
    pool.shutdown(wait=True)
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors:
        _discard_staged(spec, futures)
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])  # the cause, not a chunk stopped
    return [f.result() for f in futures]


def _discard_staged(spec: PrometheusSpec, futures: list) -> None:
    """Remove the staged files of the chunks that were fetched, when the ingest will not commit."""
    done = [f.result() for f in futures if f.done() and not f.cancelled() and not f.exception()]
    fs, _ = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
    _discard(fs, [s for r in done for s in r.staged])


def _check_layout(spec: PrometheusSpec, earlier: dict | None = None) -> None:
    """Refuse to write into a dataset partitioned by other labels than ``spec.by``: its points
    would be stored twice, in two folder layouts that no reader accepts together.  ``earlier``,
    the definition recorded in out if any, is shown beside this ingest's."""
    try:
        fs, root = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
        local = _is_local(fs)
        keys, path, example, data_files = [], root.rstrip("/"), None, False
        while fs.isdir(path):
            entries = fs.ls(path, detail=True)
            names = [(e["name"].rstrip("/"), e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"]) for e in entries]
            folders = sorted(n for n, base, kind in names
                             if kind == "directory" and "=" in base and base[0] not in "._")
            if local and len(folders) > 1:
                # one that holds a file: a failed run leaves the empty folders of a value it saw
                # (app=0/, app=0/site=s1/), and following one found no data, and no layout to
                # compare (an object store has no empty folders: no listing of each one there)
                folders = [next((f for f in folders if fs.find(f)), folders[0])]
            if not folders:
                data_files = any(kind == "file" and base.endswith(".parquet") and base[0] not in "._"
                                 for _, base, kind in names)
                break
            path = example = folders[0]
            keys.append(path.rsplit("/", 1)[-1].split("=", 1)[0])
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        raise _cannot_list(spec, err) from err
    if data_files and keys != list(spec.by):  # folders alone may be left from a failed run
        shown = f" (e.g. {example})" if example else ""
        raise IngestError(_another_by(spec, f"already holds a dataset partitioned by {keys!r}{shown}", earlier))


def _another_by(spec: PrometheusSpec, held: str, earlier: dict | None) -> str:
    """The message for an ingest whose ``by`` is not the dataset's (which ``out`` ``held``): as
    for another query or step, both definitions when the dataset's is recorded, and overwrite (the
    folder layout answered first, with neither: 'use the same --by' or another --out, while the
    same mistake with a step was offered --overwrite and shown both definitions)."""
    recorded = "" if earlier is None else (
        f" Its {DEFINITION_NAME} records the query {earlier.get('query')!r} at step "
        f"{_step_text(earlier.get('step_ms'))}" + (f" by {list(earlier['by'] or [])!r}" if "by" in earlier else "")
        + f"; this ingest asks for the query {spec.query!r} at step {_step_text(spec.step_ms)} by {list(spec.by)!r}.")
    return (f"out={spec.out!r} {held}, but this ingest partitions by {list(spec.by)!r}: every point would be "
            f"stored a second time in another folder layout, and readers refuse mixed layouts.{recorded} Use the "
            "same by / --by as before, or ingest into another out / --out, or pass overwrite=True / --overwrite "
            "to start this dataset over (the files of earlier ingests are deleted once this one has fetched "
            "every chunk).")


@contextmanager
def _locked(spec: PrometheusSpec, fs: Any, root: str) -> Iterator[FolderLock]:
    """Hold the folder's lock: another ingest into ``out`` is refused until it is released."""
    lock = FolderLock(fs, root, spec.out)
    try:
        lock.acquire()
    except IngestError:
        raise
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        raise IngestError(f"Could not create the lock {lock.shown}: {error_text(err)}. Check that out / "
                          "--out is writable (and storage_options for remote stores).") from err
    try:
        yield lock
    finally:
        lock.release()


def _definition(spec: PrometheusSpec) -> dict:
    """What makes the rows of a dataset comparable: the same query at the same step, by the same labels."""
    return {"source": "prometheus", "query": spec.query, "step_ms": spec.step_ms, "by": list(spec.by)}


def _check_not_a_store(spec: PrometheusSpec) -> None:
    """Refuse an ``out`` that is a model store, or lies in one's ``runs/``: the ingest wrote its
    lock, partition folders and ``_ingest.json`` among the store's runs, and the dataset was then
    read with the runs' Parquet files in it (a store is recognised as ``models`` and ``train``
    recognise it: ``LATEST``, or a run under ``runs/``; a folder beside ``runs/`` is no part of it)."""
    from ..api import _model_store_at  # (imported with modelfactory already)

    out = Location.of(spec.out, spec.storage_options)
    store = _model_store_at(out)
    if store is not None:
        raise IngestError(
            f"out={spec.out!r} {'is' if store == out.url else 'lies inside'} the model store {store!r} (it holds LATEST or runs/): the ingest would "
            "write its partition folders and files among the store's runs, and readers would take the runs' "
            "Parquet files for rows of the dataset. Nothing was written; ingest into a folder of its own, "
            "outside the store, e.g. out / --out data/requests, and pass that folder to train.")


def _check_not_a_file(spec: PrometheusSpec) -> None:
    """Refuse an ``out`` that is a file, or lies under one on a disk: the lock could not be made
    there, and the message said to check that out is writable, which it may well be."""
    fs, root = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
    root = root.rstrip("/")
    # an empty object named like the folder, on an object store, is a folder marker (the S3
    # console's "Create folder"), as api._output takes it
    if fs.isfile(root) and (_is_local(fs) or fs.size(root) != 0):
        raise IngestError(f"out={spec.out!r} is a file, not a folder. Pass a folder for the dataset (new, or "
                          "one an earlier ingest of this query wrote); the ingest makes it if it does not exist.")
    path = root
    while _is_local(fs) and not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
        if os.path.isfile(path):
            raise IngestError(f"out={spec.out!r} lies under {path!r}, which is a file, not a folder: no folder "
                              "can be made there. Pass a folder for the dataset elsewhere.")


def _check_dataset(spec: PrometheusSpec, fs: Any, root: str) -> dict | None:
    """Refuse an ingest whose rows would not be of the dataset already in ``out`` (another
    ``by``, query or step, or Parquet files no ingest wrote), unless it starts over; return the
    dataset's recorded definition."""
    _check_foreign(spec, fs, root)  # with or without overwrite: the ingest adds its files beside them
    if spec.overwrite:
        return None
    path = f"{root.rstrip('/')}/{DEFINITION_NAME}"
    try:
        fs.invalidate_cache(path)  # another ingest may have written it since this process listed out
        with fs.open(path, "rb") as f:
            earlier = json.loads(f.read())
        if not isinstance(earlier, dict):
            raise ValueError(f"a JSON object was expected, not {type(earlier).__name__}")
    except FileNotFoundError:
        earlier, unreadable = None, None
    except ValueError as err:  # cut short by a crash as it was written, or edited by hand
        # the file names stand in for it, as for a dataset of an earlier version; starting the
        # dataset over (the advice below) would delete history Prometheus may no longer hold
        log.warning("%s/%s cannot be read (%s): the files in out are checked by their names instead, and "
                    "it is written again at the commit", spec.out.rstrip("/"), DEFINITION_NAME, error_text(err))
        earlier, unreadable = None, error_text(err)
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        raise IngestError(f"Could not read {spec.out.rstrip('/')}/{DEFINITION_NAME}, the definition of the "
                          f"dataset in out={spec.out!r}: {error_text(err)}. Pass overwrite=True / --overwrite "
                          "to start the dataset over, or use another out / --out.") from err
    _check_layout(spec, earlier)  # first: its message names the labels a dataset's folders show
    if earlier is None:
        _check_file_names(spec, fs, root, unreadable)  # written before the definition was recorded
        return None
    changed = ["step_ms"] if earlier.get("step_ms") != spec.step_ms else []
    if not isinstance(earlier.get("query"), str) or _promql_form(earlier["query"]) != _promql_form(spec.query):
        changed.insert(0, "query")
    if changed:
        raise IngestError(_another_definition(spec, " and ".join(
            "step" if k == "step_ms" else k for k in changed), (
            f"its {DEFINITION_NAME} records the query {earlier.get('query')!r} at step "
            f"{_step_text(earlier.get('step_ms'))}")))
    if "by" in earlier and list(earlier["by"] or []) != list(spec.by):
        # (the folders say it too, but not when the first of them is empty, or when there are none)
        raise IngestError(_another_by(spec, f"holds a dataset partitioned by {list(earlier['by'] or [])!r} (its "
                                            f"{DEFINITION_NAME} records it)", earlier))
    return earlier


def _as_recorded(spec: PrometheusSpec, earlier: dict | None) -> PrometheusSpec:
    """``spec`` with the query text recorded in ``earlier`` when its own differs only in whitespace
    (:func:`_promql_form`): file names hash the query text, so a reformatted query must name the
    files as the recorded one did, or every rerun would write its rows a second time beside them."""
    if earlier is None or earlier.get("query") == spec.query:
        return spec
    log.info("the query %r differs from the one recorded in %s/%s only in whitespace: the files are named "
             "from the recorded text %r", spec.query, spec.out.rstrip("/"), DEFINITION_NAME, earlier["query"])
    return replace(spec, query=earlier["query"])


#: A PromQL string literal ("...", '...' with backslash escapes, `...` raw), a comment, a run of
#: whitespace, a run of other characters, or one stray character (an unterminated quote).
_PROMQL_PART = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`|#[^\n]*|\s+|[^"'`#\s]+|.""", re.S)
_WORD_CHAR = re.compile(r"[A-Za-z0-9_.]")


def _promql_form(query: str) -> str:
    """``query`` with its whitespace outside string literals normalised, to tell a reformatted
    query from a changed one: whitespace between two word characters (``sum by``, ``x offset
    5m``) becomes one space, any other goes (``by (app)`` is ``by(app)``).  String literals stay
    as they are (a space inside a quoted label value is a real change), and so do comments.

    >>> _promql_form('sum by (app, site) (\\n  rate(x{a="b c"}[5m] ) )')
    'sum by(app,site)(rate(x{a="b c"}[5m]))'
    >>> _promql_form('x{a="b c"}') == _promql_form('x{a="b  c"}')
    False
    """
    out: list[str] = []
    space = False
    for m in _PROMQL_PART.finditer(query):
        part = m.group()
        if part.isspace():
            space = True
            continue
        if space and out and _WORD_CHAR.match(out[-1][-1]) and _WORD_CHAR.match(part[0]):
            out.append(" ")
        out.append(part.rstrip() + "\n" if part[0] == "#" else part)  # a comment runs to the line's end
        space = False
    return "".join(out).rstrip("\n")


def _check_file_names(spec: PrometheusSpec, fs: Any, root: str, unreadable: str | None = None) -> None:
    """Refuse a dataset with no recorded definition whose file names (a hash of query, step and
    chunk start) show that another query or step wrote them.  ``unreadable``: why the dataset's
    ``_ingest.json`` could not be read, when there is one (else an earlier version wrote none)."""
    span = CHUNK_POINTS * spec.step_ms
    for rel in _ingested(fs, root):
        m = _INGEST_FILE.match(rel.rsplit("/", 1)[-1])
        stamp = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        second = round(stamp.timestamp() * 1000)   # the chunk start, to the second
        start = -(-second // span) * span           # the chunk of this step that starts within it
        if start >= second + 1000 or _file_name(spec, Chunk(start, start, start)) != m.group(0):
            # (a corrupt _ingest.json was said to be one an earlier modelfactory never wrote)
            why = (f", and its {DEFINITION_NAME}, which records them, is corrupt ({unreadable}; cut short by a "
                   "crash, or edited), so the file names stand in for it" if unreadable else
                   f" (an earlier modelfactory wrote it, and did not record its query and step in {DEFINITION_NAME})")
            raise IngestError(_another_definition(spec, "query or step", (
                f"the name of its file {rel} is not one this query and step give{why}")))


def _another_definition(spec: PrometheusSpec, what: str, earlier: str) -> str:
    return (f"out={spec.out!r} holds the dataset of another {what}: {earlier}, and this ingest asks for "
            f"the query {spec.query!r} at step {_step_text(spec.step_ms)}. Its files would sit beside the "
            "earlier ones, and readers would take both for one dataset. Ingest into another out / --out, or "
            "pass overwrite=True / --overwrite to start this dataset over (the files of earlier ingests are "
            "deleted once this one has fetched every chunk).")


def _step_text(step_ms: Any) -> str:
    return f"{_seconds(step_ms)}s" if isinstance(step_ms, int) and step_ms > 0 else repr(step_ms)


def _files(fs: Any, root: str) -> list[str]:
    """Every file under ``root``, hidden ones too, as paths relative to it."""
    base = root.rstrip("/")
    fs.invalidate_cache(base)
    try:
        found = fs.find(base) if fs.isdir(base) else []
    except FileNotFoundError:
        return []
    return [p[len(base) + 1:] for p in found if p.startswith(base + "/")]


def _listed(spec: PrometheusSpec, fs: Any, root: str) -> list[str]:
    """:func:`_files` of ``root``, a storage error there an :class:`IngestError` naming ``out``."""
    try:
        return _files(fs, root)
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        raise _cannot_list(spec, err) from err


def _cannot_list(spec: PrometheusSpec, err: BaseException) -> IngestError:
    return IngestError(f"Could not list out={spec.out!r}: {error_text(err)}. Check that out / --out "
                       "is readable (and storage_options for remote stores).")


def _in_partitions(rel: str) -> bool:
    """Whether the file ``rel`` lies in partition folders (``k=v``, not hidden), or at the root."""
    # (an empty folder name: "root//x.parquet", where an ingest with no by wrote on an object store)
    return all("=" in d and d[0] != "." for d in rel.split("/")[:-1] if d)


def _ingested(fs: Any, root: str) -> list[str]:
    """The files of earlier ingests under ``root`` (relative paths): named like :func:`_file_name`,
    in partition folders (``k=v``), not hidden; other files are not the ingest's to judge or delete."""
    return sorted(r for r in _files(fs, root) if _ours(r))


def _ours(rel: str) -> bool:
    """Whether ``rel`` is named like a file an ingest commits (:func:`_file_name`), where it puts it."""
    return bool(_INGEST_FILE.match(rel.rsplit("/", 1)[-1])) and _in_partitions(rel)


def _remove_leftovers(spec: PrometheusSpec, fs: Any, root: str) -> None:
    """Delete the hidden temporary files that an ingest killed before its commit left in ``root``
    (staged chunk files, a half-written ``_ingest.json``).  Only the holder of the folder's lock
    writes them, and this ingest holds it, so none belongs to a running ingest; Parquet readers
    skip them, but they would pile up, one set per killed run (on S3, bytes billed for ever)."""
    rels = _listed(spec, fs, root)
    left = [r for r in rels if _in_partitions(r) and (_STAGED_FILE.match(r.rsplit("/", 1)[-1])
                                                      or ("/" not in r and _DEFINITION_TMP.match(r)))]
    if not left:
        return
    base = root.rstrip("/")
    log.warning("removing %d temporary file(s) left in %s by an ingest that did not finish (killed?), e.g. %s",
                len(left), spec.out, left[0])
    for rel in left:
        try:
            fs.rm_file(f"{base}/{rel}")  # one at a time: rm reads its paths as glob patterns on object stores
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001 - they are hidden: the ingest itself can go on
            log.warning("could not remove the temporary file %s/%s: %s", base, rel, error_text(err))


def _check_foreign(spec: PrometheusSpec, fs: Any, root: str) -> None:
    """Refuse to ingest into ``out`` while it holds Parquet files no ingest wrote: they would be read
    beside the ingest's rows as one dataset.  Overwrite deletes only the ingest's own files, since
    deleting these could destroy data that exists nowhere else; and a plain ingest, which checked
    nothing, took the folder over (recorded its definition there) and added its rows beside them,
    so a series in both had every time twice and train failed its group."""
    rels = _listed(spec, fs, root)
    foreign = sorted(r for r in rels if r.endswith(".parquet") and not _ours(r)
                     and not any(part[:1] in (".", "_") for part in r.split("/")))
    if foreign:
        base = spec.out.rstrip("/")
        shown = ", ".join(f"{base}/{r}" for r in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                                    if len(foreign) > 3 else "")
        if spec.overwrite:
            why = ("Overwrite deletes only the files ingests wrote (<chunk start>-<hash>.parquet in partition "
                   "folders), so these would be read beside the new rows as one dataset. Move or delete them (or "
                   "ingest into another out / --out), then rerun with overwrite=True / --overwrite.")
        else:
            why = ("An ingest adds its own files (<chunk start>-<hash>.parquet in partition folders) beside them, "
                   "and readers would take both for one dataset (a series in both would have each of its times "
                   "twice, and train fails such groups). Nothing was written; ingest into another out / --out (a "
                   "new folder), or move or delete these files first.")
        raise IngestError(f"out={spec.out!r} holds {len(foreign)} Parquet file(s) that no ingest wrote: {shown}. {why}")


def _remove_ingested(fs: Any, root: str) -> None:
    """Delete the files of earlier ingests (for ``overwrite``), and their emptied folders on a disk."""
    base = root.rstrip("/")
    rels = _ingested(fs, root)
    log.info("overwrite: deleting the %d files of earlier ingests under %s", len(rels), base)
    for rel in rels:
        fs.rm_file(f"{base}/{rel}")  # one at a time: rm reads its paths as glob patterns on object stores
    if _is_local(fs):
        for folder in sorted({rel.rsplit("/", i)[0] for rel in rels for i in range(1, rel.count("/") + 1)},
                             key=lambda f: -f.count("/")):
            try:
                os.rmdir(f"{base}/{folder}")  # only if empty
            except OSError:
                pass


def _write_definition(fs: Any, root: str, spec: PrometheusSpec) -> None:
    """Write ``_ingest.json`` whole or not at all: on a disk through a hidden file renamed over it
    (a put on an object store is atomic already)."""
    path, data = f"{root.rstrip('/')}/{DEFINITION_NAME}", json.dumps(_definition(spec), indent=1).encode()
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{root.rstrip('/')}/.{DEFINITION_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _commit(spec: PrometheusSpec, staged: list[tuple[str, str]], earlier: dict | None) -> None:
    """Rename the staged files to their final names; first, with ``overwrite``, delete the files
    of earlier ingests, and record the dataset's definition if ``earlier`` is not it.  In that
    order, a failure at any point leaves files of one definition only, the recorded one."""
    fs, root = fsspec.core.url_to_fs(spec.out, **spec.storage_options)
    local = _is_local(fs)
    try:
        if spec.overwrite:
            _remove_ingested(fs, root)
        if earlier != _definition(spec):
            _write_definition(fs, root, spec)
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        _discard(fs, staged)
        again = " with overwrite / --overwrite" if spec.overwrite else ""
        raise IngestError(f"Could not {'replace the dataset in' if spec.overwrite else 'write to'} "
                          f"out={spec.out!r}: {error_text(err)}. Nothing new was committed; check that "
                          f"out / --out is writable and rerun{again}.") from err
    for i, (tmp, final) in enumerate(staged):
        try:
            if local:
                fs.mv(tmp, final)  # a rename
            else:  # one object at a time: mv and rm read their paths as glob patterns there
                fs.cp_file(tmp, final)
                fs.rm_file(tmp)
        except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
            _discard(fs, staged[i:])
            raise IngestError(f"Could not rename {tmp} to {final}: {error_text(err)}. {i} of "
                              f"{len(staged)} files were committed, each complete; rerun the same range "
                              "to finish.") from err


def _discard(fs: Any, staged: Sequence[tuple[str, str]]) -> None:
    """Remove staged files, best effort: the error that led here is the one to report."""
    for tmp, _ in staged:
        try:
            fs.rm_file(tmp)
        except FileNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001
            log.warning("could not remove the staged file %s: %s", tmp, error_text(err))


# -- HTTP ----------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow redirects: credentials must not travel to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


def _opener(spec: PrometheusSpec) -> urllib.request.OpenerDirector:
    if spec.verify_tls:
        ctx = ssl.create_default_context(cafile=spec.ca_file)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect())


def _query_range(spec: PrometheusSpec, opener: Any, a_ms: int, b_ms: int,
                 stop: threading.Event | None = None) -> list:
    body = urllib.parse.urlencode({"query": spec.query, "start": f"{a_ms / 1000:.3f}",
                                   "end": f"{b_ms / 1000:.3f}", "step": _seconds(spec.step_ms)})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json",
               "User-Agent": "modelfactory-ingest", **dict(spec.headers)}
    for attempt in range(spec.retries + 1):
        if stop is not None and stop.is_set():  # interrupted, or another chunk failed: no more requests
            raise _Stopped
        last = attempt == spec.retries
        request = urllib.request.Request(spec.api_url, data=body.encode(), headers=headers)
        try:
            deadline = time.monotonic() + spec.timeout_s
            with opener.open(request, timeout=spec.timeout_s) as resp:
                raw, status, ctype = _read_by(resp, deadline), resp.status, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
            location = err.headers.get("Location", "")
            err.close()
            if status in _RETRY_STATUS and not last and not _query_timed_out(raw):
                _sleep(attempt, stop)
                continue
            raise _http_error(spec, status, raw, location, attempt) from err
        except (OSError, HTTPException) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, ssl.SSLError):
                raise IngestError(_redact(spec, (
                    f"TLS error talking to {spec.display_url}: {reason}. Pass ca_file / --ca-file "
                    "with your CA bundle, or verify_tls=False / --no-verify-tls on a trusted network."
                ))) from err
            if isinstance(err, TimeoutError):  # connected and asked, then no (whole) answer in time
                raise _timed_out(spec, err, attempt) from err
            if not last:  # refused, reset, dropped: the server or the network may be back soon
                _sleep(attempt, stop)
                continue
            raise IngestError(_redact(spec, (
                f"Could not reach Prometheus at {spec.display_url} ({_retried(attempt)}): {reason}. "
                "Check the URL and port, that the server is running, and network access.")
            )) from err
        return _parse(spec, raw, status, ctype)
    raise AssertionError("unreachable")  # pragma: no cover


def _timed_out(spec: PrometheusSpec, err: TimeoutError, attempt: int) -> IngestError:
    """The error for a request that reached the server and got no (whole) answer in time: a read
    timeout, or a body still trickling in at the deadline.  It is not retried: the same query over
    the same range would run out of time again, after loading the server once more (a connect
    timeout is another matter: it arrives wrapped in a URLError and is retried as unreachable)."""
    what = "send its whole answer" if "in full" in str(err) else "answer"
    return IngestError(_redact(spec, (
        f"Prometheus at {spec.display_url} did not {what} within {spec.timeout_s:g} s "
        f"({_retried(attempt)}). Narrow the query, lower max_points / --max-points (a shorter range "
        "per request), or raise timeout / --timeout; a timeout is not retried, since the same "
        "request would run out of time again.")))


def _read_by(resp: Any, deadline: float) -> bytes:
    """The whole body, or TimeoutError once ``deadline`` passes: the socket's timeout bounds
    each read, not a body that trickles in (a slow proxy, an overloaded Thanos)."""
    parts = []
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the response did not arrive in full within the timeout")
        block = resp.read1(1 << 16)
        if not block:
            return b"".join(parts)
        parts.append(block)


def _query_timed_out(raw: bytes) -> bool:
    """Prometheus' own 503 for a query that ran past its --query.timeout: the same query would
    time out again, so it is not retried (that only repeats the wait and the load)."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("errorType") == "timeout"


def _sleep(attempt: int, stop: threading.Event | None = None) -> None:
    """The back-off before retry ``attempt + 1``, cut short once ``stop`` is set."""
    if stop is None:
        time.sleep(_BACKOFF_S * 2 ** attempt)
    else:
        stop.wait(_BACKOFF_S * 2 ** attempt)


def _retried(attempt: int) -> str:
    return f"after {attempt + 1} attempts" if attempt else "1 attempt"


def _http_error(spec: PrometheusSpec, status: int, raw: bytes, location: str,
                attempt: int) -> IngestError:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    # the status decides the hint (a 401 whose body is Prometheus JSON is still about credentials);
    # the server's own message, when it sent one, follows it
    said = str(payload["error"]) if isinstance(payload, dict) and payload.get("error") else ""
    server_said = f" The server said: {said[:300]}" if said else ""
    if status in (401, 403):
        msg = (f"{spec.display_url} refused the request with HTTP {status}: check the bearer token, "
               "basic auth or tenant header (X-Scope-OrgID) you configured." + server_said)
    elif status == 404:
        msg = (f"HTTP 404 for {spec.api_url.split('?')[0]}: url must be the root of the Prometheus "
               "API (e.g. http://host:9090, or https://host/prometheus for Mimir/Cortex)." + server_said)
    elif said:
        kind = payload.get("errorType", "error")
        hint = {"bad_data": "Fix the PromQL (or the step/range).",
                "execution": "Narrow the query, or lower max_points / --max-points.",
                "timeout": "Narrow the query, or lower max_points / --max-points."}.get(
            kind, "Check the query and the server logs.")
        if kind == "timeout" or "context deadline exceeded" in said:
            # the 503 'timeout', or the 422 'execution' Prometheus answers when the deadline
            # passes inside the engine rather than in the query queue: both say the same
            hint = ("The query ran past the server's query timeout (Prometheus' --query.timeout): "
                    "narrow the query, or lower max_points / --max-points.")
        if re.search(r"same labelset|many-to-many|duplicate series", said):
            hint = ("Two or more series end up with the same labels: keep a label that tells them apart "
                    "(by (...), on (...), ignoring (...)), or aggregate them, e.g. sum by (...) (...).")
        msg = (f"Prometheus rejected the query {spec.query!r} (HTTP {status}, {kind}): "
               f"{said}. {hint}")
    elif status == 504:
        msg = (f"{spec.display_url} answered HTTP 504 (Gateway Timeout, {_retried(attempt)}): a proxy in "
               "front of Prometheus gave up waiting for the answer. Narrow the query, lower max_points / "
               "--max-points (a shorter range per request), or raise the proxy's timeout; a timeout is "
               "not retried, since the same request would run out of time again.")
    elif 300 <= status < 400:
        msg = (f"{spec.display_url} answered HTTP {status}, a redirect to {location!r}. Pass the "
               "final URL as url / --url (redirects are not followed, to keep credentials safe).")
    else:
        text = _redact(spec, raw.decode("utf-8", "replace")).strip()[:300]
        msg = (f"{spec.display_url} answered HTTP {status} ({_retried(attempt)}): {text!r}. "
               "Retry later or check the server logs.")
    return IngestError(_redact(spec, msg))


def _parse(spec: PrometheusSpec, raw: bytes, status: int, ctype: str) -> list:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or "status" not in payload:
        start = _redact(spec, raw.decode("utf-8", "replace"))[:80]
        raise IngestError(_redact(spec, (
            f"{spec.display_url} did not answer with Prometheus API JSON (HTTP {status}, "
            f"{ctype or 'no content type'}, starting {start!r}). url must be the root of the "
            "Prometheus HTTP API, e.g. http://host:9090.")))
    if payload["status"] != "success":
        raise _http_error(spec, status, raw, "", 0)
    for warning in payload.get("warnings") or ():
        log.warning("Prometheus warning for %r: %s", spec.query, _redact(spec, str(warning)))
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    kind = data.get("resultType")
    if kind != "matrix" or not isinstance(data.get("result"), list):
        raise IngestError(
            f"The query {spec.query!r} returned a {kind!r} result from {spec.display_url}, expected "
            "a 'matrix' (series over time). url must point at a Prometheus-compatible API whose "
            "/api/v1/query_range returns matrices.")
    return data["result"]


# -- writing -------------------------------------------------------------------------------


def _col(label: str) -> str:
    return "metric" if label == "__name__" else label


def _fmt(key: tuple) -> str:
    labels = dict(key)
    name = labels.pop("__name__", "")
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _check_labels(spec: PrometheusSpec, series: Mapping[tuple, Any]) -> None:
    lacking = {}
    for key in series:
        names = [_col(k) for k, _ in key]
        cols = set(names)
        if len(cols) != len(names) or cols & {"ts", "value"}:
            c = min(k for k, _ in key if k in ("ts", "value") or (k == "metric" and "__name__" in dict(key)))
            why = "the metric name (__name__)" if c == "metric" else "the sample " + ("time" if c == "ts" else c)
            # label_replace only copies a label; setting the original to "" then removes it
            raise IngestError(
                f"Series {_fmt(key)} has the label {c!r}, which would clash with the output column {c} "
                f"that holds {why}. Rename it in the query: label_replace(label_replace(<query>, "
                f'"{c}_label", "$1", "{c}", "(.+)"), "{c}", "", "", "").')
        missing = [c for c in spec.by if c not in cols]
        if missing:
            lacking[key] = missing
        labels = {_col(k): v for k, v in key}
        hive_null = [c for c in spec.by if labels.get(c) == _HIVE_NULL]
        if hive_null:  # Parquet readers read that folder name as a null key, whatever its escaping
            raise IngestError(f"Series {_fmt(key)} has {hive_null[0]}={_HIVE_NULL!r}, the folder name Hive and "
                              "Arrow read as a missing value: rename that value in the query with label_replace().")
    if lacking:
        missing = sorted({c for m in lacking.values() for c in m})
        examples = "; ".join(_fmt(k) for k in sorted(lacking)[:3])
        raise IngestError(
            f"{len(lacking)} of {len(series)} series lack the label(s) {', '.join(missing)} given in "
            f"by={list(spec.by)}, e.g. {examples}. Every series needs every `by` label: add it in the "
            "query (sum by (...), label_replace), filter such series out, or drop it from by / --by.")


_NAME_MAX = 255  # bytes in one file or folder name on Linux, macOS and Windows file systems


def _check_folder_names(spec: PrometheusSpec, groups: Mapping[tuple[str, ...], list[tuple]]) -> None:
    """Refuse a ``by`` value whose folder name a local file system cannot hold (object stores can)."""
    for values, keys in groups.items():
        for c, v in zip(spec.by, values):
            size = len(hive_folder([c], [v]).encode())
            if size > _NAME_MAX:
                raise IngestError(
                    f"The by label {c!r} has a value of {len(v)} characters ({v[:30]!r}...) in series "
                    f"{_fmt(keys[0])[:200]}: its folder name ({c}=...) would be {size} bytes, over the "
                    f"{_NAME_MAX} bytes a folder name may have. Partition by other labels (drop {c!r} from "
                    "by / --by; it stays a column), or write to an object store (s3://...).")


def _table(spec: PrometheusSpec, keys: list[tuple], series: Mapping) -> pa.Table:
    names = sorted({_col(k) for key in keys for k, _ in key} - set(spec.by))
    names.sort(key=lambda c: c != "metric")
    columns: dict[str, list] = {c: [] for c in names}
    ts: list[int] = []
    vals: list[float] = []
    for key in keys:
        labels = {_col(k): v for k, v in key}
        t, v = series[key]
        for c in names:
            columns[c].extend([labels.get(c)] * len(t))
        ts.extend(t)
        vals.extend(v)
    arrays = [pa.array(columns[c], pa.string()) for c in names]
    arrays += [pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")), pa.array(vals, pa.float64())]
    return pa.table(arrays, names=names + ["ts", "value"])


def _file_name(spec: PrometheusSpec, chunk: Chunk) -> str:
    digest = hashlib.sha256(f"{spec.query}\0{spec.step_ms}\0{chunk.start_ms}".encode()).hexdigest()
    stamp = datetime.fromtimestamp(chunk.start_ms / 1000, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{digest[:16]}.parquet"


def _earlier_folder(fs: Any, root: str, by: Sequence[str], values: tuple[str, ...]) -> str | None:
    """The partition folder of ``values`` as ingests before Spark-style escaping named it (every
    character but letters, digits and ``_.-~`` as ``%XX``: ``site=eu%20west``), if it differs from
    today's name and exists.  Rerunning or appending into a dataset written then keeps to its folder:
    a second folder for the same series would hold its rows twice ("idempotent" reruns doubled
    them, and training failed on the repeated timestamps)."""
    if any(v is None for v in values):
        return None
    legacy = "/".join(f"{c}={urllib.parse.quote(v, safe='')}" for c, v in zip(by, values))
    if legacy == hive_folder(by, values):
        return None
    path = f"{root.rstrip('/')}/{legacy}"
    return path if fs.exists(path) else None


def _stage(spec: PrometheusSpec, fs: Any, root: str, chunk: Chunk, values: tuple[str, ...],
           table: pa.Table, made: set[str] | None = None) -> tuple[str, str]:
    """Write ``table`` merged with the rows of the existing file it does not replace: the fresh
    rows replace every earlier row of this file (one partition) at the times they cover, whatever
    its labels (a series that gained or lost a label, say Thanos' external labels, is not kept
    twice); earlier rows at times the server no longer returns (retention moved on, data
    deleted) are kept, as an archive must."""
    # escaped as Spark escapes it; with no by, the root itself: "root/" + "" put the files of an
    # object store under "root//" (a key with an empty folder name), which no listing of root shows
    directory = f"{root.rstrip('/')}/{hive_folder(spec.by, values)}" if spec.by else root.rstrip("/")
    name = _file_name(spec, chunk)
    try:
        if not spec.overwrite:  # starting over: today's folder names, the earlier files all go
            directory = _earlier_folder(fs, root, spec.by, values) or directory
            if not spec.by and not _is_local(fs) and fs.exists(f"{root.rstrip('/')}//{name}"):
                # this chunk's file as an earlier version wrote it with no by ("root//NAME"): merged
                # there, not written a second time beside it
                directory = f"{root.rstrip('/')}/"
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        raise IngestError(f"Could not read {directory}: {error_text(err)}. Check that out / --out is "
                          "readable (and storage_options for remote stores).") from err
    final, tmp = f"{directory}/{name}", f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        if _is_local(fs):  # object stores have no folders (and makedirs would create a bucket)
            _make_folders(directory, made)
        if not spec.overwrite and fs.exists(final):
            with fs.open(final, "rb") as f:
                old = pq.read_table(f)
            fresh = pc.unique(table["ts"].cast(pa.int64()))
            old = old.filter(pc.invert(pc.is_in(old["ts"].cast(pa.int64()), value_set=fresh)))
            if old.num_rows:
                names = [c for c in table.column_names + old.column_names if c not in ("ts", "value")]
                names = sorted(set(names), key=lambda c: (c != "metric", c))
                table = pa.concat_tables([old, table], promote_options="default")
                table = table.select(names + ["ts", "value"])
                table = table.sort_by([(c, "ascending") for c in names + ["ts"]])
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
    except Exception as err:  # noqa: BLE001 - any storage error (botocore's are not OSErrors)
        _discard(fs, [(tmp, final)])
        raise IngestError(f"Could not write {final}: {error_text(err)}. Check that out / --out is "
                          "writable (and storage_options for remote stores).") from err
    return tmp, final


def _make_folders(directory: str, made: set[str] | None) -> None:
    """Make ``directory`` and its missing parents on a local disk, adding each one made to ``made``."""
    missing, path = [], directory
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by another chunk's thread, which counts it
            continue
        if made is not None:
            made.add(path)


@contextmanager
def _removed_if_empty_on_failure(made: set[str]) -> Iterator[None]:
    """Remove the folders in ``made`` that are empty if the ingest fails (an error, Ctrl-C, or the
    SIGTERM the CLI turns into one).  A first ingest that failed left ``app=x/site=y/`` folders with
    no file in them (its staged files are discarded, not its folders): the next train of ``out``
    said "No Parquet files under ...", where a failed run is to leave the dataset as it was.  Only
    folders this ingest made go, and only empty ones: a commit that failed half-way keeps its files.
    A SIGKILL leaves them (nothing runs then); they hold no data, and the layout check skips them."""
    try:
        yield
    except BaseException:
        for path in sorted(made, key=lambda p: -p.count(os.sep)):  # the deepest first
            try:
                os.rmdir(path)  # only if empty
            except OSError:
                pass
        raise


# -- arguments -----------------------------------------------------------------------------


def _make_spec(url, query, step, by, out, headers, bearer_token, bearer_token_file,
               basic_auth_user, basic_auth_password, basic_auth_password_file,
               verify_tls, ca_file, max_points, timeout, retries, storage_options,
               overwrite=False) -> PrometheusSpec:
    if not isinstance(query, str) or not query.strip():
        raise IngestError(f"query must be a non-empty PromQL string. Got {query!r} instead.")
    if not isinstance(out, str) or not out:
        raise IngestError(f"out must be a path or URL string. Got {out!r} instead.")
    if not isinstance(max_points, int) or not 1 <= max_points <= MAX_POINTS:
        raise IngestError(f"max_points / --max-points must be an int between 1 and {MAX_POINTS}. Got {max_points!r} "
                          "instead.")
    if not isinstance(retries, int) or retries < 0:
        raise IngestError(f"retries must be an int >= 0. Got {retries!r} instead.")
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise IngestError(f"timeout must be a number of seconds > 0. Got {timeout!r} instead.")
    api_url, display, user, password = _split_url(url)
    if verify_tls and ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as err:
            raise IngestError(f"Could not load ca_file / --ca-file {ca_file!r}: {err}. Pass a PEM CA bundle.") from err
    try:
        cols = [c.strip() for c in by.split(",") if c.strip()] if isinstance(by, str) else list(by)
    except TypeError:  # by=None: "'NoneType' object is not iterable", from deep in here
        raise IngestError(f"by / --by must list the labels to partition by, e.g. ['app', 'site'] / --by app,site, "
                          f"or be empty ([] / --by '') for no partition folders. Got {by!r} instead.") from None
    bad = [c for c in cols if not isinstance(c, str) or not _LABEL.match(c)]
    if bad or len(set(map(_col, cols))) != len(cols):
        raise IngestError(f"by / --by must list distinct Prometheus label names (letters, digits and _), "
                          f"e.g. ['app', 'site'] / --by app,site. Got {cols!r} instead.")
    hidden = [c for c in cols if c.startswith("_") and c != "__name__"]
    if hidden:
        c = hidden[0]
        raise IngestError(
            f"The by label {c!r} starts with '_': its folders ({c}=...) would be hidden from every Parquet "
            f"reader, which skips names starting with '_' or '.'. Rename it in the query, e.g. "
            f"label_replace(<query>, {c.lstrip('_')!r}, \"$1\", {c!r}, \"(.*)\"), and pass that name.")
    hdrs = {str(k).strip(): str(v).strip() for k, v in _header_pairs(headers)}
    for k, v in hdrs.items():
        _check_header(k, v)
    secrets = [v for k, v in hdrs.items() if _SECRET_HEADER.search(k)]
    token = bearer_token or _read_secret(bearer_token_file, "bearer_token_file / --bearer-token-file")
    if token:
        _check_header("Authorization", token, "The bearer token (" + (
            "bearer_token" if bearer_token else f"in the file {bearer_token_file!r}, bearer_token_file / "
            "--bearer-token-file") + ")", "Check that it holds the token alone, as it was issued.")
    if basic_auth_user is None and user is not None:
        basic_auth_user, basic_auth_password = user, password
    if basic_auth_user is not None:
        password = (basic_auth_password
                    or _read_secret(basic_auth_password_file, "basic_auth_password_file / --basic-auth-password-file")
                    or os.environ.get(PASSWORD_ENV))
        if not password:
            raise IngestError(f"basic_auth_user / --basic-auth-user {basic_auth_user!r} needs a password: set ${PASSWORD_ENV} "
                              "or pass basic_auth_password_file / --basic-auth-password-file.")
        if token:
            raise IngestError("Both a bearer token and basic auth were given: use one of them.")
        creds = base64.b64encode(f"{basic_auth_user}:{password}".encode()).decode()
        auth, secrets = f"Basic {creds}", [*secrets, password, creds]
    else:
        if not token and os.environ.get(TOKEN_ENV):
            token = os.environ[TOKEN_ENV]
            _check_header("Authorization", token, f"The bearer token (${TOKEN_ENV})",
                          "Check that it holds the token alone, as it was issued.")
        auth = f"Bearer {token}" if token else None
        secrets = [*secrets, token] if token else secrets
    if auth:
        if any(k.lower() == "authorization" for k in hdrs):
            raise IngestError("An Authorization header was given together with a bearer token or "
                              "basic auth: use one of them.")
        hdrs["Authorization"] = auth
    return PrometheusSpec(
        api_url=api_url, display_url=display, query=query, step_ms=_parse_step(step),
        by=tuple(_col(c) for c in cols), out=out, max_points=max_points, timeout_s=float(timeout),
        retries=retries, verify_tls=bool(verify_tls), ca_file=ca_file, headers=tuple(hdrs.items()),
        secrets=tuple(s for s in secrets if s), storage_options=dict(storage_options or {}),
        overwrite=bool(overwrite))


def _header_pairs(headers: Any) -> list[tuple[Any, Any]]:
    """The (name, value) pairs of ``headers``: a mapping, or a list of pairs (as ``requests`` and
    ``http.client`` take them; it raised AttributeError: 'list' object has no attribute 'items')."""
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    try:
        if isinstance(headers, (str, bytes)):
            raise TypeError
        return [(k, v) for k, v in headers]
    except (TypeError, ValueError):  # not iterable, or an item that is no pair
        raise IngestError(  # not shown: a value may be a secret
            "headers must be a mapping of header names to values, e.g. {'X-Scope-OrgID': 'tenant-1'}, or a "
            f"list of (name, value) pairs. Got a {type(headers).__name__} (not shown: it may hold a secret) "
            "instead.") from None


def _check_header(name: str, value: str, what: str | None = None, fix: str | None = None) -> None:
    """Refuse a header that http.client cannot send, naming it: its ValueError (a line break in
    a name) or UnicodeEncodeError (a value outside Latin-1, say a tenant '团队') came from deep in
    the first request, an "internal error" to the CLI.  A value is never shown: it may be a secret."""
    if not _HEADER_NAME.match(name):
        raise IngestError(f"The HTTP header name {name!r} (headers / --header) is not a valid name: it may hold "
                          "only letters, digits and !#$%&'*+-.^_`|~ (no spaces, colons or line breaks). Fix "
                          "the name.")
    try:
        value.encode("latin-1")
        problem = "a line break or another control character" if _HEADER_CONTROL.search(value) else None
    except UnicodeEncodeError as err:
        problem = f"a character outside Latin-1 (character {err.start + 1})"
    if problem:
        what = what or f"The value of the HTTP header {name!r} (headers / --header)"
        raise IngestError(f"{what} holds {problem}, which an HTTP header cannot carry (its text is not shown: "
                          f"it may hold a secret). {fix or 'Pass the value in the ASCII form the server expects.'}")


def _split_url(url: str) -> tuple[str, str, str | None, str | None]:
    try:
        parts = urllib.parse.urlsplit(url if isinstance(url, str) else "")
        _ = parts.port  # a ValueError for a port that is not a number from 0 to 65535
    except ValueError as err:  # 'http://[::1:9090' (an unclosed IPv6 bracket), 'http://host:99999'
        shown = re.sub(r"//[^/@]*@", "//***@", url)
        raise IngestError(f"url must look like http(s)://host:port[/prefix] ({err}). Got {shown!r} "
                          "instead.") from err
    host = parts.netloc.rpartition("@")[2]
    path = parts.path.rstrip("/")
    for suffix in ("/api/v1/query_range", "/api/v1"):
        path = path[: -len(suffix)] if path.endswith(suffix) else path
    display = urllib.parse.urlunsplit((parts.scheme, host, path, "", ""))
    if parts.scheme not in ("http", "https") or not host:
        shown = re.sub(r"//[^/@]*@", "//***@", url) if isinstance(url, str) else url
        raise IngestError(f"url must look like http(s)://host:port[/prefix]. Got {shown!r} instead.")
    api = urllib.parse.urlunsplit((parts.scheme, host, path + "/api/v1/query_range", parts.query, ""))
    unquote = urllib.parse.unquote
    user = unquote(parts.username) if parts.username is not None else None
    return api, display, user, unquote(parts.password) if parts.password is not None else None


def _read_secret(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as err:
        raise IngestError(f"Could not read {what} {path!r}: {err.strerror or error_text(err)}.") from err
    except UnicodeDecodeError:  # (its bytes are not shown: they may be the secret)
        raise IngestError(f"{what} {path!r} is not UTF-8 text: it must hold the secret alone, as text.") from None


def _redact(spec: PrometheusSpec, text: str) -> str:
    for secret in spec.secrets:
        text = text.replace(secret, "***")
    return text


def _parse_step(step: StepLike) -> int:
    ms = None
    if isinstance(step, timedelta):
        ms = step / timedelta(milliseconds=1)
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        ms = step * 1000
    elif isinstance(step, str):
        ms = _number(step) * 1000 if _number(step) is not None else _duration_ms(step.strip())
    if ms is None or ms != ms or ms < 1:
        raise IngestError(f"step must be seconds or a Prometheus duration like '30s', '5m', '1h' "
                          f"(at least 1ms). Got {step!r} instead.")
    return round(ms)


def _parse_time(value: TimeLike, name: str, now: datetime) -> int:
    ms = None
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        ms = round(dt.timestamp() * 1000)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        ms = round(value * 1000)
    elif isinstance(value, str):
        text = value.strip()
        m = re.match(r"^now(?:([+-])(\w+))?$", text)
        if _number(text) is not None:
            ms = round(_number(text) * 1000)
        elif m:
            delta = _duration_ms(m.group(2)) if m.group(2) else 0
            if delta is not None:
                ms = round(now.timestamp() * 1000) + (-delta if m.group(1) == "-" else delta)
        else:
            try:
                return _parse_time(_fromisoformat(text), name, now)
            except ValueError:
                pass
    if ms is None:
        raise IngestError(f"{name} must be a datetime, ISO-8601 text (2024-03-01T00:00:00Z), unix "
                          f"seconds or 'now-3d'. Got {value!r} instead.")
    if not 0 <= ms < _YEAR_10000_MS:
        year = 1970 + ms // 31_556_952_000  # the mean Gregorian year
        if _YEAR_10000_MS <= ms and 0 <= ms // 1000 < _YEAR_10000_MS and not isinstance(value, datetime) \
                and _number(str(value)) is not None:
            raise IngestError(f"{name}={value!r} is in the year {year}: it looks like milliseconds (as in "
                              f"Grafana URLs); pass unix seconds ({round(ms / 1_000_000)}).")
        raise IngestError(f"{name}={value!r} is in the year {year}: times must lie between 1970 and 9999.")
    return ms


#: The seconds of an ISO-8601 time and its fraction (``00:00:00.5``), as Python 3.10 cannot read them.
_ISO_FRACTION = re.compile(r"(?<=[T ]\d\d:\d\d:\d\d)[.,](\d+)")


def _fromisoformat(text: str) -> datetime:
    """``datetime.fromisoformat`` as Python 3.11 reads ISO-8601, on Python 3.10 too: there it
    refused the ``Z`` of UTC (``2024-03-01T00:00:00Z``, the form our own messages and ``--help``
    recommend, and what Grafana and ``date -u +%FT%TZ`` print) and any fraction of a second but
    3 or 6 digits (``.5``, Go's nanoseconds ``.123456789``).  So ``Z`` becomes ``+00:00`` and the
    fraction 6 digits (cut to microseconds: finer than the millisecond a point is stored at)."""
    text = _ISO_FRACTION.sub(lambda m: "." + (m.group(1) + "00000")[:6], text)
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _duration_ms(text: str) -> int | None:
    m = _DURATION.match(text)
    if not text or not m:
        return None
    return sum(int(g) * unit for g, unit in zip(m.groups(), _UNIT_MS) if g)


def _seconds(ms: int) -> str:
    return str(ms // 1000) if ms % 1000 == 0 else f"{ms / 1000:.3f}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")
