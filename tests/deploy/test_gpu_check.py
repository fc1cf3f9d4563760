"""The GPU learner check, end to end in its dry mode (tiny shapes on CPU), and its FLOP count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from popo.deploy import gpu_check

SCRIPT = Path(gpu_check.__file__)


def test_dry_run_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "check.json"
    # the script as a bare machine runs it: by path, importing the learner from the checkout
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| model | params |" in proc.stdout and "| loss |" in proc.stdout
    res = json.loads(out.read_text())
    (row,) = res["models"]
    assert row["layers"] == row["of_layers"] == 2
    assert len(row["steps"]) == 3  # one warm-up + 2 timed
    assert row["completion_tokens"] == 2 * 4 * 32 and row["sequences"] == 8
    assert row["tokens_per_s"] > 0 and row["achieved_tflops"] > 0
    assert all(math.isfinite(s["loss"]) and s["tokens"] == 256 for s in row["steps"])
    # a bfloat16 version's tensors to the host, both roundings
    assert set(row["version_to_host_s"]) == {"nearest", "dither"}
    assert min(row["version_to_host_s"].values()) > 0 and "(nearest / dither)" in proc.stdout
    la = res["loss_agreement"]
    # bf16 autocast against fp32 from the same weights: close, and not bit-identical
    assert 0 < la["loss_rel_diff"] < 0.05 and la["grad_norm_rel_diff"] < 0.1
    assert "6 * N_body * T_seq" in res["flops_formula"]


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_of_the_flop_formula_is_the_models(tied):
    shape = {**gpu_check.SHAPES["dry"], "tie_word_embeddings": tied, "num_hidden_layers": 3}
    model = gpu_check.build_model(shape, 3, torch.device("cpu"), seed=0)
    assert gpu_check.total_params(shape, 3) == sum(p.numel() for p in model.parameters())
    matmul = sum(
        p.numel() for n, p in model.named_parameters() if ".layers." in n and "norm" not in n
    )
    assert gpu_check.body_params(shape, 3) == matmul


def test_step_flops_by_hand():
    shape = {**gpu_check.SHAPES["dry"], "num_hidden_layers": 1}
    h, v = shape["hidden_size"], shape["vocab_size"]
    n_body = gpu_check.body_params(shape, 1)
    seq = [10, 20]
    # causal QK^T and AV forward: per layer, s^2 * h multiply-adds each, halved by the mask
    attn_fwd = 2 * 1 * h * (10**2 + 20**2)
    want = 6 * n_body * 30 + 6 * v * h * 12 + 3 * attn_fwd + 2 * n_body * 30 + attn_fwd
    assert gpu_check.step_flops(shape, 1, seq, 12, kl_step=False) == want
    assert gpu_check.step_flops(shape, 1, seq, 12, kl_step=True) == want + 2 * v * h * 12


def test_peak_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H200", None) == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == pytest.approx(989.4)
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert gpu_check.peak_tflops("Some GPU", None) is None
    assert gpu_check.peak_tflops("Some GPU", 123.0) == 123.0


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of module `name` (what pip needs: module, METADATA, WHEEL,
    RECORD)."""
    import zipfile

    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_bootstrap_installs_missing_modules_from_the_carried_wheels(tmp_path, monkeypatch):
    name = "popo_gpu_check_probe"
    monkeypatch.setattr(gpu_check, "NEEDED", (name,))
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "none")
    with pytest.raises(SystemExit, match=r"gpu_check_wheels\.sh"):
        gpu_check.bootstrap()
    (tmp_path / "whl").mkdir()
    _wheel(tmp_path / "whl", name)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "whl")
    monkeypatch.setattr(gpu_check, "SITE", tmp_path / "site")
    monkeypatch.setattr(sys, "path", list(sys.path))
    gpu_check.bootstrap()  # pip install --no-index --target, then on sys.path
    mod = __import__(name)
    assert mod.VALUE == 42 and Path(mod.__file__).is_relative_to(tmp_path / "site")
    sys.modules.pop(name)
