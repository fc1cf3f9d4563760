"""The Kubernetes manifests (deploy/k8s/), checked where no Kubernetes runs.

- Every document validates against its kind's schema (KubeRay's CRDs, the Prometheus Operator's
  PodMonitor CRD, Kubernetes' PersistentVolumeClaim; tests/deploy/schemas/), strictly: an unknown
  field fails, as `kubectl apply`'s field validation makes it fail.
- The RayJob's runtime env and the launcher's go through Ray's own runtime-env validation and the
  merge `ray.init` applies to a job's driver.
- The cluster's layout matches the config the job runs: roles on worker pods (not the head), the
  claims defined, GPU pods tolerate the GPU taint, the PodMonitor's relabelling gives each port the
  role the launcher's targets give it, Ray's dashboard bound to the pod IP behind a token.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from popo.common.config import load_config
from popo.common.metrics import role_port
from popo.deploy.ray_launch import (
    LaunchError,
    driver_runtime_env,
    job_env_vars,
    placements,
    worker_env,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
SCHEMAS = Path(__file__).with_name("schemas")
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _strict(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to other fields (what the API
    server's strict field validation does), except where the CRD keeps unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    out = {}
    for f in SCHEMAS.glob("*.json"):
        doc = json.loads(f.read_text())
        out[doc["apiVersion"], doc["kind"]] = jsonschema.Draft7Validator(_strict(doc["schema"]))
    return out


VALIDATORS = _validators()
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _errors(doc: dict) -> list[str]:
    v = VALIDATORS.get((doc.get("apiVersion"), doc.get("kind")))
    assert v is not None, f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"
    errs = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    name = doc.get("metadata", {}).get("name", "")
    if not (DNS_1123.fullmatch(name) and len(name) <= 63):
        errs.append(f"metadata/name: {name!r} is not a DNS-1123 name")
    return errs


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_validates_against_its_schema(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        assert _errors(doc) == [], (doc["kind"], _errors(doc))


def test_schema_check_catches_mistakes() -> None:
    """The validation is not vacuous: a misspelled field or a wrong type fails."""
    cluster = _docs(K8S / "raycluster.yaml")[0]
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["toleration"] = []
    assert any("toleration" in e for e in _errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    assert any("replicas" in e for e in _errors(bad))
    job = _docs(K8S / "rayjob.yaml")[0]
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = "no"
    assert any("shutdownAfterJobFinishes" in e for e in _errors(bad))
    claim = next(d for d in _docs(K8S / "volumes.yaml") if d["kind"] == "PersistentVolumeClaim")
    bad = copy.deepcopy(claim)
    bad["spec"]["accessMode"] = ["ReadWriteOnce"]
    assert any("accessMode" in e for e in _errors(bad))


# --- the RayJob's environment through Ray's own merge ------------------------------------------


def _job_runtime_env() -> dict:
    job = _docs(K8S / "rayjob.yaml")[0]
    return yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_rayjob_runtime_env_merges_with_the_launchers() -> None:
    """What `ray.init` does in a job's driver: Ray validates both runtime envs and merges them with
    `_merge_runtime_env`, which returns None (and `ray.init` raises) when env_vars keys collide."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    cfg = load_config(REPO / "deploy/configs/qwen2.5-math-7b-2node.toml")
    job_env = RuntimeEnv(**_job_runtime_env())
    driver = RuntimeEnv(**driver_runtime_env(cfg, dict(job_env.get("env_vars", {}))))
    merged = _merge_runtime_env(job_env, driver)
    assert merged is not None, "Ray refuses to merge the job's and the launcher's runtime env"
    # every worker of the run gets the whole offline environment, and the job's own variables
    assert merged["env_vars"] == {**worker_env(cfg), **job_env["env_vars"]}
    assert merged["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert int(merged["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) > 3 * cfg.deploy.stop_grace_s


def test_job_that_repeats_the_offline_env_still_merges() -> None:
    """A job that sets some of the run's variables to the same values (as a hand-written
    `--runtime-env-json` may): passing the launcher's whole env would be refused by Ray; the
    launcher leaves those keys to the job. A job that sets one to another value is refused by the
    launcher with the variable's name."""
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    cfg = load_config(None, ['--deploy.ray.env_vars={"NCCL_DEBUG": "WARN"}'])
    job = RuntimeEnv(env_vars={"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "NCCL_DEBUG": "WARN"})
    assert _merge_runtime_env(job, RuntimeEnv(env_vars=worker_env(cfg))) is None  # Ray's refusal
    merged = _merge_runtime_env(job, RuntimeEnv(**driver_runtime_env(cfg, job["env_vars"])))
    assert merged is not None and merged["env_vars"] == worker_env(cfg)
    with pytest.raises(LaunchError, match=r"HF_HUB_OFFLINE='0'.*needs '1'"):
        driver_runtime_env(cfg, {"HF_HUB_OFFLINE": "0"})


def test_job_env_vars_reads_what_the_job_server_injects(monkeypatch) -> None:
    """The job server hands the driver its runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR; the launcher
    reads the same value Ray's JobConfig parses from it."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.job_config import JobConfig

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert job_env_vars() == {}
    injected = {"runtime_env": _job_runtime_env(), "metadata": {}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(injected))
    assert job_env_vars() == JobConfig.from_json(injected).runtime_env["env_vars"]
    assert job_env_vars() == {"RAY_JOB_STOP_WAIT_TIME_S": "200"}


# --- the cluster's layout against the config it runs -------------------------------------------


def _cluster() -> dict:
    return _docs(K8S / "raycluster.yaml")[0]


def _groups(cluster: dict) -> list[tuple[str, dict]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]


def _job_config():
    job = _docs(K8S / "rayjob.yaml")[0]
    entry = job["spec"]["entrypoint"].split()
    config = entry[entry.index("--config") + 1]
    flags = [a for a in entry if a.startswith("--") and "=" in a]
    return load_config(REPO / config.removeprefix("/app/"), flags)


def test_roles_run_on_worker_pods_not_the_head() -> None:
    """The head offers no CPUs, GPUs or custom resources to tasks, so every role's bundle lands on
    a worker pod; each bundle fits the pod whose custom resources it asks for."""
    cfg = _job_config()
    nodes = {}
    for name, g in _groups(_cluster()):
        params = g["rayStartParams"]
        res = json.loads(json.loads(params.get("resources", '"{}"')))
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes[name] = {
            **res,
            "CPU": float(params.get("num-cpus", limits["cpu"])),
            "GPU": float(limits.get("nvidia.com/gpu", 0)),
        }
    assert nodes["head"] == {"CPU": 0.0, "GPU": 0.0}
    where = {}
    for p in placements(cfg):
        need = {**p.bundle}
        fits = [n for n, free in nodes.items() if all(free.get(k, 0) >= v for k, v in need.items())]
        assert fits and "head" not in fits, (p.name, need, fits)
        node = fits[0]
        for k, v in need.items():
            nodes[node][k] -= v
        where[p.name] = node
    assert where["learner"] == "learner" and where["verifier-0"] == "learner"
    assert {where[f"actor-{i}"] for i in range(cfg.actor.num_actors)} == {"actors"}


def test_claims_are_defined_and_gpu_pods_tolerate_the_gpu_taint() -> None:
    defined = {
        d["metadata"]["name"]
        for d in _docs(K8S / "volumes.yaml")
        if d["kind"] == "PersistentVolumeClaim"
    }
    used = set()
    for name, g in _groups(_cluster()):
        pod = g["template"]["spec"]
        used |= {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        gpus = any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in pod["containers"])
        tolerated = any(
            t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists"
            for t in pod.get("tolerations", [])
        )
        assert tolerated == gpus, name
    assert used and used <= defined, used - defined


def _relabel(rules: list[dict], labels: dict[str, str]) -> dict[str, str]:
    """Prometheus `replace` relabelling (the only action used): anchored regex on the joined
    source labels, `$1`-style replacement into the target label."""
    out = dict(labels)
    for r in rules:
        value = ";".join(out.get(s, "") for s in r["sourceLabels"])
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        if m is None:
            continue
        groups = [m.group(0), *m.groups()]
        out[r["targetLabel"]] = re.sub(
            r"\$(\d+)", lambda g, gs=groups: gs[int(g[1])] or "", r.get("replacement", "$1")
        )
    return out


def test_podmonitor_gives_every_metrics_port_its_role() -> None:
    """Every role's metrics port is declared on the pod the role runs on, scraped by the PodMonitor,
    and relabelled to the `role` / `replica` labels the launcher's file-SD targets carry (the alert
    rules select on `role`, never on the job name the Operator rewrites)."""
    cfg = _job_config()
    (monitor,) = _docs(K8S / "podmonitor.yaml")
    cluster = _cluster()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= cluster["metadata"]["labels"].items()
    )
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    ports = {}
    for name, g in _groups(cluster):
        assert g["template"]["metadata"]["labels"]["app"] == "popo-rl"
        for c in g["template"]["spec"]["containers"]:
            for p in c.get("ports", []):
                ports[p["containerPort"]] = (name, p["name"])
    expected = {"learner": "learner", "verifier": "learner", "actor": "actors"}
    for p in placements(cfg):
        port = role_port(cfg.metrics, p.role, p.index)
        assert port in ports, (p.name, port)
        group, port_name = ports[port]
        assert group == expected[p.role], (p.name, group)
        labels = _relabel(
            endpoints[port_name]["relabelings"],
            {"__meta_kubernetes_pod_container_port_name": port_name},
        )
        assert (labels["role"], labels["replica"]) == (p.role, str(p.index)), (p.name, labels)


def test_ray_dashboard_on_the_pod_ip_behind_a_token() -> None:
    """The job server binds the pod IP (never 0.0.0.0), and every pod and the job's submitter
    carry the cluster's Ray token from a Secret."""
    cluster = _cluster()
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$POD_IP"
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    job = _docs(K8S / "rayjob.yaml")[0]
    pods = [g["template"]["spec"] for _, g in _groups(cluster)]
    pods.append(job["spec"]["submitterPodTemplate"]["spec"])
    for pod in pods:
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "popo-ray-token"
