"""The command line on a merged LoRA's final/: the adapter in final/, a full model in final/merged/ that final's manifest
lists (merged/ has none of its own). verify, verify --load and inspect treat merged/ as the model it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from peft import LoraConfig, get_peft_model

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, LoRAAdapter
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "open_instruct_ckpt.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished merged-LoRA run whose adapter names a saved base model, so AutoPeftModel can load it."""
    root = tmp_path_factory.mktemp("merged")
    tokenizer = llama_tokenizer()
    llama_model(tokenizer).save_pretrained(root / "base")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(llama_model(tokenizer), config)
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    make_trainer(model, tokenizer, root / "out", CheckpointCallback(LoRAAdapter(merged_final=True))).train()
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return root / "out", adapter, sum(p.numel() for p in llama_model(tokenizer).parameters())


@pytest.fixture
def final(run, tmp_path):
    return shutil.copytree(run[0] / "final", tmp_path / "final")


def test_verify_of_merged_checks_what_finals_manifest_lists_for_it(final):
    done = cli("verify", final / "merged")
    assert (done.returncode, done.stdout) == (0, f"{final / 'merged'}: OK\n"), done
    (final / "adapter_model.safetensors").write_bytes(b"damaged")  # final's, not merged's
    assert cli("verify", final / "merged").returncode == 0
    data = bytearray((final / "merged" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (final / "merged" / "model.safetensors").write_bytes(bytes(data))
    (final / "merged" / "tokenizer.json").unlink()
    done = cli("verify", final / "merged")
    assert done.returncode == 1 and done.stdout.splitlines() == [
        f"{final / 'merged'}: CORRUPT", "  model.safetensors: blake3 mismatch", "  tokenizer.json: missing"]


def test_verify_load_of_final_loads_the_adapter_and_the_merged_model(run):
    out, adapter, parameters = run
    done = cli("verify", "--load", out / "final", out / "final" / "merged")
    assert done.returncode == 0, done.stdout + done.stderr
    model = f"LlamaForCausalLM ({parameters:,} parameters), TokenizersBackend, GenerationConfig (eos_token_id=2)"
    assert done.stdout.splitlines() == [
        f"{out / 'final'}: loaded AutoPeftModelForCausalLM over {out.parent / 'base'} ({adapter:,} adapter parameters); "
        f"merged/: {model}",
        f"{out / 'final'}: OK",
        f"{out / 'final' / 'merged'}: loaded {model}",
        f"{out / 'final' / 'merged'}: OK",
    ]


def test_inspect_of_merged_describes_the_merged_model(run, final):
    info = json.loads(cli("inspect", final / "merged", "--json").stdout)
    assert info["complete"] and info["step"] == 4 and info["part_of"] == str(final)
    assert info["weights"]["parameters"] == run[2] and info["adapter"] is None
    assert info["config"]["architectures"] == ["LlamaForCausalLM"]
    assert info["generation_config"]["eos_token_id"] == [2] and info["tokenizer"]["vocab_size"] == 52
    assert set(info["files"]) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"}
    (final / "merged" / "tokenizer.json").unlink()
    done = cli("inspect", final / "merged")
    assert done.returncode == 1
    assert "complete:    no: tokenizer.json: missing" in done.stdout
    assert f"part of:     {final} (its checkpoint.json lists these files)" in done.stdout
    assert "model:       LlamaForCausalLM (llama), config dtype float32" in done.stdout


def test_inspect_of_final_separates_the_adapters_weights_from_the_merged_model(run):
    out, adapter, parameters = run
    info = json.loads(cli("inspect", out / "final", "--json").stdout)
    assert info["weights"]["parameters"] == adapter and info["adapter"]["r"] == 4
    assert info["models_inside"]["merged"]["weights"]["parameters"] == parameters
    text = cli("inspect", out / "final").stdout
    assert f"  weights:     {adapter:,} parameters in 8 tensors, dtype F32\n" in text
    assert (f"  merged/:     LlamaForCausalLM (llama), {parameters:,} parameters in 21 tensors, dtype F32 "
            f"(inspect {out / 'final' / 'merged'})\n") in text
