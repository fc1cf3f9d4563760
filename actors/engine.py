"""One vLLM engine per actor: the v1 async engine (`AsyncLLM`) driven from a private event loop.

vLLM's async engine batches every request it holds (continuous batching), so an actor keeps many
prompt groups in flight at once. The engine's asyncio loop lives in a daemon thread owned by
`RolloutEngine`; callers on other threads get `concurrent.futures.Future`s back, which keeps the
actor's own loop plain synchronous code (a `run()` that calls a readable `step()`).

Weight versions: vLLM 0.32 labels every sampled token with the engine's weight version
(`CompletionOutput.weight_versions`, spans over output-token indexes). A reload pauses the
scheduler with in-flight requests frozen (`pause_generation(mode="keep")`, nothing is dropped),
loads the new file in place (`collective_rpc("reload_weights")`), relabels the version and
resumes — so each group's oldest and newest producing version come from the engine itself, exact to
the token, not from guessing around the reload.

What the frozen requests' KV becomes is `actor.reload_keeps_kv`: off (the default), vLLM preempts
every running request when the pause clears its caches and re-prefills prompt + completion so far
with the new weights on resume; on, they continue on the KV they had, computed by the old weights.
Either way mu is the probability the engine actually sampled with, which is what the learner's
bounded importance weights need.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from popo.common.config import ActorConfig, ModelConfig
from popo.common.data import encode_prompt

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One sampled completion."""

    token_ids: np.ndarray
    """[T] int32 sampled token ids."""
    logprobs: np.ndarray
    """[T] float32 log mu(y_t | x, y_<t) of the sampled tokens (behaviour policy)."""
    text: str
    finish_reason: str
    versions: tuple[int, ...]
    """Weight versions that sampled any of the tokens, oldest first."""


@dataclass(frozen=True)
class SampledGroup:
    """G completions of one prompt."""

    samples: list[Sample]
    version_min: int
    version_max: int
    t_started: float
    t_finished: float

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


@dataclass(frozen=True)
class ReloadTiming:
    """Seconds spent in each phase of an in-place reload (engine side)."""

    pause_s: float
    load_s: float
    """The load, with the files' check running beside it (until both are done)."""
    resume_s: float

    @property
    def total_s(self) -> float:
        return self.pause_s + self.load_s + self.resume_s


def resolve_dtype(dtype: str) -> str:
    """`auto` -> float32 on CPU (vLLM's CPU kernels and the parity tests want it), bfloat16 on GPU."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "bfloat16"


def _logprobs_of(logprobs: Any, token_ids: Sequence[int]) -> np.ndarray:
    """The sampled tokens' log-probs from vLLM's per-position logprobs ([T] float32).

    With `logprobs=0` each position holds exactly the sampled token; vLLM returns either a
    `FlatLogprobs` (flat lists, the fast path) or a list of {token_id: Logprob} dicts.
    """
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(token_ids):
        return np.asarray(flat, dtype=np.float32)
    return np.asarray(
        [pos[tok].logprob for pos, tok in zip(logprobs, token_ids, strict=True)], dtype=np.float32
    )


def _ints(ids: Sequence[int]) -> list[int]:
    # vLLM serialises requests with msgspec, which refuses numpy scalars.
    return [int(i) for i in ids]


def _span_versions(spans: Any, fallback: int) -> tuple[int, ...]:
    if not spans:
        return (fallback,)
    return tuple(sorted({int(s.version) for s in spans}))


class RolloutEngine:
    """A vLLM `AsyncLLM` plus the event-loop thread that drives it.

    Thread-safe: every public method may be called from any thread. `start()` blocks until the
    engine is ready.
    """

    def __init__(
        self,
        model_path: str | Path,
        actor_cfg: ActorConfig,
        model_cfg: ModelConfig,
        seed: int = 0,
    ) -> None:
        self.model_path = str(model_path)
        self.cfg = actor_cfg
        self.model_cfg = model_cfg
        self.seed = seed
        self.version = 0
        """Weight version the engine serves (set by `reload` once the new weights are live)."""
        self._llm: AsyncLLM | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-loop", daemon=True
        )
        self._ids = itertools.count()
        self._reload_lock: asyncio.Lock | None = None
        self._served: tuple[str, Callable[[], None] | None] = (self.model_path, None)
        """(directory, check) of the weights the engine serves: what a refused version restores."""

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, initial_version: int = 0) -> None:
        """Create the engine (blocking) and label its weights `initial_version`."""
        # Engine-core processes read these at start-up; the CPU build sizes its KV cache from it.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(self.cfg.kv_cache_gib)))
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and self.cfg.tensor_parallel_size == 1:
            # vLLM CPU's default multi-process executor runs the model in a worker process fed by
            # the engine process over a shared-memory queue whose reader spins (sched_yield) for
            # 1 s after every message: the engine spins while the worker computes, and the worker
            # spins through every pause shorter than that (an actor waiting for leases), a core
            # each. With one rank the model runs in the engine process itself and waits on a
            # blocking queue. Its torch threads then come from OMP_NUM_THREADS (else vLLM uses 1):
            # `deploy.placement` sets it to the actor's share; without it, as many as vLLM's
            # multi-process default would bind (every core of the process but one).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))
        self._thread.start()
        self.call(self._create(initial_version)).result()

    async def _create(self, initial_version: int) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            dtype=resolve_dtype(self.model_cfg.dtype),  # type: ignore[arg-type]
            max_model_len=self.model_cfg.max_model_len,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            enforce_eager=self.cfg.enforce_eager,
            seed=self.seed,
            max_num_seqs=self.cfg.max_num_seqs,
            logprobs_mode=self.cfg.logprobs_mode,  # type: ignore[arg-type]
            # Cached prefixes never serve a newer version: a reload either clears the cache or
            # (`reload_keeps_kv`) requests are salted with the version they were submitted under.
            enable_prefix_caching=True,
            disable_log_stats=True,
        )
        from vllm.usage.usage_lib import UsageContext

        chosen = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
        vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        if vllm_config.device_config.device_type == "cpu" and chosen is None:
            # vLLM's CPU platform sets `spawn` while building the config, so the engine-core process
            # imports torch and vLLM all over again (~7 CPU-seconds, a third of the engine start on
            # a 2-core machine). Nothing here has started OpenMP or a device yet, which is what
            # makes `spawn` necessary elsewhere; a user's explicit choice still wins, and vLLM
            # itself still forces `spawn` inside a Ray actor.
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
        self._llm = AsyncLLM.from_vllm_config(vllm_config, disable_log_stats=True)
        self._reload_lock = asyncio.Lock()
        await self._llm.update_weight_version(str(initial_version))
        self.version = initial_version

    def close(self) -> None:
        """Shut the engine down and stop the loop thread (idempotent)."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            try:
                self.call(self._abort_all(llm)).result(timeout=10)
            except Exception:  # shutting down anyway; the engine may already be dead
                log.debug("abort before shutdown failed", exc_info=True)
            llm.shutdown()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    @staticmethod
    async def _abort_all(llm: AsyncLLM) -> None:
        ids = list(llm.output_processor.request_states)
        if ids:
            await llm.abort(ids)
        # Stop the output handler before the engine core goes, or it reports the core's exit
        # as an engine failure.
        handler, llm.output_handler = llm.output_handler, None
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler

    # --- calls from other threads ----------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run `coro` on the engine's loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("engine not started (or already closed)")
        return self._llm

    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids, encoded as the learner encodes it (`encode_prompt`)."""
        return encode_prompt(self.llm.get_tokenizer(), text)

    def _prompt(self, prompt_ids: list[int]) -> Any:
        from vllm.inputs import TokensPrompt

        if not self.cfg.reload_keeps_kv:
            return TokensPrompt(prompt_token_ids=prompt_ids)
        # Prefix-cache blocks outlive reloads here; the salt keys them by weight version.
        return TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=f"v{self.version}")

    def sampling_params(self, n: int | None = None) -> SamplingParams:
        """The behaviour policy's sampling: G samples, with the sampled tokens' log-probs."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n or self.cfg.group_size,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            stop=list(self.cfg.stop) or None,
            logprobs=0,  # the sampled token's own log-prob: mu for importance weights
            # No per-request seed (the engine's seed covers sampling): on vLLM's CPU build a seeded request
            # fails when a long prefill is split over engine steps.
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per group, no streaming cost
        )

    def sample(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Future:
        """Sample a group for one prompt; the future resolves to a `SampledGroup`."""
        return self.call(self._sample(_ints(prompt_ids), params or self.sampling_params()))

    async def _sample(self, prompt_ids: list[int], params: SamplingParams) -> SampledGroup:
        t0 = time.time()
        final = None
        async for out in self.llm.generate(self._prompt(prompt_ids), params, f"g{next(self._ids)}"):
            final = out
        if final is None:
            raise RuntimeError("vLLM finished a request without any output")
        fallback = self.version
        samples = []
        for c in final.outputs:
            ids = np.asarray(c.token_ids, dtype=np.int32)
            samples.append(
                Sample(
                    token_ids=ids,
                    logprobs=_logprobs_of(c.logprobs, c.token_ids),
                    text=c.text,
                    finish_reason=str(c.finish_reason),
                    versions=_span_versions(c.weight_versions, fallback),
                )
            )
        versions = [v for s in samples for v in s.versions]
        return SampledGroup(samples, min(versions), max(versions), t0, time.time())

    def generate_many(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list:
        """Raw throughput reference: submit all prompts at once, wait for every one (blocking).

        Returns vLLM's `RequestOutput`s in prompt order.
        """

        async def run_all() -> list:
            async def one(ids: Sequence[int]) -> Any:
                final = None
                async for out in self.llm.generate(
                    self._prompt(_ints(ids)), params, f"r{next(self._ids)}"
                ):
                    final = out
                return final

            return list(await asyncio.gather(*(one(p) for p in prompts)))

        return self.call(run_all()).result()

    def prompt_logprobs(self, token_ids: Sequence[int]) -> Future:
        """Log-probs the served weights give each token of `token_ids` after its prefix.

        Resolves to a [T-1] float32 array: entry t-1 is log p(token_t | tokens_<t).
        """
        return self.call(self.prompt_logprobs_async(_ints(token_ids)))

    async def prompt_logprobs_async(self, token_ids: Sequence[int]) -> np.ndarray:
        """`prompt_logprobs` for a caller already on the engine's loop: a [T-1] float32 array,
        entry t-1 is log p(token_t | tokens_<t)."""
        from vllm import SamplingParams

        ids = _ints(token_ids)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        final = None
        async for out in self.llm.generate(self._prompt(ids), params, f"p{next(self._ids)}"):
            final = out
        assert final is not None and final.prompt_logprobs is not None
        # position 0 has no prefix (None); the rest hold the actual token's log-prob.
        return _logprobs_of(final.prompt_logprobs[1:], ids[1:])

    # --- weights ---------------------------------------------------------------------------------

    def reload(
        self, weights_dir: str | Path, version: int, verify: Callable[[], None] | None = None
    ) -> Future:
        """Load `weights_dir/*.safetensors` in place and label it `version`; resolves to
        `ReloadTiming`. In-flight requests are frozen, not dropped, and their later tokens carry
        the new version; their KV is recomputed with the new weights, or kept with
        `actor.reload_keeps_kv`. `verify`: see `reload_async`."""
        return self.call(self.reload_async(str(weights_dir), version, verify))

    async def reload_async(
        self,
        weights_dir: str,
        version: int,
        verify: Callable[[], None] | None = None,
        verified: bool = False,
    ) -> ReloadTiming:
        """`reload`, on the engine's loop.

        verify: a blocking check of the files in `weights_dir` (their sha256) that raises when they
        are not the announced bytes. Unless `verified` (the caller has run it already) it runs on a
        thread while the engine loads the same files, so the check costs no time of its own, and
        generation stays paused until both are done. If it raises, the version is refused: the
        previous weights are loaded back, checked by their own `verify`, before generation resumes,
        and the error propagates; nothing is ever sampled from unchecked bytes. Should the previous
        weights fail to load or check, the engine stays paused and a RuntimeError propagates (the
        role must exit). `verify` is kept with the weights for that purpose.
        """
        assert self._reload_lock is not None
        llm = self.llm
        async with self._reload_lock:
            t0 = time.perf_counter()
            await llm.pause_generation(mode="keep", clear_cache=not self.cfg.reload_keeps_kv)
            t1 = time.perf_counter()
            resume = True
            try:
                refused = await self._load_checked(weights_dir, None if verified else verify)
                if refused is not None:
                    served_dir, served_verify = self._served
                    try:
                        broken = await self._load_checked(served_dir, served_verify)
                    except Exception as e:
                        broken = e
                    if broken is not None:
                        resume = False
                        raise RuntimeError(
                            f"version {version} was refused ({refused}) and the served weights "
                            f"{served_dir} could not be loaded back: {broken}"
                        ) from broken
                    raise refused
                await llm.update_weight_version(str(version))
                self.version = version
                self._served = (weights_dir, verify)
                t2 = time.perf_counter()
            finally:
                # Even a failed load must not leave the engine paused with requests frozen, unless
                # the weights in it are unchecked bytes.
                if resume:
                    await llm.resume_generation()
            t3 = time.perf_counter()
        return ReloadTiming(pause_s=t1 - t0, load_s=t2 - t1, resume_s=t3 - t2)

    async def _load_checked(
        self, weights_dir: str, verify: Callable[[], None] | None
    ) -> Exception | None:
        """Load `weights_dir` into the paused engine while `verify` checks it on a thread; ->
        `verify`'s error (the engine then holds the refused bytes), or None. An engine error with
        a passing check propagates."""
        load = self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights_dir})
        if verify is None:
            await load
            return None
        loaded, checked = await asyncio.gather(
            load, asyncio.to_thread(verify), return_exceptions=True
        )
        if isinstance(checked, Exception):
            if isinstance(loaded, BaseException):
                log.warning("loading refused weights %s also failed: %s", weights_dir, loaded)
            return checked
        if isinstance(checked, BaseException):
            raise checked  # cancelled
        if isinstance(loaded, BaseException):
            raise loaded
        return None

    def num_unfinished(self) -> int:
        return self.llm.get_num_unfinished_requests()
