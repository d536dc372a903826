"""Discover a Parquet dataset and read one work unit of it.

The client calls :func:`discover` once: it lists the files (local or any fsspec
URL such as ``s3://``), the Hive partition keys (``app=…/site=…/``), the schema,
and each file's row count from its Parquet footer.  It never reads data.

Workers call :func:`read_files` with the picklable :class:`Source` to read the
files of their own work unit, with only the needed columns and any filter
pushed down to Parquet.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from .exceptions import DatasetError, SchemaError

__all__ = ["Source", "FileInfo", "DatasetInfo", "discover", "read_files", "filesystem"]

log = logging.getLogger(__name__)

_IGNORE_PREFIXES = [".", "_"]


def filesystem(url: str, storage_options: dict | None = None):
    """Return ``(filesystem, path)`` for a local path or an fsspec URL.

    Local paths use pyarrow's native filesystem (fastest); anything else goes
    through fsspec (``s3://`` through s3fs), which pyarrow wraps as needed.
    """
    from ._io import url_to_fs

    fs, path = url_to_fs(url, storage_options)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or fs.__class__.__name__ == "LocalFileSystem":
        return pafs.LocalFileSystem(), path
    return fs, path


@dataclass(frozen=True)
class Source:
    """Everything a worker needs to read part of the dataset.  Small and picklable."""

    url: str
    base: str
    schema: pa.Schema
    partition_keys: tuple[str, ...]
    storage_options: tuple = ()

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
    size: int
    partition: tuple  # values of Source.partition_keys, None for a null partition


@dataclass
class DatasetInfo:
    """The result of discovery: a :class:`Source` plus the per-file facts the planner needs."""

    source: Source
    files: list[FileInfo]
    null_counts: dict[str, int] = field(default_factory=dict)

    @property
    def schema(self) -> pa.Schema:
        return self.source.schema

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def fingerprint(self) -> str:
        """A digest of the file list, sizes and row counts (changes when the input does)."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            h.update(f"{f.path}\0{f.size}\0{f.rows}\n".encode())
        return h.hexdigest()


def _hive_keys(dataset: ds.FileSystemDataset) -> tuple[str, ...]:
    """The Hive partition keys, in folder order, from the fragments' partition expressions."""
    keys: dict[str, None] = {}
    for frag in dataset.get_fragments():
        keys.update(dict.fromkeys(ds.get_partition_keys(frag.partition_expression)))
    return tuple(keys)


def discover(url: str, *, storage_options: dict | None = None,
             null_check: tuple[str, ...] = (), filter: ds.Expression | None = None) -> DatasetInfo:
    """Discover the Parquet dataset at ``url``.

    Partition keys are read as strings (``app=007`` stays ``"007"``).  For the
    columns in ``null_check`` the Parquet statistics are used to count nulls,
    so a null group key is found without reading data.  A ``filter`` on
    partition keys prunes whole files here (other filters apply when reading).

    Raises
    ------
    DatasetError
        The path does not exist, holds no Parquet files, or cannot be read.
    """
    import os

    url = os.fspath(url)
    if "://" not in url:
        url = os.path.abspath(url)  # the manifest must name the input wherever it is read from
    try:
        return _discover(url, storage_options, null_check, filter)
    except PermissionError as err:
        raise DatasetError(f"Access to {url!r} was denied ({err}): check the credentials "
                           "(AWS_* environment, ~/.aws, or storage_options).") from err


def _discover(url, storage_options, null_check, filter) -> DatasetInfo:
    fs, path = filesystem(url, storage_options)
    info = fs.get_file_info(path) if isinstance(fs, pafs.FileSystem) else None
    exists = info.type != pafs.FileType.NotFound if info is not None else fs.exists(path)
    if not exists:
        raise DatasetError(f"No file or folder at {url!r}. Check the path (and credentials for s3://).")
    is_file = info.type == pafs.FileType.File if info is not None else fs.isfile(path)
    try:
        probe = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                           ignore_prefixes=_IGNORE_PREFIXES)
        keys = () if is_file else _hive_keys(probe)
        part = Source(url, path, pa.schema([]), keys).partitioning()
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning=part,
                             ignore_prefixes=_IGNORE_PREFIXES)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(f"Cannot open the Parquet dataset at {url!r}: {err}") from err
    fragments = list(dataset.get_fragments(filter=filter) if filter is not None else dataset.get_fragments())
    if not fragments and filter is not None:
        raise DatasetError(f"No files under {url!r} match filter {filter}.")
    if not fragments:
        raise DatasetError(
            f"No Parquet files under {url!r}. Point at a folder of .parquet files "
            "(optionally Hive-partitioned, e.g. app=…/site=…/part-0.parquet)."
        )
    schema = dataset.schema
    dup = [k for k in keys if schema.get_all_field_indices(k).__len__() > 1]
    if dup:
        raise SchemaError(f"Columns {dup} appear both as partition folders and inside the files under {url!r}.")
    source = Source(url, path, schema, keys, tuple(sorted((storage_options or {}).items())))

    check = [c for c in null_check if c not in keys]

    def facts(frag):
        try:
            md = frag.metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetError(f"Cannot read the Parquet footer of {frag.path!r}: {err}") from err
        nulls = dict.fromkeys(check, 0)
        if check:
            names = md.schema.names
            for i in range(md.num_row_groups):
                rg = md.row_group(i)
                for c in check:
                    if c in names:
                        st = rg.column(names.index(c)).statistics
                        if st is not None and st.has_null_count:
                            nulls[c] += st.null_count
        pk = ds.get_partition_keys(frag.partition_expression)
        size = getattr(md, "serialized_size", 0)
        return FileInfo(frag.path, md.num_rows, size, tuple(pk.get(k) for k in keys)), nulls

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(facts, fragments))
    files = [r[0] for r in results]
    null_counts = {c: sum(r[1][c] for r in results) for c in check}
    for i, k in enumerate(keys):
        null_counts[k] = sum(f.rows for f in files if f.partition[i] is None)
    info = DatasetInfo(source, files, null_counts)
    if info.rows == 0:
        raise DatasetError(f"The dataset at {url!r} has {len(files)} Parquet file(s) but no rows.")
    return info


# A string column read dictionary-encoded for the kernel's own use, marked so the
# kernel turns it back into strings before anyone else sees it.
ENCODED = pa.dictionary(pa.int32(), pa.string())
DECODE = {b"modelfactory": b"decode"}


def read_files(source: Source, paths: tuple[str, ...], columns: list[str],
               filter: ds.Expression | None = None, *, encode: tuple[str, ...] = ()) -> pa.Table:
    """Read ``columns`` of the given files (a work unit), with ``filter`` pushed down.

    The string columns named in ``encode`` (group keys) come dictionary-encoded,
    marked with :data:`DECODE`: from the Parquet dictionary pages, and for partition
    keys from the folder names, so finding the groups needs no hashing of strings.
    """
    fs = source.filesystem()
    schema, partitioning, fmt = source.schema, source.partitioning(), "parquet"
    encode = tuple(c for c in encode if c in columns and c in schema.names and schema.field(c).type == pa.string())
    if encode:
        for c in encode:
            schema = schema.set(schema.get_field_index(c), schema.field(c).with_type(ENCODED).with_metadata(DECODE))
        in_files = [c for c in encode if c not in source.partition_keys]
        if in_files:
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=in_files))
        in_paths = [c for c in encode if c in source.partition_keys]
        if in_paths:
            partitioning = source.partitioning(_partition_values(source, paths, in_paths))
    try:
        dataset = ds.dataset(list(paths), schema=schema, format=fmt, filesystem=fs,
                             partitioning=partitioning, partition_base_dir=source.base)
        table = dataset.to_table(columns=columns, filter=filter)
        return table.unify_dictionaries() if encode else table
    except FileNotFoundError as err:
        # pyarrow's fsspec wrapper reports any failure (an unreachable endpoint, a denied
        # request) as a missing file: ask the filesystem itself for the real cause.
        cause: BaseException = err
        if not isinstance(fs, pafs.FileSystem):
            try:
                fs.info(paths[0])
            except Exception as real:  # noqa: BLE001 - reported with its own type and message
                cause = real
        raise DatasetError(f"Cannot read {paths[0]!r} of {source.url!r}: {type(cause).__name__}: {cause}. "
                           "If the storage is unreachable, fix that and resume the run.") from cause


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
                  columns: tuple[str, ...] = (), allow_null_keys: bool = False) -> None:
    """Check up front that the named columns exist with usable types.

    Raises :class:`SchemaError` naming the column, its type, the columns that
    do exist, and what to do.
    """
    schema, url = info.schema, info.source.url
    names = schema.names

    def need(col: str, role: str) -> pa.DataType:
        if col not in names:
            raise SchemaError(
                f"The {role} column {col!r} is not in the dataset at {url!r}. "
                f"Columns: {', '.join(names)}."
            )
        return schema.field(col).type

    if not by:
        raise SchemaError("No group keys: pass by=[...] with at least one column (e.g. by=['app', 'site']).")
    for k in by:
        t = need(k, "key")
        if pa.types.is_floating(t):
            raise SchemaError(f"The key column {k!r} is {t}; floating-point keys are refused. Cast it to an integer or string.")
    if time is not None:
        t = need(time, "time")
        if not pa.types.is_timestamp(t):
            raise SchemaError(
                f"The time column {time!r} has type {t}, not a timestamp. Write it as a "
                "Parquet timestamp (e.g. pd.to_datetime(df[...]) before writing)."
            )
    if target is not None:
        t = need(target, "target")
        if not _is_numeric(t):
            raise SchemaError(f"The target column {target!r} has type {t}; it must be numeric (int, float or decimal).")
    for f in features:
        t = need(f, "feature")
        if not (_is_numeric(t) or pa.types.is_boolean(t)):
            raise SchemaError(f"The feature column {f!r} has type {t}; features must be numeric or boolean.")
    for c in columns:
        need(c, "requested")
    if not allow_null_keys:
        bad = {k: n for k, n in info.null_counts.items() if k in by and n}
        if bad:
            what = ", ".join(f"{n:,} null value(s) in {k!r}" for k, n in bad.items())
            raise SchemaError(
                f"The dataset at {url!r} has {what}. Group keys must not be null: fill them "
                "(e.g. with 'unknown') or leave those rows out with filter=."
            )
