"""Save metrics reach the Trainer's loggers; the run records its costs and advice; the auto interval
moves the right way on real short runs."""

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback, TrainerState

from conftest import SlowFullModel, entries, make_trainer
from open_instruct_ckpt import AutoInterval, CheckpointCallback, FullModel, TrainerInterval
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt._measure.economics import RunEconomics
from open_instruct_ckpt._measure.metrics import TrainerLog
from open_instruct_ckpt._measure.stats import SaveStats
from open_instruct_ckpt._write.plan import SmallFile
from open_instruct_ckpt.tiny import llama_model

METRICS = ("checkpoint/save_seconds", "checkpoint/blocking_seconds", "checkpoint/bytes", "checkpoint/gb_per_s")


class SlowSteps(TrainerCallback):
    """Real training steps made slower, so step time dwarfs the noise of a shared CPU."""

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.2)


def manifest_bytes(path: Path) -> int:
    return sum(e["bytes"] for e in json.loads((path / "checkpoint.json").read_text())["files"].values())


def test_save_metrics_reach_log_history_at_each_save(tmp_path, tokenizer, llama):
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "checkpoint/bytes" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(set(METRICS) <= set(entry) for entry in logged)
    assert logged[0]["checkpoint/bytes"] == manifest_bytes(tmp_path / "step_2")
    assert logged[0]["checkpoint/save_seconds"] >= logged[0]["checkpoint/blocking_seconds"] > 0


def test_save_metrics_reach_tensorboard(tmp_path, tokenizer, llama):
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), report_to=["tensorboard"],
                           logging_steps=1)
    trainer.train()
    (events,) = {path.parent for path in tmp_path.glob("runs/*/events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    tags = scalars.Tags()["scalars"]
    assert {f"train/{name}" for name in METRICS} <= set(tags)
    assert [event.step for event in scalars.Scalars("train/checkpoint/bytes")] == [2, 4]
    assert scalars.Scalars("train/checkpoint/bytes")[0].value == manifest_bytes(tmp_path / "step_2")
    # the Trainer's own loss log at those steps still happens
    assert [event.step for event in scalars.Scalars("train/loss")] == [1, 2, 3, 4]


def test_metrics_fall_back_to_log_history_without_a_trainer():
    state = TrainerState(global_step=7)
    TrainerLog().emit({"checkpoint/bytes": 5}, state, control=None)
    assert state.log_history == [{"checkpoint/bytes": 5, "step": 7}]


def test_run_record_beside_the_checkpoints_with_advice(tmp_path, tokenizer, llama, caplog):
    callback = CheckpointCallback(FullModel(), interval=TrainerInterval(mtbf_hours=0.001))
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, callback, max_steps=6, save_steps=2).train()
    record = json.loads((tmp_path / RUN_RECORD_NAME).read_text())
    assert [save["step"] for save in record["saves"]] == [2, 4, 6]
    assert record["saves"][0]["bytes"] == manifest_bytes(tmp_path / "step_2")
    assert record["total_steps"] == 6 and record["current_interval"] == 2 and record["mtbf_hours"] == 0.001
    assert record["mean_step_seconds"] > 0 and record["steps_timed"] == 5
    assert 1 <= record["advice"]["optimal"]["steps"] <= 6
    assert record["advice"]["current"]["steps"] == 2
    at_end = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Checkpoint economics at train end")]
    assert len(at_end) == 1 and "optimal interval:" in at_end[0]
    assert not list(tmp_path.glob(f"{RUN_RECORD_NAME}.*"))  # no temporary left behind


def test_no_failure_rate_still_records_measurements_without_advice(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    record = json.loads((tmp_path / RUN_RECORD_NAME).read_text())
    assert len(record["saves"]) == 2 and record["advice"] is None


def test_advice_is_logged_once_when_the_optimum_holds_still(caplog):
    economics = RunEconomics(mtbf_hours=1.0, failure_probability=None)
    for now in (0.0, 1.0, 2.0):
        economics.clock.step_end(now=now)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        economics.saved(SaveStats("step_2", 2, 10, 10, {"write": 2.0}, 2.0), 10_000, 10)
        economics.saved(SaveStats("step_4", 4, 10, 10, {"write": 8.0}, 8.0), 10_000, 10)  # optimum doubles
        assert not [r for r in caplog.records if "stable" in r.getMessage()]
        economics.saved(SaveStats("step_6", 6, 10, 10, {"write": 5.0}, 5.0), 10_000, 10)  # mean 5 s: optimum as before
        economics.saved(SaveStats("step_8", 8, 10, 10, {"write": 5.0}, 5.0), 10_000, 10)
    stable = [r.getMessage() for r in caplog.records if "stable" in r.getMessage()]
    assert len(stable) == 1 and "after 3 saves" in stable[0]


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


def test_progress_bar_follows_disable_tqdm(tmp_path, tokenizer, capsys):
    for name, disable in (("shown", False), ("hidden", True)):
        make_trainer(llama_model(tokenizer), tokenizer, tmp_path / name, CheckpointCallback(SlowFullModel(delay=1.3)),
                     max_steps=2, disable_tqdm=disable).train()
        err = capsys.readouterr().err
        assert ("saving step_2" in err) is not disable


@dataclass(frozen=True)
class SlowPersistFullModel(FullModel):
    """The background half of an async save (writing the small files) takes a second; the snapshot is as fast."""

    def plan(self, model, final=False):
        plan = super().plan(model, final)
        slow = SmallFile("a slow disk", lambda directory: time.sleep(1.0))
        return dataclasses.replace(plan, small_files=(*plan.small_files, slow))


def test_async_saves_are_measured_once_each_when_their_verdict_is_taken(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(SlowPersistFullModel(), async_save=True, interval=TrainerInterval(mtbf_hours=1.0))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=4, save_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "checkpoint/bytes" in entry]
    assert [entry["checkpoint/bytes"] for entry in logged] == [manifest_bytes(tmp_path / n) for n in ("step_2", "step_4")]
    assert all(entry["checkpoint/save_seconds"] - entry["checkpoint/blocking_seconds"] >= 0.9 for entry in logged)
    saves = json.loads((tmp_path / RUN_RECORD_NAME).read_text())["saves"]
    assert [save["step"] for save in saves] == [2, 4]
    assert all(save["blocking_seconds"] < save["total_seconds"] - 0.9 for save in saves)


def test_a_failing_advisor_after_a_published_save_only_warns(tmp_path, tokenizer, llama, monkeypatch, caplog):
    from open_instruct_ckpt._measure import advisor as _advisor

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(_advisor, "advise", broken)
    callback = CheckpointCallback(FullModel(), interval=AutoInterval(mtbf_hours=24))
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, callback, max_steps=6, save_steps=2).train()
    assert entries(tmp_path) == {"step_2", "step_4", "step_6", "final"}
    warned = [r.getMessage() for r in caplog.records if "measuring it failed (ZeroDivisionError" in r.getMessage()]
    assert len(warned) == 3 and "train-end advice failed (ZeroDivisionError" in caplog.text
