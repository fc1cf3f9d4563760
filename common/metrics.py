"""Per-role metrics (docs/metrics.md): an isolated Prometheus registry served on `/metrics` (and `/healthz`),
and the same figures appended to `metrics.jsonl` in the run directory.

Every name starts with `popo_` and carries its unit (`_seconds`, `_total`, `_bytes`). Labels take only
bounded values (a verdict, a loss term), never ids. On `/metrics` every series also carries `run` (the
run directory's name) and `role`, so one Prometheus can hold many runs and alerts can aggregate per
run without relying on the scrape job's name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from popo.common import transport
from popo.common.config import MetricsConfig
from popo.common.run_dir import RunDir

PREFIX = "popo_"

RESTARTS_ENV = "POPO_ROLE_RESTARTS"
"""How many times the launcher restarted this role before starting this process (the local supervisor
sets it; absent means 0)."""

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
            PREFIX + "auth_rejections",
            "Curve handshakes refused (unknown client key)",
            labels=["endpoint"],
        )
        for endpoint, n in sorted(transport.auth_rejections_by_endpoint().items()):
            fam.add_metric([endpoint], n)
        yield fam


class _RoleRestarts(Collector):
    """`popo_role_restarts_total`: the launcher's restart count for this role, from `RESTARTS_ENV`.
    Each process exports the count it was started with, so the series only grows across restarts
    and `increase()` over a window counts them (a role's own counters start over at each restart)."""

    def __init__(self) -> None:
        try:
            self.count = max(0, int(os.environ.get(RESTARTS_ENV, "0")))
        except ValueError:
            self.count = 0

    def collect(self) -> Any:
        fam = CounterMetricFamily(
            PREFIX + "role_restarts", "Times the launcher restarted this role during the run"
        )
        fam.add_metric([], self.count)
        yield fam


def process_tree_usage(pid: int | None = None) -> dict[str, float]:
    """Resident bytes, CPU seconds (user + system, live processes) and count of process `pid`
    (default: this one) and all its descendants, from /proc; empty without /proc."""
    children: dict[int, list[int]] = {}
    usage: dict[int, tuple[int, int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return {}
    for name in entries:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited since the listing
            continue
        # fields after the command name (which may hold spaces and parentheses): state, ppid, ...
        fields = stat[stat.rindex(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(name))
        usage[int(name)] = (int(fields[21]), int(fields[11]) + int(fields[12]))
    tree, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        p = todo.pop()
        if p in usage:
            tree.append(p)
            todo.extend(children.get(p, []))
    return {
        "rss_bytes": float(os.sysconf("SC_PAGE_SIZE") * sum(usage[p][0] for p in tree)),
        "cpu_seconds": sum(usage[p][1] for p in tree) / os.sysconf("SC_CLK_TCK"),
        "processes": float(len(tree)),
    }


class _ProcessTree(Collector):
    """`popo_process_tree_*`: this process and all its descendants, read from /proc at scrape
    time. `process_*` covers the role's own process only, while an actor's vLLM engine core and
    the verifier's scoring workers are its children. Nothing on a system without /proc."""

    def collect(self) -> Iterator[Metric]:
        usage = process_tree_usage()
        if not usage:
            return
        yield GaugeMetricFamily(
            PREFIX + "process_tree_resident_memory_bytes",
            "Resident memory of this process and its descendants (shared pages counted in each)",
            value=usage["rss_bytes"],
        )
        yield CounterMetricFamily(
            PREFIX + "process_tree_cpu_seconds",
            "CPU seconds (user + system) of this process and its live descendants",
            value=usage["cpu_seconds"],
        )
        yield GaugeMetricFamily(
            PREFIX + "process_tree_processes",
            "This process and its live descendants",
            value=usage["processes"],
        )


class _Static(Collector):
    """One pre-built family, exported unchanged at every scrape."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


class _WithLabels(Collector):
    """Every family of `registry` with `labels` added to each sample: constant labels, which
    prometheus-client has no built-in for. Only the exposition sees them; metrics.jsonl and
    `registry.get_sample_value` keep the plain names."""

    def __init__(self, registry: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.registry = registry
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for fam in self.registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in fam.samples]
            yield out


def run_id(run_dir: str | Path | None) -> str:
    """The `run` label: the run directory's name (unique per run, the same on every node)."""
    return Path(run_dir).resolve().name if run_dir is not None else ""


def run_info(run_dir: str | Path | None) -> dict[str, str]:
    """Labels of `popo_run_info`, from the run directory's config snapshot (`config.toml`, which
    every role reads): algorithm, model directory name and the package version. Missing values
    (no run directory, a test without a snapshot) are empty strings."""
    info = {"algorithm": "", "model": "", "version": ""}
    with contextlib.suppress(metadata.PackageNotFoundError):
        info["version"] = metadata.version("popo-rl")
    if run_dir is not None and RunDir(run_dir).config.exists():
        with open(RunDir(run_dir).config, "rb") as f:
            cfg = tomllib.load(f)
        info["algorithm"] = str(cfg.get("algorithm", {}).get("name", ""))
        info["model"] = Path(str(cfg.get("model", {}).get("path", ""))).name
    return info


class RoleMetrics:
    """Metrics of one role process.

    `role` is `learner`, `verifier` or `actor`; `instance` tells replicas apart in metrics.jsonl
    (e.g. `actor-1`). Create instruments with `counter` / `gauge` / `histogram`, call `serve()` once,
    and `tick()` from the role's loop to append a snapshot to metrics.jsonl every `jsonl_every_s`.

    `/metrics` serves the instruments plus `popo_run_info`, `popo_role_restarts_total`, the
    process's `process_*` metrics (RSS, CPU seconds, start time, open fds) and its process tree's
    memory, every series labelled with `run` and `role`.
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
        self.run = run_id(run_dir)
        # What only the exposition shows (the jsonl keeps the role's own figures): run identity,
        # restarts and process metrics, then everything with the constant labels.
        extra = CollectorRegistry(auto_describe=True)
        info = InfoMetricFamily(PREFIX + "run", "The run this process belongs to (value 1)")
        info.add_metric([], run_info(run_dir))
        extra.register(_Static(info))
        extra.register(_RoleRestarts())
        ProcessCollector(registry=extra)
        extra.register(_ProcessTree())
        labels = {"run": self.run, "role": role}
        self.exposed = CollectorRegistry(auto_describe=False)
        self.exposed.register(_WithLabels(self.registry, labels))
        self.exposed.register(_WithLabels(extra, labels))
        self.jsonl_path = RunDir(run_dir).metrics if run_dir is not None else None
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
        metrics_app = make_wsgi_app(self.exposed)

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
        # The process tree's CPU and memory too: what each role (its engine core or scoring
        # workers included) used over a run, for reports and benchmarks after it has ended.
        tree = process_tree_usage()
        rec = {"t": time.time(), "role": self.role, "instance": self.instance, **self.snapshot()}
        if tree:
            rec[PREFIX + "process_tree_cpu_seconds_total"] = tree["cpu_seconds"]
            rec[PREFIX + "process_tree_resident_memory_bytes"] = tree["rss_bytes"]
        line = json.dumps(rec, separators=(",", ":"))
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


def paired_p_value(
    before: Sequence[Sequence[int]],
    after: Sequence[Sequence[int]],
    draws: int = 100_000,
    seed: int = 0,
) -> float:
    """Two-sided p-value of the mean per-prompt change in accuracy from `before` to `after`
    ((positives, samples) of the same prompts, in the same order: `per_prompt` of eval.jsonl and
    `popo eval --out`), by a sign-flip permutation test: under no change each
    prompt's difference is as likely negated. Exact over every sign pattern up to 16 changed
    prompts, else `draws` random patterns (seeded). Pairing removes the spread between prompts,
    which dominates a pooled test of completions on a few dozen held-out prompts."""
    import numpy as np

    if len(before) != len(after):
        raise ValueError(f"paired results differ in length: {len(before)} vs {len(after)}")
    acc = lambda pairs: np.array([c / n for c, n in pairs], dtype=np.float64)  # noqa: E731
    d = acc(after) - acc(before)
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-12
    if d.size <= 16:
        signs = 1 - 2 * ((np.arange(2**d.size)[:, None] >> np.arange(d.size)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, draws, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, draws - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (hits + 1) / (draws + 1)
