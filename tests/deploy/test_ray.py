"""`popo ray` on a real two-node Ray cluster, inside network namespaces this test creates.

Two namespaces joined by a veth pair play two hosts (10.231.0.1 head, 10.231.0.2 worker): outside
one, Ray binds the machine's external interface and probes a public address, so every
Ray process here lives in a namespace and all traffic stays on the veth. The run is the embedded
default, shortened: the learner and the verifier on the head, the actor pinned to the worker by a
custom resource, weights streamed over ZeroMQ (`transport.weights_mode = stream`). The run is a
Ray job: `ray job submit` to the head's job server (its dashboard bound to the head's namespace
address) with the entrypoint `popo ray --address auto ...`. The test kills the actor's process
mid-run (the driver restarts it), then its Ray host process (Ray brings the host back, the driver
runs the role again), training finishes, the job SUCCEEDED, and every lease ended exactly once.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popo.common.run_dir import RunDir
from popo.deploy.cli import OFFLINE_ENV
from popo.learner.ledger import LedgerReader

HEAD_IP, WORKER_IP = "10.231.0.1", "10.231.0.2"
RAY = str(Path(sys.executable).with_name("ray"))
DASHBOARD = f"http://{HEAD_IP}:8265"  # the job server (`ray[default]`)
STEPS = 16


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"popo-probe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in namespace `ns` (only this test's Ray and popo processes live
    there), then delete it, which also removes its end of the veth pair."""
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    _ip("netns", "del", ns, check=False)


class Cluster:
    def __init__(self, head_ns: str, worker_ns: str, temp_dir: str, local: Path) -> None:
        self.head_ns, self.worker_ns, self.temp_dir = head_ns, worker_ns, temp_dir
        self.local = local
        """A directory each node sees on its own disk: the worker runs in a mount namespace with a
        tmpfs over it, as a second host's local disk would be."""
        self.local_disk = False
        """Whether the worker got that mount namespace (`unshare -m` works here)."""
        self.job_server_up = False
        # Ray's token authentication, hermetic: one fresh token for this cluster's nodes and
        # driver, never the user's ~/.ray/auth_token.
        self.env = dict(
            os.environ, **OFFLINE_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)
        )
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        # A job's entrypoint is a shell command run with the raylet's environment: `popo` must
        # resolve to this venv's script even when pytest was started without the venv on PATH.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def exec(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=self.env, **kw)

    def ray_start(self, ns: str, args: list[str], local_disk: bool = False) -> None:
        argv = [RAY, "start", "--disable-usage-stats", *args]
        if local_disk:  # the node's daemons (and so its roles) live in the private mount namespace
            argv = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs -o size=2g popo-local "$0" && exec "$@"',
                str(self.local),
                *argv,
            ]
        r = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr

    def ray_cli(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """`ray ARGS` from the head's namespace (the only place the job server is reachable)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.head_ns, RAY, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def processes(self) -> dict[int, tuple[str, str]]:
        """Every live process started for this cluster (they all inherit its auth token): pid ->
        (network namespace name, "" outside the test's namespaces; command line)."""
        mark = f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode()
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if mark not in (d / "environ").read_bytes().split(b"\0"):
                    continue
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # exited meanwhile, or a kernel thread
                continue
            ns = _ip("netns", "identify", d.name, check=False).stdout.strip()
            out[int(d.name)] = (ns, cmd)
        return out

    def worker_path(self, path: Path) -> Path:
        """`path` as the worker node sees it (through the root of a process in its namespaces)."""
        # the oldest: a Ray daemon, alive as long as the node
        pid = min(p for p, (ns, _) in self.processes().items() if ns == self.worker_ns)
        return Path(f"/proc/{pid}/root") / path.relative_to("/")

    def wait_job_server(self, timeout: float = 90) -> None:
        """Until the head's job server answers (it comes up after `ray start` returns)."""
        deadline = time.time() + timeout
        while not self.job_server_up:
            r = self.ray_cli(["job", "list", f"--address={DASHBOARD}"])
            if r.returncode == 0:
                self.job_server_up = True
                return
            assert time.time() < deadline, f"job server not up:\n{r.stdout}{r.stderr}"
            time.sleep(1)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = str(os.getpid())[-6:]
    head_ns, worker_ns = f"popo-h{tag}", f"popo-w{tag}"
    veth_h, veth_w = f"vph{tag}", f"vpw{tag}"
    # Ray's unix sockets live under its temp dir: keep the path short (108-byte socket limit).
    temp_dir = tempfile.mkdtemp(prefix="popo-ray-", dir="/tmp")
    local = Path(tempfile.mkdtemp(prefix="popo-local-", dir="/tmp"))
    try:
        _ip("netns", "add", head_ns)
        _ip("netns", "add", worker_ns)
        _ip("link", "add", veth_h, "type", "veth", "peer", "name", veth_w)
        _ip("link", "set", veth_h, "netns", head_ns)
        _ip("link", "set", veth_w, "netns", worker_ns)
        for ns, dev, addr in ((head_ns, veth_h, HEAD_IP), (worker_ns, veth_w, WORKER_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        c = Cluster(head_ns, worker_ns, temp_dir, local)
        c.local_disk = subprocess.run(["unshare", "-m", "true"]).returncode == 0
        # The dashboard (job server) binds the head's namespace address, never 0.0.0.0 outside.
        c.ray_start(
            head_ns,
            [
                "--head",
                f"--node-ip-address={HEAD_IP}",
                "--port=6379",
                "--num-cpus=4",
                "--include-dashboard=true",
                f"--dashboard-host={HEAD_IP}",
                "--dashboard-port=8265",
                f"--temp-dir={temp_dir}",
                '--resources={"head_node": 4}',
            ],
        )
        c.ray_start(
            worker_ns,
            [
                f"--address={HEAD_IP}:6379",
                f"--node-ip-address={WORKER_IP}",
                "--num-cpus=2",
                '--resources={"worker_node": 1}',
                '--labels={"popo-node": "worker"}',
            ],
            local_disk=c.local_disk,
        )
        yield c
    finally:
        _kill_namespace(worker_ns)
        _kill_namespace(head_ns)
        _ip("link", "del", veth_h, check=False)  # left in the root namespace if setup failed early
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)


def _ledger_now(run_dir: Path) -> tuple[int, int]:
    """(last trained step, leases outstanding) of the live run."""
    ledger = RunDir(run_dir).ledger
    if not ledger.exists():
        return 0, 0
    try:
        with LedgerReader(ledger) as db:
            return db.last_trained_step(), len(db.outstanding())
    except sqlite3.OperationalError:  # schema not created yet
        return 0, 0


def _outstanding(run_dir: Path) -> list[int]:
    with LedgerReader(RunDir(run_dir).ledger) as db:
        return db.outstanding()


def _actor_mid_work(run_dir: Path) -> bool:
    """The actor serves a trained version and holds leases: killing it now loses work."""
    try:
        log = (run_dir / "logs" / "actor-0.log").read_text()
    except OSError:
        return False
    step, outstanding = _ledger_now(run_dir)
    return step >= 1 and outstanding > 0 and re.search(r"serving version [1-9]", log) is not None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _wait(what: str, cond, proc: subprocess.Popen, out: Path, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (got := cond()) is not None and got is not False:
            return got
        assert proc.poll() is None, (
            f"the job exited ({proc.returncode}) before {what}:\n" + (out.read_text()[-5000:])
        )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{out.read_text()[-5000:]}")


@pytest.mark.vllm
def test_ray_two_nodes_actor_restart(ray_cluster, tmp_path, demo_model_dir):
    """The run as a Ray job: `ray job submit` (waiting, it streams the job's logs and exits with
    the job's outcome) of the entrypoint `popo ray --address auto`, which joins the cluster the job
    runs on. (`popo ray --address HEAD:6379` from outside the cluster connects the same way;
    `test_ray_placement_by_node_labels` drives that path.)"""
    import yaml

    from popo.common.keys import create_keys

    run_dir = tmp_path / "run"
    out = tmp_path / "popo-ray.out"
    job = f"popo-{secrets.token_hex(4)}"
    # the roles bind the namespaces' addresses: CurveZMQ keys, as on a cluster
    create_keys(tmp_path / "keys")
    # the job's runtime env is the KubeRay RayJob's (Ray merges it with the launcher's)
    manifest = yaml.safe_load((REPO / "deploy/k8s/rayjob.yaml").read_text())
    runtime_env = json.dumps(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]))
    ray_cluster.wait_job_server()
    argv = [
        RAY,
        "job",
        "submit",
        f"--address={DASHBOARD}",
        f"--submission-id={job}",
        f"--runtime-env-json={runtime_env}",
        "--",
        "popo",
        "ray",
        "--address",
        "auto",
        f"--transport.curve_keys_dir={tmp_path / 'keys'}",
        f"--deploy.run_dir={run_dir}",
        f"--model.path={demo_model_dir}",
        f"--learner.total_steps={STEPS}",
        "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=8",
        "--learner.lease_timeout_s=10",
        "--data.eval_size=16",
        "--actor.group_size=4",
        "--actor.kv_cache_gib=0.25",
        "--actor.drain_timeout_s=2",
        "--metrics.jsonl_every_s=1",
        "--transport.weights_mode=stream",
        '--deploy.ray.learner.resources={"head_node": 1}',
        '--deploy.ray.verifier.resources={"head_node": 1}',
        '--deploy.ray.actor.resources={"worker_node": 1}',
        "--deploy.stop_grace_s=20",
    ]
    with open(out, "w") as f:
        proc = ray_cluster.exec(
            ray_cluster.head_ns, argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        pid_file = run_dir / "pids" / "actor-0.pid"
        # Kill the actor once it serves a trained version and holds leases; more steps need it.
        _wait(
            "the actor to work on a trained version",
            lambda: _actor_mid_work(run_dir),
            proc,
            out,
            420,
        )
        first = _read_pid(pid_file)
        assert first is not None
        assert _ip("netns", "identify", str(first)).stdout.strip() == ray_cluster.worker_ns
        at_kill = _outstanding(run_dir)
        os.kill(first, signal.SIGKILL)
        second = _wait(
            "Ray to restart the actor",
            lambda: (p := _read_pid(pid_file)) is not None and p != first and p,
            proc,
            out,
            120,
        )
        assert _ip("netns", "identify", str(second)).stdout.strip() == ray_cluster.worker_ns
        # Then the host itself dies (its Ray worker process, as on a node loss): Ray brings the
        # host back, the driver counts the loss, asks the hosts for their addresses again and
        # runs the role once more.
        actor_log = run_dir / "logs" / "actor-0.log"
        _wait(
            "the restarted actor to serve a version",
            lambda: re.search(
                r"serving version [1-9]", actor_log.read_text().split("=== start")[-1]
            ),
            proc,
            out,
            300,
        )
        status = Path(f"/proc/{second}/status").read_text()
        host = int(re.search(r"PPid:\s+(\d+)", status)[1])
        assert "RoleHost" in Path(f"/proc/{host}/cmdline").read_bytes().decode(errors="replace")
        os.kill(host, signal.SIGKILL)
        third = _wait(
            "Ray to bring the host back and the driver to re-run the actor",
            lambda: (p := _read_pid(pid_file)) not in (None, first, second) and p,
            proc,
            out,
            240,
        )
        assert _ip("netns", "identify", str(third)).stdout.strip() == ray_cluster.worker_ns
        # every process of the cluster (Ray, its dashboard and agents, the job's driver, the
        # roles) lives in one of the two namespaces; the job's driver on the head
        procs = ray_cluster.processes()
        inside = {ray_cluster.head_ns, ray_cluster.worker_ns}
        assert {ns for ns, _ in procs.values()} == inside, procs
        assert any(
            ns == ray_cluster.head_ns and "/popo ray --address auto" in cmd
            for ns, cmd in procs.values()
        ), procs
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert proc.returncode == 0, text[-5000:]
    status = ray_cluster.ray_cli(["job", "status", f"--address={DASHBOARD}", job])
    assert f"Job '{job}' succeeded" in status.stdout, status.stdout + status.stderr  # SUCCEEDED
    # the driver's output reached the job's logs (streamed above; kept by the job server)
    logs = ray_cluster.ray_cli(["job", "logs", f"--address={DASHBOARD}", job]).stdout
    assert f"run directory: {run_dir}" in logs and "leases: " in logs, logs[-3000:]
    assert f"actor-0@{WORKER_IP}" in text and f"learner@{HEAD_IP}" in text, text[-3000:]
    # the driver's restart policy brought the role back (back-off, peers re-resolved)
    assert "actor-0 exited with -9; restart 1 in" in text, text[-3000:]
    assert "actor-0 lost its host; restart 2 in" in text, text[-3000:]

    targets = json.loads((run_dir / "prometheus-targets.json").read_text())
    by_role = {t["labels"]["role"]: t["targets"][0] for t in targets}
    assert by_role["actor"].startswith(f"{WORKER_IP}:") and by_role["learner"].startswith(HEAD_IP)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["ledger_problems"] == []
    with LedgerReader(RunDir(run_dir).ledger) as db:
        states = db.state_counts()
        max_step = db.last_trained_step()
        unended = db.ended_without_time()
        trained = [r["lease_id"] for r in db.leases() if r["state"] == "trained"]
        # Every lease open when the actor died ended once: delivered before the kill (trained or
        # skipped), or expired at its deadline and its prompt re-dispatched to the restarted actor.
        ended = db.states(at_kill)
    dups = len(trained) - len(set(trained))
    assert max_step == STEPS and unended == 0 and dups == 0, states
    assert at_kill and set(ended) == set(at_kill), (at_kill, ended)
    assert set(ended.values()) <= {"trained", "skipped", "expired"}, ended

    # the role log shows the actor's starts (the kill, the host's loss; a start that met the dead
    # host's port still bound is restarted once more); the first two and the last incarnation
    # loaded new versions, streamed from the learner's node into the actor's own cache (never
    # read from the learner's weights/)
    log = (run_dir / "logs" / "actor-0.log").read_text()
    runs = log.split("=== start")[1:]
    assert len(runs) >= 3, log[-3000:]
    for part in [*runs[:2], runs[-1]]:
        assert re.search(r"serving version [1-9][0-9]* \(", part), part[-3000:]
        assert "weights mode stream" in part and "weights mode shared" not in part, part[-3000:]
    assert list(run_dir.glob("weights-cache/*/v*")), "nothing was streamed"


def test_ray_job_exit_code_is_the_job_status(ray_cluster, tmp_path):
    """A failing entrypoint fails the job: `popo ray`'s exit code (2, a config error) becomes the
    job's FAILED status, `ray job submit` exits 1, and the error line reaches the streamed logs."""
    job = f"popo-bad-{secrets.token_hex(4)}"
    ray_cluster.wait_job_server()
    r = ray_cluster.ray_cli(
        [
            "job",
            "submit",
            f"--address={DASHBOARD}",
            f"--submission-id={job}",
            "--",
            "popo",
            "ray",
            "--address",
            "auto",
            f"--deploy.run_dir={tmp_path / 'run'}",
            "--learner.no_such_field=1",
        ],
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "popo ray: config error" in r.stdout and "no_such_field" in r.stdout, r.stdout
    status = ray_cluster.ray_cli(["job", "status", f"--address={DASHBOARD}", job]).stdout
    assert f"Job '{job}' failed" in status and "exit code 2" in status, status


def _popo_ray(cluster: Cluster, args: list[str], timeout: float = 420) -> tuple[int, str]:
    """`popo ray --address HEAD:6379 ARGS` as a driver on the head node: (exit code, output)."""
    argv = [str(Path(sys.executable).with_name("popo")), "ray", f"--address={HEAD_IP}:6379", *args]
    p = cluster.exec(
        cluster.head_ns,
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, out


@pytest.mark.vllm
def test_ray_resume_with_the_learner_on_another_node(ray_cluster, tmp_path, demo_model_dir):
    """A run's state (ledger, buffer, checkpoints) stays on the node its learner ran on. With the
    learner on the worker and the driver, verifier and actor on the head, and the run directory on
    each node's own disk: the driver prints the summary it reads from the learner's node,
    `popo ray --resume` continues the run there (the driver's copy holds only the config), a new
    run in that directory is refused, and so is a resume of a directory the learner's node lacks."""
    if not ray_cluster.local_disk:
        pytest.skip("needs unshare -m: the worker's own disk")
    run_dir = ray_cluster.local / f"run-{secrets.token_hex(4)}"
    flags = [
        f"--model.path={demo_model_dir}",
        "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=1",
        "--learner.lease_timeout_s=10",
        "--data.eval_size=8",
        "--actor.group_size=4",
        "--actor.kv_cache_gib=0.25",
        "--actor.drain_timeout_s=2",
        '--deploy.ray.learner.resources={"worker_node": 1}',
        '--deploy.ray.verifier.resources={"head_node": 1}',
        '--deploy.ray.actor.resources={"head_node": 1}',
        "--deploy.stop_grace_s=20",
        "--transport.allow_insecure_bind=true",  # namespaces of this test only
    ]
    code, out = _popo_ray(
        ray_cluster, [f"--deploy.run_dir={run_dir}", "--learner.total_steps=2", *flags]
    )
    assert code == 0, out[-5000:]
    assert f"learner@{WORKER_IP}" in out and "leases: " in out, out[-3000:]  # summary fetched
    assert not (run_dir / "ledger.db").exists(), "the head sees the learner's disk"
    assert (run_dir / "config.toml").exists()
    remote = ray_cluster.worker_path(run_dir)
    assert json.loads((remote / "summary.json").read_text())["steps"] == 2

    code, out = _popo_ray(ray_cluster, ["--resume", str(run_dir), "--learner.total_steps=4"])
    assert code == 0, out[-5000:]
    remote = ray_cluster.worker_path(run_dir)
    summary = json.loads((remote / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ledger_problems"] == [], summary
    assert "resumed from" in (remote / "logs" / "learner.log").read_text()
    # SQLite resolves the /proc/PID/root link to "/" (the head's view): read a copy
    for f in remote.glob("ledger.db*"):
        shutil.copy(f, tmp_path / f.name)
    with LedgerReader(tmp_path / RunDir.LEDGER) as db:
        steps = db.trained_steps(kind="train")
        dups = db.prompts_trained_twice(kind="train")
    assert steps == [1, 2, 3, 4] and dups == 0, (steps, dups)

    # a new run in the same directory must not silently continue the learner node's run
    code, out = _popo_ray(ray_cluster, [f"--deploy.run_dir={run_dir}", *flags], timeout=180)
    assert code == 2 and "already holds a run" in out and WORKER_IP in out, out[-3000:]
    # a resume of a directory only the driver's node has: refused, naming the learner's node
    elsewhere = ray_cluster.local / f"run-{secrets.token_hex(4)}"
    elsewhere.mkdir()
    shutil.copy(run_dir / "config.toml", elsewhere / "config.toml")
    code, out = _popo_ray(ray_cluster, ["--resume", str(elsewhere)], timeout=180)
    assert code == 2 and "holds no ledger.db" in out and WORKER_IP in out, out[-3000:]


_PLACE = """
import json, sys
from pathlib import Path
from popo.common.config import load_config
from popo.deploy.ray_launch import RayRun
run = RayRun(load_config(None, sys.argv[1:]), Path(sys.argv[1].split("=", 1)[1]))
try:
    run.connect()
    print("IPS=" + json.dumps(run.place()))
finally:
    run.stop()
"""


def test_ray_placement_by_node_labels(ray_cluster, tmp_path):
    """`deploy.ray.*_labels` select nodes by Ray label: both actors land on the node labelled
    `popo-node=worker` (PACK; Ray 2.60's SPREAD refuses two label-selected bundles on one node),
    the learner and verifier on the head by custom resource; the hosts report their node IPs."""
    argv = [
        sys.executable,
        "-c",
        _PLACE,
        f"--deploy.run_dir={tmp_path / 'run'}",
        f"--deploy.ray.address={HEAD_IP}:6379",
        "--actor.num_actors=2",
        '--deploy.ray.actor.labels={"popo-node": "worker"}',
        '--deploy.ray.learner.resources={"head_node": 1}',
        '--deploy.ray.verifier.resources={"head_node": 1}',
        "--deploy.ray.ready_timeout_s=60",
    ]
    p = ray_cluster.exec(
        ray_cluster.head_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out[-3000:]
    ips = json.loads(next(x for x in out.splitlines() if x.startswith("IPS="))[4:])
    assert ips == {
        "learner": HEAD_IP,
        "verifier-0": HEAD_IP,
        "actor-0": WORKER_IP,
        "actor-1": WORKER_IP,
    }, ips


# --- placement, discovery and the example cluster configs (no Ray needed) --------------------------

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*node.toml"))  # the cluster configs


def test_placement_and_peer_flags(tmp_path):
    from popo.common.config import load_config
    from popo.deploy.ray_launch import peer_flags, placements, prometheus_targets

    cfg = load_config(
        None,
        [
            "--actor.num_actors=2",
            "--verifier.replicas=2",
            "--deploy.ray.use_gpus=true",
            "--learner.devices=4",
            "--actor.tensor_parallel_size=2",
            '--deploy.ray.actor.resources={"gpu_node": 1}',
            "--transport.curve_keys_dir=/keys",  # node IPs are bound: a cluster has keys
        ],
    )
    ps = placements(cfg)
    assert [p.name for p in ps] == ["learner", "verifier-0", "verifier-1", "actor-0", "actor-1"]
    assert ps[0].bundle == {"CPU": 1.0, "GPU": 4.0}
    assert ps[1].bundle == {"CPU": 1.0}  # verifiers never take GPUs
    assert ps[3].bundle == {"CPU": 1.0, "gpu_node": 1.0, "GPU": 2.0}

    ips = {
        "learner": "10.0.0.1",
        "verifier-0": "10.0.0.1",
        "verifier-1": "10.0.0.2",
        "actor-0": "10.0.0.3",
        "actor-1": "10.0.0.4",
    }
    # the flags parse back, over the run's config as a role host loads it, into a config whose
    # connect addresses are the reported node IPs
    snapshot = tmp_path / "config.toml"
    snapshot.write_text(cfg.to_toml())
    actor = load_config(snapshot, peer_flags(cfg, ips, "actor-1"))
    from popo.common import transport

    t = actor.transport
    assert t.host == "10.0.0.4" and actor.metrics.host == "10.0.0.4"
    assert transport.learner_address(t, "dispatch") == "tcp://10.0.0.1:5550"
    assert transport.learner_address(t, "weightstream") == "tcp://10.0.0.1:5553"
    assert transport.verifier_address(t, 1) == "tcp://10.0.0.2:5561"
    assert transport.address(t, "dispatch") == "tcp://10.0.0.4:5550"  # binding stays local

    targets = {
        g["labels"]["role"] + g["labels"]["replica"]: g["targets"]
        for g in prometheus_targets(cfg, ips, "run")
    }
    assert targets == {
        "learner0": ["10.0.0.1:9400"],
        "verifier0": ["10.0.0.1:9401"],
        "verifier1": ["10.0.0.2:9402"],
        "actor0": ["10.0.0.3:9420"],
        "actor1": ["10.0.0.4:9421"],
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_cluster_configs_load(path):
    """Each example config loads through `popo config` and fits the GPUs it was written for."""
    import tomllib

    from popo.common.config import load_config
    from popo.deploy.ray_launch import placements

    r = subprocess.run(
        [sys.executable, "-m", "popo.deploy.cli", "config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["deploy"]["ray"]["use_gpus"] is True
    cfg = load_config(path)
    gpus = sum(p.gpus for p in placements(cfg))
    assert gpus == (8 if "1node" in path.name else 16), gpus


# --- the driver's restart policy and peer re-resolution (no Ray: hosts recorded) --------------


class _Call:
    def __init__(self, log: list, name: str, method: str) -> None:
        self.log, self.name, self.method = log, name, method

    def remote(self, *args):
        self.log.append((self.name, self.method, args))
        return (self.name, self.method, len(self.log))


class _Host:
    """Records the driver's calls to one role host (`run.remote`, `stop.remote`)."""

    def __init__(self, log: list, name: str) -> None:
        self.run = _Call(log, name, "run")
        self.stop = _Call(log, name, "stop")


def _driver(tmp_path, flags: list[str]):
    from popo.common.config import load_config
    from popo.deploy.ray_launch import RayRun

    cfg = load_config(None, ["--actor.num_actors=2", f"--deploy.run_dir={tmp_path}", *flags])
    run = RayRun(cfg, tmp_path)
    calls: list = []
    run.hosts = {p.name: _Host(calls, p.name) for p in run.places}
    return run, calls


def test_driver_restarts_follow_the_supervisors_window_and_backoff(tmp_path, monkeypatch):
    """A failed role (exit code or lost host) is restarted after the doubling back-off, capped,
    up to `deploy.max_restarts` within `deploy.restart_window_s`: the policy `popo train` uses."""
    run, _ = _driver(
        tmp_path,
        [
            "--deploy.max_restarts=3",
            "--deploy.restart_backoff_s=2",
            "--deploy.restart_backoff_max_s=5",
            "--deploy.restart_window_s=100",
        ],
    )
    now = [1000.0]
    monkeypatch.setattr("time.time", lambda: now[0])
    run.started = dict.fromkeys(run.hosts, 0.0)
    delays = []
    for code in (-9, None, 1):
        delays.append(run._on_failure("actor-0", code))
        now[0] += 10
    assert delays == [2.0, 4.0, 5.0]
    assert run._on_failure("actor-0", -9) is None  # 3 restarts in the window: the run stops
    now[0] += 100  # the window slid past them: restarts again, back-off starts over
    assert run._on_failure("actor-0", -9) == 2.0
    assert run.policies["actor-1"].restarts == 0  # per role
    # a learner failing right after its start (no signal) is a start-up error: not restarted
    run.started["learner"] = now[0] - 5
    assert run._on_failure("learner", 1) is None
    assert run._on_failure("learner", -9) == 2.0  # killed: it resumes


def test_driver_restart_re_resolves_peers_and_moves_their_followers(tmp_path, monkeypatch):
    """After a node loss the learner's host came back on another node: the learner restarts with
    its new address, every role that connects to it is stopped to follow (and re-run by `wait`),
    a role whose peers did not move keeps running, and the Prometheus targets are rewritten."""
    run, calls = _driver(tmp_path, ["--verifier.replicas=1"])
    ips = {
        "learner": "10.0.0.1",
        "verifier-0": "10.0.0.2",
        "actor-0": "10.0.0.3",
        "actor-1": "10.0.0.4",
    }
    run.start(ips)
    assert {n for n, m, _ in calls if m == "run"} == set(ips)
    calls.clear()
    moved = {**ips, "learner": "10.0.0.9"}
    monkeypatch.setattr(run, "resolve", lambda: dict(moved))
    del run.refs["learner"]  # its run ended (host lost)
    follow = run._restart(["learner"])
    assert follow == {"verifier-0", "actor-0", "actor-1"}  # all connect to the learner
    assert [(n, m) for n, m, _ in calls] == [
        ("learner", "run"),
        ("actor-0", "stop"),
        ("actor-1", "stop"),
        ("verifier-0", "stop"),
    ]
    learner_flags = calls[0][2][1]
    assert "--transport.host=10.0.0.9" in learner_flags
    assert "--transport.learner_host=10.0.0.9" in run.flags["learner"]
    targets = json.loads((tmp_path / "prometheus-targets.json").read_text())
    assert targets[0]["targets"] == ["10.0.0.9:9400"]

    # only an actor moved: nobody connects to an actor, so nobody else is stopped
    run.refs = {n: object() for n in ips if n != "actor-1"}
    for n in ("verifier-0", "actor-0"):
        run._run(n)  # running with the current addresses
    calls.clear()
    monkeypatch.setattr(run, "resolve", lambda: {**moved, "actor-1": "10.0.0.7"})
    assert run._restart(["actor-1"]) == set()
    assert [(n, m) for n, m, _ in calls] == [("actor-1", "run")]
    assert "--transport.host=10.0.0.7" in run.flags["actor-1"]


def test_roles_binding_node_ips_need_keys(tmp_path):
    """A node IP is reachable by the whole network: without CurveZMQ keys the launcher refuses it
    (as the wildcard guard does), unless allow_insecure_bind; loopback-only runs are fine."""
    from popo.common.config import load_config
    from popo.deploy.ray_launch import insecure_bind

    cfg = load_config(None, [])
    ips = {"learner": "10.0.0.1", "actor-0": "10.0.0.2"}
    assert "10.0.0.1, 10.0.0.2 without CurveZMQ keys" in insecure_bind(cfg, ips)
    assert insecure_bind(cfg, dict.fromkeys(ips, "127.0.0.1")) is None
    for flag in (
        "--transport.curve_keys_dir=/keys",
        "--transport.allow_insecure_bind=true",
        "--deploy.ray.bind_node_ip=false",
    ):
        assert insecure_bind(load_config(None, [flag]), ips) is None, flag
