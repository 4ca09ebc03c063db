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


class _HeldDigest:
    """A real blake3 whose updates wait until `release` is set (a digest slower than the disk), or raise."""

    def __init__(self, release, fail=False):
        self.inner, self.release, self.fail = blake3(), release, fail

    def update(self, data):
        self.release.wait()
        if self.fail:
            raise MemoryError("planted")
        self.inner.update(data)

    def hexdigest(self):
        return self.inner.hexdigest()


def _write_in_thread(path, tensors):
    import threading

    outcome = {}

    def run():
        try:
            outcome["digest"] = _safetensors.write(path, tensors)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_slow_digest_holds_the_writer_back_instead_of_every_written_tensor(tmp_path, monkeypatch):
    import threading
    import time

    release = threading.Event()
    monkeypatch.setattr(_safetensors.digest, "new", lambda: _HeldDigest(release))
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each, one chunk each
    path = tmp_path / "x.safetensors"
    thread, outcome = _write_in_thread(path, tensors)
    time.sleep(1.0)
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    written = (path.stat().st_size - header_bytes) // 1024
    # the digest is on the header; two chunks wait for it, a third is written and waits to be queued
    assert written <= 3, f"{written} tensors written while the digest had taken none: it keeps them all alive"
    release.set()
    thread.join(30)
    assert outcome["digest"] == blake3(path.read_bytes()).hexdigest()


def test_a_failing_digest_fails_the_file_and_never_blocks_the_writer(tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    release.set()
    monkeypatch.setattr(_safetensors.digest, "new", lambda: _HeldDigest(release, fail=True))
    thread, outcome = _write_in_thread(tmp_path / "x.safetensors", {f"t{i}": torch.ones(256) for i in range(10)})
    thread.join(30)
    assert not thread.is_alive(), "the writer hung on a digest that failed"
    assert "computing its digest failed" in str(outcome["error"])
