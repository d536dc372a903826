"""Worker preload of the clusters modelfactory makes (:func:`modelfactory.run.local_cluster`):
keeps one known shutdown race of Dask off the console.

A worker heartbeats the scheduler on its own connection.  When the cluster closes at the
end of a job, a heartbeat still waiting for its answer fails as the worker closes its
connections, and Dask logs it at ERROR level with two tracebacks ("Failed to communicate
with scheduler during heartbeat.", dask/distributed's ``Worker.heartbeat``), after a job
that went well.  This drops that one record, and only while the worker is closing; a
heartbeat failing on a running worker is still shown.
"""
from __future__ import annotations

import logging

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


class _ClosingHeartbeat(logging.Filter):
    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.core import Status

        return not (record.msg == HEARTBEAT_FAILED
                    and self.worker.status in (Status.closing, Status.closing_gracefully, Status.closed))


def dask_setup(worker) -> None:
    """Dask's preload hook, called in the worker process as the worker starts."""
    logging.getLogger("distributed.worker").addFilter(_ClosingHeartbeat(worker))
