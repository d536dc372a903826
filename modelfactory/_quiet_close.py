"""Worker preload of the clusters modelfactory makes (:func:`modelfactory.run.local_cluster`):
keeps known shutdown races of Dask off the console, and Ctrl-C for the client.

A worker heartbeats the scheduler on its own connection.  When the cluster closes at the
end of a job, a heartbeat still waiting for its answer fails as the worker closes its
connections, and Dask logs it at ERROR level with two tracebacks ("Failed to communicate
with scheduler during heartbeat.", dask/distributed's ``Worker.heartbeat``), after a job
that went well.  This drops that one record when the worker is closing.  The scheduler can
also go first, before the worker has begun to close (on a loaded machine, now and then): a
record from a running worker is held for a few seconds, and shown only if the worker is still
running then; a heartbeat failing on a worker that stays up is still shown, late.
"""
from __future__ import annotations

import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


class _ClosingHeartbeat(logging.Filter):
    #: Seconds a heartbeat failure on a running worker waits for the worker's close to begin.
    grace = 5.0

    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker

    def _closing(self) -> bool:
        from distributed.core import Status

        return self.worker.status in (Status.closing, Status.closing_gracefully, Status.closed, Status.failed)

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        if record.msg != HEARTBEAT_FAILED or getattr(record, "_mf_held", False):
            return True
        if self._closing():
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not logged from the worker's event loop: nothing to wait on
            return True
        record._mf_held = True
        loop.call_later(self.grace, self._show_if_running, logging.getLogger(record.name), record)
        return False

    def _show_if_running(self, logger: logging.Logger, record: logging.LogRecord) -> None:
        if not self._closing():
            logger.handle(record)


def dask_setup(worker) -> None:
    """Dask's preload hook, called in the worker process as the worker starts."""
    logging.getLogger("distributed.worker").addFilter(_ClosingHeartbeat(worker))
    _keep_silenced()
    _ignore_ctrl_c()


def _keep_silenced() -> None:
    """Keep the level the cluster set for the worker's console log (``silence_logs``) after the
    worker's close, which puts Dask's handler back to its own level: a worker whose scheduler
    went first went on to print "INFO - Received 'close-stream' from …; closing." at its end."""
    for handler in logging.getLogger("distributed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.level > logging.NOTSET:
            level = handler.level
            handler.addFilter(lambda record, level=level: record.levelno >= level)


def _ignore_ctrl_c() -> None:
    """The worker started with SIGINT blocked (``run._ctrl_c_for_this_process_only``: a
    terminal's Ctrl-C is for the client, which closes the cluster).  A block outlives exec, so a
    process that the user's code starts here would never get SIGINT (a server or tool stopped
    with ``send_signal(SIGINT)`` hung).  A handler that does nothing keeps the worker alive as
    the block did, and exec resets it to the default in such a child; the threads made from here
    on (the one that runs units among them) are unblocked."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return
    if signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
        return  # not started blocked (a cluster made otherwise): Dask's own behaviour stays
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
