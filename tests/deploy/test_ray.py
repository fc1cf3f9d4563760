"""`popo ray` on a real two-node Ray cluster, inside network namespaces this test creates.

Two namespaces joined by a veth pair play two hosts (10.231.0.1 head, 10.231.0.2 worker): outside
one, Ray binds the machine's external interface and probes a public address, so every
Ray process here lives in a namespace and all traffic stays on the veth. The run is the embedded
default, shortened: the learner and the verifier on the head, the actor pinned to the worker by a
custom resource, weights streamed over ZeroMQ (`transport.weights_mode = stream`). The run is a
Ray job: `ray job submit` to the head's job server (its dashboard bound to the head's namespace
address) with the entrypoint `popo ray --address auto ...`. The test kills the actor's process
mid-run, Ray restarts it, training finishes, the job SUCCEEDED, and every lease ended exactly once.
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

from popo.deploy.cli import OFFLINE_ENV

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
        self.env = dict(os.environ, **OFFLINE_ENV, RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=secrets.token_hex(32))  # fmt: skip
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        # A job's entrypoint is a shell command run with the raylet's environment: `popo` must
        # resolve to this venv's script even when pytest was started without the venv on PATH.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"

    def exec(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=self.env, **kw)

    def ray_start(self, ns: str, args: list[str], local_disk: bool = False) -> None:
        argv = [RAY, "start", "--disable-usage-stats", *args]
        if local_disk:  # the node's daemons (and so its roles) live in the private mount namespace
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs -o size=2g popo-local "$0" && exec "$@"', str(self.local),
                    *argv]  # fmt: skip
        r = subprocess.run(["ip", "netns", "exec", ns, *argv], env=self.env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr

    def ray_cli(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """`ray ARGS` from the head's namespace (the only place the job server is reachable)."""
        return subprocess.run(["ip", "netns", "exec", self.head_ns, RAY, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

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
        c.ray_start(head_ns, [
            "--head", f"--node-ip-address={HEAD_IP}", "--port=6379", "--num-cpus=4",
            "--include-dashboard=true", f"--dashboard-host={HEAD_IP}", "--dashboard-port=8265",
            f"--temp-dir={temp_dir}", '--resources={"head_node": 4}',
        ])  # fmt: skip
        c.ray_start(worker_ns, [
            f"--address={HEAD_IP}:6379", f"--node-ip-address={WORKER_IP}", "--num-cpus=2",
            '--resources={"worker_node": 1}', '--labels={"popo-node": "worker"}',
        ], local_disk=c.local_disk)  # fmt: skip
        yield c
    finally:
        _kill_namespace(worker_ns)
        _kill_namespace(head_ns)
        _ip("link", "del", veth_h, check=False)  # left in the root namespace if setup failed early
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(local, ignore_errors=True)


def _ledger_now(run_dir: Path) -> tuple[int, int]:
    """(last trained step, leases outstanding) of the live run."""
    if not (run_dir / "ledger.db").exists():
        return 0, 0
    db = sqlite3.connect(run_dir / "ledger.db", timeout=10)
    try:
        (step,) = db.execute("SELECT MAX(step) FROM leases WHERE state='trained'").fetchone()
        (out,) = db.execute("SELECT COUNT(*) FROM leases WHERE state='outstanding'").fetchone()
    except sqlite3.OperationalError:  # schema not created yet
        return 0, 0
    finally:
        db.close()
    return step or 0, out


def _outstanding(run_dir: Path) -> list[int]:
    db = sqlite3.connect(run_dir / "ledger.db", timeout=10)
    try:
        return [r[0] for r in db.execute("SELECT lease_id FROM leases WHERE state='outstanding'")]
    finally:
        db.close()


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
    run_dir = tmp_path / "run"
    out = tmp_path / "popo-ray.out"
    job = f"popo-{secrets.token_hex(4)}"
    ray_cluster.wait_job_server()
    argv = [
        RAY, "job", "submit", f"--address={DASHBOARD}", f"--submission-id={job}", "--",
        "popo", "ray", "--address", "auto",
        f"--deploy.run_dir={run_dir}", f"--model.path={demo_model_dir}",
        f"--learner.total_steps={STEPS}", "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=8", "--learner.lease_timeout_s=10",
        "--data.eval_size=16", "--actor.group_size=4", "--actor.kv_cache_gib=0.25",
        "--actor.drain_timeout_s=2", "--metrics.jsonl_every_s=1",
        "--transport.weights_mode=stream",
        '--deploy.ray.learner_resources={"head_node": 1}',
        '--deploy.ray.verifier_resources={"head_node": 1}',
        '--deploy.ray.actor_resources={"worker_node": 1}', "--deploy.ray.stop_grace_s=20",
    ]  # fmt: skip
    with open(out, "w") as f:
        proc = ray_cluster.exec(
            ray_cluster.head_ns, argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        pid_file = run_dir / "pids" / "actor-0.pid"
        # Kill the actor once it serves a trained version and holds leases; more steps need it.
        _wait("the actor to work on a trained version", lambda: _actor_mid_work(run_dir),
              proc, out, 420)  # fmt: skip
        first = _read_pid(pid_file)
        assert first is not None
        assert _ip("netns", "identify", str(first)).stdout.strip() == ray_cluster.worker_ns
        at_kill = _outstanding(run_dir)
        os.kill(first, signal.SIGKILL)
        second = _wait(
            "Ray to restart the actor",
            lambda: (p := _read_pid(pid_file)) is not None and p != first and p,
            proc, out, 120,
        )  # fmt: skip
        assert _ip("netns", "identify", str(second)).stdout.strip() == ray_cluster.worker_ns
        # every process of the cluster (Ray, its dashboard and agents, the job's driver, the
        # roles) lives in one of the two namespaces; the job's driver on the head
        procs = ray_cluster.processes()
        inside = {ray_cluster.head_ns, ray_cluster.worker_ns}
        assert {ns for ns, _ in procs.values()} == inside, procs
        assert any(ns == ray_cluster.head_ns and "/popo ray --address auto" in cmd
                   for ns, cmd in procs.values()), procs  # fmt: skip
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

    targets = json.loads((run_dir / "prometheus-targets.json").read_text())
    by_role = {t["labels"]["role"]: t["targets"][0] for t in targets}
    assert by_role["actor"].startswith(f"{WORKER_IP}:") and by_role["learner"].startswith(HEAD_IP)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["ledger_problems"] == []
    db = sqlite3.connect(run_dir / "ledger.db")
    states = dict(db.execute("SELECT state, COUNT(*) FROM leases GROUP BY state").fetchall())
    (max_step,) = db.execute("SELECT MAX(step) FROM leases WHERE state='trained'").fetchone()
    (unended,) = db.execute(
        "SELECT COUNT(*) FROM leases WHERE state IN ('trained','skipped','expired')"
        " AND ended_at IS NULL"
    ).fetchone()
    (dups,) = db.execute(
        "SELECT COUNT(*) FROM (SELECT lease_id FROM leases WHERE state='trained'"
        " GROUP BY lease_id HAVING COUNT(*) > 1)"
    ).fetchone()
    db.close()
    assert max_step == STEPS and unended == 0 and dups == 0, states
    # Every lease open when the actor died ended once: delivered before the kill (trained or
    # skipped), or expired at its deadline and its prompt re-dispatched to the restarted actor.
    db = sqlite3.connect(run_dir / "ledger.db")
    marks = ",".join("?" * len(at_kill))
    ended = dict(db.execute(f"SELECT lease_id, state FROM leases WHERE lease_id IN ({marks})",
                            at_kill).fetchall())  # fmt: skip
    db.close()
    assert at_kill and set(ended) == set(at_kill), (at_kill, ended)
    assert set(ended.values()) <= {"trained", "skipped", "expired"}, ended

    # the role log shows two starts of the actor; both incarnations loaded new versions, streamed
    # from the learner's node into the actor's own cache (never read from the learner's weights/)
    log = (run_dir / "logs" / "actor-0.log").read_text()
    runs = log.split("=== start")[1:]
    assert len(runs) == 2, log[-3000:]
    for part in runs:
        assert re.search(r"serving version [1-9][0-9]* \(", part), part[-3000:]
        assert "weights mode stream" in part and "weights mode shared" not in part, part[-3000:]
    assert list((run_dir / "weights-cache" / "actor-0").glob("v*")), "nothing was streamed"


def test_ray_job_exit_code_is_the_job_status(ray_cluster, tmp_path):
    """A failing entrypoint fails the job: `popo ray`'s exit code (2, a config error) becomes the
    job's FAILED status, `ray job submit` exits 1, and the error line reaches the streamed logs."""
    job = f"popo-bad-{secrets.token_hex(4)}"
    ray_cluster.wait_job_server()
    r = ray_cluster.ray_cli(["job", "submit", f"--address={DASHBOARD}", f"--submission-id={job}",
                             "--", "popo", "ray", "--address", "auto",
                             f"--deploy.run_dir={tmp_path / 'run'}", "--learner.no_such_field=1"],
                            timeout=120)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "popo ray: config error" in r.stdout and "no_such_field" in r.stdout, r.stdout
    status = ray_cluster.ray_cli(["job", "status", f"--address={DASHBOARD}", job]).stdout
    assert f"Job '{job}' failed" in status and "exit code 2" in status, status


def _popo_ray(cluster: Cluster, args: list[str], timeout: float = 420) -> tuple[int, str]:
    """`popo ray --address HEAD:6379 ARGS` as a driver on the head node: (exit code, output)."""
    argv = [str(Path(sys.executable).with_name("popo")), "ray", f"--address={HEAD_IP}:6379", *args]
    p = cluster.exec(cluster.head_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True, start_new_session=True)  # fmt: skip
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
        f"--model.path={demo_model_dir}", "--learner.prompts_per_step=4",
        "--learner.checkpoint_every=1", "--learner.lease_timeout_s=10", "--data.eval_size=8",
        "--actor.group_size=4", "--actor.kv_cache_gib=0.25", "--actor.drain_timeout_s=2",
        '--deploy.ray.learner_resources={"worker_node": 1}',
        '--deploy.ray.verifier_resources={"head_node": 1}',
        '--deploy.ray.actor_resources={"head_node": 1}', "--deploy.ray.stop_grace_s=20",
    ]  # fmt: skip
    code, out = _popo_ray(ray_cluster, [f"--deploy.run_dir={run_dir}", "--learner.total_steps=2",
                                        *flags])  # fmt: skip
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
    db = sqlite3.connect(tmp_path / "ledger.db")
    steps = [s for (s,) in db.execute(
        "SELECT DISTINCT step FROM leases WHERE state='trained' AND kind='train' ORDER BY step")]  # fmt: skip
    (dups,) = db.execute(
        "SELECT COUNT(*) FROM (SELECT prompt_idx FROM leases WHERE state='trained'"
        " AND kind='train' GROUP BY prompt_idx HAVING COUNT(*) > 1)"
    ).fetchone()
    db.close()
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
    argv = [sys.executable, "-c", _PLACE, f"--deploy.run_dir={tmp_path / 'run'}",
            f"--deploy.ray.address={HEAD_IP}:6379", "--actor.num_actors=2",
            '--deploy.ray.actor_labels={"popo-node": "worker"}',
            '--deploy.ray.learner_resources={"head_node": 1}',
            '--deploy.ray.verifier_resources={"head_node": 1}',
            "--deploy.ray.ready_timeout_s=60"]  # fmt: skip
    p = ray_cluster.exec(ray_cluster.head_ns, argv, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out[-3000:]
    ips = json.loads(next(x for x in out.splitlines() if x.startswith("IPS="))[4:])
    assert ips == {"learner": HEAD_IP, "verifier-0": HEAD_IP, "actor-0": WORKER_IP,
                   "actor-1": WORKER_IP}, ips  # fmt: skip


# --- placement, discovery and the example cluster configs (no Ray needed) --------------------------

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.toml"))


def test_placement_and_peer_flags():
    from popo.common.config import load_config
    from popo.deploy.ray_launch import peer_flags, placements, prometheus_targets

    cfg = load_config(None, [
        "--actor.num_actors=2", "--verifier.replicas=2", "--deploy.ray.use_gpus=true",
        "--learner.devices=4", "--actor.tensor_parallel_size=2",
        '--deploy.ray.actor_resources={"gpu_node": 1}',
    ])  # fmt: skip
    ps = placements(cfg)
    assert [p.name for p in ps] == ["learner", "verifier-0", "verifier-1", "actor-0", "actor-1"]
    assert ps[0].bundle == {"CPU": 1.0, "GPU": 4.0}
    assert ps[1].bundle == {"CPU": 1.0}  # verifiers never take GPUs
    assert ps[3].bundle == {"CPU": 1.0, "gpu_node": 1.0, "GPU": 2.0}

    ips = {"learner": "10.0.0.1", "verifier-0": "10.0.0.1", "verifier-1": "10.0.0.2",
           "actor-0": "10.0.0.3", "actor-1": "10.0.0.4"}  # fmt: skip
    # the flags parse back into a config whose connect addresses are the reported node IPs
    actor = load_config(None, peer_flags(cfg, ips, "actor-1"))
    from popo.common import transport

    t = actor.transport
    assert t.host == "10.0.0.4" and actor.metrics.host == "10.0.0.4"
    assert transport.learner_address(t, "dispatch") == "tcp://10.0.0.1:5550"
    assert transport.learner_address(t, "weightstream") == "tcp://10.0.0.1:5553"
    assert transport.verifier_address(t, 1) == "tcp://10.0.0.2:5561"
    assert transport.address(t, "dispatch") == "tcp://10.0.0.4:5550"  # binding stays local

    targets = {g["labels"]["role"] + g["labels"]["replica"]: g["targets"] for g in
               prometheus_targets(cfg, ips, "run")}  # fmt: skip
    assert targets == {"learner0": ["10.0.0.1:9400"], "verifier0": ["10.0.0.1:9401"],
                       "verifier1": ["10.0.0.2:9402"], "actor0": ["10.0.0.3:9420"],
                       "actor1": ["10.0.0.4:9421"]}  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_cluster_configs_load(path):
    """Each example config loads through `popo config` and fits the GPUs it was written for."""
    import tomllib

    from popo.common.config import load_config
    from popo.deploy.ray_launch import placements

    r = subprocess.run([sys.executable, "-m", "popo.deploy.cli", "config", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout)["deploy"]["ray"]["use_gpus"] is True
    cfg = load_config(path)
    gpus = sum(p.gpus for p in placements(cfg))
    assert gpus == (8 if "1node" in path.name else 16), gpus


def test_k8s_manifests_match_the_2node_config():
    """The custom resources the RayCluster gives its nodes cover what the config's roles ask for,
    and the RayJob runs a config that exists in the image."""
    yaml = pytest.importorskip("yaml")
    from popo.common.config import load_config
    from popo.deploy.ray_launch import placements

    cluster = yaml.safe_load((REPO / "deploy/k8s/raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "deploy/k8s/rayjob.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    config = entry[entry.index("--config") + 1]
    assert config.startswith("/app/")
    cfg = load_config(REPO / config.removeprefix("/app/"))

    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    nodes = []
    for g in groups:
        res = json.loads(json.loads(g["rayStartParams"]["resources"]))
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        nodes += [{**res, "GPU": gpus}] * g.get("replicas", 1)
    # first-fit of every bundle onto the nodes that carry its custom resources
    free = [dict(n) for n in nodes]
    for p in placements(cfg):
        need = {**p.resources, "GPU": p.gpus}
        node = next((n for n in free if all(n.get(k, 0) >= v for k, v in need.items())), None)
        assert node is not None, f"no node of the RayCluster fits {p.name}: {need}"
        for k, v in need.items():
            node[k] -= v
