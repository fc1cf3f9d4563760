"""One configuration tree for every role (docs/architecture.md, Configuration).

`RunConfig` is loaded from TOML and overridden with dotted command-line flags
(`popo train --config c.toml --learner.lr 1e-6`) through pydantic-settings' CLI support.
This module must import without torch, vllm or ray: launchers parse the config before they
decide which heavy libraries a process needs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)


class ConfigError(ValueError):
    """A config file or flag is wrong. The message is one line naming the key and its source."""


WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})
"""Hosts that bind every interface: refused without explicit consent (TransportConfig, MetricsConfig)."""


def is_loopback(host: str) -> bool:
    """Whether a bind on `host` listens on this machine only (`127.0.0.0/8`, `::1`, `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # an interface or host name: it may face the network
        return False


def unauthenticated_bind(t: TransportConfig, hosts: Iterable[str]) -> str | None:
    """Why binding ZeroMQ endpoints on `hosts` would listen unauthenticated on a network address,
    as a message; None when it would not (every host loopback, CurveZMQ keys, or
    `allow_insecure_bind`). The one check behind `transport.host`, `popo ray`'s node IPs and every
    socket bind."""
    if t.curve_keys_dir or t.allow_insecure_bind:
        return None
    exposed = sorted({h for h in hosts if not is_loopback(h)})
    if not exposed:
        return None
    named = [f"{h!r} (every interface)" if h in WILDCARD_HOSTS else h for h in exposed]
    return (
        f"the roles would bind {', '.join(named)} without CurveZMQ keys: set "
        "transport.curve_keys_dir (`popo keys`) or transport.allow_insecure_bind = true"
    )


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos; docstrings become field help.
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


class DemoModelConfig(_Section):
    """The embedded demo model's recipe: a small Qwen2 warm-started on the synthetic task."""

    cache_dir: str = ".cache/demo-model"
    """Where the embedded demo model is built and cached (relative to the working directory)."""
    seed: int = 0
    """Seed of its initialisation, data order and warm-start sampling."""
    hidden_size: int = Field(128, gt=0)
    """Hidden size (hidden_size / heads must be a head size vLLM's CPU attention supports: 32, 64,
    80, ...)."""
    layers: int = Field(4, gt=0)
    """Transformer layers."""
    heads: int = Field(4, gt=0)
    """Attention heads."""
    kv_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention; divides heads)."""
    intermediate_size: int = Field(512, gt=0)
    """MLP width."""
    batch_size: int = Field(64, gt=0)
    """Warm-start: problems per supervised step."""
    lr: float = Field(2e-3, gt=0.0)
    """Warm-start: AdamW learning rate (constant after a short linear warm-up)."""
    max_steps: int = Field(3000, gt=0)
    """Warm-start: step limit if the target accuracy is never reached."""
    target_accuracy: float = Field(0.3, gt=0.0, lt=1.0)
    """Warm-start: stop once sampled accuracy (temperature 1) on the synthetic val split reaches
    this, so the base model keeps room for RL to learn."""
    eval_every: int = Field(20, gt=0)
    """Warm-start: steps between two val-accuracy checks."""
    eval_prompts: int = Field(200, gt=0)
    """Warm-start: val problems sampled (once each) per accuracy check."""


class ModelConfig(_Section):
    path: str = "auto"
    """Hugging Face model directory (safetensors + tokenizer). `auto` builds or reuses the embedded
    demo model (`popo demo-model`) in `demo.cache_dir`; a packaged model's name (`smollm2`: the
    `real` extra) builds or reuses that model (`popo prepare-model NAME`) in `packaged_cache_dir`."""
    packaged_cache_dir: str = ".cache/packaged-models"
    """Where packaged models named by `path` are built and cached (relative to the working
    directory)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the actors' engines serve, and so of published versions (`learner.publish_dtype`);
    the learner keeps float32 parameters (bf16 autocast on GPU). `auto` is float32 on CPU and
    bfloat16 on GPU. bfloat16 samples faster on a CPU with bf16 instructions (AVX512-BF16, AMX);
    its versions are dithered so that updates smaller than its spacing still reach the actors
    (`learner.publish_rounding`, `popo_learner_published_change_fraction`, docs/architecture.md,
    Weights)."""
    max_model_len: int = Field(256, gt=0)
    """Longest prompt + completion, in tokens, that the engines must hold."""
    demo: DemoModelConfig = DemoModelConfig()
    """The embedded demo model (`path = "auto"`): its architecture and warm-start recipe."""


class SyntheticTaskConfig(_Section):
    seed: int = 0
    """Seed of the synthetic arithmetic task; the same seed gives the same splits everywhere."""
    n_train: int = Field(4000, gt=0)
    """Number of training problems."""
    n_test: int = Field(500, gt=0)
    """Number of held-out problems (disjoint from the training split)."""
    n_val: int = Field(200, gt=0)
    """Number of validation problems (disjoint from train and test); the demo warm-start stops on
    its accuracy, so the test split stays untouched."""
    min_terms: int = Field(2, ge=2)
    """Fewest operands of a sum."""
    max_terms: int = Field(2, ge=2)
    """Most operands of a sum (the count is uniform in [min_terms, max_terms]). Three-term sums
    are a harder task, which the default demo warm-start learns far more slowly."""
    max_operand: int = Field(99, ge=1)
    """Operands are uniform integers in [0, max_operand]."""


class DataConfig(_Section):
    source: str = "synthetic"
    """`synthetic` for the embedded arithmetic task (`17+58=`); `sums` for the same sums asked as
    a question (`What is 17+58? Put the answer in \\boxed{}.`), for chat models; a shipped
    benchmark's name (e.g. `gsm8k`: its first `eval_size` rows are held out, the rest train); or a
    path to a JSONL / parquet file of prompts."""
    prompt_field: str = "problem"
    """Field holding the problem text (e.g. `question` for GSM8K)."""
    answer_field: str = "answer"
    """Field holding the gold answer, or the solution text it is extracted from."""
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"
    """How to read the gold: `plain` takes the field as is; `gsm8k` takes the number after `####`;
    `boxed` takes the last `\\boxed{}` of a solution text."""
    id_field: str | None = None
    """Optional field used as the prompt id; the row number is used when absent."""
    template: Literal["auto", "chat", "qwen_math", "plain"] = "auto"
    """Prompt template: `chat` renders the problem as the user turn of the model's own chat
    template (with `system_prompt`, if set); `qwen_math` wraps the problem in the Qwen-math chat
    format with the system prompt of the reference run; `plain` passes the problem text as is (the
    demo model's format); `auto` is `chat` when the model's tokenizer has a chat template, else
    `plain` for the synthetic and sums tasks and `qwen_math` for a file."""
    system_prompt: str | None = None
    """System turn of the `chat` template; `None` sends the user turn alone (the model's template
    may still insert its own default system turn)."""
    eval_size: int = Field(200, gt=0)
    """Held-out prompts evaluated (the first N of the eval split); G samples each."""
    eval_source: str | None = None
    """Held-out benchmark (path or shipped name) evaluated during training; `None` uses the
    source's own held-out split (the test split of `synthetic` / `sums`, the first `eval_size` rows
    of a shipped benchmark), else the synthetic test split."""
    synthetic: SyntheticTaskConfig = SyntheticTaskConfig()
    """Parameters of the embedded synthetic arithmetic task."""

    @property
    def resolved_template(self) -> Literal["chat", "qwen_math", "plain"]:
        """The template after `auto` is resolved against the source alone (without a tokenizer:
        `popo.common.data.resolve_template` also looks at the model's chat template)."""
        if self.template != "auto":
            return self.template
        return "plain" if self.source in ("synthetic", "sums") else "qwen_math"


class ActorConfig(_Section):
    num_actors: int = Field(1, ge=1)
    """Number of actor processes (one vLLM engine each)."""
    group_size: int = Field(8, ge=1)
    """G: completions sampled per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of the behaviour policy; the learner's log-probs use it too
    (logits / temperature), so the importance ratio compares the same distributions."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold. Training needs 1: the learner's pi has no nucleus truncation."""
    max_tokens: int = Field(16, gt=0)
    """Longest completion, in tokens (the reference run used 1024)."""
    stop: list[str] = []
    """Stop strings; the completion ends before them."""
    max_inflight_prompts: int = Field(32, ge=1)
    """Credit: prompts an actor holds leases for at once that are not yet finished (being sampled
    in the engine, or received and waiting for an engine slot)."""
    max_pending_groups: int = Field(64, ge=1)
    """Bound on finished groups an actor buffers while the verifier does not accept them; the
    actor asks for a lease only if its group would still fit (pending + unfinished <= this), so a
    vanished verifier stops lease requests with at most this many groups in memory (backpressure)."""
    kv_cache_gib: float = Field(1.0, gt=0.0)
    """CPU engines: KV-cache size in GiB (`VLLM_CPU_KVCACHE_SPACE`)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """GPU engines: fraction of device memory vLLM may take."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Tensor-parallel degree of each actor's engine."""
    enforce_eager: bool = True
    """Disable CUDA graphs / compilation (required on the CPU build, faster start everywhere)."""
    seed: int = 0
    """Engine seed; actor i uses seed + i."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Sequences the engine batches at once (vLLM `max_num_seqs`); `None` keeps vLLM's default.
    At least max_inflight_prompts * group_size keeps every leased group in the batch."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """Which log-probs the actor reports as mu: `raw_logprobs` are the model's own at temperature 1;
    `processed_logprobs` are those of the distribution sampled from (after temperature / top-p).
    The learner computes pi at `temperature`, so a temperature other than 1 needs
    `processed_logprobs` (refused otherwise); at temperature 1 both are the same."""
    drain_timeout_s: float = Field(30.0, ge=0.0)
    """On SIGTERM: how long to wait for in-flight groups to finish and be delivered; what is left
    after it is dropped whole (its leases expire at the learner and are re-dispatched)."""
    weights_cache_dir: str | None = None
    """Node-local directory for streamed weight versions (`transport.weights_mode`), shared by the
    actors of a node: each version is downloaded once per node, under a file lock, and the others
    verify and load that copy. Default `<run_dir>/weights-cache/<hostname>`, or a temporary
    directory without a run directory. Needs flock to work between the node's actors (a local disk
    does)."""
    weights_cache_keep: int = Field(2, ge=1)
    """Streamed versions kept in the node cache; older ones are deleted once no actor of the node
    serves or loads them (the disk holds this many plus those in use, plus one being downloaded)."""
    reload_keeps_kv: bool = True
    """Keep the KV cache across an in-place reload (vLLM `pause_generation(clear_cache=False)`).
    Off, a reload preempts every running sequence and recomputes its prompt and completion so far
    with the new weights on resume; on, they continue on the KV their earlier tokens produced under
    the old weights. The behaviour log-probs mu are recorded per token at sampling, so POPO's
    bounded importance sampling corrects the (slightly different) behaviour policy either way.
    Requests are then salted with the weight version at submission, so a new request never reuses
    an older version's prefix-cache blocks. Version labels stay per sampled token; a group's
    `version_min` can understate the oldest weights behind its context only for a request whose
    prompt KV was computed (or prefix-matched under its submission salt) before a reload but whose
    first token was sampled after it. On by default: faster at the same held-out accuracy
    (BENCHMARKS.md); off gives exact version labels."""


class VerifierConfig(_Section):
    num_workers: int = Field(1, ge=1)
    """Worker processes that run math-verify (per replica)."""
    replicas: int = Field(1, ge=1)
    """Verifier services run side by side; actors spread groups across them."""
    timeout_s: float = Field(5.0, gt=0.0)
    """Hard wall-clock limit per completion; a stuck worker is killed and the completion is `timeout`."""
    forward: Literal["auto", "positives", "all"] = "auto"
    """What reaches the learner: `positives` (POPO, WAPO), `all` with rewards (GRPO, Dr. GRPO);
    `auto` picks from the algorithm."""
    max_completion_chars: int = Field(65536, gt=0)
    """Longer completion texts are scored `error` without reaching math-verify."""
    max_brace_depth: int = Field(100, gt=0)
    """Completions with `{}` nested deeper are scored `error` (latex2sympy recurses on them)."""
    max_inflight_groups: int = Field(64, ge=1)
    """Groups being scored or waiting to be sent at once; past it the verifier stops reading
    rollouts and ZeroMQ's high-water mark pushes back on the actors."""
    worker_memory_mib: int = Field(4096, ge=0)
    """Address-space limit of each scoring worker in MiB (0: no limit)."""


class LearnerConfig(_Section):
    device: str = "auto"
    """Torch device of the learner: `auto` is cuda when available, else cpu."""
    devices: int = Field(1, ge=1)
    """Learner ranks. Above 1 the learner shards its modules with FSDP2 over that many processes
    (one per GPU, `cuda:<LOCAL_RANK>`; gloo processes on CPU) started by `popo learner` itself, or
    by torchrun when it sets WORLD_SIZE. Rank 0 runs the learner role; the others only train."""
    seed: int = 0
    """Seed of the learner's RNGs (data order, feature noise, predictor init)."""
    lr: float = Field(2e-4, gt=0.0)
    """Peak AdamW learning rate. The default suits the 1 M-parameter demo model; the reference run
    used 1e-7 for 7B and 1e-6 for 1.5B."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of `total_steps` spent in linear warm-up before the cosine decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Max global gradient norm."""
    total_steps: int = Field(200, gt=0)
    """Optimizer steps in the run."""
    prompts_per_step: int = Field(16, gt=0)
    """Completed groups (prompts) consumed by one optimizer step."""
    micro_batch_tokens: int = Field(4096, gt=0)
    """Token budget of a micro-batch; a micro-batch always holds whole groups."""
    logits_chunk_mib: int = Field(64, ge=0)
    """Bound, in MiB, of one block of fp32 [tokens, vocabulary] logits: the completion tokens'
    log-probs and entropies are computed block by block and recomputed in the backward, so a
    micro-batch's memory does not grow with the vocabulary. 0: one block per micro-batch."""
    max_staleness: int = Field(2, ge=0)
    """Largest allowed policy-version lag of a trained sample; 0 is a synchronous run. Up to
    (max_staleness + 1) steps of prompts are in flight, which keeps the actors busy while the
    learner trains and publishes (BENCHMARKS.md compares the settings)."""
    lease_timeout_s: float = Field(120.0, gt=0.0)
    """A lease not completed in this time is re-dispatched (its actor is presumed dead)."""
    publish_every: int = Field(1, ge=1)
    """Publish weights to actors every N optimizer steps."""
    publish_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the published weight versions. `auto` is the actors' serving dtype: `model.dtype`
    when it is set, else bfloat16 when the learner runs on a GPU (GPU engines serve bf16: half the
    bytes of float32 to write, hash and load) and float32 on CPU. An engine of another float dtype
    still loads a version (vLLM casts each tensor as it copies it in), serving the rounded values."""
    publish_rounding: Literal["nearest", "dither"] = "dither"
    """How float32 parameters become bfloat16 versions. `dither`: add a fixed offset per element
    (the same in every version) to the bits below bfloat16's before cutting them, so the published
    values are unbiased and a drift of a fraction of the spacing flips that fraction of elements:
    the actors' log-probs stay 2.3-4.9x closer to the learner's (docs/benchmarks-notes.md, "Serving
    dtype on CPU"). `nearest`: round to nearest, as `.to()` does, so an element's published value
    moves only once the learner's drift passes half the bfloat16 spacing there. Other dtypes are
    always rounded to nearest."""
    keep_weights: int = Field(3, ge=1)
    """Weight versions kept on disk (never one an actor may still be loading)."""
    checkpoint_every: int = Field(10, ge=1)
    """Write a full training checkpoint every N steps."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk."""
    write_retries: int = Field(5, ge=0)
    """Retries of a failed weight-version or checkpoint write (full disk, I/O error) before the
    learner fails; nothing half-written is ever announced or resumed from."""
    write_retry_backoff_s: float = Field(1.0, gt=0.0)
    """First back-off between write retries (doubles each time)."""
    eval_every: int = Field(50, ge=0)
    """Evaluate on the held-out split every N steps (0: only before and after the run)."""
    release_memory: bool = True
    """Hand the C heap's free pages back to the OS after every step (glibc malloc_trim; its cost
    is in RELIABILITY.md): without it the learner's RSS climbs to the high-water mark of every batch
    shape it has seen, which reads as a leak on a long run."""


class _AlgorithmSection(_Section):
    needs_negatives: ClassVar[bool] = False
    """Whether the algorithm trains on negatives (the verifier must then forward every completion)."""
    name: str
    """Which objective the learner optimises: popo, grpo, dr_grpo or wapo."""


class PopoConfig(_AlgorithmSection):
    """POPO: positive-only policy optimisation with the EMA siamese similarity term."""

    name: Literal["popo"] = "popo"
    """Which objective the learner optimises: popo, grpo, dr_grpo or wapo."""
    is_level: Literal["token", "sequence", "none"] = "token"
    """POPO: truncated importance correction against the behaviour policy (staleness)."""
    is_cap: float = Field(2.0, gt=0.0)
    """POPO: rho-bar: cap of the importance ratio."""
    alpha: float = Field(0.1, ge=0.0)
    """POPO: weight of the bounded cosine-similarity term."""
    beta_ent: float = 0.01
    """POPO: weight of the entropy term (L_ent = -mean entropy)."""
    ema_tau: float = Field(0.995, ge=0.0, le=1.0)
    """POPO: siamese momentum: xi <- tau*xi + (1-tau)*theta after every optimizer step."""
    weight_mode: Literal["softmax", "uniform"] = "softmax"
    """POPO: positive-set redistribution: softmax of length-normalised log-probs, or uniform
    1/|S+|."""
    weight_temperature: float = Field(1.0, gt=0.0)
    """POPO: T_w of the softmax redistribution."""
    length_norm: bool = False
    """POPO: divide each weight by the completion length and renormalise."""
    feature_noise_std: float = Field(0.02, ge=0.0)
    """POPO: sigma of the Gaussian noise added to the EMA features in training."""
    predictor_hidden: int = Field(1024, gt=0)
    """POPO: hidden width d of the predictor MLP h_phi."""
    predictor_layers: int = Field(2, ge=1)
    """POPO: layers L of the predictor MLP."""
    predictor_grad_clip: float | None = Field(None, gt=0.0)
    """POPO: max gradient norm of the predictor, clipped apart from the policy's
    (`learner.grad_clip` bounds the policy alone); `None` leaves it unclipped, as the authors' code
    does."""
    kl_monitor_every: int = Field(1, ge=0)
    """POPO: log KL(pi_theta || pi_xi) every N steps (needs EMA logits); 0 disables it."""
    normalization: Literal["step", "sequence"] = "step"
    """POPO: `step`: the NLL is a token mean and the similarity a weighted mean over the step's
    whole batch. `sequence`: as the authors' code (one sequence per micro-batch), each sequence's
    NLL is its own token mean and its similarity its own cosine, averaged over the step's
    sequences (for side-by-side runs)."""


class _ClippedSurrogate(_AlgorithmSection):
    needs_negatives: ClassVar[bool] = True
    clip_low: float = Field(0.2, ge=0.0)
    """GRPO, Dr. GRPO: lower PPO clip epsilon."""
    clip_high: float = Field(0.28, ge=0.0)
    """GRPO, Dr. GRPO: upper PPO clip epsilon (asymmetric, clip-higher)."""


class GrpoConfig(_ClippedSurrogate):
    """GRPO: group-normalised advantages, PPO-clipped surrogate against mu, token mean."""

    name: Literal["grpo"] = "grpo"
    """Which objective the learner optimises: popo, grpo, dr_grpo or wapo."""
    kl_coef: float = Field(0.0, ge=0.0)
    """GRPO: weight of the k3 KL to a frozen reference (0 disables the reference model)."""


class DrGrpoConfig(_ClippedSurrogate):
    """Dr. GRPO: mean-centred advantages, surrogate summed over tokens / (B * max tokens)."""

    name: Literal["dr_grpo"] = "dr_grpo"
    """Which objective the learner optimises: popo, grpo, dr_grpo or wapo."""


class WapoConfig(_AlgorithmSection):
    """WAPO: positives of mixed groups, advantage 1 - n+/G, one-sided clip against mu."""

    name: Literal["wapo"] = "wapo"
    """Which objective the learner optimises: popo, grpo, dr_grpo or wapo."""
    wapo_eps: float = Field(9.0, ge=0.0)
    """WAPO: one-sided clip min(rho, 1 + eps)."""


ALGORITHM_CONFIGS: dict[str, type[_AlgorithmSection]] = {
    "popo": PopoConfig,
    "grpo": GrpoConfig,
    "dr_grpo": DrGrpoConfig,
    "wapo": WapoConfig,
}
"""Config class of each algorithm, by `algorithm.name` (the learner has one module per name)."""


def _algorithm_tag(v: Any) -> str | None:
    # `name` may be left out: POPO is the default algorithm
    return v.get("name", "popo") if isinstance(v, dict) else getattr(v, "name", None)


AlgorithmConfig = Annotated[
    Annotated[PopoConfig, Tag("popo")]
    | Annotated[GrpoConfig, Tag("grpo")]
    | Annotated[DrGrpoConfig, Tag("dr_grpo")]
    | Annotated[WapoConfig, Tag("wapo")],
    Discriminator(_algorithm_tag),
]
"""The `[algorithm]` section: the config of the algorithm `name` names, with only its own fields."""


def algorithm_config(
    name: str = "popo", **fields: Any
) -> PopoConfig | GrpoConfig | DrGrpoConfig | WapoConfig:
    """The config of algorithm `name` with `fields` set (ValueError on an unknown name)."""
    if name not in ALGORITHM_CONFIGS:
        raise ValueError(f"unknown algorithm {name!r}; one of {', '.join(ALGORITHM_CONFIGS)}")
    return ALGORITHM_CONFIGS[name](**fields)  # type: ignore[return-value]


class TransportConfig(_Section):
    host: str = "127.0.0.1"
    """Interface the bound endpoints listen on. Loopback by default; any other address needs
    `curve_keys_dir` (or `allow_insecure_bind`)."""
    scheme: Literal["tcp", "ipc"] = "tcp"
    """`tcp` or `ipc` (unix sockets in the run directory; single machine only)."""
    dispatch_port: int = Field(5550, ge=0, le=65535)
    """Learner ROUTER: lease requests and leases. 0 picks a free port."""
    ingest_port: int = Field(5551, ge=0, le=65535)
    """Learner PULL: scored groups from the verifier."""
    weights_port: int = Field(5552, ge=0, le=65535)
    """Learner PUB: WeightsReady announcements."""
    rollouts_port: int = Field(5560, ge=0, le=65535)
    """Verifier PULL: rollout groups from actors; replica r binds rollouts_port + r."""
    learner_host: str | None = None
    """Address peers connect to for the learner's endpoints (dispatch, ingest, weights,
    weightstream); `None`: `host`. `popo ray` sets it to the learner's node IP."""
    verifier_hosts: list[str] = []
    """Address actors connect to for verifier replica r (entry r); empty: `host` for every replica.
    `popo ray` fills it with the replicas' node IPs."""
    weightstream_port: int = Field(5553, ge=0, le=65535)
    """Learner ROUTER: weight files streamed in chunks to actors that do not see its weights/."""
    weights_mode: Literal["auto", "shared", "stream"] = "auto"
    """How actors get a version's files: `shared` reads the learner's path (a shared filesystem),
    `stream` fetches them over `weightstream` into a node-local cache, `auto` uses the path when it
    holds the announced bytes on the actor's node and streams otherwise."""
    stream_chunk_bytes: int = Field(4 << 20, ge=4096, le=64 << 20)
    """Weight streaming: bytes per chunk (one request, one reply)."""
    stream_window: int = Field(8, ge=1)
    """Weight streaming: chunk requests an actor keeps in flight (credit; bounds the learner's
    send queue to window x chunk bytes per actor)."""
    stream_timeout_s: float = Field(10.0, gt=0.0)
    """Weight streaming: give up an attempt when no reply came for this long."""
    stream_retries: int = Field(3, ge=0)
    """Weight streaming: further attempts after a timeout or a corrupt / short transfer."""
    hwm: int = Field(1000, gt=0)
    """ZeroMQ high-water mark (messages queued per peer before send blocks or drops)."""
    linger_ms: int = Field(1000, ge=0)
    """How long close() waits to flush queued messages."""
    curve_keys_dir: str | None = None
    """Directory of CurveZMQ key pairs (`popo keys`: one pair per role kind, see README "Security");
    when set every endpoint is a Curve server / client and refuses peers without the right key."""
    allow_insecure_bind: bool = False
    """Allow a non-loopback `host` (a network address, or a wildcard: `0.0.0.0`, `*`, `::`) without
    `curve_keys_dir`. DANGER: anyone who reaches the port can then lease prompts, inject rollouts
    or scored groups and announce weights."""

    @model_validator(mode="after")
    def _no_open_bind(self) -> TransportConfig:
        if (why := unauthenticated_bind(self, [self.host])) is not None:
            raise ValueError(f"transport.host: {why}")
        return self


class MetricsConfig(_Section):
    enabled: bool = True
    """Serve Prometheus `/metrics` from every role."""
    host: str = "127.0.0.1"
    """Interface the metrics HTTP servers bind (loopback by default)."""
    allow_insecure_bind: bool = False
    """Allow a wildcard `host` (`0.0.0.0`, `*`, `::`). DANGER: `/metrics` has no authentication;
    anyone who reaches the port reads the run's figures."""
    base_port: int = Field(9400, ge=0, le=65535)
    """Learner port; verifier replica r uses base+1+r, actor i base+20+i. 0 picks free ports."""
    jsonl_every_s: float = Field(5.0, gt=0.0)
    """Interval at which each role appends its figures to metrics.jsonl."""

    @model_validator(mode="after")
    def _no_open_wildcard(self) -> MetricsConfig:
        if self.enabled and self.host in WILDCARD_HOSTS and not self.allow_insecure_bind:
            raise ValueError(
                f"metrics.host: {self.host!r} serves /metrics (no authentication) on every "
                "interface; name an interface or set metrics.allow_insecure_bind = true"
            )
        return self


class RolePlacement(_Section):
    """What one role's placement-group bundle asks the Ray cluster for (`[deploy.ray.<role>]`)."""

    cpus: float = Field(1.0, ge=0.0)
    """CPUs reserved for the role (per verifier replica, per actor)."""
    resources: dict[str, float] = {}
    """Custom Ray resources the role's bundle needs (node pinning), e.g. `{worker_node = 1}`."""
    labels: dict[str, str] = {}
    """Node labels the role's node must carry (Ray label selector), e.g. `{popo-node = "worker"}`."""


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join: `auto` (the cluster this machine belongs to, e.g. under `ray job
    submit`), `HOST:6379`, or `ray://HOST:10001`; `None` starts a local single-node cluster."""
    namespace: str = "popo"
    """Ray namespace of the run's actors."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy over the bundles of all roles (learner, verifier replicas,
    actors): PACK fills few nodes, SPREAD puts the roles on different nodes where it can."""
    use_gpus: bool = False
    """Reserve GPUs: the learner gets `learner.devices` GPUs, each actor
    `actor.tensor_parallel_size`. False on a CPU cluster (every role asks for CPUs only)."""
    learner: RolePlacement = RolePlacement()
    """The learner's bundle. Pin it to a node with e.g. `resources = {learner_node = 1}` (a node
    started with `ray start --resources='{"learner_node": 1}'`) or `labels = {popo-node =
    "learner"}` (a node started with `ray start --labels='{"popo-node": "learner"}'`)."""
    verifier: RolePlacement = RolePlacement()
    """Each verifier replica's bundle (its scoring workers run inside its CPUs)."""
    actor: RolePlacement = RolePlacement()
    """Each actor's bundle, e.g. `resources = {worker_node = 1}` or `labels = {accelerator =
    "H100"}`."""
    bind_node_ip: bool = True
    """Bind each role's ZeroMQ endpoints and metrics server on the node IP Ray reports, and point
    peers at those IPs (no hand-edited addresses); false keeps `transport.host`/`metrics.host`."""
    ready_timeout_s: float = Field(600.0, gt=0.0)
    """How long to wait for the placement group (the cluster's free resources) before giving up."""
    env_vars: dict[str, str] = {}
    """Extra environment for every role (added to the offline environment passed through Ray's
    `runtime_env`)."""
    prometheus_targets: str | None = None
    """Also write the run's Prometheus file-SD targets (role, node IP, metrics port) to this path,
    e.g. `deploy/prometheus/targets/<run>.json` next to `prometheus-cluster.yml`; the list is
    always written to `<run_dir>/prometheus-targets.json`."""


class DeployConfig(_Section):
    run_dir: str = ""
    """Run directory: config snapshot, ledger, metrics.jsonl, logs, weights/, checkpoints/.
    Empty: `runs/<date>-<time>-<algorithm>`."""
    restart_backoff_s: float = Field(2.0, gt=0.0)
    """Initial back-off before a crashed actor or verifier is restarted (doubles each time)."""
    max_restarts: int = Field(5, ge=0)
    """Restarts per actor or verifier within `restart_window_s` before the run is stopped."""
    restart_window_s: float = Field(3600.0, gt=0.0)
    """Restart limits count the restarts of the last this many seconds (and the back-off starts
    over after a role stayed up this long), so a long run is not stopped by rare, spread-out
    failures."""
    restart_backoff_max_s: float = Field(30.0, gt=0.0)
    """Cap of the doubling restart back-off."""
    learner_max_restarts: int = Field(5, ge=0)
    """Restarts of a killed or crashed learner (it resumes from the run directory) within
    `restart_window_s` before the run is stopped."""
    learner_min_uptime_s: float = Field(60.0, ge=0.0)
    """A learner that exits non-zero without a signal sooner than this after its start failed to
    start (config, data, code error): the run stops with its error instead of restarting it."""
    stop_grace_s: float = Field(60.0, gt=0.0)
    """On stop (Ctrl-C, SIGTERM, a failed role): how long each role may take after SIGTERM before
    it is killed: the learner finishes its current step and publish, an actor drains for up to
    `actor.drain_timeout_s` and shuts its engine down. Must exceed `actor.drain_timeout_s`; raise
    it for models whose step takes longer (a killed learner loses the steps since its last
    checkpoint, nothing else)."""
    ray: RayConfig = RayConfig()
    """`popo ray`: the Ray cluster, placement of the roles and their restart policy."""
    placement: Literal["auto", "generation", "off"] = "auto"
    """`popo train`: how roles are placed on this machine. `auto` splits the cores the launcher may
    use (its CPU affinity) between the roles, so that no role's threads compete with another's:
    on 1 core all share it; on 2 the learner and verifier share core 0 and the actors core 1; on
    more the actors get most cores, the learner a quarter, each verifier replica a core of its own
    from 8 cores up (else it shares the learner's). Each role's threads follow its share (torch
    intra-op threads of the learner, OpenMP threads of each actor's engine, verifier workers unless
    `verifier.num_workers` is set) and on a GPU node each role also gets its devices
    (`CUDA_VISIBLE_DEVICES`: `learner.devices` for the learner, `actor.tensor_parallel_size` per
    actor). The plan is printed at start and written to `<run_dir>/placement.json`. `generation`
    is `auto` with the actors' engines spread over every core, the learner's and verifier's too:
    for runs bound by generation (long completions, few positives for the learner to train on),
    e.g. GSM8K on 2 cores, 1.59× the sampled tokens/s of `auto`; on a GPU node it is
    `auto`. `off` leaves every role on every core with the libraries' own thread defaults."""
    cpu_affinity: dict[str, list[int]] = {}
    """Cores each role may run on (with every process it spawns), by role name (`actor-0`,
    `verifier-1`) or kind (`actor`, `verifier`, `learner`); e.g. `{learner = [0], actor = [1]}`.
    When set it replaces the automatic split: a role not named runs on every core, and each role's
    threads follow the cores it is given. `popo bench e2e` pins the actor and the learner apart."""


class RunConfig(BaseSettings):
    """Everything a run needs; a snapshot is written into the run directory."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # type: ignore[assignment]

    model: ModelConfig = ModelConfig()
    """The policy model."""
    data: DataConfig = DataConfig()
    """Prompts, gold answers and the evaluation split."""
    actor: ActorConfig = ActorConfig()
    """vLLM actors: engine and sampling settings."""
    verifier: VerifierConfig = VerifierConfig()
    """The math-verify scoring service."""
    learner: LearnerConfig = LearnerConfig()
    """Optimisation, flow control, checkpoints and weight publishing."""
    algorithm: AlgorithmConfig = PopoConfig()
    """The objective: POPO or a baseline, by `name`, with that algorithm's own fields."""
    transport: TransportConfig = TransportConfig()
    """ZeroMQ endpoints (docs/architecture.md, Message contracts)."""
    metrics: MetricsConfig = MetricsConfig()
    """Prometheus endpoints and metrics.jsonl (docs/metrics.md)."""
    deploy: DeployConfig = DeployConfig()
    """Launchers and the run directory."""

    @model_validator(mode="after")
    def _check_cross_fields(self) -> RunConfig:
        if self.verifier.forward == "positives" and self.algorithm.needs_negatives:
            raise ValueError(
                f"verifier.forward = 'positives' cannot train {self.algorithm.name}, which needs negatives"
            )
        self._check_behaviour_logprobs()
        if self.deploy.stop_grace_s <= self.actor.drain_timeout_s:
            raise ValueError(
                f"deploy.stop_grace_s: {self.deploy.stop_grace_s:g} s would kill an actor still "
                f"draining (actor.drain_timeout_s = {self.actor.drain_timeout_s:g} s); make it longer"
            )
        return self

    def _check_behaviour_logprobs(self) -> None:
        # The learner's pi is softmax(logits / T) over the whole vocabulary; the actors' mu must be
        # the same distribution, or every importance ratio pi/mu is off even on fresh rollouts.
        a = self.actor
        if a.temperature == 0:
            raise ValueError(
                "actor.temperature: 0 samples greedily, a behaviour policy with no log-probs to "
                "train on; use a temperature > 0"
            )
        if a.top_p < 1:
            raise ValueError(
                f"actor.top_p: {a.top_p} samples from the renormalised nucleus while the learner's "
                "pi spans the whole vocabulary, so pi/mu would be biased; use top_p = 1"
            )
        if a.temperature != 1 and a.logprobs_mode == "raw_logprobs":
            raise ValueError(
                f"actor.logprobs_mode: raw_logprobs reports mu at temperature 1 while the actors "
                f"sample (and the learner computes pi) at temperature {a.temperature}; set "
                "actor.logprobs_mode = processed_logprobs"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit inputs: no environment or dotenv leaks into a run's config.
        return (init_settings,)

    @property
    def forward(self) -> Literal["positives", "all"]:
        """What the verifier forwards once `auto` is resolved against the algorithm."""
        if self.verifier.forward != "auto":
            return self.verifier.forward
        return "all" if self.algorithm.needs_negatives else "positives"

    def to_toml(self) -> str:
        """The config as TOML (the run directory's snapshot)."""
        return _dump_toml(self.model_dump(mode="json"))


def _dump_toml(tree: dict[str, Any]) -> str:
    # tomllib only reads; the tree is two or three levels of plain values, so a small writer does.
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            # JSON's escapes (\n, \", \\, \u00XX) are all valid in a TOML basic string, so control
            # characters such as a "\n" stop string survive; JSON leaves DEL raw, which TOML forbids.
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        if prefix:
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", tree)
    return "\n".join(lines).lstrip("\n") + "\n"


def _format_error(
    err: ValidationError,
    toml_data: dict[str, Any],
    cli_values: dict[str, Any],
    source: str | None,
    toml_text: str = "",
) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"].removeprefix("Value error, ")
    if loc[:1] == ["algorithm"]:
        # the union's tag is not a key a user writes: `algorithm.grpo.alpha` is `algorithm.alpha`
        if len(loc) > 1 and loc[1] in ALGORITHM_CONFIGS:
            del loc[1]
        elif first["type"] == "union_tag_invalid":
            loc.append("name")
            msg = f"unknown algorithm {first['input'].get('name')!r}; one of " + ", ".join(
                ALGORITHM_CONFIGS
            )
    named = re.match(r"([a-z_]+(?:\.[a-z_]+)+): (.*)", msg)
    where = loc
    if not loc and named:  # a cross-field check names the key to change
        loc, msg = named[1].split("."), named[2]
        # the key may be left at its default while its section was set
        where = loc if _has_key(cli_values, loc) or _has_key(toml_data, loc) else loc[:1]
    key = ".".join(loc) or "(root)"
    origin = "defaults"
    if _has_key(cli_values, where):
        origin = "command line"
    elif source is not None and (_has_key(toml_data, where) or not where):
        origin = source
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if msg.startswith(f"{key}.") and ": " in msg:  # a section's validator names its own field
        key, msg = msg.split(": ", 1)
    if origin == source and (line := _toml_line(toml_text, key.split("."))) is not None:
        origin = f"{source}:{line}"
    return f"config error: {origin}: {key}: {msg}{more}"


def _toml_line(text: str, path: list[str]) -> int | None:
    """1-based line of key `path` (e.g. learner.lr) in a TOML text written with [table] headers
    and `key = value` lines, as config files are; None when it is written some other way."""
    table: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]") and not line.startswith("[["):
            table = [part.strip().strip('"') for part in line[1:-1].split(".")]
            if table == path:  # an unknown or mistyped table
                return n
        elif "=" in line:
            key = [part.strip().strip('"') for part in line.split("=", 1)[0].split(".")]
            if table + key == path:
                return n
    return None


def _has_key(tree: dict[str, Any], path: list[str]) -> bool:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_config(path: str | Path | None = None, cli_args: list[str] | None = None) -> RunConfig:
    """Build a RunConfig: defaults < TOML file `path` < dotted flags `cli_args`.

    Raises ConfigError with one line naming the key and the file (or the command line).
    """
    toml_data: dict[str, Any] = {}
    toml_text = ""
    source = None
    if path is not None:
        source = str(path)
        try:
            toml_text = Path(path).read_text()
            toml_data = tomllib.loads(toml_text)
        except FileNotFoundError:
            raise ConfigError(f"config error: {path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config error: {path}: invalid TOML: {e}") from None
    cli_values: dict[str, Any] = {}
    if cli_args:
        cli_values = _parse_cli(cli_args)
    try:
        return RunConfig(**_deep_merge(toml_data, cli_values))
    except ValidationError as e:
        raise ConfigError(_format_error(e, toml_data, cli_values, source, toml_text)) from None


def _parse_cli(args: list[str]) -> dict[str, Any]:
    """Dotted flags -> nested dict, parsed by pydantic-settings' CLI source (so types, lists and
    `--help` text all come from the model)."""
    try:
        cli = CliSettingsSource(
            RunConfig,
            cli_parse_args=args,
            cli_exit_on_error=False,
            cli_implicit_flags=False,
            cli_prog_name="popo",
        )
        return _drop_unset(cli())
    except SettingsError as e:  # argparse: unknown flag, missing value
        raise ConfigError(
            f"config error: command line: {e}".replace("error parsing CLI: ", "")
        ) from None


def _drop_unset(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            v = _drop_unset(v)
            if not v:
                continue
        out[k] = v
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
