"""The learner's I/O thread: hands out prompt leases and ingests verified groups.

It runs beside the training loop so actors keep generating while the learner trains. It owns the
dispatch ROUTER and the ingest PULL socket (ZeroMQ sockets stay in the thread that made them) and
writes everything it learns to the ledger, which the training loop reads.

Admission control is the `StalenessPolicy`'s: train leases in flight (outstanding or received,
not yet trained) never exceed (max_staleness + 1) * prompts_per_step, and an actor whose weights lag
the learner by more than max_staleness versions gets no lease until it reloads. Each ingested group
is written to the ledger, then `on_group` tells the training loop (its `BatchSource`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from popo.common.config import RunConfig
from popo.common.data import Problem
from popo.common.messages import (
    Lease,
    LeaseRequest,
    Leases,
    ScoredGroup,
    encode,
    unpack_f32,
    unpack_ids,
)
from popo.common.transport import bind
from popo.learner.ledger import Ledger
from popo.learner.staleness import StalenessPolicy

log = logging.getLogger(__name__)


@dataclass
class EvalRound:
    """One held-out evaluation: eval leases live in memory only (negative lease ids) and never
    touch the ledger, so they cannot be trained."""

    version: int
    pending: list[int]
    """Indices into the eval prompts not yet handed out (or handed out and expired)."""
    outstanding: dict[int, tuple[int, float]] = field(default_factory=dict)
    """lease id -> (prompt index, deadline)."""
    n_total: int = 0
    n_positive: int = 0
    per_prompt: dict[int, tuple[int, int]] = field(default_factory=dict)
    """prompt index -> (n_positive, n_total) for pass@k."""
    size: int = 0
    step: int = 0
    """The optimizer step whose weights (`version`) are evaluated."""
    started: float = field(default_factory=time.monotonic)
    finished: threading.Event = field(default_factory=threading.Event)
    """Set by the dispatch thread when the last group is in (it alone touches the fields above)."""

    @property
    def done(self) -> bool:
        return not self.pending and not self.outstanding


@dataclass
class SharedState:
    """What the training loop and the I/O thread share. Each plain field has one writer (named);
    the other thread only reads it, and Python assigns ints and references atomically. The actor
    version table is read while the I/O thread inserts, so it is behind a lock."""

    version: int = 0
    """The policy version the learner currently serves (training loop)."""
    eval: EvalRound | None = None
    """The evaluation round in progress (training loop)."""
    ingested: int = 0
    """Train groups written to the ledger (I/O thread)."""
    completions_total: int = 0
    """Verified completions of every group, eval included (I/O thread)."""
    positives_total: int = 0
    first_request_at: float | None = None
    """time.time() of the first lease request: an actor's engine is up (I/O thread)."""
    _actor_versions: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def actor_serves(self, actor_id: str, version: int) -> None:
        with self._lock:
            self._actor_versions[actor_id] = version

    def served_versions(self) -> set[int]:
        """Versions some actor served at its last request (a publish must not delete them)."""
        with self._lock:
            return set(self._actor_versions.values())


def _lease(lease_id: int, p: Problem, version: int, deadline: float) -> Lease:
    return Lease(
        lease_id=lease_id,
        prompt_id=p.prompt_id,
        prompt=p.problem,
        gold=p.gold,
        dispatch_version=version,
        deadline=deadline,
    )


class Dispatcher(threading.Thread):
    def __init__(
        self,
        cfg: RunConfig,
        ledger: Ledger,
        train: list[Problem],
        order: list[int],
        evals: list[Problem],
        state: SharedState,
        dispatch_addr: str,
        ingest_addr: str,
        on_group: Callable[[ScoredGroup], None] | None = None,
        on_duplicate: Callable[[], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(name="dispatch", daemon=True)
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.ledger = ledger
        self.train = train
        self.order = order
        self.evals = evals
        self.state = state
        self.policy = StalenessPolicy.from_config(cfg.learner)
        self.on_group = on_group
        self.on_duplicate = on_duplicate
        self.on_drop = on_drop
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._addrs = (dispatch_addr, ingest_addr)
        self.dispatch_address = ""
        self.ingest_address = ""
        self._next_eval_id = -1
        self.dropped = 0

    # The thread body catches only to hand the error to the training loop, which re-raises it.
    def run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            self.error = e
            log.exception("dispatch thread failed")
        finally:
            self.ready.set()

    def _serve(self) -> None:
        ctx = zmq.Context.instance()
        t = self.cfg.transport
        router = bind(ctx, "dispatch", self._addrs[0], t, on_drop=self._count_drop)
        ingest = bind(ctx, "ingest", self._addrs[1], t, on_drop=self._count_drop)
        self.dispatch_address, self.ingest_address = router.address, ingest.address
        self.ready.set()
        poller = zmq.Poller()
        poller.register(router.sock, zmq.POLLIN)
        poller.register(ingest.sock, zmq.POLLIN)
        last_expire = 0.0
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(100))
                if router.sock in events:
                    got = router.recv(0)
                    if got is not None and isinstance(got[1], LeaseRequest):
                        # Never block on one peer (gone, or not reading): its leases expire.
                        router.send(self._answer(got[1]), identity=got[0], timeout_ms=0)
                if ingest.sock in events:
                    got = ingest.recv(0)
                    if got is not None and isinstance(got[1], ScoredGroup):
                        self._ingest(got[1])
                if time.monotonic() - last_expire > 1.0:
                    last_expire = time.monotonic()
                    n = self.ledger.expire()
                    if n:
                        log.warning("%d lease(s) expired; their prompts are re-dispatched", n)
                    self._expire_eval()
        finally:
            router.close()
            ingest.close()

    def _count_drop(self, why: str) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(why)

    # --- leases -------------------------------------------------------------------------------------

    def _answer(self, req: LeaseRequest) -> Leases:
        st = self.state
        if st.first_request_at is None:
            st.first_request_at = time.time()
        st.actor_serves(req.actor_id, req.policy_version)
        version = st.version
        if not self.policy.admits(req.policy_version, version):
            return Leases(leases=[], learner_version=version, retry_after_s=0.2)
        deadline = time.time() + self.cfg.learner.lease_timeout_s
        in_flight = self.ledger.in_flight()
        room = self.policy.room(in_flight, req.policy_version, version)
        # The learner's next batch comes first, then an evaluation round's prompts, then the rest
        # of the room: a round never leaves the learner waiting with nothing on its way.
        first = max(0, min(req.n, room, self.policy.prompts_per_step - in_flight))
        out = self._train_leases(first, req.actor_id, version, deadline)
        out += self._eval_leases(req.n - first, req.policy_version, deadline)
        out += self._train_leases(
            min(req.n - len(out), room - first), req.actor_id, version, deadline
        )
        return Leases(leases=out, learner_version=version, retry_after_s=0.0 if out else 0.2)

    def _train_leases(self, n: int, actor_id: str, version: int, deadline: float) -> list[Lease]:
        if n <= 0:
            return []
        rows = self.ledger.issue(n, actor_id, version, deadline, len(self.order))
        return [
            _lease(
                r.lease_id,
                self.train[self.order[r.prompt_idx % len(self.order)]],
                version,
                deadline,
            )
            for r in rows
        ]

    def _eval_leases(self, n: int, actor_version: int, deadline: float) -> list[Lease]:
        ev = self.state.eval
        # Only the evaluated weights sample a round (no newer version is announced before the
        # round is complete, so an actor behind it reloads first).
        if ev is None or ev.finished.is_set() or actor_version != ev.version:
            return []
        out = []
        while ev.pending and len(out) < n:
            idx = ev.pending.pop()
            lid = self._next_eval_id
            self._next_eval_id -= 1
            ev.outstanding[lid] = (idx, deadline)
            out.append(_lease(lid, self.evals[idx], ev.version, deadline))
        return out

    def _expire_eval(self) -> None:
        ev = self.state.eval
        if ev is None:
            return
        now = time.time()
        for lid, (idx, deadline) in list(ev.outstanding.items()):
            if deadline < now:
                del ev.outstanding[lid]
                ev.pending.append(idx)

    # --- ingest -------------------------------------------------------------------------------------

    def unusable(self, g: ScoredGroup) -> str | None:
        """Why a well-formed group still cannot be trained on, or None. `messages.check` saw the
        shapes; these limits are the learner's: a token id outside the model's vocabulary would
        crash the embedding lookup mid-step (and again after every restart, the group being in
        the ledger), a positive or non-finite behaviour log-prob would poison the IS ratio."""
        max_tokens = self.cfg.actor.max_tokens
        for i, c in enumerate(g.completions):
            ids, logp = unpack_ids(c.token_ids), unpack_f32(c.logprobs)
            if len(ids) > max_tokens:
                return f"completion {i}: {len(ids)} tokens > actor.max_tokens {max_tokens}"
            if (
                self.vocab_size is not None
                and len(ids)
                and not 0 <= ids.min() <= ids.max() < self.vocab_size
            ):
                return f"completion {i}: a token id outside [0, {self.vocab_size})"
            # vLLM reports log-probs <= 0; allow float rounding just above it
            if not np.all(np.isfinite(logp)) or np.any(logp > 1e-3):
                return f"completion {i}: a behaviour log-prob that is not finite and <= 0"
        ids = unpack_ids(g.prompt_token_ids)
        if (
            self.vocab_size is not None
            and len(ids)
            and not 0 <= ids.min() <= ids.max() < self.vocab_size
        ):
            return f"prompt: a token id outside [0, {self.vocab_size})"
        return None

    def _ingest(self, g: ScoredGroup) -> None:
        if (why := self.unusable(g)) is not None:
            # dropped, not failed: its lease stays open, expires, and the prompt is re-dispatched
            log.warning("dropped group of lease %d from %s: %s", g.lease_id, g.actor_id, why)
            self._count_drop("unusable")
            return
        st = self.state
        st.completions_total += g.n_total
        st.positives_total += g.n_positive
        if g.lease_id < 0:
            ev = st.eval
            # Eval lease ids restart at -1 with each learner process: a late group from a killed
            # learner's round may reuse an id of this round, but was sampled by an older policy.
            if ev is not None and g.lease_id in ev.outstanding and g.version_min >= ev.version:
                idx, _ = ev.outstanding.pop(g.lease_id)
                ev.n_total += g.n_total
                ev.n_positive += g.n_positive
                ev.per_prompt[idx] = (g.n_positive, g.n_total)
                if ev.done:
                    ev.finished.set()
            return
        kind = self.ledger.receive(g.lease_id, g.version_min, g.n_total, g.n_positive, encode(g))
        if kind is None:
            if self.on_duplicate is not None:
                self.on_duplicate()
            return
        st.ingested += 1
        if self.on_group is not None:
            self.on_group(g)
