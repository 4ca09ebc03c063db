"""A Trainer whose TrainingArguments disagree with torch.distributed about the ranks is refused when it is built,
with what happened and the fix, instead of every rank writing as if it were alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch import ENV, REPO, free_port

pytestmark = pytest.mark.distributed


def test_world_size_disagreement_is_refused_when_the_trainer_is_built(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / "tests/distributed/world_size_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, **ENV}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 1 and report["should_save"] and report["ranks"] == 2  # the misconfiguration
        assert "TrainingArguments sees world_size=1" in report["error"] and "the job runs 2 ranks" in report["error"]
        assert "PartialState(backend='gloo')" in report["error"]
    assert not list((tmp_path / "ckpt").glob("*"))  # nothing written
