"""What an in-place reload does to sequences that are generating (`actor.reload_keeps_kv`),
on the real vLLM CPU engine: the reload lands after every sequence has sampled a few tokens, and the
behaviour log-probs of each token are checked against a transformers forward on the weights (and the
KV) that must have produced them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from actor_harness import LOGPROB_ATOL

from popo.actors.engine import _logprobs_of
from popo.common.weights import write_version_dir

pytestmark = pytest.mark.vllm

PROMPT_LEN = 140  # over one 128-token CPU KV block, so the prompt's first block is prefix-cached
MAX_TOKENS = 100  # PROMPT_LEN + MAX_TOKENS <= max_model_len (256)
SEQUENCES = 8
TOKENS_BEFORE_RELOAD = 4


async def _generate_across_reload(engine, prompt: list[int], weights_dir: str, version: int):
    """Start SEQUENCES requests of one prompt, reload once each has sampled TOKENS_BEFORE_RELOAD
    tokens, and return their final outputs."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        n=1,
        temperature=1.0,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        logprobs=0,
        output_kind=RequestOutputKind.CUMULATIVE,
    )
    seen = [0] * SEQUENCES
    finals: list = [None] * SEQUENCES

    async def one(i: int) -> None:
        async for out in engine.llm.generate(engine._prompt(prompt), params, f"kv{version}-{i}"):
            seen[i] = len(out.outputs[0].token_ids)
            finals[i] = out

    tasks = [asyncio.create_task(one(i)) for i in range(SEQUENCES)]
    while min(seen) < TOKENS_BEFORE_RELOAD and not any(t.done() for t in tasks):
        await asyncio.sleep(0.001)
    assert max(seen) < MAX_TOKENS, "a sequence finished before the reload: nothing was frozen"
    await engine.reload_async(weights_dir, version)
    await asyncio.gather(*tasks)
    return finals


@pytest.mark.parametrize("keep_kv", [False, True], ids=["recompute", "keep_kv"])
def test_reload_during_generation(engine, reference, tmp_path, keep_kv):
    old_state = {k: v.clone() for k, v in reference.model.state_dict().items()}
    v0 = engine.version
    v1 = v0 + 1
    new_state = reference.perturbed(seed=1000 + v1)
    vdir = write_version_dir(tmp_path / f"v{v1}", new_state)[0].parent
    prompt = np.random.default_rng(v1).integers(0, 256, PROMPT_LEN).tolist()
    engine.cfg.reload_keeps_kv = keep_kv
    try:
        finals = engine.call(_generate_across_reload(engine, prompt, str(vdir), v1)).result(120)
        assert engine.version == v1

        post_diffs = []
        for out in finals:
            (c,) = out.outputs
            assert c.finish_reason == "length" and len(c.token_ids) == MAX_TOKENS
            # versions labelled per token: the old version up to the reload, the new one after
            spans = [(int(s.version), s.start, s.end) for s in c.weight_versions]
            assert [v for v, _, _ in spans] == [v0, v1], spans
            cut = spans[0][2]
            assert spans[0][1] == 0 and spans[1] == (v1, cut, MAX_TOKENS)
            assert TOKENS_BEFORE_RELOAD <= cut < MAX_TOKENS
            mu = _logprobs_of(c.logprobs, c.token_ids)
            completion = list(c.token_ids)
            reference.load(old_state)
            ref_old = reference.logprobs(prompt, completion)
            reference.load(new_state)
            ref_new = reference.logprobs(prompt, completion)
            # before the reload, the old weights sampled every token
            np.testing.assert_allclose(mu[:cut], ref_old[:cut], atol=LOGPROB_ATOL, rtol=0)
            post_diffs.append(float(np.max(np.abs(mu[cut:] - ref_new[cut:]))))
        if keep_kv:
            # the new weights sampled on top of KV the old ones computed: not the new policy's
            # own probabilities (mu records what was really sampled from)
            assert min(post_diffs) > 100 * LOGPROB_ATOL, post_diffs
        else:
            # prompt and completion so far were recomputed with the new weights on resume
            assert max(post_diffs) < LOGPROB_ATOL, post_diffs

        # a new request of the same prompt after the reload: served wholly by the new weights,
        # with no prefix block of the old version reused (cleared, or salted by version)
        group = engine.sample(prompt).result(timeout=60)
        for s in group.samples:
            assert s.versions == (v1,)
            ref = reference.logprobs(prompt, s.token_ids.tolist())
            np.testing.assert_allclose(s.logprobs, ref, atol=LOGPROB_ATOL, rtol=0)
    except BaseException:
        # the other tests expect the reference to hold what the engine serves
        reference.load(new_state if engine.version == v1 else old_state)
        raise
    finally:
        engine.cfg.reload_keeps_kv = False
