"""Small I/O helpers shared by the store and the kernel: atomic writes, checksums."""
from __future__ import annotations

import contextlib
import hashlib
import io
import posixpath
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["PartInfo", "Location", "write_parquet", "hive_folder", "normal_url"]


@dataclass(frozen=True)
class PartInfo:
    """A file a worker wrote: where, how big, its sha256, and how many groups/rows it holds."""

    path: str  # relative to the location's root
    bytes: int
    sha256: str
    rows: int


def normal_url(url: str) -> str:
    """A local path as an absolute one (``~`` expanded, as pandas does: ``~/store`` is the
    home's), a ``file:`` URL as the local path it names (percent-decoded, as
    ``Path.as_uri()`` encodes it: ``file:///data/my%20metrics``), any other URL as it is.

    >>> normal_url("file:///data/my%20metrics"), normal_url("s3://b/x%20y")
    ('/data/my metrics', 's3://b/x%20y')
    """
    import os

    if url[:7].lower() == "file://":
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            return url  # file://host/share: left to fsspec
        url = unquote(parts.path)
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return url


@dataclass(frozen=True)
class Location:
    """A folder, local or any fsspec URL; picklable, so workers can write to it."""

    url: str
    storage_options: tuple = ()

    @classmethod
    def of(cls, url: str, storage_options: dict | None = None) -> "Location":
        return cls(normal_url(str(url)).rstrip("/"), tuple(sorted((storage_options or {}).items())))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.url, dict(self.storage_options))[0]

    @property
    def root(self) -> str:
        return url_to_fs(self.url, dict(self.storage_options))[1]

    @property
    def is_local(self) -> bool:
        return _is_local(self.fs)

    @property
    def protocol(self) -> str:
        return _protocol(self.fs)

    def check_bucket(self, error: type[Exception]) -> None:
        """On an object store, refuse a bucket that does not exist (writing would create it)."""
        if self.is_local:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.exists(bucket)
        except PermissionError as err:
            raise error(f"Access to {self.url!r} was denied ({err}): check the credentials "
                        "(AWS_* environment, ~/.aws, or storage_options: [storage_options] in --config).") from err
        if found:
            return
        try:  # s3fs's exists() also says False when the endpoint cannot be reached: ask again, loudly
            self.fs.info(bucket)
            return
        except FileNotFoundError:
            pass
        except PermissionError as err:  # exists() says False for a 403 too
            raise error(f"Access to {self.url!r} was denied ({err}): check the credentials "
                        "(AWS_* environment, ~/.aws, or storage_options: [storage_options] in --config).") from err
        except Exception as err:  # noqa: BLE001 - botocore's connection errors are not OSErrors
            from .exceptions import describe_error

            raise error(f"Cannot reach the object store for {self.url!r}: {describe_error(err)}. Check the "
                        "endpoint (endpoint_url in storage_options, AWS_ENDPOINT_URL) and the network.") from err
        raise error(f"The bucket {bucket!r} of {self.url!r} does not exist. Create it first "
                    "(modelfactory does not create buckets, so a typo cannot make a new one).")

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` at ``rel`` so that readers see all of it or nothing.

        Local folders: write a temporary file and rename it.  Object stores: a
        single PUT is already atomic.
        """
        fs, path = self.fs, self.path(rel)
        if _is_local(fs):
            try:
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
            except (NotADirectoryError, FileExistsError) as err:
                import os

                from .exceptions import StoreError

                blocker = posixpath.dirname(path)  # the file that stands where a folder must be
                while blocker != posixpath.dirname(blocker) and not os.path.isfile(blocker):
                    blocker = posixpath.dirname(blocker)
                raise StoreError(f"Cannot write to {self.url!r}: {blocker!r} is a file, not a folder. "
                                 "Pick a folder (new or existing) instead.") from err
            # A hidden name (".part-….tmp-…"): Parquet readers of the folder (pyarrow, pandas,
            # Spark, DuckDB) skip it, so a writer killed before the rename leaves no file that
            # they read: neither a truncated one nor a whole copy of rows that a retry writes
            # again under the real name.
            folder, name = posixpath.split(path)
            tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with fs.open(tmp, "wb") as f:
                    f.write(data)
                fs.mv(tmp, path)
            except BaseException:
                try:  # a full disk or a read-only folder: leave no partial file behind
                    fs.rm_file(tmp)
                except OSError:
                    pass
                raise
        else:
            fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def rm(self, rel: str = "", *, recursive: bool = False) -> None:
        """Remove ``rel`` (the whole location for ``""``).  fsspec's object stores (and
        memory://) read the path given to ``rm`` as a glob pattern, local folders do not: a
        root like "models[prod]" is escaped for them."""
        import glob

        path = self.path(rel) if rel else self.root
        if not self.is_local and self.is_bucket(path):  # s3fs would delete the bucket itself
            raise ValueError(f"refusing to remove the whole bucket {path.strip('/')!r}")
        self.fs.rm(path if self.is_local else glob.escape(path), recursive=recursive)

    def is_bucket(self, path: str | None = None) -> bool:
        """Whether ``path`` (default: this location's root) is an object store's bucket root."""
        return self.protocol in _BUCKET_PROTOCOLS and "/" not in (self.root if path is None else path).strip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """The files under ``rel`` (the whole location for ``""``) with their sizes, keyed by
        their paths relative to this location; empty when there is no such folder."""
        try:
            found = self.fs.find(self.path(rel) if rel else self.root, detail=True)
        except FileNotFoundError:
            return {}
        root = self.root.strip("/")
        return {path.strip("/")[len(root) + 1:]: info.get("size") for path, info in found.items()
                if info.get("type") != "directory"}

    def glob(self, pattern: str) -> list[str]:
        """The paths (relative to this location) that match ``pattern``, sorted."""
        import glob

        try:  # the root is a path, not a pattern: "models[prod]" must match itself
            found = self.fs.glob(posixpath.join(glob.escape(self.root), pattern))
        except FileNotFoundError:
            return []
        root = self.root.strip("/") + "/"
        return sorted(p.strip("/").split(root, 1)[-1] for p in found)


#: Libraries whose errors are storage errors (besides OSErrors): botocore's connection errors,
#: for one, are not OSErrors.
STORAGE_LIBRARIES = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs",
                               "azure", "google", "urllib3", "requests"})


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the storage (an OSError, or an error of a storage library)."""
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in STORAGE_LIBRARIES


@contextlib.contextmanager
def storage_errors(error: type[Exception], message: Callable[[BaseException], str],
                   passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside, an error of the storage (:func:`is_storage_error`: a full disk, a read-only
    folder, denied access, an object store out of reach; botocore's and aiohttp's errors are
    not OSErrors) is raised as ``error(message(err))``, chained to it.  ``passthrough`` and
    every other error propagate as they are."""
    try:
        yield
    except passthrough:
        raise
    except Exception as err:  # noqa: BLE001 - told apart by is_storage_error
        if not is_storage_error(err):
            raise
        raise error(message(err)) from err


def error_text(err: BaseException) -> str:
    """``"TypeName: its message"`` on one line, for an error message that quotes it."""
    return f"{type(err).__name__}: {' '.join(str(err).split()) or 'no details'}"


#: fsspec protocols whose first path segment is a bucket (or container).
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2"})


def url_to_fs(url: str, storage_options: dict | None = None, *, error: type[Exception] | None = None):
    """fsspec's ``url_to_fs``, without the listings cache on object stores: another process may
    commit a run at any time, and a cached listing would hide it.

    An unknown protocol (``s4://``), or one whose package is not installed (``gs://``
    without gcsfs), raises ``error`` (default :class:`StoreError`) naming the URL and
    what to do, instead of fsspec's ValueError or ImportError.
    """
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(url) not in ("file", "local"):
        options.setdefault("use_listings_cache", False)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as err:
        import importlib.util

        from fsspec.registry import known_implementations

        from .exceptions import StoreError

        error = error or StoreError
        if isinstance(err, ValueError):
            if not str(err).startswith("Protocol not known"):
                raise
            protocol = str(err).split(":", 1)[-1].strip()
            raise error(f"Unknown storage protocol {protocol + '://'!r} in {url!r}. Use a local path or a "
                        "URL fsspec knows (s3://, gs://, az://, ...); check for a typo.") from err
        packages = [known_implementations.get(fsspec.utils.get_protocol(u), {}).get("class", "").split(".")[0]
                    for u in url.split("::")]  # a chained URL (simplecache::gs://...) names several
        missing = [p for p in packages if p and importlib.util.find_spec(p) is None]
        package = missing[0] if missing else getattr(err, "name", None) or "the package it names"
        raise error(f"{url!r} needs the package {package!r}, which is not installed ({err}). "
                    f"Install it (pip install {package}) and run again.") from err


def _protocol(fs) -> str:
    """A file system's protocol ("file", "s3", ...): fsspec gives a string or a tuple of aliases."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs) -> bool:
    return _protocol(fs) in ("file", "local")


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=64 * 1024)
    return buf.getvalue()


def write_parquet(loc: Location, rel: str, table: pa.Table) -> PartInfo:
    """Write ``table`` as zstd Parquet at ``rel`` atomically; return its :class:`PartInfo`."""
    data = parquet_bytes(table)
    loc.write_bytes(rel, data)
    return PartInfo(rel, len(data), hashlib.sha256(data).hexdigest(), table.num_rows)


# What Spark escapes in a Hive folder name (ExternalCatalogUtils.escapePathName, on POSIX).
_ESCAPED = frozenset(map(chr, range(0x20))) | frozenset('"#%\'*/:=?\\\x7f{[]^')


def _escape(text: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in text)


def hive_folder(keys, values) -> str:
    """The Hive folder of partition ``values``, escaped as Spark escapes it: ``/``, ``=``, ``%``,
    ``#``... and control characters as ``%XX``, anything else as is (``a b``, ``ünï``).  pyarrow's
    own encoding also writes every byte of a non-ASCII character as ``%XX``: a value of 30 Chinese
    characters, a 95-byte folder name in the input, became a 275-byte one, past the 255 bytes a
    file name may have, and the whole run stopped.  Readers (pyarrow, Spark, DuckDB, pandas)
    decode either.  A null value is ``__HIVE_DEFAULT_PARTITION__``, as both write it."""
    return "/".join(f"{_escape(k)}=" + ("__HIVE_DEFAULT_PARTITION__" if v is None else _escape(v))
                    for k, v in zip(keys, values))
