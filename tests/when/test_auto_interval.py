"""AutoInterval: the interval moves the right way on real short runs, within its bound."""

import json
import time

import pytest
from transformers import TrainerCallback

from conftest import SlowFullModel, entries, make_trainer
from open_instruct_ckpt import AutoInterval, CheckpointCallback, FullModel
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt.tiny import llama_model


class SlowSteps(TrainerCallback):
    """Real training steps made slower, so step time dwarfs the noise of a shared CPU."""

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.2)


def auto_run(tmp_path, tokenizer, strategy, **callback_args):
    callback = CheckpointCallback(strategy, interval=AutoInterval(failure_probability=1.0, **callback_args))
    trainer = make_trainer(llama_model(tokenizer), tokenizer, tmp_path, callback, max_steps=30, save_steps=10)
    trainer.add_callback(SlowSteps())
    trainer.train()
    return json.loads((tmp_path / RUN_RECORD_NAME).read_text()), {p for p in entries(tmp_path) if p.startswith("step_")}


def test_auto_interval_shortens_when_saves_are_cheap(tmp_path, tokenizer):
    record, saved = auto_run(tmp_path, tokenizer, FullModel())
    # N* = sqrt(2 T C / (P s)) with C ~ 0.05 s, s ~ 0.2 s, T = 30: about 4, below save_steps=10
    assert record["save_interval"] == "auto" and record["current_interval"] < 10
    assert "step_10" in saved and any(10 < int(name[5:]) < 20 for name in saved)
    assert not [p for p in entries(tmp_path) if p.startswith("checkpoint-")]  # skipped Trainer saves stay skipped


def test_auto_interval_lengthens_when_saves_are_slow(tmp_path, tokenizer):
    record, saved = auto_run(tmp_path, tokenizer, SlowFullModel(), max_steps=30)
    # C ~ 1.5 s: N* = sqrt(2 * 30 * 1.5 / 0.2) ~ 21 steps, above save_steps once the bound is lifted
    assert record["current_interval"] > 10
    steps = sorted(int(name[5:]) for name in saved)
    assert steps[0] == 10 and steps[1] > 20 and steps[-1] == 30  # the second save came over 10 steps later


def test_auto_interval_never_exceeds_save_steps_by_default(tmp_path, tokenizer):
    record, saved = auto_run(tmp_path, tokenizer, SlowFullModel())
    assert record["advice"]["optimal"]["steps"] > 10  # it would like longer
    assert record["current_interval"] == 10
    assert saved == {"step_10", "step_20", "step_30"}


def test_auto_interval_needs_a_step_strategy(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), interval=AutoInterval(mtbf_hours=24))
    with pytest.raises(ValueError, match=r"AutoInterval adjusts a step interval, but save_strategy='epoch'"):
        make_trainer(llama, tokenizer, tmp_path, callback, save_strategy="epoch")
