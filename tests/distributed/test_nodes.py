"""Two nodes x two processes on one machine, each node with a private tmpfs at the same output_dir path.

`save_on_each_node=True` makes each node's local rank 0 publish a whole checkpoint on its own disk. One launch
per engine (a few steps, several assertions each):
- ZeRO-3: async saves, keep_last=2, SIGUSR1 to one process of node 1 (and its torchrun) in step 5, one upload
  prefix per node (`{node}`), the shell hook;
- FSDP2: sync saves to the end, keep_last=1, `final/`, the upload to one shared prefix (rank 0), the shell hook.
Two cheap DDP launches prove that misconfigurations stop every rank of both nodes before training.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from nodes import launch_nodes, node_local_disks_unavailable
from transformers import AutoModelForCausalLM

from launch import PROBE_IDS, deepspeed_op  # noqa: F401 (fixture)
from open_instruct_ckpt import verify_checkpoint
from open_instruct_ckpt._format.manifest import MANIFEST_NAME, RUN_RECORD_NAME

UNAVAILABLE = node_local_disks_unavailable()
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")]
ZERO3_KEPT, FSDP2_KEPT = {"step_4", "step_5"}, {"step_6", "final"}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, deepspeed_op):  # noqa: F811
    deepspeed_op()
    base = tmp_path_factory.mktemp("zero3-nodes")
    run = launch_nodes(base / "out", base / "disk", "--engine", "zero3", "--save-on-each-node", "--async-save",
                       "--keep-last", "2", "--max-steps", "8", "--sigusr1-rank", "3", "--sigusr1-at-step", "5",
                       "--upload", str(base / "remote" / "node{node}"), "--hook")
    print(f"2x2 ZeRO-3 launch: {run.seconds:.1f} s")
    run.remote = base / "remote"
    return run.check()


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp2-nodes")
    run = launch_nodes(base / "out", base / "disk", "--engine", "fsdp2", "--save-on-each-node", "--keep-last", "1",
                       "--max-steps", "6", "--upload", str(base / "remote"), "--hook")
    print(f"2x2 FSDP2 launch: {run.seconds:.1f} s")
    run.remote = base / "remote"
    return run.check()


def entries(path) -> set[str]:
    return {p.name for p in path.iterdir() if not p.name.startswith(".")}


def manifest_bytes(directory) -> bytes:
    return (directory / MANIFEST_NAME).read_bytes()


def matches_live(run, directory, step: int) -> None:
    """The checkpoint loads with the stock loader and equals the live model gathered at that step."""
    assert verify_checkpoint(directory) == [], directory
    reference = torch.load(run.out / "reference" / f"step_{step}.pt")
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    loaded = model.state_dict()
    for name, tensor in reference["state"].items():
        assert torch.equal(loaded[name], tensor), (directory, name)
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE_IDS).logits, reference["logits"]), directory


@pytest.mark.parametrize("engine, kept, steps", [("zero3", ZERO3_KEPT, {"step_4": 4, "step_5": 5}),
                                                 ("fsdp2", FSDP2_KEPT, {"step_6": 6, "final": 6})])
def test_each_node_holds_complete_checkpoints_equal_to_the_live_model(engine, kept, steps, request):
    run = request.getfixturevalue(engine)
    runs = set()
    for node in (0, 1):
        disk = run.node_disk(node)
        assert entries(disk) == kept, (node, entries(disk))  # retention ran on both nodes
        assert not [p.name for p in disk.iterdir() if p.name.startswith((".tmp-", ".old-", ".trash-", ".open_instruct_ckpt.node-probe"))]
        for name, step in steps.items():
            matches_live(run, disk / name, step)
            runs.add(json.loads(manifest_bytes(disk / name))["run_id"])
    assert len(runs) == 1  # both nodes' copies name one run
    if engine == "fsdp2":  # final/ is hard links to step_6 on each node
        for node in (0, 1):
            disk = run.node_disk(node)
            assert os.stat(disk / "final" / "config.json").st_ino == os.stat(disk / "step_6" / "config.json").st_ino


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_each_node_local_rank_0_writes_the_others_write_nothing_and_rank_0_records_the_run(engine, request):
    run = request.getfixturevalue(engine)
    reports = run.reports()
    assert [(r["node"], r["should_save"]) for r in reports] == [(0, True), (0, False), (1, True), (1, False)]
    assert [r.get("rlimit_probe") for r in reports] == [None, "File too large", None, "File too large"]
    assert (run.node_disk(0) / RUN_RECORD_NAME).is_file() and not (run.node_disk(1) / RUN_RECORD_NAME).exists()


def test_a_signal_to_one_process_of_one_node_stops_every_rank_of_both_nodes_after_one_save(zero3):
    reports = zero3.reports()
    assert [(r["preempted"], r["stopped_at"]) for r in reports] == [(True, 5)] * 4
    for node in (0, 1):
        assert "final" not in entries(zero3.node_disk(node))  # stopped: no final/
    assert "Preemption signal received: saved step 5 and stopping training" in reports[3]["warnings"]


def test_with_a_node_placeholder_each_node_uploads_its_own_copy(zero3):
    for node in (0, 1):
        remote = zero3.remote / f"node{node}"
        assert entries(remote) == ZERO3_KEPT  # step_2 was uploaded, then pruned remotely as locally
        for name in ZERO3_KEPT:
            assert manifest_bytes(remote / name) == manifest_bytes(zero3.node_disk(node) / name)
            assert verify_checkpoint(remote / name) == []


def test_uploads_and_hooks_come_from_global_rank_0_and_the_hook_reads_the_uploaded_copy(fsdp2):
    assert entries(fsdp2.remote) == FSDP2_KEPT  # final/ too: the upload to shared storage
    for name in FSDP2_KEPT:
        assert manifest_bytes(fsdp2.remote / name) == manifest_bytes(fsdp2.node_disk(0) / name)  # node 0's copy
        assert verify_checkpoint(fsdp2.remote / name) == []


@pytest.mark.parametrize("engine, last", [("zero3", "step_5 5"), ("fsdp2", "final 6")])
def test_the_hook_runs_once_per_uploaded_checkpoint_in_order_on_global_rank_0(engine, last, request):
    run = request.getfixturevalue(engine)
    lines = (run.out / "hooks.log").read_text().splitlines()
    ran = [line.rsplit(" ", 1) for line in lines]
    assert {pid for _, pid in ran} == {str(run.report(0)["pid"])}, lines  # the hook's parent: rank 0
    assert ran[-1][0] == last and len(ran) == len({name for name, _ in ran}), lines  # each once, the last one last
    steps = [int(name.split()[1]) for name, _ in ran]
    assert steps == sorted(steps), lines


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("shared-nodes")
    run = launch_nodes(base / "out", base / "disk", "--engine", "ddp", "--save-on-each-node", "--expect-error",
                       nproc=1, private_disks=False)
    print(f"2x1 DDP launch, shared output_dir: {run.seconds:.1f} s")
    run.disk = base / "disk"
    return run.check_expected_error()


def test_save_on_each_node_on_storage_the_nodes_share_is_refused_before_training(shared):
    for report in shared.reports():
        assert "this storage is shared by the nodes" in report["error"], report["error"]
        assert "save_on_each_node=False" in report["error"] and "node's own disk" in report["error"]
        assert report.get("stopped_at", 0) == 0
    assert os.listdir(shared.disk) == []  # no checkpoint, no probe file, not even the lock


@pytest.fixture(scope="module")
def writers_all(tmp_path_factory):
    base = tmp_path_factory.mktemp("writers-all-nodes")
    run = launch_nodes(base / "out", base / "disk", "--engine", "ddp", "--writers", "all", "--expect-error", nproc=1)
    print(f"2x1 DDP launch, writers='all' on node-local disks: {run.seconds:.1f} s")
    return run.check_expected_error()


def test_writers_all_on_node_local_disks_is_refused_on_both_nodes(writers_all):
    for report in writers_all.reports():
        error = report["error"]
        assert "writers='all'" in error and "is not visible on this rank" in error, error
        assert "save_on_each_node=True" in error and report.get("stopped_at", 0) == 0
    for node in (0, 1):
        assert entries(writers_all.node_disk(node)) == set()
        assert not [p for p in writers_all.node_disk(node).iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk-full-nodes")
    run = launch_nodes(base / "out", base / "disk", "--engine", "ddp", "--save-on-each-node", "--fill-disk-at-step",
                       "3", "--expect-error")
    print(f"2x2 DDP launch, node 1's disk fills after step 3: {run.seconds:.1f} s")
    return run.check_expected_error()


def test_a_full_disk_on_node_1_fails_the_save_on_every_rank_of_both_nodes_and_keeps_the_last_checkpoints(disk_full):
    for report in disk_full.reports():
        assert "not enough disk space" in report["error"] and "step_4" in report["error"], report["error"]
        assert report["rank"] == 2 or "checkpoint save failed on rank 2" in report["error"], report["error"]
    for node in (0, 1):
        disk = disk_full.node_disk(node)
        assert entries(disk) == {"step_2"} and verify_checkpoint(disk / "step_2") == []
        assert not [p.name for p in disk.iterdir() if p.name.startswith(".tmp-")]  # node 0's staging discarded too
