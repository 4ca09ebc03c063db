"""After a checkpoint is published, clean-up never stops training; start-up recovery tolerates any leftover.

What cannot be made real here is injected at the os level: EBUSY from deleting a file an NFS
client holds open (it shows up as a `.nfsXXXX` file), or from removing a mount point.
"""

import errno
import logging
import os

import pytest
from transformers import TrainerCallback

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, latest_checkpoint, verify_checkpoint

HELD = ".nfs000000000001"


def busy(monkeypatch, switch, call, names):
    """`os.<call>` fails with EBUSY on entries named in `names` while `switch['on']`."""
    real = getattr(os, call)

    def failing(path, *args, **kwargs):
        if switch["on"] and os.path.basename(os.fsdecode(path)) in names:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, failing)


class EvalJob(TrainerCallback):
    """After each save, an evaluation job opens a file in the new checkpoint: on NFS it cannot be deleted
    (a mount point inside the checkpoint behaves alike); it lets go from step `release_at` on."""

    def __init__(self, output_dir, switch, release_at, make):
        self.output_dir, self.switch, self.release_at, self.make = output_dir, switch, release_at, make

    def on_step_end(self, args, state, control, **kwargs):
        self.switch["on"] = state.global_step < self.release_at
        saved = self.output_dir / f"step_{state.global_step}"
        if saved.is_dir():
            self.make(saved / HELD)


def leftover_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "clean-up left behind" in r.getMessage()]


@pytest.mark.parametrize("call,make", [
    ("unlink", lambda path: path.write_text("held open by an eval job")),  # NFS silly-renamed open file
    ("rmdir", lambda path: path.mkdir()),                                    # a mount point
])
def test_failed_prune_warns_once_training_goes_on_and_the_next_save_retries(
        tmp_path, tokenizer, llama, monkeypatch, caplog, call, make):
    switch = {"on": False}
    busy(monkeypatch, switch, call, {HELD})
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), keep_last=1),
                           max_steps=5, save_steps=1)
    trainer.add_callback(EvalJob(tmp_path, switch, release_at=3, make=make))
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        trainer.train()
    assert trainer.state.global_step == 5
    warnings = leftover_warnings(caplog)
    # step_1 and step_2 could not be removed at the saves of steps 2 and 3: one warning each, not one per retry
    assert len(warnings) == 2, warnings
    assert ".trash-step_1-" in warnings[0] and ".trash-step_2-" in warnings[1] and "rm -rf" in warnings[0]
    assert entries(tmp_path) == {"step_5", "final"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".trash-", ".old-", ".tmp-"))]  # retried
    assert verify_checkpoint(tmp_path / "step_5") == [] and latest_checkpoint(tmp_path) == tmp_path / "final"


def test_symlinks_under_our_names_are_unlinked_never_followed(tmp_path, tokenizer, llama):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    for name in ("a", "b"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "data.txt").write_text("not ours")
    out.mkdir()
    (out / "step_2").symlink_to(elsewhere / "a")                      # replaced by the save of step 2
    (out / ".trash-step_1-0123456789ab").symlink_to(elsewhere / "b")  # swept at start-up
    make_trainer(llama, tokenizer, out, CheckpointCallback(FullModel()), max_steps=2).train()
    assert (elsewhere / "a" / "data.txt").read_text() == "not ours" == (elsewhere / "b" / "data.txt").read_text()
    assert not (out / "step_2").is_symlink() and verify_checkpoint(out / "step_2") == []
    assert not [p for p in out.iterdir() if p.is_symlink()]


def test_startup_tolerates_what_crashes_and_failed_clean_ups_left(tmp_path, tokenizer, llama, monkeypatch, caplog):
    half_deleted = tmp_path / ".trash-step_1-aaaaaaaaaaaa"
    (half_deleted / "sub").mkdir(parents=True)
    (half_deleted / "sub" / HELD).write_text("held")
    (tmp_path / ".old-step_3-bbbbbbbbbbbb").mkdir()  # half-deleted old copy: no manifest left
    (tmp_path / ".old-step_3-bbbbbbbbbbbb" / "config.json").write_text("{}")
    (tmp_path / ".tmp-final-cccccccccccc").symlink_to(tmp_path / "missing-target")
    (tmp_path / "step_5").write_text("a regular file under a checkpoint name")
    busy(monkeypatch, {"on": True}, "unlink", {HELD})
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2).train()
    assert {"step_2", "final", "step_5", half_deleted.name} <= {p.name for p in tmp_path.iterdir()}
    assert not (tmp_path / ".old-step_3-bbbbbbbbbbbb").exists() and not os.path.lexists(tmp_path / ".tmp-final-cccccccccccc")
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    warnings = leftover_warnings(caplog)
    assert len(warnings) == 1 and half_deleted.name in warnings[0]  # logged once, though retried at each save


def test_orphaned_old_copy_is_restored_over_a_file_squatting_on_its_name(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2).train()
    (tmp_path / "step_2").rename(tmp_path / ".old-step_2-0123456789ab")  # killed between the two renames
    (tmp_path / "step_2").write_text("junk")
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    (tmp_path / "final").rename(tmp_path / ".old-final-0123456789ab")
    assert latest_checkpoint(tmp_path) == tmp_path / ".old-final-0123456789ab"  # readers read the orphan in place
    callback = CheckpointCallback(FullModel(), existing_checkpoints="supersede")
    make_trainer(llama, tokenizer, tmp_path, callback, max_steps=1, save_strategy="no").train()
    assert verify_checkpoint(tmp_path / "step_2") == []  # restored at start-up; the junk went to the trash
