"""Open or attach to a Dask cluster, submit work units to the kernel, gather summaries.

``cluster`` may be:

- ``None`` or ``"local"``: a LocalCluster made for the job (one single-threaded
  worker process per CPU it may use) and closed after it;
- ``"inline"``: no Dask at all, units run one after another in this process
  (tests, debugging with pdb);
- ``"kube"``: an (adaptive) dask-kubernetes KubeCluster made for the job from the
  settings (:mod:`modelfactory.config`, :mod:`modelfactory.kube`), closed after it;
- a scheduler address (``"tcp://host:8786"``), a :class:`distributed.Client`,
  or a cluster object (anything with ``scheduler_address``): attached to,
  never closed.

Only what the library created is closed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import functools

import numpy as np
import pandas as pd
import pyarrow as pa

from . import kernel
from .config import Settings, load_settings
from .dataset import DatasetInfo
from .exceptions import ClusterError, StoreError
from .kernel import JobSpec, UnitResult
from .plan import Plan

__all__ = ["open_client", "local_cluster", "check_scheduler", "check_code", "dask_log_level", "execute", "execute_delayed",
           "task_slots", "watch_workers", "Progress", "run_units", "run_shuffled", "isolate", "isolate_keys", "isolate_partitions",
           "drop_unit_files"]

log = logging.getLogger(__name__)

#: Environment every worker process starts with: one BLAS/OpenMP thread.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: Dask settings of the workers of a cluster modelfactory makes.  A unit is one long
#: task running thousands of groups in Python, and anything else a worker does
#: meanwhile takes the GIL from it:
#:
#: * Dask's statistical profiler interrupts the task every 10 ms to walk its stack; the
#:   picture says little (the group table's seconds say more); off: 1-3 % of a
#:   pandas-function run.
#: * The event loop wakes 50 times a second to time itself (``tick``: it warns when
#:   blocked for 3 s, which a 1 s tick still sees) and 10 times to read the process's
#:   memory; each wake-up makes the task hand over the GIL.  Once a second each: another
#:   3-5 % (interleaved A/B on fresh clusters, 3 rounds).  Memory limits are still
#:   enforced, checked every second instead of every 0.1 s.
#:
#: Pass your own cluster to keep Dask's defaults.
WORKER_DASK_CONFIG = {"distributed.worker.profile.enabled": False,
                      "distributed.admin.tick.interval": "1s",
                      "distributed.worker.memory.monitor-interval": "1s"}


def dask_config_env(config: dict) -> dict[str, str]:
    """``config`` as the ``DASK_*`` environment variables Dask reads at start-up (for pods).

    >>> dask_config_env({"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s"})
    {'DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED': 'False', 'DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL': "'1s'"}
    """
    return {"DASK_" + k.upper().replace(".", "__").replace("-", "_"): repr(v) for k, v in config.items()}


#: Level below which the log lines of Dask itself are kept off the console in the processes
#: of a cluster modelfactory makes (LocalCluster's ``silence_logs``); see :func:`dask_log_level`.
#: ERROR for the library: no INFO ("Start worker", ...) or WARNING lines, but Dask's own
#: errors still show (a task's, "Compute Failed", is also raised by the job itself).
_dask_log_level = logging.ERROR


@contextlib.contextmanager
def dask_log_level(level: int) -> Iterator[None]:
    """Within this block, the clusters modelfactory makes (:func:`local_cluster`) show Dask's
    own log lines from ``level`` up only (``logging.CRITICAL``: practically none; the CLI's
    choice without ``-v``).  Dask's log lines of this process follow its logging set-up."""
    global _dask_log_level
    old, _dask_log_level = _dask_log_level, level
    try:
        yield
    finally:
        _dask_log_level = old


def _with_quiet_close() -> dict:
    """The worker preloads configured, plus the one that keeps a shutdown race of Dask's
    heartbeat (logged with two tracebacks after a job that went well) off the console; and
    the preloads' arguments, one list per preload (ours takes none): Dask refuses a
    ``preload-argv`` list of lists that does not pair up with ``preload`` (the nannies did not
    start when the configured preloads had arguments of their own)."""
    import dask

    preload = dask.config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.worker.preload-argv", None) or []
    if argv and isinstance(argv[0], str):  # one argument list for every preload, as Dask reads it
        argv = [list(argv)] * len(preload)
    elif not argv:
        argv = [[]] * len(preload)
    return {"distributed.worker.preload": [*preload, "modelfactory._quiet_close"],
            "distributed.worker.preload-argv": [*argv, []]}


#: Seconds between two looks for worker processes a local cluster lost for good (:func:`_workers_kept`).
LOST_WORKER_CHECK_SECONDS = 2.0


def _workers_kept(lc) -> contextlib.AbstractContextManager[None]:
    """While inside, start again the workers of the LocalCluster ``lc`` that it closed for good.

    A LocalCluster closes the nanny of a worker that has been gone from the scheduler for
    ``distributed.deploy.lost-worker-timeout`` (15 s), and starts no other in its place.  A group
    that kills its worker again and again (as the isolation of a unit that kills its workers runs
    it) keeps the nanny restarting its worker, and on a loaded machine a restart could take that
    long: one nanny after the other was closed, and the job waited for ever for a worker (4 runs
    in 6 in a trial).  The cluster still lists them among the workers it should have
    (``worker_spec``); scaling it to that number starts them again."""

    said: set = set()

    def restore() -> None:  # in the cluster's event loop, where its worker tables change
        lost = set(lc.worker_spec) - set(lc.workers)
        if not lost or lc.status.name != "running":
            said.clear()
            return
        if lost - said:  # said once a loss: the next looks may come while the worker starts
            log.warning("the local Dask cluster closed %d worker process(es) it had lost (a group that kills "
                        "its worker, again and again?): starting them again", len(lost - said))
        said.clear()
        said.update(lost)
        lc.scale(len(lc.worker_spec))

    def check(stop: threading.Event) -> bool:
        if not stop.is_set():
            try:
                lc.loop.add_callback(restore)
            except RuntimeError:  # its loop has closed
                return False
        return True

    return _every(LOST_WORKER_CHECK_SECONDS, check, "modelfactory-keep-workers")


def default_workers() -> int:
    """Worker processes of a LocalCluster made without ``workers=``: one per CPU this process may
    use (Dask's count, which honours CPU affinity and a container's CPU quota, as ``os.cpu_count()``
    does not: a pod limited to 2 CPUs on a 64-core node would start 64 workers, each with a 64th of
    the memory)."""
    from dask.system import CPU_COUNT

    return max(1, CPU_COUNT)


def local_cluster(workers: int | None = None, **kwargs):
    """The LocalCluster a job makes when it is given none: ``workers`` single-threaded
    worker processes (default: :func:`default_workers`), one BLAS/OpenMP thread each, Dask's worker
    profiler off and its event loop quieter (:data:`WORKER_DASK_CONFIG`), dashboard on a
    free port, quiet logs (ERROR and up: :func:`dask_log_level`).

    Other keyword arguments go to :class:`distributed.LocalCluster`, over those defaults
    (``n_workers=workers``, ``threads_per_worker=1``, ``processes=True``): this is how a local
    cluster gets more threads or a memory limit per worker, which no setting gives (the
    ``kube.threads`` and ``kube.resources`` settings are for Kubernetes pods only).  ``config=``
    is a dict of Dask config set while the cluster starts, for its workers.  Pass the cluster as
    ``cluster=``; a job does not close a cluster it did not make:

    >>> with local_cluster(2, threads_per_worker=4, memory_limit="4GiB") as c:  # doctest: +SKIP
    ...     modelfactory.train(..., cluster=c)
    """
    import copy

    import dask
    from distributed import LocalCluster

    n = workers or default_workers()
    kwargs = {"dashboard_address": ":0", "silence_logs": _dask_log_level, **kwargs}
    with dask.config.set(WORKER_DASK_CONFIG), dask.config.set(kwargs.pop("config", None) or {}), \
            dask.config.set(_with_quiet_close()):
        # Each nanny hands its config to every worker it starts, restarts too.  It keeps a
        # shallow copy of the global config, whose nested dicts ``config.set`` restores in
        # place on leaving this block: without a deep copy of its own, a restarted worker
        # (after a crash, or Client.restart) would run with Dask's defaults again.
        config = copy.deepcopy(dask.config.config)
        # A nanny sets its workers' start-up variables (MALLOC_TRIM_THRESHOLD_, PYTHONHASHSEED,
        # one of its own) in this process's environment before starting them; put it back
        # after, so that what this process starts later (a Spark session, a subprocess, another
        # Dask cluster) starts as it would have.
        saved = dict(os.environ)
        try:
            with _ctrl_c_for_this_process_only() as started:
                # the caller's own keywords go on top (threads_per_worker=2 was a TypeError)
                return started(LocalCluster(**{"n_workers": n, "threads_per_worker": 1, "processes": True,
                                               "env": WORKER_ENV, "config": config, **kwargs}))
        finally:
            for k in set(os.environ) - set(saved):
                del os.environ[k]
            os.environ.update({k: v for k, v in saved.items() if os.environ.get(k) != v})


@contextlib.contextmanager
def _ctrl_c_for_this_process_only() -> Iterator[Callable]:
    """Start a local cluster so that Ctrl-C reaches this process and not its workers.

    A terminal's Ctrl-C goes to every process of its foreground group, and Dask's worker
    processes are in it: each died with two tracebacks on the console (or, still starting,
    with "Fatal Python error: init_import_site"), over the one ``error: interrupted`` line.
    So SIGINT is blocked in this thread while the cluster starts: the cluster's event-loop
    thread, made meanwhile, inherits the block, and so do the threads it starts worker
    processes from (restarts too), and those processes (a signal mask survives fork and
    exec).  The workers still stop when the job closes its cluster, which it does on Ctrl-C.

    A Ctrl-C pressed while the cluster starts is held until it is up (a second or two), then
    delivered to the caller's handler; if that raises (Python's raises KeyboardInterrupt), the
    cluster is closed first (``started(cluster)`` returns it otherwise): raised inside Dask's
    start-up it left a half-made cluster, which Dask's exit hook closed with a page of log lines
    or an AssertionError.  (Blocking is not enough for that: a signal that another thread takes,
    or one taken just before, is run by Python in this thread all the same; so a handler that
    only notes it stands in meanwhile.)  Once up, each worker takes SIGINT with a handler that
    does nothing (``modelfactory._quiet_close``): the processes its code starts get SIGINT as
    usual, since exec resets a handler but not a block.
    """
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (nor process groups)
        yield lambda cluster: cluster
        return
    from multiprocessing import resource_tracker

    # Started by the first worker process otherwise, in the event-loop thread, and its start
    # unblocks SIGINT there after (the standard library's own block and unblock around it);
    # here it would unblock it in this thread, which the caller may have blocked on purpose
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    pressed: list = []
    handler = signal.getsignal(signal.SIGINT)
    hold = threading.current_thread() is threading.main_thread() and callable(handler)
    if hold:
        signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    old = None

    def release():
        nonlocal old, hold
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # one pressed meanwhile is noted now
            old = None
        if hold:
            signal.signal(signal.SIGINT, handler)
            hold = False

    def started(cluster):
        release()
        if pressed:  # delivered now to the caller's own handler (Python's raises KeyboardInterrupt)
            try:
                signal.raise_signal(signal.SIGINT)
            except BaseException:
                with _ctrl_c_held_while_closing(deliver=False) as hold:  # pressed again: the close goes on
                    hold()
                    cluster.close()
                raise
        return cluster

    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield started
    finally:
        release()  # when the cluster did not start: its error goes on, and a Ctrl-C with it is moot


@contextlib.contextmanager
def _ctrl_c_held_while_closing(deliver: bool = True) -> Iterator[Callable[[], None]]:
    """Yield ``hold()``, to call as the job's block ends: from then until this block ends, the
    cluster and client closing meanwhile, a Ctrl-C is held instead of raised.

    A user presses Ctrl-C again while the first one's close runs (a second or so): raised there,
    it broke off the close, so Dask's exit hook closed the cluster later (10 s more, and INFO lines
    on the console) and the first Ctrl-C's message (which run to resume) was lost; a KubeCluster
    left its pods.  A Ctrl-C held while the block ends with a KeyboardInterrupt (the first
    Ctrl-C's) is dropped; otherwise it is delivered to the caller's handler once the close is done
    (unless ``deliver`` is false).  A third press during the close stops holding, and raises: a
    close that hangs can still be broken off, and a double press is held wherever it lands.
    A SIGTERM that the program handles in Python (the CLI takes it as a Ctrl-C) is held alike."""
    import signal

    pressed: list = []
    handlers: dict = {}  # signal -> the caller's handler, while held

    def held(signum, frame):
        pressed.append(signum)
        if len(pressed) > 2:  # pressed again and again: the user means it, now (and once)
            pressed.clear()
            release()
            signal.raise_signal(signum)

    def hold() -> None:
        if handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(sig)
            if callable(current) and (sig == signal.SIGINT or current is not signal.default_int_handler):
                handlers[sig] = current
                signal.signal(sig, held)

    def release() -> None:
        for sig, handler in list(handlers.items()):
            if signal.getsignal(sig) is held:
                signal.signal(sig, handler)
            del handlers[sig]

    try:
        yield hold
    except BaseException as err:
        release()
        if pressed and deliver and not isinstance(err, KeyboardInterrupt):
            signal.raise_signal(pressed[0])  # the caller's handler, over a job's own error
        raise
    release()
    if pressed and deliver:  # the job went well and its cluster is closed: now the caller's handler
        signal.raise_signal(pressed[0])


@contextlib.contextmanager
def open_client(cluster=None, *, workers: int | None = None, settings=None) -> Iterator:
    """Yield a :class:`distributed.Client` (or None for ``"inline"``) for the job.

    ``cluster`` left as None (or a name) falls back to the layered settings
    (argument > ``MODELFACTORY_*`` environment > config file > defaults).
    """
    if cluster is None or isinstance(cluster, str):
        if settings is None:
            settings = load_settings({"cluster": cluster, "workers": workers})
        cluster, workers = settings.cluster, settings.workers
    if (settings is not None and settings.workers is not None and settings.sources.get("workers") == "argument"
            and not (cluster is None or cluster in ("local", "kube"))):  # it was taken without a word
        log.warning("workers=%d (--workers) is for the cluster a job makes (local or kube), and is not used: %s",
                    settings.workers, "cluster='inline' runs every unit in this process" if cluster == "inline"
                    else "a cluster given by its address, client or object has workers of its own")
    if cluster == "inline":
        yield None
        return
    from distributed import Client

    if cluster is None or cluster == "local":
        try:
            lc = local_cluster(workers)
        except Exception as err:  # noqa: BLE001 - surfaced with context
            n = workers or default_workers()
            raise ClusterError(f"Could not start a local Dask cluster with {n} workers: {str(err).rstrip('.')}. "
                               "If this runs from a script, put the code under `if __name__ == \"__main__\":` "
                               "(Dask starts its worker processes by re-importing the script).") from err
        with _ctrl_c_held_while_closing() as hold, lc, Client(lc) as client, _workers_kept(lc):
            try:
                yield client
            finally:
                hold()
        return
    if cluster == "kube":
        from .kube import kube_cluster

        with _ctrl_c_held_while_closing() as hold, kube_cluster(settings) as kc, Client(kc) as client:
            try:
                yield client
            finally:
                hold()
        return
    if isinstance(cluster, Client):
        if cluster.status in ("closing", "closed"):  # (a notebook's cell run again after its close cell)
            raise ClusterError("The Client passed as cluster= is closed: make a new one "
                               "(distributed.Client(...)), or leave cluster= out for a LocalCluster of the job's own.")
        yield cluster
        return
    if isinstance(cluster, str):
        if "://" not in cluster and ":" not in cluster:
            raise ClusterError(f"cluster={cluster!r} is not 'local', 'inline' or a scheduler address "
                               "like 'tcp://10.0.0.5:8786'.")
        check_scheduler(cluster, settings.connect_timeout)  # an address comes from the settings (above)
        import warnings

        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                client = Client(cluster, timeout=f"{settings.connect_timeout}s")
        except (OSError, TimeoutError) as err:
            raise ClusterError(f"Cannot reach the Dask scheduler at {cluster!r}: {err}. "
                               "Check the address and that the scheduler is running.") from err
        try:
            _say_mismatched_versions(cluster, said)
        except Exception as err:  # noqa: BLE001 - a warning replayed under an "error" filter: not before the close
            log.debug("version warnings: %s", err)
        # a Ctrl-C pressed again while the client closes is held, as for a cluster the job made
        # (it broke the close off: two chained tracebacks)
        with _ctrl_c_held_while_closing() as hold, client:
            try:
                yield client
            finally:
                hold()
        return
    if hasattr(cluster, "scheduler_address"):
        if str(getattr(cluster, "status", "")).split(".")[-1].lower() in ("closing", "closed"):
            raise ClusterError(f"The {type(cluster).__name__} passed as cluster= is closed: make a new one, or leave "
                               "cluster= out for a LocalCluster of the job's own.")
        with _ctrl_c_held_while_closing() as hold, Client(cluster) as client:
            try:
                yield client
            finally:
                hold()
        return
    raise ClusterError(f"cluster must be None, 'local', 'inline', an address, a Client or a cluster "
                       f"object; got {type(cluster).__name__}.")


def _module_of(name: str) -> str:
    """The module of a digest's name (``mymod.M._score``: ``mymod``, not ``mymod.M``): its longest
    prefix that this process has imported as a module."""
    import sys

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in sys.modules:
            return ".".join(parts[:i])
    return name.rsplit(".", 1)[0]


def _say_mismatched_versions(address: str, said: list) -> None:
    """Dask's warning that the client, scheduler and workers run other versions of some
    packages, as one line (its table reached the CLI's console only with -v): an existing
    cluster with mixed packages is a common cause of odd failures."""
    import warnings

    from distributed.versions import VersionMismatchWarning

    for w in said:
        if not issubclass(w.category, VersionMismatchWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours: as it was
            continue
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in str(w.message).splitlines()
                if line.startswith("|")]
        if len(rows) < 2:
            log.warning("the Dask cluster at %s runs other versions of some packages than this client: %s",
                        address, " ".join(str(w.message).split()))
            continue
        head, body = rows[0], rows[1:]
        shown = "; ".join(f"{r[0]} " + ", ".join(f"{h.lower()} {v}" for h, v in zip(head[1:], r[1:]))
                          for r in body)
        log.warning("the Dask cluster at %s runs other versions of some packages than this client (%s): a common "
                    "cause of odd failures; install the same versions everywhere", address, shown)


#: Seconds to reach a scheduler given by its address (and to get its first answer): the default
#: of the ``connect_timeout`` setting, which jobs use.
CONNECT_TIMEOUT = Settings.connect_timeout

_CHECK_ADDRESS = ("Check that it is the address of a Dask scheduler, such as tcp://host:8786 "
                  "(the one `dask scheduler` prints), not that of its dashboard or another service.")


def check_scheduler(address: str, timeout: float | None = None) -> None:
    """Raise :class:`ClusterError` unless a Dask scheduler answers at ``address`` within
    about ``timeout`` seconds (default :data:`CONNECT_TIMEOUT`).

    ``distributed.Client`` waits for ever for a server that accepts the connection but
    never answers, and fails with odd errors (a MemoryError) against one that answers in
    another protocol (a dashboard's HTTP port).  This connects with distributed's own
    comms, bounded: the handshake and one ``identity`` round trip, in a short-lived thread
    with its own event loop (the caller's thread may run one already: a notebook).
    Refused connections are retried until ``timeout``, as the Client does.
    """
    import asyncio
    import threading

    from distributed.comm import connect
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.core import CommClosedError, FatalCommClosedError
    from distributed.comm.registry import get_backend
    from distributed.security import Security

    scheme, loc = parse_address(address)
    try:
        get_backend(scheme)
    except ValueError as err:
        from distributed.comm.registry import backends

        known = ", ".join(f"{k}://" for k in sorted(backends))
        raise ClusterError(f"{address!r} is not a Dask scheduler address: Dask has no {scheme}:// comms "
                           f"(it has {known}). {_CHECK_ADDRESS}") from err
    if scheme not in ("tcp", "tls", "ws", "wss"):
        return  # in-process and other comms: left to the Client
    try:
        host, port = parse_host_port(loc)
    except ValueError as err:
        raise ClusterError(f"{address!r} is not a valid Dask scheduler address ({err}). {_CHECK_ADDRESS}") from err
    # known at once, where the connect retried them for the whole timeout, then said "Timed out"
    if not 0 < int(port) < 65536:
        raise ClusterError(f"{address!r} is not a valid Dask scheduler address: port {port} is not between 1 and "
                           f"65535. {_CHECK_ADDRESS}")
    import socket

    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ClusterError(f"Cannot reach the Dask scheduler at {address!r}: the host {host!r} is not known "
                           f"({err.strerror}). {_CHECK_ADDRESS}") from err
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    args = Security().get_connection_args("client")  # as the Client's own
    if scheme == "tls" and args.get("ssl_context") is None:  # Dask's own error: "TLS expects a `ssl_context`"
        raise ClusterError(f"{address!r} is a TLS address, and Dask's TLS settings are not set: set "
                           "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and .client.key in "
                           "Dask's config (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._TLS__CLIENT__CERT, "
                           "..._TLS__CLIENT__KEY), or pass cluster=Client(address, security=Security(...)).")
    stage = ["connect"]

    async def probe() -> dict:
        comm = await connect(address, timeout=timeout, **args)  # TCP (retried), then handshake
        stage[0] = "identity"
        try:
            await comm.write({"op": "identity", "reply": True, "close": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded() -> dict:
        # connect() gives up on unreachable addresses after ``timeout`` by itself (with its
        # reason); the margin lets it, so that a time-out here means "connected, no answer"
        return await asyncio.wait_for(probe(), timeout + 1)

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["identity"] = asyncio.run(bounded())
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"modelfactory-check-scheduler-{address}", daemon=True)
    thread.start()
    thread.join(min(1.0, timeout))
    if thread.is_alive():  # a mistyped port said nothing for the whole wait (20 s by default)
        log.warning("no answer yet from %s: waiting up to %g s for a Dask scheduler there (the connect_timeout "
                    "setting)", address, timeout)
    thread.join(timeout + 10)
    if thread.is_alive():  # cannot happen (the loop is bounded); never hang the caller anyway
        raise ClusterError(f"No answer from {address!r} within {timeout:g} s. {_CHECK_ADDRESS}")
    err = outcome.get("error")
    if isinstance(err, TimeoutError):  # asyncio's too
        what = "sent no Dask handshake" if stage[0] == "connect" else "did not answer Dask's identity request"
        raise ClusterError(f"The server at {address!r} accepted the connection but {what} within the {timeout:g} s connect timeout. "
                           f"{_CHECK_ADDRESS}") from None  # (Dask's chain of 100+ lines above it, in a notebook)
    if isinstance(err, FatalCommClosedError) or (isinstance(err, OSError) and not isinstance(err, CommClosedError)):
        try:  # why, in a word: Dask's error says "Timed out trying to connect" whatever the cause
            socket.create_connection((host, int(port)), timeout=2).close()
            why = str(err)
        except ConnectionRefusedError:
            why = f"nothing listens at {host}:{port} (connection refused for {timeout:g} s)"
        except OSError:
            why = str(err)
        raise ClusterError(f"Cannot reach the Dask scheduler at {address!r}: {why}. "
                           "Check the address and that the scheduler is running.") from None  # (the reason is in it)
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        raise err
    if err is not None:  # closed on us, or bytes that are not Dask's protocol (an HTTP reply...)
        what = ("it closed the connection without one" if isinstance(err, CommClosedError)
                else "its reply is not in Dask's protocol; an HTTP server, such as the dashboard, answers so")
        raise ClusterError(f"The server at {address!r} did not answer with a Dask handshake ({what}). "
                           f"{_CHECK_ADDRESS}") from err
    identity = outcome.get("identity")
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind in ("Worker", "Nanny"):
        raise ClusterError(f"{address!r} is the address of a Dask {kind.lower()}, not of the scheduler. "
                           f"{_CHECK_ADDRESS}")
    if not isinstance(identity, dict):
        raise ClusterError(f"The server at {address!r} did not answer as a Dask scheduler does "
                           f"(identity: {identity!r:.80}). {_CHECK_ADDRESS}")


def check_code(client, spec: JobSpec, models: tuple[str, list[str]] | None = None,
               scored_model: str | None = None) -> None:
    """Raise :class:`ClusterError` unless every worker can load the code of ``spec`` (its
    function, its model class) and holds the same version of it, and the scheduler and every
    worker run this modelfactory.  ``models``: (run id, what its models import by name, as
    ``module:Qual.Name``) for a job that loads a run's pickled user models (score): every process
    that runs its units must import those too (this one, when there is no client).

    A user function or model class travels by reference to its module (cloudpickle, as Dask
    sends it), so that module must be importable on the workers.  Without this check, a worker
    lacking it was shut down by Dask on receiving a unit (every worker in turn), the run then
    waiting for ever for one.  The scheduler needs no user code: it never loads a spec's
    (:meth:`JobSpec.__reduce__` ships it as bytes that only a unit's task loads), so a
    scheduler image without the user's module is fine.  A job on ``memory://`` storage with
    workers in other processes is refused first (:func:`_check_in_process_storage`).
    """
    if client is None:  # units run in this process
        from .store import import_problem

        problem = import_problem(models[1]) if models else None
        if problem:
            raise StoreError(f"This process cannot load the models of run {models[0]!r}: "
                             f"{_unloadable(*problem, 'here')}. " + (_renamed_fix(*problem) or
                             "Install that module (and what it imports), or put it on PYTHONPATH. Nothing ran."))
        return
    _check_in_process_storage(client, spec)
    import cloudpickle

    from . import __version__

    def probe(blob: bytes | None, imports: list | None = None, package: str | None = None) -> tuple:
        # defined here, so it travels by value: it runs on a cluster whose modelfactory
        # differs from this one (or that has none), to say so.  Answers (version, why the
        # code does not load, its digests, why a run's models do not load, why the model's
        # optional package does not import).
        import importlib
        import pickle

        try:
            import modelfactory
            version = modelfactory.__version__
        except Exception:  # noqa: BLE001
            version = None
        if blob is None:  # the scheduler: its modelfactory only
            return version, None, {}, None, None
        try:
            loaded = pickle.loads(blob)
        except Exception as err:  # noqa: BLE001 - reported to the client, by name
            return version, f"{type(err).__name__}: {err}", {}, None, None
        try:  # by name: a worker with another modelfactory (reported above) may not have it
            from modelfactory.store import import_problem

            unloadable = import_problem(imports) if imports else None
        except Exception:  # noqa: BLE001
            unloadable = None
        missing = None
        if package:  # a built-in model imports it only when it fits: every group would fail on it
            try:
                importlib.import_module(package)
            except Exception as err:  # noqa: BLE001
                missing = f"{type(err).__name__}: {err}"
        try:
            from modelfactory.kernel import code_digests

            return version, None, code_digests(*loaded), unloadable, missing
        except Exception:  # noqa: BLE001 - a check, never a reason to fail
            return version, None, {}, unloadable, missing

    # the job's own code only (its function, its model): not the whole spec, whose dataset and
    # model index grow with the input (a score of a million groups)
    code_of = (spec.func, spec.model)
    blob = cloudpickle.dumps(code_of)
    answers = {"the scheduler": client.run_on_scheduler(probe, None)}
    imports = models[1] if models else None
    from .models import optional_package

    # (scored_model: the built-in model a score job's run holds, whose package scoring may need too)
    needs = (optional_package(spec.model.name) if spec.model is not None and spec.model.serializer == "native"
             else optional_package(scored_model, scoring=True) if scored_model else None)
    for address, got in sorted(client.run(probe, blob, imports, needs and needs[0], on_error="ignore").items()):
        answers[f"the worker at {address}"] = got

    def first(problems: dict) -> str:
        where = next(iter(problems))
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{where[0].upper()}{where[1:]}{more}"

    other = {w: v for w, (v, *_) in answers.items() if v != __version__}
    if other:
        version = next(iter(other.values()))
        raise ClusterError(
            f"{first(other)} runs {'modelfactory ' + version if version else 'no modelfactory'}, this client "
            f"modelfactory {__version__}: install the same version on the client, the Dask scheduler and every "
            "worker (units are written and read by both sides). Nothing ran.")
    problems = {w: why for w, (_, why, *_) in answers.items() if why}
    if problems:
        raise ClusterError(
            f"{first(problems)} cannot load this job's code: {next(iter(problems.values())).rstrip('.')}. A function or model "
            "class goes to the Dask workers by the name of its module: install that module (and what it imports) "
            "where they run, or put it on their PYTHONPATH, and restart them after changing it; or send it by "
            "value with cloudpickle.register_pickle_by_value(module). Nothing ran.")
    missing = {w: a[4] for w, a in answers.items() if len(a) > 4 and a[4]}
    if missing:
        raise ClusterError(
            f"{first(missing)} cannot import {needs[0]}, which the model "
            f"{spec.model.name if spec.model is not None else scored_model!r} needs to "
            f"{'fit' if spec.model is not None else 'score'} "
            f"({next(iter(missing.values()))}): every group would fail on it. Install it where the Dask workers "
            f"run ({needs[1].split(': ', 1)[-1]}), and restart them. Nothing ran.")
    unloadable = {w: a[3] for w, a in answers.items() if a[3]}
    if unloadable:
        from .store import import_problem

        # The workers of a local cluster a job makes start from this process's environment (its
        # PYTHONPATH, its folder): when this process cannot import it either, here is where to fix it.
        local = type(getattr(client, "cluster", None)).__name__ == "LocalCluster"
        fix = ("Neither can this process, whose environment a local cluster's workers start from: make "
               "that module importable here (run from the folder that holds it, put that folder on "
               "PYTHONPATH, or install it). Nothing ran." if local and import_problem(imports) else
               "Install that module (and what it imports) where the Dask workers run, or put it on their "
               "PYTHONPATH, and restart them. Nothing ran.")
        problem = next(iter(unloadable.values()))
        raise ClusterError(
            f"{first(unloadable)} cannot load the models of run {models[0]!r}: "
            f"{_unloadable(*problem, 'there')}. {_renamed_fix(*problem) or fix}")

    try:
        mine = kernel.code_digests(*code_of)
    except Exception:  # noqa: BLE001
        mine = {}
    stale = _stale_code(answers, mine)
    if stale:
        name = next(iter(stale.values()))
        raise ClusterError(
            f"{first(stale)} has another version of {name} than this client: its module "
            f"{_module_of(name)!r} was imported on one side before it changed (or is installed in another "
            "version there), and Dask would run the workers' copy. Restart the workers (Client.restart(), or start "
            "`dask worker` again) so they import it afresh, reload it here (importlib.reload) if this process has "
            "the old one, or send it by value with cloudpickle.register_pickle_by_value(module). A constant of the "
            "module that this process set at run time (module.NAME = ...) counts too: the workers' copy has the "
            "value of the source, so write it there, or pass it to the function. Nothing ran.")


def _renamed_fix(path: str, err: str) -> str:
    """The fix when the module of a stored model's class imports but holds no such class (it was
    renamed or moved since the run was trained), or "" (installing the module would not help)."""
    import importlib

    module, _, qualname = path.partition(":")
    if not err.startswith("AttributeError:") or not qualname:
        return ""
    try:
        obj = importlib.import_module(module)
        for name in qualname.split("."):
            obj = getattr(obj, name)
    except AttributeError:  # here too: renamed or moved
        pass
    except Exception:  # noqa: BLE001 - the module itself is the problem
        return ""
    else:  # this process has it: the workers hold an older copy of the module (restart them)
        return ""
    return (f"The module {module!r} imports, but holds no {qualname}: the class was renamed or moved since the run "
            f"was trained. Give it its name there again (or an alias: {qualname.rsplit('.', 1)[-1]} = TheNewName), "
            "or train again with the class as it is now. Nothing ran.")


def _unloadable(path: str, err: str, where: str) -> str:
    from .store import import_name

    return f"they need {import_name(path)}, which cannot be imported {where} ({err})"


def _check_in_process_storage(client, spec: JobSpec) -> None:
    """Raise :class:`ClusterError` if the job reads or writes ``memory://``, which lives in this
    process only, on Dask workers that are other processes (a LocalCluster's, by default): they
    found no input ("FileNotFoundError"), or wrote their output into their own memory, the run then
    refused as if another job had emptied its ``out=`` folder."""
    from fsspec.core import split_protocol

    models = getattr(spec.models, "store", None)
    urls = [getattr(spec.source, "url", None), getattr(spec.sink, "url", None), getattr(models, "url", None)]
    memory = [u for u in urls if isinstance(u, str) and split_protocol(u)[0] == "memory"]
    if not memory:
        return
    pids = set(client.run(os.getpid).values()) or {client.run_on_scheduler(os.getpid)}
    if pids != {os.getpid()}:
        raise ClusterError(f"{memory[0]!r} is in this Python process's memory (memory://), which the Dask workers, "
                           "other processes, do not share: they would not see it. Use cluster='inline' (or a "
                           "Client(processes=False)), or a folder on disk or in an object store. Nothing ran.")


def _stale_code(answers: dict, mine: dict) -> dict:
    """``{worker: name}`` of the workers whose copy of the user's code ``name`` differs from this
    client's (``answers``: where -> (version, error, digests, ...); the scheduler runs no unit).  Digests
    of bytecode compare only between processes of one Python version and -O level (``"<python>"``)."""
    return {w: name for w, (_, _, theirs, *_) in answers.items()
            if w != "the scheduler" for name in kernel.stale_names(mine, theirs)}


def task_slots(client) -> int:
    """Units that run at once, to plan for: the threads of the live workers (a worker runs a unit
    on each), or what the cluster that modelfactory made or attached to says it will have
    (``plan_slots``: the maximum of an adaptive cluster, which has no workers yet), at least one."""
    if client is None:
        return 1
    planned = getattr(getattr(client, "cluster", None), "plan_slots", None) or 0
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return max(1, planned, sum(w.get("nthreads", 1) for w in workers.values()))


def _has_dashboard(client) -> bool:
    """Whether the scheduler's dashboard link answers (``dask scheduler --no-dashboard`` still
    serves its health and metrics routes on that port, and the link printed answered 404)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(client.dashboard_link, timeout=1):
            return True
    except urllib.error.HTTPError as err:
        return err.code != 404
    except Exception:  # noqa: BLE001 - cannot tell (a proxy, a slow link): the link, as before
        return True


class Progress:
    """A progress bar over units that also counts groups (tqdm; the notebook variant in Jupyter)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, client=None) -> None:
        self.groups = self.failed = 0
        self.bar = None
        if enabled:
            import importlib.util
            import sys

            # tqdm.auto's notebook bar needs ipywidgets (no dependency of ours): without it, it warned
            # "IProgress not found. Please update jupyter and ipywidgets" before the text bar it fell back to
            if importlib.util.find_spec("ipywidgets") is not None:
                from tqdm.auto import tqdm
            else:
                from tqdm.std import tqdm

            if client is not None and _has_dashboard(client):
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)

            self.bar = tqdm(total=total, desc=desc, unit="unit", dynamic_ncols=True, leave=True)

    def update(self, res: UnitResult) -> None:
        self.groups += res.groups
        self.failed += res.counts.get("failed", 0)
        if self.bar is not None:
            self.bar.set_postfix(groups=f"{self.groups:,}", failed=self.failed, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: Seconds a run waits with no worker connected before it says so (and between reminders).
NO_WORKER_WARNING_SECONDS = 30.0


#: A job none of whose units has finished for this long (and for ``STALL_FACTOR`` times its
#: slowest finished unit) says so: a group that hangs held the job with no word (the progress bar
#: is off where no one watches: cron, CI, Kubernetes).
STALL_SECONDS = 300.0
STALL_FACTOR = 10.0
STALL_CHECK_SECONDS = 15.0


class _Stall:
    """When a unit last finished and the slowest one's seconds; a thread warns when units remain
    and none has finished for long (:data:`STALL_SECONDS`), once per such stretch."""

    def __init__(self, keys: Sequence[str]) -> None:
        import time

        self.last, self.slowest, self.left = time.monotonic(), 0.0, dict.fromkeys(keys)

    def done(self, key: str, seconds: float) -> None:
        import time

        self.last, self.slowest = time.monotonic(), max(self.slowest, seconds)
        self.left.pop(key, None)

    def watched(self) -> contextlib.AbstractContextManager[None]:
        import time

        said = None

        def check(stop: threading.Event) -> None:
            nonlocal said
            quiet = time.monotonic() - self.last
            # before any unit has finished, nothing says how long one takes: six times as long
            limit = max(STALL_SECONDS, STALL_FACTOR * self.slowest) if self.slowest else 6 * STALL_SECONDS
            left = tuple(self.left)  # one step under the GIL: the job's thread pops from it
            if left and quiet > limit and said != self.last and not stop.is_set():
                said = self.last
                log.warning("no unit of this job has finished for %.0f s (the slowest so far took %.0f s); %d "
                            "still running or queued, e.g. %s: a group in one may hang. The job waits for "
                            "them; Ctrl-C stops it (train --resume keeps the units done)",
                            quiet, self.slowest, len(left), left[0])

        return _every(STALL_CHECK_SECONDS, check, "modelfactory-watch-stall")


@contextlib.contextmanager
def _every(seconds: float, check: Callable[[threading.Event], bool | None], name: str) -> Iterator[None]:
    """Inside, ``check(stop)`` runs every ``seconds`` in a thread of its own, until the block
    ends or ``check`` returns False (``stop`` is set once the block ends)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds) and check(stop) is not False:
            pass

    threading.Thread(target=loop, name=name, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def no_worker_hint(cluster, address: str) -> str:
    """What to look at when a cluster has no worker: on Kubernetes, its worker pods (the scheduler's
    address there is a port-forward or a service, where nobody starts workers by hand)."""
    if any(c.__module__.startswith("dask_kubernetes") for c in type(cluster).__mro__):
        name, ns = getattr(cluster, "name", "?"), getattr(cluster, "namespace", None) or "<namespace>"
        return (f"its worker pods have not joined: `kubectl get pods -n {ns} -l dask.org/cluster-name={name},"
                "dask.org/component=worker`, then `kubectl describe pod` one: Pending means no node has the "
                "requested cpu/memory or a quota is reached, ImagePullBackOff a wrong image or pull secret; "
                "an adaptive cluster starts them once work is queued")
    if any(c.__name__ == "LocalCluster" for c in type(cluster).__mro__):  # the job's own, or one passed in
        return ("its local workers died (out of memory, or a crash in native code) and their nannies have not "
                "started new ones yet")
    return f"start workers with `dask worker {address}`"


def watch_workers(client, every: float | None = None) -> contextlib.AbstractContextManager[None]:
    """Warn every ``every`` seconds while the scheduler has no worker, or only paused ones.

    A run waits for workers rather than failing (an adaptive cluster starts them once work is
    queued, and a worker may join late), as Spark waits for executors; but a scheduler that
    nobody started workers for would otherwise look like a hang.
    """
    import time

    every = NO_WORKER_WARNING_SECONDS if every is None else every
    address = getattr(getattr(client, "scheduler", None), "address", None) or "?"
    # when the scheduler was first seen without a worker (the watch's start until one is seen): one
    # sample without a worker counted as `every` seconds without one, and workers that were restarting
    # after a crash read "no Dask worker for 30 s ... start workers with `dask worker`"
    since: float | None = time.monotonic()
    waited = 0.0
    paused = 0.0  # since the last time a worker was seen running

    def check(stop: threading.Event) -> bool:
        nonlocal since, waited, paused
        try:
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
        except Exception:  # noqa: BLE001 - the run itself reports a lost scheduler
            return False
        now = time.monotonic()
        if workers:
            since = None
        elif since is None:
            since = now
        waited = 0.0 if since is None else now - since
        if not workers and waited >= every * 0.9 and not stop.is_set():
            log.warning("the scheduler at %s has had no Dask worker for %.0f s; the run is waiting for one "
                        "(%s)", address, waited, no_worker_hint(getattr(client, "cluster", None), address))
        # Dask pauses a worker whose process memory passes its pause threshold (80 % of its
        # limit by default) until it falls back: with every worker paused, nothing runs, silently
        held = [w for w in workers.values() if w.get("status") == "paused"]
        paused = paused + every if workers and len(held) == len(workers) else 0.0
        if paused and not stop.is_set():
            w = held[0]
            used, limit = w.get("metrics", {}).get("memory"), w.get("memory_limit")
            at = f" ({used / 2**20:,.0f} MiB of its {limit / 2**20:,.0f} MiB limit)" if used and limit else ""
            log.warning("every Dask worker of the scheduler at %s (%d) has been paused by its memory limit for "
                        "%.0f s%s: nothing runs until memory is freed. Give the workers more memory (`dask worker "
                        "--memory-limit`), or make the units smaller (unit_rows=, --unit-rows)",
                        address, len(workers), paused, at)
        return True

    return _every(every, check, "modelfactory-watch-workers")


def _outcome(fut, killed_too: bool = True):
    """The result of a finished task, or ``_KILLED`` for one that kept killing its worker (when
    ``killed_too``; else the KilledWorker is raised, as any other error).  Caught from the result
    itself, not looked up in the future's status first: a future that as_completed gave back as
    failed could be pending again by then (the scheduler retries it), and the KilledWorker of its
    next attempt stopped the job, uncaught, with no group isolated."""
    from distributed import KilledWorker

    try:
        return fut.result()
    except KilledWorker:
        if not killed_too:
            raise
        return _KILLED


def execute(client, fn: Callable, items: Sequence, *, keys: Sequence[str], progress: Progress,
            retries: int = 2, on_killed: Callable | None = None) -> list[UnitResult]:
    """Run ``fn(item)`` for every item on the cluster (or inline); results in item order.

    Units that fail (an I/O error) raise here: per-group errors never do, the
    kernel records them.  A unit that kept killing its worker process
    (:class:`distributed.KilledWorker`) is handed to ``on_killed(client, item)``,
    which isolates the group responsible, when given.

    A unit refused by a worker that cannot load the job's code (one that joined after
    :func:`check_code`, from an image without the user's module: see :func:`_guarded`) goes
    to the workers that have not refused it; when every connected worker has, its groups are
    ``failed`` with the reason (:func:`kernel.refused_rows`): one bad worker does not fail a
    run that others can finish, and a cluster of bad ones does not make it wait for ever.
    """
    results: list = [None] * len(items)
    if client is None:
        for i, item in enumerate(items):
            results[i] = fn(item)
            progress.update(results[i])
        return results
    from distributed import as_completed

    guarded = functools.partial(_guarded, fn)
    busy = _busy_with_cancelled(client)
    free = sorted(set(client.scheduler_info(n_workers=-1).get("workers", {})) - set(busy)) if busy else []
    # loose: only if those workers leave do units go to the busy ones (they queue there meanwhile)
    futures = client.map(guarded, items, key=list(keys), retries=retries, pure=False,
                         workers=free or None, allow_other_workers=bool(free))
    index = {f.key: i for i, f in enumerate(futures)}
    refused = _Refusals()
    tries = [0] * len(items)
    pending = as_completed(futures)

    def again(i: int, workers: list[str]):
        tries[i] += 1
        return client.submit(guarded, items[i], key=f"{keys[i]}-r{tries[i]}", workers=workers,
                             allow_other_workers=True, retries=retries, pure=False)

    def fail(i: int, reason: str) -> UnitResult:
        return client.submit(kernel.refused_rows, _spec_of(fn), items[i], reason, key=f"{keys[i]}-failed",
                             pure=False).result()

    stall = _Stall(keys)
    try:
        with watch_workers(client), stall.watched():
            for fut in pending:
                i = index.pop(fut.key)
                res = _outcome(fut, killed_too=on_killed is not None)
                if isinstance(res, _Refused):
                    res = _reroute(client, fut.key, res, refused, i, functools.partial(again, i),
                                   functools.partial(fail, i))
                fut.release()  # taken: a worker lost from now on must not recompute it
                if res is _KILLED:
                    if on_killed is None:
                        raise ClusterError(f"Work unit {keys[i]} killed every Dask worker process it ran on "
                                           "(out of memory, or past the worker's memory limit, or a crash in "
                                           "native code): see the workers' logs.")
                    log.warning("unit %s keeps killing its worker; running its groups one by one", keys[i])
                    res = on_killed(client, items[i])
                elif not isinstance(res, UnitResult):  # a new future: wait for it too
                    index[res.key] = i
                    futures.append(res)
                    pending.add(res)
                    continue
                results[i] = res
                stall.done(keys[i], res.seconds)
                progress.update(res)
    finally:
        for f in futures:
            f.release()
    return results


#: Seconds the workers have to say which earlier tasks they still run (:func:`_busy_with_cancelled`).
BUSY_CHECK_SECONDS = 5.0


def _cancelled_tasks(dask_worker=None) -> list[str]:
    """The tasks a worker still runs that no client wants any more (run on each worker): an
    interrupted job's units, which Dask cannot stop (a thread runs them to their end)."""
    try:
        return sorted(str(k) for k, ts in dask_worker.state.tasks.items() if ts.state == "cancelled")
    except Exception:  # noqa: BLE001 - another Dask's worker state: nothing known
        return []


def _busy_with_cancelled(client) -> dict[str, list[str]]:
    """The workers still running tasks of an interrupted job (address -> task keys), said once
    per job.  Their threads are taken until those tasks end (an hour, for a group that hangs),
    and the scheduler queued the next job's units behind them while other workers sat idle: the
    job leaves them to the others, or waits and says why when every worker is busy so."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as NoAnswer

    # bounded: a worker whose leftover task holds the GIL answers only once it ends (a job stalled
    # waiting for the check); this job's units are not held back by the check
    pool = ThreadPoolExecutor(1, thread_name_prefix="modelfactory-busy-check")
    try:
        answers = pool.submit(client.run, _cancelled_tasks, on_error="ignore").result(timeout=BUSY_CHECK_SECONDS)
        found = {w: keys for w, keys in answers.items() if isinstance(keys, list) and keys}
    except NoAnswer:
        log.warning("a Dask worker did not answer within %g s (a task of an earlier job holding it?): this job "
                    "goes on without knowing which workers are free", BUSY_CHECK_SECONDS)
        return {}
    except Exception as err:  # noqa: BLE001 - a check, never a reason to fail the job
        log.debug("no check for cancelled tasks: %s", err)
        return {}
    finally:
        pool.shutdown(wait=False)
    if not found:
        return found
    every = set(found) >= set(client.scheduler_info(n_workers=-1).get("workers", {}))
    (worker, keys), more = next(iter(found.items())), len(found) - 1
    log.warning("%s still %s %d task(s) of an interrupted job (e.g. %s), which Dask cannot stop: %s; "
                "restart %s to free %s (Client.restart_workers(%r), or start `dask worker` again)",
                f"the worker at {worker}" + (f" and {more} more" if more else ""),
                "run" if more else "runs", len(keys), keys[0],
                "this job's units wait for them" if every else "this job's units go to the other workers",
                "them" if more else "it", "them" if more else "it", sorted(found))
    return found


class _Refused:
    """What a unit (or a shuffle partition, or an isolated group) returns on a worker that
    cannot run the job's code: the worker's address and why (a :class:`kernel.CodeUnavailable`)."""

    def __init__(self, worker: str, missing: kernel.CodeUnavailable) -> None:
        self.worker, self.missing = worker, missing

    def message(self, outcome: str | None = None) -> str:
        return self.missing.message(f"at {self.worker}", outcome)


def _refusal(spec: JobSpec | None) -> _Refused | None:
    """A :class:`_Refused` when this worker could not load ``spec``'s code, or loads another
    version of it: the spec arrived with a :class:`kernel.CodeUnavailable` in place of it
    (:meth:`JobSpec.__reduce__`).  None when it can run it."""
    if spec is None or (missing := kernel.code_error(spec)) is None:
        return None
    from distributed import get_worker

    return _Refused(get_worker().address, missing)


def _guarded(fn: Callable, item) -> UnitResult | _Refused:
    """``fn(item)``, or :class:`_Refused` when this worker cannot run the code of the job spec
    that ``fn`` (a partial) carries.  One look at the partial's arguments per unit."""
    refused = _refusal(_spec_of(fn))
    return fn(item) if refused is None else refused


def _spec_of(fn: Callable) -> JobSpec | None:
    """The job spec among the arguments of ``fn`` (a partial of a unit's entry point), if any."""
    args = fn.args if isinstance(fn, functools.partial) else ()
    return next((a for a in args if isinstance(a, JobSpec)), None)


#: Seconds a refused piece of work waits for a worker that has not refused the job's code to be
#: connected, when none is, before its groups are ``failed``: a worker restarting after a crash
#: (its nanny starts a new one, at a new address, in a few seconds) can still take it.  Waited
#: once per set of units (:func:`execute`), of shuffle partitions (:func:`execute_delayed`) or of
#: isolated groups (:func:`_isolated`): after that, refused work there fails at once while no
#: such worker is connected.
REFUSED_WAIT_SECONDS = 10.0


class _Refusals:
    """The workers that refused a run's code (address -> message), and whether the run already
    waited :data:`REFUSED_WAIT_SECONDS` for another worker in vain."""

    def __init__(self) -> None:
        self.workers: dict[str, str] = {}
        self.waited = False
        self.lost: dict = {}  # piece of work -> workers that died running it, over its reroutes

    def others(self, client) -> list[str]:
        """The connected workers that have not refused."""
        return sorted(set(client.scheduler_info(n_workers=-1).get("workers", {})) - set(self.workers))

    def wait_for_others(self, client) -> list[str]:
        """:meth:`others`, waiting up to :data:`REFUSED_WAIT_SECONDS` (once) while there are none."""
        import time

        good = self.others(client)
        end = time.monotonic() + (0 if self.waited else REFUSED_WAIT_SECONDS)
        while not good and time.monotonic() < end:
            time.sleep(0.25)
            good = self.others(client)
        self.waited = self.waited or not good
        return good


def _lost_workers(key, dask_scheduler=None) -> tuple[int, int]:
    """(workers that died running task ``key``, the scheduler's allowed failures); run on the scheduler."""
    ts = dask_scheduler.tasks.get(key)
    return (ts.suspicious if ts is not None else 0), dask_scheduler.allowed_failures


#: What :func:`_reroute` returns for work that kept killing its workers (as a ``KilledWorker``).
_KILLED = object()


def _reroute(client, key, refusal: _Refused, refused: _Refusals, item, again: Callable, fail: Callable):
    """Where a piece of work refused as task ``key`` (not yet released) goes: ``again(workers)``
    (a future running it on the workers that have not refused the job's code) or, when every
    connected worker has (after :data:`REFUSED_WAIT_SECONDS` for another to join),
    ``fail(reason)`` (its groups ``failed`` with the reason, a :class:`UnitResult`).  ``refused``
    is what this run has seen refused so far; the first refusal of a worker is logged.

    The restriction is loose (``allow_other_workers``): if those workers leave, the work runs on
    whichever joins next, and is refused again if that one cannot run it either.  So a piece that
    kills its worker is refused next by a bad worker while the good one restarts, and each new
    task starts Dask's count of the workers it killed afresh: ``refused`` adds them up per
    ``item`` (the scheduler's ``suspicious`` count of each task), and past the scheduler's
    allowed failures this returns :data:`_KILLED`, which the caller treats as a ``KilledWorker``
    (it went round for ever, killing the good worker each time)."""
    lost, allowed = client.run_on_scheduler(_lost_workers, key)
    refused.lost[item] = refused.lost.get(item, 0) + lost
    if refused.lost[item] > allowed:
        return _KILLED
    if refusal.worker not in refused.workers:
        log.warning("the Dask worker at %s cannot run this job's code; its work goes to the other workers (%s)",
                    refusal.worker, refusal.message())
    refused.workers[refusal.worker] = refusal.message()
    good = refused.wait_for_others(client)
    if good:
        return again(good)
    could = "run the client's version of it" if refusal.missing.stale else "load it"
    return fail(refusal.message(f"no worker of the cluster could {could}"))


def execute_delayed(client, tasks: list, *, progress: Progress, on_killed: Callable | None = None,
                    inputs: list | None = None, rerun: Callable | None = None,
                    refuse: Callable | None = None) -> list[UnitResult]:
    """Compute a list of dask Delayed objects (the shuffle path) with progress.

    ``on_killed(client, killed, done)``, if given, runs once all tasks have ended, with the
    indices of those that kept killing their workers (a ``KilledWorker``: the culprit, and
    any task lost with it too often) and the results of the others; it returns one result
    for all the killed tasks' groups.

    ``inputs`` (one Delayed per task: what task ``i`` runs on, a shuffle partition) are computed
    with the tasks and kept on the cluster until task ``i``'s result is taken, so that a task
    refused by a worker that cannot run the job's code (a :class:`_Refused`) runs again on the
    same input elsewhere, without the shuffle again: ``rerun(i, input, workers)`` submits it on
    ``workers``, ``refuse(i, input, reason)`` returns its groups ``failed`` when every connected
    worker has refused (:func:`_reroute`)."""
    if client is None:
        import dask

        results = dask.compute(*tasks, scheduler="sync")
        for r in results:
            progress.update(r)
        return list(results)
    from distributed import as_completed

    # one graph: an input is the same key as its task's dependency, computed once
    computed = client.compute([*tasks, *(inputs or [])])
    futures, held = computed[:len(tasks)], dict(enumerate(computed[len(tasks):]))
    index = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    killed: list[int] = []
    refused = _Refusals()
    pending = as_completed(futures)
    stall = _Stall([str(f.key) for f in futures])
    try:
        with watch_workers(client), stall.watched():
            for fut in pending:
                i = index.pop(fut.key)
                res = _outcome(fut, killed_too=on_killed is not None)
                if res is _KILLED:
                    killed.append(i)
                    continue
                if isinstance(res, _Refused):
                    res = _reroute(client, fut.key, res, refused, i, functools.partial(rerun, i, held[i]),
                                   functools.partial(refuse, i, held[i]))
                fut.release()
                if res is _KILLED:
                    killed.append(i)
                    continue
                if not isinstance(res, UnitResult):  # a new future: wait for it too
                    index[res.key] = i
                    futures.append(res)
                    pending.add(res)
                    continue
                results[i] = res
                stall.done(str(futures[i].key), res.seconds)
                if i in held:
                    held.pop(i).release()  # its task is done: the partition may go
                progress.update(results[i])
    finally:
        for f in [*futures, *held.values()]:
            f.release()
    if killed:
        log.warning("%d shuffle partition(s) kept killing their workers; running their groups one by one",
                    len(killed))
        killed.sort()
        merged = on_killed(client, killed, [r for r in results if r is not None])
        for i in killed[1:]:  # the other killed units: their groups are in the merged result
            results[i] = empty = UnitResult(f"{merged.unit_id}-none")
            if merged.group_table is not None:
                empty.group_table = merged.group_table.slice(0, 0)
            if isinstance(merged.table, pa.Table):
                empty.table = merged.table.slice(0, 0)
        results[killed[0]] = merged
        for i in killed:
            progress.update(results[i])
    return results


# ---------------------------------------------------------------------------
# submitting a job's units
# ---------------------------------------------------------------------------
def task_tag() -> str:
    """A tag that makes one job's Dask task keys its own.  ``id(spec)`` was used, an address that
    this process may hand a later job's spec: a job started after one interrupted here (its units
    still running on the cluster) could then get that job's tasks, and their results, for its own."""
    import secrets

    return secrets.token_hex(6)


def run_units(client, spec: JobSpec, info: DatasetInfo, plan_: Plan, progress: Progress) -> list[UnitResult]:
    if plan_.mode == "files":
        # Largest units first (LPT): a huge group starts at once instead of holding the run's end.
        units = sorted(plan_.units, key=lambda u: -u.rows)
        tag = task_tag()
        return execute(client, functools.partial(kernel.run_unit, spec), units,
                       keys=[f"mf-{u.id}-{spec.kind}-{tag}" for u in units], progress=progress,
                       on_killed=functools.partial(isolate, spec))
    return run_shuffled(client, spec, info, plan_, progress)


def isolate(spec: JobSpec, client, unit, runner=kernel.run_table) -> UnitResult:
    """A unit kept killing its worker: run each of its groups as its own task, so only the
    group(s) that crash the process fail (with the reason) and the others complete.
    ``runner`` runs a unit's rows (scoring passes ``scoring.score_table``)."""
    drop_unit_files(spec, [unit.id])
    keys, sizes = client.submit(kernel.unit_groups, spec, unit.paths, pure=False).result()

    def run_one(i, sub_id, key, workers=None):
        # take, not slice: a slice pickles the whole table's buffers, for every group
        return client.submit(_run_group, spec, unit, keys.take([i]), sub_id, runner, key=key, pure=False,
                             workers=workers, allow_other_workers=workers is not None)

    return _isolated(spec, client, unit.id, keys, run_one, sizes)


def isolate_keys(spec: JobSpec, client, item, run_keys: Callable) -> UnitResult:
    """A unit of ``map_keys`` kept killing its worker: :func:`isolate` for keys, each key's call
    its own task (``run_keys(spec, (sub_id, [key]))`` runs it), so only the key(s) whose call
    crashes the process fail, with the reason."""
    unit_id, rows = item
    drop_unit_files(spec, [unit_id])
    keys = kernel.key_table(spec, rows)
    guarded = functools.partial(_guarded, functools.partial(run_keys, spec))

    def run_one(i, sub_id, key, workers=None):
        return client.submit(guarded, (sub_id, [rows[i]]), key=key, pure=False, workers=workers,
                             allow_other_workers=workers is not None)

    return _isolated(spec, client, unit_id, keys, run_one)


def isolate_partitions(spec: JobSpec, client, unit_id: str, paths: tuple[str, ...],
                       done: list[UnitResult], runner=kernel.run_table) -> UnitResult:
    """Shuffle partitions kept killing their workers: :func:`isolate` for rows that have no
    files of their own.  Their groups are the dataset's groups that no other partition
    ran (``done``); one task reads those groups' rows again from ``paths``, in group order,
    and keeps them on the cluster; each group then runs as its own task on its own slice.
    Nothing here goes through the shuffle again: once a worker is lost its outputs may be
    gone for good.  ``unit_id`` prefixes the groups' ids: it must be the same in every
    attempt of a run, since which partitions are killed may differ from one to the next."""
    tables = [r.group_table.select(list(spec.by)) for r in done if r.group_table is not None]
    parts = [p.path for r in done for p in r.parts if p.path.startswith(spec.groups_prefix)]
    remaining = client.submit(_remaining_keys, spec, paths, tables, parts, pure=False)
    data = client.submit(_read_groups, spec, paths, remaining, pure=False)
    try:
        keys, sizes = client.submit(_group_keys, data, pure=False).result()  # in the order of data's groups

        def run_one(i, sub_id, key, workers=None):
            return client.submit(_run_group_slice, spec, sub_id, data, i, runner, key=key, pure=False,
                                 workers=workers, allow_other_workers=workers is not None)

        return _isolated(spec, client, unit_id, keys, run_one, sizes)
    finally:
        data.release()
        remaining.release()


def _isolated(spec: JobSpec, client, prefix: str, keys: pa.Table, run_one: Callable,
              sizes: np.ndarray | None = None) -> UnitResult:
    """Run each group of ``keys`` as its own task (``run_one(i, sub_id, task_key, workers=None)``
    submits group ``i``'s, on ``workers`` if given), no more at once than the cluster has
    threads: a task waiting on a worker that dies counts as a suspect too.  A task that kept
    killing its worker is run once more alone: one lost only because it shared the dying worker
    completes then; a group that kills its worker alone too is ``failed`` with the reason.  A
    task refused by a worker that cannot run the job's code goes to the others
    (:func:`_reroute`), its group ``failed`` with the reason when every connected worker has
    refused.

    A group's sub-unit id is ``<prefix>-g<digest of its key>``: the same group gets the same
    id, and so finds its own part, in a resumed run, whatever else was isolated with it.
    """
    from distributed import as_completed

    subs = [f"{prefix}-g{_key_digest(k)}" for k in keys.to_pylist()]
    refused = _Refusals()
    tag = task_tag()

    def attempt(indices, n: int, at_once: int):
        todo, running, done, dead = iter(indices), {}, [], []
        pending = as_completed()
        tries: dict[int, int] = {}

        def track(i: int, fut) -> None:
            running[fut.key] = (i, fut)
            pending.add(fut)

        def submit_next() -> None:
            i = next(todo, None)
            if i is not None:
                track(i, run_one(i, subs[i], f"mf-{subs[i]}-a{n}-{tag}"))

        def again(i: int, workers: list[str]):
            tries[i] = tries.get(i, 0) + 1
            return run_one(i, subs[i], f"mf-{subs[i]}-a{n}-r{tries[i]}-{tag}", workers)

        def fail(i: int, reason: str) -> UnitResult:
            return kernel.failed_rows(spec, subs[i], keys.take([i]), reason, None if sizes is None else sizes[[i]])

        try:
            for _ in range(at_once):
                submit_next()
            for fut in pending:
                i, _ = running.pop(fut.key)
                res = _outcome(fut)
                if isinstance(res, _Refused):
                    # the deaths are counted per attempt: a group that shared a dying worker in the
                    # first is not held to them when it runs alone in the second
                    res = _reroute(client, fut.key, res, refused, (n, i), functools.partial(again, i),
                                   functools.partial(fail, i))
                fut.release()
                if res is _KILLED:
                    dead.append(i)
                elif isinstance(res, UnitResult):
                    done.append(res)
                else:  # the same group, on another worker
                    track(i, res)
                    continue
                submit_next()
        finally:
            for _, fut in running.values():  # left running by an error: not ours to wait for
                fut.release()
        return done, dead

    threads = max(1, sum(client.nthreads().values()))
    parts, dead = attempt(range(keys.num_rows), 1, threads)
    if dead:  # which of them kills the worker? each alone, one after the other
        parts2, dead = attempt(dead, 2, 1)
        parts += parts2
    if dead or not parts:
        reason = ("the worker process died while running this group (out of memory: the OS's OOM killer, or "
                  "the Dask nanny at the worker's memory limit; or a crash in native code); it was tried on "
                  "several workers: see the workers' logs")
        parts.append(kernel.failed_rows(spec, f"{prefix}-killed", keys.take(pa.array(dead, pa.int64())), reason,
                                        None if sizes is None else sizes[dead]))
    return kernel.merge_results(prefix, parts)


def _key_digest(key: dict) -> str:
    import hashlib

    return hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:12]


#: The prefix of the columns a scoring shuffle hashes when the data's key types are not the run's.
_HASHED = "__mf_stored_"


def _stored_key_types(spec: JobSpec, info) -> tuple | None:
    """The key types of the run a score job scores with, when it was trained without key
    folders (its parts are the shuffle partitions of its keys, as those types) and the data's
    key types differ (an int64 ``shard`` trained, text scored): the scoring shuffle then hashes
    the keys cast to them, as :func:`modelfactory.scoring._bucket_parts` does, so that each
    unit holds the groups of its partitions only and reads their parts alone, not nearly every
    part.  None otherwise: the keys as read hash alike."""
    from ._schema import plain_type

    src = spec.models if spec.kind == "score" else None
    if src is None or not src.n_buckets or len(src.key_types) != len(spec.by):
        return None
    mine = tuple(plain_type(info.schema.field(k).type) for k in spec.by)
    return tuple(src.key_types) if mine != tuple(src.key_types) else None


def _read_chunks(files: list, target_rows: int) -> list[tuple]:
    """What each task of a shuffle reads: files of about ``target_rows`` rows together, and a file of
    more than that in shares of its row groups, ``(path, (row group ids))``.  A large file read
    whole put all its rows in one worker's memory (12 million rows: 4.4 GiB, where the same rows in
    24 files took 1.2 GiB a worker).  A file of one row group cannot be split.  The row groups' rows
    come from discovery, which read the footers (:attr:`FileInfo.row_groups`)."""
    chunks, cur, rows = [], [], 0
    for f in files:
        if f.rows > target_rows and f.row_groups:
            share, n = [], 0
            for i, c in enumerate(f.row_groups):
                share.append(i)
                n += c
                if n >= target_rows:
                    chunks.append(((f.path, tuple(share)),))
                    share, n = [], 0
            if share:
                chunks.append(((f.path, tuple(share)),))
            continue
        cur.append(f.path)
        rows += f.rows
        if rows >= target_rows:
            chunks.append(tuple(cur))
            cur, rows = [], 0
    if cur:
        chunks.append(tuple(cur))
    return chunks


def _read_chunk(spec: JobSpec, paths: tuple, known: tuple = (), hashed: tuple | None = None) -> pd.DataFrame:
    """The rows of one of :func:`_read_chunks`, with ``known``: the (size, version mark) of each of
    its files (:attr:`WorkUnit.known`)."""
    from .dataset import read_files

    if len(paths) == 1 and isinstance(paths[0], tuple):  # a share of a large file: (path, row groups)
        (path, row_groups), = paths
        table = read_files(spec.source, (path,), list(spec.columns), spec.filter, row_groups=row_groups, known=known)
    else:
        table = read_files(spec.source, paths, list(spec.columns), spec.filter, known=known)
    df = _exact_pandas(table)
    if hashed:  # the keys as the run's types, to hash as training did
        extra = _exact_pandas(pa.table({f"{_HASHED}{k}": _key_for_hashing(table[k], t, spec.models.run_id)
                                        for k, t in zip(spec.by, hashed)}))
        df = pd.concat([df, extra.set_axis(df.index)], axis=1)
    return df


def _key_for_hashing(col, to: pa.DataType, run_id: str) -> pa.Array:
    """A key column as the stored type ``to``, each distinct value cast once.  A value with no
    equivalent there (text "s007" for an int64 run: no model either) gets a stand-in of that type
    drawn from its own hash, not null: nulls all hash alike, and every such row went to one
    partition (a whole dataset of such keys to one worker)."""
    import pyarrow.compute as pc

    from .scoring import keys_as_stored

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_null(col.type) or not len(col):
        return pa.nulls(len(col), to)
    enc = col.dictionary_encode()
    values = enc.dictionary
    (cast,), _ = keys_as_stored(pa.table({"k": values}), ("k",), (to,), run_id)
    lost = pc.and_(pc.is_null(cast), pc.is_valid(values)).to_numpy(zero_copy_only=False)
    if lost.any():
        text = np.asarray(values.cast(pa.string()).to_pylist(), dtype=object)
        h = pd.util.hash_array(text).view(np.int64)  # the same in every process
        if pa.types.is_integer(to):
            stand_in = pa.array(h % (2**31 if to.bit_width <= 32 else 2**62), pa.int64()).cast(to, safe=False)
        elif pa.types.is_string(to) or pa.types.is_large_string(to):
            stand_in = values.cast(pa.string()).cast(to)
        elif pa.types.is_date(to):
            stand_in = pa.array(h % 100_000, pa.int32()).cast(pa.date32()).cast(to)
        else:  # a time
            stand_in = pa.array(h % 2**40, pa.int64()).cast(to)
        cast = pc.if_else(pa.array(lost), stand_in, cast)
    return cast.take(enc.indices)


def _exact_pandas(table: pa.Table) -> pd.DataFrame:
    """``table`` as pandas for Dask's shuffle, every value kept: integer and boolean columns as
    pandas' nullable types (to_pandas' default makes an integer column with a null float64, which
    rounds values above 2**53, and the shuffle's chunks would get other types than the units')."""
    # ignore_metadata: a stored pandas index (__index_level_0__) stays a column, as the units read it
    return table.to_pandas(types_mapper=_NULLABLE.get, ignore_metadata=True)


_NULLABLE = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
             pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
             pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype()}


def shuffle_buckets(keys: pa.Table, n: int) -> np.ndarray | None:
    """The partition (``0 .. n-1``) that :func:`run_shuffled`'s shuffle into ``n`` partitions
    puts each row of ``keys`` (the key columns, as the dataset's types) in: Dask's own
    partitioning of the same pandas frame, so a scoring unit can tell which training parts can
    hold its groups.  None when this Dask has no such function (the reader then reads every
    part); a reader still checks each part it reads against it (:func:`scoring.load_model_rows`)."""
    import importlib
    import inspect

    try:
        try:
            module = importlib.import_module("dask.dataframe.dask_expr._shuffle")
        except ImportError:  # dask before 2025.1: the dask-expr package
            module = importlib.import_module("dask_expr._shuffle")
        operation = module.AssignPartitioningIndex.operation
        df = _exact_pandas(keys)
        # (df, index, name, npartitions) in early versions, then (..., meta, index_shuffle)
        args = [df, list(keys.column_names), "_partitions", int(n), df.iloc[:0], False]
        out = operation(*args[:len(inspect.signature(operation).parameters)])
        return np.asarray(out["_partitions"], dtype=np.int64)
    except (ImportError, AttributeError, TypeError, ValueError, KeyError):
        return None


def _run_partition(spec: JobSpec, unit_id: str, df: pd.DataFrame, runner=kernel.run_table) -> UnitResult | _Refused:
    if (refused := _refusal(spec)) is not None:  # a worker that cannot run the job's code: elsewhere
        return refused
    schema = pa.schema([spec.source.schema.field(c) for c in spec.columns])
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    # the metadata a unit read from the files has (not that of the shuffle's pandas frames), so a
    # group's pandas types are the same on both paths
    return runner(spec, unit_id, table.replace_schema_metadata(spec.source.schema.metadata))


def drop_unit_files(spec: JobSpec, unit_ids: list[str]) -> list[str]:
    """Remove what earlier attempts of these units wrote under the job's ``out=`` folder.

    A unit whose worker was lost after it wrote its files, and which then kept killing
    workers, has its groups run one by one under other names: its own files, which
    readers of the folder would also see, must go.  (Training parts are read only through
    the manifest, so they need nothing.)  Returns the paths removed."""
    if spec.sink is None or spec.kind == "train":
        return []
    gone = []
    for uid in unit_ids:
        rels = [f"{spec.data_prefix}{uid}.parquet", f"{spec.groups_prefix}{uid}.parquet"]
        if spec.kind == "score":  # scored rows go under the input's partition folders too
            rels += spec.sink.glob(f"**/{spec.data_prefix}{uid}.parquet")
        for rel in dict.fromkeys(rels):
            if spec.sink.exists(rel):
                spec.sink.rm(rel)
                gone.append(rel)
    return gone


def _remaining_keys(spec: JobSpec, paths: tuple[str, ...], tables: list[pa.Table], parts: list[str]) -> pa.Table:
    """The group keys in ``paths`` that are in none of the group tables ``tables`` and ``parts``
    (files under the job's sink)."""
    import pyarrow.parquet as pq

    by = list(spec.by)
    every = _plain_keys(kernel.unit_keys(spec, paths))
    done = tables + [pq.read_table(pa.BufferReader(spec.sink.read_bytes(p)), columns=by) for p in parts]
    if not done:
        return every
    done_keys = pa.concat_tables([_plain_keys(t.select(by)).cast(every.schema) for t in done])
    return every.join(done_keys, keys=by, join_type="left anti").combine_chunks()


def _plain_keys(keys: pa.Table) -> pa.Table:
    """``keys`` with its dictionary-encoded columns (a pandas categorical) as plain values: Arrow
    joins no two dictionary columns whose dictionaries differ (each file has its own)."""
    for i, f in enumerate(keys.schema):
        if pa.types.is_dictionary(f.type):
            keys = keys.set_column(i, f.with_type(f.type.value_type), keys[f.name].cast(f.type.value_type))
    return keys


def _read_groups(spec: JobSpec, paths: tuple[str, ...], keys: pa.Table) -> kernel.Groups:
    """The rows of the groups ``keys`` names, read from ``paths`` and split into groups."""
    from .dataset import read_files

    by = list(spec.by)
    # each key column within its values (pushed down), then exactly the key tuples: joined on
    # the keys and a row number only (a join cannot carry nested columns), rows kept in order
    cond = kernel.keys_condition(keys.select(by), spec.filter)
    table = read_files(spec.source, paths, list(spec.columns), cond)
    probe = _plain_keys(table.select(by)).append_column("__row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    rows = probe.join(_plain_keys(keys.select(by)), keys=by, join_type="left semi")["__row"].to_numpy()
    return kernel.split_groups(table.take(pa.array(np.sort(rows))), spec.by, spec.time)


def _group_keys(groups: kernel.Groups) -> tuple[pa.Table, np.ndarray]:
    """The groups' keys and their rows."""
    return groups.keys, (groups.ends - groups.starts).astype(np.int64)


def _refused_partition(spec: JobSpec, unit_id: str, df: pd.DataFrame, reason: str) -> UnitResult:
    """Every group of a shuffle partition that no worker could run the job's code for, ``failed``
    with ``reason`` (its keys, as :func:`_run_partition` types them, need no user code)."""
    schema = pa.schema([spec.source.schema.field(c) for c in spec.by])
    keys = pa.Table.from_pandas(df[list(spec.by)], schema=schema, preserve_index=False)
    return kernel.failed_rows(spec, unit_id, kernel.split_groups(keys, spec.by).keys, reason)


def _run_group(spec: JobSpec, unit, key: pa.Table, sub_id: str, runner) -> UnitResult | _Refused:
    """:func:`kernel.run_group`, or :class:`_Refused` on a worker that cannot run the job's code."""
    if (refused := _refusal(spec)) is not None:
        return refused
    return kernel.run_group(spec, unit, key, sub_id, runner)


def _run_group_slice(spec: JobSpec, sub_id: str, groups: kernel.Groups, i: int, runner) -> UnitResult | _Refused:
    """Run group ``i`` of ``groups`` on its own (or refuse, as :func:`_run_group`)."""
    if (refused := _refusal(spec)) is not None:
        return refused
    s, e = int(groups.starts[i]), int(groups.ends[i])
    return runner(spec, sub_id, groups.table.slice(s, e - s))


def run_shuffled(client, spec, info, plan_, progress, runner=kernel.run_table) -> list[UnitResult]:
    """Groups spread over many files: co-locate them with Dask's own (p2p) shuffle."""
    import dask
    import dask.dataframe as dd

    files = sorted(info.files, key=lambda f: f.path)
    chunks = _read_chunks(files, plan_.target_rows)
    meta = _exact_pandas(info.schema.empty_table().select(list(spec.columns)))
    method = "p2p" if client is not None else "tasks"
    hashed = _stored_key_types(spec, info)
    on = list(spec.by)
    if hashed:  # shuffled on the keys as the run stores them: a partition's groups are those of its buckets
        on = [f"{_HASHED}{k}" for k in spec.by]
        meta = pd.concat([meta, _exact_pandas(pa.table({c: pa.array([], t) for c, t in zip(on, hashed)}))], axis=1)
    # dask turns object columns into Arrow strings by default, which breaks nested (list,
    # struct) columns; the partitions go back to Arrow with the dataset's own schema anyway
    with dask.config.set({"dataframe.convert-string": False}):
        marks = info.known()
        known = [tuple(marks[p if isinstance(p, str) else p[0]] for p in c) for c in chunks]
        ddf = dd.from_map(functools.partial(_read_chunk, spec, hashed=hashed), chunks, known, meta=meta,
                          enforce_metadata=False)
        shuffled = ddf.shuffle(on=on, npartitions=len(plan_.units), shuffle_method=method)
        parts = shuffled.to_delayed()
    run = dask.delayed(_run_partition, pure=False)
    tasks = [run(spec, u.id, p, runner) for u, p in zip(plan_.units, parts)]
    paths = tuple(f.path for f in files)

    def isolate_killed(client, killed, done):
        drop_unit_files(spec, [plan_.units[i].id for i in killed])
        return isolate_partitions(spec, client, "shuffled", paths, done, runner)

    def rerun(i, part, workers):
        return client.submit(_run_partition, spec, plan_.units[i].id, part, runner, pure=False,
                             workers=workers, allow_other_workers=True)

    def refuse(i, part, reason):
        return client.submit(_refused_partition, spec, plan_.units[i].id, part, reason, pure=False).result()

    return execute_delayed(client, tasks, progress=progress, on_killed=isolate_killed,
                           inputs=parts if client is not None else None, rerun=rerun, refuse=refuse)
