"""FSDP2 on CPU: 2 processes (gloo) train one data-parallel step; it must match one process."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from learner_helpers import VOCAB, make_groups, tiny_qwen2
from safetensors.torch import load_file, save_file

from popo.common.config import LearnerConfig, algorithm_config
from popo.common.weights import WeightStore
from popo.learner.publish import hf_state_dict, publish_weights
from popo.learner.trainer import Trainer

KEYS = (
    "loss",
    "loss_nll",
    "loss_sim",
    "loss_ent",
    "cos_sim",
    "weight_entropy",
    "grad_norm",
    "ema_kl",
    "tokens",
    "sequences",
)


def _trainer(micro_batch_tokens: int) -> Trainer:
    lc = LearnerConfig(lr=1e-4, total_steps=4, device="cpu", micro_batch_tokens=micro_batch_tokens)
    ac = algorithm_config(predictor_hidden=16, feature_noise_std=0.0, ema_tau=0.5)
    tr = Trainer(tiny_qwen2(seed=0), lc, ac, max_completion_len=8)
    tr.chunk_bytes = 3 * 4 * VOCAB  # vocabulary projection in blocks (FSDP calls lm_head per block)
    return tr


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tr = _trainer(60)  # small budget: the two ranks get different numbers of micro-batches
        assert tr.sharded
        m = tr.train_step(make_groups(5, 4, seed=8))
        ema = hf_state_dict(tr.ema)  # collective
        msg = publish_weights(tr.policy, f"{tmp}/weights", 1, probe=([1, 2, 3], [4, 5]))
        if rank == 0:
            assert msg is not None
            save_file(ema, f"{tmp}/ema.safetensors")
            (__import__("pathlib").Path(tmp) / "metrics.json").write_text(json.dumps(m))
        else:
            assert msg is None
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_fsdp2_two_ranks_match_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    got = json.loads((tmp_path / "metrics.json").read_text())

    ref = _trainer(60)
    assert not ref.sharded
    want = ref.train_step(make_groups(5, 4, seed=8))
    for k in KEYS:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    published = load_file(str(WeightStore(tmp_path / "weights").weights_file(1)))
    for k, v in ref.policy.state_dict().items():
        # Adam's first step is ~lr·sign(g): round-off on near-zero gradients may flip a sign
        torch.testing.assert_close(published[k], v, atol=2.5e-4, rtol=0)
    ema = load_file(str(tmp_path / "ema.safetensors"))
    for k, v in ref.ema.state_dict().items():
        torch.testing.assert_close(ema[k], v, atol=2.5e-4, rtol=0)


def _ckpt_worker(rank: int, world: int, tmp: str, mode: str) -> None:
    """mode `save`: step 1, checkpoint, step 2; mode `resume`: load that checkpoint, step 2.
    Rank 0 records step 2's metrics and the gathered policy."""
    import torch.distributed as dist

    from popo.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/pg-{mode}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        tr = _trainer(60)
        if mode == "save":
            tr.train_step(make_groups(5, 4, seed=1))
            save_checkpoint(tr, f"{tmp}/ckpt")
        else:
            load_checkpoint(tr, latest_checkpoint(f"{tmp}/ckpt"))
        m = tr.train_step(make_groups(5, 4, seed=2))
        policy = hf_state_dict(tr.policy)  # collective
        if rank == 0:
            save_file(policy, f"{tmp}/{mode}.safetensors")
            (__import__("pathlib").Path(tmp) / f"{mode}.json").write_text(json.dumps(m))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Rank 1 has aborted in interpreter teardown after a clean run ("terminate called without an
    # active exception", ~1 in 4 runs here, only in this test); the results are already written.
    os._exit(0)


@pytest.mark.timeout(300)
def test_fsdp2_checkpoint_resumes_exactly_and_loads_in_one_process(tmp_path):
    from popo.learner.checkpoint import latest_checkpoint, load_checkpoint

    for mode in ("save", "resume"):
        mp.start_processes(
            _ckpt_worker, args=(2, str(tmp_path), mode), nprocs=2, start_method="spawn"
        )
    saved, resumed = (
        {k: v for k, v in json.loads((tmp_path / f).read_text()).items() if "seconds" not in k}
        for f in ("save.json", "resume.json")
    )  # the step's figures without its timings
    assert resumed == saved  # same world size: the resumed step is bit-identical
    a = load_file(str(tmp_path / "save.safetensors"))
    b = load_file(str(tmp_path / "resume.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # The sharded checkpoint is an ordinary one: a single process resumes it, and its step 2
    # agrees with the 2-rank step up to reduction-order round-off.
    ckpt = latest_checkpoint(tmp_path / "ckpt")
    assert json.loads((ckpt / "meta.json").read_text())["world"] == 2
    one = _trainer(60)
    load_checkpoint(one, ckpt)
    m = one.train_step(make_groups(5, 4, seed=2))
    for k in ("loss", "loss_nll", "loss_sim", "cos_sim", "tokens"):
        assert m[k] == pytest.approx(saved[k], rel=1e-5, abs=1e-7), k
    for k, v in one.policy.state_dict().items():
        torch.testing.assert_close(a[k], v, atol=2.5e-4, rtol=0)
