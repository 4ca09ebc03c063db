"""Uploads to object storage: a real S3-protocol server (moto, on 127.0.0.1) with s3fs as the client.

Faults are injected by wrapping s3fs's one request method (`_call_s3`), which also records the
order of requests; everything else is real: the server, the HTTP requests, the Trainer. A hung
store is a real TCP endpoint on 127.0.0.1 that accepts connections and never answers.
"""

import base64
import hashlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import boto3
import fsspec
import pytest
import torch
from fsspec.asyn import sync_wrapper
from moto.server import ThreadedMotoServer
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import entries, logits, make_trainer, saver_for
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, Upload, verify_checkpoint
from open_instruct_ckpt._upload import fsspec_target as _remote
from open_instruct_ckpt._upload.uploader import Retry

FAST = Retry(tries=3, first_delay_s=0.05, max_delay_s=0.2)


@pytest.fixture(scope="module")
def endpoint():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class Bucket:
    """A fresh bucket on the moto server, and a plain boto3 client to look at it independently of s3fs."""

    def __init__(self, endpoint):
        self.name = f"test-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                                   region_name="us-east-1")
        self.client.create_bucket(Bucket=self.name)
        self.options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint},
                        "config_kwargs": {"retries": {"max_attempts": 1}}}

    def url(self, prefix="run"):
        return f"s3://{self.name}/{prefix}"

    def list_keys(self, prefix="run/"):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}

    def tree(self, prefix="run/"):
        tree = {}
        for key in self.list_keys(prefix):
            name, _, file = key.partition("/")
            tree.setdefault(name, set()).add(file)
        return tree

    def empty_and_delete(self):
        for key in self.list_keys(""):
            self.client.delete_object(Bucket=self.name, Key=key)
        self.client.delete_bucket(Bucket=self.name)


@pytest.fixture
def bucket(endpoint):
    return Bucket(endpoint)


class StallingEndpoint:
    """A TCP endpoint on 127.0.0.1 that relays to `upstream` (host, port) until `stall()`, at once if there is none.

    Stalled, it is a hung store: it accepts connections and holds them open, never reading a request or answering.
    """

    def __init__(self, upstream=None):
        self.upstream, self.stalled, self.held = upstream, threading.Event(), []
        if upstream is None:
            self.stalled.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self):
        self.stalled.set()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        for sock in [self.listener, *self.held]:
            sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(client)
            if not self.stalled.is_set():
                server = socket.create_connection(self.upstream)
                self.held.append(server)
                threading.Thread(target=self._relay, args=(client, server, True), daemon=True).start()
                threading.Thread(target=self._relay, args=(server, client, False), daemon=True).start()

    def _relay(self, source, sink, request):
        try:
            while data := source.recv(65536):
                if request and self.stalled.is_set():
                    return  # the request is never passed on, nor the connection closed
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def hung():
    stalling = StallingEndpoint()
    yield stalling
    stalling.close()


@pytest.fixture
def relay(endpoint):
    stalling = StallingEndpoint(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
    yield stalling
    stalling.close()


def s3_callback(bucket, **kwargs):
    return CheckpointCallback(FullModel(), upload=Upload(to=bucket.url(), storage_options=bucket.options, retry=FAST),
                              **kwargs)


def fs_for(url, options=None):
    """The fsspec filesystem an upload to `url` uses: fsspec caches one instance per protocol and options."""
    return fsspec.core.url_to_fs(url, **(options or {}))[0]


def record_requests(monkeypatch, url, options, fault=None):
    """Record (operation, key) of every request the uploader's s3fs makes; `fault(op, kwargs)` may raise."""
    fs = fs_for(url, options)
    real, calls = fs._call_s3, []

    async def call(method, *args, **kwargs):
        calls.append((method, kwargs.get("Key", "")))
        if fault is not None:
            fault(method, kwargs)
        return await real(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", call)
    monkeypatch.setattr(fs, "call_s3", sync_wrapper(call, obj=fs))
    return calls


def local_files(path):
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name.startswith("open_instruct_ckpt")]


# -- a run, end to end -----------------------------------------------------------------------------

def test_run_uploads_every_checkpoint_manifest_last_and_the_download_loads(tmp_path, tokenizer, llama, bucket,
                                                                           monkeypatch, caplog):
    callback = s3_callback(bucket)
    calls = record_requests(monkeypatch, bucket.url(), bucket.options)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()

    tree = bucket.tree()  # train() returned: it waited for the last upload
    assert set(tree) == {"step_2", "step_4", "final"}
    for name, files in tree.items():
        assert files == local_files(tmp_path / "out" / name)
        touching = [(op, key) for op, key in calls if key.startswith(f"run/{name}/")]
        assert touching[0] == ("delete_object", f"run/{name}/checkpoint.json")
        puts = [key for op, key in touching if op == "put_object"]
        assert puts[-1] == f"run/{name}/checkpoint.json" and puts.count(puts[-1]) == 1
    head = bucket.client.head_object(Bucket=bucket.name, Key="run/final/model.safetensors", ChecksumMode="ENABLED")
    local = (tmp_path / "out" / "final" / "model.safetensors").read_bytes()
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == hashlib.sha256(local).hexdigest()
    uploaded = [m for m in messages(caplog) if m.startswith("Uploaded ")]
    assert len(uploaded) == 3 and " bytes in " in uploaded[-1] and bucket.url() in uploaded[-1]

    fs = fs_for(bucket.url(), bucket.options)
    fs.get(f"{bucket.name}/run/final/", str(tmp_path / "download") + "/", recursive=True)
    assert verify_checkpoint(tmp_path / "download") == []
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "download")
    assert torch.equal(logits(loaded, tokenizer), logits(llama, tokenizer))
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "download")
    assert reloaded("the model saves")["input_ids"] == tokenizer("the model saves")["input_ids"]


class WaitForUpload(TrainerCallback):
    """After each save, wait (bounded) until the remote shows its manifest: makes the order deterministic."""

    def __init__(self, bucket):
        self.bucket = bucket

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.save_steps == 0:
            deadline = time.monotonic() + 30
            while f"step_{state.global_step}/checkpoint.json" not in self.bucket.list_keys():
                assert time.monotonic() < deadline, f"step_{state.global_step} was not uploaded within 30 s"
                time.sleep(0.02)


def test_remote_retention_mirrors_keep_last_deleting_the_manifest_first(tmp_path, tokenizer, llama, bucket,
                                                                        monkeypatch):
    callback = s3_callback(bucket)
    calls = record_requests(monkeypatch, bucket.url(), bucket.options)
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=6, save_steps=1, save_total_limit=2)
    trainer.add_callback(WaitForUpload(bucket))
    trainer.train()

    assert entries(tmp_path) == {"step_5", "step_6", "final"}
    assert set(bucket.tree()) == {"step_5", "step_6", "final"}
    for step in (1, 2, 3, 4):
        touching = [(op, key) for op, key in calls if key.startswith(f"run/step_{step}/")]
        last_put = max(i for i, (op, _) in enumerate(touching) if op == "put_object")
        deletes = [key for op, key in touching[last_put + 1:] if op == "delete_object"]
        assert deletes[0] == f"run/step_{step}/checkpoint.json"  # a half-deleted one never looks complete
        assert {key.rsplit("/", 1)[1] for key in deletes} == local_files(tmp_path / "final")


# -- interruptions and failures ---------------------------------------------------------------------

def test_upload_interrupted_midway_is_completed_by_a_retry_and_never_looks_complete(tmp_path, tokenizer, llama,
                                                                                   bucket, monkeypatch, caplog):
    seen_at_fault = []

    def reset_once(method, kwargs):
        if method == "put_object" and kwargs["Key"] == "run/step_2/model.safetensors" and not seen_at_fault:
            seen_at_fault.append(bucket.tree().get("step_2", set()))
            raise ConnectionResetError("connection reset by peer (injected)")

    callback = s3_callback(bucket)
    calls = record_requests(monkeypatch, bucket.url(), bucket.options, reset_once)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, callback).train()

    assert seen_at_fault == [{"config.json", "generation_config.json"}]  # midway, and no manifest
    assert bucket.tree()["step_2"] == local_files(tmp_path / "step_2")
    puts = [key for op, key in calls if op == "put_object"]
    assert puts.count("run/step_2/model.safetensors") == 2  # the failed one, then the retry
    assert puts.count("run/step_2/config.json") == 1  # the retry resumed: no file sent twice
    assert any("attempt 1 of 3 failed (ConnectionResetError" in m for m in messages(caplog))
    assert not [m for m in messages(caplog, logging.WARNING) if "upload" in m.lower()]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_an_object_stored_differently_from_the_manifest_is_uploaded_again(tmp_path, tokenizer, llama, bucket,
                                                                          monkeypatch, caplog, damage):
    damaged = []

    def corrupt_once(method, kwargs):
        if method == "put_object" and kwargs["Key"] == "run/step_2/model.safetensors" and not damaged:
            body = bytearray(kwargs["Body"])
            body = body[:-1] if damage == "truncate" else body[:-1] + bytes([body[-1] ^ 1])
            kwargs["Body"] = bytes(body)
            damaged.append(len(body))

    callback = s3_callback(bucket)
    record_requests(monkeypatch, bucket.url(), bucket.options, corrupt_once)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, callback, max_steps=2).train()

    assert damaged
    stored = bucket.client.get_object(Bucket=bucket.name, Key="run/step_2/model.safetensors")["Body"].read()
    assert stored == (tmp_path / "step_2" / "model.safetensors").read_bytes()
    reason = "bytes stored, " if damage == "truncate" else "the store's sha256"
    assert any("attempt 1 of 3 failed (UploadMismatch" in m and reason in m for m in messages(caplog))


def test_objects_too_large_for_one_put_go_through_s3fs_and_are_checked_by_size(tmp_path, tokenizer, llama, bucket,
                                                                               monkeypatch):
    monkeypatch.setattr(_remote, "SINGLE_PUT_BYTES", 0)  # every file takes the path of multi-GB shards
    callback = s3_callback(bucket)
    calls = record_requests(monkeypatch, bucket.url(), bucket.options)
    make_trainer(llama, tokenizer, tmp_path, callback, max_steps=2).train()
    assert bucket.tree()["step_2"] == local_files(tmp_path / "step_2")
    assert ("put_object", "run/step_2/model.safetensors") in calls
    head = bucket.client.head_object(Bucket=bucket.name, Key="run/step_2/model.safetensors", ChecksumMode="ENABLED")
    assert "ChecksumSHA256" not in head  # size is all that is compared for these
    fs = fs_for(bucket.url(), bucket.options)
    fs.get(f"{bucket.name}/run/step_2/", str(tmp_path / "download") + "/", recursive=True)
    assert verify_checkpoint(tmp_path / "download") == []


class DeleteBucket(TrainerCallback):
    """A real failure: the bucket disappears after the start-up check; optionally back after step 3."""

    def __init__(self, bucket, caplog, restore_after_failure):
        self.bucket, self.caplog, self.restore = bucket, caplog, restore_after_failure

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.bucket.empty_and_delete()

    def on_step_end(self, args, state, control, **kwargs):
        if self.restore and state.global_step == 3:
            deadline = time.monotonic() + 30
            while not any("step_2" in m and "failed after" in m for m in messages(self.caplog, logging.WARNING)):
                assert time.monotonic() < deadline, "the step_2 upload did not fail within 30 s"
                time.sleep(0.02)
            self.bucket.client.create_bucket(Bucket=self.bucket.name)


def train_while_the_bucket_is_gone(tmp_path, tokenizer, llama, bucket, caplog, restore_after_failure):
    """A 4-step run uploading to `bucket`, deleted after the start-up check; training must reach its end."""
    trainer = make_trainer(llama, tokenizer, tmp_path, s3_callback(bucket))
    trainer.add_callback(DeleteBucket(bucket, caplog, restore_after_failure))
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        trainer.train()
    assert trainer.state.global_step == 4


def test_a_failed_upload_is_retried_after_the_next_save(tmp_path, tokenizer, llama, bucket, caplog):
    train_while_the_bucket_is_gone(tmp_path, tokenizer, llama, bucket, caplog, restore_after_failure=True)
    tree = bucket.tree()
    assert set(tree) == {"step_2", "step_4", "final"}
    assert all(files == local_files(tmp_path / name) for name, files in tree.items())
    assert not [m for m in messages(caplog, logging.WARNING) if m.startswith("Not uploaded")]


def test_a_failing_upload_never_stops_training_and_is_reported_at_the_end(tmp_path, tokenizer, llama, bucket,
                                                                         caplog):
    train_while_the_bucket_is_gone(tmp_path, tokenizer, llama, bucket, caplog, restore_after_failure=False)
    assert entries(tmp_path) == {"step_2", "step_4", "final"}
    assert all(verify_checkpoint(tmp_path / name) == [] for name in ("step_2", "step_4", "final"))
    [report] = [m for m in messages(caplog, logging.WARNING) if m.startswith("Not uploaded")]
    assert bucket.url() in report
    assert all(f"{name} (FileNotFoundError" in report for name in ("step_2", "step_4", "final"))
    assert "local checkpoints are complete and untouched" in report


def test_a_replaced_checkpoint_loses_its_remote_manifest_first_and_its_stale_files(tmp_path, tokenizer, llama,
                                                                                   bucket, monkeypatch):
    first = CheckpointCallback(FullModel(max_shard_size=40_000),
                               upload=Upload(to=bucket.url(), storage_options=bucket.options))
    make_trainer(llama, tokenizer, tmp_path, first, max_steps=2).train()
    assert "model-00001-of-00003.safetensors" in bucket.tree()["step_2"]

    second = s3_callback(bucket, existing_checkpoints="supersede")
    calls = record_requests(monkeypatch, bucket.url(), bucket.options)
    make_trainer(llama, tokenizer, tmp_path, second, max_steps=2).train()

    assert bucket.tree()["step_2"] == local_files(tmp_path / "step_2")
    assert "model.safetensors" in bucket.tree()["step_2"]
    touching = [(op, key) for op, key in calls if key.startswith("run/step_2/")]
    assert touching[0] == ("delete_object", "run/step_2/checkpoint.json")
    kept = local_files(tmp_path / "step_2")
    stale = [i for i, (op, key) in enumerate(touching)
             if op == "delete_object" and key[len("run/step_2/"):] not in kept]
    assert len(stale) == 4 and max(stale) < touching.index(("put_object", "run/step_2/checkpoint.json"))


# -- refused before training ----------------------------------------------------------------------

def test_a_missing_bucket_is_refused_before_training(tmp_path, tokenizer, llama, bucket):
    callback = CheckpointCallback(FullModel(), upload=Upload(to=f"s3://{bucket.name}-missing/run",
                                                             storage_options=bucket.options))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback)
    with pytest.raises(CheckpointError, match=r"is not writable \(FileNotFoundError.*the bucket \(or directory\) does "
                                              r"not exist: create it first, or fix the URL\. Nothing was trained yet"):
        trainer.train()
    assert trainer.state.global_step == 0 and entries(tmp_path) == set()
    make_trainer(llama, tokenizer, tmp_path, s3_callback(bucket), max_steps=2).train()  # the lock was released
    assert "step_2" in bucket.tree()


def test_a_store_that_never_answers_fails_the_start_within_upload_timeout_s(tmp_path, tokenizer, llama, bucket,
                                                                           hung):
    options = dict(bucket.options, client_kwargs={"endpoint_url": hung.url})
    callback = CheckpointCallback(FullModel(), upload=Upload(to=bucket.url(), storage_options=options, timeout_s=2))
    trainer = make_trainer(llama, tokenizer, tmp_path, callback)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=rf"Upload\(to='{bucket.url()}'\): {re.escape(hung.url)} did not answer "
                                              r"within Upload\(timeout_s=2\) s \(writing a probe object\); check that "
                                              r"the endpoint is up and reachable, or raise Upload\(timeout_s=\.\.\.\)\. "
                                              r"Nothing was"):
        trainer.train()
    took = time.monotonic() - started
    print(f"hung endpoint: train() raised after {took:.2f} s (upload_timeout_s=2)")
    assert took < 2 + 5 and hung.held  # the endpoint was reached and never answered
    assert trainer.state.global_step == 0 and entries(tmp_path) == set()
    make_trainer(llama, tokenizer, tmp_path, s3_callback(bucket), max_steps=2).train()  # the lock was released
    assert "step_2" in bucket.tree()


@pytest.mark.parametrize("url, error, message", [
    ("nosuchproto://bucket/run", ValueError, r"fsspec knows no protocol 'nosuchproto'; use s3://bucket/prefix"),
    ("s3://", ValueError, r"Upload\(to='s3://'\) names no bucket or directory"),
    (42, TypeError, r"Upload\(to=42\) must be a URL string"),
])
def test_bad_upload_urls_are_refused_at_construction(url, error, message):
    with pytest.raises(error, match=message):
        Upload(to=url)


def test_bad_upload_options_are_refused_at_construction(tmp_path):
    with pytest.raises(TypeError, match=r"Upload\(storage_options='key=x'\) must be a dict"):
        Upload(to=str(tmp_path), storage_options="key=x")
    with pytest.raises(ValueError, match=r"Upload\(wait_s=0\) must be a positive number of seconds, or None"):
        Upload(to=str(tmp_path), wait_s=0)
    for timeout in (0, -1, None, True, "60"):
        with pytest.raises(ValueError, match=rf"Upload\(timeout_s={re.escape(repr(timeout))}\) must be a positive "
                                             r"number of seconds"):
            Upload(to=str(tmp_path), timeout_s=timeout)
    with pytest.raises(ValueError, match=r"Retry\(tries=0\) must be an int of at least 1"):
        Upload(to=str(tmp_path), retry=Retry(tries=0))


_WITHOUT_S3FS = """
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("s3fs", "aiobotocore"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt import Upload
CheckpointCallback(FullModel(), upload=Upload(to=sys.argv[1]))  # a local target needs no extra
try:
    Upload(to="s3://bucket/run")
except ImportError as exc:
    print(exc)
"""


def test_without_the_s3_extra_the_package_imports_and_s3_urls_name_the_install_command(tmp_path):
    """fsspec itself always comes with huggingface_hub; s3fs is the optional part."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_S3FS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Upload(to='s3://bucket/run') needs the s3:// filesystem" in done.stdout
    assert 'pip install "open_instruct_ckpt[s3]"' in done.stdout


def test_a_local_target_inside_output_dir_is_refused(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(tmp_path / "backup")))
    with pytest.raises(ValueError, match=r"is output_dir .* or inside it; choose a directory outside it"):
        make_trainer(llama, tokenizer, tmp_path, callback).train()


# -- local targets, the queue, the wait ---------------------------------------------------------------

def test_a_local_directory_target_gets_loadable_checkpoints_and_retention(tmp_path, tokenizer, llama):
    target = tmp_path / "remote"
    callback = CheckpointCallback(FullModel(), upload=Upload(to=f"file://{target}"))
    make_trainer(llama, tokenizer, tmp_path / "out", callback, max_steps=6, save_total_limit=1).train()
    assert entries(target) == entries(tmp_path / "out") == {"step_6", "final"}
    assert verify_checkpoint(target / "final") == []
    loaded = AutoModelForCausalLM.from_pretrained(target / "final")
    assert torch.equal(logits(loaded, tokenizer), logits(llama, tokenizer))


def test_a_checkpoint_pruned_before_its_turn_is_skipped_quietly(tmp_path, tokenizer, llama, caplog):
    saver = saver_for(tokenizer, tmp_path / "out")
    old, new = (saver.save(llama, f"step_{step}", step, FullModel()).path for step in (1, 2))
    uploader = Upload(to=str(tmp_path / "remote"), timeout_s=30).uploader()
    uploader.open(tmp_path / "out", None)
    (old / "checkpoint.json").unlink()  # pruning removes the manifest first
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        uploader.enqueue(old)
        uploader.enqueue(new)
        uploader.finish()
    uploader.stop()
    assert entries(tmp_path / "remote") == {"step_2"}
    assert not messages(caplog, logging.WARNING)


def test_train_end_waits_at_most_upload_wait_s_and_never_leaves_a_manifest(tmp_path, tokenizer, llama, monkeypatch,
                                                                           caplog):
    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(tmp_path / "remote"), wait_s=0.5))
    fs = fs_for(str(tmp_path / "remote"))
    real_put = fs.put_file

    def slow_put(local, remote, **kwargs):
        if "/final/" in remote:
            time.sleep(1.5)
        return real_put(local, remote, **kwargs)

    monkeypatch.setattr(fs, "put_file", slow_put)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    assert time.monotonic() - started < 20
    [warning] = [m for m in messages(caplog, logging.WARNING) if "did not finish" in m]
    assert "Upload(wait_s=0.5) s" in warning and "copy them by hand, checkpoint.json last" in warning
    # the one in progress is named, with the file it was on
    assert re.search(r"not uploaded: (step_4|final) \(in progress: uploading \1/[\w.]+ \(\d+ bytes\)", warning), warning
    assert not (tmp_path / "remote" / "final" / "checkpoint.json").exists()
    assert json.loads((tmp_path / "remote" / "step_4" / "checkpoint.json").read_text())["step"] == 4


def test_train_end_stops_waiting_for_an_upload_stuck_on_a_store_that_stopped_answering(tmp_path, tokenizer, llama,
                                                                                       bucket, relay, monkeypatch,
                                                                                       caplog):
    options = dict(bucket.options, client_kwargs={"endpoint_url": relay.url})
    callback = CheckpointCallback(FullModel(), upload=Upload(to=bucket.url(), storage_options=options, wait_s=30,
                                                             timeout_s=2))
    stalled_at = []

    def stall_at_the_weights(method, kwargs):  # the start-up probe and the first files get through
        if method == "put_object" and kwargs["Key"] == "run/step_2/model.safetensors" and not stalled_at:
            relay.stall()
            stalled_at.append(time.monotonic())

    record_requests(monkeypatch, bucket.url(), options, stall_at_the_weights)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    took = time.monotonic() - stalled_at[0]
    print(f"stuck upload: train() returned {took:.2f} s after the store stopped answering (upload_timeout_s=2)")

    assert took < 2 + 8  # not upload_wait_s=30
    [warning] = [m for m in messages(caplog, logging.WARNING) if "stopped waiting" in m]
    assert f"{relay.url} has not answered for " in warning and "(Upload(timeout_s=2))" in warning
    assert "while uploading step_2/model.safetensors" in warning
    assert "not uploaded: step_2 (in progress: uploading step_2/model.safetensors" in warning
    assert "step_4 (queued), final (queued)" in warning and "copy them by hand, checkpoint.json last" in warning
    assert "checkpoint.json" not in bucket.tree()["step_2"]
    assert all(verify_checkpoint(tmp_path / "out" / name) == [] for name in ("step_2", "step_4", "final"))


def test_a_signal_during_the_train_end_upload_wait_ends_it_at_once(tmp_path, tokenizer, llama, monkeypatch, caplog):
    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(tmp_path / "remote"), wait_s=30),
                                  preemption_signals=(signal.SIGUSR1,))
    fs = fs_for(str(tmp_path / "remote"))
    real_put, release, signalled_at = fs.put_file, threading.Event(), []

    def kill():  # as `kill -USR1` from outside, while train end waits for final/
        signalled_at.append(time.monotonic())
        signal.raise_signal(signal.SIGUSR1)

    def slow_put(local, remote, **kwargs):  # a slow store: each file of final/ takes a minute
        if "/final/" in remote:
            if not signalled_at:
                threading.Timer(0.5, kill).start()
            release.wait(60)
        return real_put(local, remote, **kwargs)

    monkeypatch.setattr(fs, "put_file", slow_put)
    before = signal.getsignal(signal.SIGUSR1)
    trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback)
    try:
        with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
            trainer.train()
        took = time.monotonic() - signalled_at[0]
    finally:
        release.set()
    print(f"signal during the upload wait: train() returned {took:.2f} s after it")

    assert took < 2  # not upload_wait_s=30
    assert trainer.state.global_step == 4 and signal.getsignal(signal.SIGUSR1) == before
    [warning] = [m for m in messages(caplog, logging.WARNING) if "preemption signal" in m]
    assert re.search(r"not uploaded: final \(in progress: uploading final/[\w.]+ \(\d+ bytes\), [\d.]+ s so far\)\. "
                     r"The local checkpoints are complete", warning), warning
    assert json.loads((tmp_path / "remote" / "step_4" / "checkpoint.json").read_text())["step"] == 4
    assert not (tmp_path / "remote" / "final" / "checkpoint.json").exists()
    assert all(verify_checkpoint(tmp_path / "out" / name) == [] for name in ("step_2", "step_4", "final"))


def test_the_signal_that_stopped_training_leaves_the_upload_wait_to_run(tmp_path, tokenizer, llama, monkeypatch):
    class SignalDuringStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                signal.raise_signal(signal.SIGUSR1)

    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(tmp_path / "remote")),
                                  preemption_signals=(signal.SIGUSR1,))
    fs = fs_for(str(tmp_path / "remote"))
    real_put = fs.put_file

    def slow_put(local, remote, **kwargs):  # step_2's upload still runs when train end starts to wait
        time.sleep(0.2)
        return real_put(local, remote, **kwargs)

    monkeypatch.setattr(fs, "put_file", slow_put)
    trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback, max_steps=10, save_steps=100)
    trainer.add_callback(SignalDuringStep2())
    trainer.train()
    assert callback.preempted and trainer.state.global_step == 2
    assert json.loads((tmp_path / "remote" / "step_2" / "checkpoint.json").read_text())["step"] == 2
