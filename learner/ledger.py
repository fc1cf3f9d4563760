"""The prompt ledger and the buffer of received groups, in SQLite (WAL) in the run directory
(docs/architecture.md, Flow control).

Every lease ends exactly once: `trained` (at a step), `skipped` (with a reason), or `expired` (its
actor missed the deadline; the prompt goes back to the dispatch queue and gets a new lease). A
completion for a lease that is no longer outstanding is a late duplicate: ignored and counted.

Crash consistency. A received group's payload stays in the buffer until a checkpoint that contains
its step is durable (`checkpointed(step)`). On resume from checkpoint step K, leases trained after K
go back to `received` (`rewind_to(K)`) and are trained again by the restored model: the final model
has seen every lease exactly once, and nothing received is lost.

Lease states:  outstanding -> received -> trained | skipped
               outstanding -> expired | skipped
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    lease_id         INTEGER PRIMARY KEY,
    prompt_idx       INTEGER NOT NULL,
    kind             TEXT NOT NULL DEFAULT 'train',   -- 'train' or 'eval'
    actor_id         TEXT NOT NULL,
    dispatch_version INTEGER NOT NULL,
    issued_at        REAL NOT NULL,
    deadline         REAL NOT NULL,
    state            TEXT NOT NULL CHECK (state IN
                         ('outstanding', 'received', 'trained', 'skipped', 'expired')),
    reason           TEXT,
    step             INTEGER,
    version_min      INTEGER,
    n_total          INTEGER,
    n_positive       INTEGER,
    ended_at         REAL,
    resumed          INTEGER NOT NULL DEFAULT 0  -- trained before a crash, rewound by a resume
);
CREATE INDEX IF NOT EXISTS leases_state ON leases(state);
CREATE TABLE IF NOT EXISTS buffer (
    lease_id    INTEGER PRIMARY KEY REFERENCES leases(lease_id),
    payload     BLOB NOT NULL                          -- the ScoredGroup frame, msgpack
);
CREATE TABLE IF NOT EXISTS requeue (prompt_idx INTEGER PRIMARY KEY, kind TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class LeaseRow:
    lease_id: int
    prompt_idx: int
    kind: str
    dispatch_version: int
    deadline: float


@dataclass(frozen=True)
class Received:
    lease_id: int
    prompt_idx: int
    version_min: int
    payload: bytes
    resumed: bool
    """Already trained once by a run that crashed before checkpointing it: it was fresh enough then,
    so it is exempt from the staleness check now (versions moved on during the restart)."""


class Ledger:
    """Thread-safe: the dispatch/ingest thread and the training loop share one instance."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed ledger transaction survives power loss, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.duplicates = 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- meta -------------------------------------------------------------------------------------

    def get(self, key: str, default: int = 0) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set(self, key: str, value: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- dispatch ---------------------------------------------------------------------------------

    def in_flight(self, kind: str = "train") -> int:
        """Leases handed out or received but not yet trained or skipped."""
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM leases WHERE kind=? AND state IN ('outstanding','received')",
                (kind,),
            ).fetchone()
        return int(n)

    def issue(
        self,
        n: int,
        actor_id: str,
        version: int,
        deadline: float,
        n_prompts: int,
        kind: str = "train",
        cursor_key: str = "cursor",
    ) -> list[LeaseRow]:
        """Issue up to `n` leases: re-queued prompts first, then the next prompts of the cursor
        (which wraps around `n_prompts`; the caller maps prompt_idx to a shuffled order)."""
        out: list[LeaseRow] = []
        now = time.time()
        with self._tx() as db:
            requeued = db.execute(
                "SELECT prompt_idx FROM requeue WHERE kind=? ORDER BY prompt_idx LIMIT ?", (kind, n)
            ).fetchall()
            idxs = [r[0] for r in requeued]
            db.executemany("DELETE FROM requeue WHERE prompt_idx=?", [(i,) for i in idxs])
            row = db.execute("SELECT value FROM meta WHERE key=?", (cursor_key,)).fetchone()
            cursor = 0 if row is None else int(row[0])
            while len(idxs) < n and (kind == "train" or cursor < n_prompts):
                idxs.append(cursor % n_prompts if kind == "train" else cursor)
                cursor += 1
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (cursor_key, cursor)
            )
            for idx in idxs:
                cur = db.execute(
                    "INSERT INTO leases(prompt_idx, kind, actor_id, dispatch_version, issued_at,"
                    " deadline, state) VALUES (?, ?, ?, ?, ?, ?, 'outstanding')",
                    (idx, kind, actor_id, version, now, deadline),
                )
                out.append(LeaseRow(int(cur.lastrowid or 0), idx, kind, version, deadline))
        return out

    def expire(self, now: float | None = None) -> int:
        """End overdue outstanding leases as `expired` and re-queue their prompts."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT lease_id, prompt_idx, kind FROM leases"
                " WHERE state='outstanding' AND deadline < ?",
                (now,),
            ).fetchall()
            for lease_id, idx, kind in rows:
                db.execute(
                    "UPDATE leases SET state='expired', reason='deadline', ended_at=?"
                    " WHERE lease_id=?",
                    (now, lease_id),
                )
                db.execute(
                    "INSERT OR IGNORE INTO requeue(prompt_idx, kind) VALUES (?, ?)", (idx, kind)
                )
        return len(rows)

    # --- ingest -----------------------------------------------------------------------------------

    def receive(
        self, lease_id: int, version_min: int, n_total: int, n_positive: int, payload: bytes
    ) -> str | None:
        """Record a verified group. Returns the lease kind, or None for a late duplicate or an
        unknown lease (ignored and counted)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state, kind FROM leases WHERE lease_id=?", (lease_id,)
            ).fetchone()
            if row is None or row[0] != "outstanding":
                self.duplicates += 1
                return None
            db.execute(
                "UPDATE leases SET state='received', version_min=?, n_total=?, n_positive=?"
                " WHERE lease_id=?",
                (version_min, n_total, n_positive, lease_id),
            )
            db.execute("INSERT INTO buffer(lease_id, payload) VALUES (?, ?)", (lease_id, payload))
            return str(row[1])

    def skip(self, lease_ids: list[int], reason: str) -> None:
        """End received or outstanding leases without training them."""
        now = time.time()
        with self._tx() as db:
            for lid in lease_ids:
                db.execute(
                    "UPDATE leases SET state='skipped', reason=?, ended_at=?"
                    " WHERE lease_id=? AND state IN ('outstanding','received')",
                    (reason, now, lid),
                )
                db.execute("DELETE FROM buffer WHERE lease_id=?", (lid,))

    def finish(self, reason: str = "run_finished") -> int:
        """The run reached its last step: end every lease still open (nothing will train it)."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE leases SET state='skipped', reason=?, ended_at=?"
                " WHERE state IN ('outstanding','received')",
                (reason, now),
            )
            db.execute(
                "DELETE FROM buffer WHERE lease_id IN (SELECT lease_id FROM leases WHERE state='skipped')"
            )
            return cur.rowcount

    # --- training ---------------------------------------------------------------------------------

    def received(self, kind: str = "train", limit: int | None = None) -> list[Received]:
        """Received, not yet trained groups, oldest lease first."""
        q = (
            "SELECT l.lease_id, l.prompt_idx, l.version_min, b.payload, l.resumed FROM leases l"
            " JOIN buffer b USING (lease_id) WHERE l.state='received' AND l.kind=?"
            " ORDER BY l.lease_id"
        )
        args: tuple[object, ...] = (kind,)
        if limit is not None:
            q += " LIMIT ?"
            args = (kind, limit)
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [Received(int(a), int(b), int(c), bytes(d), bool(e)) for a, b, c, d, e in rows]

    def mark_trained(self, lease_ids: list[int], step: int) -> None:
        """The leases' groups went into optimizer step `step`. Payloads stay until a checkpoint."""
        now = time.time()
        with self._tx() as db:
            for lid in lease_ids:
                cur = db.execute(
                    "UPDATE leases SET state='trained', step=?, ended_at=?"
                    " WHERE lease_id=? AND state='received'",
                    (step, now, lid),
                )
                if cur.rowcount != 1:
                    raise RuntimeError(
                        f"lease {lid} was not in state 'received'; refusing to train it"
                    )

    def checkpointed(self, step: int) -> None:
        """A checkpoint of `step` is durable: drop payloads it covers."""
        with self._tx() as db:
            db.execute(
                "DELETE FROM buffer WHERE lease_id IN"
                " (SELECT lease_id FROM leases WHERE state='trained' AND step <= ?)",
                (step,),
            )
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('checkpoint_step', ?)", (step,)
            )

    def rewind_to(self, step: int) -> int:
        """Resume from a checkpoint of `step`: leases trained after it become `received` again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE leases SET state='received', step=NULL, ended_at=NULL, resumed=1"
                " WHERE state='trained' AND step > ?",
                (step,),
            )
            return cur.rowcount

    # --- reporting --------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Leases by state (and skipped by reason)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COALESCE(reason, ''), COUNT(*) FROM leases"
                " WHERE kind='train' GROUP BY 1, 2"
            ).fetchall()
        out: dict[str, int] = {}
        for state, reason, n in rows:
            out[state] = out.get(state, 0) + n
            if state == "skipped":
                out[f"skipped:{reason}"] = n
        return out

    def check_exactly_once(self) -> list[str]:
        """Audit: problems with the exactly-once accounting (empty list = consistent)."""
        problems: list[str] = []
        with self._lock:
            db = self._db
            for lid, state in db.execute(
                "SELECT lease_id, state FROM leases WHERE state IN ('trained','skipped','expired')"
                " AND ended_at IS NULL"
            ):
                problems.append(f"lease {lid} is {state} without an end time")
            for lid, state in db.execute(
                "SELECT l.lease_id, l.state FROM buffer b JOIN leases l USING (lease_id)"
                " WHERE l.state NOT IN ('received','trained')"
            ):
                problems.append(f"lease {lid} is {state} but still buffered")
            for (lid,) in db.execute(
                "SELECT lease_id FROM leases WHERE state='received'"
                " AND lease_id NOT IN (SELECT lease_id FROM buffer)"
            ):
                problems.append(f"lease {lid} is received but its payload is gone")
        return problems

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True)
class StepTiming:
    """One trained step as the ledger saw it."""

    step: int
    end: float
    """When its leases were closed (right after the step's publish), epoch seconds."""
    first_issued: float
    """The earliest issue time of a lease it trained."""
    positives: int
    """Positive completions trained."""
    groups: int
    """Groups (leases) trained."""


class LedgerReader:
    """Read-only queries on a run's ledger, for reports, benchmarks and tests: the database is
    opened with SQLite's `mode=ro`, so nothing here can change it, and reading beside a live
    learner is safe (WAL: readers see the last committed state and never block the writer).

    Queries count `train` leases unless `kind` says otherwise (`None`: every kind). Use as a
    context manager, or call `close()`.
    """

    def __init__(self, path: str | Path, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no ledger there")
        self._db = sqlite3.connect(
            f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=timeout_s
        )

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _kind(kind: str | None) -> tuple[str, tuple[object, ...]]:
        return ("", ()) if kind is None else (" AND kind=?", (kind,))

    def state_counts(self, kind: str | None = None) -> dict[str, int]:
        """Leases per state (`outstanding`, `received`, `trained`, `skipped`, `expired`); states
        without a lease are absent. Every kind by default."""
        where, args = self._kind(kind)
        return {
            str(s): int(n)
            for s, n in self._rows(
                f"SELECT state, COUNT(*) FROM leases WHERE 1{where} GROUP BY 1", args
            )
        }

    def last_trained_step(self) -> int:
        """The highest step any lease was trained at; 0 before the first step."""
        ((step,),) = self._rows("SELECT MAX(step) FROM leases WHERE state='trained'")
        return int(step or 0)

    def trained_steps(self, kind: str | None = "train") -> list[int]:
        """The distinct steps leases were trained at, ascending."""
        where, args = self._kind(kind)
        q = f"SELECT DISTINCT step FROM leases WHERE state='trained'{where} ORDER BY step"
        return [int(s) for (s,) in self._rows(q, args)]

    def trained_after(self, step: int) -> int:
        """Leases trained at a step after `step` (work a resume from a checkpoint of `step`
        trains again)."""
        ((n,),) = self._rows(
            "SELECT COUNT(*) FROM leases WHERE state='trained' AND step > ?", (step,)
        )
        return int(n)

    def outstanding(self, kind: str | None = None) -> list[int]:
        """Ids of the leases handed out and not yet answered, ascending."""
        where, args = self._kind(kind)
        q = f"SELECT lease_id FROM leases WHERE state='outstanding'{where} ORDER BY lease_id"
        return [int(i) for (i,) in self._rows(q, args)]

    def states(self, lease_ids: list[int]) -> dict[int, str]:
        """lease id -> state, for the given leases that exist."""
        if not lease_ids:
            return {}
        marks = ",".join("?" * len(lease_ids))
        q = f"SELECT lease_id, state FROM leases WHERE lease_id IN ({marks})"
        return {int(i): str(s) for i, s in self._rows(q, tuple(lease_ids))}

    def ended_without_time(self) -> int:
        """Leases trained, skipped or expired with no end time (0 in a consistent ledger)."""
        ((n,),) = self._rows(
            "SELECT COUNT(*) FROM leases WHERE state IN ('trained','skipped','expired')"
            " AND ended_at IS NULL"
        )
        return int(n)

    def prompts_trained_twice(self, kind: str | None = "train") -> int:
        """Prompts trained by more than one lease (0 while the prompt cursor has not wrapped)."""
        where, args = self._kind(kind)
        ((n,),) = self._rows(
            "SELECT COUNT(*) FROM (SELECT prompt_idx FROM leases WHERE state='trained'"
            f"{where} GROUP BY prompt_idx HAVING COUNT(*) > 1)",
            args,
        )
        return int(n)

    def buffered_untrained(self) -> int:
        """Buffered payloads whose lease is not `trained` (0 once a run finished)."""
        ((n,),) = self._rows(
            "SELECT COUNT(*) FROM buffer b JOIN leases l USING (lease_id) WHERE l.state != 'trained'"
        )
        return int(n)

    def meta(self, key: str, default: int = 0) -> int:
        """A counter of the ledger's `meta` table (`cursor`, `version`, `checkpoint_step`, ...)."""
        rows = self._rows("SELECT value FROM meta WHERE key=?", (key,))
        return default if not rows else int(rows[0][0])

    def leases(self) -> list[dict[str, object]]:
        """Every lease as a dict of its columns, in lease order."""
        cur = self._db.execute("SELECT * FROM leases ORDER BY lease_id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def step_timings(self, kind: str = "train") -> list[StepTiming]:
        """Per trained step, ascending: when its leases were closed, the earliest issue of one,
        positives and groups trained."""
        rows = self._rows(
            "SELECT step, MAX(ended_at), MIN(issued_at), SUM(n_positive), COUNT(*) FROM leases"
            " WHERE state='trained' AND kind=? GROUP BY step ORDER BY step",
            (kind,),
        )
        return [StepTiming(int(s), e, i, int(p or 0), int(n)) for s, e, i, p, n in rows]
