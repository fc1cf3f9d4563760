"""Training checkpoints: policy, EMA, predictor, reference, optimizer, scheduler, RNG, step.

Layout of `checkpoints/step-{N:08d}/`: `tensors.safetensors` (every tensor: module weights, AdamW
moments and step counters, RNG states) and `meta.json` (everything else: step, optimizer param
groups, scheduler state, Python/NumPy RNG scalars). No pickle: `torch.save` would pickle the
optimizer state, so its tensors are flattened into safetensors under `optim.{param}.{key}`.
A checkpoint is written to a temporary directory, every file fsynced, then renamed into place (and
the parent fsynced): a crash leaves either the previous checkpoints or the whole new one. The last
`keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from popo.common.weights import fsync_dir

if TYPE_CHECKING:
    from popo.learner.trainer import Trainer

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})$")


def _module_tensors(prefix: str, module: torch.nn.Module | None, out: dict[str, torch.Tensor]):
    if module is None:
        return
    seen: set[int] = set()
    for k, v in module.state_dict().items():
        # tied weights share storage, which safetensors refuses: store a copy of the alias
        ptr = v.untyped_storage().data_ptr()
        out[f"{prefix}.{k}"] = v.detach().clone() if ptr in seen else v.detach()
        seen.add(ptr)


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


def save_checkpoint(trainer: Trainer, root: str | Path, keep: int = 2) -> Path:
    """Atomically write the trainer's full state as `root/step-{trainer.step:08d}` (replacing a
    checkpoint of the same step); prune to the newest `keep`. Returns the checkpoint directory."""
    if trainer.sharded:
        raise NotImplementedError("checkpointing an FSDP2-sharded trainer is not implemented yet")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
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
                tensors[f"optim.{pid}.{key}"] = val.detach()
            else:
                opt_scalars.setdefault(str(pid), {})[key] = val

    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = trainer.generator.get_state()
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
    }

    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        flat = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(flat, str(tmp / "tensors.safetensors"), metadata={"format": "pt"})
        (tmp / "meta.json").write_text(json.dumps(meta))
        for name in ("tensors.safetensors", "meta.json"):
            _fsync(tmp / name)
        fsync_dir(tmp)
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
    return final


def _load_module(prefix: str, module: torch.nn.Module | None, tensors: dict[str, torch.Tensor]):
    if module is None:
        return
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(sd, strict=True)


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
            state.setdefault(int(pid), {})[key] = v
    for pid, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    trainer.optimizer.load_state_dict(
        {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    )
    sched = trainer.scheduler.state_dict()
    sched.update(meta["scheduler"])
    trainer.scheduler.load_state_dict(sched)
    trainer.step = int(meta["step"])

    torch.set_rng_state(tensors["rng.torch"])
    trainer.generator.set_state(tensors["rng.generator"])
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
