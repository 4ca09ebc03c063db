"""Two simulated nodes on one machine: two `torchrun --nnodes 2 --node_rank N` launches that rendezvous on 127.0.0.1.

With `private_disks`, each launch starts inside its own mount namespace (`unshare -m`, root only) where a tmpfs
of its own is mounted at the same `disk` path, so each "node" has a private disk at the same path, as on a
cluster with node-local scratch. A namespace's tmpfs vanishes with its last process, so the launch copies it
(`cp -a`, hard links kept) to `<out>/node<N>/` once torchrun has exited: that is what the node's disk held.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch import ENV, REPO, free_port

WORKER = Path(__file__).with_name("nodes_worker.py")
_BIN = Path(sys.executable).with_name("torchrun")  # the console script of this interpreter's torch
_TORCHRUN = [str(_BIN)] if _BIN.is_file() else [sys.executable, "-m", "torch.distributed.run"]
EXPECTED_ERROR = 3
DISK_MB = 64


def node_local_disks_unavailable() -> str | None:
    """Why two private tmpfs disks cannot be simulated here (None when they can)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to give each simulated node its own tmpfs in a mount namespace (unshare -m)"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs mount failed here: {probe.stderr.strip()}"
    return None


@dataclass
class NodesRun:
    out: Path
    returncodes: list[int]
    output: str
    seconds: float
    ranks: int

    def node_disk(self, node: int) -> Path:
        return self.out / f"node{node}"

    def report(self, rank: int) -> dict:
        return json.loads((self.out / "reports" / f"rank{rank}.json").read_text())

    def reports(self) -> list[dict]:
        return [self.report(rank) for rank in range(self.ranks)]

    def check(self) -> NodesRun:
        assert self.returncodes == [0] * len(self.returncodes), f"rc={self.returncodes}:\n{self.output[-8000:]}"
        for report in self.reports():
            assert "error" not in report, f"rank {report['rank']}: {report['error']}\n{report.get('traceback')}"
        return self

    def check_expected_error(self) -> NodesRun:
        """Every rank of every node reported an error and exited EXPECTED_ERROR."""
        codes = {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", self.output)}
        assert all(rc != 0 for rc in self.returncodes) and EXPECTED_ERROR in codes, (self.returncodes, codes,
                                                                                     self.output[-8000:])
        for report in self.reports():
            assert "error" in report, f"rank {report['rank']} reported no error"
        return self


def launch_nodes(out: Path, disk: Path, *worker_args: str, nproc: int = 2, private_disks: bool = True,
                 timeout: float = 300) -> NodesRun:
    """Start both nodes at once and wait for both; fails the test on a timeout (killing every process)."""
    out.mkdir(parents=True, exist_ok=True)
    disk.mkdir(parents=True, exist_ok=True)
    port, env = str(free_port()), {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started, nodes = time.perf_counter(), []
    for node in (0, 1):
        # The README's SLURM recipe runs this line on each node (srun): torchrun ignores SIGUSR1, the workers catch it.
        torchrun = [*_TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", str(nproc),
                    "--master_addr", "127.0.0.1", "--master_port", port, str(WORKER), "--out", str(out),
                    "--disk", str(disk), *worker_args]
        recipe = ["bash", "-c", "trap '' USR1; exec \"$@\"", "bash", *torchrun]
        command = _in_private_disk(recipe, disk, out / f"node{node}") if private_disks else recipe
        log = open(out / f"node{node}.log", "w")  # noqa: SIM115  (closed by the child's exit)
        nodes.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        returncodes = [node.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        output = _kill_all(nodes, out)
        pytest.fail(f"2-node launch {' '.join(worker_args)} timed out after {timeout:.0f} s:\n{output[-8000:]}")
    output = "".join((out / f"node{node}.log").read_text() for node in (0, 1))
    return NodesRun(out, returncodes, output, time.perf_counter() - started, 2 * nproc)


def _in_private_disk(command: list[str], disk: Path, snapshot: Path) -> list[str]:
    """`command` in a new mount namespace with a fresh tmpfs on `disk`, copied to `snapshot` after it exits."""
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 90; disk="$2" snapshot="$3"; shift 3; '
              '"$@"; status=$?; cp -a "$disk" "$snapshot" || status=91; exit $status')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", f"{DISK_MB}m", str(disk),
            str(snapshot), *command]


def _kill_all(nodes: list[subprocess.Popen], out: Path) -> str:
    for node in nodes:
        for pid in [*_descendants(node.pid), node.pid]:  # torchrun's workers run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait()
    return "".join((out / f"node{n}.log").read_text() for n in (0, 1))


def _descendants(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *_descendants(int(child))]
    return found
