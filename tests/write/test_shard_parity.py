"""FullModel streams shards exactly as `save_pretrained` writes them, holding at most one shard plus one module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from open_instruct_ckpt import FullModel
from open_instruct_ckpt._engines import stored_nbytes
from open_instruct_ckpt._write.layout import INDEX_NAME, pretrained_weights
from open_instruct_ckpt._write.saver import save_once
from open_instruct_ckpt.tiny import llama_model, olmo_model

SHARD_BYTES = 20_000  # the tiny models are ~100 KB: several shards


def weight_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_NAME}


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def save_both(model, tokenizer, tmp_path: Path, max_shard_size) -> tuple[Path, Path]:
    theirs = tmp_path / "theirs"
    ours = save_once(FullModel(max_shard_size=max_shard_size), model, tokenizer, tmp_path / "ours").path
    if max_shard_size is None:
        model.save_pretrained(theirs)
    else:
        model.save_pretrained(theirs, max_shard_size=max_shard_size)
    return ours, theirs


@pytest.mark.parametrize("max_shard_size", [None, SHARD_BYTES], ids=["unsharded", "sharded"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_full_model_files_equal_save_pretrained(tokenizer, tmp_path, max_shard_size, tie):
    model = llama_model(tokenizer, tie=tie)
    ours, theirs = save_both(model, tokenizer, tmp_path, max_shard_size)

    assert weight_files(ours) == weight_files(theirs)
    assert (len(weight_files(ours)) > 3) == (max_shard_size is not None)
    for name in sorted(weight_files(theirs) - {INDEX_NAME}):
        our_tensors, our_meta = read_tensors(ours / name)
        their_tensors, their_meta = read_tensors(theirs / name)
        assert our_meta == their_meta
        assert list(our_tensors) == list(their_tensors), name
        assert all(torch.equal(our_tensors[k], their_tensors[k]) for k in their_tensors), name
    if max_shard_size is not None:
        assert json.loads((ours / INDEX_NAME).read_text()) == json.loads((theirs / INDEX_NAME).read_text())
    saved_names = set(json.loads((ours / INDEX_NAME).read_text())["weight_map"]) if max_shard_size else set(
        read_tensors(ours / "model.safetensors")[0]
    )
    assert ("lm_head.weight" in saved_names) == (not tie)


def test_model_from_pretrained_shards_like_its_save_pretrained(tokenizer, tmp_path):
    # from_pretrained leaves an (empty) list of weight conversions; save_pretrained then orders the keys
    # differently from a freshly built model's, which moves tensors between shard files.
    llama_model(tokenizer).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ours, theirs = save_both(model, tokenizer, tmp_path, SHARD_BYTES)
    assert json.loads((ours / INDEX_NAME).read_text()) == json.loads((theirs / INDEX_NAME).read_text())
    for name in sorted(weight_files(theirs) - {INDEX_NAME}):
        our_tensors, _ = read_tensors(ours / name)
        their_tensors, _ = read_tensors(theirs / name)
        assert list(our_tensors) == list(their_tensors), name


def test_full_model_config_and_loaded_logits_equal_save_pretrained(olmo_tok, tmp_path):
    model = olmo_model(olmo_tok)
    ours, theirs = save_both(model, olmo_tok, tmp_path, SHARD_BYTES)
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours_logits = AutoModelForCausalLM.from_pretrained(ours)(input_ids=ids).logits
        theirs_logits = AutoModelForCausalLM.from_pretrained(theirs)(input_ids=ids).logits
    assert torch.equal(ours_logits, theirs_logits)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_peak_held_bytes_stays_within_one_shard_plus_largest_module(tokenizer, tmp_path, tie):
    model = llama_model(tokenizer, tie=tie)
    weights = pretrained_weights(model, SHARD_BYTES)
    largest_module = max(sum(stored_nbytes(t) for t in own.values()) for _, own in weights.groups)

    peak = save_once(FullModel(max_shard_size=SHARD_BYTES), model, tokenizer, tmp_path).stats.peak_held_bytes

    assert 0 < peak <= SHARD_BYTES + largest_module
    assert peak < weights.stored_bytes / 2


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_one_file_streams_holding_at_most_one_module(tokenizer, tmp_path, tie):
    """A single safetensors file is written as its tensors arrive: never the whole model at once."""
    model = llama_model(tokenizer, tie=tie)
    weights = pretrained_weights(model, None)
    largest_module = max(sum(stored_nbytes(t) for t in own.values()) for _, own in weights.groups)
    saved = save_once(FullModel(), model, tokenizer, tmp_path)
    assert 0 < saved.stats.peak_held_bytes <= largest_module < weights.stored_bytes / 2
    assert weight_files(saved.path) == {"model.safetensors"}
    with safe_open(str(saved.path / "model.safetensors"), framework="pt") as handle:
        for name, tensor in model.state_dict().items():
            if name in handle.keys():
                assert torch.equal(handle.get_tensor(name), tensor), name
