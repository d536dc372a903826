"""Discover a Parquet dataset and read one work unit of it.

The client calls :func:`discover` once: it lists the files (local or any fsspec
URL such as ``s3://``), the Hive partition keys (``app=…/site=…/``), the schema,
and each file's row count from its Parquet footer.  It never reads data.

Workers call :func:`read_files` with the picklable :class:`Source` to read the
files of their own work unit, with only the needed columns and any filter
pushed down to Parquet.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import operator
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from ._schema import plain_type
from .exceptions import DatasetError, SchemaError

__all__ = ["Source", "FileInfo", "DatasetInfo", "discover", "read_files", "filesystem"]

log = logging.getLogger(__name__)

def filesystem(url: str, storage_options: dict | None = None, *, error: type[Exception] = DatasetError):
    """Return ``(filesystem, path)`` for a local path or an fsspec URL.

    Local paths use pyarrow's native filesystem (fastest); anything else goes
    through fsspec (``s3://`` through s3fs), which pyarrow wraps as needed.  An
    unknown protocol, or one whose package is not installed, raises ``error``.
    """
    from ._io import url_to_fs

    fs, path = url_to_fs(url, storage_options, error=error)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or fs.__class__.__name__ == "LocalFileSystem":
        return pafs.LocalFileSystem(), path
    return fs, path


def column_types(url: str, storage_options: dict | None = None) -> dict[str, pa.DataType]:
    """The column types of the dataset at ``url`` as its first file and its folders give them
    (Hive keys as strings), without reading every footer: enough to type the literals of a
    filter written as text (``--where "ts >= '2026-01-12'"``).  Empty when they cannot be read
    (``discover`` then says why)."""
    import os

    from ._io import normal_url

    try:
        fs, path = filesystem(normal_url(os.fspath(url)), storage_options)
        if isinstance(fs, pafs.FileSystem):
            is_file = fs.get_file_info(path).type == pafs.FileType.File
        else:
            is_file = fs.isfile(path) and not fs.isdir(path)
        # the files discover() reads (pyarrow's own discovery skips "_tenant=acme/" folders: data
        # held only in such folders gave no types, and a time literal was compared as text)
        listing, keys = _listing(fs, path, is_file)
        for frag in itertools.islice(listing.get_fragments(), 5):
            try:
                first = frag.physical_schema
                break
            except (pa.ArrowInvalid, OSError):  # an empty object (a folder marker): the next
                continue
        else:
            return {}
    except Exception:  # noqa: BLE001 - only a convenience: discover() reports the real problem
        return {}
    return {**{f.name: _plain(f.type) for f in first}, **{k: pa.string() for k in keys}}


@dataclass(frozen=True)
class Source:
    """Everything a worker needs to read part of the dataset.  Small and picklable."""

    url: str
    base: str
    schema: pa.Schema
    partition_keys: tuple[str, ...]
    storage_options: tuple = ()
    views: bool = False  # some file keeps a column as a view type (string_view: Polars)

    def filesystem(self):
        return filesystem(self.url, dict(self.storage_options))[0]

    def partitioning(self, dictionaries: dict[str, pa.Array] | None = None):
        """Hive partitioning with string keys; the keys in ``dictionaries`` dictionary-encoded."""
        if not self.partition_keys:
            return None
        dictionaries = dictionaries or {}
        fields = [pa.field(k, ENCODED, metadata=DECODE) if k in dictionaries else pa.field(k, pa.string())
                  for k in self.partition_keys]
        return ds.partitioning(pa.schema(fields), flavor="hive", dictionaries=dictionaries or None)


@dataclass(frozen=True)
class FileInfo:
    path: str
    rows: int
    size: int  # bytes
    partition: tuple  # values of Source.partition_keys, None for a null partition
    #: what marks this version of the file: its modification time (local), its ETag (an object
    #: store); "" where the filesystem gives neither
    stamp: str = ""
    #: the rows of each row group, when the file has more than one (a shuffle reads a large file in
    #: shares of them); empty otherwise
    row_groups: tuple[int, ...] = ()


@dataclass
class DatasetInfo:
    """The result of discovery: a :class:`Source` plus the per-file facts the planner needs."""

    source: Source
    files: list[FileInfo]
    null_counts: dict[str, int] = field(default_factory=dict)
    #: columns whose types differ between files in a way that does not widen safely:
    #: name -> (a type, an example file of it, the type it conflicts with, an example file of that)
    conflicts: dict[str, tuple[pa.DataType, str, pa.DataType, str]] = field(default_factory=dict)
    #: columns missing from some of the files (they read as null there): name -> (files without it, one of them)
    missing: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: columns whose types differ between files and were widened: name -> {each type: its first file}
    widened: dict[str, dict[pa.DataType, str]] = field(default_factory=dict)

    @property
    def schema(self) -> pa.Schema:
        return self.source.schema

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def known(self) -> dict[str, tuple[int, str]]:
        """Each file's (size, version mark), by path: what a unit carries to open an object store's
        files with no request of their own (:attr:`modelfactory.plan.WorkUnit.known`)."""
        return {f.path: (f.size, f.stamp) for f in self.files}

    def fingerprint(self) -> str:
        """A digest of the file list, sizes, row counts and versions (modification times or
        ETags): it changes when the input does, a file rewritten in place with rows of the same
        shape too (a nightly export), so a resume never keeps what was fitted on the old rows."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.size}\0{f.rows}\0{f.stamp}\n".encode())
        return h.hexdigest()


def discover(url: str, *, storage_options: dict | None = None,
             null_check: tuple[str, ...] = (), filter: ds.Expression | None = None,
             allow_empty: bool = False) -> DatasetInfo:
    """Discover the Parquet dataset at ``url``.

    Partition keys are read as strings (``app=007`` stays ``"007"``).  For the
    columns in ``null_check`` the Parquet statistics are used to count nulls,
    so a null group key is found without reading data (a file written without
    statistics has just those key columns read).  A ``filter`` on partition
    keys prunes whole files here (other filters apply when reading).

    The schema is that of all the files, from their footers: where a column's
    type differs between files but widens safely (null to any type, a narrower
    integer to a wider one, integers to float64, timestamp units, string to
    large_string, dictionary to its values), the wider type is used and every
    file is cast to it when read.  A column whose types conflict (int64 in one
    file, string in another) is recorded in :attr:`DatasetInfo.conflicts`; a
    column missing from some files in :attr:`DatasetInfo.missing` and reads as
    null there (as Spark's ``mergeSchema`` does).  :func:`check_columns`
    refuses either for the columns a job uses.

    A Hive partition key (``app=…/`` folders) must not also be a column inside
    the files: that is refused, whatever the values (which one would win is
    not obvious, so neither does).

    Raises
    ------
    DatasetError
        The path does not exist, holds no Parquet files, or cannot be read; or its files
        hold no rows, unless ``allow_empty`` (scoring: an empty window scores nothing).
    SchemaError
        A partition key is also a column inside the files, or ``filter`` does not
        fit the dataset's columns.
    """
    import os

    if not isinstance(url, (str, os.PathLike)):
        shown = repr(url) if len(repr(url)) <= 120 else repr(url)[:117] + "..."
        raise DatasetError(f"The data must be one path or URL (a Parquet file, or a folder of them); got "
                           f"{type(url).__name__} {shown}. To read several files, put them in one folder "
                           "and pass the folder (filter= can leave out what is not wanted).")
    from ._io import normal_url

    url = normal_url(os.fspath(url))  # absolute: the manifest must name the input wherever it is read from
    from ._io import error_text, storage_errors

    try:
        with storage_errors(DatasetError, lambda err: f"Cannot read the data at {url!r}: {error_text(err)}. Check "
                            "the path, the endpoint (storage_options, [storage_options] in --config, "
                            "AWS_ENDPOINT_URL), the credentials and the network.",
                            passthrough=(DatasetError, PermissionError)):
            return _discover(url, storage_options, null_check, filter, allow_empty)
    except PermissionError as err:
        raise DatasetError(f"Access to {url!r} was denied ({err}): check the credentials "
                           "(AWS_* environment, ~/.aws, or storage_options: [storage_options] in --config).") from err


def _stamps(fs, path: str, paths: list[str], is_file: bool) -> dict[str, tuple[int, str]]:
    """Each file's size and version mark (:attr:`FileInfo.stamp`), from one listing: the local
    filesystem's modification times, an object store's ETags (or its modification times).  A
    file the listing does not give is left out (its footer's size then stands in); a listing
    that fails is a :class:`DatasetError`."""
    try:
        if isinstance(fs, pafs.FileSystem):
            return {i.path: (i.size, str(i.mtime_ns or "")) for i in fs.get_file_info(paths)
                    if i.type == pafs.FileType.File}
        infos = {path: fs.info(path)} if is_file else fs.find(path, detail=True)
    except Exception as err:  # any storage error (botocore's are not OSErrors)
        # not left out: the input's fingerprint would change with it, and a resume miss its run
        raise DatasetError(f"Cannot list the files under {path!r} for their sizes and versions: "
                           f"{type(err).__name__}: {err}. Try again once the storage answers.") from err
    out = {}
    for p, i in infos.items():
        mark = next((i[k] for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created")
                     if i.get(k) not in (None, "")), "")
        out[p] = (int(i.get("size") or 0), str(mark))
    wanted = set(paths)
    return {p: v for p, v in out.items() if p in wanted}


def parquet_format(dictionary_columns: list[str] | None = None) -> ds.ParquetFileFormat:
    """How the input is read: INT96 timestamps (Spark's default Parquet timestamps, which hold
    microseconds) as microseconds.  Arrow reads them as nanoseconds by default, and a date past
    2262 (Spark's 9999-12-31 "never") wrapped around to 1816 without a word; INT96 columns carry
    no statistics, so discovery could not catch it as it catches INT64 nanoseconds."""
    return ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=dictionary_columns,
                                                                   coerce_int96_timestamp_unit="us"))


def _hidden(rel: str) -> bool:
    """Whether the file at ``rel`` (relative to the dataset's folder) is not data, by Spark's rule:
    a part of its path starts with ``.`` (``.part-0.crc``, ``.spark-staging-1/``), or with ``_``
    and holds no ``=`` (``_SUCCESS``, ``_temporary/``, ``_committed_…``, ``_metadata``; a
    ``_tenant=acme/`` partition folder is data), or it is still being copied (``…._COPYING_``)."""
    return rel.endswith("._COPYING_") or any(
        p.startswith(".") or (p.startswith("_") and "=" not in p) for p in rel.split("/"))


def arrow_fs(fs, known: dict[str, tuple[int, str]] | None = None) -> pafs.FileSystem:
    """``fs`` as a pyarrow filesystem (an fsspec one wrapped).  ``known``: path -> (size, ETag)
    from a listing, with which an object store's files open with no request (:class:`_KnownFiles`)."""
    if isinstance(fs, pafs.FileSystem):
        return fs
    if known and any(c.__module__.split(".")[0] == "s3fs" for c in type(fs).__mro__):
        return pafs.PyFileSystem(_KnownFiles(fs, known))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class _KnownFiles(pafs.FSSpecHandler):
    """pyarrow's handler for s3fs, opening the files a listing gave a size and an ETag for with no
    request of their own.  pyarrow's handler asks the store whether the path is a file (a HEAD),
    then s3fs asks for its size and ETag (another HEAD), before the one ranged read a small Parquet
    file needs: three requests a file, where one does.  The reads still name the ETag (as s3fs's
    own do, from its HEAD): a file rewritten since the listing raises s3fs's ``FileExpired``, where
    a size from the listing would otherwise be the wrong one (:func:`read_files` says so)."""

    def __init__(self, fs, known: dict[str, tuple[int, str]]) -> None:
        super().__init__(fs)
        self.known = known

    def open_input_file(self, path: str):
        size, etag = self.known.get(path, (0, ""))
        if not size or not etag.startswith('"'):  # S3's ETags are quoted; anything else: not known
            return super().open_input_file(path)
        f = self.fs.open(path, mode="rb", size=size)
        f.details = {"name": path, "size": size, "type": "file", "ETag": etag}
        if not getattr(self.fs, "local_expiry_check", False):  # (then s3fs compares the ETag itself)
            f.read_kw = {**f.read_kw, "IfMatch": etag}  # what s3fs's own open sets from its HEAD
        return pa.PythonFile(f, mode="r")


def data_files(pfs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    """The files under the folder ``base`` that are data, by :func:`_hidden` (Spark's rule),
    sorted by path.  pyarrow's own ``selector_ignore_prefixes=["_"]`` would also drop
    ``_tenant=acme/`` folders, and the groups in them with no word."""
    listed = pfs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted((i for i in listed if i.type == pafs.FileType.File
                   and not _hidden(i.path[len(base) + 1:] if i.path.startswith(base + "/") else i.path)),
                  key=lambda i: i.path)


def _listing(fs, path: str, is_file: bool) -> tuple[ds.FileSystemDataset, tuple[str, ...]]:
    """The files under ``path`` with their Hive partition keys (strings), in folder order.

    No file is opened: the keys come from the folder names only (``inspect(fragments=0)``),
    and the dataset is given an explicit schema of just those keys, so pyarrow does not
    infer the schema from the first file nor try to merge it with the keys' types.  Files
    that are not data (:func:`_hidden`) are left out.
    """
    if is_file:
        return ds.dataset(path, filesystem=fs, format=parquet_format(), schema=pa.schema([])), ()
    pfs, base = arrow_fs(fs), path.rstrip("/")
    files = data_files(pfs, base)
    opts = ds.FileSystemFactoryOptions(partition_base_dir=base)
    opts.partitioning_factory = ds.HivePartitioning.discover(infer_dictionary=False)
    factory = ds.FileSystemDatasetFactory(pfs, files, parquet_format(), opts)
    keys = tuple(factory.inspect(fragments=0).names)
    return factory.finish(pa.schema([pa.field(k, pa.string()) for k in keys])), keys


def _discover(url, storage_options, null_check, filter, allow_empty=False) -> DatasetInfo:
    fs, path = filesystem(url, storage_options, error=DatasetError)
    info = fs.get_file_info(path) if isinstance(fs, pafs.FileSystem) else None
    exists = info.type != pafs.FileType.NotFound if info is not None else fs.exists(path)
    if not exists:
        glob = (" Wildcards are not expanded: point at the folder that holds the files, and leave out what is "
                "not wanted with filter= (e.g. ds.field('app') == 'checkout')." if any(c in url for c in "*?[") else "")
        raise DatasetError(f"No file or folder at {url!r}. Check the path (and credentials for s3://).{glob}")
    # s3fs calls a prefix with a folder marker object (``data/``, as the S3 console's "Create
    # folder" makes) a file too: a folder is a folder, whatever else it is.
    is_file = info.type == pafs.FileType.File if info is not None else fs.isfile(path) and not fs.isdir(path)
    try:
        listing, keys = _listing(fs, path, is_file)
        fragments = list(listing.get_fragments())
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as err:
        raise DatasetError(f"Cannot open the Parquet dataset at {url!r}: {err}") from err
    if not fragments:
        raise DatasetError(
            f"No Parquet files under {url!r}. Point at a folder of .parquet files "
            "(optionally Hive-partitioned, e.g. app=…/site=…/part-0.parquet)."
        )
    part_fields = [pa.field(k, pa.string()) for k in keys]
    deferred = False  # the filter needs the columns of all the files (pruning after the footers)
    if filter is not None:
        try:  # bind it as pyarrow would: the first file's columns and the partition keys
            first = fragments[0].physical_schema
            bind = pa.schema([f for f in first if f.name not in keys] + part_fields)
            kept = {f.path for f in listing.replace_schema(bind).get_fragments(filter=filter)}
            fragments = [f for f in fragments if f.path in kept] or _none_kept(fragments, url, filter, allow_empty)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError):
            deferred = True

    check = [c for c in null_check if c not in keys]
    local = isinstance(fs, pafs.LocalFileSystem)

    schemas: dict = {}  # each distinct schema once: a file's own copy (pandas' metadata in it) cost kilobytes

    def facts(listed):
        # the footer is read into a fragment of this call's own, which goes when it returns: the
        # listing's fragments keep what they read (about 8 KB a file; 100,000 files held 1.4 GB)
        frag = listed.format.make_fragment(listed.path, filesystem=known,
                                           partition_expression=listed.partition_expression)
        try:
            md = frag.metadata
            physical = frag.physical_schema  # from the footer just read: no more I/O
        except (pa.ArrowInvalid, OSError) as err:
            if type(err).__name__ == "FileExpired":  # s3fs's: rewritten since the listing (_KnownFiles)
                raise DatasetError(f"{frag.path!r} of {url!r} was rewritten while the dataset was being listed "
                                   "(its ETag changed). Run the job again once the writer is done.") from err
            if not local and _empty_object(fs, frag.path):
                # An empty object on an object store holds no rows: a folder marker (``sub/``
                # from the S3 console or Hadoop's S3A, ``x_$folder$`` from EMR), listed as a
                # file.  (A local empty file may be one being written: that is refused.)
                log.debug("Skipping the empty object %r (a folder marker)", frag.path)
                return None
            if _is_empty_file(frag):
                # the state of a file its writer has just created: "not Parquet" sent the user after
                # a file of another format
                fix = ("It is empty (0 bytes): a file still being written, or one whose writer stopped. Wait "
                       "for its writer to finish, or remove the file.")
            elif _starts_as_parquet(frag):
                # a truncated upload, or a file still being written: "write the data as Parquet first"
                # (or "move files that are not Parquet out") sent the user after a CSV there was not
                fix = ("It begins as a Parquet file but its end (the footer) is missing: it was cut short "
                       "(an upload or copy that stopped) or is still being written. Write it again, or wait "
                       "for its writer to finish.")
            else:
                fix = ("modelfactory reads Parquet only: write the data as Parquet first (a CSV file: "
                       "pd.read_csv(...).to_parquet('data.parquet'))." if is_file else
                       "Move files that are not Parquet out of the folder (or start their names with '_' or '.').")
            raise DatasetError(f"Cannot open the Parquet dataset at {url!r}: cannot read the Parquet footer "
                               f"of {frag.path!r} ({err}). {fix}") from err
        nulls = dict.fromkeys(check, 0)
        unknown: dict[str, list[int]] = {}  # key column -> row groups without a null count
        if check:
            index = {md.schema.column(i).path: i for i in range(md.num_columns)}  # leaf columns
            for c in check:
                if c not in physical.names:  # not in this file: every row reads as null
                    nulls[c] += md.num_rows
                    continue
                for i in range(md.num_row_groups):
                    rg = md.row_group(i)
                    st = rg.column(index[c]).statistics if c in index else None  # None: nested
                    if st is not None and st.has_null_count:
                        nulls[c] += st.null_count
                    elif rg.num_rows:
                        unknown.setdefault(c, []).append(i)
        for c, groups in unknown.items():
            # Written without statistics: read just this key column of just these row groups
            # to count its nulls (a small read, and only for such files), so that a null key
            # is still refused up front instead of becoming a group.
            try:
                column = frag.subset(row_group_ids=groups).to_table(columns=[c]).column(c)
            except (pa.ArrowInvalid, OSError) as err:
                raise DatasetError(f"Cannot read the key column {c!r} of {frag.path!r} "
                                   f"to count its nulls: {err}") from err
            nulls[c] += column.null_count
        pk = ds.get_partition_keys(frag.partition_expression)
        size, stamp = stamps.get(frag.path, (getattr(md, "serialized_size", 0), ""))
        # (keyed by its bytes: schemas compare without their metadata, their fields' too)
        physical = schemas.setdefault(physical.serialize().to_pybytes(), physical)
        shares = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)) if md.num_row_groups > 1 else ()
        return (FileInfo(frag.path, md.num_rows, size, tuple(pk.get(k) for k in keys), stamp, shares), nulls,
                physical, _beyond_ns(md, physical))

    stamps = _stamps(fs, path, [f.path for f in fragments], is_file)
    known = arrow_fs(fs, stamps) if not isinstance(fs, pafs.FileSystem) else fs  # one request a footer

    results = [r for r in _map_footers(facts, fragments, local) if r is not None]
    if not results:
        raise DatasetError(f"No Parquet files under {url!r}, only empty objects (folder markers). Point at "
                           "a folder of .parquet files (optionally Hive-partitioned, e.g. app=…/site=…/part-0.parquet).")
    both, loose = {}, {}
    for r in results:
        for i, k in enumerate(keys):
            if k in r[2].names:
                folders = r[0].path.split("/")[:-1]  # a k= folder is a whole segment ("grid=eu" is not "id=")
                if r[0].partition[i] is None and not any(f.startswith(f"{k}=") for f in folders):
                    loose.setdefault(k, r[0].path)
                else:
                    both.setdefault(k, r[0].path)
    if loose and not both:
        k, p = next(iter(loose.items()))
        raise SchemaError(
            f"{p!r} is not inside any {k}=… folder, while other files under {url!r} are (its {k!r} is a column "
            f"of the file): one dataset has one layout. Move it into the {k}=<value>/ folder of its rows (and "
            f"drop its {k!r} column), or point at a folder that holds files of one layout.")
    if both:
        where = "; ".join(f"{k!r} (e.g. in {p!r})" for k, p in both.items())
        raise SchemaError(
            f"Columns {list(both)} appear both as partition folders and inside the files under {url!r}: "
            f"{where}. Drop the column from the files (the folder names already hold it) or rename it, "
            "so each value comes from one place.")
    schema, conflicts, missing, widened = _unify([(r[0].path, r[2]) for r in results], part_fields)
    if deferred:
        try:
            kept = {f.path for f in listing.replace_schema(schema).get_fragments(filter=filter)}
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
            hint = _filter_hint(str(err), filter, keys, schema.names)
            raise SchemaError(
                f"The filter {filter} does not fit the dataset at {url!r}: {str(err).splitlines()[0]}. "
                f"Columns: {', '.join(schema.names)}{hint}.") from err
        results = [r for r in results if r[0].path in kept] or _none_kept(results, url, filter, allow_empty)
        full = schema  # the filter was bound to it: keep its columns, null where no kept file has them
        schema, conflicts, missing, widened = _unify([(r[0].path, r[2]) for r in results], part_fields)
        extra = [f.with_nullable(True) for f in full if f.name not in schema.names]
        if extra:
            missing.update({f.name: (len(results), results[0][0].path) for f in extra})
            schema = pa.schema([f for f in schema if f.name not in keys] + extra + part_fields,
                               metadata=schema.metadata)
    for name, found in _unsafe_ns(results, schema).items():  # before anything runs, not mid-run
        conflicts.setdefault(name, found)
    views = any(_plain(f.type) != f.type for r in results for f in r[2])
    source = Source(url, path, schema, keys, tuple(sorted((storage_options or {}).items())), views)
    files = [r[0] for r in results]
    null_counts = {c: sum(r[1][c] for r in results) for c in check}
    for i, k in enumerate(keys):
        null_counts[k] = sum(f.rows for f in files if f.partition[i] is None)
    recount = [c for c in null_check if null_counts.get(c) and c not in conflicts]
    if filter is not None and recount:
        # The footers count the nulls of every row; the filter may leave them out (as the
        # refusal suggests): count the nulls of the rows it keeps, reading just those keys of
        # just the files that have nulls (the client reads no more than it must).
        null_cols = [c for c in recount if c not in keys]
        null_parts = [keys.index(c) for c in recount if c in keys]
        with_nulls = tuple(f.path for f, r in zip(files, results)
                           if any(r[1][c] for c in null_cols) or any(f.partition[i] is None for i in null_parts))
        # only the rows whose keys are null come back (row groups without nulls are skipped by
        # their statistics): reading every kept row's keys held them all in the client's memory,
        # gigabytes for a large dataset with a few null keys per file and --where "site is not null"
        any_null = functools.reduce(operator.or_, [ds.field(c).is_null() for c in recount])
        try:
            kept = read_files(source, with_nulls, recount, filter & any_null)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass  # keep the footers' counts: the refusal names them
        else:
            null_counts.update({c: kept.column(c).null_count for c in recount})
    info = DatasetInfo(source, files, null_counts, conflicts, missing, widened)
    if info.rows == 0 and not allow_empty:
        raise DatasetError(f"The dataset at {url!r} has {len(files)} Parquet file(s) but no rows.")
    return info


def _filter_hint(err: str, filter, keys: list[str], names: list[str]) -> str:
    """What to do about a filter that does not fit the columns: a column it names that does not
    exist, or a partition key (always text) compared with something else. Only the hint that
    fits: the partition keys' was given for a misspelt column and for a number column too."""
    import difflib

    missing = re.search(r"No match for FieldRef\.Name\((.*?)\)", err)
    if missing:
        close = difflib.get_close_matches(missing[1], names, n=1)
        return f" (there is no column {missing[1]!r}" + (f"; did you mean {close[0]!r}?)" if close else ")")
    used = [k for k in keys if re.search(rf"(?<![\w\"]){re.escape(k)}(?![\w\"])", str(filter))]
    if used and "no kernel matching" in err:
        return (f" (the partition keys {', '.join(used)} are strings: compare them with strings, "
                f"e.g. ds.field({used[0]!r}) == '7'; on the command line --where \"{used[0]} = '7'\")")
    return ""


def _none_kept(found: list, url: str, filter, allow_empty: bool) -> list:
    """What is left when ``filter`` prunes every file: nothing to train on (an error), but for
    scoring (``allow_empty``) an empty window, as when the filter keeps no row of the files it
    keeps (``--where "day = '2026-03-04'"`` before that day's folder is written): the first file
    only, for its columns; the reader's filter leaves none of its rows."""
    if not allow_empty:
        raise DatasetError(f"No files under {url!r} match filter {filter}.")
    return found[:1]


def _is_empty_file(frag) -> bool:
    """Whether the file of ``frag`` holds no byte at all."""
    try:
        return frag.filesystem.get_file_info(frag.path).size == 0
    except (OSError, ValueError, pa.ArrowException):
        return False


def _starts_as_parquet(frag) -> bool:
    """Whether the file of ``frag`` begins with Parquet's magic bytes (a footer that cannot be read
    is then a file cut short, not a file of another format)."""
    try:
        with frag.filesystem.open_input_file(frag.path) as f:
            return f.read(4) == b"PAR1"
    except (OSError, ValueError, pa.ArrowException):
        return False


def _empty_object(fs, path: str) -> bool:
    """Whether ``path`` on the fsspec filesystem ``fs`` is an object of 0 bytes."""
    try:
        return fs.size(path) == 0
    except (OSError, ValueError):
        return False


#: Seconds a local footer may take, on average, to be read in the caller's thread (see _map_footers).
_FAST_FOOTER = 0.002


def _map_footers(facts, fragments: list, local: bool) -> list:
    """``facts`` of every fragment, in order: remote ones by 16 threads (each footer is a
    request), local ones in this thread while they come fast (the page cache, a local disk),
    where threads cost more than they save (the work is Python holding the GIL: 100 files took
    27 ms in one thread, 42 ms in 16), and by the threads once they come slowly (a network mount)."""
    out, rest = [], iter(fragments)
    if local:
        start = time.perf_counter()
        for frag in rest:
            out.append(facts(frag))
            if len(out) >= 4 and time.perf_counter() - start > _FAST_FOOTER * len(out):
                break
    if len(out) < len(fragments):
        with ThreadPoolExecutor(16) as pool:
            out.extend(pool.map(facts, rest))
    return out


# What a nanosecond timestamp holds: 1677-09-21T00:12:43 to 2262-04-11T23:47:16 (UTC).
_NS_RANGE = (-(2**63) + 1, 2**63 - 1)


def _beyond_ns(md, physical: pa.Schema) -> set[str]:
    """The timestamp columns of a file, in a unit coarser than nanoseconds, whose footer
    statistics hold a value a nanosecond timestamp cannot (a 9999-12-31 "never" sentinel):
    read as nanoseconds, as when other files have that unit, the cast would fail mid-run."""
    coarse = {f.name: f.type for f in physical if pa.types.is_timestamp(f.type) and f.type.unit != "ns"}
    if not coarse:
        return set()
    per_ns = {"s": 10**9, "ms": 10**6, "us": 10**3}
    index = {md.schema.column(i).path: i for i in range(md.num_columns)}
    out = set()
    for name, t in coarse.items():
        if name not in index:
            continue
        raw = _raw_ns(md.schema.column(index[name]))
        for g in range(md.num_row_groups):
            st = md.row_group(g).column(index[name]).statistics
            if st is None or not st.has_min_max:
                continue
            if raw is not None:  # the stored integers, in the file's unit: no datetimes made
                lo, hi = st.min_raw * raw, st.max_raw * raw
            else:
                try:
                    lo, hi = (pa.scalar(v, t).cast(pa.int64()).as_py() * per_ns[t.unit] for v in (st.min, st.max))
                except (OverflowError, ValueError):  # beyond what Python's datetime holds (year 9999)
                    out.add(name)
                    break
            if not (_NS_RANGE[0] <= lo and hi <= _NS_RANGE[1]):
                out.add(name)
                break
    return out


_PARQUET_NS = {"milliseconds": 10**6, "microseconds": 10**3, "nanoseconds": 1}


def _raw_ns(column) -> int | None:
    """Nanoseconds per stored integer of a Parquet INT64 timestamp column (its own unit, which
    the Arrow type read from it need not say: a stored Arrow schema may restore another), or
    None for other columns (INT96)."""
    if column.physical_type != "INT64":
        return None
    unit = re.search(r'"timeUnit":"(\w+)"', column.logical_type.to_json())
    return _PARQUET_NS.get(unit.group(1)) if unit else None


def _unsafe_ns(results: list, schema: pa.Schema) -> dict[str, tuple[pa.DataType, str, pa.DataType, str]]:
    """Columns unified to nanosecond timestamps that some file's values do not fit:
    name -> (that file's type, that file, the type of a file with nanoseconds, that file)."""
    out = {}
    for r in results:
        for name in r[3]:
            if name in schema.names and pa.types.is_timestamp(schema.field(name).type) \
                    and schema.field(name).type.unit == "ns" and name not in out:
                ns_file = next((q for q in results if name in q[2].names  # its zone may be another name of UTC
                                and pa.types.is_timestamp(q[2].field(name).type)
                                and q[2].field(name).type.unit == "ns"), None)
                if ns_file is not None:
                    out[name] = (r[2].field(name).type, r[0].path, ns_file[2].field(name).type, ns_file[0].path)
    return out


def _unify(schemas: list[tuple[str, pa.Schema]], part_fields: list[pa.Field]):
    """One schema for files whose schemas differ, from their footers.

    Returns ``(schema, conflicts, missing, widened)``: each column with the widest type of its
    files (see :func:`_widen`), in order of first appearance, then the partition
    keys; the columns whose types conflict (kept with the first file's type); the
    columns some files lack; the columns widened, with each of their types' first file.
    """
    first: dict[str, pa.Field] = {}
    seen: dict[str, dict[pa.DataType, str]] = {}  # column -> type -> first file of that type
    count: dict[str, int] = {}
    for path, sch in schemas:
        for f in sch:
            f = f.with_type(_plain(f.type))
            first.setdefault(f.name, f)
            seen.setdefault(f.name, {}).setdefault(f.type, path)
            count[f.name] = count.get(f.name, 0) + 1
    fields, conflicts, missing, widened = [], {}, {}, {}
    named = [(path, set(sch.names)) for path, sch in schemas] if any(
        c < len(schemas) for c in count.values()) else []
    for name, types in seen.items():
        items = list(types.items())
        t = items[0][0]
        for t2, p2 in items[1:]:
            w = _widen(t, t2)
            if w is None:  # name a type (and its file) that t2 itself conflicts with
                t1, p1 = next(((s, p) for s, p in items if _widen(s, t2) is None), items[0])
                conflicts[name] = (t1, p1, t2, p2)
                break
            t = w
        f = first[name] if name in conflicts else first[name].with_type(t)
        if name not in conflicts and len(items) > 1:
            widened[name] = dict(items)
        if count[name] < len(schemas):
            missing[name] = (len(schemas) - count[name], next(p for p, names in named if name not in names))
            f = f.with_nullable(True)
        fields.append(f)
    return pa.schema(fields + part_fields, metadata=schemas[0][1].metadata), conflicts, missing, widened


def _plain(t: pa.DataType) -> pa.DataType:
    """``t`` with the view types read as their plain kind: string_view as string, binary_view
    as binary (Polars 1.38 writes string_view into the Arrow schema of its Parquet files).
    pyarrow's compute functions (take, filter, comparisons) have no kernels for views; the
    scanner casts each file's values to the plain type as it reads."""
    if pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_dictionary(t) and (pa.types.is_string_view(t.value_type) or pa.types.is_binary_view(t.value_type)):
        return pa.dictionary(t.index_type, _plain(t.value_type), t.ordered)
    return t


def _kind(t: pa.DataType) -> str:
    if _is_numeric(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t)):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list"
    for kind in ("timestamp", "date", "time", "duration", "boolean", "struct", "map"):
        if getattr(pa.types, f"is_{kind}")(t):
            return kind
    return str(t)


_INT_DIGITS = {8: 3, 16: 5, 32: 10, 64: 19}


def _widen(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type both ``a`` and ``b`` cast to without losing their meaning, or None.

    Safe: null to anything, integers to a wider integer or to float64, float32 to float64,
    integers into a decimal wide enough, timestamp units (same time zone; UTC under any of its
    names, "UTC", "+00:00", "Etc/UTC", is one zone), date32 to date64,
    string to large_string, a dictionary to its value type.  Everything else conflicts:
    numbers vs strings, uint64 vs signed integers (no common integer type), timestamps
    with different time zones or none, booleans vs numbers...
    """
    if a == b:
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if pa.types.is_dictionary(a) or pa.types.is_dictionary(b):  # read decoded
        return _widen(plain_type(a), plain_type(b))
    if _kind(a) != _kind(b):
        return None
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        if pa.types.is_signed_integer(a) != pa.types.is_signed_integer(b) and 64 in (
                a.bit_width if pa.types.is_unsigned_integer(a) else 0,
                b.bit_width if pa.types.is_unsigned_integer(b) else 0):
            return None  # uint64 and a signed integer: no integer type holds both
    elif pa.types.is_decimal(a) or pa.types.is_decimal(b):
        dec, other = (a, b) if pa.types.is_decimal(a) else (b, a)
        if pa.types.is_floating(other):
            return pa.float64()
        if pa.types.is_integer(other):
            digits = _INT_DIGITS[other.bit_width] + (1 if other.bit_width == 64 and
                                                     pa.types.is_unsigned_integer(other) else 0)
            precision = max(dec.precision, digits + dec.scale)
            if precision <= 38:
                return pa.decimal128(precision, dec.scale)
            return pa.decimal256(precision, dec.scale) if precision <= 76 else None
    elif pa.types.is_timestamp(a) and a.tz != b.tz:
        if not (_is_utc(a.tz) and _is_utc(b.tz)):
            return None  # naive vs zoned, or two zones: which one is meant is for the user to say
        # one zone under two names (pyarrow writes datetime.timezone.utc as "+00:00", pandas,
        # Polars and Spark's readers say "UTC"): the first file's name, the finer unit
        w = pa.timestamp(max(a.unit, b.unit, key=["s", "ms", "us", "ns"].index), a.tz)
        try:
            for t in (a, b):
                pa.array([], t).cast(w)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        return w
    try:
        w = pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])],
                             promote_options="permissive").field("x").type
        for t in (a, b):  # the scanner must be able to cast each file's type to it
            pa.array([], t).cast(w)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return w


_UTC_NAMES = frozenset({"utc", "etc/utc", "uct", "etc/uct", "z", "zulu", "etc/zulu", "universal", "etc/universal",
                        "gmt", "etc/gmt", "gmt0", "etc/gmt0", "greenwich", "etc/greenwich",
                        "+00:00", "-00:00", "+0000", "-0000", "+00"})


def _is_utc(tz: str | None) -> bool:
    """Whether the time zone name ``tz`` is UTC (``UTC``, ``+00:00``, ``Etc/UTC``...)."""
    return tz is not None and tz.strip().lower() in _UTC_NAMES


# A string column read dictionary-encoded for the kernel's own use, marked so the
# kernel turns it back into strings before anyone else sees it.
ENCODED = pa.dictionary(pa.int32(), pa.string())
DECODE = {b"modelfactory": b"decode"}


def read_files(source: Source, paths: tuple[str, ...], columns: list[str],
               filter: ds.Expression | None = None, *, encode: tuple[str, ...] = (),
               row_groups: tuple[int, ...] | None = None,
               known: Sequence[tuple[int, str]] = ()) -> pa.Table:
    """Read ``columns`` of the given files (a work unit), with ``filter`` pushed down.

    The string columns named in ``encode`` (group keys) come dictionary-encoded,
    marked with :data:`DECODE`: from the Parquet dictionary pages, and for partition
    keys from the folder names, so finding the groups needs no hashing of strings.
    ``row_groups``: only these row groups of the one file in ``paths`` (a share of a large file).
    ``known``: each path's (size, version mark) from discovery (:attr:`WorkUnit.known`), with
    which an object store's files open with no request of their own (:class:`_KnownFiles`).
    """
    raw = source.filesystem()
    fs = arrow_fs(raw, dict(zip(paths, known))) if known else raw
    schema, partitioning, fmt = source.schema, source.partitioning(), parquet_format()
    encode = tuple(c for c in encode if c in columns and c in schema.names and schema.field(c).type == pa.string())
    if encode:
        for c in encode:
            schema = schema.set(schema.get_field_index(c), schema.field(c).with_type(ENCODED).with_metadata(DECODE))
        in_files = [c for c in encode if c not in source.partition_keys]
        if in_files:
            fmt = parquet_format(in_files)
        in_paths = [c for c in encode if c in source.partition_keys]
        if in_paths:
            partitioning = source.partitioning(_partition_values(source, paths, in_paths))
    try:
        dataset = ds.dataset(list(paths), schema=schema, format=fmt, filesystem=fs,
                             partitioning=partitioning, partition_base_dir=source.base)
        if row_groups is not None:
            [whole] = dataset.get_fragments()
            dataset = ds.FileSystemDataset([whole.subset(row_group_ids=list(row_groups))], dataset.schema,
                                           dataset.format, dataset.filesystem)
        if filter is None or not source.views:
            table = dataset.to_table(columns=columns, filter=filter)
        else:
            # A file keeps a column as a view type (string_view, as Polars writes it): pyarrow
            # cannot compare its Parquet statistics with the filter's values ("no kernel
            # matching input types (string, string_view)"), though its values read fine as
            # strings.  Filter after reading instead, batch by batch: the whole of the files'
            # columns at once would be all the rows of a null-key recount on the client.  (Known
            # from discovery, not from a failed first try: that one read ahead by up to 64 batches.)
            # (one thread, no pre-buffering: the memory is that of a batch or two, whatever the
            # timing; this path is only for such files with a filter, and workers have one core)
            opts = ds.ParquetFragmentScanOptions(pre_buffer=False)
            kept = [ds.dataset(pa.Table.from_batches([b])).to_table(columns=columns, filter=filter)
                    for b in dataset.scanner(batch_readahead=1, fragment_readahead=1, use_threads=False,
                                             fragment_scan_options=opts).to_batches()]
            table = (pa.concat_tables(kept) if kept
                     else ds.dataset(schema.empty_table()).to_table(columns=columns, filter=filter))
        return table.unify_dictionaries() if encode else table
    except FileNotFoundError as err:
        # pyarrow's fsspec wrapper reports any failure (an unreachable endpoint, a denied
        # request) as a missing file: ask the filesystem itself for the real cause.
        cause: BaseException = err
        remote = not isinstance(raw, pafs.FileSystem)
        path = _changed(raw, paths, known)[0] if known and remote else paths[0]  # (s3fs names no key)
        if remote:
            try:
                raw.info(path)
            except Exception as real:  # noqa: BLE001 - reported with its own type and message
                cause = real
        raise DatasetError(f"Cannot read {path!r} of {source.url!r}: {type(cause).__name__}: {cause}. "
                           "If the storage is unreachable, fix that and resume the run.") from cause
    except pa.ArrowException:
        raise
    except Exception as err:
        if isinstance(raw, pafs.FileSystem):
            raise
        if type(err).__name__ == "FileExpired":  # s3fs's: an ETag the read named (_KnownFiles) is gone
            path, how = _changed(raw, paths, known)
            raise DatasetError(f"{path!r} of {source.url!r} was {how} after the run listed it: the version the "
                               "run planned for is gone. Run the job again once the writer is done.") from err
        # with the sizes known, no HEAD comes first to turn an unreachable endpoint or a denied
        # read into the FileNotFoundError above: botocore's own error arrives instead
        raise DatasetError(f"Cannot read the files of {source.url!r} ({len(paths)}, e.g. {paths[0]!r}): "
                           f"{type(err).__name__}: {err}. If the storage is unreachable, fix that and resume "
                           "the run.") from err


def _changed(raw, paths: Sequence[str], known: Sequence[tuple[int, str]]) -> tuple[str, str]:
    """Which of ``paths`` no longer is the version ``known`` (size, ETag) describes, and how
    ("rewritten" or "deleted"): s3fs's errors name no key, or the first file of a read.  Asked
    of the store file by file: an error's path only.  The first path if none differs (now)."""
    for path, (_, etag) in zip(paths, known):
        try:
            info = raw.info(path)
        except FileNotFoundError:
            return path, "deleted"
        except Exception:  # noqa: BLE001 - the store itself is in trouble: the caller says so
            break
        if etag and info.get("ETag", etag) != etag:
            return path, "rewritten"
    return paths[0], "rewritten"


def _partition_values(source: Source, paths: tuple[str, ...], keys: list[str]) -> dict[str, pa.Array]:
    """The values the partition ``keys`` take in ``paths``, decoded by pyarrow's own Hive parser."""
    part, base = source.partitioning(), source.base.rstrip("/") + "/"
    values: dict[str, set] = {k: set() for k in keys}
    for p in paths:
        found = ds.get_partition_keys(part.parse(p[len(base):] if p.startswith(base) else p))
        for k in keys:
            if found.get(k) is not None:
                values[k].add(found[k])
    return {k: pa.array(sorted(v), pa.string()) for k, v in values.items()}


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def check_columns(info: DatasetInfo, *, by: tuple[str, ...], time: str | None = None,
                  target: str | None = None, features: tuple[str, ...] = (),
                  columns: tuple[str, ...] = (), allow_null_keys: bool = False,
                  columns_role: str = "requested", null_target: bool = False) -> None:
    """Check up front that the named columns exist with usable types (``columns_role``: what
    ``columns`` are, for the message: "requested", or "kept (keep=, --keep)").  ``null_target``:
    a target of Parquet type null (every value missing: pandas writes a column of None so) is
    taken, as a scoring job takes missing values (its groups are skipped, saying so).

    Raises :class:`SchemaError` naming the column, its type, the columns that
    do exist, and what to do.
    """
    schema, url = info.schema, info.source.url
    names = schema.names

    def need(col: str, role: str) -> pa.DataType:
        if col not in names:
            inside = re.search(rf"(?:^|/){re.escape(col)}=([^/]+)", url.rstrip("/"))
            # pointed at one key folder (data/app=app-00): its value is in the path, not a column
            hint = (f" The path is inside the partition folder {col}={inside[1]}: point at the dataset's own folder "
                    f"(above the {col}= folders) and select with --where \"{col} = '{inside[1]}'\" "
                    f"(filter=ds.field({col!r}) == {inside[1]!r}).") if inside else ""
            raise SchemaError(
                f"The {role} column {col!r} is not in the dataset at {url!r}. "
                f"Columns: {', '.join(names)}.{hint}"
            )
        if col in info.conflicts:
            ta, fa, tb, fb = info.conflicts[col]
            head = f"The {role} column {col!r} has conflicting types in the files of {url!r}: {ta} in {fa!r} but {tb} in {fb!r}"
            if pa.types.is_timestamp(ta) and pa.types.is_timestamp(tb) and (ta.tz is None) != (tb.tz is None):
                raise SchemaError(
                    f"{head}: times with a time zone and without one, and which instants those without mean is "
                    f"not known. Write them all with their zone (pandas: {col}.dt.tz_localize('UTC'), or the "
                    "zone they were taken in).")
            if pa.types.is_timestamp(ta) and pa.types.is_timestamp(tb) and ta.tz and tb.tz and ta.tz != tb.tz:
                raise SchemaError(
                    f"{head}: two time zones. Both convert exactly, but a dataset has one zone, so that every "
                    "group's times read alike (in the frames a function gets, and in the scores written): write "
                    f"the times of every file in the same zone (pandas: {col}.dt.tz_convert('UTC')).")
            raise SchemaError(
                f"{head}, and neither converts safely to the other. Rewrite the files so "
                f"{col!r} has one type in all of them (e.g. cast it before writing).")
        if col in info.missing:
            n, example = info.missing[col]
            where = f"{n} of the {len(info.files)} files of {url!r} (e.g. {example!r})"
            if role == "key" and not allow_null_keys:
                raise SchemaError(
                    f"The key column {col!r} is missing from {where}: their rows would have a null key. "
                    f"Write {col!r} into every file, or point at the files that have it.")
            log.warning("The %s column %r is missing from %s: it reads as null there.", role, col, where)
        return schema.field(col).type

    if not by:
        raise SchemaError("No group keys: pass by=[...] with at least one column (e.g. by=['app', 'site']).")
    for k in by:
        t = need(k, "key")
        if pa.types.is_floating(t):
            kinds = info.widened.get(k, {})
            if any(not pa.types.is_floating(x) for x in kinds):  # int64 in some files, double in others
                each = ", ".join(f"{x} in {p!r}" for x, p in kinds.items())
                raise SchemaError(
                    f"The key column {k!r} has different types in the files of {url!r} ({each}, e.g.), which read "
                    f"together as {t}, and floating-point keys are refused. Rewrite the files whose {k!r} is "
                    "floating point with it as an integer (or every file's as a string).")
            raise SchemaError(f"The key column {k!r} is {t}; floating-point keys are refused. Cast it to an integer or string.")
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            raise SchemaError(f"The key column {k!r} is {t} (bytes): keys are shown, typed and matched as text. "
                              "Decode it to a string before writing (pandas: df[...].str.decode('utf-8')).")
        if pa.types.is_nested(t):
            raise SchemaError(f"The key column {k!r} is {t}: a key must be one value per row (a string, an "
                              "integer, a date or a time). Flatten it into columns and group by them.")
    if time is not None:
        t = need(time, "time")
        if not pa.types.is_timestamp(t):
            raise SchemaError(
                f"The time column {time!r} has type {t}, not a timestamp. Write it as a "
                "Parquet timestamp (e.g. pd.to_datetime(df[...]) before writing)."
            )
    if target is not None:
        t = need(target, "target")
        if pa.types.is_null(t) and not null_target:
            raise SchemaError(f"The target column {target!r} holds only nulls in every file of {url!r} the job "
                              "reads (Parquet type null: pandas writes a column of None so); it must hold numbers.")
        if not _is_numeric(t) and not pa.types.is_null(t):
            fix = (f" Write it as 0 and 1 (pandas: df[{target!r}].astype('int8'))" if pa.types.is_boolean(t) else
                   f" Write it as numbers (pandas: pd.to_numeric(df[{target!r}]))" if pa.types.is_string(t)
                   or pa.types.is_large_string(t) else "")
            raise SchemaError(f"The target column {target!r} of {url!r} has type {t}; it must be numeric (int, float "
                              f"or decimal).{fix}")
    for f in features:
        t = need(f, "feature")
        if not (_is_numeric(t) or pa.types.is_boolean(t)):
            raise SchemaError(f"The feature column {f!r} has type {t}; features must be numeric or boolean.")
    for c in columns:
        need(c, columns_role)
    if not allow_null_keys:
        bad = {k: n for k, n in info.null_counts.items() if k in by and n}
        if bad:
            what = ", ".join(f"{n:,} null value(s) in {k!r}{_null_folders(info, k)}" for k, n in bad.items())
            k = next(iter(bad))
            raise SchemaError(
                f"The dataset at {url!r} has {what}. Group keys must not be null: fill them "
                f"(e.g. with 'unknown') or leave those rows out with filter= (e.g. ds.field({k!r}).is_valid(); "
                f"on the command line --where \"{k} is not null\")."
            )


def value_types(info: DatasetInfo, columns) -> dict[str, str]:
    """The Arrow types of a run's target and features, as its manifest records them (for
    :func:`check_value_types` when the run scores)."""
    return {c: str(info.schema.field(c).type) for c in columns if c and c in info.schema.names}


def _value_kind(type_text: str) -> str | None:
    """"boolean", "number" (integers, floats, decimals), or None (other types: not compared here)."""
    if type_text == "bool":
        return "boolean"
    return "number" if type_text.startswith(("int", "uint", "float", "double", "halffloat", "decimal")) else None


def check_value_types(info: DatasetInfo, man: dict) -> None:
    """Refuse to score a target or feature that is boolean now and was a number in training, or the
    reverse: the values would be read as 0 and 1 against a model of other values (a feature of
    floats in training, booleans today), and every row scored ``ok``.  Integers and floats mix
    freely.  Runs stored before the types were recorded are not checked."""
    stored = (man.get("input") or {}).get("value_types") or {}
    for col, was in stored.items():
        if col not in info.schema.names:
            continue
        now = plain_type(info.schema.field(col).type)
        if None not in (_value_kind(was), _value_kind(str(now))) and _value_kind(was) != _value_kind(str(now)):
            how = ("its booleans would be read as 0 and 1 against a model fitted on numbers" if pa.types.is_boolean(now)
                   else "its numbers would be scored against a model fitted on booleans (0 and 1)")
            raise SchemaError(
                f"The column {col!r} of {info.source.url!r} is {now}, but run {man['run_id']!r} was trained on it "
                f"as {was}: {how}. Write the column as {was} as it was in training, or train again on data like "
                "this.")


def check_time_zone(info: DatasetInfo, time: str | None, man: dict) -> None:
    """Refuse to score times without a time zone with models trained on times with one, or
    the reverse: the same reading would be taken for another instant (naive local times read as
    UTC shift every season slot), as :func:`modelfactory.dataset.discover` refuses such a mix
    within one dataset (``man``: the training run's manifest).  Runs stored before the time type was recorded are not checked."""
    stored = (man.get("input") or {}).get("time_type")
    if not time or not stored or not stored.startswith("timestamp") or time not in info.schema.names:
        return
    now = info.schema.field(time).type
    if not pa.types.is_timestamp(now):
        return
    had_zone = "tz=" in stored
    if had_zone == (now.tz is not None):
        return  # both without a zone, or both with one (any zones: the same instants)
    where = f"The time column {time!r} of {info.source.url!r}"
    if had_zone:
        raise SchemaError(
            f"{where} has no time zone ({now}), but run {man['run_id']!r} was trained on times with one "
            f"({stored}): which instants these times mean is not known (local wall-clock times read as UTC "
            "would put every point in another season slot). If they are UTC, write them with the zone "
            "(pandas: ts.dt.tz_localize('UTC')); if local, with theirs (ts.dt.tz_localize('Europe/Berlin')).")
    raise SchemaError(
        f"{where} has time zone {now.tz} ({now}), but run {man['run_id']!r} was trained on times without one "
        f"({stored}): which instants those meant is not known. If they were UTC, write these in UTC without "
        "a zone (pandas: ts.dt.tz_convert('UTC').dt.tz_localize(None)); or train again on data like this.")


def _null_folders(info: DatasetInfo, key: str) -> str:
    """Where a partition key's nulls come from: files in ``key=__HIVE_DEFAULT_PARTITION__``
    folders (Spark's and pyarrow's folder for a null value, Spark's for an empty string too),
    or in no ``key=`` folder at all.  Empty for a key that is a column in the files."""
    keys = info.source.partition_keys
    if key not in keys:
        return ""
    i = keys.index(key)
    files = [f.path for f in info.files if f.partition[i] is None]
    marked = [p for p in files if f"{key}=__HIVE_DEFAULT_PARTITION__" in p.replace("\\", "/").split("/")]
    seen = set(marked)
    stray = [p for p in files if p not in seen]
    where = []
    if marked:
        where.append(f"{len(marked):,} file(s) in {key}=__HIVE_DEFAULT_PARTITION__ folders, e.g. {marked[0]!r}")
    if stray:
        where.append(f"{len(stray):,} file(s) in no {key}=… folder, e.g. {stray[0]!r}")
    return f" ({'; '.join(where)})" if where else ""
