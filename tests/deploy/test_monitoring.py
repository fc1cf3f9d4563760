"""Monitoring as shipped: the Prometheus configs, alert rules and Grafana dashboard in
`deploy/`, checked with the real `promtool` and the real `prometheus` server.

- promtool validates both scrape configs and the rules, and runs the rules' unit tests;
- every metric the dashboard, the alerts and docs/metrics.md name is one the roles define;
- the cluster config's file service discovery maps each target's role to the job the alerts use;
- a real Prometheus, started with the shipped local scrape config (only its ports rewritten), scrapes
  a short live `popo train` run; every dashboard query then returns data and every alert rule
  evaluates, with every series it selects present.

Prometheus comes from the Debian package `prometheus` (CI installs it, see .ci/run); without
`promtool` / `prometheus` on PATH these tests skip and say so.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from popo.common.process import free_port_block, free_ports

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboard.json"
ALERTS = PROM_DIR / "alerts.yml"
METRIC_SOURCES = [
    ROOT / "learner/service.py",
    ROOT / "verifier/service.py",
    ROOT / "actors/stats.py",
]

# Grafana's $__rate_interval for a 5 s scrape interval (max(4 x scrape, $__interval + scrape)).
RATE_INTERVAL = "20s"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it as root)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus server not installed (Debian package `prometheus`)",
)


# --- what the shipped files reference --------------------------------------------------------------


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, rows included."""
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def defined_metrics() -> dict[str, str]:
    """`popo_*` name -> instrument kind, as the roles create them (the code is the reference)."""
    pat = re.compile(r"m\.(counter|gauge|histogram)\(\s*\"(\w+)\"")
    found: dict[str, str] = {}
    for src in METRIC_SOURCES:
        for kind, name in pat.findall(src.read_text()):
            found["popo_" + name] = kind
    # collectors every role registers (read at scrape time)
    families = re.compile(r"CounterMetricFamily\(\s*PREFIX \+ \"(\w+)\"")
    for name in families.findall((ROOT / "common" / "metrics.py").read_text()):
        found["popo_" + name + "_total"] = "counter"
    return found


def referenced_metrics(expr: str) -> set[str]:
    """`popo_*` metric names in a PromQL expression, histogram suffixes stripped."""
    unquoted = re.sub(r'"[^"]*"', '""', expr)  # label values such as job="popo_actor"
    names = set(re.findall(r"\bpopo_[a-z_]+", unquoted))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def selectors(expr: str) -> set[str]:
    """Vector selectors (`name{matchers}`) of a PromQL expression: the series it needs to exist."""
    return {m.group(0) for m in re.finditer(r"\b(?:popo_[a-z_]+|up)\b(?:\{[^}]*\})?", expr)}


def grafana_expr(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL)


# --- static checks ---------------------------------------------------------------------------------


def test_dashboard_and_alerts_name_only_defined_metrics():
    defined = defined_metrics()
    assert len(defined) >= 40, sorted(defined)  # the regex still finds the roles' instruments
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 40
    for title, expr in queries:
        unknown = referenced_metrics(expr) - defined.keys()
        assert not unknown, f"panel {title!r} queries undefined metrics {unknown}: {expr}"
    for rule in alert_rules():
        unknown = referenced_metrics(rule["expr"]) - defined.keys()
        assert not unknown, f"alert {rule['alert']} uses undefined metrics {unknown}"
    # histograms are only queried through their series, counters only through rate/increase
    for _, expr in queries:
        for name in re.findall(r"\bpopo_[a-z_]+", re.sub(r'"[^"]*"', '""', expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if defined.get(base) == "histogram":
                assert name != base, f"histogram {base} queried without a suffix: {expr}"
            if defined.get(name) == "counter":
                assert re.search(rf"(rate|increase)\({name}\b", expr), expr


def test_dashboard_covers_every_panel_and_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ds_uid = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/popo.yml").read_text())[
        "datasources"
    ][0]["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"]["uid"] == ds_uid, p["title"]
        assert p["targets"], p["title"]
    used = set().union(*(referenced_metrics(e) for _, e in dashboard_queries(dash)))
    # the panels the dashboard must have, by the metric that carries each
    for name in [
        "popo_actor_tokens_total", "popo_learner_tokens_total", "popo_verifier_completions_total",
        "popo_learner_pass_rate", "popo_learner_eval_accuracy", "popo_learner_loss",
        "popo_learner_is_clip_fraction", "popo_learner_cosine_similarity", "popo_learner_ema_kl",
        "popo_learner_staleness_versions", "popo_learner_publish_seconds",
        "popo_actor_weight_reload_seconds", "popo_learner_buffer_groups",
        "popo_learner_outstanding_leases", "popo_verifier_verdicts_total",
        "popo_verifier_verify_seconds",
    ]:  # fmt: skip
        assert name in used, name
    assert any(p["type"] == "heatmap" and "staleness" in p["title"].lower() for p in panels)
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/popo.yml").read_text())
    compose = yaml.safe_load((GRAFANA_DIR / "docker-compose.yml").read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    dash_dir = provider["providers"][0]["options"]["path"]
    assert ["./dashboard.json", f"{dash_dir}/dashboard.json", "ro"] in mounts


def test_docs_list_every_metric():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = [n for n in defined_metrics() if f"`{n}`" not in doc]
    assert not missing, f"docs/metrics.md lacks {missing}"


@needs_promtool
def test_promtool_check_config():
    r = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml", "prometheus-cluster.yml"],
        cwd=PROM_DIR, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("is valid prometheus config file syntax") == 2, r.stdout


@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout, r.stdout


@needs_promtool
def test_promtool_alert_unit_tests():
    r = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=PROM_DIR, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    # every alert has at least one case in the unit tests
    tested = {
        c["alertname"]
        for t in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
        for c in t.get("alert_rule_test", [])
        if c.get("exp_alerts")
    }
    assert {r["alert"] for r in alert_rules()} <= tested


# --- a real Prometheus -----------------------------------------------------------------------------


def _free_port() -> int:
    return free_ports(1)[0]


def _api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


class Prometheus:
    """The real server on a free loopback port, with its own TSDB under `tmp`."""

    def __init__(self, config: Path, tmp: Path) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("prometheus did not become ready in 60 s")

    def api(self, path: str, **params: str) -> dict:
        return _api(self.url, path, **params)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@needs_prometheus
def test_cluster_config_maps_file_sd_roles_to_jobs(tmp_path):
    """prometheus-cluster.yml with the example targets file: each target's `role` becomes the job
    the alerts and the dashboard select on, and a target without a known role is dropped."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus-cluster.yml").read_text())
    cfg["rule_files"] = [str(ALERTS)]
    (tmp_path / "targets").mkdir()
    cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] = [str(tmp_path / "targets/*.json")]
    groups = json.loads((PROM_DIR / "targets.example.json").read_text())
    # unroutable example addresses -> loopback ports nobody listens on (scrapes fail fast)
    for g in groups:
        g["targets"] = [f"127.0.0.1:{_free_port()}" for _ in g["targets"]]
    groups.append({"targets": [f"127.0.0.1:{_free_port()}"], "labels": {"role": "other"}})
    (tmp_path / "targets" / "run.json").write_text(json.dumps(groups))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom = Prometheus(tmp_path / "prometheus.yml", tmp_path)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            active = prom.api("/api/v1/targets", state="active")["activeTargets"]
            if len(active) >= 4:
                break
            time.sleep(0.5)
        jobs = sorted(t["labels"]["job"] for t in active)
        assert jobs == ["popo_actor", "popo_actor", "popo_learner", "popo_verifier"], active
        assert {t["labels"]["run"] for t in active} == {"popo-example"}
        rules = prom.api("/api/v1/rules")["groups"]
        assert sum(len(g["rules"]) for g in rules) == len(alert_rules())
    finally:
        prom.stop()


def _local_config(tmp: Path, base: int) -> Path:
    """The shipped local scrape config, with the role ports (default base 9400) moved to `base`,
    the rule file path made absolute, and a 1 s scrape interval: the test run trains for ~5 s, and
    at the shipped 5 s a learner that finishes between two scrapes leaves no step samples (rate()
    needs two), which made this test flaky on a fast machine."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(ALERTS)]
    for job in cfg["scrape_configs"]:
        for sc in job["static_configs"]:
            sc["targets"] = [
                f"{host}:{int(port) - 9400 + base}"
                for host, port in (t.rsplit(":", 1) for t in sc["targets"])
            ]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for s in result for _, v in s["values"])


@pytest.mark.vllm
@needs_prometheus
def test_live_run_answers_every_dashboard_query_and_alert(tmp_path, demo_model_dir):
    base = free_port_block(40)  # learner base, verifiers +1+r, actors +20+i
    prom = Prometheus(_local_config(tmp_path, base), tmp_path)
    run_dir = tmp_path / "run"
    d, i, w, r, ws = (_free_port() for _ in range(5))
    args = [
        f"--deploy.run_dir={run_dir}", f"--model.path={demo_model_dir}",
        "--learner.total_steps=4", "--learner.prompts_per_step=4", "--learner.checkpoint_every=4",
        "--data.eval_size=16", "--actor.group_size=4",
        f"--transport.dispatch_port={d}", f"--transport.ingest_port={i}",
        f"--transport.weights_port={w}", f"--transport.rollouts_port={r}",
        f"--transport.weightstream_port={ws}", f"--metrics.base_port={base}",
    ]  # fmt: skip
    start = time.time()
    train = subprocess.Popen(
        [sys.executable, "-m", "popo.deploy.cli", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        out, _ = train.communicate(timeout=300)
        assert train.returncode == 0, out
        # `popo train` says where each role's metrics are served: the ports Prometheus scraped
        for role, port in (("learner", base), ("verifier-0", base + 1), ("actor-0", base + 20)):
            assert re.search(rf"{role}\s+http://127\.0\.0\.1:{port}/metrics", out), out
        end = time.time()

        # every role was scraped while the run lived
        up = prom.api("/api/v1/query_range", query="up", start=str(start), end=str(end), step="5")
        up_jobs = {
            s["metric"]["job"] for s in up["result"] if any(v == "1" for _, v in s["values"])
        }
        assert up_jobs == {"popo_learner", "popo_verifier", "popo_actor"}, up["result"]

        def query_range(expr: str) -> list[dict]:
            return prom.api(
                # a 1 s step: a learner's series live only ~5 s here (Prometheus marks them stale
                # at the first failed scrape after it exits), and 5 s steps could miss them all
                "/api/v1/query_range",
                query=expr,
                start=str(start),
                end=str(end),
                step="1",
            )["result"]

        # every dashboard query, exactly as shipped (Grafana's interval macro substituted)
        queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
        results = [(t, e, query_range(grafana_expr(e))) for t, e in queries]
        # kept beside the run for a failure's post-mortem (and the README's rendered panels)
        (tmp_path / "dashboard_results.json").write_text(
            json.dumps([{"panel": t, "expr": e, "result": r} for t, e, r in results])
        )
        empty = [(t, e) for t, e, r in results if not _has_finite_value(r)]
        assert not empty, f"{len(empty)}/{len(queries)} dashboard queries returned no data: {empty}"

        # every alert expression evaluates, and every series it selects exists
        mid = str((start + end) / 2)
        for rule in alert_rules():
            prom.api("/api/v1/query", query=rule["expr"], time=mid)
            for sel in selectors(rule["expr"]):
                assert query_range(sel), f"alert {rule['alert']}: no series for {sel}"

        # the rule group is loaded and every rule evaluated without error
        deadline = time.time() + 60
        while True:
            groups = prom.api("/api/v1/rules")["groups"]
            rules = [x for g in groups for x in g["rules"]]
            if all(x["health"] != "unknown" for x in rules) or time.time() > deadline:
                break
            time.sleep(1)
        assert sorted(x["name"] for x in rules) == sorted(x["alert"] for x in alert_rules())
        bad = [(x["name"], x["health"], x.get("lastError")) for x in rules if x["health"] != "ok"]
        assert not bad, bad
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGTERM)
            train.wait(timeout=60)
        prom.stop()
