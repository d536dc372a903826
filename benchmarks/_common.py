"""Helpers shared by the benchmarks: the machine, a grouped test dataset, tables.

Nothing here runs on a Dask worker (functions that do live in the benchmark
script itself, so they are pickled by value).
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Every benchmark measures the modelfactory of this checkout, not whatever is installed (an
# editable install may point at another clone, or none be installed): the scripts import this
# module before modelfactory, and Dask's spawned workers inherit sys.path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

__all__ = ["OTHER_BENCHMARKS", "GroupedDataset", "Timer", "busy_cpu_seconds", "fmt_int", "fmt_sec",
           "format_table", "git_revision", "load_average", "machine_info", "other_benchmarks",
           "parse_sizes", "wait_for_quiet", "wait_for_turn", "write_grouped_dataset"]


# ---------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def git_revision(path: str | None = None) -> str:
    """``<short sha>`` of the checkout holding ``path``, ``+ local changes`` if modelfactory/ differs.

    Read-only git commands only (no optional index refresh).
    """
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                             text=True, env=env, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "diff", "--quiet", "HEAD", "--", "modelfactory"],
                               check=False, capture_output=True, env=env, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + (" + local changes in modelfactory/" if dirty == 1 else "")


def machine_info(packages: Sequence[str] = ("modelfactory", "pandas", "numpy", "pyarrow", "dask",
                                            "distributed")) -> dict[str, str]:
    """What the numbers were measured on (printed above every table)."""
    mem = _mem_gib()
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{mem:.1f} GiB" if mem else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(f"{p} {_version(p)}" for p in packages),
        "modelfactory commit": git_revision(),
        "env": ", ".join(f"{k}={v}" for k, v in env.items()) or "-",
        "load": load_average(),
    }


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on a 2-core machine skews every number."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def busy_cpu_seconds() -> float:
    """CPU seconds spent by everything on the machine since boot (/proc/stat), NaN if unknown.

    The difference over a run, less the run's own CPU seconds, is what other
    processes took from the cores meanwhile.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


#: Command lines of benchmarks that should not run at the same time as another (this one too).
OTHER_BENCHMARKS = r"benchmarks/(overhead|million|quality|fit_speed|heavy|compare|skew)\b"


def _family() -> set[int]:
    """This process, its ancestors and its descendants (from /proc): never "another benchmark"."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:  # ancestors
        mine.add(pid)
        pid = parent.get(pid, 0)
    grew = True
    while grew:  # descendants
        new = {p for p, pp in parent.items() if pp in mine and p not in mine}
        mine |= new
        grew = bool(new)
    return mine


def other_benchmarks(pattern: str = OTHER_BENCHMARKS) -> list[str]:
    """Command lines of other running benchmark processes (this one, its ancestors and children excluded)."""
    mine, found, rx = _family(), [], re.compile(pattern)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and rx.search(cmd):
            found.append(f"{entry} {cmd}")
    return found


def wait_for_turn(timeout: float, *, poll: float = 15.0) -> float:
    """Wait (at most ``timeout`` s) until no other benchmark runs; seconds waited (said on stderr)."""
    t0 = time.monotonic()
    busy = other_benchmarks()
    if busy:
        print(f"[wait] another benchmark is running ({busy[0][:120]}); polling every {poll:.0f}s",
              file=sys.stderr, flush=True)
    while busy and time.monotonic() - t0 < timeout:
        time.sleep(poll)
        busy = other_benchmarks()
    waited = time.monotonic() - t0
    if waited > 1:
        print(f"[wait] waited {waited:.0f}s" + (" and gave up: running anyway" if busy else ""),
              file=sys.stderr, flush=True)
    return waited


def wait_for_quiet(max_load: float, timeout: float, *, poll: float = 5.0) -> float:
    """Wait (at most ``timeout`` s) until other processes use under ``max_load`` cores; return it.

    Measured over ``poll`` seconds from /proc/stat while this process sleeps.
    """
    deadline = time.monotonic() + timeout
    while True:
        b0, c0 = busy_cpu_seconds(), time.process_time()
        time.sleep(poll)
        used = (busy_cpu_seconds() - b0 - (time.process_time() - c0)) / poll
        if math.isnan(used) or used < max_load or time.monotonic() >= deadline:
            return used


# ---------------------------------------------------------------------------
# the data
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupedDataset:
    """A Hive-partitioned dataset on disk and the expected mean of ``value`` per group."""

    path: str
    groups: int
    rows_per_group: int
    apps: int
    expected: pd.DataFrame  # app, site, mean; sorted by app, site

    @property
    def rows(self) -> int:
        return self.groups * self.rows_per_group


def write_grouped_dataset(path: str, groups: int, *, rows_per_group: int = 48, apps: int = 100,
                          seed: int = 0) -> GroupedDataset:
    """Write ``groups`` groups (app, site) of ``rows_per_group`` hourly rows under ``path``.

    ``path/app=app-007/part-0.parquet`` holds columns ``site`` (string), ``ts``
    (timestamp) and ``value`` (float64), rows in time order (all sites of hour 0,
    then hour 1, ...), as metrics usually arrive: a group's rows are spread over
    its file, so every system has to really group.  Site names repeat across
    apps, so the key is the pair.  The expected means are computed here with
    numpy, independently of every system under test.
    """
    apps = max(1, min(apps, groups))
    per_app = np.full(apps, groups // apps)
    per_app[: groups % apps] += 1
    rng = np.random.default_rng(seed)
    start = np.datetime64("2026-01-05T00:00:00", "s")
    ts_hours = (start + np.arange(rows_per_group).astype("timedelta64[h]")).astype("datetime64[s]")
    exp_app, exp_site, exp_mean = [], [], []
    width = len(str(int(per_app.max()) - 1))
    for a in range(apps):
        n = int(per_app[a])
        app = f"app-{a:03d}"
        sites = np.array([f"site-{i:0{width}d}" for i in range(n)], dtype=object)
        level = rng.uniform(50, 500, n)
        values = level[None, :] + rng.standard_normal((rows_per_group, n)) * (0.05 * level)[None, :]
        # row r = hour r // n, site r % n (time order)
        table = pa.table({
            "site": pa.array(np.tile(sites, rows_per_group), pa.string()),
            "ts": pa.array(np.repeat(ts_hours, n), pa.timestamp("s", tz="UTC")),
            "value": pa.array(values.ravel(), pa.float64()),
        })
        folder = os.path.join(path, f"app={app}")
        os.makedirs(folder, exist_ok=True)
        pq.write_table(table, os.path.join(folder, "part-0.parquet"), compression="zstd")
        exp_app.append(np.full(n, app, dtype=object))
        exp_site.append(sites)
        exp_mean.append(values.mean(axis=0))
    expected = pd.DataFrame({"app": np.concatenate(exp_app), "site": np.concatenate(exp_site),
                             "mean": np.concatenate(exp_mean)})
    expected = expected.sort_values(["app", "site"], ignore_index=True)
    return GroupedDataset(path, groups, rows_per_group, apps, expected)


# ---------------------------------------------------------------------------
# timing and tables
# ---------------------------------------------------------------------------
class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (perf_counter)."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


def parse_sizes(text: str) -> list[int]:
    """``"10000,100000"`` or ``"10k,1m"`` -> ``[10000, 100000]`` / ``[10000, 1000000]``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1
        if part[-1] in "km":
            mult = 1_000 if part[-1] == "k" else 1_000_000
            part = part[:-1]
        n = int(float(part) * mult)
        if n < 1:
            raise ValueError(f"group counts must be positive; got {n}")
        out.append(n)
    if not out:
        raise ValueError("no group counts given")
    return out


def fmt_int(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.0f}"


def fmt_sec(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False,
                 align: str | None = None) -> str:
    """A plain-text (or Markdown) table; ``align`` is one of l/r per column (default: first l)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if markdown:
        sep = ["---:" if a == "r" else "---" for a in align]
        lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
