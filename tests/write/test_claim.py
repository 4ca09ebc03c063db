"""The start-up claim on output_dir: it removes only our temporaries and restores orphans; a second run on a locked
output_dir is refused, naming the other run's pid and the fixes, before anything there is touched."""

import subprocess
import sys

import pytest

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, latest_checkpoint
from open_instruct_ckpt._write.saver import save_once


def test_startup_removes_only_our_temporaries_and_restores_orphans(tmp_path, tokenizer, llama):
    save_once(FullModel(), llama, tokenizer, tmp_path, "step_5", 5)
    (tmp_path / "step_5").rename(tmp_path / ".old-step_5-0123456789ab")  # killed between the renames
    ours = [".tmp-step_7-aaaaaaaaaaaa", ".trash-step_1-bbbbbbbbbbbb", ".tmp-final-cccccccccccc"]
    theirs = [".tmp-notes", "data", ".tmp-cache-XYZ", ".old-step_5"]
    for name in ours + theirs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("x")
    (tmp_path / "notes.txt").write_text("keep")
    callback = CheckpointCallback(FullModel(), existing_checkpoints="supersede")
    make_trainer(llama, tokenizer, tmp_path, callback, max_steps=2).train()
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(ours) and ".old-step_5-0123456789ab" not in names
    assert set(theirs) | {"notes.txt", "step_5", "step_2", "final"} <= names


def test_second_run_on_a_locked_output_dir_is_refused(tmp_path, tokenizer, llama):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from open_instruct_ckpt._write.lock import RunLock; "
        f"lock = RunLock(Path({str(tmp_path)!r})); lock.acquire(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / ".tmp-step_1-dddddddddddd").mkdir()  # the live run's work in progress
        with pytest.raises(CheckpointError, match=rf"output_dir {tmp_path} is in use by another run "
                                                   rf"\(pid {holder.pid}\).*choose a different output_dir.*calls "
                                                   r"close\(\) on its CheckpointCallback"):
            make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2).train()
        assert (tmp_path / ".tmp-step_1-dddddddddddd").exists()
    finally:
        holder.kill()
        holder.wait()
    assert latest_checkpoint(tmp_path) is None
