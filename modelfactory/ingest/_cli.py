"""The ``ingest`` command: ``python -m modelfactory ingest prometheus ...``.

:func:`add_parser` adds the command to the top-level parser; each source's
subparser sets ``func=run``.  Errors are not caught here: the top-level CLI
turns :class:`~modelfactory.exceptions.IngestError` into one ``error: ...`` line.
Secrets have their own files and environment variables, which do not show up in
``ps`` or shell history; ``--url`` with ``user:password@`` (basic auth, as the library
takes it) and ``--header`` do show there, and the docs say so.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..exceptions import IngestError

__all__ = ["add_parser", "run"]

_EXAMPLES = """\
examples:
  python -m modelfactory ingest prometheus --url http://prometheus:9090 \\
      --query 'sum by (app, site) (rate(http_requests_total[5m]))' \\
      --start 2024-03-01 --end now --step 5m --by app,site --out data/requests

  MODELFACTORY_PROM_TOKEN=... python -m modelfactory ingest prometheus \\
      --url https://mimir.example/prometheus --header 'X-Scope-OrgID: team-a' ...

Rerunning a range, or extending it later, never duplicates points, and keeps points
Prometheus no longer holds (past its retention).  Keep --query, --step and --by: another
one is refused (the dataset would mix two definitions) unless --overwrite starts it over.
One ingest at a time per --out: a second one is refused while the first holds its lock.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ingest`` (with its ``prometheus`` source) to ``subparsers``; return the ``ingest`` parser."""
    ingest = subparsers.add_parser(
        "ingest", help="download metrics into a Hive-partitioned Parquet dataset",
        description="Download metrics from an external system into a Hive-partitioned Parquet "
                    "dataset ready for `train`.")
    sources = ingest.add_subparsers(title="sources", dest="source", metavar="SOURCE", required=True)
    p = sources.add_parser(
        "prometheus", help="run a PromQL range query (Prometheus, Thanos, Cortex, Mimir)",
        description="Run a PromQL range query in time chunks and write one row per point\n"
                    "(labels as columns, ts, value), partitioned by the --by labels.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    q = p.add_argument_group("query")
    q.add_argument("--url", required=True,
                   help="root of the Prometheus HTTP API, e.g. http://prometheus:9090")
    q.add_argument("--query", required=True, help="PromQL expression")
    q.add_argument("--start", required=True,
                   help="ISO-8601 time (UTC if no offset), unix seconds, or now-3d")
    q.add_argument("--end", required=True, help="same forms as --start; inclusive")
    q.add_argument("--step", required=True, help="resolution: seconds or 30s, 5m, 1h, ...")
    q.add_argument("--by", required=True,
                   help="comma-separated labels to partition by, e.g. app,site ('' for none)")
    q.add_argument("--out", required=True, help="dataset root: a path or an fsspec URL (s3://...)")
    q.add_argument("--overwrite", action="store_true",
                   help="start the dataset in --out over: delete the files of earlier ingests (needed to "
                        "change --query, --step or --by)")
    q.add_argument("--config", metavar="FILE", help="TOML settings file (default: $MODELFACTORY_CONFIG): its "
                                                    "[storage_options] reach an s3:// --out, as for train")
    a = p.add_argument_group("authentication and TLS")
    a.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra HTTP header, repeatable, e.g. 'X-Scope-OrgID: tenant-1'")
    a.add_argument("--bearer-token-file", metavar="PATH",
                   help="file holding a bearer token (default: $MODELFACTORY_PROM_TOKEN)")
    a.add_argument("--basic-auth-user", metavar="USER",
                   help="basic auth user; password from $MODELFACTORY_PROM_PASSWORD or "
                        "--basic-auth-password-file")
    a.add_argument("--basic-auth-password-file", metavar="PATH", help="file holding the password")
    a.add_argument("--ca-file", metavar="PATH", help="CA bundle to verify the server certificate")
    a.add_argument("--no-verify-tls", action="store_true",
                   help="do not verify the server certificate (trusted networks only)")
    t = p.add_argument_group("tuning")
    t.add_argument("--concurrency", type=int, default=4, help="chunks fetched at once (default 4)")
    t.add_argument("--max-points", type=int, default=11_000,
                   help="points per series per request, at most 11000 (default 11000)")
    t.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    t.add_argument("--retries", type=int, default=3,
                   help="retries of connection errors and HTTP 429/5xx, not of timeouts (default 3)")
    p.set_defaults(func=run)
    return ingest


def run(args: argparse.Namespace) -> int:
    """Run ``ingest prometheus`` from parsed ``args``, print the summary, return 0."""
    # --config's [storage_options], as every command reads them
    from ..cli import _storage_options
    from .prometheus import prometheus

    headers = {}
    for i, text in enumerate(args.header, 1):
        name, sep, value = text.partition(":")
        if not sep or not name.strip():
            raise IngestError(f"--header number {i} must look like 'Name: value' (its text is not "
                              "shown, it may hold a secret).")
        headers[name.strip()] = value.strip()
    summary = prometheus(
        args.url, args.query, args.start, args.end, args.step,
        by=[c.strip() for c in args.by.split(",") if c.strip()], out=args.out, headers=headers,
        bearer_token_file=args.bearer_token_file, basic_auth_user=args.basic_auth_user,
        basic_auth_password_file=args.basic_auth_password_file,
        verify_tls=not args.no_verify_tls, ca_file=args.ca_file, concurrency=args.concurrency,
        max_points=args.max_points, timeout=args.timeout, retries=args.retries, overwrite=args.overwrite,
        storage_options=_storage_options(args))
    print(summary)
    return 0
