"""Stall reports: a background save, upload or hook that runs far longer than the last one says what it is on.

Real blocking writes: a FIFO nobody reads where the background save writes its weights, or where the hook writes;
a real S3 server (moto, in its own process) stopped with SIGSTOP in the middle of an upload. The thresholds are
short (`Stalls(floor_s=0.5, every_s=1)`); the arithmetic of the threshold is checked on a fake clock.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import boto3
import pytest
from transformers import TrainerCallback

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, Hook, Stalls, Upload, verify_checkpoint
from open_instruct_ckpt._measure.stalls import StallWatch, Task
from open_instruct_ckpt._upload.uploader import Retry
from open_instruct_ckpt._write import files

SHORT = Stalls(floor_s=0.5, factor=1, every_s=1)  # reported after max(0.5 s, the last one's time), then every 1 s


def messages(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def seconds_in(reports: list[str]) -> list[int]:
    return [int(re.search(r"has run (\d+) s", report).group(1)) for report in reports]


def test_the_threshold_is_a_multiple_of_the_last_duration_with_a_floor_and_reports_repeat_every_every_s(caplog):
    now, task = [0.0], [None]
    watch = StallWatch(floor_s=10, factor=3, every_s=60, clock=lambda: now[0])
    watch.sources = [lambda: task[0]]
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        task[0] = Task("save", "a", "the background save of step_2", "writing x", started=0.0)
        now[0] = 8.0
        watch.check()
        task[0], now[0] = None, 8.0
        watch.check()  # step_2 took 8 s: step_4 is stalled after max(10, 3 x 8) = 24 s
        task[0] = Task("save", "b", "the background save of step_4", "writing out/model.safetensors", started=100.0)
        for now[0] in (110.0, 123.0, 124.0, 150.0, 183.0, 184.0, 245.0):
            watch.check()
    reports = messages(caplog, "The background save of step_4")
    assert seconds_in(reports) == [24, 84, 145]  # at 24 s, then once every_s=60 later, while it lasts
    assert "longer than expected (24 s: 3x the last save's 8.0 s, at least Stalls(floor_s=10))" in reports[0]
    assert reports[0].endswith("it is writing out/model.safetensors")
    assert watch.expected_s("upload") == 10  # nothing measured for uploads: the floor


def test_a_background_save_blocked_on_a_fifo_is_reported_with_its_file(tmp_path, tokenizer, llama, monkeypatch,
                                                                      caplog):
    real, fifos = files.create_staging, []

    def staging_with_a_fifo(output_dir, name):
        staging = real(output_dir, name)
        if name == "step_4":  # where the save writes its weights: the write blocks until someone reads
            os.mkfifo(staging / "model.safetensors")
            fifos.append(staging / "model.safetensors")
        return staging

    def release():  # reading lets the write through; its fsync then fails on a FIFO, so the save fails
        with open(fifos[0], "rb") as pipe:
            pipe.read()

    monkeypatch.setattr(files, "create_staging", staging_with_a_fifo)
    callback = CheckpointCallback(FullModel(), async_save=True, stalls=SHORT)
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=6)

    class ReleaseAfterReports(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                threading.Timer(3.2, release).start()

    trainer.add_callback(ReleaseAfterReports())
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"), pytest.raises(CheckpointError, match="step_4"):
        trainer.train()
    reports = messages(caplog, "The background save of step_4 has run")
    assert len(reports) >= 2 and seconds_in(reports) == sorted(seconds_in(reports)), reports
    assert all(report.endswith(f"it is writing {fifos[0]}") for report in reports), reports
    [waiting] = messages(caplog, "The save of step 6 waits for")
    assert f"the background save of step_4 (writing {fifos[0]}, running" in waiting
    assert verify_checkpoint(tmp_path / "step_2") == []  # the checkpoint before it is intact


def test_a_hook_blocked_on_a_fifo_is_reported_with_its_command_and_pid(tmp_path, tokenizer, llama, caplog):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    hook = Hook(["cp", "{path}/config.json", str(fifo)], wait_s=2.5)
    callback = CheckpointCallback(FullModel(), on_published=hook, stalls=SHORT)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    reports = messages(caplog, "The on_published hook for step_2 has run")
    assert len(reports) >= 2, reports
    assert re.search(rf"it is running `cp \S+/step_2/config.json {fifo}` for step_2, \d+ s so far \(pid \d+\)$",
                     reports[0]), reports[0]


class StoppableS3:
    """A real S3 server (moto) in a process of its own: SIGSTOP makes it a store that accepts and never answers."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id="x", aws_secret_access_key="x",
                                   region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.list_buckets()
                break
            except Exception:
                assert time.monotonic() < deadline and self.process.poll() is None, "moto server did not start"
                time.sleep(0.2)
        self.bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=self.bucket)

    def close(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait()


@pytest.fixture
def s3():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "distributed"))
    from launch import free_port

    server = StoppableS3(free_port())
    yield server
    server.close()


def test_an_upload_to_a_stopped_store_is_reported_with_its_endpoint_and_train_end_says_what_it_waits_for(
        tmp_path, tokenizer, llama, s3, caplog):
    options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": s3.url},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    upload = Upload(to=f"s3://{s3.bucket}/run", storage_options=options, timeout_s=4,
                    retry=Retry(tries=1, first_delay_s=0, max_delay_s=0))
    callback = CheckpointCallback(FullModel(), upload=upload, stalls=SHORT)

    class StopTheStoreAfterStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                # the uploader's own word, not the object's presence: the store holds the manifest
                # before its answer (and the checks after it) reach the uploader
                deadline = time.monotonic() + 30
                while not any("/step_2 to" in m for m in messages(caplog, "Uploaded ")):
                    assert time.monotonic() < deadline, "step_2 was not uploaded"
                    time.sleep(0.05)
                s3.process.send_signal(signal.SIGSTOP)

    trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback)
    trainer.add_callback(StopTheStoreAfterStep2())
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        trainer.train()
    reports = messages(caplog, f"The upload of step_4 to s3://{s3.bucket}/run has run")
    assert len(reports) >= 2, [r.getMessage() for r in caplog.records]
    # the operation in flight when the store stopped: the manifest's delete, or a file's upload
    pattern = rf"it is \w+ step_4/[\w.]+( \(\d+ bytes\))? at {s3.url}, which has not answered for \d+ s$"
    assert all(re.search(pattern, report) for report in reports), reports
    [waiting] = messages(caplog, "Train end waits for uploads to")
    assert re.search(r"step_4 \(in progress: \w+ step_4/[\w.]+( \(\d+ bytes\))?, [\d.]+ s so far\), final \(queued\)",
                     waiting), waiting
    assert messages(caplog, f"Uploads to s3://{s3.bucket}/run stopped waiting: {s3.url} has not answered")
