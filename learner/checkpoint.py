"""Training checkpoints: policy, EMA, predictor, reference, optimizer, scheduler, RNG, step.

Layout of `checkpoints/step-{N:08d}/`: `tensors.safetensors` (every tensor: module weights, AdamW
moments and step counters, RNG states) and `meta.json` (everything else: step, optimizer param
groups, scheduler state, Python/NumPy RNG scalars). No pickle: `torch.save` would pickle the
optimizer state, so its tensors are flattened into safetensors under `optim.{param}.{key}`.
A checkpoint is written to a temporary directory, every file fsynced, then renamed into place (and
the parent fsynced): a crash leaves either the previous checkpoints or the whole new one. The last
`keep` checkpoints are kept.

An FSDP2-sharded trainer writes the same format: every rank takes part in gathering the full
tensors (a collective), rank 0 writes, and loading re-shards them, so a checkpoint moves freely
between world sizes (one process <-> N ranks). Each rank's RNG states are kept under `.r{rank}`
names, so resuming at the same world size is exact. The directory must be one all ranks see.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from popo.common.weights import fault_window, fsync_dir, retry_write

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})$")


def _full(v: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 shards (DTensor) are all-gathered (a collective: every rank calls)."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _module_tensors(prefix: str, module: torch.nn.Module | None, out: dict[str, torch.Tensor]):
    if module is None:
        return
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        # tied weights share storage, which safetensors refuses: store a copy of the alias
        local = v.to_local() if hasattr(v, "to_local") else v
        ptr = local.untyped_storage().data_ptr()
        d = v.detach()
        full = _full(d)  # a gathered shard is a fresh tensor already
        out[f"{prefix}.{k}"] = full.clone() if ptr in seen and full is d else full
        seen.add(ptr)


def _rank_states(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Every rank's (torch, generator) RNG states, gathered as uint8 tensors (no pickle)."""
    mine = {"torch": torch.get_rng_state(), "generator": trainer.generator.get_state()}
    if not trainer.sharded:
        return [mine]
    import torch.distributed as dist

    out: list[dict[str, torch.Tensor]] = [{} for _ in range(trainer.world)]
    for key, state in mine.items():
        parts = [torch.empty_like(state) for _ in range(trainer.world)]
        if dist.get_backend() == "nccl":  # NCCL moves device tensors only
            dev = [p.to(trainer.device) for p in parts]
            dist.all_gather(dev, state.to(trainer.device))
            parts = [d.cpu() for d in dev]
        else:
            dist.all_gather(parts, state)
        for r, p in enumerate(parts):
            out[r][key] = p
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint directory (`step-{N:08d}`) holds."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint directory (step-NNNNNNNN)")
    return int(m.group(1))


def save_checkpoint(
    trainer: Trainer,
    root: str | Path,
    keep: int = 2,
    *,
    retries: int = 0,
    backoff_s: float = 1.0,
    on_failure: Callable[[OSError], None] | None = None,
) -> Path:
    """Atomically write the trainer's full state as `root/step-{trainer.step:08d}` (replacing a
    checkpoint of the same step); prune to the newest `keep`. Returns the checkpoint directory.

    A failed write (full disk, I/O error) leaves no `step-*` directory that `latest_checkpoint`
    would pick up, and is tried again `retries` times with doubling back-off (`retry_write`)."""
    root = Path(root)
    final = root / f"step-{trainer.step:08d}"
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors("policy", trainer.policy, tensors)
    _module_tensors("ema", trainer.ema, tensors)
    _module_tensors("predictor", trainer.predictor, tensors)
    _module_tensors("reference", trainer.reference, tensors)

    opt = trainer.optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = _full(val.detach())
            else:
                opt_scalars.setdefault(str(pid), {})[key] = val

    for r, states in enumerate(_rank_states(trainer)):
        suffix = f".r{r}" if r else ""  # rank 0 under the plain names: readable at any world size
        tensors[f"rng.torch{suffix}"] = states["torch"]
        tensors[f"rng.generator{suffix}"] = states["generator"]
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).view(np.int32))
    py_state = random.getstate()
    meta = {
        "format": FORMAT,
        "step": trainer.step,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "scheduler": {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"},
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        },
        "world": trainer.world,
    }
    if trainer.rank == 0:
        retry_write(
            lambda: _write(root, final, tensors, meta, keep),
            f"checkpoint {final.name}",
            retries,
            backoff_s,
            on_failure,
        )
    if trainer.sharded:
        import torch.distributed as dist

        dist.barrier()  # no rank goes on (and perhaps reads it) before the checkpoint exists
    return final


def _write(
    root: Path, final: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp-*"):  # a write cut short by a crash or a failed write
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        flat = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(flat, str(tmp / "tensors.safetensors"), metadata={"format": "pt"})
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in ("tensors.safetensors", "meta.json"):
            _fsync(tmp / name)
        fsync_dir(tmp)
        fault_window()
        # Re-saving a step (e.g. after a resume) replaces it: the old copy is moved aside first,
        # so at every instant one complete checkpoint of this step exists under some name.
        stale = root / f".old-{final.name}-{os.getpid()}"
        if final.exists():
            os.rename(final, stale)
        os.rename(tmp, final)
        fsync_dir(root)
        shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def _load_module(prefix: str, module: torch.nn.Module | None, tensors: dict[str, torch.Tensor]):
    if module is None:
        return
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if any(hasattr(v, "full_tensor") for v in module.state_dict().values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # every rank holds the full tensors (read from the file); each keeps its own shard
        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(sd, strict=True)


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: sharded the same way when `param` is an FSDP2 DTensor."""
    if not hasattr(param, "device_mesh") or full.dim() == 0:
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)


def load_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore a trainer (built with the same config and model architecture) from `path`, so that
    the next step is bit-identical to the one the saving run would have taken."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')} != {FORMAT}")
    tensors = load_file(str(path / "tensors.safetensors"), device="cpu")
    _load_module("policy", trainer.policy, tensors)
    _load_module("ema", trainer.ema, tensors)
    _load_module("predictor", trainer.predictor, tensors)
    _load_module("reference", trainer.reference, tensors)

    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = _like(v, trainer.params[int(pid)])
    for pid, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    trainer.optimizer.load_state_dict(
        {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    )
    sched = trainer.scheduler.state_dict()
    sched.update(meta["scheduler"])
    trainer.scheduler.load_state_dict(sched)
    trainer.step = int(meta["step"])

    # same world size: each rank its own states; otherwise every rank continues rank 0's
    suffix = f".r{trainer.rank}" if trainer.rank and meta.get("world", 1) == trainer.world else ""
    torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    trainer.generator.set_state(tensors[f"rng.generator{suffix}"])
    cuda_states = [
        tensors[f"rng.cuda.{i}"]
        for i in range(torch.cuda.device_count())
        if f"rng.cuda.{i}" in tensors
    ]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    name, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state(
        (name, tensors["rng.numpy"].numpy().view(np.uint32), pos, has_gauss, cached)
    )
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
