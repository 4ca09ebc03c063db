"""Launch tests/distributed/train_worker.py under torchrun (2 processes, gloo on CPU) and read its reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("train_worker.py")
PROBE_IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


@dataclass
class Run:
    """One finished launch: its output directory, exit status, combined output and duration."""

    out: Path
    returncode: int
    output: str
    seconds: float

    @property
    def checkpoints(self) -> Path:
        return self.out / "ckpt"

    def report(self, rank: int) -> dict:
        return json.loads((self.out / "reports" / f"rank{rank}.json").read_text())

    def reference(self, step: int) -> dict:
        return torch.load(self.out / "reference" / f"step_{step}.pt")

    def check(self) -> "Run":
        assert self.returncode == 0, f"launch failed (rc={self.returncode}):\n{self.output[-6000:]}"
        return self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *worker_args: str, nproc: int = 2, timeout: float = 300) -> Run:
    """Run the worker on `nproc` local processes; returns when all exit (raises on timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"),
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--out", str(out), *worker_args,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    (out / "launch.log").write_text(done.stdout + done.stderr)
    return Run(out, done.returncode, done.stdout + done.stderr, seconds)


_RUNS: dict[tuple[str, ...], Run] = {}


@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """`launched(*worker_args)` -> the finished Run; the same arguments reuse the first launch of the session.

    Import it into a test module (`from launch import launched`); there is deliberately no
    conftest.py here, because the tests import helpers `from conftest` (the one in tests/).
    """

    def run(*worker_args: str) -> Run:
        if worker_args not in _RUNS:
            _RUNS[worker_args] = launch(tmp_path_factory.mktemp("launch"), *worker_args)
            print(f"launch {' '.join(worker_args)}: {_RUNS[worker_args].seconds:.1f} s")
        return _RUNS[worker_args]

    return run
