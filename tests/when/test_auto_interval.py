"""AutoInterval: after each save the writer's advised interval, from the measured save and step times, is adopted
within its bound (`max_steps`, else the Trainer's `save_steps`). The policy is checked with given costs, step by
step as the callback drives it; one short real run checks that the callback measures and applies it."""

import json
import time
from types import SimpleNamespace

import pytest
from transformers import TrainerCallback

from conftest import entries, make_trainer
from open_instruct_ckpt import AutoInterval, CheckpointCallback, FullModel
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt._measure.economics import RunEconomics
from open_instruct_ckpt._measure.stats import SaveStats
from open_instruct_ckpt._when.policy import AutoSchedule

ARGS = SimpleNamespace(save_strategy="steps")
STEP_SECONDS = 0.5


def saved_steps(interval: AutoInterval, save_seconds: float, max_steps: int = 30, save_steps: int = 10):
    """The steps a run saves at when every step takes STEP_SECONDS and every save blocks for `save_seconds`: the
    schedule and the economics driven as the callback drives them. Returns (steps, schedule, last advice)."""
    schedule = interval.schedule()
    economics = RunEconomics(interval.mtbf_hours, interval.failure_probability)
    state = SimpleNamespace(global_step=0, save_steps=save_steps, max_steps=max_steps)
    schedule.start(ARGS, state)
    steps, advice = [], None
    for step in range(1, max_steps + 1):
        state.global_step = step
        economics.clock.step_end(now=step * STEP_SECONDS)  # the save's own time is excluded, as the callback does
        if schedule.decide(ARGS, state, None).save:
            schedule.saved(step)
            stats = SaveStats(f"step_{step}", step, 1000, 1000, {"write": save_seconds}, save_seconds)
            advice = economics.saved(stats, max_steps, schedule.current_interval(ARGS, state))
            schedule.adopt(advice.optimal.steps if advice is not None else None)
            steps.append(step)
    return steps, schedule, advice


def test_cheap_saves_shorten_the_interval():
    # N* = sqrt(2 T C / (P s)) = sqrt(2 * 30 * 0.125 / (1 * 0.5)) = 3.87: every 4 steps after the first save
    steps, schedule, advice = saved_steps(AutoInterval(failure_probability=1.0), save_seconds=0.125)
    assert advice.optimal.steps == 4 and advice.costs.step_seconds == STEP_SECONDS
    assert steps == [10, 14, 18, 22, 26, 30]
    assert schedule.changes == [(10, 4)]


def test_slow_saves_lengthen_the_interval_up_to_max_steps():
    # C = 4 s: N* = sqrt(2 * 30 * 4 / 0.5) = 21.9, above save_steps once max_steps lifts the bound
    steps, schedule, advice = saved_steps(AutoInterval(failure_probability=1.0, max_steps=30), save_seconds=4.0)
    assert advice.optimal.steps == 22
    assert steps == [10, 30]  # the next save would be at step 32; the last step is always saved
    assert schedule.changes == [(10, 22)]


def test_the_interval_never_exceeds_save_steps_by_default():
    steps, schedule, advice = saved_steps(AutoInterval(failure_probability=1.0), save_seconds=4.0)
    assert advice.optimal.steps == 22  # it would like longer
    assert steps == [10, 20, 30] and schedule.interval == 10 and schedule.changes == []


def test_the_interval_starts_at_save_steps_and_adopts_each_proposal_within_its_bound():
    schedule = AutoSchedule(max_interval=None)
    schedule.start(ARGS, SimpleNamespace(global_step=0, save_steps=10, max_steps=100))
    assert schedule.interval == 10  # until a save has been measured
    schedule.saved(10)
    schedule.adopt(4)
    schedule.saved(14)
    schedule.adopt(None)  # nothing measured (no failure rate): the interval stays
    assert schedule.interval == 4
    schedule.saved(18)
    schedule.adopt(25)
    assert schedule.interval == 10 and schedule.changes == [(10, 4), (18, 10)]


class SlowSteps(TrainerCallback):
    """Real training steps made slower, so step time dwarfs the noise of a shared CPU."""

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.3)


def test_a_run_applies_the_interval_measured_from_its_own_saves(tmp_path, tokenizer, llama):
    # s >= 0.3 s: N* = sqrt(2 * 16 * C / (1 * s)) <= 7 for any save blocking less than about 0.5 s
    callback = CheckpointCallback(FullModel(), interval=AutoInterval(failure_probability=1.0))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=16, save_steps=8)
    trainer.add_callback(SlowSteps())
    trainer.train()
    record = json.loads((tmp_path / RUN_RECORD_NAME).read_text())
    assert record["save_interval"] == "auto" and record["current_interval"] < 8
    steps = sorted(int(name[5:]) for name in entries(tmp_path) if name.startswith("step_"))
    assert steps[0] == 8 and any(8 < step < 16 for step in steps) and steps[-1] == 16
    assert not [p for p in entries(tmp_path) if p.startswith("checkpoint-")]  # skipped Trainer saves stay skipped


def test_auto_interval_needs_a_step_strategy(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), interval=AutoInterval(mtbf_hours=24))
    with pytest.raises(ValueError, match=r"AutoInterval adjusts a step interval, but save_strategy='epoch'"):
        make_trainer(llama, tokenizer, tmp_path, callback, save_strategy="epoch")
