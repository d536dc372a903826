"""What a job returns: :class:`Run`, with its summary, its group table and its rows."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from ._io import Location, PartInfo
from .exceptions import ModelFactoryError
from .kernel import OUTPUT_CLAIM, UnitResult, claimed_by
from .store import ModelStore

__all__ = ["Run", "check_output", "table_run"]


@dataclass
class Run:
    """The result of a job: ``summary`` (counts by status, wall time) and ``groups``.

    For :func:`apply` and :func:`map_keys`, :meth:`to_pandas` / :meth:`to_arrow`
    give the rows the function returned.
    """

    id: str
    kind: str
    summary: dict[str, Any]
    store: ModelStore | None = None
    _groups: pa.Table | None = None
    _result: Any = None
    _out: Location | None = None
    errors: list = field(default_factory=list)
    #: the columns of the rows an ``out=`` job writes, for :meth:`to_arrow` when it wrote none
    _empty: pa.Schema | None = None

    @property
    def out(self) -> str | None:
        """The folder (or URL) a score, apply or map_keys job wrote its rows to (``out=``); None for a
        train run (its models are in :attr:`store`) and for a job that returned its rows."""
        return self._out.url if self._out is not None else None

    @property
    def groups(self) -> pd.DataFrame:
        """One row per group: keys, status, error, rows, seconds."""
        if self._groups is not None:
            return self._groups.to_pandas()
        if self.store is not None:
            return self.store.groups(self.id)
        import pyarrow.dataset as ds

        return ds.dataset(self._out.path("_groups"), filesystem=self._out.fs,
                          format="parquet").to_table().to_pandas()

    def to_arrow(self) -> pa.Table:
        """The rows the job produced, as a pyarrow Table.

        For :func:`apply` and :func:`map_keys` with a ``schema``, the rows the function
        returned; for a job with ``out=`` (such as :func:`score`), the rows written there
        (key columns from folder names are strings).  A run without rows, such as a
        :func:`train` run, raises :class:`ModelFactoryError`.

        >>> import pandas as pd
        >>> from modelfactory import map_keys
        >>> run = map_keys(["a", "bb"], func=lambda k: pd.DataFrame({"key": [k], "n": [len(k)]}),
        ...                schema="key string, n bigint", cluster="inline")
        >>> run.to_arrow().column_names
        ['key', 'n']
        """
        if isinstance(self._result, pa.Table):
            return self._result
        if self._out is not None:
            import pyarrow.dataset as ds

            from .dataset import arrow_fs, data_files, filesystem

            # scored rows are written in Hive folders like their input (app=a/part-….parquet): the
            # folder names are key columns, and (like the input's) they are read back as strings;
            # the files the input's rule reads (a "_tenant=acme/" key folder is data; "_groups/",
            # "_manifest.json" and hidden temporary files are not): pyarrow's ignore_prefixes=["_"]
            # dropped the rows under "_tenant=…" folders, and to_pandas() was empty with no word
            fs, root = filesystem(self._out.url, dict(self._out.storage_options))
            pfs, base = arrow_fs(fs), root.rstrip("/")
            try:
                files = [i.path for i in data_files(pfs, base) if i.size]
            except FileNotFoundError:
                files = []
            if not files and self._empty is not None:  # no group scored: no rows, with their columns
                return self._empty.empty_table()
            # the folder keys' names from the paths, then read as text: inferred, "site=007" was the
            # integer 7 and came back as "7", a key the group table (and the model) call "007"
            opts = ds.FileSystemFactoryOptions(partition_base_dir=base)
            opts.partitioning_factory = ds.HivePartitioning.discover(infer_dictionary=False)
            names = ds.FileSystemDatasetFactory(pfs, files, ds.ParquetFileFormat(), opts).inspect(fragments=0).names
            strings = ds.partitioning(pa.schema([(n, pa.string()) for n in names]), flavor="hive") if names else None
            return ds.dataset(files, filesystem=pfs, format="parquet", partition_base_dir=base,
                              partitioning=strings).to_table()
        raise ModelFactoryError(self._no_rows())

    def _no_rows(self) -> str:
        """Why this run has no rows to return, and where what it made is."""
        if self.kind == "train":
            # (run= named: the store's load() reads its LATEST, another run's once the store has a newer one)
            return (f"A train run has no rows to return: it made models, committed to its store. The group "
                    f"table is run.groups; one model is run.store.load(key, run={self.id!r}); all of them, "
                    f"run.store.table({self.id!r}).")
        if isinstance(self._result, dict):
            return (f"This {self.kind} run has no rows (no schema was given): run.results maps each ok key "
                    "to what the function returned; pass schema= for rows.")
        return f"This {self.kind} run has no tabular result (no schema was given)."

    def to_pandas(self) -> pd.DataFrame:
        """The rows of :meth:`to_arrow`, as a pandas DataFrame.

        >>> import pandas as pd
        >>> from modelfactory import map_keys
        >>> run = map_keys(["a", "bb"], func=lambda k: pd.DataFrame({"key": [k], "n": [len(k)]}),
        ...                schema="key string, n bigint", cluster="inline")
        >>> run.to_pandas()
          key  n
        0   a  1
        1  bb  2
        """
        return self.to_arrow().to_pandas()

    @property
    def results(self) -> dict:
        """For :func:`map_keys` without a schema: ``{key: return value}`` of the ok keys."""
        if not isinstance(self._result, dict):
            raise ModelFactoryError("results is only for map_keys without a schema"
                                    + ("; use to_pandas()." if self.kind != "train" else ". " + self._no_rows()))
        return self._result

    def commonest_problem(self) -> str:
        """The commonest status and error of the groups that are not ok, as
        ``"most often, 12 skipped: <reason>"`` (empty when every group is ok).  From the summary's
        ``problems`` (counted by the units) when they are complete, else from the group table (a
        run whose units had too many kinds of problem to report, or committed before summaries had
        them: the table's status and error, read into this process)."""
        if self.summary.get("problems_complete"):
            top = [(p["status"], p["error"], p["groups"]) for p in self.summary["problems"]]
        else:
            from .kernel import _problems

            top = [(st, err, n) for (st, err), n in _problems(self._status_and_error())[0].items()]
        return f"most often, {top[0][2]:,} {top[0][0]}: {top[0][1]}" if top else ""

    def _status_and_error(self) -> pa.Table:
        """The status and error columns of the group table (Arrow: no pandas frame of it all)."""
        cols = ["status", "error"]
        if self._groups is not None:
            return self._groups.select(cols)
        if self.store is not None:
            return self.store.table(self.id, columns=cols)
        import pyarrow.dataset as ds

        return ds.dataset(self._out.path("_groups"), filesystem=self._out.fs, format="parquet").to_table(columns=cols)

    def __repr__(self) -> str:
        c = self.summary["counts"]
        n = self.summary["groups"]
        return (f"<Run {self.id} {self.kind}: {n:,} group{'' if n == 1 else 's'} "
                f"(ok {c['ok']:,}, failed {c['failed']:,}, skipped {c['skipped']:,}) "
                f"in {self.summary['wall_seconds']:.1f}s>")




def table_run(run_id: str, kind: str, summary: dict, results: list[UnitResult], sink: Location | None,
              out_schema: pa.Schema | None, input: dict | None = None, written: pa.Schema | None = None) -> Run:
    """The :class:`Run` of an apply, map_keys or score job: its manifest written when it has a sink
    (with ``input``, what the job read: the data's url and fingerprint, and its filter).  ``written``:
    the columns of the rows a job writes (a score's), when they are not ``out_schema``."""
    errors = [e for r in results for e in r.errors]
    if sink is not None:
        check_output(sink, run_id, results)
        parts = [p.__dict__ for r in results for p in r.parts]
        with output_errors(sink, run_id, "_manifest.json"):
            sink.write_bytes("_manifest.json", json.dumps(
                {"run_id": run_id, "kind": kind, "summary": summary, "schema": None if out_schema is None else str(out_schema),
                 **({"input": input} if input is not None else {}), "parts": parts}, indent=1, default=str).encode())
            # a job that emptied the folder between the check and this write: the manifest would
            # stand over that job's files; it goes again (_release_a_contested_folder)
            check_output_claim(sink, run_id)
        return Run(run_id, kind, summary, _out=sink, errors=errors, _empty=written or out_schema)
    groups = pa.concat_tables([r.group_table for r in results]) if results else None
    if out_schema is not None:
        result = pa.concat_tables([r.table for r in results]) if results else out_schema.empty_table()
    else:
        result = {}
        for r in results:
            keys = r.group_table.select(list(r.group_table.column_names[:-4])).to_pylist()
            st = r.group_table["status"].to_pylist()
            for k, s, v in zip(keys, st, r.table):
                if s == "ok":
                    vals = tuple(k.values())
                    result[vals[0] if len(vals) == 1 else vals] = v
    return Run(run_id, kind, summary, _groups=groups, _result=result, errors=errors)



def output_errors(sink: Location, run_id: str, name: str | None = None) -> contextlib.AbstractContextManager[None]:
    """A storage error (a full disk, a read-only folder, an object store gone) while a job
    commits its ``out=`` folder as a :class:`StoreError` naming the folder (and ``name``, the
    file), instead of an internal error.  FileNotFoundError passes: the callers handle it."""
    from ._io import error_text, storage_errors
    from .exceptions import StoreError

    what = f"write {name!r} in" if name else "read"
    return storage_errors(
        StoreError, lambda err: f"Cannot {what} the output folder {sink.url!r} ({error_text(err)}). Run "
                                f"{run_id} was not committed (no _manifest.json): make room (or make the folder "
                                "writable, or reach the object store), then run the job again with overwrite=True "
                                "(--overwrite).",
        passthrough=(ModelFactoryError, FileNotFoundError))


#: Files a job writes under its ``out=`` folder besides its parts.
_OUTPUT_EXTRAS = frozenset({"_manifest.json", "_anomalies.json", OUTPUT_CLAIM})


def claim_output(sink: Location, run_id: str) -> None:
    """Mark ``sink`` as the folder ``run_id`` writes to (once emptied, before any unit runs)."""
    with output_errors(sink, run_id, OUTPUT_CLAIM):
        sink.write_bytes(OUTPUT_CLAIM, run_id.encode())


def _release_a_contested_folder(sink: Location, run_id: str, claimant: str | None) -> None:
    """Another job emptied ``sink`` while ``run_id`` wrote to it (the folder names
    ``claimant``, or nobody): what ``run_id`` wrote since may have replaced or joined that
    job's files, which it cannot tell apart by name (the same input gives the same names).
    So neither may commit the folder: the other job's claim goes (it then refuses in turn), and
    any ``_manifest.json``, the other's if it committed meanwhile or this job's own if the folder
    was emptied just as it committed (the files are not all of either job's).  Readers then
    refuse the folder as unfinished until a job writes it again."""
    for name in ([OUTPUT_CLAIM] if claimant is not None else []) + ["_manifest.json"]:
        try:
            sink.rm(name)
        except FileNotFoundError:
            pass


def check_output_claim(sink: Location, run_id: str) -> None:
    """Refuse (and leave the folder uncommitted) unless ``sink`` is still claimed by ``run_id``:
    another job emptied it since this one did, so files of the same name may be that job's now,
    and this job's later files may have replaced that job's."""
    from .exceptions import StoreError

    sink.fs.invalidate_cache()
    claimant = claimed_by(sink)
    if claimant != run_id:
        _release_a_contested_folder(sink, run_id, claimant)
        who = f"run {claimant}" if claimant else "another job"
        raise StoreError(f"The output folder {sink.url!r} changed while run {run_id} wrote to it: {who} emptied "
                         "it meanwhile and wrote to it (with overwrite), so its files are not all this run's. "
                         f"Run {run_id} was not committed (no _manifest.json), nor is the folder left committed "
                         "by the other: give each job a folder of its own, and run it again.")


def _rehashed(sink: Location, run_id: str, part: PartInfo) -> PartInfo:
    """``part`` with the size and sha256 of the file now under its name."""
    import dataclasses
    import hashlib

    with output_errors(sink, run_id, part.path):
        data = sink.read_bytes(part.path)
    return dataclasses.replace(part, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def written_files(sink: Location) -> dict[str, int]:
    """The files of jobs' rows in an ``out=`` folder, with their sizes: not the job's own records
    (``_manifest.json``, ``_anomalies.json``, its claim), nor hidden files (a write's temporary
    file), nor an object store's folder markers (``scores/`` from the S3 console)."""
    remote = not sink.is_local
    return {rel: size for rel, size in sink.sizes().items()
            if rel and rel not in _OUTPUT_EXTRAS and not any(seg.startswith(".") for seg in rel.split("/"))
            and not (remote and size == 0)}


def check_output(sink: Location, run_id: str, results: list[UnitResult]) -> None:
    """Refuse to commit an ``out=`` folder that does not hold exactly the files this job wrote.

    Another job writing to the same folder at the same time (a second ``score --overwrite``
    of a scheduled job that started before this one ended) deletes this job's files, or adds
    its own: readers of the folder would get part of this job's rows, or two jobs' rows mixed,
    under a ``_manifest.json`` that claims all of this job's.  Hidden files (a write's
    temporary file) are not read, and not counted.
    """
    from .exceptions import StoreError

    with output_errors(sink, run_id):
        check_output_claim(sink, run_id)
        have = written_files(sink)
    # names only: a unit recomputed after its result was taken (a worker presumed dead that was
    # still running it) rewrites its files under the same names, with other seconds in them; a
    # file whose size is not the one its result says is checksummed again for _manifest.json
    ours = {p.path for r in results for p in r.parts}
    for r in results:
        r.parts = [_rehashed(sink, run_id, p) if p.path in have and have[p.path] != p.bytes else p for p in r.parts]
    gone = sorted(ours - set(have))
    other = sorted(set(have) - set(ours))
    if gone or other:
        what = "; ".join(x for x in (
            f"{len(gone)} of the {len(ours)} files it wrote are gone (e.g. {gone[0]!r})" if gone else "",
            f"{len(other)} files it did not write appeared (e.g. {other[0]!r})" if other else "") if x)
        raise StoreError(f"The output folder {sink.url!r} changed while run {run_id} wrote to it: {what}. Another "
                         "job writing to the same folder at the same time (with overwrite) does this. Run "
                         f"{run_id} was not committed (no _manifest.json): give each job a folder of its own, "
                         "and run it again.")
