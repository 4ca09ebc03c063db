"""Kill a real training process (Trainer.train(), a save every step) with SIGKILL at random times,
again and again in one output_dir, like a preemptible machine; check the output_dir after each kill.
Each run is a fork of this process (imports paid once), started after the previous one was killed.
Every other kill waits, after its random delay, until a save's staging directory appears, so that
kills inside a save do not depend on how fast this machine saves relative to a training step.

Usage: python random_kills.py WORKDIR KILLS SEED   (writes WORKDIR/result.json)
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invariants  # noqa: E402
import scenarios  # noqa: E402
from crash_sweep import in_child  # noqa: E402

from open_instruct_ckpt import latest_checkpoint  # noqa: E402


class MarkStarted(TrainerCallback):
    """Touches a file once training (after start-up recovery) has begun."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_train_begin(self, args, state, control, **kwargs):
        self.marker.touch()


def start_training(output_dir: Path, marker: Path) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            scenarios.trainer_run(output_dir, max_steps=10_000, keep_last=2, extra_callbacks=(MarkStarted(marker),))
        finally:
            os._exit(1)  # killed long before 10,000 steps
    return pid


def wait_for_staging(output_dir: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(entry.name.startswith(".tmp-step_") for entry in os.scandir(output_dir)):
            return


def kill_once(output_dir: Path, marker: Path, delay: float, inside_a_save: bool) -> dict:
    marker.unlink(missing_ok=True)
    pid = start_training(output_dir, marker)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if inside_a_save:
        wait_for_staging(output_dir)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = invariants.temporaries(output_dir)
    record = {
        "delay": round(delay, 3), "aimed_inside_a_save": inside_a_save, "temporaries": left,
        "names": invariants.checkpoint_names(output_dir),
        "mid_save": any(not name.startswith(".tmp-probe-") for name in left),
        "problems": invariants.checkpoint_problems(output_dir),
    }
    latest = latest_checkpoint(output_dir)
    record["latest"] = latest.name if latest else None
    record["reader_problems"] = invariants.checkpoint_problems(output_dir)
    return record


def main(work: Path, kills: int, seed: int) -> None:
    torch.set_num_threads(1)
    rng, output_dir, marker = random.Random(seed), work / "run", work / "started"
    output_dir.mkdir()
    started = time.perf_counter()
    records = [kill_once(output_dir, marker, rng.uniform(0.0, 2.5), inside_a_save=k % 2 == 1) for k in range(kills)]
    restart = in_child(lambda out: scenarios.trainer_run(out, max_steps=3, keep_last=2), output_dir, None)
    latest = latest_checkpoint(output_dir)
    (work / "result.json").write_text(json.dumps({
        "records": records, "restart": restart, "after_restart_temporaries": invariants.temporaries(output_dir),
        "after_restart_problems": invariants.checkpoint_problems(output_dir),
        "after_restart_latest": latest.name if latest else None, "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
