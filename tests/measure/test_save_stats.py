"""Each save records its statistics (phases, bytes, peak memory) in its manifest and for the callback; the step
clock leaves save time out."""

import json

from conftest import SlowFullModel
from open_instruct_ckpt import FullModel
from open_instruct_ckpt._measure.stats import PHASES, SaveStats, StepClock
from open_instruct_ckpt._write.saver import save_once


def test_manifest_and_result_carry_the_save_statistics(tmp_path, tokenizer, llama):
    saved = save_once(FullModel(), llama, tokenizer, tmp_path, "step_3", 3)
    path = saved.path
    manifest = json.loads((path / "checkpoint.json").read_text())
    written = sum(entry["bytes"] for entry in manifest["files"].values())
    recorded = manifest["stats"]
    assert recorded["bytes"] == written and recorded["peak_held_bytes"] > 0
    assert set(recorded["seconds"]) == {"prepare", "write"} and all(s > 0 for s in recorded["seconds"].values())
    stats = saved.stats
    assert (stats.name, stats.step, stats.bytes) == ("step_3", 3, written)
    assert tuple(stats.seconds) == PHASES
    assert stats.blocking_seconds == stats.total_seconds == sum(stats.seconds.values())
    assert abs(stats.seconds["write"] - recorded["seconds"]["write"]) < 1e-5
    metrics = stats.metrics()
    assert metrics["checkpoint/bytes"] == written
    assert metrics["checkpoint/gb_per_s"] == round(written / stats.total_seconds / 1e9, 4)


def test_slow_save_time_is_charged_to_the_write_phase(tmp_path, tokenizer, llama):
    stats = save_once(SlowFullModel(delay=0.3), llama, tokenizer, tmp_path, "step_1", 1).stats
    assert stats.seconds["write"] >= 0.3 > stats.seconds["prepare"]


def test_recorded_statistics_parse_back_and_malformed_ones_are_skipped():
    stats = SaveStats("step_2", 2, 100, 50, {"prepare": 0.1, "write": 0.2}, 0.3)
    assert SaveStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert SaveStats.from_dict({"name": "x", "step": "nope"}) is None
    assert SaveStats.from_dict([1, 2]) is None


def test_step_clock_excludes_save_time():
    clock = StepClock()
    clock.step_end(now=10.0)  # the first step end only starts the clock
    clock.step_end(now=10.5)
    clock.exclude(2.0)  # a save ran after this step end
    clock.step_end(now=13.0)
    assert clock.samples == [0.5, 0.5] and clock.mean == 0.5
