"""verify_checkpoint names each kind of damage (the CLI's `verify` and its exit codes: test_cli.py)."""


import pytest

from open_instruct_ckpt import FullModel, verify_checkpoint
from open_instruct_ckpt._write.saver import save_once


@pytest.fixture
def checkpoint(tmp_path, tokenizer, llama):
    return save_once(FullModel(), llama, tokenizer, tmp_path, "step_1", 1).path


def test_sound_checkpoint(checkpoint):
    assert verify_checkpoint(checkpoint) == []


def test_missing_file(checkpoint):
    (checkpoint / "config.json").unlink()
    assert verify_checkpoint(checkpoint) == ["config.json: missing"]


def test_wrong_size(checkpoint):
    size = (checkpoint / "tokenizer.json").stat().st_size
    with open(checkpoint / "tokenizer.json", "a") as handle:
        handle.write(" ")
    assert verify_checkpoint(checkpoint) == [f"tokenizer.json: size {size + 1} bytes, manifest says {size}"]


def test_checksum_mismatch(checkpoint):
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    assert verify_checkpoint(checkpoint) == ["model.safetensors: blake3 mismatch"]


def test_truncated_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    problems = verify_checkpoint(checkpoint)
    assert problems[0].startswith("model.safetensors: size 40 bytes, manifest says")
    assert problems[1].startswith("model.safetensors: truncated safetensors header (")


def test_format_1_checkpoints_with_sha256_still_verify_and_count(checkpoint):
    """Format /2 records blake3; a checkpoint of format /1 (sha256) is still complete and checked byte for byte."""
    import hashlib
    import json

    from open_instruct_ckpt import latest_checkpoint

    manifest_path = checkpoint / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "open_instruct_ckpt/2" and all("blake3" in e for e in manifest["files"].values())
    manifest["format"] = "open_instruct_ckpt/1"
    for name, entry in manifest["files"].items():
        entry["sha256"] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
        del entry["blake3"]
    manifest_path.write_text(json.dumps(manifest))
    assert verify_checkpoint(checkpoint) == [] and latest_checkpoint(checkpoint.parent) == checkpoint
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    assert verify_checkpoint(checkpoint) == ["model.safetensors: sha256 mismatch"]
