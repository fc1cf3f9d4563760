"""Per-role metrics (docs/metrics.md): an isolated Prometheus registry served on `/metrics` (and `/healthz`),
and the same figures appended to `metrics.jsonl` in the run directory.

Every name starts with `popo_` and carries its unit (`_seconds`, `_total`, `_bytes`). Labels take only
bounded values (a verdict, a loss term), never ids.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from popo.common import transport
from popo.common.config import MetricsConfig

PREFIX = "popo_"

# `*_created` series double every counter's cardinality and no dashboard uses them.
disable_created_metrics()


class _QuietHandler(WSGIRequestHandler):
    def log_message(
        self, format: str, *args: Any
    ) -> None:  # scrapes every few seconds: no log spam
        pass


class _AuthRejections(Collector):
    """`popo_auth_rejections_total{endpoint}` in every role: Curve handshakes this process refused
    (a client key not on the endpoint's allow-list: a probe, a stale or a foreign key). The count
    lives in `transport` and is read at scrape time; an endpoint appears, at 0, once this process
    binds it (without Curve keys it stays 0)."""

    def collect(self) -> Any:
        fam = CounterMetricFamily(
            PREFIX + "auth_rejections", "Curve handshakes refused (unknown client key)",
            labels=["endpoint"],
        )  # fmt: skip
        for endpoint, n in sorted(transport.auth_rejections_by_endpoint().items()):
            fam.add_metric([endpoint], n)
        yield fam


class RoleMetrics:
    """Metrics of one role process.

    `role` is `learner`, `verifier` or `actor`; `instance` tells replicas apart in metrics.jsonl
    (e.g. `actor-1`). Create instruments with `counter` / `gauge` / `histogram`, call `serve()` once,
    and `tick()` from the role's loop to append a snapshot to metrics.jsonl every `jsonl_every_s`.
    """

    def __init__(
        self,
        role: str,
        cfg: MetricsConfig,
        run_dir: str | Path | None = None,
        instance: str | None = None,
    ) -> None:
        self.role = role
        self.instance = instance or role
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_AuthRejections())
        self.jsonl_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._last_write = 0.0
        self.started = time.time()

    # --- instruments --------------------------------------------------------------------------

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(PREFIX + name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, list(labels), registry=self.registry)

    def histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=self.registry)

    # --- exposition -----------------------------------------------------------------------------

    def serve(self, port: int) -> int:
        """Serve `/metrics` and `/healthz` on `cfg.host:port` in a daemon thread; returns the bound
        port (useful with port 0). No-op returning 0 when metrics are disabled."""
        if not self.cfg.enabled:
            return 0
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            if environ.get("PATH_INFO") == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            return metrics_app(environ, start_response)

        self._server = make_server(self.cfg.host, port, app, handler_class=_QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"metrics-{self.instance}", daemon=True
        )
        self._thread.start()
        return self._server.server_port

    def snapshot(self) -> dict[str, float]:
        """Current value of every sample, keyed `name{label="v",...}` (histograms as _sum/_count)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    continue
                key = s.name
                if s.labels:
                    key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}"
                out[key] = s.value
        return out

    def write_jsonl(self) -> None:
        """Append one snapshot line to metrics.jsonl (one write() call, so concurrent roles appending
        to the same file never interleave within a line)."""
        if self.jsonl_path is None:
            return
        line = json.dumps(
            {"t": time.time(), "role": self.role, "instance": self.instance, **self.snapshot()},
            separators=(",", ":"),
        )
        fd = os.open(self.jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
        self._last_write = time.monotonic()

    def tick(self) -> None:
        """Write a jsonl snapshot if `jsonl_every_s` has passed since the last one."""
        if time.monotonic() - self._last_write >= self.cfg.jsonl_every_s:
            self.write_jsonl()

    def close(self) -> None:
        self.write_jsonl()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def role_port(cfg: MetricsConfig, role: str, index: int = 0) -> int:
    """Metrics port of a role: learner base, verifier replica r base+1+r... (0 keeps 0: free port)."""
    if cfg.base_port == 0:
        return 0
    if role == "learner":
        return cfg.base_port
    if role == "verifier":
        return cfg.base_port + 1 + index
    if role == "actor":
        return cfg.base_port + 20 + index
    raise ValueError(f"unknown role {role!r}")


# Bucket layouts shared by roles, so dashboards see the same boundaries everywhere.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
