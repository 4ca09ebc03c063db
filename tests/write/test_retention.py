"""Retention: prune after completion, by manifest step, never the newest nor final, rename aside first."""

import os

from conftest import entries, make_trainer, saver_for
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt._write.files import prune


def test_keep_last_defaults_to_save_total_limit_and_orders_by_step(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=10, save_steps=1,
                 save_total_limit=2).train()
    assert entries(tmp_path) == {"step_9", "step_10", "final"}  # by name, step_10 would sort before step_9


def test_prune_orders_by_manifest_step_not_mtime_and_renames_aside(tmp_path, tokenizer, llama, monkeypatch):
    saver = saver_for(tokenizer, tmp_path)
    for step in (1, 2, 3):
        saver.save(llama, f"step_{step}", step, FullModel())
    os.utime(tmp_path / "step_1", (2e9, 2e9))  # the oldest step looks newest by mtime
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((str(a), str(b))), real_rename(a, b))[1])
    assert prune(tmp_path, 2) == {}  # nothing left unpruned; the victim waits in the trash for the sweep
    assert renames[0][0] == str(tmp_path / "step_1") and os.path.basename(renames[0][1]).startswith(".trash-step_1-")
    assert entries(tmp_path) == {"step_2", "step_3"}


def test_failed_save_prunes_nothing_and_just_saved_is_never_pruned(tmp_path, tokenizer, llama):
    saver = saver_for(tokenizer, tmp_path, keep_last=1)
    saver.save(llama, "step_17", 17, FullModel())  # an earlier run got further
    saver.save(llama, "final", 17, FullModel())
    path = saver.save(llama, "step_3", 3, FullModel()).path  # a restarted run (no resume) saves a lower step
    assert path.exists() and entries(tmp_path) == {"step_3", "step_17", "final"}
