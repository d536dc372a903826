"""Test helpers for modelfactory.ingest.prometheus: a real Prometheus with backfilled
history, and a tiny recording HTTP server for what Prometheus cannot show (headers,
odd responses, TLS).  Only 127.0.0.1 is used."""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

T0 = 1_709_251_200                     # 2024-03-01T00:00:00Z, first sample (unix seconds)
SAMPLES = 2 * 24 * 60                  # one sample per minute for two days
LAST = T0 + 60 * (SAMPLES - 1)         # last sample
#: (app, site, instance) of the mf_load series; the index is part of each value
SERIES = [("shop", "eu", "a"), ("shop", "eu", "b"), ("shop", "us", "a"), ("search", "eu/west 1", "a")]


def sample(i: int, k: int) -> float:
    """Value of series ``i`` at its ``k``-th sample."""
    return i * 10_000 + k + 0.25


def expected(first: int, last: int, step: int) -> list[tuple]:
    """Rows (app, site, instance, 'mf_load', ts_ms, value) that `mf_load` evaluates to,
    for unix-second evaluation times first, first + step, ..., last (within the history)."""
    assert T0 <= first <= last <= LAST + 59
    return [(app, site, inst, "mf_load", t * 1000, sample(i, (t - T0) // 60))
            for i, (app, site, inst) in enumerate(SERIES) for t in range(first, last + 1, step)]


def write_history(path: Path) -> None:
    with open(path, "w") as f:
        f.write("# TYPE mf_load gauge\n")
        for i, (app, site, inst) in enumerate(SERIES):
            for k in range(SAMPLES):
                f.write(f'mf_load{{app="{app}",site="{site}",instance="{inst}"}} '
                        f"{sample(i, k)!r} {T0 + 60 * k}\n")
        f.write("# TYPE mf_nosite gauge\n")
        for k in range(0, SAMPLES, 10):
            f.write(f'mf_nosite{{app="shop",instance="a"}} {k} {T0 + 60 * k}\n')
        f.write("# EOF\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_prometheus() -> bool:
    return bool(shutil.which("prometheus") and shutil.which("promtool"))


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def start_prometheus(root: Path, *flags: str) -> Prometheus:
    """Backfill the history into ``root/data`` and start Prometheus on a free port (``flags``
    are added to its command line, e.g. ``--query.timeout=5ms``)."""
    write_history(root / "history.om")
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics",
                    str(root / "history.om"), str(root / "data")],
                   check=True, capture_output=True, timeout=120)
    (root / "prom.yml").write_text("global:\n  scrape_interval: 1m\nscrape_configs: []\n")
    port, log = free_port(), root / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={root / 'prom.yml'}", f"--storage.tsdb.path={root / 'data'}",
             "--storage.tsdb.retention.time=100y", f"--web.listen-address=127.0.0.1:{port}", *flags],
            stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"prometheus not ready after 60 s: {log.read_text()[-2000:]}")


def query_range_requests(url: str) -> int:
    """How many /api/v1/query_range requests the Prometheus at ``url`` has answered (its own metric)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("prometheus_http_requests_total{") and 'handler="/api/v1/query_range"' in line)


def matrix(result: list, **extra) -> tuple[int, dict, bytes]:
    body = {"status": "success", "data": {"resultType": "matrix", "result": result}, **extra}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def echo_matrix(request: "Recorded") -> tuple[int, dict, bytes]:
    """Answer like Prometheus for one series {app="x", site="y"} with value = unix seconds."""
    start, end, step = (float(request.form[k]) for k in ("start", "end", "step"))
    values = [[start + i * step, str(start + i * step)] for i in range(int((end - start) / step) + 1)]
    return matrix([{"metric": {"__name__": "up", "app": "x", "site": "y"}, "values": values}])


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    form: dict


@dataclass
class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1 recording every request; ``respond`` answers (``None``:
    the connection is closed without an answer)."""

    respond: Callable[[Recorded], tuple[int, dict, bytes] | None] = echo_matrix
    certfile: Path | None = None
    requests: list[Recorded] = field(default_factory=list)

    def __enter__(self) -> "FakeServer":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                rec = Recorded("POST", self.path, self.headers, form)  # case-insensitive
                fake.requests.append(rec)
                answer = fake.respond(rec)
                if answer is None:  # hang up without a word, as a restarting proxy does
                    self.close_connection = True
                    return
                status, headers, body = answer
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if self.certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.certfile)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway (certificate + key PEM for the server, certificate PEM for clients) for 127.0.0.1."""
    pem, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(pem), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    both = directory / "both.pem"
    both.write_bytes(pem.read_bytes() + key.read_bytes())
    return both, pem
