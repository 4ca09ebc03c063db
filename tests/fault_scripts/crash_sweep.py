"""Crash-injection sweep: for every k, a forked child runs a save scenario and SIGKILLs itself after
the k-th file operation; the parent then checks the output_dir, reads it like a user would, and
restarts a run in it. Imports happen once here; every child is a fresh fork of this process.

Usage: python crash_sweep.py SCENARIO WORKDIR [STRIDE]   (writes WORKDIR/result.json)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import invariants  # noqa: E402
import ops  # noqa: E402
import scenarios  # noqa: E402

from open_instruct_ckpt import complete_checkpoints, latest_checkpoint  # noqa: E402
from open_instruct_ckpt._format.manifest import is_checkpoint_name  # noqa: E402


def in_child(work, output_dir: Path, crash_at: int | None, log_path: Path | None = None) -> str:
    """Run `work(output_dir)` in a forked child; returns 'killed', 'exited 0' or the failure."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            counter = ops.install(output_dir, crash_at) if crash_at is not None or log_path else None
            work(output_dir)
            if log_path is not None:
                log_path.write_text(json.dumps(counter.log))
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exited {os.WEXITSTATUS(status)}"


def expected_present(log: list, k: int) -> set[str]:
    """Checkpoint names readers must find once the first k operations ran (an orphaned `.old-` copy
    stands in for its name until the next run renames it back)."""
    present: set[str] = set()
    for index, op, path, target in log[:k]:
        if op != "rename":
            continue
        source, destination = Path(path).name, Path(target).name
        if source.startswith(".tmp-") and is_checkpoint_name(destination):
            present.add(destination)
        if is_checkpoint_name(source) and destination.startswith(".trash-"):
            present.discard(source)
    return present


def check_k(run, restart, work: Path, k: int, log: list) -> dict:
    output_dir, reader_dir = work / f"k{k:03d}", work / f"k{k:03d}-reader"
    output_dir.mkdir()
    record = {"k": k, "op": log[k - 1][1:3] if k <= len(log) else None, "outcome": in_child(run, output_dir, k)}
    record["temporaries"] = invariants.temporaries(output_dir)
    record["orphans"] = invariants.orphans(output_dir)
    record["problems"] = invariants.checkpoint_problems(output_dir)
    shutil.copytree(output_dir, reader_dir, symlinks=True)
    before = invariants.listing(reader_dir)
    latest = latest_checkpoint(reader_dir)
    record["latest"] = latest.name if latest else None
    visible = {manifest["name"] for _, manifest in complete_checkpoints(reader_dir)}
    record["missing"] = sorted(expected_present(log, k) - visible)
    record["reader_modified"] = invariants.listing(reader_dir) != before
    record["reader_problems"] = invariants.checkpoint_problems(reader_dir)
    record["restart"] = in_child(restart, output_dir, None)
    record["after_restart_temporaries"] = invariants.temporaries(output_dir)
    record["after_restart_problems"] = invariants.checkpoint_problems(output_dir)
    latest = latest_checkpoint(output_dir)
    record["after_restart_latest"] = latest.name if latest else None
    shutil.rmtree(output_dir)
    shutil.rmtree(reader_dir)
    return record


def main(scenario: str, work: Path, stride: int = 1) -> None:
    torch.set_num_threads(1)
    run, restart = scenarios.SCENARIOS[scenario]
    started = time.perf_counter()
    log_path = work / "count.json"
    (work / "count").mkdir()
    counted = in_child(run, work / "count", None, log_path)
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    first_publish = next((i for i in range(1, len(log) + 1) if expected_present(log, i)), None)
    ks = list(range(1, len(log) + 1, stride)) + ([len(log)] if (len(log) - 1) % stride else [])
    records = [check_k(run, restart, work, k, log) for k in ks]
    (work / "result.json").write_text(json.dumps({
        "counting_run": counted, "ops": len(log), "first_publish": first_publish, "log": log,
        "records": records, "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
