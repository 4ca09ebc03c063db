"""Preemption: a signal makes the run save step_N at the next step boundary and stop, without final/."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, verify_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "fault_scripts" / "train.py"


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    process = subprocess.Popen([sys.executable, SCRIPT, out, work], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (work / "started-0").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr.decode()[-3000:]
    result = json.loads((work / "rank0.json").read_text())
    assert result["preempted"] and 0 < result["step"] < 100_000
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"step_{result['step']}"]
    assert verify_checkpoint(out / f"step_{result['step']}") == []


def test_configured_signal_only(tmp_path, tokenizer, llama):
    class Signal(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # a real signal to this process, mid step 2

    callback = CheckpointCallback(FullModel(), preemption_signals=(signal.SIGUSR1,))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=10, save_steps=100)
    trainer.add_callback(Signal())
    before = signal.getsignal(signal.SIGUSR1)
    trainer.train()
    assert callback.preempted and trainer.state.global_step == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step_2"]
    assert signal.getsignal(signal.SIGUSR1) == before  # uninstalled at the end


def test_enable_jit_checkpoint_conflicts_with_our_handler(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"enable_jit_checkpoint=True installs the Trainer's own SIGTERM handler.*"
                                         r"preemption_signals=\(\)"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), enable_jit_checkpoint=True)
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), preemption_signals=()),
                 enable_jit_checkpoint=True)


class SignalAtStep(TrainerCallback):
    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.sig)


def test_signal_during_the_last_step_gives_step_n_and_no_final(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), preemption_signals=(signal.SIGUSR1,))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=3, save_steps=100)
    trainer.add_callback(SignalAtStep(3, signal.SIGUSR1))
    trainer.train()
    assert callback.preempted and trainer.state.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step_3"]


def test_watching_sigusr1_only_leaves_sigterm_untouched(tmp_path, tokenizer, llama):
    seen = []

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)))

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), preemption_signals=("SIGUSR1",)),
                           max_steps=2)
    trainer.add_callback(Look())
    trainer.train()
    assert all(term == before[0] and usr1 != before[1] for term, usr1 in seen)
