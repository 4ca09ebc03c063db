"""Launch tests/distributed/train_worker.py under torchrun (2 processes, gloo on CPU) and read its reports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
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
EXPECTED_ERROR = 3  # train_worker.py's exit status when --expect-error and the error came
ENV = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_extensions"),
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


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
        """The launch exited 0 and no rank reported an error."""
        assert self.returncode == 0, f"launch failed (rc={self.returncode}):\n{self.output[-6000:]}"
        for rank in (0, 1):
            assert "error" not in self.report(rank), f"rank {rank}: {self.report(rank)['error']}"
        return self

    def check_expected_error(self) -> "Run":
        """Launched with --expect-error: every rank reported an error and exited EXPECTED_ERROR (torchrun then fails)."""
        exit_codes = {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", self.output)}
        assert self.returncode != 0 and EXPECTED_ERROR in exit_codes, (
            f"expected exit status {EXPECTED_ERROR} (rc={self.returncode}, ranks {exit_codes}):\n{self.output[-6000:]}"
        )
        assert exit_codes <= {EXPECTED_ERROR, -15}, exit_codes  # -15: stopped by torchrun after the other rank exited
        for rank in (0, 1):
            assert "error" in self.report(rank), f"rank {rank} reported no error"
        return self


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *worker_args: str, nproc: int = 2, timeout: float = 300) -> Run:
    """Run the worker on `nproc` local processes; returns when all exit (fails the test on timeout)."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--out", str(out), *worker_args,
    ]
    started = time.perf_counter()
    torchrun = subprocess.Popen(command, env={**os.environ, **ENV}, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = torchrun.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The workers run in their own sessions: killing torchrun alone would leave them hanging.
        for pid in [*_descendants(torchrun.pid), torchrun.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = torchrun.communicate()
        (out / "launch.log").write_text(output)
        pytest.fail(f"launch {' '.join(worker_args)} timed out after {timeout:.0f} s:\n{output[-6000:]}")
    (out / "launch.log").write_text(output)
    return Run(out, torchrun.returncode, output, time.perf_counter() - started)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


def build_deepspeed_op(timeout: float = 1200) -> None:
    """Compile DeepSpeed's CPU shared-memory comm op (`deepspeed_shm_comm`) into TORCH_EXTENSIONS_DIR.

    Every DeepSpeed launch loads it when its comm backend starts (deepspeed.comm.torch.build_shm_op);
    the first build takes minutes on a loaded machine, so it is done here, outside any launch timeout.
    """
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ENV}, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"building deepspeed_shm_comm failed:\n{(done.stdout + done.stderr)[-4000:]}"


_RUNS: dict[tuple[str, ...], Run] = {}
_DEEPSPEED_ENGINES = ("zero2", "zero3")


@pytest.fixture(scope="session")
def deepspeed_op():
    """`deepspeed_op()` builds the DeepSpeed op (or finds it cached) once per session, before a timed launch needs it."""
    built: list[bool] = []

    def ensure() -> None:
        if not built:
            build_deepspeed_op()
            built.append(True)

    return ensure


@pytest.fixture(scope="session")
def launched(tmp_path_factory, deepspeed_op):
    """`launched(*worker_args)` -> the finished Run; the same arguments reuse the first launch of the session.

    Import it and the fixture it uses into a test module (`from launch import deepspeed_op, launched`);
    there is deliberately no conftest.py here, because the tests import helpers `from conftest`
    (the one in tests/).
    """

    def run(*worker_args: str) -> Run:
        engine = worker_args[worker_args.index("--engine") + 1] if "--engine" in worker_args else "zero3"
        if engine in _DEEPSPEED_ENGINES:
            deepspeed_op()
        if worker_args not in _RUNS:
            _RUNS[worker_args] = launch(tmp_path_factory.mktemp("launch"), *worker_args)
            print(f"launch {' '.join(worker_args)}: {_RUNS[worker_args].seconds:.1f} s")
        return _RUNS[worker_args]

    return run
