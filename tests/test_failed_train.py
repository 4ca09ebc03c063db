"""Nothing leaks when train() raises: TrainerCallback has no exception hook, so the signal handlers and
the output_dir lock are given back when the next run starts, when the callback is collected, or by close()."""

import gc
import signal
import subprocess
import sys

import pytest
from transformers import TrainerCallback

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel


class InterruptAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def lock_is_free(output_dir) -> bool:
    """Whether another process can take the output_dir lock right now."""
    lock_file = output_dir / ".open_instruct_ckpt.lock"
    code = f"import fcntl, os; fcntl.flock(os.open({str(lock_file)!r}, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def interrupted_run(tmp_path, tokenizer, llama):
    # save_steps=100: nothing is saved before the interrupt, so the next run starts in a clean output_dir
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=6, save_steps=100)
    trainer.add_callback(InterruptAt(3))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 3
    return trainer


def test_next_run_in_the_same_process_and_output_dir_trains_and_restores_the_handlers(tmp_path, tokenizer, llama):
    before = signal.getsignal(signal.SIGTERM)
    first = interrupted_run(tmp_path, tokenizer, llama)
    assert signal.getsignal(signal.SIGTERM) != before  # still ours: no hook told the callback
    second = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=2)
    second.train()  # not "in use by another run (pid <own pid>)"
    assert entries(tmp_path) == {"step_2", "final"}
    assert signal.getsignal(signal.SIGTERM) == before
    assert first.state.global_step == 3  # the first Trainer was still referenced all along


def test_collecting_the_callback_gives_everything_back(tmp_path, tokenizer, llama):
    before = signal.getsignal(signal.SIGTERM)
    trainer = interrupted_run(tmp_path, tokenizer, llama)
    assert not lock_is_free(tmp_path)
    del trainer
    gc.collect()
    assert signal.getsignal(signal.SIGTERM) == before
    assert lock_is_free(tmp_path)


def test_close_gives_everything_back(tmp_path, tokenizer, llama):
    before = signal.getsignal(signal.SIGTERM)
    trainer = interrupted_run(tmp_path, tokenizer, llama)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
    assert not lock_is_free(tmp_path)
    callback.close()
    assert signal.getsignal(signal.SIGTERM) == before
    assert lock_is_free(tmp_path)
