"""Preemption across 2 real ranks (gloo on CPU, DDP through the Trainer, 2 DataLoader workers each).

A signal reaches every rank and every DataLoader worker while training runs; the ranks must agree
on one step, save `step_<N>` once, stop, and exit 0 without writing `final/`.

How the signal reaches the processes matters, and these tests pin the two deliveries that work:

* one process group holding the ranks (e.g. `srun` starting one task per rank): `os.killpg`;
* torchrun, which starts every worker in its own session, so a `killpg` on torchrun's group never
  reaches the ranks. A batch system that signals every process of the job (SLURM's cgroup process
  tracking does) does reach them; torchrun itself must then ignore SIGUSR1 (`trap '' USR1` before
  it), or it dies of it. Workers inherit the ignored disposition and our handler replaces it.

SIGTERM is not tested here because it does not work with DataLoader workers: a worker that gets
SIGTERM from anyone but its parent dies of it and the rank fails with "DataLoader worker ... is
killed by signal: Terminated" (torchrun also forwards SIGTERM to each worker's process group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from launch import ENV, REPO, free_port
from open_instruct_ckpt import verify_checkpoint

pytestmark = pytest.mark.distributed

SCRIPT = REPO / "tests" / "fault_scripts" / "train.py"
STARTUP_TIMEOUT = 240  # two ranks import torch/transformers on 2 shared cores
EXIT_TIMEOUT = 120


def _ignore_sigusr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # what `trap '' USR1` does before torchrun


def _start_ranks_in_one_group(out: Path, work: Path) -> list[subprocess.Popen]:
    """Two ranks started directly (no torchrun), both in a new process group led by rank 0."""
    port, ranks = str(free_port()), []
    for rank in (0, 1):
        env = {**os.environ, **ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        group = 0 if rank == 0 else ranks[0].pid
        log = open(work / f"log{rank}", "w")  # noqa: SIM115  (closed by the child's exit)
        ranks.append(subprocess.Popen([sys.executable, SCRIPT, out, work], env=env, cwd=REPO, stdout=log,
                                      stderr=subprocess.STDOUT, process_group=group))
    return ranks


def _start_torchrun(out: Path, work: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT, out, work]
    log = open(work / "log0", "w")  # noqa: SIM115
    return subprocess.Popen(command, env={**os.environ, **ENV}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_ignore_sigusr1)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _wait_until_training(processes: list[subprocess.Popen], work: Path) -> None:
    """Until both ranks finished step 3 (their DataLoader workers exist), then a little longer."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not all((work / f"step3-{rank}").exists() for rank in (0, 1)):
        assert all(p.poll() is None for p in processes), _logs(work)
        assert time.monotonic() < deadline, "ranks did not reach step 3\n" + _logs(work)
        time.sleep(0.1)
    time.sleep(1.0)


def _wait_for_exit(processes: list[subprocess.Popen], work: Path) -> list[int]:
    try:
        return [p.wait(timeout=EXIT_TIMEOUT) for p in processes]
    except subprocess.TimeoutExpired:
        pytest.fail("ranks did not stop after the signal\n" + _logs(work))


def _logs(work: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(work.glob("log*")))


def _check_stopped_together(out: Path, work: Path, returncodes: list[int]) -> None:
    assert returncodes == [0] * len(returncodes), _logs(work)
    reports = [json.loads((work / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    step = reports[0]["step"]
    for report in reports:
        assert report["wrapped"] == "DistributedDataParallel"
        assert report["preempted"] and report["step"] == step
        workers = report["children"]  # this rank's DataLoader workers when training was told to stop
        assert len(workers) == 2 and all(w["state"] in ("S", "R") and w["usr1_caught"] for w in workers), report
    assert 3 < step < 100_000
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"step_{step}"]
    assert verify_checkpoint(out / f"step_{step}") == []
    model = AutoModelForCausalLM.from_pretrained(out / f"step_{step}")
    assert model.num_parameters() > 0


@pytest.mark.parametrize("target", ["process group", "rank 1 only"])
def test_sigusr1_saves_one_step_all_ranks_agree_on(tmp_path, target):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    ranks = _start_ranks_in_one_group(out, work)
    try:
        _wait_until_training(ranks, work)
        if target == "process group":
            os.killpg(ranks[0].pid, signal.SIGUSR1)  # both ranks and their 4 DataLoader workers
        else:
            os.kill(ranks[1].pid, signal.SIGUSR1)  # rank 0, the writer, learns of it only through the all-reduce
        returncodes = _wait_for_exit(ranks, work)
    finally:
        if any(rank.poll() is None for rank in ranks):
            os.killpg(ranks[0].pid, signal.SIGKILL)
    _check_stopped_together(out, work, returncodes)


def test_sigusr1_to_every_process_under_torchrun_that_ignores_it(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    torchrun = _start_torchrun(out, work)
    try:
        _wait_until_training([torchrun], work)
        for pid in [torchrun.pid, *_descendants(torchrun.pid)]:  # as SLURM's cgroup tracking delivers it
            os.kill(pid, signal.SIGUSR1)
        returncodes = _wait_for_exit([torchrun], work)
    finally:
        if torchrun.poll() is None:
            for pid in [torchrun.pid, *_descendants(torchrun.pid)]:
                os.kill(pid, signal.SIGKILL)
    _check_stopped_together(out, work, returncodes)
