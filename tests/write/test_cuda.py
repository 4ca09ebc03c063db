"""GPU paths (skipped without CUDA): the pinned staging arena, non-blocking device-to-host copies that are complete
before an async save's `start` returns (a true snapshot of a CUDA model updated right after), bf16 weights saved as
bf16, and no GPU memory kept after a save. `benchmarks/gpu_check.py` runs these on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import saver_for
from open_instruct_ckpt import FullModel, verify_checkpoint
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cuda_model():
    tokenizer = llama_tokenizer(extra_words=2000)
    model = llama_model(tokenizer, hidden=256, layers=4).to("cuda", torch.bfloat16)
    return tokenizer, model


def test_async_snapshot_of_a_cuda_model_is_complete_when_start_returns(tmp_path, cuda_model):
    tokenizer, model = cuda_model
    before = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    saver = saver_for(tokenizer, tmp_path, async_save=True)
    saver.start(model, "step_1", 1, FullModel())
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(-3.0)  # launched right away on the GPU's stream, as the next optimizer step would be
    saved = saver.wait()
    assert saver.staging_pinned and verify_checkpoint(saved.path) == []
    files = load_file(saved.path / "model.safetensors")
    assert files and all(t.dtype == torch.bfloat16 for t in files.values())
    assert all(torch.equal(files[name], before[name]) for name in files)


def test_saves_keep_no_gpu_memory(tmp_path, cuda_model):
    tokenizer, model = cuda_model
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    saver_for(tokenizer, tmp_path).save(model, "step_1", 1, FullModel())
    asynchronous = saver_for(tokenizer, tmp_path / "async", async_save=True)
    asynchronous.start(model, "step_1", 1, FullModel())
    asynchronous.wait()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
