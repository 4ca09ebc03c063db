"""Full disk and I/O errors: a clear error before any byte is written, or only the temporary removed."""

import errno
import os
import shutil
from collections import namedtuple

import pytest
from transformers import TrainerCallback

import open_instruct_ckpt._write.safetensors as safetensors_writer
from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, verify_checkpoint

Usage = namedtuple("Usage", "total used free")


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.name != ".open_instruct_ckpt.lock"}


def trained(tmp_path, tokenizer, llama, **overrides):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2, **overrides).train()
    return snapshot(tmp_path)


class FailFrom(TrainerCallback):
    """Turns an injected fault on at the start of a given step."""

    def __init__(self, step, switch):
        self.step, self.switch = step, switch

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.switch["on"] = True


def fake_free(monkeypatch, free):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, free()) if free() is not None else real(p))


def test_startup_needs_room_for_keep_last_plus_one(tmp_path, tokenizer, llama):
    before = trained(tmp_path, tokenizer, llama)
    one_checkpoint = sum(p.stat().st_size for p in (tmp_path / "step_2").iterdir())
    monkeypatch = pytest.MonkeyPatch()
    fake_free(monkeypatch, lambda: 2 * one_checkpoint)  # room for 2, keep_last=2 needs 3
    again = dict(keep_last=2, existing_checkpoints="supersede")
    with pytest.raises(CheckpointError, match=r"not enough disk space in .*room is reserved for 3 checkpoint\(s\) "
                                              r"\(keep_last=2 checkpoints plus the next one.*lower keep_last"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), **again), max_steps=2).train()
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    # the failed start released the lock: the next run in this process may use the directory
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), **again), max_steps=2).train()


def test_full_disk_at_a_save_writes_nothing(tmp_path, tokenizer, llama, monkeypatch):
    switch = {"on": False}
    fake_free(monkeypatch, lambda: 1000 if switch["on"] else None)
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=4)
    trainer.add_callback(FailFrom(3, switch))
    snapshots = []
    trainer.add_callback(type("Snap", (TrainerCallback,), {"on_step_begin": lambda self, a, s, c, **k: snapshots.append(
        snapshot(tmp_path)) if s.global_step == 3 else None})())
    with pytest.raises(CheckpointError, match=r"not enough disk space .*1,000 are free; free some space"):
        trainer.train()
    assert snapshot(tmp_path) == snapshots[0]  # not a byte, not a directory, step_2 untouched
    assert verify_checkpoint(tmp_path / "step_2") == []


def inject(monkeypatch, switch, target, error_number, tmp_path):
    real = getattr(target[0], target[1])

    def failing(*args, **kwargs):
        if switch["on"] and str(tmp_path) in " ".join(map(str, args)) + _fd_path(args):
            if target[1] == "open_stream":  # a full disk mid-file: part of the bytes made it
                open(args[0], "wb").write(b"\0" * 100)
            raise OSError(error_number, os.strerror(error_number), str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, failing)


def _fd_path(args):
    return os.readlink(f"/proc/self/fd/{args[0]}") if args and isinstance(args[0], int) else ""


@pytest.mark.parametrize("target,error_number,fix", [
    ((safetensors_writer, "open_stream"), errno.ENOSPC, "free disk space"),
    ((os, "fsync"), errno.EIO, "check the disk"),
    ((os, "rename"), errno.EACCES, "fix the permissions of output_dir"),
])
def test_io_error_removes_only_the_temporary(tmp_path, tokenizer, llama, monkeypatch, target, error_number, fix):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2).train()
    before = snapshot(tmp_path)
    switch = {"on": False}
    inject(monkeypatch, switch, target, error_number, tmp_path)
    callback = CheckpointCallback(FullModel(), existing_checkpoints="supersede")
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=2)
    trainer.add_callback(FailFrom(2, switch))  # step_2 exists: this save replaces it
    with pytest.raises(CheckpointError, match=rf"writing checkpoint {tmp_path}/step_2 failed: .*{fix}") as info:
        trainer.train()
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == error_number
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-step", ".old-", ".trash-"))]
    assert {k: v for k, v in snapshot(tmp_path).items() if k.startswith(("step_2", "final"))} == {
        k: v for k, v in before.items() if k.startswith(("step_2", "final"))}
    assert verify_checkpoint(tmp_path / "step_2") == [] and verify_checkpoint(tmp_path / "final") == []
