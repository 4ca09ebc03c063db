"""The run records its measured costs and the advice beside the checkpoints; advice is logged once stable and at
train end; async saves are measured once each; a failing advisor after a published save only warns."""

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from conftest import entries, make_trainer, manifest_bytes
from open_instruct_ckpt import AutoInterval, CheckpointCallback, FullModel, TrainerInterval
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt._measure.economics import RunEconomics
from open_instruct_ckpt._measure.stats import SaveStats
from open_instruct_ckpt._write.plan import SmallFile


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
