"""The model store: versioned training runs, committed manifest-last.

Layout under the store's root (a folder or any fsspec URL)::

    runs/<run_id>/parts/<unit_id>.<attempt>.parquet
                                            one file per work unit: keys, status,
                                            error, rows, seconds, model bytes
    runs/<run_id>/manifest.json             written last: the commit point
    LATEST                                  the id of the run committed last among
                                            those that fitted a model (or the run
                                            set_latest named since)

Workers write the part files; the client writes the manifest only after every
unit has succeeded, then moves ``LATEST`` (unless the run fitted no model).  A run without a manifest is
invisible (and removable), so a crash never leaves a half-visible run.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import hmac
import json
import platform
import re
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._io import Location, PartInfo
from ._schema import plain_type
from .exceptions import IntegrityError, StoreError

__all__ = ["ModelStore", "new_run_id"]

MANIFEST_VERSION = 1
_META_COLUMNS = ("status", "error", "rows", "seconds", "model")


#: A run id as :func:`new_run_id` writes it (earlier versions: without the random part).
_RUN_ID = re.compile(r"\d{8}T\d{9}Z-[0-9a-f]{6}(?:-[0-9a-f]{6})?")


def new_run_id(spec_digest: str) -> str:
    """A new run's id, ``20260119T060000123Z-1a2b3c-9f8e7d``: the time (to the millisecond, so ids
    sort by time), the job's digest, and 24 random bits.  Without them two identical jobs started
    in the same millisecond (two schedulers, a retried cron job) had one id: one run folder, one
    claim on an out= folder.  Resuming finds a run by its recorded digest, never by its id."""
    import secrets

    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-{spec_digest[:6]}-{secrets.token_hex(3)}"


def versions() -> dict[str, str]:
    """Versions of the libraries a run used (from package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("modelfactory", "pyarrow", "numpy", "pandas", "dask", "distributed", "scikit-learn",
                 "statsmodels"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_part(loc: Location, part: dict, columns: list[str] | None = None) -> pa.Table:
    """Read one part file listed in a manifest, refusing it if its checksum does not match."""
    try:
        data = loc.read_bytes(part["path"])
    except FileNotFoundError as err:
        segs = part["path"].split("/")
        if len(segs) > 2 and segs[0] == "runs" and not loc.exists(f"runs/{segs[1]}/manifest.json"):
            # the whole run went (gc removes the manifest first) while this job read its models
            raise StoreError(f"Run {segs[1]!r} was removed from {loc.url!r} while this job was reading its models "
                             "(`models gc` ran meanwhile?). Run the job again: it uses the run that is LATEST "
                             "then (or pass one that is kept as run=, --run).") from err
        raise IntegrityError(f"Part {part['path']!r} listed in the manifest is missing from "
                             f"{loc.url!r}. Retrain, or restore the file from a backup.") from err
    if len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise IntegrityError(
            f"Part {part['path']!r} in {loc.url!r} does not match its checksum in the "
            "manifest (changed or truncated). Retrain, or restore the file from a backup."
        )
    return pq.read_table(pa.BufferReader(data), columns=columns)


def part_key_types(loc: Location, part: dict, by) -> dict[str, pa.DataType]:
    """The types of the key columns ``by`` in a part's footer (nothing else is read); {} when the
    part is missing or damaged (its checked reads say so)."""
    try:
        with loc.fs.open(loc.path(part["path"]), "rb") as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid):
        return {}
    return {k: schema.field(k).type for k in by if k in schema.names}


def leaf_index(man: dict) -> dict:
    """A committed run's leaf index (``keys``, and per part the leaves it holds), or an empty
    one (read every part) when it does not line up with the run's parts: earlier versions
    listed one entry per unit even when a unit had written several parts."""
    index = man.get("index") or {}
    if not index.get("keys") or len(index.get("parts", ())) != len(man["parts"]):
        return {"keys": [], "parts": []}
    return index


def bucket_index(man: dict) -> dict | None:
    """How a run trained without key folders spread its groups over its parts: ``n`` (the
    shuffle's partitions) and per part the partition it holds (None: any group), or None when
    the manifest has none (runs of earlier versions, runs with key folders or of one unit) or it
    does not line up with the run's parts: then every part may hold any group."""
    b = man.get("buckets")
    if not isinstance(b, dict) or not isinstance(b.get("n"), int) or b["n"] < 2 or list(b.get("keys") or ()) != list(
            man["spec"]["by"]) or len(b.get("parts") or ()) != len(man["parts"]):
        return None
    if any(p is not None and not (isinstance(p, int) and 0 <= p < b["n"]) for p in b["parts"]):
        return None
    return b


def filter_record(expr: Any) -> dict | None:
    """A job's ``filter`` as a manifest records it: ``text`` to read, ``arrow`` (base64 of
    Arrow's own serialization of the expression, what pickle uses, without pickle) to apply it
    again (:func:`stored_filter`); None without a filter."""
    if expr is None:
        return None
    import base64

    record = {"text": str(expr), "arrow": None}
    try:
        buf = expr.__reduce__()[1][0]  # (Expression._deserialize, (buffer,))
        record["arrow"] = base64.b64encode(bytes(buf)).decode("ascii")
    except (AttributeError, IndexError, TypeError, pa.ArrowException):  # not an Arrow expression: text only
        pass
    return record


def stored_filter(record: Any) -> Any:
    """The expression :func:`filter_record` recorded, or None when there is none or this
    pyarrow cannot read it back (the caller says what that means)."""
    if not isinstance(record, dict) or not isinstance(record.get("arrow"), str):
        return None
    import base64
    import binascii

    import pyarrow.compute as pc

    try:
        return pc.Expression._deserialize(pa.py_buffer(base64.b64decode(record["arrow"])))
    except (AttributeError, TypeError, ValueError, binascii.Error, pa.ArrowException):
        return None


def left_out_text(lineage: dict) -> str:
    """How many groups of a retrain's base its input lacked, so the run has no model for them."""
    n, base = lineage["not_in_input"], lineage["base_run"]
    return (f"1 group of run {base} is not in this run (its input lacked it)" if n == 1 else
            f"{n:,} groups of run {base} are not in this run (its input lacked them)")


def _as_run_id(run: Any) -> Any:
    """The id of ``run`` when it is the Run that train returned (``run.id``), else ``run``: a
    Run passed as run= was refused as "No committed run <Run ...>"."""
    if not isinstance(run, str) and isinstance(getattr(run, "id", None), str):
        kind = getattr(run, "kind", "train")
        if kind != "train":  # was "No committed run '<its id>' in '<store>'", as for a typo
            from_run = (getattr(run, "summary", None) or {}).get("model_run")
            hint = f": its models are run {from_run}'s, pass that" if kind == "score" and from_run else ""
            raise StoreError(f"run= takes a train run (the Run that train returned, or its id); {run.id} is a "
                             f"{kind} run{hint}.")
        return run.id
    return run


def _denied_is_a_store_error(method):
    """Turn an object store's "access denied" into a StoreError that names the store."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except PermissionError as err:
            raise StoreError(f"Access to the store {self.location.url!r} was denied ({err}): check the "
                             "credentials (AWS_* environment, ~/.aws, or storage_options: [storage_options] in --config).") from err

    return guarded


class ModelStore:
    """A model store at ``path`` (a folder or an ``s3://`` prefix).

    >>> store = ModelStore("/tmp/no-such-store")   # opening never writes
    >>> store.runs()
    []
    """

    def __init__(self, path: str, *, storage_options: dict | None = None) -> None:
        self.location = Location.of(path, storage_options)

    def __repr__(self) -> str:
        return f"ModelStore({self.location.url!r})"

    # -- runs -------------------------------------------------------------
    @_denied_is_a_store_error
    def runs(self) -> list[str]:
        """Ids of the committed runs, oldest first."""
        return self._runs_holding("manifest.json")["manifest.json"]

    def holds_runs(self) -> bool:
        """Whether this is a model store: LATEST, or a committed or interrupted run under runs/
        (a store whose runs fitted nothing has no LATEST)."""
        return self.location.exists("LATEST") or any(self._runs_holding("manifest.json", "pending.json").values())

    def _runs_holding(self, *names: str) -> dict[str, list[str]]:
        """For each file name in ``names``, the ids of the runs whose folder holds it, sorted.

        A glob of ``runs/*/NAME`` on an object store lists every run's folder, one request per
        run (1.5 s for 300 runs on a local S3 server; tens of seconds on a remote one), so
        there one flat listing of ``runs/`` is read instead (1,000 keys a request), once for
        all ``names``."""
        loc = self.location
        if loc.is_local:
            return {n: sorted(rel.split("/")[-2] for rel in loc.glob(f"runs/*/{n}")) for n in names}
        held: dict[str, list[str]] = {n: [] for n in names}
        top = loc.root.strip("/") + "/runs/"
        try:
            found = loc.fs.find(top)
        except FileNotFoundError:
            return held
        for path in found:
            rel = path.strip("/")
            if rel.startswith(top):
                parts = rel[len(top):].split("/")
                if len(parts) == 2 and parts[1] in held:
                    held[parts[1]].append(parts[0])
        return {n: sorted(ids) for n, ids in held.items()}

    def pending(self) -> list[dict]:
        """Runs that were started but never committed (interrupted), oldest first."""
        held = self._runs_holding("manifest.json", "pending.json")
        done = set(held["manifest.json"])
        return [self._pending(rid) for rid in held["pending.json"] if rid not in done]

    def interrupted_commits(self) -> list[str]:
        """Committed runs whose train stopped between writing the manifest and moving ``LATEST``
        (its ``pending.json``, removed last, is still there), oldest first.  ``LATEST`` stays
        the commit point of "the latest run": readers never take such a run for it by
        themselves (a run that fitted no model is committed and never LATEST, and an older run
        resumed becomes LATEST when it commits, so the newest manifest is not the latest run).
        ``train --resume RUN`` finishes the commit (:meth:`finish_commit`)."""
        held = self._runs_holding("manifest.json", "pending.json")
        return sorted(set(held["manifest.json"]) & set(held["pending.json"]))

    def finish_commit(self, run_id: str) -> dict:
        """Finish the commit of ``run_id`` (one of :meth:`interrupted_commits`): point ``LATEST``
        at it if it fitted a model, as the commit would have, unless ``LATEST`` names a run
        committed after it (a later train of the same models: moving ``LATEST`` back would
        hand scoring the older ones), then remove its pending.json.  Returns its manifest."""
        man = self.manifest(run_id)
        if man["summary"]["counts"].get("ok", 0) > 0:
            before = self._latest_unless_damaged()
            if not self._committed_after(before, man.get("committed")):
                self.write("LATEST", run_id.encode(),
                           f"LATEST still names {before or 'no run'}: use run {run_id} by its id (--run {run_id}).")
        if self.location.exists(f"runs/{run_id}/pending.json"):
            self.location.rm(f"runs/{run_id}/pending.json")
        return man

    @_denied_is_a_store_error
    def set_latest(self, run: str) -> str | None:
        """Point ``LATEST`` at the committed run ``run`` (roll back to an earlier run after a bad
        one, or forward again): what scoring, ``models show`` and the next ``retrain`` read as
        the latest run, until a train commits.  Refused for a run whose manifest does not verify,
        one that fitted no model, or one whose train stopped before moving ``LATEST`` (resume it).
        Returns the run ``LATEST`` named before."""
        man = self.manifest(run)
        rid = man["run_id"]
        if self.location.exists(f"runs/{rid}/pending.json"):
            raise StoreError(f"Run {rid}'s train stopped before moving LATEST: train --resume {rid} (resume= "
                             "from Python) finishes its commit, and moves LATEST.")
        if not man["summary"]["counts"].get("ok", 0):
            raise StoreError(f"Run {rid} fitted no model: scoring with it would skip every group. Name a run that "
                             "fitted models (models list).")
        before = self._latest_unless_damaged()
        self.write("LATEST", rid.encode(), f"LATEST still names {before or 'no run'}.")
        return before

    def _latest_unless_damaged(self) -> str | None:
        """What LATEST names before a write moves it: None for no run, or for a damaged LATEST
        (the write makes it afresh)."""
        try:
            return self.latest()
        except IntegrityError:
            return None

    def _committed_after(self, rid: str | None, when: str | None) -> bool:
        """Whether run ``rid`` has a readable manifest committed after ``when`` (an ISO time in
        UTC, as manifests record it; None: unknown)."""
        if rid is None or when is None:
            return False
        try:
            committed = self.manifest(rid).get("committed")
        except StoreError:  # removed, or damaged: not a run to keep LATEST on
            return False
        return isinstance(committed, str) and _dt.datetime.fromisoformat(committed) > _dt.datetime.fromisoformat(when)

    def _pending(self, rid: str) -> dict:
        """A run's pending.json; one that cannot be read (damaged outside modelfactory: its
        writes are atomic) is still listed, by its folder's name, so that `models list` shows
        it and `models gc --pending` can remove it; it cannot be resumed (no digest)."""
        try:
            p = json.loads(self.location.read_bytes(f"runs/{rid}/pending.json"))
        except (ValueError, UnicodeDecodeError) as err:
            return {"run_id": rid, "unreadable": f"{type(err).__name__}: {err}"}
        return p if isinstance(p, dict) and p.get("run_id") == rid else {"run_id": rid, "unreadable": "not a run record"}

    @_denied_is_a_store_error
    def latest(self) -> str | None:
        """The id of the run that committed last among those that fitted a model (runs that
        fitted none never become LATEST; a resumed older run does once it commits), or the run
        :meth:`set_latest` named since; None before any."""
        if not self.location.exists("LATEST"):
            return None
        raw = self.location.read_bytes("LATEST")
        try:
            rid = raw.decode().strip()
        except UnicodeDecodeError:
            rid = None
        if rid is None or not _RUN_ID.fullmatch(rid):  # damaged (a flipped byte), or not written by modelfactory
            raise IntegrityError(
                f"LATEST in {self.location.url!r} does not hold a run id ({raw[:40]!r}): it was changed or damaged. "
                "Pass a run by its id (run=..., --run; `models list` shows them), or train again: a commit "
                "writes LATEST afresh.")
        return rid

    def latest_named(self) -> str:
        """What LATEST names, for a message: the run id, "no run", or "a damaged LATEST" (never
        an error: a message about something else must not turn into one about LATEST)."""
        try:
            return self.latest() or "no run"
        except (IntegrityError, StoreError):
            return "a damaged LATEST"

    def require_exists(self, fix: str = "Pass the store= (--store) that the training wrote to; `python -m "
                                        "modelfactory models list --store PATH` shows a store's runs.") -> None:
        """A StoreError when the store's path holds nothing, or a file: a misspelt store, which
        "no committed run yet. Train first" sent the user to retrain (and `models list` told of
        "no runs").  ``fix`` ends the message."""
        fs, root = self.location.fs, self.location.root
        if not fs.exists(root):
            raise StoreError(f"No model store at {self.location.url!r}: there is nothing at that path. {fix}")
        if fs.isfile(root):
            raise StoreError(f"{self.location.url!r} is a file, not a model store (a folder that train writes "
                             f"runs/ and LATEST into). {fix}")

    @_denied_is_a_store_error
    def resolve(self, run: str | None = "latest") -> str:
        run = _as_run_id(run)
        if run in (None, "latest"):
            rid = self.latest()
            if rid is None:
                runs = self.runs()
                if runs:  # only runs that fitted no model, which never become LATEST
                    raise StoreError(
                        f"No run of the store at {self.location.url!r} has fitted a model yet: its runs "
                        f"({', '.join(runs[-3:])}) fitted none, so none is LATEST. Read their errors with "
                        f"run={runs[-1]!r} (--run), then train again: with other parameters if those were the "
                        f"cause (a season longer than the series), or, once the data is fixed, only the groups "
                        f"that failed (base={runs[-1]!r} and retrain='failed': --base, --only-failed).")
                self.require_exists()
                pending = [p["run_id"] for p in self.pending() if "unreadable" not in p]
                if pending:  # `models list` offers it: so does this
                    raise StoreError(f"The store at {self.location.url!r} has no committed run yet: its run "
                                     f"{pending[-1]} was interrupted. Finish it with train --resume {pending[-1]} "
                                     "(resume= from Python) and the arguments it started with, or train again.")
                raise StoreError(f"The store at {self.location.url!r} has no committed run yet. "
                                 "Train first: modelfactory.train(..., store=...) (python -m modelfactory train ... --store).")
            if not self.location.exists(f"runs/{rid}/manifest.json"):
                runs = self.runs()
                known = (", ".join(runs[-5:]) + (f" (and {len(runs) - 5} older)" if len(runs) > 5 else "")
                         if runs else "none")
                raise StoreError(f"LATEST in {self.location.url!r} names run {rid!r}, whose manifest "
                                 f"(runs/{rid}/manifest.json) is missing: the run was removed or not copied. "
                                 f"Committed runs: {known}. Pass one as run= (CLI: --run), or train again "
                                 "(a commit moves LATEST).")
            return rid
        if not self.location.exists(f"runs/{run}/manifest.json"):
            known = ", ".join(self.runs()[-5:]) or "none"
            if isinstance(run, str) and "/" not in run and self.location.exists(f"runs/{run}/pending.json"):
                raise StoreError(f"Run {run!r} in {self.location.url!r} was interrupted and never committed, so it "
                                 f"has no models to read: finish it with train(..., resume={run!r}) (train --resume "
                                 f"{run}) and the arguments it started with, or pass a committed run. "
                                 f"Recent runs: {known}.")
            raise StoreError(f"No committed run {run!r} in {self.location.url!r}. Recent runs: {known}.")
        return run

    @_denied_is_a_store_error
    def manifest(self, run: str | None = "latest") -> dict[str, Any]:
        """The committed manifest of ``run`` (a dict), its checksum and signature verified."""
        # Read straight away (resolve() would first ask whether the manifest exists: a request
        # more per run, which `models list` pays for every run of the store); resolve() only
        # when the read finds nothing, for an error that says what is missing.
        run = _as_run_id(run)
        rid = self.latest() if run in (None, "latest") else run
        if rid is None:
            rid = self.resolve(run)  # raises: no run has fitted a model yet
        try:
            raw = self.location.read_bytes(f"runs/{rid}/manifest.json")
        except FileNotFoundError:
            self.resolve(run)  # raises the StoreError naming the run (and LATEST) that is missing
            raise
        where = f"run {rid!r} in {self.location.url!r}"
        try:
            body = json.loads(raw)
        except ValueError as err:  # not JSON, or not even text (UnicodeDecodeError)
            raise IntegrityError(f"The manifest of {where} is not valid JSON ({type(err).__name__}: {err}): it was "
                                 "changed or truncated. Restore it from a backup, or retrain.") from err
        claimed = body.pop("checksum", None)
        if claimed != _digest_of(body):
            raise IntegrityError(f"The manifest of {where} does not match its checksum: it was changed "
                                 "after it was committed. Retrain, or restore it from a backup.")
        key = signing_key()
        if key is not None:
            sig_path = f"runs/{rid}/manifest.sig"
            if not self.location.exists(sig_path):
                raise IntegrityError(f"The manifest of {where} is not signed, and {SIGNING_ENV} is set: "
                                     "refusing to load it. Unset the key only if you trust this store.")
            sig = self.location.read_bytes(sig_path).decode().strip()
            if not hmac.compare_digest(sig, _sign(key, raw)):
                raise IntegrityError(f"The signature of the manifest of {where} does not match: it was "
                                     f"changed, or signed with another key than {SIGNING_ENV}.")
        if body.get("run_id") != rid:  # a whole manifest (and signature) copied from another run's folder
            raise IntegrityError(f"The manifest in the folder of {where} is that of run {body.get('run_id')!r}: "
                                 "it was copied there. Restore this run's own manifest from a backup, or retrain.")
        return body

    # -- reading ----------------------------------------------------------
    def _read_part(self, part: dict, columns: list[str] | None = None) -> pa.Table:
        return read_part(self.location, part, columns)

    @_denied_is_a_store_error
    def table(self, run: str | None = "latest", *, columns: list[str] | None = None) -> pa.Table:
        """All group rows of ``run`` as an Arrow table (checksums verified)."""
        man = self.manifest(run)
        parts = [self._read_part(p, columns) for p in man["parts"]]
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts)

    @_denied_is_a_store_error
    def groups(self, run: str | None = "latest") -> pd.DataFrame:
        """The group table of ``run``: keys, status, error, rows, seconds (no model bytes)."""
        rid = self.resolve(run)  # once: a run committed meanwhile moves "latest" between two reads
        man = self.manifest(rid)
        cols = list(man["spec"]["by"]) + ["status", "error", "rows", "seconds"]
        return self.table(rid, columns=cols).to_pandas()

    @_denied_is_a_store_error
    def load(self, key: dict | tuple | str, run: str | None = "latest", *, trust: bool = False):
        """Load the fitted model of one group, e.g. ``load({"app": "a", "site": "s1"})``.

        Reads only the parts that the run's index names for the key.  Pickled
        user models are loaded only with ``trust=True``.

        Examples
        --------
        >>> import modelfactory, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = modelfactory.demo.write_dataset(f"{d}/data", series=4, days=3)
        >>> _ = modelfactory.train(f"{d}/data", by="app,site", time="ts", target="value",
        ...                        store=f"{d}/store", cluster="inline")
        >>> store = ModelStore(f"{d}/store")
        >>> model = store.load({"app": "app-00", "site": "site-00000"})
        >>> model.is_fitted, list(store.groups().status)
        (True, ['ok', 'ok', 'ok', 'ok'])
        """
        import pyarrow.compute as pc

        from .models import stored_class

        man = self.manifest(run)
        by = man["spec"]["by"]
        if isinstance(key, str) and "=" in key:
            key = parse_key(key)
        want = key_values(key, by, f"run {man['run_id']!r}")
        serializer = man["spec"].get("serializer", "native")
        if serializer != "native" and not trust:
            raise StoreError(f"Run {man['run_id']!r} holds pickled user models: loading one runs code from "
                             "the store. Pass trust=True (CLI: --trust) only if you trust who wrote it.")
        index = leaf_index(man)
        parts = man["parts"]
        if index["keys"]:
            leaf = [str(want[by.index(k)]) for k in index["keys"]]
            parts = [p for p, leaves in zip(parts, index["parts"]) if leaf in [[str(v) for v in lf] for lf in leaves]]
        elif bucket_index(man):
            parts = self._its_partition_first(man, want)
        hit = seen = None
        for part in parts:
            tbl = read_part(self.location, part, columns=list(by) + ["status", "error", "model"])
            seen = tbl.select(list(by)).slice(0, 5) if seen is None or not seen.num_rows else seen
            mask = None
            for k, v in zip(by, want):
                col = tbl[k]
                if pa.types.is_dictionary(col.type):  # a categorical key: compare its values
                    col = col.cast(col.type.value_type)
                m = pc.equal(col, typed_key_value(k, v, col.type, f"run {man['run_id']!r}"))
                mask = m if mask is None else pc.and_(mask, m)
            tbl = tbl.filter(mask)
            if tbl.num_rows:
                hit = tbl.slice(0, 1).to_pylist()[0]
                break
        if hit is None:
            from .plot import format_key

            if (seen is None or not seen.num_rows) and man["parts"]:  # examples from one part, not the whole run
                some = next((p for p in man["parts"] if p.get("rows")), man["parts"][0])  # an empty one shows none
                seen = read_part(self.location, some, columns=list(by)).slice(0, 5)
            some = seen.to_pylist() if seen is not None else []
            shown = "; ".join(format_key(row) for row in some)
            raise StoreError(f"No group {format_key(dict(zip(by, want)))} in run {man['run_id']!r}. "
                             f"Some that exist: {shown or 'none'}.")
        if hit["status"] != "ok":
            from .plot import format_key

            raise StoreError(f"Group {format_key(dict(zip(by, want)))} has no model: {hit['status']} ({hit['error']}).")
        if serializer != "native":
            return unpickle_model(hit["model"], man["run_id"])
        return stored_class(man["spec"]["model"]).from_bytes(hit["model"])

    def _its_partition_first(self, man: dict, want: tuple) -> list[dict]:
        """The parts of a run trained without key folders, those of the shuffle partition that
        ``want`` hashes to first: a key found there costs one read, not half the run's; one that
        is not (the hash not computed alike here) is still looked for in the others."""
        from .run import shuffle_buckets

        parts, buckets, by = man["parts"], bucket_index(man), man["spec"]["by"]
        found = part_key_types(self.location, parts[0], by)
        try:
            types = [plain_type(found[k]) for k in by]
            key = pa.table({k: pa.array([typed_key_value(k, v, t, "").as_py()], t)
                            for k, v, t in zip(by, want, types)})
        except (KeyError, TypeError, ValueError, StoreError, pa.ArrowException):
            return parts  # the loop below reads the parts and says what is wrong
        mine = shuffle_buckets(key, buckets["n"])
        if mine is None:
            return parts
        first = {i for i, b in enumerate(buckets["parts"]) if b is None or b == int(mine[0])}
        return [p for i, p in enumerate(parts) if i in first] + [p for i, p in enumerate(parts) if i not in first]

    # -- writing (the client commits) ------------------------------------
    @_denied_is_a_store_error
    def commit(self, run_id: str, manifest: dict[str, Any], parts: list[PartInfo], *, latest: bool = True) -> None:
        """Write the manifest of ``run_id`` (listing ``parts``), then point ``LATEST`` at it
        (unless ``latest`` is false: a run kept for inspection only).

        The manifest carries a checksum of itself; with ``MODELFACTORY_SIGNING_KEY``
        set it is also signed (HMAC-SHA256, ``manifest.sig``, written first).
        """
        body = dict(manifest)
        body.update(format_version=MANIFEST_VERSION, run_id=run_id,
                    committed=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                    versions=versions(), parts=[asdict(p) for p in parts])
        body = json.loads(json.dumps(body, default=str))
        body["checksum"] = _digest_of(body)
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        self._check_parts(run_id, parts)
        if self.location.exists(f"runs/{run_id}/manifest.json"):  # no file changes under a checksum
            self._drop_unlisted(run_id, parts)
            raise StoreError(
                f"Run {run_id} in {self.location.url!r} was committed meanwhile by another process: a resume "
                "of it ran at the same time as this one (a scheduled job overlapping the one before?). Its "
                "commit stands; this one wrote its parts again, removed those the commit does not list, and "
                "changed nothing else. Let one job train a store at a time.")
        key = signing_key()
        again = (f"Nothing was committed; make room (or make the store writable) and run again with "
                 f"resume={run_id!r} (--resume {run_id}): the units already done are kept.")
        if key is not None:
            self.write(f"runs/{run_id}/manifest.sig", _sign(key, data).encode(), again)
        self.write(f"runs/{run_id}/manifest.json", data, again)
        if latest:
            before = self._latest_unless_damaged()
            self.write("LATEST", run_id.encode(),
                       f"Run {run_id} is committed, but LATEST still names {before or 'no run'}: once the store "
                       f"is writable, train --resume {run_id} (resume= from Python) moves it without training "
                       f"again; meanwhile use the run by its id (--run {run_id}).")
        if self.location.exists(f"runs/{run_id}/pending.json"):
            self.location.rm(f"runs/{run_id}/pending.json")

    def _drop_unlisted(self, run_id: str, parts: list[PartInfo]) -> None:
        """Remove the files of ``parts`` that the committed manifest of ``run_id`` does not list:
        a resume that overlapped the one that committed wrote them (under its own attempt's names),
        and nothing would ever read or remove them.  Best effort: the refusal is what matters."""
        import contextlib

        with contextlib.suppress(Exception):
            listed = {p["path"] for p in self.manifest(run_id)["parts"]}
            for p in parts:
                if p.path not in listed and self.location.exists(p.path):
                    self.location.rm(p.path)

    def _check_parts(self, run_id: str, parts: list[PartInfo]) -> None:
        """Refuse to commit ``run_id`` unless every part it lists is in the store, whole: ``gc``
        with ``pending`` while the run was writing (it looks interrupted) removes them, and the
        manifest would make LATEST a run whose models cannot be read."""
        from ._io import storage_errors

        with storage_errors(StoreError, lambda err: f"Cannot list the parts of run {run_id} in the store "
                            f"{self.location.url!r} ({type(err).__name__}: {err}). Nothing was committed; once "
                            f"the store can be reached, run again with resume={run_id!r} (--resume {run_id})."):
            have = self.location.sizes(f"runs/{run_id}/parts")
        gone = [p.path for p in parts if have.get(p.path) != p.bytes]
        if gone:
            raise StoreError(
                f"{len(gone)} of the {len(parts)} part files of run {run_id} are missing from {self.location.url!r} "
                f"(e.g. {gone[0]!r}): they were removed while the run was writing (`models gc --pending` removes "
                "the runs that look interrupted, this one too). Nothing was committed; train again.")

    def _orphans(self, known: set[str]) -> list[str]:
        """Folders under ``runs/`` with neither a manifest nor a pending.json, oldest first.
        Files there (``.DS_Store``, a README) are no runs: they are left alone."""
        try:
            entries = self.location.fs.ls(self.location.path("runs"), detail=True)
        except FileNotFoundError:
            return []
        found = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
        marked = {rid for ids in self._runs_holding("manifest.json", "pending.json").values() for rid in ids}
        return sorted(found - marked - known)

    def write(self, rel: str, data: bytes, then: str = "") -> None:
        """Write ``data`` at ``rel`` (atomically); a storage error (a full disk, a read-only
        folder, denied access) is a :class:`StoreError` naming the file, followed by ``then``."""
        from ._io import storage_errors

        with storage_errors(StoreError, lambda err: f"Cannot write {rel!r} in the store {self.location.url!r} "
                                                    f"({type(err).__name__}: {err}). {then}".rstrip()):
            self.location.write_bytes(rel, data)

    @_denied_is_a_store_error
    def gc(self, *, keep: int = 3, pending: bool = False, dry_run: bool = False) -> list[str]:
        """Remove all but the newest ``keep`` committed runs (never ``LATEST``, nor the base run of
        an interrupted retrain that is kept).

        With ``pending=True`` also remove interrupted runs (only when no job is
        still writing them!), and run folders that are neither committed nor
        pending (left by an interrupted gc, for one).  Returns the ids removed
        (or that would be).
        """
        if keep < 1:
            raise StoreError(f"keep must be at least 1; got {keep}.")
        runs, latest = self.runs(), self.latest()
        # nor the run an interrupted retrain started from, while it is kept: its resume reads it
        bases = set() if pending else {p.get("base_run") for p in self.pending()}
        drop = [r for r in runs[:-keep] if r != latest and r not in bases]
        if pending:
            drop += [p["run_id"] for p in self.pending()]
            # and folders that are neither committed nor pending: a gc stopped between a run's
            # manifest and its files, a run whose pending.json could not be written (a full
            # disk), parts written after a gc removed their run: invisible, they would stay
            drop += self._orphans(set(runs) | set(drop))
        if not dry_run:
            for rid in drop:
                # the manifest goes first, so a half-removed run is never visible
                if self.location.exists(f"runs/{rid}/manifest.json"):
                    self.location.rm(f"runs/{rid}/manifest.json")
                self.location.rm(f"runs/{rid}", recursive=True)
        return drop


def unpickle_model(blob: bytes, run_id: str):
    """A pickled user model; StoreError naming the class (or function) it needs that this
    process cannot import (its module is not installed here, or has no such name)."""
    import cloudpickle

    try:
        return cloudpickle.loads(blob)
    except (ModuleNotFoundError, AttributeError) as err:
        cls = _unimportable_global(blob, err)
        if cls is None:
            raise
        raise StoreError(f"The models of run {run_id!r} need {cls}, which this process cannot "
                         f"import ({type(err).__name__}: {err}): make that module importable here "
                         "(install it or put it on PYTHONPATH).") from err


def import_problem(paths) -> tuple[str, str] | None:
    """The first of ``paths`` (``module:Qual.Name``) that this process cannot import, with why
    (``Type: message``); None when it imports them all: the check that the processes about to
    load a run's pickled models can."""
    import importlib

    for path in paths:
        module, _, qualname = path.partition(":")
        try:
            obj = importlib.import_module(module)
            for name in qualname.split(".") if qualname else ():
                obj = getattr(obj, name)
        except Exception as err:  # noqa: BLE001 - named to the user, who fixes the install
            return path, f"{type(err).__name__}: {err}"
    return None


def import_name(path: str) -> str:
    """``module.Qual.Name`` (or ``module``) of a ``module:Qual.Name`` (``module:``) of
    :func:`model_imports`, as a user writes it."""
    module, _, name = path.partition(":")
    return f"{module}.{name}" if name else module


def model_imports(blob: bytes, ops: int | None = None) -> list[str]:
    """What loading the pickled model ``blob`` imports by name, as ``module:Qual.Name`` (or
    ``module:`` for a module cloudpickle imports whole, as a function's ``sm`` of ``import
    statsmodels.api as sm``), without loading it; the standard library and ``__main__`` left
    out.  ``ops``: read at most that many pickle opcodes (a model of millions of objects)."""
    import sys

    out = []
    for module, name in pickle_globals(blob, ops):
        root = module.partition(".")[0]
        if root != "__main__" and root not in sys.stdlib_module_names:
            out.append(f"{module}:{name}")
    return list(dict.fromkeys(out))


def pickle_globals(blob: bytes, ops: int | None = None) -> list[tuple]:
    """The (module, name) pairs that the pickle ``blob`` imports by name, in order (those read
    before a part it cannot parse, if any, or before its first ``ops`` opcodes end), and
    (module, "") for a module that cloudpickle imports whole (``subimport("statsmodels.api")``);
    without loading it."""
    import contextlib
    import itertools
    import pickletools

    refs: list[tuple] = []
    memo: dict = {}
    pushed: list = []  # what each op (but the memo ops) left on top of the stack: a name, a global, or None
    subimport = False  # the last global was cloudpickle's subimport: its argument comes next
    with contextlib.suppress(Exception):  # a pickle we cannot read through: the names found so far
        for op, arg, _ in itertools.islice(pickletools.genops(blob), ops):
            if op.name in ("FRAME", "PROTO"):  # no stack effect (a frame may fall between a global's two names)
                continue
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
                continue
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
                continue
            top = None
            if op.name in ("GET", "BINGET", "LONG_BINGET"):
                top = memo.get(arg)
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                top = arg
            elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
                refs.append((pushed[-2], pushed[-1]))
                top = ("global", *refs[-1])  # memoized, and fetched again by GET for a second use
            elif op.name == "GLOBAL":
                refs.append(tuple(arg.split(" ", 1)))
                top = ("global", *refs[-1])
            if subimport and isinstance(top, str):  # the argument of cloudpickle's subimport: a module
                refs.append((top, ""))
            subimport = (isinstance(top, tuple) and len(top) == 3 and top[2] == "subimport"
                         and str(top[1]).startswith("cloudpickle"))
            pushed.append(top)
    return [r for r in refs if len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], str)]


def _unimportable_global(blob: bytes, err: BaseException) -> str | None:
    """``module.Name`` of the first class (or function) that the pickle ``blob`` refers to and
    this process cannot import; None when there is none (``err`` came from the model's own code)."""
    missing = err.name if isinstance(err, ModuleNotFoundError) else None
    for module, name in pickle_globals(blob):
        what = import_name(f"{module}:{name}")
        if missing:
            if module == missing or module.startswith(missing + "."):
                return what
        elif import_problem([f"{module}:{name}"]):
            return what
    return None


SIGNING_ENV = "MODELFACTORY_SIGNING_KEY"


def signing_key() -> bytes | None:
    """The HMAC key for manifests, from ``MODELFACTORY_SIGNING_KEY`` (None when unset)."""
    import os

    value = os.environ.get(SIGNING_ENV)
    return value.encode() if value else None


def _sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _digest_of(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_key(key: Any, *, error: type[Exception] = StoreError) -> dict[str, str]:
    """A group key as a dict of strings, from a dict or from ``"app=a,site=b"``.

    A comma or backslash inside a value is written ``\\,`` or ``\\\\``, a space that
    starts or ends a value ``\\ `` (the form :func:`modelfactory.plot.format_key` writes):
    unescaped spaces around names and values are dropped.  Values stay text: :meth:`ModelStore.load`
    converts them to the type of their key column.

    >>> parse_key("app=checkout, site=eu-west-1")
    {'app': 'checkout', 'site': 'eu-west-1'}
    >>> parse_key(r"label=a\\,b\\\\,c=d")
    {'label': 'a,b\\\\', 'c': 'd'}
    >>> parse_key(r"app=\\ spaced\\ , site= s0 ")
    {'app': ' spaced ', 'site': 's0'}
    """
    import re
    from collections.abc import Mapping

    def _unescape(value: str) -> str:
        """A key value as written in a key string: unescaped whitespace at either end dropped, then
        each ``\\x`` read as ``x`` (so ``\\ `` keeps a leading or trailing space)."""
        chars: list[tuple[str, bool]] = []  # (character, escaped)
        i = 0
        while i < len(value):
            if value[i] == "\\" and i + 1 < len(value):
                chars.append((value[i + 1], True))
                i += 2
            else:
                chars.append((value[i], False))
                i += 1
        lo, hi = 0, len(chars)
        while lo < hi and not chars[lo][1] and chars[lo][0].isspace():
            lo += 1
        while hi > lo and not chars[hi - 1][1] and chars[hi - 1][0].isspace():
            hi -= 1
        return "".join(c for c, _ in chars[lo:hi])

    if isinstance(key, Mapping):
        out = {str(k): str(v) for k, v in key.items()}
    elif isinstance(key, str):
        out = {}
        # NAME=VALUE items split at the commas that are not escaped (``\\`` is an escaped backslash)
        for item in re.findall(r"(?:[^,\\]|\\.|\\$)+", key, flags=re.DOTALL):
            if not item.strip():
                continue
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise error(f"A key looks like 'app=checkout,site=eu-1' (NAME=VALUE pairs joined by "
                            f"commas; a comma inside a value is written \\,); got {key!r}.")
            if name.strip() in out:  # the last one was taken: most likely a typo for another name
                raise error(f"The key {key!r} names {name.strip()!r} twice; name each column once.")
            out[name.strip()] = _unescape(value)
    else:
        raise error(f"key must be a dict or a string like 'app=a,site=b'; got {type(key).__name__}.")
    if not out:
        raise error("The key is empty: name the group, e.g. key='app=checkout,site=eu-1'.")
    return out


def key_values(key: Any, by: list[str], where: str) -> tuple:
    """The values of a group key (a dict, a tuple, or one value when ``by`` has one column), in
    the order of ``by``; refused unless it gives exactly one value for each ``by`` column."""
    need = (f"The key needs a value for each of the `by` columns of {where} "
            f"({', '.join(by)}), e.g. {dict.fromkeys(by, '...')} (--key {','.join(k + '=...' for k in by)})")
    if isinstance(key, dict):
        missing = [k for k in by if k not in key]
        unknown = [k for k in key if k not in by]
        if missing or unknown:
            problems = ([f"missing {missing}"] if missing else []) + [f"{k!r} is not a `by` column" for k in unknown]
            raise StoreError(f"{need}; {'; '.join(problems)}.")
        return tuple(key[k] for k in by)
    want = key if isinstance(key, tuple) else (key,)
    if len(want) != len(by):
        raise StoreError(f"{need}; got {len(want)} value(s): {key!r}.")
    return want


def typed_key_value(name: str, value: Any, type_: pa.DataType, where: str) -> pa.Scalar:
    """``value`` as a scalar of its key column's type: ``"7"`` for an int64 key, ``7`` for a
    string key (a Hive folder), ``"2026-01-01 00:00:00+00:00"`` for a timestamp key."""
    if isinstance(value, np.datetime64) and np.datetime_data(value.dtype)[0] not in ("s", "ms", "us", "ns"):
        value = value.astype("datetime64[s]")  # minutes, hours, days...: exact in seconds, which Arrow takes
    try:
        return pa.scalar(value, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        pass
    try:
        return pa.scalar(value).cast(type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
            OverflowError) as err:
        raise StoreError(f"The key value {value!r} for {name!r} does not convert to {type_}, the type of "
                         f"{name!r} in {where} ({err}). Give a value of that type.") from err
