"""Every argument is checked before training (at construction, when the Trainer is built, again at on_train_begin
before the lock is taken) with a message naming the value and the fix; the tokenizer and output_dir defaults."""

import os
import signal

import pytest
from transformers import Trainer

from conftest import entries, make_trainer, training_args
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, ModelAttribute
from open_instruct_ckpt.tiny import TinyTextDataset


@pytest.mark.parametrize("strategy,match", [
    ("full", r"strategy='full' is not a save strategy; pass FullModel\(\)"),
    (FullModel, r"got the class FullModel; pass an instance: FullModel\(\)"),
])
def test_unknown_strategy(strategy, match):
    with pytest.raises(TypeError, match=match):
        CheckpointCallback(strategy)


@pytest.mark.parametrize("keep_last", [0, -1])
def test_keep_last_below_one(keep_last):
    with pytest.raises(ValueError, match=rf"keep_last={keep_last!r}: keep at least 1 checkpoint, or None"):
        CheckpointCallback(FullModel(), keep_last=keep_last)


@pytest.mark.parametrize("keep_last", [True, 1.5, "3"])
def test_keep_last_of_the_wrong_type_names_the_type(keep_last):
    with pytest.raises(TypeError, match=rf"keep_last={keep_last!r} must be an int \(at least 1\), or None"):
        CheckpointCallback(FullModel(), keep_last=keep_last)


def test_output_dir_is_a_file(tmp_path, tokenizer, llama):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=rf"output_dir {tmp_path}/out is a file; pass a directory path"):
        make_trainer(llama, tokenizer, tmp_path / "x", CheckpointCallback(FullModel(), output_dir=tmp_path / "out"))


def test_output_dir_not_writable(tmp_path, tokenizer, llama, monkeypatch):
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()))
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # we run as root: inject the permission error
        if os.path.dirname(os.path.abspath(path)) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(CheckpointError, match=rf"output_dir {tmp_path} is not writable \(Permission denied\); fix its"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("strategy", [FullModel, lambda **kw: ModelAttribute("policy", **kw)])
@pytest.mark.parametrize("size,error,match", [
    ("5XB", ValueError, r"max_shard_size='5XB'\): Unit 'XB' not supported.*use a size like '5GB'"),
    ("0GB", ValueError, r"max_shard_size='0GB'\): must be positive"),
    (0, ValueError, r"max_shard_size=0\): must be positive"),
    ("-1GB", ValueError, r"max_shard_size='-1GB'\): must be positive"),
    (True, TypeError, r"max_shard_size=True\): use an int of bytes or a size like '5GB'"),
    (1.5, TypeError, r"max_shard_size=1.5\): use an int of bytes"),
])
def test_max_shard_size_is_parsed_at_construction(strategy, size, error, match):
    with pytest.raises(error, match=match):
        strategy(max_shard_size=size)


def test_max_shard_size_accepts_what_save_pretrained_accepts():
    assert FullModel(max_shard_size="500MB") and ModelAttribute("policy", max_shard_size="1.5GB")


@pytest.mark.parametrize("signals,error,match", [
    ((signal.SIGKILL,), ValueError, r"preemption_signals: SIGKILL cannot be caught.*use SIGTERM or SIGUSR1"),
    (("SIGSTOP",), ValueError, r"SIGSTOP cannot be caught"),
    (("SIGNOPE",), ValueError, r"preemption_signals: 'SIGNOPE' is not a signal"),
    ((1.5,), ValueError, r"preemption_signals: 1.5 is not a signal"),
    ("SIGUSR1", TypeError, r"preemption_signals='SIGUSR1' must be a tuple of signals"),
    (signal.SIGUSR1, TypeError, r"must be a tuple of signals"),
])
def test_preemption_signals_are_checked_at_construction(signals, error, match):
    with pytest.raises(error, match=match):
        CheckpointCallback(FullModel(), preemption_signals=signals)


def test_preemption_signals_accept_names_ints_and_members():
    callback = CheckpointCallback(FullModel(), preemption_signals=("SIGUSR1", "usr2", int(signal.SIGTERM)))
    assert callback.preemption_signals == (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def test_existing_checkpoints_policy_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"existing_checkpoints='overwrite' must be one of \('error', 'supersede'\)"):
        CheckpointCallback(FullModel(), existing_checkpoints="overwrite")


def test_bad_argument_found_at_train_begin_takes_no_lock_and_installs_nothing(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel())
    trainer = make_trainer(llama, tokenizer, tmp_path, callback)
    trainer.args.save_strategy = "best"  # changed after the Trainer was built: found again at on_train_begin
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match=r"save_strategy='best' is decided after evaluation"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / ".open_instruct_ckpt.lock").exists()


def evaluating_trainer(model, tokenizer, output_dir, callback, **overrides):
    dataset = TinyTextDataset(len(tokenizer))
    args = training_args(output_dir, eval_strategy="steps", eval_steps=2, **overrides)
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
                   callbacks=[callback])


def test_save_strategy_best_is_rejected_before_training(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"save_strategy='best' is decided after evaluation"):
        evaluating_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_strategy="best",
                           metric_for_best_model="loss")


def test_load_best_model_at_end_needs_the_trainers_checkpoints(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"load_best_model_at_end=True needs the Trainer's own checkpoints"):
        evaluating_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), load_best_model_at_end=True)


def test_missing_tokenizer_names_both_fixes(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"pass Trainer\(processing_class=tokenizer\) or CheckpointCallback\(\.\.\., tokenizer=tokenizer\)"):
        Trainer(model=llama, args=training_args(tmp_path), train_dataset=TinyTextDataset(len(tokenizer)),
                callbacks=[CheckpointCallback(FullModel())])


def test_explicit_tokenizer_is_used_without_processing_class(tmp_path, tokenizer, llama):
    trainer = Trainer(model=llama, args=training_args(tmp_path), train_dataset=TinyTextDataset(len(tokenizer)),
                      callbacks=[CheckpointCallback(FullModel(), tokenizer=tokenizer)])
    trainer.train()
    assert "tokenizer.json" in entries(tmp_path / "final")


def test_output_dir_argument_overrides_args_output_dir(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path / "trainer", CheckpointCallback(FullModel(), output_dir=tmp_path / "ours")).train()
    assert entries(tmp_path / "ours") == {"step_2", "step_4", "final"}
