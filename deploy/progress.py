"""Live progress of a run, read from the run's metrics.jsonl (every role appends its figures there).

On a terminal: a rich table redrawn in place. Elsewhere (CI, a log file): one plain line every
`every_s` seconds.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from popo.common.run_dir import RunDir, read_jsonl


class RunView:
    def __init__(self, run_dir: Path, total_steps: int, every_s: float = 10.0) -> None:
        self.path = RunDir(run_dir).metrics
        self.evals_path = RunDir(run_dir).evals
        self.total_steps = total_steps
        self.every_s = every_s
        self._offset = 0
        self.latest: dict[str, dict[str, Any]] = {}
        self.history: dict[str, deque[dict[str, Any]]] = {}
        """Recent records per instance (the last `max_window_s`): counters such as trained or
        sampled tokens move in bursts, so rates are averaged over `window_s` or longer."""
        self.window_s = 30.0
        self.max_window_s = 300.0
        self.t0 = time.time()
        self._last_plain = 0.0
        self.tty = sys.stdout.isatty()
        self._live: Any = None

    def _read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            inst = rec.get("instance", "?")
            self.latest[inst] = rec
            hist = self.history.setdefault(inst, deque())
            hist.append(rec)
            while len(hist) > 2 and rec["t"] - hist[1]["t"] >= self.max_window_s:
                hist.popleft()

    def _rate(self, inst: str, key: str) -> float | None:
        """Rate of a counter over at least `window_s` before its last change, reaching back to
        where it last stood still: an actor counts a group's tokens only when the whole group is
        done, so one burst can hold minutes of sampling (and a plain window reads 0 or far too
        much). Once the counter has stood still for longer than that span, the wait counts."""
        hist = [r for r in self.history.get(inst, ()) if key in r]
        if len(hist) < 2:
            return None
        i = len(hist) - 1
        while i > 0 and hist[i - 1][key] == hist[-1][key]:  # back to the last change
            i -= 1
        j = i
        while j > 0 and hist[j]["t"] > hist[i]["t"] - self.window_s:
            j -= 1
        while j > 0 and hist[j - 1][key] == hist[j][key]:  # to the start of that quiet spell
            j -= 1
        a, c, b = hist[j], hist[i], hist[-1]
        span = max(c["t"] - a["t"], b["t"] - c["t"])
        return (b[key] - a[key]) / span if span > 0 else None

    def rows(self) -> list[tuple[str, str]]:
        self._read()
        lr = self.latest.get("learner", {})
        step = int(lr.get("popo_learner_step", 0))
        elapsed = time.time() - self.t0
        eta = "?"
        if step > 0 and lr.get("t"):
            per_step = (lr["t"] - self.t0) / step
            eta = f"{max(0.0, per_step * (self.total_steps - step)):.0f}s"
        # The learner's gauges read 0 until their first value; show "-" until then.
        verified = any(
            rec.get("popo_verifier_completions_total")
            for inst, rec in self.latest.items()
            if inst.startswith("verifier")
        )
        rows = [
            ("step", f"{step}/{self.total_steps}  (elapsed {elapsed:.0f}s, ETA {eta})"),
            ("policy version", str(int(lr.get("popo_learner_policy_version", 0)))),
            (
                "pass rate (verifier)",
                _fmt_pct(lr.get("popo_learner_pass_rate") if verified else None),
            ),
            ("held-out accuracy", self._last_eval(lr)),
            ("loss", _fmt(lr.get('popo_learner_loss{term="total"}'))),
            (
                "buffer / in-flight leases",
                f"{_fmt(lr.get('popo_learner_buffer_groups'), 0)} / {_fmt(lr.get('popo_learner_outstanding_leases'), 0)}",
            ),
            ("mean staleness", _fmt(_mean(lr, "popo_learner_staleness_versions"))),
        ]
        phases = [
            f"{name} {lr[key]:.1f}s"
            for name in ("learner_ready", "actor_ready", "first_step")
            if (key := f'popo_learner_startup_seconds{{phase="{name}"}}') in lr
        ]
        if phases:
            rows.append(("start-up (from launch)", ", ".join(phases)))
        lt = self._rate("learner", "popo_learner_tokens_total")
        rows.append(("learner tokens/s", _fmt(lt, 0)))
        for inst in sorted(k for k in self.latest if k.startswith("actor")):
            rows.append((f"{inst} tokens/s", _fmt(self._rate(inst, "popo_actor_tokens_total"), 0)))
            if expired := self.latest[inst].get("popo_actor_leases_expired_total"):
                rows.append((f"{inst} leases expired", f"{expired:.0f} (learner.lease_timeout_s)"))
        for inst in sorted(k for k in self.latest if k.startswith("verifier")):
            rate = self._rate(inst, "popo_verifier_completions_total")
            rows.append((f"{inst} verifications/s", _fmt(rate, 1)))
        return rows

    def _last_eval(self, learner: dict[str, Any]) -> str:
        """The last evaluation of the run (earlier learner processes' included), from eval.jsonl,
        and how far the one in progress is."""
        evals = read_jsonl(self.evals_path)
        last = f"{100 * evals[-1]['accuracy']:.1f}% at step {evals[-1]['step']}" if evals else "-"
        key = "popo_learner_eval_round_prompts"
        if total := learner.get(f'{key}{{state="total"}}'):
            done = learner.get(f'{key}{{state="done"}}', 0)
            last += f" (evaluating: {done:.0f}/{total:.0f} prompts)"
        return last

    def update(self) -> None:
        rows = self.rows()
        if self.tty:
            from rich.live import Live
            from rich.table import Table

            table = Table(title="POPO-RL run", show_header=False)
            for k, v in rows:
                table.add_row(k, v)
            if self._live is None:
                self._live = Live(table, refresh_per_second=2, transient=False)
                self._live.start()
            else:
                self._live.update(table)
        elif time.time() - self._last_plain >= self.every_s:
            self._last_plain = time.time()
            print(" | ".join(f"{k}: {v}" for k, v in rows), flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


def _mean(rec: dict[str, Any], hist: str) -> float | None:
    n = rec.get(f"{hist}_count")
    return rec.get(f"{hist}_sum", 0.0) / n if n else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
