"""A pool of persistent scoring processes with a hard per-completion time limit.

Why processes, not threads: math-verify is pure Python (sympy) and can run for ever on adversarial
input (`\\boxed{9^{9^{9^{9}}}}`); the only sure way to stop it is to kill the process running it.
A stuck worker is SIGKILLed and replaced, its completion counts as `timeout`, and the completions
queued behind it go to the other workers.

Wire between parent and worker: msgpack (msgspec) over `multiprocessing.Pipe` with
`send_bytes`/`recv_bytes`; nothing is pickled after the spawn itself.
  parent -> worker: [task_id, gold, text]
  worker -> parent: [task_id, verdict, seconds, detail]   ([-1, "ready", 0.0, ""] once at start)

Each worker holds up to `depth` tasks so it never idles for a pipe round trip; tasks run in the
order sent, so the task at the head of a worker's queue is the one running, and its clock starts
when the previous result arrived (or when it was sent to an idle worker).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import NamedTuple

import msgspec

from popo.common.messages import Verdict

log = logging.getLogger(__name__)

_enc = msgspec.msgpack.Encoder()
_dec_task = msgspec.msgpack.Decoder(tuple[int, str, str])
_dec_result = msgspec.msgpack.Decoder(tuple[int, str, float, str])

_READY = -1
_PIPE_BUDGET = 32 * 1024

PIPELINE_DEPTH = 2
"""Tasks queued per worker by default: one running and one waiting in its pipe, so a worker never
idles for the round trip; a deeper queue only lets more completions wait behind a slow one."""


class Result(NamedTuple):
    task_id: int
    verdict: Verdict
    seconds: float
    """Time the worker spent on it (wall time to the kill for a timeout)."""
    detail: str


@dataclass(frozen=True)
class PoolLimits:
    timeout_s: float = 5.0
    max_chars: int = 65536
    max_depth: int = 100
    memory_mib: int = 4096
    """Address-space limit of each worker (0: none); a runaway sympy number fails instead of
    taking the machine's memory."""


def _worker_main(conn: Connection, max_chars: int, max_depth: int, memory_mib: int) -> None:
    """Worker process: score tasks until the pipe closes."""
    # Shutdown is the parent's decision: a terminal Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_mib > 0:
        import resource

        lim = memory_mib * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    from popo.verifier.scoring import parse_gold_cached, score_completion

    score_completion(parse_gold_cached("1"), r"\boxed{1}")  # import sympy's lazy parts now
    try:
        conn.send_bytes(_enc.encode((_READY, "ready", 0.0, "")))
        while True:
            task_id, gold, text = _dec_task.decode(conn.recv_bytes())
            t0 = time.perf_counter()
            try:
                verdict, detail = score_completion(
                    parse_gold_cached(gold), text, max_chars, max_depth
                )
            except Exception as e:  # gold parsing failed in a way math-verify did not swallow
                verdict, detail = "error", f"{type(e).__name__} parsing the gold"
            conn.send_bytes(_enc.encode((task_id, verdict, time.perf_counter() - t0, detail)))
    except (EOFError, BrokenPipeError):
        return  # the parent closed the pipe: shut down quietly


@dataclass
class _Task:
    task_id: int
    payload: bytes


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    started: float
    ready: bool = False
    broken: bool = False
    """Its pipe reported EOF: it is dead or dying, whatever `proc.is_alive()` says yet."""
    queue: deque[_Task] = field(default_factory=deque)
    head_since: float = 0.0
    """When the task at the head of `queue` started running (as seen by the parent)."""


class ScoringPool:
    """`submit` completions, `poll` for results. Not thread-safe: one owner thread."""

    def __init__(
        self,
        num_workers: int,
        limits: PoolLimits = PoolLimits(),
        depth: int = PIPELINE_DEPTH,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.num_workers = num_workers
        self.limits = limits
        self.depth = depth
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._pending: deque[_Task] = deque()
        self._early: list[Result] = []
        self._failed_starts = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> None:
        self._workers = [self._spawn() for _ in range(self.num_workers)]
        if wait_ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every worker (including replacements) has started."""
        deadline = time.monotonic() + self.start_timeout_s
        while not all(w.ready for w in self._workers):
            if time.monotonic() > deadline:
                raise RuntimeError("scoring workers did not start in time")
            self._early.extend(self.poll(0.1))

    def close(self) -> None:
        for w in self._workers:
            w.conn.close()  # EOF: the worker's loop returns
        for w in self._workers:
            w.proc.join(timeout=2.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        self._workers = []

    def __enter__(self) -> ScoringPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        lim = self.limits
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, lim.max_chars, lim.max_depth, lim.memory_mib),
            name="popo-verify-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        return _Worker(proc, parent, time.monotonic())

    # --- work -------------------------------------------------------------------------------

    @property
    def n_outstanding(self) -> int:
        """Submitted tasks without a result yet."""
        return len(self._pending) + sum(len(w.queue) for w in self._workers)

    def connections(self) -> list[Connection]:
        """Pipes to wait on (e.g. in a zmq.Poller); they change when a worker is replaced."""
        return [w.conn for w in self._workers]

    def submit(self, task_id: int, gold: str, text: str) -> None:
        """Queue one completion. Text that cannot be encoded (lone surrogates) never reaches a
        worker: its `error` result comes out of the next `poll`."""
        try:
            payload = _enc.encode((task_id, gold, text))
        except UnicodeEncodeError:
            self._early.append(Result(task_id, "error", 0.0, "invalid unicode (lone surrogate)"))
            return
        self._pending.append(_Task(task_id, payload))
        self._dispatch()

    def seconds_to_deadline(self) -> float | None:
        """Time until the earliest running task hits its limit (None: nothing running)."""
        now = time.monotonic()
        left = [w.head_since + self.limits.timeout_s - now for w in self._workers if w.queue]
        return max(0.0, min(left)) if left else None

    def poll(self, timeout_s: float = 0.0) -> list[Result]:
        """Collect finished results, waiting up to `timeout_s` for the first one; enforce the
        time limits (kill, replace, `timeout` result) and keep every worker fed."""
        out, self._early = self._early, []
        if not out:
            to_deadline = self.seconds_to_deadline()
            if to_deadline is not None:
                timeout_s = min(timeout_s, to_deadline)
            ready_conns = wait([w.conn for w in self._workers], timeout=timeout_s)
        else:
            ready_conns = wait([w.conn for w in self._workers], timeout=0)
        by_conn = {id(w.conn): w for w in self._workers}
        for conn in ready_conns:
            w = by_conn[id(conn)]
            out.extend(self._drain(w))
        out.extend(self._enforce_limits())
        self._dispatch()
        return out

    def _drain(self, w: _Worker) -> list[Result]:
        out = []
        while True:
            try:
                if not w.conn.poll():
                    return out
                task_id, verdict, seconds, detail = _dec_result.decode(w.conn.recv_bytes())
            except (EOFError, OSError):
                w.broken = True  # died; _enforce_limits replaces it
                return out
            if task_id == _READY:
                w.ready = True
                self._failed_starts = 0
                continue
            head = w.queue.popleft()
            assert head.task_id == task_id, "worker answered out of order"
            w.head_since = time.monotonic()
            out.append(Result(task_id, verdict, seconds, detail))  # type: ignore[arg-type]

    def _enforce_limits(self) -> list[Result]:
        out = []
        now = time.monotonic()
        for i, w in enumerate(self._workers):
            timed_out = bool(w.queue) and now - w.head_since > self.limits.timeout_s
            dead = w.broken or not w.proc.is_alive()
            slow_start = not w.ready and now - w.started > self.start_timeout_s
            if not (timed_out or dead or slow_start):
                continue
            if not w.ready:
                self._failed_starts += 1
                if self._failed_starts > 3:
                    raise RuntimeError(
                        f"scoring worker failed to start {self._failed_starts} times in a row "
                        f"(exit code {w.proc.exitcode})"
                    )
            if w.queue:
                head = w.queue.popleft()
                if timed_out:
                    out.append(Result(head.task_id, "timeout", now - w.head_since, "killed"))
                else:
                    code = w.proc.exitcode
                    why = f"worker died (exit code {code})"
                    out.append(Result(head.task_id, "error", now - w.head_since, why))
                # The rest never started: hand them to the others first.
                self._pending.extendleft(reversed(w.queue))
            log.warning(
                "scoring worker %d %s; replacing it",
                w.proc.pid,
                "timed out" if timed_out else "died" if dead else "did not start",
            )
            self._kill(w)
            self._workers[i] = self._spawn()
            self.restarts += 1
        return out

    @staticmethod
    def _kill(w: _Worker) -> None:
        if w.proc.is_alive():
            os.kill(w.proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        w.proc.join()
        w.conn.close()

    def _dispatch(self) -> None:
        # Breadth first: every idle worker gets a task before any worker gets a second one.
        for level in range(self.depth):
            for w in self._workers:
                if not self._pending:
                    return
                if w.ready and not w.broken and len(w.queue) == level:
                    self._send(w)

    def _send(self, w: _Worker) -> None:
        task = self._pending[0]
        # Tasks behind the running one wait in the pipe's kernel buffer (64 KiB on Linux);
        # overfilling it would block this thread on a stuck worker.
        behind = sum(len(t.payload) for t in list(w.queue)[1:]) + len(task.payload)
        if w.queue and behind > _PIPE_BUDGET:
            return
        try:
            w.conn.send_bytes(task.payload)
        except OSError:  # BrokenPipeError included
            w.broken = True  # died; _enforce_limits replaces it
            return
        self._pending.popleft()
        if not w.queue:
            w.head_since = time.monotonic()
        w.queue.append(task)
