"""Our streaming safetensors writer: readable by safetensors itself, checksum of the exact file bytes."""


import pytest
import torch
from blake3 import blake3
from safetensors import safe_open
from safetensors.torch import load_file

from open_instruct_ckpt._write import safetensors as _safetensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def test_every_dtype_round_trips_bit_exactly_and_the_checksum_is_the_files(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t.{str(dtype).split('.')[1]}": (torch.randn(3, 5, generator=generator) * 50).to(dtype) for dtype in DTYPES
    }
    tensors["scalar"] = torch.tensor(3.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous view
    path = tmp_path / "x.safetensors"
    digest = _safetensors.write(path, tensors, metadata={"format": "pt"})
    assert digest == blake3(path.read_bytes()).hexdigest()
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_large_tensor_spanning_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(_safetensors, "_CHUNK", 1000)
    tensor = torch.arange(100_003, dtype=torch.float32)
    path = tmp_path / "big.safetensors"
    digest = _safetensors.write(path, {"big": tensor})
    assert digest == blake3(path.read_bytes()).hexdigest()
    assert torch.equal(load_file(path)["big"], tensor)


def test_unsupported_dtype_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"tensor 'c' has dtype torch.complex128, which safetensors cannot store"):
        _safetensors.write(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex128)})
