"""Monitoring as shipped: the Prometheus configs, alert and recording rules, Alertmanager example
and Grafana dashboard in `deploy/`, checked with the real `promtool`, `amtool` and `prometheus`.

- promtool validates both scrape configs and the rules, and runs the rules' unit tests; amtool
  validates the Alertmanager example and where it routes each severity;
- every metric the dashboard, the rules and docs/metrics.md name is one the roles export, and every
  recorded series the dashboard reads is one recording.yml defines;
- the dashboard is importable elsewhere (`__inputs`, a datasource variable, no pinned uid) and scoped
  to one run (`run` and `instance` variables);
- the cluster config's file service discovery maps each target's role to its job and run, and drops
  a run's targets when the launcher removes its file;
- a real Prometheus, started with the shipped local scrape config (only its ports rewritten), scrapes
  a short live `popo train` run; every series carries the run's `run` and `role` labels,
  `popo_run_info` and the process metrics are there, every dashboard query returns data, and every
  alert and recording rule evaluates, with every series it selects present.

Prometheus and Alertmanager come from the Debian packages `prometheus` and `prometheus-alertmanager`;
without `promtool` / `prometheus` / `amtool` on PATH these tests skip and say so.
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
RECORDING = PROM_DIR / "recording.yml"
METRIC_SOURCES = [
    ROOT / "learner/service.py",
    ROOT / "learner/stats.py",
    ROOT / "verifier/service.py",
    ROOT / "actors/stats.py",
]

# Grafana's $__rate_interval for a 5 s scrape interval (max(4 x scrape, $__interval + scrape)).
RATE_INTERVAL = "20s"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus`; .ci/run installs it as root)",
)
needs_amtool = pytest.mark.skipif(
    shutil.which("amtool") is None,
    reason="amtool not installed (Debian package `prometheus-alertmanager`)",
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


def recording_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]]


def every_role_exports() -> dict[str, str]:
    """Sample name -> kind of what RoleMetrics adds to every role's /metrics (auth rejections, run
    info, restarts, process metrics), read from a real instance."""
    from popo.common.config import MetricsConfig
    from popo.common.metrics import RoleMetrics

    kinds = {"counter": "counter", "gauge": "gauge", "info": "gauge"}
    out: dict[str, str] = {}
    for family in RoleMetrics("learner", MetricsConfig()).exposed.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        out[family.name + suffix] = kinds[family.type]
    return out


def defined_metrics() -> dict[str, str]:
    """Metric name -> instrument kind, as the roles create them (the code is the reference)."""
    pat = re.compile(r"m\.(counter|gauge|histogram)\(\s*\"(\w+)\"")
    found: dict[str, str] = {}
    for src in METRIC_SOURCES:
        for kind, name in pat.findall(src.read_text()):
            found["popo_" + name] = kind
    found.update(every_role_exports())
    return found


RECORDED = re.compile(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b")


def referenced_metrics(expr: str) -> set[str]:
    """Exported metric names (`popo_*`, `process_*`) in a PromQL expression, histogram suffixes
    stripped. Recorded series (`level:metric:operation`) must be defined by recording.yml and are
    not counted: the recording rules' own expressions are checked instead."""
    unquoted = re.sub(r'"[^"]*"', '""', expr)  # label values such as job="popo_actor"
    recorded = set(RECORDED.findall(unquoted))
    unknown = recorded - {r["record"] for r in recording_rules()}
    assert not unknown, f"{expr} reads series no recording rule defines: {unknown}"
    names = set(re.findall(r"\b(?:popo|process)_[a-z_]+", RECORDED.sub("", unquoted)))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def selectors(expr: str) -> set[str]:
    """Vector selectors (`name{matchers}`) of a PromQL expression: the series it needs to exist
    (recorded series included; nothing inside a quoted label value)."""
    name = r"[a-z_]+:[a-z_]+:[a-z0-9_]+|popo_[a-z_]+|process_[a-z_]+|up"
    pat = rf'"[^"]*"|(?<![\w:])(?:{name})\b(?:\{{[^}}]*\}})?'
    return {m.group(0) for m in re.finditer(pat, expr) if not m.group(0).startswith('"')}


def grafana_expr(expr: str, run: str = "run", rng: str = "5m") -> str:
    """A dashboard query as Grafana sends it: interval macros and the variables filled in (the run
    chosen, every instance)."""
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", rng)
        .replace("${run:regex}", re.escape(run))
        .replace("$run", run)
        .replace("$instance", ".*")
    )


# --- static checks ---------------------------------------------------------------------------------


def test_dashboard_and_rules_name_only_defined_metrics():
    defined = defined_metrics()
    assert len(defined) >= 40, sorted(defined)  # the regex still finds the roles' instruments
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 40
    for title, expr in queries:
        unknown = referenced_metrics(expr) - defined.keys()
        assert not unknown, f"panel {title!r} queries undefined metrics {unknown}: {expr}"
    for rule in alert_rules() + recording_rules():
        unknown = referenced_metrics(rule["expr"]) - defined.keys()
        assert not unknown, f"rule {rule.get('alert') or rule['record']} uses undefined {unknown}"
    # every recording rule is read by the dashboard (else it is load for nothing)
    read = {n for _, e in queries for n in RECORDED.findall(e)}
    assert read == {r["record"] for r in recording_rules()}
    # histograms are only queried through their series, counters only through rate/increase
    exprs = [e for _, e in queries] + [r["expr"] for r in recording_rules()]
    for expr in exprs:
        for name in re.findall(r"\bpopo_[a-z_]+", RECORDED.sub("", re.sub(r'"[^"]*"', '""', expr))):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if defined.get(base) == "histogram":
                assert name != base, f"histogram {base} queried without a suffix: {expr}"
            if defined.get(name) == "counter":
                assert re.search(rf"(rate|increase)\({name}\b", expr), expr


def _metric_matchers(expr: str) -> list[tuple[str, str]]:
    """(metric, matchers) of every selector of an exported or recorded metric in `expr`."""
    return [
        (m.group(1), m.group(2) or "")
        for m in re.finditer(
            r"(?<![\w:])((?:[a-z_]+:)?(?:popo|process)_[a-z_]+(?::\w+)?)(\{[^}]*\})?", expr
        )
    ]


def test_dashboard_is_portable_and_scoped_to_one_run():
    """Importable into any Grafana (the datasource is an input and a variable, never a pinned uid)
    and provisioned by the shipped files; every query is scoped to the chosen run, actor / verifier
    / process queries also to the chosen instances; the targets panel turns red on a failed scrape."""
    dash = json.loads(DASHBOARD.read_text())
    (ds_input,) = [i for i in dash["__inputs"] if i["type"] == "datasource"]
    assert ds_input["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds_var = variables["datasource"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    # an import replaces ${DS_...} with the chosen datasource; provisioning leaves it unresolved,
    # and Grafana then selects the default datasource, which the provisioned one is
    assert ds_var["current"]["value"] == "${" + ds_input["name"] + "}"
    provisioned = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/popo.yml").read_text())
    assert provisioned["datasources"][0]["isDefault"] is True
    text = DASHBOARD.read_text()
    assert provisioned["datasources"][0]["uid"] not in text  # nothing pins the provisioned uid

    def refs(obj: object) -> list[dict]:
        if isinstance(obj, dict):
            here = [obj["datasource"]] if isinstance(obj.get("datasource"), dict) else []
            return here + [r for v in obj.values() for r in refs(v)]
        if isinstance(obj, list):
            return [r for v in obj for r in refs(v)]
        return []

    ds_refs = refs(dash["panels"]) + refs(dash["templating"]["list"][1:])
    assert ds_refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in ds_refs)

    assert "popo_run_info" in variables["run"]["query"]["query"]
    assert variables["run"]["multi"] is False and variables["run"]["includeAll"] is False
    assert '{run="$run"}' in variables["instance"]["query"]["query"]
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    for title, expr in dashboard_queries(dash):
        for name, matchers in _metric_matchers(expr):
            assert 'run="$run"' in matchers, f"{title}: {name} not scoped to the run: {expr}"
            if re.match(r"(popo_actor_|popo_verifier_|process_|popo_process_|popo_role_)", name):
                assert 'instance=~"$instance"' in matchers, f"{title}: {expr}"

    (up,) = [p for p in dash["panels"] if p["title"] == "Scrape targets up"]
    (target,) = up["targets"]
    # every role's target, down ones included (role is a target label in both scrape configs)
    assert target["expr"].startswith('up{role=~"learner|verifier|actor"')
    steps = up["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps == [{"color": "red", "value": None}, {"color": "green", "value": 1}]
    (mapping,) = up["fieldConfig"]["defaults"]["mappings"]
    assert mapping["options"]["0"]["color"] == "red" and mapping["options"]["1"]["color"] == "green"


def test_dashboard_covers_every_panel():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"], p["title"]
    # what the panels read, directly or through the recorded series
    exprs = [e for _, e in dashboard_queries(dash)] + [r["expr"] for r in recording_rules()]
    used = set().union(*(referenced_metrics(e) for e in exprs))
    # the panel list the dashboard was built for, by the metric that carries each
    for name in [
        "popo_actor_tokens_total",
        "popo_learner_tokens_total",
        "popo_verifier_completions_total",
        "popo_learner_pass_rate",
        "popo_learner_eval_accuracy",
        "popo_learner_loss",
        "popo_learner_is_clip_fraction",
        "popo_learner_cosine_similarity",
        "popo_learner_ema_kl",
        "popo_learner_staleness_versions",
        "popo_learner_publish_seconds",
        "popo_learner_published_change_fraction",
        "popo_actor_weight_reload_seconds",
        "popo_learner_buffer_groups",
        "popo_learner_outstanding_leases",
        "popo_verifier_verdicts_total",
        "popo_verifier_verify_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "popo_role_restarts_total",
        "popo_process_tree_resident_memory_bytes",
    ]:
        assert name in used, name
    assert any(p["type"] == "heatmap" and "staleness" in p["title"].lower() for p in panels)
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/popo.yml").read_text())
    compose = yaml.safe_load((GRAFANA_DIR / "docker-compose.yml").read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    dash_dir = provider["providers"][0]["options"]["path"]
    assert ["./dashboard.json", f"{dash_dir}/dashboard.json", "ro"] in mounts


def test_docs_list_every_metric_alert_and_recording_rule():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    names = [*defined_metrics(), *(r["alert"] for r in alert_rules())]
    names += [r["record"] for r in recording_rules()]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/metrics.md lacks {missing}"


@needs_promtool
def test_promtool_check_config():
    r = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml", "prometheus-cluster.yml"],
        cwd=PROM_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("is valid prometheus config file syntax") == 2, r.stdout


@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS), str(RECORDING)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout, r.stdout
    assert f"SUCCESS: {len(recording_rules())} rules found" in r.stdout, r.stdout


@needs_promtool
def test_promtool_alert_unit_tests():
    r = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=PROM_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    # the recording rules have expected values too
    checked = {
        m
        for t in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
        for c in t.get("promql_expr_test", [])
        for m in RECORDED.findall(c["expr"])
    }
    assert len(checked) >= 4, checked


@needs_amtool
def test_alertmanager_example_is_valid_and_routes_by_severity():
    example = str(PROM_DIR / "alertmanager.example.yml")
    r = subprocess.run(["amtool", "check-config", example], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout

    def receiver(*labels: str) -> str:
        r = subprocess.run(
            ["amtool", "config", "routes", "test", f"--config.file={example}", *labels],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.strip()

    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        got = receiver(f"alertname={rule['alert']}", f"severity={severity}", "run=r1")
        assert got == {"critical": "popo-pager", "warning": "popo-chat"}[severity], rule["alert"]
    # grouped per run: two runs never share a notification
    config = yaml.safe_load(Path(example).read_text())
    assert "run" in config["route"]["group_by"]
    assert all("run" in rule["equal"] for rule in config["inhibit_rules"])


def test_supervisor_passes_each_role_its_restart_count(tmp_path):
    """The local supervisor starts a role with its restart count in the environment, and the role's
    /metrics exports it as popo_role_restarts_total, labelled with the run and the role."""
    from popo.common.config import DeployConfig
    from popo.deploy.launch import Role
    from popo.deploy.restart_policy import RestartPolicy

    run_dir = tmp_path / "r7"
    (run_dir / "logs").mkdir(parents=True)
    code = (
        "from prometheus_client import generate_latest\n"
        "from popo.common.config import MetricsConfig\n"
        "from popo.common.metrics import RoleMetrics\n"
        f"m = RoleMetrics('actor', MetricsConfig(), {str(run_dir)!r}, instance='actor-0')\n"
        "print(generate_latest(m.exposed).decode())\n"
    )
    role = Role("actor-0", [sys.executable, "-c", code], True, run_dir / "logs" / "actor-0.log")
    role.policy = RestartPolicy.of(DeployConfig(), limit=5)
    for restarts in (0, 2):
        role.policy.restarts = restarts
        role.start(dict(os.environ))
        assert role.proc is not None and role.proc.wait(timeout=60) == 0
        exported = role.log_path.read_text().rsplit("=== start", 1)[1]
        assert f'popo_role_restarts_total{{role="actor",run="r7"}} {restarts}.0' in exported
        assert 'process_resident_memory_bytes{role="actor",run="r7"}' in exported


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
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
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
    """prometheus-cluster.yml with the example targets file: each target's `role` becomes its job,
    `role` and `run` stay on `up` for the alerts and the dashboard, a target without a known role
    is dropped, and removing the file (as the launcher does when a run ends) drops the run's
    targets, so its Down alerts cannot fire."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus-cluster.yml").read_text())
    cfg["rule_files"] = [str(ALERTS), str(RECORDING)]
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
        assert all(t["labels"]["job"] == "popo_" + t["labels"]["role"] for t in active)
        rules = prom.api("/api/v1/rules")["groups"]
        assert sum(len(g["rules"]) for g in rules) == len(alert_rules()) + len(recording_rules())

        (tmp_path / "targets" / "run.json").unlink()
        deadline = time.time() + 60  # file SD watches the directory; refresh_interval is 30 s
        while prom.api("/api/v1/targets", state="active")["activeTargets"]:
            assert time.time() < deadline, "targets still active after their file was removed"
            time.sleep(0.5)
    finally:
        prom.stop()


def _local_config(tmp: Path, base: int) -> Path:
    """The shipped local scrape config, with the role ports (default base 9400) moved to `base`,
    the rule file paths made absolute, and 1 s scrape and rule intervals: the test run trains for ~5 s, and
    at the shipped 5 s a learner that finishes between two scrapes leaves no step samples (rate()
    needs two), which made this test flaky on a fast machine."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ALERTS), str(RECORDING)]
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
        f"--deploy.run_dir={run_dir}",
        f"--model.path={demo_model_dir}",
        "--learner.total_steps=4",
        "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=4",
        "--data.eval_size=16",
        "--actor.group_size=4",
        f"--transport.dispatch_port={d}",
        f"--transport.ingest_port={i}",
        f"--transport.weights_port={w}",
        f"--transport.rollouts_port={r}",
        f"--transport.weightstream_port={ws}",
        f"--metrics.base_port={base}",
    ]
    start = time.time()
    train = subprocess.Popen(
        [sys.executable, "-m", "popo.deploy.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
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

        # every series a role exported carries its run (the run directory's name) and its role
        run = run_dir.name
        series = prom.api(
            "/api/v1/series",
            **{"match[]": '{__name__=~"popo_.+|process_.+"}', "start": str(start), "end": str(end)},
        )
        assert len(series) >= 60, series
        wrong = [
            x for x in series if x.get("run") != run or x["job"] != "popo_" + x.get("role", "")
        ]
        assert not wrong, wrong[:5]

        def last(expr: str) -> dict[str, float]:
            """role -> last value of `expr` during the run (one series per role here)."""
            out = {}
            for x in prom.api(
                "/api/v1/query_range", query=expr, start=str(start), end=str(end), step="1"
            )["result"]:
                out[x["metric"]["role"]] = float(x["values"][-1][1])
            return out

        roles = {"learner", "verifier", "actor"}
        info = prom.api(
            "/api/v1/query_range", query="popo_run_info", start=str(start), end=str(end), step="1"
        )["result"]
        assert {x["metric"]["role"] for x in info} == roles, info
        for x in info:
            assert x["metric"]["run"] == run and x["metric"]["algorithm"] == "popo", x
            assert x["metric"]["model"] == Path(demo_model_dir).resolve().name, x
            assert x["metric"]["version"], x
        # process metrics of each role's own process, and no restarts in a clean run
        assert all(v > 20e6 for v in last("process_resident_memory_bytes").values())
        assert last("process_resident_memory_bytes").keys() == roles
        assert all(v > 0 for v in last("process_cpu_seconds_total").values())
        started = last("process_start_time_seconds")
        assert started.keys() == roles and all(start - 5 < t < end for t in started.values())
        assert last("popo_role_restarts_total") == dict.fromkeys(roles, 0.0)
        # with children: the verifier's scoring workers at least (spawned, so never fewer)
        rss, tree = (
            last("process_resident_memory_bytes"),
            last("popo_process_tree_resident_memory_bytes"),
        )
        assert all(tree[r] >= rss[r] for r in roles), (tree, rss)
        assert last("popo_process_tree_processes")["verifier"] >= 2

        # the dashboard's variables: this run, and its three targets
        assert run in prom.api("/api/v1/label/run/values", **{"match[]": "popo_run_info"})
        instances = prom.api(
            "/api/v1/label/instance/values",
            **{"match[]": f'popo_run_info{{run="{run}"}}', "start": str(start), "end": str(end)},
        )
        assert sorted(instances) == sorted(
            f"127.0.0.1:{port}" for port in (base, base + 1, base + 20)
        ), instances

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
        results = [(t, e, query_range(grafana_expr(e, run))) for t, e in queries]
        # kept beside the run for a failure's post-mortem (and the README's rendered panels)
        (tmp_path / "dashboard_results.json").write_text(
            json.dumps([{"panel": t, "expr": e, "result": r} for t, e, r in results])
        )
        empty = [(t, e) for t, e, r in results if not _has_finite_value(r)]
        assert not empty, f"{len(empty)}/{len(queries)} dashboard queries returned no data: {empty}"

        # every alert and recording expression evaluates, and every series it selects exists
        mid = str((start + end) / 2)
        for rule in alert_rules() + recording_rules():
            prom.api("/api/v1/query", query=rule["expr"], time=mid)
            for sel in selectors(rule["expr"]):
                assert query_range(sel), f"{rule.get('alert') or rule['record']}: no {sel}"
        # every recorded series was written by Prometheus while the run lived, with its run label
        for rule in recording_rules():
            got = query_range(rule["record"])
            assert got and all(x["metric"]["run"] == run for x in got), rule["record"]

        # the rule groups are loaded and every rule evaluated without error
        deadline = time.time() + 60
        while True:
            groups = prom.api("/api/v1/rules")["groups"]
            rules = [x for g in groups for x in g["rules"]]
            if all(x["health"] != "unknown" for x in rules) or time.time() > deadline:
                break
            time.sleep(1)
        names = [x["alert"] for x in alert_rules()] + [x["record"] for x in recording_rules()]
        assert sorted(x["name"] for x in rules) == sorted(names)
        bad = [(x["name"], x["health"], x.get("lastError")) for x in rules if x["health"] != "ok"]
        assert not bad, bad
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGTERM)
            train.wait(timeout=60)
        prom.stop()
