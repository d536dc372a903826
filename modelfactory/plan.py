"""Turn groups into work units.

A *work unit* is what one Dask task does: read some files, split them into
groups, run every group, write one part.  Many small groups share a unit (one
task per group would drown the scheduler at a million groups); a group too big
for the target size gets a unit of its own.

Two ways to plan:

``files``
    Some group keys are Hive partition keys.  Then all rows of a group lie in
    the files of one partition folder (a *leaf*), so a unit simply names its
    files: no shuffle, each worker reads its own.  Leaves are packed in key
    order into units of about ``target_rows`` rows, using row counts from the
    Parquet footers, cut where the shares come out most even.
``shuffle``
    No group key is a partition key (e.g. data partitioned by day), so a group
    may span many files.  Groups are co-located by Dask's own p2p shuffle into
    ``n_units`` partitions; each partition is a unit.

Either way the number of units is rounded up to a multiple of the number of
workers (worker threads), so no worker idles through a last wave of a single unit.

Unit ids are a digest of what the unit reads, so the same input plans to the
same ids and a rerun can resume.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from bisect import bisect_left
from itertools import accumulate, groupby, pairwise

from .dataset import DatasetInfo
from .exceptions import PlanError

__all__ = ["WorkUnit", "Plan", "Leaf", "plan", "pack", "auto_target_rows", "unit_count", "aligned_count"]

MIN_UNIT_ROWS = 50_000
MAX_UNIT_ROWS = 2_000_000
UNITS_PER_WORKER = 4


@dataclass(frozen=True)
class WorkUnit:
    """One task's worth of work: the files it reads (or the shuffle partition it gets)."""

    id: str
    paths: tuple[str, ...]
    rows: int
    leaves: int = 0
    partition: int | None = None  # shuffle partition number, for the ``shuffle`` mode
    #: (size, version mark) of each of ``paths``, from discovery's listing: an object store's
    #: files then open with no request of their own (:func:`modelfactory.dataset.read_files`)
    known: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Leaf:
    """Files that together hold every row of some groups (a Hive partition folder)."""

    key: tuple
    paths: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class Plan:
    mode: str  # "files" or "shuffle"
    units: tuple[WorkUnit, ...]
    target_rows: int
    rows: int
    limit: int = 0  # no unit of several leaves above this many rows
    multiple: int = 1  # the unit count is a multiple of this (the workers it was planned for)


def auto_target_rows(total_rows: int, workers: int) -> int:
    """Rows per unit: at least ``UNITS_PER_WORKER`` units per worker, for balance and
    so an adaptive cluster sees enough pending work to scale up, but never below
    ``MIN_UNIT_ROWS`` (per-task overhead, file reads) nor above ``MAX_UNIT_ROWS``
    (worker memory)."""
    per = math.ceil(total_rows / max(1, workers * UNITS_PER_WORKER))
    return max(MIN_UNIT_ROWS, min(MAX_UNIT_ROWS, per))


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def _sort_key(key: tuple) -> tuple:
    return tuple((v is None, "" if v is None else str(v)) for v in key)


def unit_count(total_rows: int, target_rows: int, multiple: int = 1) -> int:
    """How many units of about ``target_rows`` rows: rounded up to a multiple of
    ``multiple`` (the workers), so every worker gets as many units and none sits
    idle through the last wave."""
    n = max(1, math.ceil(total_rows / target_rows))
    if n > 1 and multiple > 1:
        n = math.ceil(n / multiple) * multiple
    return n


def pack(leaves: list[Leaf], target_rows: int, *, multiple: int = 1,
         limit: int | None = None) -> list[WorkUnit]:
    """Pack leaves, in key order, into balanced units of about ``target_rows`` rows.

    There are :func:`unit_count` units (when there are enough leaves).  A leaf larger
    than an equal share of the rows is a unit by itself; the other leaves are cut
    at the boundaries nearest to equal shares of theirs, so those units differ by
    about one leaf.  No unit of several leaves holds more than ``limit``
    rows (default ``target_rows``): a leaf larger than that gets a unit of its own.
    Every leaf lands in exactly one unit.
    """
    if target_rows < 1:
        raise PlanError(f"The unit size must be at least 1 row; got {target_rows}.")
    limit = target_rows if limit is None else max(limit, target_rows)
    ordered = sorted(leaves, key=lambda lf: _sort_key(lf.key))
    if not ordered:
        return []
    total = sum(lf.rows for lf in ordered)
    n = min(unit_count(total, target_rows, multiple), len(ordered))
    # A leaf bigger than an equal share is a unit by itself; the other leaves share
    # the remaining units, cut at the boundaries nearest to equal shares of their rows.
    share = total / n
    big = {i for i, lf in enumerate(ordered) if lf.rows > share}
    small = [lf.rows for i, lf in enumerate(ordered) if i not in big]
    # Whole leaves may not fill n units evenly within the limit (20 folders of 6,720 rows, at most
    # 20,000 a unit: two a unit, so 10 units, not 7): as many units as filling each in turn up to
    # the limit takes (the fewest there can be), so the equal shares below are not then split,
    # each share over the limit into a unit of two leaves and one of one (13 units for those 20).
    cum = list(accumulate(small))
    fewest = len(big) + len(_runs_filled(cum, limit))
    if fewest > n:
        n = min(unit_count(fewest, 1, multiple), len(ordered))
    n_small = min(max(1, n - len(big)), len(small))
    small_total = cum[-1] if cum else 0
    ends, prev = set(), 0  # cut after this many small leaves
    for k in range(1, n_small):
        ideal = small_total * k / n_small
        j = bisect_left(cum, ideal)  # the first leaf whose end reaches the ideal cut
        end = j if j > 0 and ideal - cum[j - 1] <= cum[j] - ideal else j + 1
        end = min(max(end, prev + 1), len(small) - (n_small - k))  # no empty unit, before or after
        ends.add(end)
        prev = end
    bounds = [0, *sorted(ends), len(small)]
    if any(cum_at(cum, b) - cum_at(cum, a) > limit for a, b in pairwise(bounds)):
        # an equal share over the limit was split into two units after: cut where the largest
        # unit is smallest instead, which fits the limit in n_small units (n_small >= the fewest)
        ends = _cuts_within(cum, n_small, limit)
    chunks: list[list[Leaf]] = []
    run: list[Leaf] = []
    seen = 0
    for i, leaf in enumerate(ordered):
        if i in big:  # its own unit; the run of small leaves goes on past it
            chunks.append([leaf])
            continue
        run.append(leaf)
        seen += 1
        if seen in ends:
            chunks.append(run)
            run = []
    if run:
        chunks.append(run)

    units: list[WorkUnit] = []

    def flush(cur: list[Leaf]) -> None:
        paths = tuple(p for leaf in cur for p in leaf.paths)
        units.append(WorkUnit(f"u{len(units):05d}-{_digest(paths)}", paths, sum(lf.rows for lf in cur), len(cur)))

    for chunk in chunks:
        cur: list[Leaf] = []
        cur_rows = 0
        for leaf in chunk:  # a chunk over the limit (very uneven leaves) is split further
            if cur and cur_rows + leaf.rows > limit:
                flush(cur)
                cur, cur_rows = [], 0
            cur.append(leaf)
            cur_rows += leaf.rows
        if cur:
            flush(cur)
    return units


def cum_at(cum: list[int], k: int) -> int:
    """The rows of the first ``k`` leaves (``cum``: their running sums)."""
    return cum[k - 1] if k else 0


def _runs_filled(cum: list[int], cap: int) -> list[int]:
    """Where runs of leaves end (``cum``: running sums of their rows) when each run takes leaves
    until the next would pass ``cap`` (a leaf over it alone): the fewest runs within ``cap``."""
    import numpy as np

    sums = np.asarray(cum, dtype=np.int64)
    out, k = [], 0
    while k < len(sums):
        k = max(int(np.searchsorted(sums, cum_at(cum, k) + cap, side="right")), k + 1)  # (a search per run)
        out.append(k)
    return out


def _cuts_within(cum: list[int], n: int, limit: int) -> set[int]:
    """Where to cut leaves (``cum``: running sums of their rows) into at most ``n`` runs, each of
    as few rows as can be (no more than ``limit``): the smallest largest run, found by halving
    between the largest leaf and ``limit``, each try filling runs in turn."""
    largest = max(b - a for a, b in pairwise([0, *cum]))
    lo, hi = largest, max(largest, limit)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_runs_filled(cum, mid)) <= n:
            hi = mid
        else:
            lo = mid + 1
    return set(_runs_filled(cum, lo)[:-1])


def leaves_of(info: DatasetInfo, by: tuple[str, ...]) -> list[Leaf]:
    """Group the dataset's files by the values of the partition keys that are also group keys."""
    keys = info.source.partition_keys
    idx = [i for i, k in enumerate(keys) if k in by]
    if not idx:
        return []

    def leaf_key(f):
        return tuple(f.partition[i] for i in idx)

    files = sorted(info.files, key=lambda f: (_sort_key(leaf_key(f)), f.path))
    return [
        Leaf(k, tuple(f.path for f in fs), sum(f.rows for f in fs))
        for k, fs in ((k, list(g)) for k, g in groupby(files, key=leaf_key))
    ]


def aligned_count(n: int, align: int) -> int:
    """The unit count nearest above ``n`` that divides ``align`` or is a multiple of it.

    Scoring against a run whose groups were shuffled into ``align`` partitions: when both
    shuffles hash the keys alike, a scoring partition then holds the groups of
    ``align / count`` training partitions (or of one), so its unit reads only their parts,
    and the job reads each part about once instead of once per unit.

    Not more than twice ``n``, though: a run of a prime number of partitions (101) would turn a
    2-unit job into 101 tasks writing 101 small files; then ``n`` stays, and each unit reads the
    parts of every partition its groups hashed to (all of them, at worst: once per unit).

    >>> aligned_count(5, 8), aligned_count(3, 12), aligned_count(9, 4), aligned_count(7, 7)
    (8, 3, 12, 7)
    >>> aligned_count(2, 101), aligned_count(60, 101)
    (2, 101)
    """
    if align < 2 or n < 1:
        return n
    if n >= align:
        c = math.ceil(n / align) * align
    else:
        c = next(d for d in range(n, align + 1) if align % d == 0)
    return c if c <= 2 * n else n


def plan(info: DatasetInfo, by: tuple[str, ...], *, workers: int,
         target_rows: int | None = None, limit: int | None = None, multiple: int | None = None,
         align: int = 0, shuffle: bool = False) -> Plan:
    """Plan the work units for grouping ``info`` by ``by`` on ``workers`` workers (worker threads:
    :func:`modelfactory.run.task_slots`, each runs one unit at a time).

    ``limit`` and ``multiple`` default from ``target_rows`` and ``workers``; a resumed
    run passes the values it was first planned with, so it gets the same units (and
    reuses their parts) on any number of workers.  ``align``: a shuffle's unit count is
    made to divide this number or be a multiple of it (:func:`aligned_count`).  ``shuffle``:
    plan a shuffle even when the groups lie in key folders (a score job against a run whose
    models are spread over its parts by the hash of their keys: units of folders would each
    hold groups of every part).
    """
    total = info.rows
    auto = target_rows is None
    target = auto_target_rows(total, workers) if auto else target_rows
    if target < 1:
        raise PlanError(f"unit_rows must be a positive number of rows; got {target}.")
    multiple = max(1, workers if multiple is None else multiple)
    if limit is None:
        # An automatic size is a goal, not a bound: a unit may pass it by part of a
        # leaf to keep units even, up to twice the goal (within MAX_UNIT_ROWS).
        limit = max(target, min(2 * target, MAX_UNIT_ROWS)) if auto else target
    leaves = [] if shuffle else leaves_of(info, by)
    if leaves:
        units = tuple(pack(leaves, target, multiple=multiple, limit=limit))
        return Plan("files", _known(units, info), target, total, limit, multiple)
    all_paths = tuple(sorted(f.path for f in info.files))
    if total <= target:
        # Everything fits in one unit: one task reads it all, no shuffle needed.
        unit = WorkUnit(f"u00000-{_digest(all_paths)}", all_paths, total, 1)
        return Plan("files", _known((unit,), info), target, total, limit, multiple)
    n = unit_count(total, target, multiple)
    if align > 1:
        n = aligned_count(n, align)
    base = _digest(all_paths, by, n)
    units = tuple(WorkUnit(f"s{i:05d}-{base}", (), math.ceil(total / n), 0, i) for i in range(n))
    return Plan("shuffle", units, target, total, limit, multiple)


def _known(units: tuple[WorkUnit, ...], info: DatasetInfo) -> tuple[WorkUnit, ...]:
    """``units`` with the size and version mark of each of their files (:attr:`WorkUnit.known`)."""
    marks = info.known()
    return tuple(replace(u, known=tuple(marks[p] for p in u.paths)) for u in units)
