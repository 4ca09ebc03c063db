"""writers="all", 2 processes (ZeRO-3 and FSDP2, gloo), sync and async: each rank writes its share of the shard files
(async: each rank stages its share and writes it in its own background thread), and the checkpoint is byte-identical
to the one rank 0 alone writes (writers="main") for the same run."""

from __future__ import annotations

import json

import pytest

from launch import deepspeed_op, launched  # noqa: F401 (fixtures)
from open_instruct_ckpt import verify_checkpoint

pytestmark = pytest.mark.distributed
ARGS = ("--strategy", "full", "--max-shard-size", "20000", "--max-steps", "2")


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "checkpoint.json"}


@pytest.mark.parametrize("engine,mode", [("zero3", "sync"), ("fsdp2", "sync"), ("zero3", "async"), ("fsdp2", "async"),
                                         ("ddp", "async")])
def test_all_writers_checkpoint_is_byte_identical_to_one_writer(launched, engine, mode):
    args = (*ARGS, "--engine", engine)
    extra = ("--async-save",) if mode == "async" else ()
    one, every = launched(*args).check(), launched(*args, "--writers", "all", *extra).check()
    ours, reference = every.checkpoints / "step_2", one.checkpoints / "step_2"
    assert verify_checkpoint(ours) == []  # every rank's sha256 reached the manifest
    assert _files(ours) == _files(reference) and len([n for n in _files(ours) if n.startswith("model-")]) > 2
    manifest = lambda d: json.loads((d / "checkpoint.json").read_text())["files"]  # noqa: E731
    assert manifest(ours) == manifest(reference)
    written_by_rank1 = {event[1].rsplit("/", 1)[-1] for event in every.report(1)["audit"]}
    assert any(name.startswith("model-") for name in written_by_rank1)  # rank 1 really wrote shards
    assert one.report(1)["audit"] == []  # writers="main": the non-writer writes nothing
    if mode == "async":  # each rank's arena holds its share (ZeRO-3/FSDP2: its shard; DDP: the files it writes)
        model = one.report(0)["model_bytes"]
        assert all(0 < every.report(rank)["staging_capacity"] < 0.75 * model for rank in (0, 1))


def test_all_writers_on_storage_that_is_not_shared_fail_before_training_naming_writers_main(launched):
    run = launched(*ARGS, "--engine", "fsdp2", "--writers", "all", "--unshared-output-dir", "--expect-error")
    run.check_expected_error()
    for rank in (0, 1):
        report = run.report(rank)
        assert "writers='all' needs output_dir on a filesystem shared by every rank" in report["error"], report["error"]
        assert "use writers='main'" in report["error"]
        assert "save_started" not in report  # refused at on_train_begin, before the first step
    assert not list((run.out / "storage0" / "ckpt").glob("step_*"))
