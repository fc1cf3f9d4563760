"""Policy / EMA forward passes and the predictor head (docs/architecture.md, Loss).

One forward of the online policy gives everything the POPO loss needs: the completion tokens'
log-probs, their entropies and the feature f_θ(y) = masked mean-pool of the final-norm hidden states
over the completion tokens. We call the base model (`model.model`, whose `last_hidden_state` is the
output of the final RMSNorm in HF Qwen2 — checked in tests against `output_hidden_states[-1]`) and
apply `lm_head` only at the positions that predict completion tokens, so prompt positions cost no
vocabulary projection. The EMA siamese copy runs the base model only (no lm_head) under no_grad,
except on KL-monitor steps.

Batch layout: N sequences right-padded to L = max(prompt + completion); completion-aligned tensors
are [N, T] with T = max completion length, index t of row i being completion token t of sequence i.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Batch:
    """A packed micro-batch (right padding)."""

    input_ids: Tensor  # [N, L] prompt + completion tokens, pad after
    attention_mask: Tensor  # [N, L] 1 on real tokens
    targets: Tensor  # [N, T] completion token ids (0 on padding)
    mask: Tensor  # [N, T] float, 1 on real completion tokens
    pred_pos: Tensor  # [N, T] position whose logits predict completion token t (P_i − 1 + t)
    behaviour_logp: Tensor  # [N, T] log μ of the completion tokens (0 on padding)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(
    prompts: Sequence[np.ndarray],
    completions: Sequence[np.ndarray],
    behaviour_logps: Sequence[np.ndarray],
    pad_id: int = 0,
) -> Batch:
    """Lists of N int token arrays (prompt, completion) and N float arrays (log μ, one per
    completion token) -> a right-padded `Batch`. Every completion must be non-empty."""
    n = len(prompts)
    p_len = np.array([len(p) for p in prompts])
    c_len = np.array([len(c) for c in completions])
    if np.any(c_len == 0) or np.any(p_len == 0):
        raise ValueError("empty prompt or completion in a training batch")
    seq_len, t_len = int((p_len + c_len).max()), int(c_len.max())
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    attn = np.zeros((n, seq_len), dtype=np.int64)
    tgt = np.zeros((n, t_len), dtype=np.int64)
    mask = np.zeros((n, t_len), dtype=np.float32)
    mu = np.zeros((n, t_len), dtype=np.float32)
    pos = np.zeros((n, t_len), dtype=np.int64)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, behaviour_logps, strict=True)):
        if len(lp) != len(c):
            raise ValueError(f"sequence {i}: {len(c)} tokens but {len(lp)} behaviour log-probs")
        ids[i, : len(p)] = p
        ids[i, len(p) : len(p) + len(c)] = c
        attn[i, : len(p) + len(c)] = 1
        tgt[i, : len(c)] = c
        mask[i, : len(c)] = 1
        mu[i, : len(c)] = lp
        # padding positions point at the last prompt position: valid index, masked out anyway
        pos[i] = len(p) - 1 + np.minimum(np.arange(t_len), len(c) - 1)
    return Batch(*(torch.from_numpy(a) for a in (ids, attn, tgt, mask, pos, mu)))


@dataclass
class PolicyOutput:
    logp: Tensor  # [N, T] log π(y_t | x, y_<t), fp32, 0 on padding
    entropy: Tensor | None  # [N, T] token entropy of π, fp32, 0 on padding
    features: Tensor  # [N, H] mean-pooled final-norm hidden states over the completion


def _gather_positions(h: Tensor, pos: Tensor) -> Tensor:
    """h [N, L, H], pos [N, T] -> [N, T, H]."""
    return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))


@dataclass(frozen=True)
class LogitSpec:
    """How a causal LM's lm_head output becomes the logits of the distribution the actors sample
    from: z = lm_head(h) · scale, then z = cap · tanh(z / cap) when `softcap` is set (Gemma-2's
    final soft-capping), then z / temperature (the sampler's temperature, applied last as vLLM does).
    Llama / Qwen2 models have scale 1 and no cap."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def apply(self, z: Tensor) -> Tensor:
        """[..., V] -> [..., V]."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z


def logit_spec(model: nn.Module, temperature: float = 1.0) -> LogitSpec:
    """The LogitSpec of a HF causal LM from its config: Cohere's `logit_scale` multiplies, Granite's
    `logits_scaling` divides, Gemma-2's `final_logit_softcapping` caps (the same attributes the
    models' own forwards read); `temperature` is the sampling temperature (> 0)."""
    if temperature <= 0:
        raise ValueError(f"log-probs need a sampling temperature > 0, got {temperature}")
    cfg = getattr(model, "config", None)
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    scale /= float(getattr(cfg, "logits_scaling", None) or 1.0)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitSpec(scale, float(cap) if cap else None, float(temperature))


LOGITS_CHUNK_BYTES = 64 << 20
"""Default bound of one fp32 [tokens, vocabulary] block in `token_logp_entropy`."""


def block_rows(lm_head: nn.Module, n_rows: int, chunk_bytes: int) -> int:
    """Rows of one block of fp32 logits within `chunk_bytes` (all `n_rows` when 0), at least 1."""
    if chunk_bytes <= 0:
        return max(1, n_rows)
    vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
    return max(1, chunk_bytes // (4 * vocab))


def _logp_entropy_block(
    lm_head: nn.Module, spec: LogitSpec, h: Tensor, targets: Tensor, need_entropy: bool
) -> tuple[Tensor, Tensor]:
    """h [c, H], targets [c] -> (log π(target) [c], entropy [c] or an empty tensor), in fp32."""
    logprobs = torch.log_softmax(spec.apply(lm_head(h).float()), dim=-1)  # [c, V]
    logp = logprobs.gather(-1, targets[:, None])[:, 0]
    if not need_entropy:
        return logp, logp.new_empty(0)
    return logp, -(logprobs.exp() * logprobs).sum(-1)


def _grad_buffer(weight: Tensor, in_place: bool) -> Tensor:
    """Where a backward sums `weight`'s gradient: with `in_place`, `weight.grad` itself (zeros
    when there is none yet), as `backward()` would accumulate it but without first building
    another [V, H] tensor, and nothing is returned to autograd; else a new zero tensor, returned.
    In place suits only callers that run `backward()` with no hooks on `weight` (the trainer)."""
    if not in_place:
        return torch.zeros_like(weight)
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad


def _head_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """Dtype of the head's matmul: autocast's when it is on (as `lm_head(h)` would run), else the
    weight's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _BlockedHead(torch.autograd.Function):
    """log π(target) and entropy of softmax(spec(h Wᵀ + b)), block by block, for a plain
    `nn.Linear` head. Autograd keeps only the inputs: the backward recomputes each block's logits
    and writes its analytic gradient in place, so forward and backward hold two fp32 [c, V]
    tensors at a time, and the head's gradient is summed into ONE [V, H] tensor (checkpointing
    each block through autograd instead returns a [V, H] gradient per block that the engine adds
    to the previous ones: a second [V, H] tensor). Under autocast the weight is cast once per pass,
    not once per block."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, spec, rows, need_entropy, grad_in_place):
        dt = _head_dtype(h, weight)
        w, hc = weight.to(dt), h.to(dt)
        b = None if bias is None else bias.to(dt)
        logp = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ent = torch.empty(h.shape[0] if need_entropy else 0, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], rows):
                lsm = _block_log_softmax(hc[s : s + rows], w, b, spec)  # [c, V]
                logp[s : s + rows] = lsm.gather(-1, targets[s : s + rows, None])[:, 0]
                if need_entropy:
                    ent[s : s + rows] = -lsm.exp().mul_(lsm).sum(-1)
        ctx.save_for_backward(h, weight, bias, targets, ent)
        ctx.spec, ctx.rows, ctx.dt, ctx.grad_in_place = spec, rows, dt, grad_in_place
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, weight, bias, targets, ent = ctx.saved_tensors
        spec, rows, dt = ctx.spec, ctx.rows, ctx.dt
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, hc = weight.to(dt), h.to(dt)
        b = None if bias is None else bias.to(dt)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = grad_b = None
        if need_w:
            grad_w = _grad_buffer(weight, ctx.grad_in_place)
        if need_b:
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        g_ent = g_ent if g_ent.numel() else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], rows):
                hs = hc[s : s + rows]
                dz = _block_logit_grad(
                    hs,
                    w,
                    b,
                    spec,
                    targets[s : s + rows],
                    g_logp[s : s + rows],
                    None if g_ent is None else g_ent[s : s + rows],
                    None if g_ent is None else ent[s : s + rows],
                ).to(dt)  # [c, V]
                if grad_h is not None:
                    grad_h[s : s + rows] = dz @ w
                if grad_w is not None:
                    if dz.dtype == grad_w.dtype:
                        grad_w.addmm_(dz.T, hs)
                    else:  # low-precision matmul as autocast's, summed in the weight's dtype
                        grad_w.add_(dz.T @ hs)
                if grad_b is not None:
                    grad_b += dz.float().sum(0)
        if ctx.grad_in_place:
            grad_w = None  # already in weight.grad
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _block_log_softmax(h: Tensor, w: Tensor, b: Tensor | None, spec: LogitSpec) -> Tensor:
    """log π of one block: h [c, H], w [V, H] -> [c, V] fp32."""
    z = spec.apply(torch.nn.functional.linear(h, w, b).float())
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _block_logit_grad(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    spec: LogitSpec,
    targets: Tensor,
    g_logp: Tensor,
    g_ent: Tensor | None,
    ent: Tensor | None,
) -> Tensor:
    """∂L/∂u of one block, u = h Wᵀ + b the head's raw output, given ∂L/∂ log π(target) g_logp
    [c] and ∂L/∂H g_ent [c] (H [c]: the block's entropies) -> [c, V] fp32.

    With z = spec(u), p = softmax(z): ∂ log p_t/∂z = onehot(t) − p and ∂H/∂z = −p ⊙ (log p + H);
    then through spec (scale, softcap, temperature)."""
    u = torch.nn.functional.linear(h, w, b).float()
    z = spec.apply(u)
    softcapped = z if spec.softcap is not None else None  # needed by the softcap's derivative
    lsm = (z if softcapped is None else z.clone()).sub_(torch.logsumexp(z, -1, keepdim=True))
    del u
    p = lsm.exp()
    if g_ent is not None:
        dz = lsm.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
        dz.sub_(p.mul_(g_logp[:, None]))
    else:
        dz = p.mul_(-g_logp[:, None])
    del p
    dz.scatter_add_(-1, targets[:, None], g_logp[:, None].to(dz.dtype))
    if spec.temperature != 1.0:
        dz.div_(spec.temperature)
    if softcapped is not None:
        # z = cap·tanh(s·u/cap)/T: ∂z/∂(s·u) = 1 − tanh², tanh = z·T/cap
        t = softcapped.mul_(spec.temperature / spec.softcap)
        dz.mul_(t.mul_(t).neg_().add_(1.0))
    if spec.scale != 1.0:
        dz.mul_(spec.scale)
    return dz


def token_logp_entropy(
    lm_head: nn.Module,
    h: Tensor,
    targets: Tensor,
    *,
    need_entropy: bool = True,
    spec: LogitSpec = LogitSpec(),
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
    min_blocks: int = 1,
    grad_in_place: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of `targets` and entropies of π = softmax(spec(lm_head(h))) without materialising
    the [M, V] logits at once: h [M, H], targets [M] -> (log π [M], entropy [M] or None), fp32.

    The M positions are cut into blocks of c = chunk_bytes / (4·V) rows; each block's fp32 logits,
    log-softmax and entropy exist only while that block is computed, and under autograd the block
    is recomputed in the backward, so memory holds O(c·V) rather than O(M·V) whatever the
    vocabulary. A plain `nn.Linear` head runs `_BlockedHead` (analytic backward, one [V, H]
    gradient); any other head (e.g. an FSDP unit, whose hooks must see every call) checkpoints
    each block through autograd. When all M rows fit in one block (small vocabularies), or with
    `chunk_bytes` 0, it is one plain block and nothing is recomputed. `min_blocks`: run at least
    this many blocks (empty ones past the rows): FSDP ranks must call lm_head equally often.
    `grad_in_place`: sum the head weight's gradient straight into its `.grad` (`_grad_buffer`).
    """
    rows = block_rows(lm_head, h.shape[0], chunk_bytes)
    n_blocks = max(min_blocks, -(-h.shape[0] // rows))
    if n_blocks == 1:
        logp, ent = _logp_entropy_block(lm_head, spec, h, targets, need_entropy)
        return logp, ent if need_entropy else None
    if type(lm_head) is nn.Linear:
        logp, ent = _BlockedHead.apply(
            h, lm_head.weight, lm_head.bias, targets, spec, rows, need_entropy, grad_in_place
        )
        return logp, ent if need_entropy else None
    checkpointed = torch.is_grad_enabled() and (
        h.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    logps, ents = [], []
    for s in range(0, n_blocks * rows, rows):
        args = (lm_head, spec, h[s : s + rows], targets[s : s + rows], need_entropy)
        if checkpointed:
            lp, ent = checkpoint(_logp_entropy_block, *args, use_reentrant=False)
        else:
            lp, ent = _logp_entropy_block(*args)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps), torch.cat(ents) if need_entropy else None


def _token_logp_entropy(
    lm_head: nn.Module,
    h_pred: Tensor,
    targets: Tensor,
    mask: Tensor,
    need_entropy: bool,
    spec: LogitSpec,
    chunk_bytes: int,
    min_blocks: int = 1,
    grad_in_place: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Vocabulary projection of the M real completion positions only: h_pred [N, T, H],
    targets, mask [N, T] -> log π [N, T] and entropy [N, T] (or None), 0 on padding."""
    sel = mask.bool()  # [N, T]
    lp_flat, ent_flat = token_logp_entropy(
        lm_head,
        h_pred[sel],
        targets[sel],
        need_entropy=need_entropy,
        spec=spec,
        chunk_bytes=chunk_bytes,
        min_blocks=min_blocks,
        grad_in_place=grad_in_place,
    )
    logp = torch.zeros(mask.shape, dtype=lp_flat.dtype, device=mask.device)
    logp = logp.masked_scatter(sel, lp_flat)
    entropy = None
    if ent_flat is not None:
        entropy = torch.zeros_like(logp).masked_scatter(sel, ent_flat)
    return logp, entropy


def _pool(h: Tensor, pred_pos: Tensor, mask: Tensor) -> Tensor:
    """f(y) = mean over completion tokens of the final-norm hidden state at the completion token's
    own position (pred_pos + 1). h [N, L, H] -> [N, H] (fp32)."""
    h_tok = _gather_positions(h, pred_pos + 1).float()  # [N, T, H]
    m = mask[..., None]
    return (h_tok * m).sum(1) / m.sum(1).clamp_min(1)


class _Embedding(torch.autograd.Function):
    """`F.embedding` whose backward adds the rows' gradients straight into the weight's `.grad`
    (`_grad_buffer`, in place): nn.Embedding's dense backward builds a zero [V, H] tensor per
    call, which autograd then adds to .grad. Rows of `padding_idx` get no gradient, as in
    nn.Embedding. ids [N, L] int, weight [V, H] -> [N, L, H]."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, weight = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
            if ctx.padding_idx is not None:
                keep = ids != ctx.padding_idx
                ids, grad = ids[keep], grad[keep]
            buf = _grad_buffer(weight, in_place=True)
            buf.index_add_(0, ids, grad.to(buf.dtype))
        return None, None, None


def _embed_in_place(model: nn.Module, ids: Tensor) -> Tensor | None:
    """The input embeddings through `_Embedding`, or None when the model's embedding is not a
    plain nn.Embedding with default options (a subclass may scale its output, max_norm renorms
    the weight, sparse and scale_grad_by_freq change the gradient)."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        return None
    if emb.sparse or emb.scale_grad_by_freq:
        return None
    return _Embedding.apply(ids, emb.weight, emb.padding_idx)


def _hidden(model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Tensor:
    """Final-norm hidden states [N, L, H] of the base model; no KV cache (nothing decodes).
    `inputs_embeds` [N, L, H]: the input embeddings, when computed by the caller."""
    ids = batch.input_ids if inputs_embeds is None else None
    return model.model(
        input_ids=ids,
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask,
        use_cache=False,
    )[0]


def policy_forward(
    model: nn.Module,
    batch: Batch,
    need_entropy: bool = True,
    *,
    temperature: float = 1.0,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
    min_blocks: int = 1,
    grad_in_place: bool = False,
) -> PolicyOutput:
    """ONE forward of a HF causal LM (`model.model` + `model.lm_head`) -> log-probs, entropies and
    features of the completion tokens, all with grad (docs/architecture.md, Loss). Log-probs and entropies are those
    of the sampling distribution at `temperature`; the vocabulary projection runs in blocks of at
    most `chunk_bytes` of fp32 logits (`token_logp_entropy`).

    `grad_in_place`: the vocabulary matrices' gradients (input embedding and head) are summed
    straight into their `.grad` (`_grad_buffer`), not into a new [V, H] tensor each; not for
    FSDP-sharded models, whose hooks must see those gradients."""
    embeds = _embed_in_place(model, batch.input_ids) if grad_in_place else None
    h = _hidden(model, batch, embeds)  # [N, L, H]
    h_pred = _gather_positions(h, batch.pred_pos)  # [N, T, H]
    logp, entropy = _token_logp_entropy(
        model.lm_head,
        h_pred,
        batch.targets,
        batch.mask,
        need_entropy,
        logit_spec(model, temperature),
        chunk_bytes,
        min_blocks,
        grad_in_place,
    )
    return PolicyOutput(logp, entropy, _pool(h, batch.pred_pos, batch.mask))


@torch.no_grad()
def ema_forward(
    ema_model: nn.Module,
    batch: Batch,
    with_logp: bool = False,
    *,
    temperature: float = 1.0,
    chunk_bytes: int = LOGITS_CHUNK_BYTES,
    min_blocks: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """EMA siamese forward under no_grad: features f_ξ [N, H] from the base model's final hidden
    states; lm_head (log π_ξ [N, T] at `temperature`) only when `with_logp` (KL-monitor steps)."""
    h = _hidden(ema_model, batch)
    logp = None
    if with_logp:
        h_pred = _gather_positions(h, batch.pred_pos)
        spec = logit_spec(ema_model, temperature)
        logp, _ = _token_logp_entropy(
            ema_model.lm_head,
            h_pred,
            batch.targets,
            batch.mask,
            False,
            spec,
            chunk_bytes,
            min_blocks,
        )
    return _pool(h, batch.pred_pos, batch.mask), logp


def reshard_all(module: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward with no backward (a root unit
    does not reshard after forward, and under no_grad no backward does it). No-op when unsharded."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, prompt: np.ndarray, completion: np.ndarray, pad_id: int = 0
) -> np.ndarray:
    """log π of `completion` after `prompt` (eval mode, no grad, fp32) -> [C] float32: the learner
    side of the parity probe."""
    batch = collate([prompt], [completion], [np.zeros(len(completion))], pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = policy_forward(model, batch.to(device), need_entropy=False)
    finally:
        model.train(was_training)
        reshard_all(model)
    return out.logp[0].float().cpu().numpy().astype(np.float32)


class Predictor(nn.Module):
    """h_φ (docs/architecture.md, Loss): [Linear(H→d), LayerNorm, ReLU]×(L−1) → Linear(d→H), Xavier-uniform
    weights and zero biases; online branch only (BYOL asymmetry). With L = 1 it is Linear(H→H)."""

    def __init__(self, hidden_size: int, width: int = 1024, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = []
        d_in = hidden_size
        for _ in range(layers - 1):
            mods += [nn.Linear(d_in, width), nn.LayerNorm(width), nn.ReLU()]
            d_in = width
        mods.append(nn.Linear(d_in, hidden_size))
        self.net = nn.Sequential(*mods)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, f: Tensor) -> Tensor:
        """f [N, H] -> [N, H]."""
        return self.net(f)
