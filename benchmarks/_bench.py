"""Helpers shared by heavy.py, compare.py and skew.py: machine header, etiquette, timing, memory.

Nothing here runs on a Dask worker or a Spark executor: per-group functions live in the
benchmark scripts themselves (so Dask and Spark pickle them by value).
"""
from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["OTHER_BENCHMARKS", "wait_turn", "wait_quiet", "take_turn", "tree_cpu_seconds", "print_machine", "Measure", "PeakRSS", "local_cluster", "turn_taker",
           "markdown_table", "fmt_s", "fmt_n", "ratio", "write_series_dataset", "series_values"]

# the machine and the etiquette helpers are _common.py's (overhead.py uses them too)
from _common import OTHER_BENCHMARKS, _cpu_model, _family, _version, busy_cpu_seconds  # noqa: E402
from _common import other_benchmarks as others_running  # noqa: E402


# ---------------------------------------------------------------------------
# taking turns on the machine
# ---------------------------------------------------------------------------
def wait_turn(what: str = "", *, poll: float = 15.0, timeout: float = 1200.0) -> float:
    """Wait until no other benchmark runs (poll every 15 s, at most 20 min); seconds waited.

    Prints what it waited for on stderr.  After the timeout it goes ahead and says so.
    """
    t0 = time.monotonic()
    warned = False
    while True:
        busy = others_running()
        if not busy:
            break
        if not warned:
            print(f"[wait] {what}: another benchmark is running ({busy[0][:120]}); polling every "
                  f"{poll:.0f}s", file=sys.stderr, flush=True)
            warned = True
        if time.monotonic() - t0 > timeout:
            print(f"[wait] gave up waiting after {timeout:.0f}s; running anyway", file=sys.stderr, flush=True)
            break
        time.sleep(poll)
    waited = time.monotonic() - t0
    if warned:
        print(f"[wait] {what}: waited {waited:.0f}s", file=sys.stderr, flush=True)
    return waited


def print_machine(title: str, argv: Sequence[str], packages: Sequence[str],
                  extra: dict[str, str] | None = None) -> None:
    """The Markdown header every script prints: machine, versions, date, command."""
    vm = psutil.virtual_memory()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"## {title}\n")
    print(f"- date: {_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"- machine: {_cpu_model()}, {os.cpu_count()} cores, {vm.total / 2**30:.1f} GiB, "
          f"{platform.system()} {platform.release()}")
    print(f"- python {platform.python_version()}; " + ", ".join(f"{p} {_version(p)}" for p in packages))
    for k, v in (extra or {}).items():
        print(f"- {k}: {v}")
    print(f"- modelfactory code: {_code_version()}")
    print(f"- load average at start: {load}")
    script = "benchmarks/" + os.path.basename(sys.argv[0])
    print(f"- command: python {' '.join([script, *argv])}")
    print(flush=True)


def _code_version() -> str:
    """The commit of the work tree, and whether modelfactory/ differs from it (read-only git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = ["git", "--no-optional-locks", "-C", root]
    try:
        head = subprocess.run([*git, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              check=False).stdout.strip()
        dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "modelfactory"], check=False).returncode
    except OSError:
        return "unknown (no git)"
    return f"commit {head[:70]}" + (" + uncommitted changes in modelfactory/" if dirty else "")


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants (alive, plus those already reaped)."""
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
            # children_*: workers that a descendant forked and reaped (Spark's Python workers)
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


def _others_cpu(mine: set[int]) -> dict[int, float]:
    """CPU seconds (own + reaped children) of every process outside ``mine``, by pid."""
    out = {}
    for p in psutil.process_iter(["pid"]):
        if p.pid in mine:
            continue
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return out


class Measure:
    """Wall seconds of a block; CPU of our process tree; cores other processes took meanwhile.

    ``cpu`` = CPU seconds of this process and its descendants (Dask workers, the Spark JVM and
    its Python workers, subprocesses); ``others`` = cores' worth of CPU used during the block by
    processes outside our tree (summed per process, so our own workers coming and going do not
    count).  On a 2-core machine, others above ~0.2 inflate the wall time of that row.
    """

    def __enter__(self) -> "Measure":
        self._o0 = _others_cpu(_family())
        self._c0 = tree_cpu_seconds()
        self._t0 = time.perf_counter()
        self.seconds = self.cpu = self.others = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.cpu = tree_cpu_seconds() - self._c0
        o1 = _others_cpu(_family())
        used = sum(v - self._o0.get(pid, 0.0) for pid, v in o1.items())
        self.others = max(0.0, used) / max(self.seconds, 1e-9)


def wait_quiet(max_cores: float, timeout: float, poll: float = 5.0) -> float:
    """Wait (at most ``timeout`` s) until processes outside our tree use < ``max_cores``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        b0, c0 = busy_cpu_seconds(), tree_cpu_seconds()
        time.sleep(poll)
        used = max(0.0, busy_cpu_seconds() - b0 - (tree_cpu_seconds() - c0)) / poll
        if used < max_cores or time.monotonic() >= deadline:
            return used


def take_turn(what: str, quiet: float | None = 0.3, quiet_timeout: float = 120.0) -> None:
    """Before a timed block: no other benchmark running (etiquette), then a quiet machine if asked."""
    wait_turn(what)
    if quiet is not None:
        used = wait_quiet(quiet, quiet_timeout)
        if used >= quiet:
            print(f"[quiet] {what}: other processes still use {used:.2f} cores after "
                  f"{quiet_timeout:.0f}s; timing anyway", file=sys.stderr, flush=True)


def turn_taker(args) -> functools.partial:
    """``take_turn`` with a script's ``--quiet`` / ``--quiet-timeout`` settings (``--quiet``
    defaults to 0.3 cores, or to -1, no waiting for quiet, with ``--quick``); sets ``args.quiet``."""
    if args.quiet is None:
        args.quiet = -1.0 if args.quick else 0.3
    return functools.partial(take_turn, quiet=None if args.quiet < 0 else args.quiet,
                             quiet_timeout=args.quiet_timeout)


class PeakRSS:
    """Peak resident memory of this process and all its children, sampled in a thread."""

    def __init__(self, every: float = 0.1) -> None:
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def local_cluster(workers: int = 2):
    """The LocalCluster modelfactory makes for a job (``modelfactory.run.local_cluster``:
    single-threaded workers, one BLAS thread, Dask's worker profiler off), with ``workers``
    workers and quiet logs, and its Client.  Every Dask system of a benchmark shares it."""
    import logging
    import warnings

    from distributed import Client

    from modelfactory.run import local_cluster as mf_local_cluster

    warnings.filterwarnings("ignore", category=UserWarning, module="distributed")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    lc = mf_local_cluster(workers, dashboard_address=None)
    return lc, Client(lc)


# ---------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_s(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_n(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}"


def ratio(x: float) -> str:
    return "-" if x != x else (f"{x:.2f}x" if x < 100 else f"{x:,.0f}x")


# ---------------------------------------------------------------------------
# data: hourly series, Hive-partitioned by app
# ---------------------------------------------------------------------------
def series_values(n_series: int, length: int, season: int, seed: int = 0) -> np.ndarray:
    """Hourly-like series (level, trend, a daily cycle, a random walk, noise), shape (n, length).

    fit_speed.py, heavy.py and compare.py all use it, so their ETS numbers are comparable.
    """
    rng = np.random.default_rng(seed)
    i = np.arange(length)
    level = rng.uniform(50, 500, (n_series, 1))
    amp = rng.uniform(0.05, 0.4, (n_series, 1)) * level
    noise = rng.uniform(0.01, 0.06, (n_series, 1)) * level
    return (level + rng.uniform(-0.002, 0.002, (n_series, 1)) * level * i
            + amp * np.sin(2 * np.pi * i / season + rng.uniform(0, 2 * np.pi, (n_series, 1)))
            + noise * rng.standard_normal((n_series, length))
            + np.cumsum(rng.normal(0, 1, (n_series, length)) * 0.3 * noise, axis=1))


def write_series_dataset(path: str, Y: np.ndarray, apps: int) -> None:
    """Write the series (rows of ``Y``) hourly under ``path/app=app-XXX/part-0.parquet``.

    Columns site (string), ts (timestamp[s, UTC]), value; each series' rows contiguous and
    in time order (as modelfactory's demo and million.py write them).
    """
    n, length = Y.shape
    per = np.full(apps, n // apps)
    per[: n % apps] += 1
    start = np.datetime64("2026-01-05T00:00:00", "s")
    ts = start + np.arange(length).astype("timedelta64[h]").astype("timedelta64[s]")
    k = 0
    for a in range(apps):
        m = int(per[a])
        sites = np.array([f"site-{k + j:05d}" for j in range(m)], dtype=object)
        table = pa.table({
            "site": pa.array(np.repeat(sites, length), pa.string()),
            "ts": pa.array(np.tile(ts, m), pa.timestamp("s", tz="UTC")),
            "value": pa.array(Y[k:k + m].ravel(), pa.float64()),
        })
        folder = os.path.join(path, f"app=app-{a:03d}")
        os.makedirs(folder, exist_ok=True)
        pq.write_table(table, os.path.join(folder, "part-0.parquet"), compression="zstd")
        k += m
