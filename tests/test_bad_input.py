"""Bad input is refused before training with a message naming the value and the fix; no pickles."""

import os

import pytest

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, ModelAttribute, latest_checkpoint
from open_instruct_ckpt._readers import read_manifest, verify_checkpoint


@pytest.mark.parametrize("strategy,match", [
    ("full", r"strategy='full' is not a save strategy; pass FullModel\(\)"),
    (FullModel, r"got the class FullModel; pass an instance: FullModel\(\)"),
])
def test_unknown_strategy(strategy, match):
    with pytest.raises(TypeError, match=match):
        CheckpointCallback(strategy)


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", "policy..x", ".policy"])
def test_bad_attribute_names(name):
    with pytest.raises(ValueError, match=r"ModelAttribute\(.*\): "):
        ModelAttribute(name)


def test_missing_attribute(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"ModelAttribute\('policy'\): LlamaForCausalLM has no attribute 'policy'"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(ModelAttribute("policy")))


@pytest.mark.parametrize("keep_last", [0, -1])
def test_keep_last_below_one(keep_last):
    with pytest.raises(ValueError, match=rf"keep_last={keep_last!r}: keep at least 1 checkpoint, or None"):
        CheckpointCallback(FullModel(), keep_last=keep_last)


@pytest.mark.parametrize("keep_last", [True, 1.5, "3"])
def test_keep_last_of_the_wrong_type_names_the_type(keep_last):
    with pytest.raises(TypeError, match=rf"keep_last={keep_last!r} must be an int \(at least 1\), or None"):
        CheckpointCallback(FullModel(), keep_last=keep_last)


def test_output_dir_is_a_file(tmp_path, tokenizer, llama):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=rf"output_dir {tmp_path}/out is a file; pass a directory path"):
        make_trainer(llama, tokenizer, tmp_path / "x", CheckpointCallback(FullModel(), output_dir=tmp_path / "out"))


def test_output_dir_not_writable(tmp_path, tokenizer, llama, monkeypatch):
    trainer = make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()))
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # we run as root: inject the permission error
        if os.path.dirname(os.path.abspath(path)) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(CheckpointError, match=rf"output_dir {tmp_path} is not writable \(Permission denied\); fix its"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_manifest_paths_cannot_escape_and_symlinks_are_ignored(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path / "run", CheckpointCallback(FullModel()), max_steps=2).train()
    step = tmp_path / "run" / "step_2"
    files = list(step.iterdir())
    assert files and not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    manifest = (step / "checkpoint.json").read_text()
    (tmp_path / "secret").write_text("x")
    (step / "checkpoint.json").write_text(manifest.replace('"config.json"', '"../../secret"'))
    assert read_manifest(step) is None
    assert "../../secret: path escapes the checkpoint directory" in verify_checkpoint(step)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "step_99").symlink_to(tmp_path / "run" / "final")
    assert latest_checkpoint(tmp_path / "other") is None
