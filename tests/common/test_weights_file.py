"""The safetensors writer of weight versions (`common.weights.write_safetensors`): files that the
real safetensors library reads back exactly, hashed in the same pass that writes them."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from popo.common.weights import (
    WEIGHTS_FILE,
    cast_for_publish,
    dither_to_bf16,
    write_safetensors,
    write_version_dir,
)


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What a state dict can hold: plain, non-contiguous, shared-storage, scalar and empty
    tensors, in the policy's dtype, next to integer and boolean buffers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 33, generator=g).to(dtype)
    return {
        "model.embed_tokens.weight": w,
        "lm_head.weight": w,  # tied: the very same tensor under a second name
        "model.layers.0.mlp.down_proj.weight": w.t(),  # non-contiguous
        "model.layers.0.mlp.up_proj.weight": w[::2, 1::3],  # strided view into the same storage
        "model.layers.0.input_layernorm.weight": w[5],  # contiguous view at a storage offset
        "model.norm.weight": torch.randn(33, generator=g).to(dtype),
        "model.scale": torch.tensor(0.5, dtype=dtype),  # 0-dim
        "model.empty": torch.empty(0, 4, dtype=dtype),
        "model.positions": torch.arange(7, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_version_file_reads_back_exactly_and_its_digest_is_the_files(tmp_path, dtype):
    tensors = _tensors(dtype)
    path, digest, nbytes = write_version_dir(tmp_path / "v1", tensors)
    data = path.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    assert nbytes == len(data)
    assert (path.parent / f"{WEIGHTS_FILE}.sha256").read_text() == digest + "\n"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, want in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == want.dtype and got.shape == want.shape, k
            assert torch.equal(got, want), k
    # the header as the format defines it: data 8-byte aligned, every tensor at a multiple of
    # its item size, offsets back to back up to the end of the file
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and data[8:9] == b"{"
    header = json.loads(data[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for k, v in header.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % tensors[k].element_size() == 0, k


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_contiguous_tensors_are_byte_for_byte_what_save_file_writes(tmp_path, chunk):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "b.weight": torch.randn(64, 40, generator=g),
        "a.weight": torch.randn(3, 5, generator=g).bfloat16(),
        "c.bias": torch.randn(9, generator=g).half(),
        "d.ids": torch.arange(5, dtype=torch.int32),
        "e.flag": torch.tensor([True]),
    }
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    digest, size = write_safetensors(
        tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"}, chunk=chunk
    )
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert (digest, size) == (hashlib.sha256(ours).hexdigest(), len(ours))


def test_a_dtype_safetensors_cannot_store_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        write_version_dir(tmp_path / "v1", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rounding", ["nearest", "dither"])
@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("chunk", [6, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_casting_writer_is_byte_for_byte_the_cast_state(
    tmp_path, monkeypatch, dtype, chunk, cores, rounding
):
    """The writer's cast, block by block through its reused buffers (chunk 6: many blocks per
    tensor, the buffers reused over and over, with the hasher on its own thread or not), writes
    exactly what casting the whole state first and writing that does, dithered or not."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    tensors = _tensors(torch.float32)
    tensors["model.big"] = torch.randn(300, generator=torch.Generator().manual_seed(2))
    cast = {k: cast_for_publish(v, dtype, rounding, k) for k, v in tensors.items()}
    want = write_safetensors(tmp_path / "cast.safetensors", cast, chunk=chunk)
    got = write_safetensors(
        tmp_path / "ours.safetensors", tensors, chunk=chunk, dtype=dtype, rounding=rounding
    )
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "cast.safetensors").read_bytes()
    assert got == want == (hashlib.sha256(ours).hexdigest(), len(ours))


def test_dither_is_unbiased_fixed_and_passes_a_sub_spacing_drift():
    spacing = 2.0**-7  # bfloat16's between 1 and 2
    # longer than the offset table (2^20): offsets repeat from the third block on
    x = torch.full((2_500_000,), 1.0 + 0.3 * spacing)
    for sign in (1.0, -1.0):
        d = dither_to_bf16(sign * x, "w")
        assert d.dtype == torch.bfloat16
        assert set(d.float().abs().unique().tolist()) == {1.0, 1.0 + spacing}
        assert d.float().mean().item() == pytest.approx(sign * (1.0 + 0.3 * spacing), abs=5e-5)
    assert torch.equal(dither_to_bf16(x, "w"), dither_to_bf16(x, "w"))  # the same offsets
    # a drift of a tenth of the spacing: rounding to nearest moves no element, dither ~10 %
    moved = x + 0.1 * spacing
    assert torch.equal(moved.to(torch.bfloat16), x.to(torch.bfloat16))
    flipped = (dither_to_bf16(moved, "w") != dither_to_bf16(x, "w")).float().mean().item()
    assert flipped == pytest.approx(0.1, abs=0.01)
    # any elements, by position: the same values as in the whole tensor
    at = torch.tensor([0, 7, 1 << 20, 2_499_999])
    assert torch.equal(dither_to_bf16(moved[at], "w", at=at), dither_to_bf16(moved, "w")[at])
    tail = dither_to_bf16(moved[1_000_000:], "w", at=1_000_000)
    assert torch.equal(tail, dither_to_bf16(moved, "w")[1_000_000:])
    # another tensor reads the offsets from elsewhere
    assert not torch.equal(dither_to_bf16(moved, "v"), dither_to_bf16(moved, "w"))
    # values bfloat16 holds exactly stay exact
    exact = torch.tensor([0.0, 1.0, -2.5, 2.0**-100])
    assert torch.equal(dither_to_bf16(exact, "w").float(), exact)
