"""Readers (latest_checkpoint, complete_checkpoints, verify) survive anything on disk: they skip or
report, never raise, never hang and never modify; one bad directory never hides the good ones.
`latest_checkpoint` orders steps by number, and `final` wins a tie."""

import json
import os
import random
import struct
import subprocess
import sys
import threading

import pytest

from conftest import entries, make_trainer, saver_for
from open_instruct_ckpt import CheckpointCallback, FullModel, complete_checkpoints, latest_checkpoint, verify_checkpoint
from open_instruct_ckpt._format.readers import read_manifest
from open_instruct_ckpt._format.safetensors_header import safetensors_header_problems

READERS = (latest_checkpoint, complete_checkpoints)


@pytest.fixture
def good(tmp_path, tokenizer, llama):
    """output_dir with a sound step_1 and step_2, where step_2 is the one the tests damage."""
    saver = saver_for(tokenizer, tmp_path)
    saver.save(llama, "step_1", 1, FullModel())
    return saver.save(llama, "step_2", 2, FullModel()).path


def within(seconds, function, *args):
    """Run `function(*args)` in a thread; fail if it raises or runs past `seconds` (a reader that blocks)."""
    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as exc:  # reported below as the failure it is
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} blocked for more than {seconds} s"
    assert "error" not in result, f"{function.__name__} raised {result.get('error')!r}"
    return result["value"]


def manifest_of(step):
    return json.loads((step / "checkpoint.json").read_text())


def write_manifest(step, manifest):
    (step / "checkpoint.json").write_text(json.dumps(manifest))


def readers_skip(step) -> list[str]:
    """Every reader survives `step`, skips it, still finds step_1, and verify says why it is corrupt."""
    output_dir = step.parent
    assert within(10, latest_checkpoint, output_dir) == output_dir / "step_1"
    assert [p.name for p, _ in within(10, complete_checkpoints, output_dir)] == ["step_1"]
    assert within(10, read_manifest, step) is None
    problems = within(30, verify_checkpoint, step)
    assert problems and all(isinstance(p, str) for p in problems)
    return problems


@pytest.mark.parametrize("damage", [
    lambda m: m.update(files=list(m["files"])),
    lambda m: m.update(files=None),
    lambda m: m.update(files="model.safetensors"),
    lambda m: m.update(files={}),
    lambda m: m["files"].update({"config.json": 7}),
    lambda m: m["files"]["config.json"].pop("bytes"),
    lambda m: m["files"]["config.json"].pop("blake3"),
    lambda m: m["files"]["config.json"].update(bytes="12"),
    lambda m: m["files"].update({"con\0fig.json": m["files"].pop("config.json")}),
    lambda m: m.update(step="2"),
    lambda m: m.update(step=True),
    lambda m: m.update(run_started_unix=float("nan")),
    lambda m: m.update(files={k: v for k, v in m["files"].items() if "safetensors" not in k}),  # no weights
], ids=["files-list", "files-null", "files-string", "files-empty", "entry-int", "no-bytes", "no-digest",
        "bytes-string", "nul-in-name", "step-string", "step-bool", "started-nan", "no-weights"])
def test_manifest_of_the_wrong_shape(good, damage):
    manifest = manifest_of(good)
    damage(manifest)
    write_manifest(good, manifest)
    assert readers_skip(good)[0].startswith("checkpoint.json: not a valid manifest (")


def test_manifest_that_is_a_fifo_never_blocks(good):
    (good / "checkpoint.json").unlink()
    os.mkfifo(good / "checkpoint.json")  # opening it for reading would wait for a writer forever
    assert readers_skip(good) == ["checkpoint.json: not a valid manifest (not a regular file)"]


def test_listed_file_that_is_a_fifo_never_blocks(good):
    (good / "config.json").unlink()
    os.mkfifo(good / "config.json")
    assert "config.json: not a regular file" in readers_skip(good)


def test_symlink_loop_and_symlinked_files(good):
    (good / "checkpoint.json").unlink()
    (good / "checkpoint.json").symlink_to(good / "loop")
    (good / "loop").symlink_to(good / "checkpoint.json")
    assert readers_skip(good)[0].startswith("checkpoint.json: not a valid manifest (is a symbolic link")


def test_listed_file_that_is_a_symlink_is_not_followed(good, tmp_path):
    (tmp_path / "outside.json").write_text((good / "config.json").read_text())
    (good / "config.json").unlink()
    (good / "config.json").symlink_to(tmp_path / "outside.json")
    assert "config.json: is a symbolic link or under one, not a regular file" in readers_skip(good)


def test_checkpoint_directory_that_is_a_symlink_loop_or_file(tmp_path, good):
    (tmp_path / "step_7").symlink_to(tmp_path / "step_7")
    (tmp_path / "step_8").write_text("not a directory")
    (tmp_path / ".old-step_9-0123456789ab").symlink_to(good)
    assert within(10, latest_checkpoint, tmp_path) == good
    assert within(10, verify_checkpoint, tmp_path / "step_7")[0].startswith("checkpoint.json: not a valid manifest")


def rewrite_header(path, header):
    """Replace a safetensors file's header, keeping its data bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def header_of(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("damage,reason", [
    (lambda h: [h], "not a JSON object"),
    (lambda h: {**h, first_tensor(h): {k: v for k, v in h[first_tensor(h)].items() if k != "data_offsets"}},
     "data_offsets is not a pair of integers"),
    (lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "data_offsets": ["0", "4"]}},
     "data_offsets is not a pair of integers"),
    (lambda h: {**h, "extra": {**h[first_tensor(h)]}}, "overlaps"),
    (lambda h: {**h, "extra": {"dtype": "F32", "shape": [4], "data_offsets": [10**9, 10**9 + 16]}}, "leaves a gap"),
    (lambda h: {**h, "__metadata__": ["x"]}, "__metadata__ is not an object"),
])
def test_malformed_safetensors_headers(good, damage, reason):
    weights = good / "model.safetensors"
    rewrite_header(weights, damage(header_of(weights)))
    problems = readers_skip(good)  # the size no longer matches the manifest either
    assert any(p.startswith("model.safetensors: corrupt safetensors header") and reason in p for p in problems), problems
    assert any(reason in p for p in safetensors_header_problems(weights))


def test_truncated_data_is_reported_against_the_header(good):
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert any("truncated safetensors data" in p for p in readers_skip(good))


def mutate_json(rng, value, depth=0):
    """One random structural mutation somewhere in a JSON value."""
    if isinstance(value, dict) and value and depth < 4 and rng.random() < 0.7:
        key = rng.choice(list(value))
        return {**value, key: mutate_json(rng, value[key], depth + 1)}
    if isinstance(value, list) and value and depth < 4 and rng.random() < 0.7:
        index = rng.randrange(len(value))
        return value[:index] + [mutate_json(rng, value[index], depth + 1)] + value[index + 1:]
    return rng.choice([
        None, True, -1, 0, 2**70, 1.5, float("inf"), "", "x" * 300, "../../etc/passwd", "a\0b", [], {}, [1, 2],
        {"bytes": 1}, [[[[[]]]]], str(value)[::-1],
        *([{k: v for k, v in value.items() if k != rng.choice(list(value))}] if isinstance(value, dict) and value else []),
    ])


def test_fuzz_no_reader_raises_or_blocks_on_mutated_manifests_and_headers(good):
    rng = random.Random(20261128)
    manifest, weights = manifest_of(good), good / "model.safetensors"
    original_weights, header = weights.read_bytes(), header_of(weights)
    for case in range(240):
        if case % 2 == 0:
            text = json.dumps(mutate_json(rng, manifest), allow_nan=True)
            if rng.random() < 0.2:  # byte-level damage too: truncation or garbage
                cut = rng.randrange(len(text))
                text = text[:cut] + rng.choice(["", "\xff", "}", "[" * 2000])
            (good / "checkpoint.json").write_text(text)
        else:
            write_manifest(good, manifest)
            weights.write_bytes(original_weights)
            rewrite_header(weights, mutate_json(rng, header))
        assert within(10, latest_checkpoint, good.parent) in (good, good.parent / "step_1")
        within(10, complete_checkpoints, good.parent)
        assert all(isinstance(p, str) for p in within(30, verify_checkpoint, good))


def test_readers_take_no_lock_and_modify_nothing(tmp_path, good):
    # An orphaned .old- copy (a crash between two renames) is read in place, not restored.
    (good).rename(tmp_path / ".old-step_2-0123456789ab")
    script = f"""
import sys
from pathlib import Path
events = []
def hook(event, args):
    if event in ("fcntl.flock", "fcntl.lockf", "os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree",
                 "os.link", "os.symlink", "os.truncate") or (event == "open" and args[2] and args[2] & 0o3 ):
        events.append(event)
from open_instruct_ckpt import complete_checkpoints, latest_checkpoint, verify_checkpoint
sys.addaudithook(hook)
root = Path({str(tmp_path)!r})
latest = latest_checkpoint(root)
complete_checkpoints(root)
problems = verify_checkpoint(latest)
print(latest.name, len(problems), sorted(set(events)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [".old-step_2-0123456789ab", "0", "[]"]


def test_latest_checkpoint_orders_steps_numerically_and_final_wins_a_tie(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=10, save_steps=1, save_strategy="steps").train()
    assert {"step_9", "step_10", "final"} <= entries(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    (tmp_path / "final" / "checkpoint.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_manifest_paths_cannot_escape_and_symlinks_are_ignored(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path / "run", CheckpointCallback(FullModel()), max_steps=2).train()
    step = tmp_path / "run" / "step_2"
    files = list(step.iterdir())
    assert files and not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    manifest = (step / "checkpoint.json").read_text()
    (tmp_path / "secret").write_text("x")
    (step / "checkpoint.json").write_text(manifest.replace('"config.json"', '"../../secret"'))
    assert read_manifest(step) is None
    assert "file entry '../../secret': path escapes the checkpoint directory" in verify_checkpoint(step)[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "step_99").symlink_to(tmp_path / "run" / "final")
    assert latest_checkpoint(tmp_path / "other") is None
