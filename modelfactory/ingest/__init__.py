"""Bring data from external systems into partitioned Parquet datasets ready for ``train``.

>>> from modelfactory.ingest import prometheus
>>> callable(prometheus)
True

Note that ``modelfactory.ingest.prometheus`` is the function; the module that
defines it is reachable as ``sys.modules["modelfactory.ingest.prometheus"]``.
"""
from __future__ import annotations

from .prometheus import IngestSummary, prometheus

__all__ = ["prometheus", "IngestSummary"]
