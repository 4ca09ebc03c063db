"""The engine seam: FSDP2 / DTensor handling in one process (a world of one, gloo on CPU); the import rules are
tests/test_layout.py's.

The real 2-process runs are in tests/distributed/test_fsdp2.py; here a world of one still makes
real DTensors and a real `fully_shard`, so the seam's dispatch, the class name and the refusals
are checked in seconds.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import open_instruct_ckpt._engines as _gather
from conftest import training_args
from open_instruct_ckpt import FullModel
from open_instruct_ckpt._write.saver import save_once
from open_instruct_ckpt.tiny import llama_model


@pytest.fixture
def world_of_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp2_model_saves_as_its_own_class_with_the_unsharded_weights(tokenizer, tmp_path, world_of_one):
    reference = llama_model(tokenizer)
    model = llama_model(tokenizer)
    for layer in model.model.layers:
        fully_shard(layer, mesh=world_of_one)
    fully_shard(model, mesh=world_of_one)
    assert type(model).__name__ == "FSDPLlamaForCausalLM" and _gather.is_sharded(model.lm_head.weight)
    _gather.check_engine(model)

    saved = save_once(FullModel(), model, tokenizer, tmp_path).path

    assert _gather.model_class(model) is type(reference)
    loaded = type(reference).from_pretrained(saved)
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_tensor_parallel_dtensor_is_refused_with_the_fix(tokenizer, world_of_one):
    model = llama_model(tokenizer)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(distribute_tensor(q_proj.weight.detach(), world_of_one, [Shard(1)]))
    with pytest.raises(ValueError, match=r"parameter model\.layers\.0\.self_attn\.q_proj\.weight is a DTensor .*"
                                         r"train with tp_size=1"):
        _gather.check_engine(model)


def test_plain_model_passes_the_engine_check(tokenizer, tmp_path):
    _gather.check_engine(llama_model(tokenizer))
    assert _gather.trainer_checkpoint_warnings(training_args(tmp_path)) == []
