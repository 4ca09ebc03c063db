"""`save_on_each_node=True` in one process (one node): what is decided without a second node.

The two-node behaviour (a private disk per node, the shared-storage probe) is in tests/distributed/test_nodes.py.
"""

from __future__ import annotations

import pytest

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, Upload, verify_checkpoint


def test_writers_all_with_save_on_each_node_is_refused_when_the_trainer_is_built(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), writers="all")
    with pytest.raises(ValueError, match=r"writers='all' .* cannot go with save_on_each_node=True .* use writers='main' "
                                         r"with save_on_each_node=True for node-local disks"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback, save_on_each_node=True)


def test_one_node_uploads_to_its_node_prefix_and_saves_as_usual(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(tmp_path / "remote" / "node{node}")))
    make_trainer(llama, tokenizer, tmp_path / "out", callback, save_on_each_node=True).train()
    assert entries(tmp_path / "out") == entries(tmp_path / "remote" / "node0") == {"step_2", "step_4", "final"}
    assert all(verify_checkpoint(tmp_path / "remote" / "node0" / name) == [] for name in ("step_2", "step_4", "final"))
