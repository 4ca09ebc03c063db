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


def test_after_a_failed_run_a_signal_reaches_the_handler_from_before_train(tmp_path, tokenizer, llama):
    received = []

    def application_handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, application_handler)
    try:
        first = interrupted_run(tmp_path, tokenizer, llama)
        assert signal.getsignal(signal.SIGTERM) is not application_handler  # still ours: no hook told the callback
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM]  # not swallowed as a preemption request
        assert signal.getsignal(signal.SIGTERM) is application_handler and first.state.global_step == 3
    finally:
        signal.signal(signal.SIGTERM, previous)


FAILED_RUN_THEN_SIGTERM = """
import os, signal, sys, time
from transformers import Trainer, TrainerCallback, TrainingArguments
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer

class Fail(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("another callback failed")

tokenizer = llama_tokenizer()
trainer = Trainer(model=llama_model(tokenizer), processing_class=tokenizer, callbacks=[CheckpointCallback(FullModel()), Fail()],
                  train_dataset=TinyTextDataset(len(tokenizer)), args=TrainingArguments(
                      sys.argv[1], max_steps=4, save_steps=2, use_cpu=True, report_to=[], disable_tqdm=True))
try:
    trainer.train()
except RuntimeError:
    pass
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("SIGTERM was swallowed")
"""


def test_after_a_failed_run_sigterm_ends_the_process_again(tmp_path):
    done = subprocess.run([sys.executable, "-c", FAILED_RUN_THEN_SIGTERM, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr[-2000:]
