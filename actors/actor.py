"""The actor process (docs/architecture.md, Roles): lease prompts, sample G completions each, push groups.

    learner ROUTER --Leases--> [DEALER] actor [PUSH] --RolloutGroup--> verifier PULL (1..R replicas)
    learner PUB --WeightsReady--> [SUB]

One loop thread owns the three sockets; the vLLM engine runs on its own event-loop thread
(`RolloutEngine`) and hands finished groups back through a queue. Every tick (`step`) the actor:
reads announcements and leases, starts at most one weight reload, collects finished groups, moves
waiting leases into the engine, pushes finished groups to the verifier and asks for more leases.

Flow control. Leases held = waiting (received, no engine slot yet) + in flight (in the engine); the
actor asks for `n = min(max_inflight_prompts - held, max_pending_groups - pending - held)` so that
even if no verifier takes anything, pending groups never exceed `max_pending_groups`: a vanished
verifier fills that bound and the actor stops asking (backpressure, bounded memory). A learner that
is not up yet (or silent) is re-asked with exponential back-off; ZeroMQ reconnects by itself.

Weights. A `WeightsReady` is checked (size, tensor names and shapes) off the loop thread, then
loaded in place between engine steps without dropping in-flight requests, its sha256 computed
while the engine loads it (generation resumes only once it passed); a bad version is rejected and
counted, the served weights are loaded back before anything is sampled, and the next announcement
is taken. Announcements that arrive during a reload collapse to the newest. After each reload the
probe carried in the announcement is run and its mismatch goes into the next LeaseRequest. Where
the announced path is not visible on this node (`transport.weights_mode`), or its bytes are not the
announced ones, the version is streamed from the learner into the node's weight cache
(`common.weight_stream`: one download per version per node, shared with the node's other actors)
while the old version keeps serving.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import zmq

from popo.actors.engine import RolloutEngine, SampledGroup
from popo.actors.reload import Schema, check_schema, model_schema, probe_mismatch
from popo.actors.stats import ActorStats
from popo.common import transport
from popo.common.config import RunConfig
from popo.common.demo_model import resolve_model_dir
from popo.common.messages import (
    Completion,
    Lease,
    LeaseRequest,
    Leases,
    RolloutGroup,
    WeightsReady,
    pack_f32,
    pack_ids,
    unpack_f32,
    unpack_ids,
)
from popo.common.metrics import RoleMetrics, role_port
from popo.common.run_dir import RunDir
from popo.common.weight_stream import WeightFetcher, default_cache_dir, local_weights
from popo.common.weights import WEIGHTS_FILE, WeightsError, verify_weights

log = logging.getLogger(__name__)

LEASE_RETRY_S = 0.5
"""First back-off before re-asking for leases while the learner is unreachable (doubles up to
LEASE_RETRY_MAX_S): short, so an actor started before its learner gets work soon after it binds."""
LEASE_RETRY_MAX_S = 5.0
"""Cap of that back-off, and how long an unanswered LeaseRequest waits before it is sent again (a
restarted learner lost it): a learner that comes back is served within seconds, while one that
stays away costs one request per 5 s."""
POLL_MS = 5
"""Loop tick: how long the actor waits on its sockets before checking finished groups. A finished
group waits at most this long to be sent, small against the time to sample it."""


@dataclass(frozen=True)
class ActorEndpoints:
    """Where an actor connects."""

    dispatch: str
    rollouts: list[str]
    """One address per verifier replica; PUSH round-robins groups across them."""
    weights: str
    weightstream: str | None = None
    """The learner's weight server; None: versions are only read from the announced path."""

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: str | Path | None = None) -> ActorEndpoints:
        t = cfg.transport
        return cls(
            dispatch=transport.learner_address(t, "dispatch", run_dir=run_dir),
            rollouts=[
                transport.verifier_address(t, r, run_dir) for r in range(cfg.verifier.replicas)
            ],
            weights=transport.learner_address(t, "weights", run_dir=run_dir),
            weightstream=transport.learner_address(t, "weightstream", run_dir=run_dir),
        )


@dataclass
class _Held:
    """A leased prompt between its lease and the hand-off of its group."""

    lease: Lease
    t_leased: float
    prompt_ids: list[int]
    future: Future | None = None


@dataclass(frozen=True)
class _Reloaded:
    version: int
    seconds: float
    mismatch_kl: float | None
    max_abs_diff: float | None
    mode: str
    """`shared` (read the learner's path) or `stream` (fetched into the local cache)."""


class Actor:
    """One actor: `setup()`, `run(stop_event)`, `close()`.

    `engine` may be passed in already started (tests share one engine between actors); the actor
    then does not close it.
    """

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str | Path,
        endpoints: ActorEndpoints,
        index: int = 0,
        run_dir: str | Path | None = None,
        engine: RolloutEngine | None = None,
        metrics: RoleMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.acfg = cfg.actor
        self.model_path = Path(model_path)
        self.endpoints = endpoints
        self.index = index
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.actor_id = f"actor-{index}"
        self._owns_engine = engine is None
        self.engine = engine or RolloutEngine(
            model_path, cfg.actor, cfg.model, seed=cfg.actor.seed + index
        )
        self.stats = ActorStats(
            metrics or RoleMetrics("actor", cfg.metrics, run_dir, instance=self.actor_id)
        )
        self._ctx: zmq.Context | None = None
        self._schema: Schema = {}

        self.waiting: deque[_Held] = deque()
        """Leases received, not yet in the engine."""
        self.inflight: dict[int, _Held] = {}
        """lease id -> prompt being sampled."""
        self.pending: deque[tuple[float, RolloutGroup]] = deque()
        """(lease deadline, finished group) not yet accepted by a verifier."""
        self._finished: queue.SimpleQueue[tuple[_Held, Future]] = queue.SimpleQueue()

        self._awaiting_reply_until = 0.0
        """While > now, a LeaseRequest is out and unanswered: do not ask again."""
        self._next_ask = 0.0
        self._backoff = LEASE_RETRY_S

        self._reload: Future | None = None
        self._reload_version = -1
        self._next_weights: WeightsReady | None = None
        self._fetcher: WeightFetcher | None = None
        self._mode = ""

    # --- phases ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Start the engine (unless given one), connect the sockets, and load the newest published
        version if the run already has one (an announcement this actor was not there to hear)."""
        self._schema = model_schema(self.model_path)
        if self._owns_engine:
            self.engine.start(initial_version=0)
        self.stats.serving(self.engine.version)
        t = self.cfg.transport
        self._ctx = zmq.Context()
        # A fresh ZeroMQ identity per process: a restarted actor is a new peer for the learner.
        self.dispatch = transport.connect(
            self._ctx,
            "dispatch",
            self.endpoints.dispatch,
            t,
            on_drop=self.stats.drop,
            identity=f"{self.actor_id}:{uuid.uuid4().hex[:8]}",
        )
        self.rollouts = transport.connect(self._ctx, "rollouts", self.endpoints.rollouts, t)
        self.weights = transport.connect(
            self._ctx, "weights", self.endpoints.weights, t, on_drop=self.stats.drop
        )
        self._poller = zmq.Poller()
        self._poller.register(self.dispatch.sock, zmq.POLLIN)
        self._poller.register(self.weights.sock, zmq.POLLIN)
        if t.weights_mode != "shared" and self.endpoints.weightstream:
            cache = self.acfg.weights_cache_dir or default_cache_dir(self.run_dir)
            self._fetcher = WeightFetcher(
                self.endpoints.weightstream,
                cache,
                t,
                keep=self.acfg.weights_cache_keep,
                on_retry=lambda _why: self.stats.stream_retried(),
            )
        # The announcement an actor that started late has missed.
        if self.run_dir is not None and (latest := RunDir(self.run_dir).weight_store().latest()):
            self._on_weights(latest)

    def run(self, stop_event: threading.Event) -> None:
        """Serve until `stop_event` is set, then drain (`drain_timeout_s`)."""
        log.info("%s serving version %d", self.actor_id, self.engine.version)
        while not stop_event.is_set():
            self.step()
        self.drain()

    def step(self) -> None:
        """One tick of the loop."""
        t0 = time.monotonic()
        for sock, _ in self._poller.poll(POLL_MS):
            if sock is self.weights.sock:
                self._read_weights()
            else:
                self._read_dispatch()
        self._check_reload()
        self._collect()
        self._submit()
        self._flush()
        self._ask()
        if not self.inflight:
            self.stats.idle(time.monotonic() - t0)
        self.stats.queues(len(self.inflight) + len(self.waiting), len(self.pending))
        self.stats.tick()

    def drain(self) -> None:
        """Stop taking work; give in-flight groups `drain_timeout_s` to finish and reach a verifier.
        Waiting leases and whatever is left at the deadline are dropped whole: their leases expire
        at the learner and are re-dispatched. A group is one ZeroMQ frame, so none is half-sent."""
        deadline = time.monotonic() + self.acfg.drain_timeout_s
        if self.waiting:
            log.info("%s: leaving %d unstarted leases to expire", self.actor_id, len(self.waiting))
            self.waiting.clear()
        while (self.inflight or self.pending) and time.monotonic() < deadline:
            time.sleep(POLL_MS / 1000)
            self._collect()
            self._flush()
        if self.inflight or self.pending:
            log.warning(
                "%s: drain timed out; %d groups in flight and %d undelivered left to expire",
                self.actor_id,
                len(self.inflight),
                len(self.pending),
            )

    def close(self) -> None:
        """Close sockets (flushing sent groups for up to linger_ms) and the engine if owned."""
        for ch in ("dispatch", "rollouts", "weights"):
            if hasattr(self, ch):
                getattr(self, ch).close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._fetcher is not None:
            self._fetcher.close()
        if self._owns_engine:
            self.engine.close()
        self.stats.metrics.close()

    # --- dispatch ---------------------------------------------------------------------------------

    def _ask(self) -> None:
        now = time.monotonic()
        if now < self._awaiting_reply_until or now < self._next_ask:
            return
        held = len(self.waiting) + len(self.inflight)
        n = min(
            self.acfg.max_inflight_prompts - held,
            self.acfg.max_pending_groups - len(self.pending) - held,
        )
        if n <= 0:
            return
        req = LeaseRequest(
            actor_id=self.actor_id,
            n=n,
            policy_version=self.engine.version,
            mismatch_kl=self.stats.mismatch_kl,
        )
        if self.dispatch.send(req, timeout_ms=0):
            self.stats.requested()
            # A reply normally comes in milliseconds; if the learner restarted and lost the
            # request, ask again after the longest back-off.
            self._awaiting_reply_until = now + LEASE_RETRY_MAX_S
        else:  # learner not connected (yet): back off
            self._next_ask = now + self._backoff
            self._backoff = min(2 * self._backoff, LEASE_RETRY_MAX_S)

    def _read_dispatch(self) -> None:
        while (got := self.dispatch.recv(0)) is not None:
            msg = got[1]
            if not isinstance(msg, Leases):
                log.warning("%s: unexpected %s on dispatch", self.actor_id, type(msg).__name__)
                continue
            now = time.monotonic()
            self._awaiting_reply_until = 0.0
            self._backoff = LEASE_RETRY_S
            if not msg.leases:
                self._next_ask = now + max(msg.retry_after_s, POLL_MS / 1000)
            t = time.time()
            for lease in msg.leases:
                self.stats.leases_received += 1
                self.waiting.append(_Held(lease, t, self.engine.encode(lease.prompt)))

    def _submit(self) -> None:
        """Move waiting leases into the engine while their groups would fit the pending bound."""
        now = time.time()
        while self.waiting and len(self.inflight) < self.acfg.max_inflight_prompts:
            if len(self.pending) + len(self.inflight) >= self.acfg.max_pending_groups:
                break
            held = self.waiting.popleft()
            if held.lease.deadline < now:
                self.stats.expired()
                continue
            if len(held.prompt_ids) + self.acfg.max_tokens > self.cfg.model.max_model_len:
                # The engine would reject it and fail the whole role; the learner filters such
                # prompts, so this is a misconfiguration: drop the lease (it expires) and count it.
                log.error(
                    "%s: lease %d: prompt of %d tokens + max_tokens %d exceeds max_model_len %d",
                    self.actor_id,
                    held.lease.lease_id,
                    len(held.prompt_ids),
                    self.acfg.max_tokens,
                    self.cfg.model.max_model_len,
                )
                self.stats.rejected()
                continue
            fut = self.engine.sample(held.prompt_ids)
            held.future = fut
            self.inflight[held.lease.lease_id] = held
            fut.add_done_callback(lambda f, h=held: self._finished.put((h, f)))

    # --- rollouts ---------------------------------------------------------------------------------

    def _collect(self) -> None:
        while True:
            try:
                held, fut = self._finished.get_nowait()
            except queue.Empty:
                return
            del self.inflight[held.lease.lease_id]
            group: SampledGroup = fut.result()  # an engine failure propagates: the role exits
            self.stats.finished(group.num_tokens)
            self.pending.append((held.lease.deadline, self._rollout(held, group)))

    def _rollout(self, held: _Held, g: SampledGroup) -> RolloutGroup:
        return RolloutGroup(
            lease_id=held.lease.lease_id,
            prompt_id=held.lease.prompt_id,
            prompt_token_ids=pack_ids(held.prompt_ids),
            gold=held.lease.gold,
            completions=[
                Completion(
                    token_ids=pack_ids(s.token_ids),
                    logprobs=pack_f32(s.logprobs),
                    text=s.text,
                    finish_reason=s.finish_reason,
                )
                for s in g.samples
            ],
            version_min=g.version_min,
            version_max=g.version_max,
            actor_id=self.actor_id,
            t_leased=held.t_leased,
            t_started=g.t_started,
            t_finished=g.t_finished,
        )

    def _flush(self) -> None:
        """Push finished groups, oldest first, until a verifier queue is full (or none is up)."""
        now = time.time()
        while self.pending:
            deadline, group = self.pending[0]
            if deadline < now:
                # The learner has re-dispatched this lease and will ignore a late completion:
                # dead weight in the bounded queue.
                self.pending.popleft()
                self.stats.expired()
                continue
            if not self.rollouts.send(group, timeout_ms=0):
                return
            self.pending.popleft()
            self.stats.delivered()

    # --- weights ----------------------------------------------------------------------------------

    def _read_weights(self) -> None:
        while (got := self.weights.recv(0)) is not None:
            msg = got[1]
            if isinstance(msg, WeightsReady):
                self._on_weights(msg)
            else:
                log.warning("%s: unexpected %s on weights", self.actor_id, type(msg).__name__)

    def _on_weights(self, msg: WeightsReady) -> None:
        if msg.version <= max(self.engine.version, self._reload_version):
            return  # already served or being loaded (announcements may repeat)
        if self._reload is not None:
            self._next_weights = msg  # the newest wins; older queued ones are obsolete
            return
        log.info("%s: loading version %d from %s", self.actor_id, msg.version, msg.path)
        self._reload_version = msg.version
        self._reload = self.engine.call(self._load(msg))

    async def _load(self, msg: WeightsReady) -> _Reloaded:
        """Runs on the engine's loop: verify off-thread, reload in place, probe."""
        import asyncio

        t0 = time.perf_counter()
        wmode = self.cfg.transport.weights_mode
        protect = {self.engine.version}
        local, mode = await asyncio.to_thread(
            local_weights, msg, wmode, self._fetcher, protect, verify_shared=False
        )
        path = local / WEIGHTS_FILE
        await asyncio.to_thread(check_schema, path, self._schema)
        # The sha256 of a shared file runs beside the engine's load of it (the engine stays paused
        # until it passes, and takes its old weights back if it fails); a streamed one is checked.
        verify = partial(verify_weights, path, msg.sha256, msg.nbytes)
        try:
            await self.engine.reload_async(str(local), msg.version, verify, mode == "stream")
        except WeightsError as e:
            if mode == "stream" or wmode != "auto" or self._fetcher is None:
                raise
            log.warning("%s; streaming version %d instead", e, msg.version)
            local, mode = await asyncio.to_thread(self._fetcher.fetch, msg, protect), "stream"
            path = local / WEIGHTS_FILE
            await asyncio.to_thread(check_schema, path, self._schema)
            verify = partial(verify_weights, path, msg.sha256, msg.nbytes)
            await self.engine.reload_async(str(local), msg.version, verify, True)
        seconds = time.perf_counter() - t0
        kl = max_abs = None
        if msg.probe_token_ids and msg.probe_prompt_len > 0:
            ids = unpack_ids(msg.probe_token_ids).tolist()
            actor_lp = await self.engine.prompt_logprobs_async(ids)
            # entry t-1 of actor_lp scores token t; the continuation starts at probe_prompt_len
            kl, max_abs = probe_mismatch(
                actor_lp[msg.probe_prompt_len - 1 :], unpack_f32(msg.probe_logprobs)
            )
        return _Reloaded(msg.version, seconds, kl, max_abs, mode)

    def _check_reload(self) -> None:
        if self._reload is None or not self._reload.done():
            return
        fut, self._reload = self._reload, None
        try:
            r: _Reloaded = fut.result()
        except WeightsError as e:
            self.stats.reload_failed()
            log.error("%s: rejected version %d: %s", self.actor_id, self._reload_version, e)
            self._reload_version = -1
        except ValueError as e:  # probe of the wrong length: the version is live, parity unknown
            log.error("%s: probe failed for version %d: %s", self.actor_id, self._reload_version, e)
            self.stats.serving(self.engine.version)
            self.stats.reloaded(0.0, None, None)
        else:
            if r.mode != self._mode:
                log.info(
                    "%s: weights mode %s (transport.weights_mode = %s)",
                    self.actor_id,
                    r.mode,
                    self.cfg.transport.weights_mode,
                )
                self._mode = r.mode
            self.stats.weights_mode(r.mode)
            if self._fetcher is not None:
                self.stats.streamed(self._fetcher.bytes_streamed)
            self.stats.serving(r.version)
            self.stats.reloaded(r.seconds, r.mismatch_kl, r.max_abs_diff)
            # The learner refuses leases to a lagging actor (retry_after_s); with the new version
            # it may have some now, and a synchronous run (max_staleness 0) waits on exactly this.
            self._next_ask = 0.0
            log.info(
                "%s: serving version %d (%.3f s, mismatch_kl %s)",
                self.actor_id,
                r.version,
                r.seconds,
                r.mismatch_kl,
            )
        if self._next_weights is not None:
            msg, self._next_weights = self._next_weights, None
            self._on_weights(msg)


# --- process entry ---------------------------------------------------------------------------------


def main(cfg: RunConfig, run_dir: str | Path, actor_index: int = 0) -> int:
    """`popo actor`: run actor `actor_index` until SIGTERM/SIGINT. Returns the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("actor-%d: signal %d, draining", actor_index, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    actor: Actor | None = None
    try:
        metrics = RoleMetrics("actor", cfg.metrics, run_dir, instance=f"actor-{actor_index}")
        metrics.serve(role_port(cfg.metrics, "actor", actor_index))
        actor = Actor(
            cfg,
            resolve_model_dir(cfg),
            ActorEndpoints.from_config(cfg, run_dir),
            index=actor_index,
            run_dir=run_dir,
            metrics=metrics,
        )
        actor.setup()
        actor.run(stop)
        return 0
    except Exception:
        log.exception("actor-%d failed", actor_index)
        return 1
    finally:
        if actor is not None:
            actor.close()
