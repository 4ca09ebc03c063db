"""Assertions shared by the distributed tests: checkpoints against the live model recorded in-run."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from launch import PROBE_IDS, Run
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

SAVE_STEPS = (2, 4)


def nonwriter_wrote_nothing(run: Run) -> None:
    writer, other = run.report(0), run.report(1)
    assert (writer["should_save"], other["should_save"]) == (True, False)
    assert other["rlimit_probe"] == "File too large"  # the size limit was live during training
    assert other["audit"] == [], other["audit"]
    assert any(event[0] == "os.rename" for event in writer["writer_audit"])  # the hook does see writes
    assert other["peaks"] == [0] * len(SAVE_STEPS)


def partitioned(run: Run) -> None:
    for rank in (0, 1):
        report = run.report(rank)
        assert report["partitioned_params"] == report["params"] > 0
        assert report["local_numel_zero_at_save"] == [report["params"]] * len(SAVE_STEPS)  # nothing left gathered


def not_partitioned(run: Run) -> None:
    for rank in (0, 1):
        report = run.report(rank)
        assert report["partitioned_params"] == 0 and report["local_numel_zero_at_save"] == [0] * len(SAVE_STEPS)
        assert report["gathered"] == []


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


def writer_side_files_load(directory) -> None:
    """Tokenizer and generation config, written by the writer from the unwrapped model, load and agree."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.get_vocab() == llama_tokenizer().get_vocab()
    generation = GenerationConfig.from_pretrained(directory)
    assert tokenizer.eos_token_id in (generation.eos_token_id if isinstance(generation.eos_token_id, list)
                                      else [generation.eos_token_id])


def lora_matches_live(run: Run, step: int) -> dict[str, torch.Tensor]:
    """The adapter holds exactly the trainable tensors, with their shapes and values; logits equal the live model's."""
    from peft import PeftModel

    reference = run.reference(step)
    directory = run.checkpoints / f"step_{step}"
    adapter = load_file(directory / "adapter_model.safetensors")
    live = {_peft_file_key(name): t for name, t in reference["state"].items()}
    assert len(adapter) == 8 and set(adapter) == set(live)  # q_proj, v_proj x 2 layers x (A, B)
    for name, tensor in adapter.items():
        expected_shape = (4, 32) if "lora_A" in name else (32, 4)
        assert tensor.shape == expected_shape and torch.equal(tensor, live[name]), name
    model = PeftModel.from_pretrained(llama_model(llama_tokenizer()), directory).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE_IDS).logits, reference["logits"])
    return adapter


def _peft_file_key(name: str) -> str:
    return name.replace(".default.", ".")
