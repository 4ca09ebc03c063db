"""Async saves: the snapshot is a true copy; failures, preemption and train end wait for the background save.

The background is held back where ordering matters by wrapping `_safetensors.open_stream` (the file
write itself stays real): a test can then change the weights, or signal, while a save is in flight.
"""

import errno
import os
import signal
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import entries, make_trainer, saver_for
from open_instruct_ckpt import AutoInterval, CheckpointCallback, CheckpointError, FullModel, Upload, verify_checkpoint
from open_instruct_ckpt._write import safetensors as _safetensors
from open_instruct_ckpt._write import staging as _async


class PauseAfterStep(TrainerCallback):
    """Training goes on (in time) without waiting for the save started at `step`."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            time.sleep(self.seconds)


@pytest.fixture
def held_writes(monkeypatch):
    """Shard writes wait until `release` is set; `started` is set when the first one is reached."""
    real, release, started = _safetensors.open_stream, threading.Event(), threading.Event()

    def write(*args, **kwargs):
        started.set()
        assert release.wait(60), "the test never released the background write"
        return real(*args, **kwargs)

    monkeypatch.setattr(_safetensors, "open_stream", write)
    return release, started


def test_snapshot_is_a_true_copy(tmp_path, tokenizer, llama, held_writes):
    release, started = held_writes
    before = {name: t.detach().clone() for name, t in llama.state_dict().items()}
    saver = saver_for(tokenizer, tmp_path, async_save=True)
    saver.start(llama, "step_1", 1, FullModel())
    assert started.wait(60) and saver.pending and saver.poll() is None  # in flight, its files not yet written
    with torch.no_grad():
        for param in llama.parameters():
            param.add_(1.0)  # what the next optimizer step does to the live weights
    release.set()
    path = saver.wait().path
    assert path == tmp_path / "step_1" and verify_checkpoint(path) == []
    saved = load_file(path / "model.safetensors")
    assert saved and all(torch.equal(saved[name], before[name]) for name in saved)


def test_one_save_in_flight_at_most(tmp_path, tokenizer, llama, held_writes):
    release, _ = held_writes
    saver = saver_for(tokenizer, tmp_path, async_save=True)
    saver.start(llama, "step_1", 1, FullModel())
    with pytest.raises(RuntimeError, match="still pending: wait\\(\\) for it first"):
        saver.start(llama, "step_2", 2, FullModel())
    release.set()
    assert saver.wait().name == "step_1" and not saver.pending and saver.wait() is None


def test_background_failure_raises_at_next_step_end_and_keeps_previous(tmp_path, tokenizer, llama, monkeypatch):
    real, failed = _safetensors.open_stream, threading.Event()

    def fails_on_second_save(path, *args, **kwargs):
        if ".tmp-step_4-" in str(path):
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    class StepFiveAfterTheFailure(TrainerCallback):  # however slow the (niced) background thread is here
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                assert failed.wait(60)
                time.sleep(0.5)  # the thread records its failure and ends

    monkeypatch.setattr(_safetensors, "open_stream", fails_on_second_save)
    callback = CheckpointCallback(FullModel(), async_save=True)
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=8, save_steps=2)
    trainer.add_callback(StepFiveAfterTheFailure())
    with pytest.raises(CheckpointError, match=r"writing checkpoint .*step_4 failed: .*No space left on device"):
        trainer.train()
    assert trainer.state.global_step == 5  # raised at the step end after the failed save started
    assert entries(tmp_path) == {"step_2"} and verify_checkpoint(tmp_path / "step_2") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_preemption_during_background_save_finishes_it_then_saves_and_stops(tmp_path, tokenizer, llama, held_writes):
    release, started = held_writes

    class SignalWhileSaving(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # step 3 begins with the step-2 save held in the background
                assert started.wait(60)
                signal.raise_signal(signal.SIGUSR1)
                threading.Timer(0.5, release.set).start()

    callback = CheckpointCallback(FullModel(), async_save=True, preemption_signals=(signal.SIGUSR1,))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=10, save_steps=2)
    trainer.add_callback(SignalWhileSaving())
    trainer.train()
    assert callback.preempted and trainer.state.global_step == 3
    assert entries(tmp_path) == {"step_2", "step_3"}
    assert verify_checkpoint(tmp_path / "step_2") == [] and verify_checkpoint(tmp_path / "step_3") == []


def test_train_end_waits_for_the_background_save(tmp_path, tokenizer, llama, held_writes):
    release, _ = held_writes
    threading.Timer(2.0, release.set).start()
    callback = CheckpointCallback(FullModel(), async_save=True)
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=4, save_steps=2)
    trainer.train()
    assert entries(tmp_path) == {"step_2", "step_4", "final"}
    assert all(verify_checkpoint(tmp_path / name) == [] for name in ("step_2", "step_4", "final"))
    assert not callback.saver.pending


def test_async_save_must_be_a_bool():
    with pytest.raises(TypeError, match=r"async_save='yes' must be True or False"):
        CheckpointCallback(FullModel(), async_save="yes")


def test_arena_refuses_what_host_memory_cannot_hold(monkeypatch):
    arena = _async.Arena()
    monkeypatch.setattr(_async, "available_host_bytes", lambda: 4 << 30)
    assert arena.fits(1 << 30) and not arena.fits(8 << 30)
    arena.reset(1024)
    copy = arena.copy(torch.arange(10, dtype=torch.float32))
    assert copy.untyped_storage().data_ptr() == arena._buffer.untyped_storage().data_ptr()
    arena.reset(512)
    assert arena.capacity == 1024  # reused, not reallocated


def test_falls_back_to_a_sync_save_with_a_warning_when_host_memory_is_short(tmp_path, tokenizer, llama, monkeypatch,
                                                                              caplog):
    monkeypatch.setattr(_async, "available_host_bytes", lambda: 1024)  # a host that cannot hold the arena
    saver = saver_for(tokenizer, tmp_path, async_save=True)
    saver.start(llama, "step_1", 1, FullModel())
    assert (tmp_path / "step_1").is_dir()  # published before start returned: a sync save
    assert saver.wait().path == tmp_path / "step_1" and saver.staging_capacity == 0
    assert "Saving synchronously: host memory cannot hold the" in caplog.text


def test_uploads_are_queued_after_the_background_publish(tmp_path, tokenizer, llama, held_writes):
    release, _ = held_writes
    threading.Timer(1.0, release.set).start()
    remote = tmp_path / "remote"
    callback = CheckpointCallback(FullModel(), async_save=True, upload=Upload(to=str(remote)))
    trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback, max_steps=4, save_steps=2)
    trainer.train()
    assert entries(remote) == {"step_2", "step_4", "final"}
    assert all(verify_checkpoint(remote / name) == [] for name in ("step_2", "step_4", "final"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux behaviour")
def test_background_writer_and_its_hasher_yield_cpu_to_training(tmp_path, tokenizer, llama, monkeypatch):
    """The persist thread (and the sha256 thread it starts) run at a lower CPU priority; training's is unchanged."""
    real_write, real_hash, seen = _safetensors.open_stream, _safetensors.FileStream._hash, {}

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    monkeypatch.setattr(_safetensors, "open_stream",
                        lambda *a, **k: (seen.setdefault("writer", niceness()), real_write(*a, **k))[1])
    monkeypatch.setattr(_safetensors.FileStream, "_hash",
                        lambda self: (seen.setdefault("hasher", niceness()), real_hash(self))[1])
    training = niceness()
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), async_save=True), max_steps=4,
                           save_steps=2)
    trainer.add_callback(PauseAfterStep(2, 1.0))  # the step-2 save runs while training goes on, nobody waiting for it
    trainer.train()
    expected = min(19, training + _async.BACKGROUND_NICENESS)
    assert seen == {"writer": expected, "hasher": expected} and expected > training
    assert niceness() == training
    assert verify_checkpoint(tmp_path / "step_2") == []


def test_async_saves_with_the_auto_interval_save_once_per_interval(tmp_path, tokenizer, llama, monkeypatch):
    """A background save still in flight at the next step end must not make that step "due" again."""
    real = _safetensors.open_stream
    monkeypatch.setattr(_safetensors, "open_stream", lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1])  # slow disk
    callback = CheckpointCallback(FullModel(), async_save=True, interval=AutoInterval(mtbf_hours=1e6))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=12, save_steps=4)
    trainer.train()
    assert entries(tmp_path) == {"step_4", "step_8", "step_12", "final"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux behaviour")
def test_a_background_save_gets_full_priority_while_training_waits_for_it(tmp_path, tokenizer, llama, monkeypatch):
    """Train end (like the next save or a preemption) waits for the background save: it must not crawl at nice +10."""
    release, seen = threading.Event(), {}
    real_write, real_hash = _safetensors.open_stream, _safetensors.FileStream._hash

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def held_write(*args, **kwargs):
        seen.setdefault("writer_before", niceness())
        assert release.wait(60)
        seen.setdefault("writer_waited_on", niceness())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(_safetensors, "open_stream", held_write)
    monkeypatch.setattr(_safetensors.FileStream, "_hash", lambda self: (seen.setdefault("hasher", niceness()), real_hash(self))[1])
    class ReleaseOnceTrainEndWaits(TrainerCallback):  # runs after the step-2 save started; train end is next
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                threading.Timer(1.0, release.set).start()

    training = niceness()
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), async_save=True), max_steps=2,
                           save_steps=2)
    trainer.add_callback(ReleaseOnceTrainEndWaits())
    trainer.train()
    assert seen == {"writer_before": min(19, training + _async.BACKGROUND_NICENESS), "writer_waited_on": training,
                    "hasher": training}
    assert verify_checkpoint(tmp_path / "final") == []
