"""Save metrics reach the Trainer's loggers (log_history, a real TensorBoard event file) at each save's step."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerState

from conftest import make_trainer, manifest_bytes
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt._measure.metrics import TrainerLog

METRICS = ("checkpoint/save_seconds", "checkpoint/blocking_seconds", "checkpoint/bytes", "checkpoint/gb_per_s")


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
