"""A version whose sha256 check fails while the engine loads it (the check runs beside the load), on
the real vLLM CPU engine: the bytes were in the engine, so the served weights must be loaded back
(and checked again) before anything is sampled, and an engine that cannot get them back must stay
paused."""

from __future__ import annotations

import shutil
import threading

import pytest
from actor_harness import assert_serves, publish

from popo.common.weights import WEIGHTS_FILE, WeightsError, verify_weights

pytestmark = pytest.mark.vllm


class CountingCheck:
    """`verify_weights` of one version, counting its calls (and the threads they ran on)."""

    def __init__(self, vdir, sha: str, nbytes: int) -> None:
        self.args = (vdir / WEIGHTS_FILE, sha, nbytes)
        self.calls = 0
        self.threads: set[str] = set()

    def __call__(self) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        verify_weights(*self.args)


def test_refused_version_restores_the_served_weights(engine, reference, tmp_path):
    prompt_ids = engine.encode("7+8=")
    v_good = engine.version + 1
    good_state = reference.perturbed(seed=4000 + v_good)
    gdir, gsha, gbytes = publish(tmp_path, f"v{v_good}", good_state)
    good_check = CountingCheck(gdir, gsha, gbytes)
    engine.reload(gdir, v_good, good_check).result(timeout=120)
    reference.load(good_state)
    assert engine.version == v_good and good_check.calls == 1
    assert "vllm-loop" not in good_check.threads  # off the engine's loop, beside the load

    # bit rot after the checksum: the engine loads the bytes, the check refuses them
    v_bad = v_good + 1
    bdir, bsha, bbytes = publish(tmp_path, f"v{v_bad}", reference.perturbed(seed=4000 + v_bad))
    f = bdir / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    in_flight = engine.sample(prompt_ids)  # frozen across the refused reload, then finished
    with pytest.raises(WeightsError, match="sha256"):
        engine.reload(bdir, v_bad, CountingCheck(bdir, bsha, bbytes)).result(timeout=120)
    assert engine.version == v_good
    assert good_check.calls == 2  # the served weights were checked again as they were reloaded
    assert not engine.call(engine.llm.is_paused()).result(timeout=10)
    in_flight.result(timeout=60)
    assert_serves(engine, reference, prompt_ids)  # the served weights, not the refused bytes


def test_unrestorable_weights_leave_the_engine_paused(engine, reference, tmp_path):
    prompt_ids = engine.encode("2+2=")
    v1 = engine.version + 1
    state1 = reference.perturbed(seed=5000 + v1)
    d1, sha1, n1 = publish(tmp_path, f"v{v1}", state1)
    engine.reload(d1, v1, CountingCheck(d1, sha1, n1)).result(timeout=120)
    reference.load(state1)
    shutil.rmtree(d1)  # the served version is gone from disk: nothing to load back

    v2 = v1 + 1
    d2, _, n2 = publish(tmp_path, f"v{v2}", reference.perturbed(seed=5000 + v2))
    try:
        with pytest.raises(RuntimeError, match="could not be loaded back"):
            engine.reload(d2, v2, CountingCheck(d2, "0" * 64, n2)).result(timeout=120)
        assert engine.version == v1
        # the refused bytes are in the engine: it must not sample again
        assert engine.call(engine.llm.is_paused()).result(timeout=10)
    finally:
        # what the restarted role would do: load a good version (resumes the engine)
        v3 = v2 + 1
        state3 = reference.perturbed(seed=5000 + v3)
        d3, sha3, n3 = publish(tmp_path, f"v{v3}", state3)
        engine.reload(d3, v3, CountingCheck(d3, sha3, n3)).result(timeout=120)
        reference.load(state3)
    assert_serves(engine, reference, prompt_ids)
