"""Assertions shared by the distributed tests: checkpoints against the live model recorded in-run."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from launch import PROBE_IDS, Run
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

SAVE_STEPS = (2, 4)
INDEX = "model.safetensors.index.json"


def nonwriter_wrote_nothing(run: Run) -> None:
    writer, other = run.report(0), run.report(1)
    assert (writer["should_save"], other["should_save"]) == (True, False)
    assert other["rlimit_probe"] == "File too large"  # the size limit was live during training
    assert other["audit"] == [], other["audit"]
    assert any(event[0] == "os.rename" for event in writer["writer_audit"])  # the hook does see writes
    assert len(writer["peaks"]) >= len(SAVE_STEPS) and all(peak > 0 for peak in writer["peaks"])


def sharded(run: Run) -> None:
    """Every parameter was sharded in training and still in its sharded form when each save began."""
    for rank in (0, 1):
        report = run.report(rank)
        assert report["sharded_params"] == report["params"] > 0
        assert report["sharded_at_save"] == [report["params"]] * len(SAVE_STEPS)  # nothing left gathered


def not_sharded(run: Run) -> None:
    for rank in (0, 1):
        report = run.report(rank)
        assert report["sharded_params"] == 0 and report["sharded_at_save"] == [0] * len(SAVE_STEPS)
        assert report["gathered"] == [] and report["gather_bytes"] == []


def gathers_module_by_module(run: Run, saves: int = len(SAVE_STEPS)) -> None:
    """Each engine gather materialised at most the largest module; together, the whole model once per save."""
    largest, model_bytes = run.report(0)["largest_group_bytes"], run.report(0)["model_bytes"]
    for rank in (0, 1):
        sizes = run.report(rank)["gather_bytes"]
        assert sizes and 0 < max(sizes) <= largest < model_bytes, (max(sizes), largest, model_bytes)
        assert sum(sizes) == saves * model_bytes


def full_model_matches_live(run: Run, step: int, loader=AutoModelForCausalLM) -> torch.Tensor:
    """Load `step_<N>` with the stock loader; its tensors and logits equal the live model's at that step."""
    reference = run.reference(step)
    model = loader.from_pretrained(run.checkpoints / f"step_{step}")
    loaded = model.state_dict()
    assert set(reference["state"]) <= set(loaded)
    for name, tensor in reference["state"].items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=PROBE_IDS).logits, reference["logits"])
    writer_side_files_load(run.checkpoints / f"step_{step}")
    return reference["logits"]


def same_files_as_save_pretrained(run: Run, step: int, tmp_path, tie: bool = False, max_shard_size=None) -> None:
    """`step_<N>`'s weight files, their tensors (bit for bit) and index are what `save_pretrained` writes for
    an unsharded model holding the live weights of that step; config.json names the model's own class."""
    directory = run.checkpoints / f"step_{step}"
    model = llama_model(llama_tokenizer(), tie=tie)
    missing, unexpected = model.load_state_dict(run.reference(step)["state"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    ours = sorted(p.name for p in directory.iterdir() if p.name.startswith("model"))
    assert ours == sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model"))
    for name in ours:
        if name == INDEX:
            assert json.loads((directory / name).read_text()) == json.loads((tmp_path / name).read_text())
            continue
        with safe_open(str(directory / name), "pt") as mine, safe_open(str(tmp_path / name), "pt") as theirs:
            assert list(mine.keys()) == list(theirs.keys()) and mine.metadata() == theirs.metadata(), name
            assert all(torch.equal(mine.get_tensor(k), theirs.get_tensor(k)) for k in theirs.keys()), name
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def writer_side_files_load(directory) -> None:
    """Tokenizer and generation config, written by the writer from the unwrapped model, load and agree."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.get_vocab() == llama_tokenizer().get_vocab()
    generation = GenerationConfig.from_pretrained(directory)
    assert tokenizer.eos_token_id in (generation.eos_token_id if isinstance(generation.eos_token_id, list)
                                      else [generation.eos_token_id])


def lora_matches_live(run: Run, step: int, embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The adapter holds exactly the trainable tensors (plus the embedding layers when they are saved), with
    their shapes and values; logits equal the live model's."""
    from peft import PeftModel

    reference = run.reference(step)
    directory = run.checkpoints / f"step_{step}"
    adapter = load_file(directory / "adapter_model.safetensors")
    live = {_peft_file_key(name): t for name, t in reference["state"].items()}
    assert len(adapter) == 8 + 2 * embeddings and set(adapter) == set(live)  # q_proj, v_proj x 2 layers x (A, B)
    for name, tensor in adapter.items():
        expected_shape = (4, 32) if "lora_A" in name else (32, 4) if "lora_B" in name else (52, 32)
        assert tensor.shape == expected_shape and torch.equal(tensor, live[name]), name
    model = PeftModel.from_pretrained(llama_model(llama_tokenizer()), directory).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE_IDS).logits, reference["logits"])
    return adapter


def lora_gathered_only_the_adapter(run: Run, embeddings: bool = False, saves: int = len(SAVE_STEPS)) -> None:
    """Only the adapter's tensors were gathered (and the two 52x32 embedding layers when they are saved)."""
    for rank in (0, 1):
        gathered = run.report(rank)["gathered"]
        adapter = [(name, size) for name, size in gathered if ".lora_A." in name or ".lora_B." in name]
        embedding = [(name, size) for name, size in gathered if name.endswith(("embed_tokens.weight", "lm_head.weight"))]
        assert len(adapter) == 8 * saves and sum(size for _, size in adapter) == 4096 * saves, gathered
        assert len(embedding) == 2 * saves * embeddings and sum(size for _, size in embedding) == 13312 * saves * embeddings
        assert len(gathered) == len(adapter) + len(embedding), gathered  # nothing of the frozen base


def merged_lora_matches_live(run: Run, step: int) -> None:
    """`final/merged/` loads without PEFT, its logits match the live PEFT model's, and every rank gathered the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from open_instruct_ckpt import verify_checkpoint

    final = run.checkpoints / "final"
    model = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    assert not isinstance(model, PeftModel)
    with torch.no_grad():
        difference = (model(input_ids=PROBE_IDS).logits - run.reference(step)["logits"]).abs().max().item()
    assert difference <= 1e-5, difference
    assert verify_checkpoint(final) == [] and not (run.checkpoints / f"step_{step}" / "merged").exists()
    writer_side_files_load(final / "merged")
    for rank in (0, 1):
        gathered = [name for name, _ in run.report(rank)["gathered"]]
        assert any(".base_layer." in name for name in gathered) and any(name.endswith("model.norm.weight") for name in gathered), gathered


def _peft_file_key(name: str) -> str:
    return name.replace(".default.", ".")
