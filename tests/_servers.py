"""Test helpers: a real S3 API on 127.0.0.1 (moto's server mode) and a real Dask cluster made of
``dask scheduler`` / ``dask worker`` processes.  Everything listens on 127.0.0.1 only, and
everything started here is stopped by its PID (or its own process group) in ``stop()``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from modelfactory.models.base import Model

#: This folder: the Dask processes get it as PYTHONPATH so they can import the models below.
TESTS_DIR = str(Path(__file__).resolve().parent)
#: The checkout these tests belong to: the Dask processes import its modelfactory.
REPO_DIR = str(Path(__file__).resolve().parent.parent)

#: Environment that keeps botocore away from any real credential chain (COMPONENTS.md).
DUMMY_AWS_ENV = {"AWS_ACCESS_KEY_ID": "dummy-key-id", "AWS_SECRET_ACCESS_KEY": "dummy-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.05):
    """Poll ``pred`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------------------
# S3: moto's ThreadedMotoServer (a real HTTP S3 API, state in this process's memory)
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def moto_with_bucket(bucket: str) -> Iterator["MotoS3"]:
    """A started :class:`MotoS3` with ``bucket`` made, dummy AWS credentials in this process's
    environment meanwhile; stopped after."""
    import pytest  # here: the Dask processes import this module for its models, pytest or not

    with pytest.MonkeyPatch.context() as mp:
        for k, v in DUMMY_AWS_ENV.items():
            mp.setenv(k, v)
        srv = MotoS3().start()
        try:
            srv.make_bucket(bucket)
            yield srv
        finally:
            srv.stop()


class MotoS3:
    """A moto S3 server on 127.0.0.1.

    ``stop()`` closes the listening socket (clients get "connection refused"), ``start()`` brings
    it back on the same port with the same buckets and objects (moto keeps its state in module
    globals of this process).  Credentials are not checked unless :meth:`require_auth` is on.
    """

    def __init__(self) -> None:
        self.port = 0
        self._srv = None
        self.key = "AKIAMF" + uuid.uuid4().hex[:14].upper()
        self.secret = "mf-secret-" + uuid.uuid4().hex

    def start(self) -> "MotoS3":
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
        from moto.server import ThreadedMotoServer

        self._srv = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._srv.start()
        host, self.port = self._srv.get_host_and_port()
        wait_for(self._up, 10, "the moto server")
        return self

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.stop()
            self._srv = None

    def _up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
            return True
        except OSError:
            return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self, **extra) -> dict:
        """What workers need to reach this server: credentials and endpoint, nothing from env."""
        return {"key": self.key, "secret": self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint}, **extra}

    def env(self) -> dict:
        """The AWS environment route to the same server (botocore >= 1.31 reads AWS_ENDPOINT_URL_S3)."""
        return {**DUMMY_AWS_ENV, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL_S3": self.endpoint}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    @contextlib.contextmanager
    def requests(self) -> Iterator[list[tuple[str, str]]]:
        """(method, path with no query) of every request the server answers meanwhile, from any
        process, as its own request log (werkzeug's) gives them: ``("GET", "/bucket/key")``."""
        seen: list[tuple[str, str]] = []

        class Log(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                m = re.search(r'"([A-Z]+) (\S+) HTTP/', re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))
                if m:
                    seen.append((m[1], urllib.parse.unquote(m[2].split("?")[0])))

        log, handler = logging.getLogger("werkzeug"), Log()
        level, others = log.level, log.handlers[:]  # (werkzeug's own prints every request to stderr)
        log.setLevel(logging.INFO)
        log.handlers[:] = [handler]
        try:
            yield seen
        finally:
            log.handlers[:] = others
            log.setLevel(level)

    def make_bucket(self, name: str) -> str:
        self.fs().mkdir(name)
        return name

    def require_auth(self, on: bool) -> None:
        """Make moto check access keys (on) or accept anything (off), through its admin API.

        With auth on, moto refuses unknown access keys (InvalidAccessKeyId).  It also computes
        wrong signatures for list requests whose query has a ``/`` (moto 5.2), so only the
        wrong-credential tests turn it on.
        """
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", method="POST",
                                     data=b"0" if on else b"inf", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=5).read()


# ---------------------------------------------------------------------------
# Dask: `dask scheduler` and `dask worker` processes over TCP on 127.0.0.1
# ---------------------------------------------------------------------------
class DaskProcesses:
    """A scheduler and ``n`` nanny-managed workers, each its own process group.

    Worker logs go to ``<folder>/<name>.log`` (tests grep them for secrets).
    """

    def __init__(self, folder: Path, workers: int = 2, env: dict | None = None,
                 scheduler_env: dict | None = None, scheduler_args: tuple[str, ...] = ()) -> None:
        self.scheduler_args = list(scheduler_args)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = workers
        self.env = env or {}
        self.scheduler_env = scheduler_env or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""

    def _spawn(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        full.update(env)
        # the code under test (this checkout), not an installed copy of it (another worktree's)
        full["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), REPO_DIR) if p)
        # tests/ is NOT on the workers' path: classes defined in test modules travel by value.
        p = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                             env=full, cwd="/", start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def start(self, timeout: float = 60) -> "DaskProcesses":
        sched_file = self.folder / "scheduler.json"
        try:
            self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(sched_file), *self.scheduler_args], self.scheduler_env)
            wait_for(lambda: sched_file.exists() and sched_file.stat().st_size > 0, timeout, "the scheduler")
            self.address = json.loads(sched_file.read_text())["address"]
            for i in range(self.n):
                self.add_worker(f"w{i}")
            with self.client() as c:
                if self.n:
                    c.wait_for_workers(self.n, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str) -> subprocess.Popen:
        return self._spawn(name, ["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                                  "--memory-limit", "2GiB", "--no-dashboard", "--name", name], self.env)

    def client(self):
        from distributed import Client

        return Client(self.address, timeout="20s")

    def worker_pids(self, client) -> dict[str, int]:
        """{worker address: PID of the worker child process} (not the nanny)."""
        return client.run(os.getpid)

    def wait_workers(self, client, n: int | None = None, timeout: float = 60) -> None:
        client.wait_for_workers(n or self.n, timeout=timeout)

    def logs(self) -> str:
        return "\n".join((self.folder / f"{name}.log").read_text(errors="replace") for name in self.procs)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left after ``grace`` s.

        Each ``dask worker`` is a nanny plus a worker child in the nanny's process group, so
        killing the group (its id is the PID we started) leaves nothing behind.
        """
        for p in self.procs.values():
            _signal_group(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for p in self.procs.values():  # the nannies' helpers (resource tracker) too
            wait_for(lambda: not group_members(p.pid), 10, f"process group {p.pid} to be gone")
        self.procs.clear()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(d))
    return out


def _unit_keys(keys) -> list[str]:
    return [k for k in map(str, keys) if k.startswith("mf-")]


def kill_if_mid_unit(dask_worker) -> bool:
    """Run on a worker (``client.run``): SIGKILL this worker process if it is executing a work
    unit and holds no finished one, i.e. no result the client may already have.  Checked and done
    on the worker's event loop, so no result is reported in between."""
    if _unit_keys(ts.key for ts in dask_worker.state.executing) and not _unit_keys(dask_worker.data.keys()):
        os.kill(os.getpid(), signal.SIGKILL)
    return False


def executing_units(dask_worker) -> int:
    """Run on a worker: how many work units it is executing (released ones included)."""
    return len(_unit_keys(ts.key for ts in dask_worker.state.executing))


def finished_units(dask_worker) -> int:
    """Run on a worker: how many finished work units it holds in memory."""
    return len(_unit_keys(dask_worker.data.keys()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# user models the Dask processes import by name (this module is on their PYTHONPATH)
# ---------------------------------------------------------------------------
#: A value that makes :class:`CrashOnMarker` kill the process fitting it.
MARKER = -999.0


class SlowMean(Model):
    """Mean and spread of a series; ``fit`` sleeps ``delay`` seconds so a run lasts a while."""

    name = "slow_mean"
    state_attrs = ("mean_", "std_")
    delay = 0.05

    def _fit(self, y, t, X) -> None:
        time.sleep(self.delay)
        self.mean_ = float(np.nanmean(y))
        self.std_ = float(np.nanstd(y)) or 1.0

    def _score(self, y, t, X) -> dict:
        z = (y - self.mean_) / self.std_
        n = len(y)
        return {"expected": np.full(n, self.mean_), "lower": np.full(n, self.mean_ - 3 * self.std_),
                "upper": np.full(n, self.mean_ + 3 * self.std_), "score": np.abs(z) / (1 + np.abs(z)),
                "is_anomaly": np.abs(z) > 3}


class SlowerMean(SlowMean):
    """SlowMean at 0.1 s per group: a run on S3 that is still going when the server stops."""

    name = "slower_mean"
    delay = 0.1


def die_on_marker(y) -> None:
    """End this process at once (as a segfault would) if the series holds ``MARKER``."""
    if np.any(y == MARKER):
        os._exit(1)


def die_on_key(key):
    """map_keys' function: this process ends at once (as a segfault would) on key 7."""
    if key == 7:
        os._exit(1)
    return key * 10


def die_on_key_rows(key):
    """:func:`die_on_key` returning a row (for map_keys with a schema)."""
    return {"v": [die_on_key(key)]}


class CrashOnMarker(SlowMean):
    """Like SlowMean, but the worker process dies (``os._exit``) on a series holding ``MARKER``."""

    name = "crash_on_marker"
    delay = 0.01

    def _fit(self, y, t, X) -> None:
        die_on_marker(y)
        super()._fit(y, t, X)


class CrashOnMarkerAtScore(SlowMean):
    """Fits like SlowMean; the worker process dies (``os._exit``) scoring a series holding ``MARKER``."""

    name = "crash_on_marker_at_score"
    delay = 0.0

    def _score(self, y, t, X) -> dict:
        die_on_marker(y)
        return super()._score(y, t, X)


class NotAScheduler:
    """A TCP server on 127.0.0.1 that accepts connections and then never answers ("silent"),
    or answers with an HTTP 400 and closes ("http400", as a dashboard's port does)."""

    def __init__(self, kind: str) -> None:
        import socket
        import threading

        self.kind, self.conns = kind, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.conns.append(conn)
            if self.kind == "http400":
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                except OSError:
                    pass
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def tagged_mean(tag: str, gate: str | None, df):
    """One row per group (``app, site, m, tag``).  With ``gate`` (a folder every process sees),
    the group of site-00000 writes ``gate/started`` and then waits (60 s at most) for
    ``gate/open``: its unit stays running on its worker while the test interrupts the job."""
    import pandas as pd

    if gate is not None and df.site.iloc[0] == "site-00000":
        Path(gate, "started").touch()
        end = time.monotonic() + 60
        while not Path(gate, "open").exists() and time.monotonic() < end:
            time.sleep(0.05)
    return pd.DataFrame({"app": [df.app.iloc[0]], "site": [df.site.iloc[0]], "m": [df.value.mean()], "tag": [tag]})
