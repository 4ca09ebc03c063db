"""Options meet: tiny real trainings over a pairwise covering set of the options that interact.

Every pair of values of two options below appears in at least one run (tests/pairwise.py builds the rows).
Each run checks the same invariants: checkpoints at exactly the expected steps, `verify` clean (local and
uploaded), a stock reload equal to the live model, nothing left in staging, no warning that is not expected.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from conftest import entries, logits, training_args
from open_instruct_ckpt import (
    AutoInterval,
    CheckpointCallback,
    FullModel,
    Hook,
    LoRAAdapter,
    ModelAttribute,
    Stalls,
    Upload,
    verify_checkpoint,
)
from open_instruct_ckpt._write import safetensors as _safetensors
from open_instruct_ckpt.tiny import PolicyAndValue, TinyTextDataset, llama_model, llama_tokenizer
from pairwise import covering_rows, uncovered_pairs

FACTORS: dict[str, list] = {
    "strategy": ["full", "lora", "merged", "attribute"],
    "tied": [False, True],
    "async_save": [False, True],
    "writers": ["main", "all"],
    "interval": ["trainer", "auto"],
    "keep_last": [None, 1, 2],
    "upload": [False, True],
    "preempt": [False, True],
    "save_strategy": ["steps", "epoch"],
    "two_callbacks": [False, True],
    "hook": [False, True],  # on_published (a shell command logging each name) and Stalls
}
SCHEDULED = [2, 4, 6]  # steps: save_steps=2, max_steps=6; epoch: 2 steps an epoch, 3 epochs
PREEMPT_AT = 3
MERGED_ATOL = 1e-5
EXPECTED_WARNINGS = ("Preemption signal received",)


def allowed(row: dict) -> bool:
    return row["interval"] == "trainer" or row["save_strategy"] == "steps"  # AutoInterval adjusts a step interval


ROWS = covering_rows(FACTORS, allowed)


def _id(row: dict) -> str:
    return "-".join(f"{name}={value}" for name, value in row.items())


def test_the_runs_cover_every_allowed_pair():
    assert uncovered_pairs(ROWS, FACTORS, allowed) == set()
    assert len(ROWS) <= 20


@dataclass
class Built:
    model: torch.nn.Module
    strategies: list  # the first callback's strategy, then the second's (two callbacks)


def build(row: dict, tokenizer) -> Built:
    base = llama_model(tokenizer, tie=row["tied"])
    if row["strategy"] == "full":
        return Built(base, [FullModel(), FullModel()])
    if row["strategy"] == "attribute":
        return Built(PolicyAndValue(base), [ModelAttribute("policy"), ModelAttribute("value_head")])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"],
                        task_type="CAUSAL_LM")
    merged = row["strategy"] == "merged"
    return Built(get_peft_model(base, config), [LoRAAdapter(merged_final=merged), LoRAAdapter()])


class SignalAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == PREEMPT_AT:
            signal.raise_signal(signal.SIGUSR1)


def callbacks(row: dict, built: Built, tmp_path: Path) -> list[CheckpointCallback]:
    count = 2 if row["two_callbacks"] else 1
    made = []
    for index, strategy in enumerate(built.strategies[:count]):
        options: dict = dict(output_dir=tmp_path / f"out{index}", keep_last=row["keep_last"],
                             async_save=row["async_save"], writers=row["writers"])
        if row["interval"] == "auto":
            options.update(interval=AutoInterval(mtbf_hours=1e6))  # the optimum is capped at save_steps
        if row["upload"]:
            options.update(upload=Upload(to=str(tmp_path / f"remote{index}")))
        if row["hook"]:
            log = str(tmp_path / f"hooked{index}")
            options.update(on_published=Hook(["sh", "-c", 'echo "$0" >> "$1"', "{name}", log]), stalls=Stalls(floor_s=30))
        made.append(CheckpointCallback(strategy, **options))
    return made


def expected_names(row: dict) -> set[str]:
    saved = [s for s in SCHEDULED if s < PREEMPT_AT] + [PREEMPT_AT] if row["preempt"] else SCHEDULED
    kept = saved[-row["keep_last"]:] if row["keep_last"] else saved
    return {f"step_{s}" for s in kept} | (set() if row["preempt"] else {"final"})


def last_checkpoint(row: dict, directory: Path) -> Path:
    return directory / (f"step_{PREEMPT_AT}" if row["preempt"] else "final")


def check_reload(row: dict, index: int, built: Built, directory: Path, tokenizer) -> None:
    live = built.model
    if row["strategy"] == "attribute" and index == 1:
        saved = load_file(directory / "model.safetensors")
        assert saved.keys() == {"weight", "bias"} and saved["weight"].equal(live.value_head.weight.detach())
        return
    if row["strategy"] in ("full", "attribute"):
        reference = live.policy if row["strategy"] == "attribute" else live
        loaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        for name, tensor in reference.state_dict().items():
            assert torch.equal(loaded[name], tensor), name
        return
    adapter = PeftModel.from_pretrained(llama_model(tokenizer, tie=row["tied"]), directory)
    assert torch.allclose(logits(adapter, tokenizer), logits(live, tokenizer), atol=1e-6)
    if row["strategy"] == "merged" and index == 0 and not row["preempt"]:
        merged = AutoModelForCausalLM.from_pretrained(directory / "merged")
        difference = (logits(merged, tokenizer) - logits(live, tokenizer)).abs().max().item()
        assert difference <= MERGED_ATOL, difference


def no_leftovers(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if p.name.startswith((".tmp-", ".trash-", ".old-"))]
    assert left == [], left


@pytest.fixture
def slow_background_disk(monkeypatch):
    """Async runs: a disk slower than a training step, so saves are still in flight at later step ends."""
    real = _safetensors.open_stream
    monkeypatch.setattr(_safetensors, "open_stream", lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1])


@pytest.mark.parametrize("row", ROWS, ids=[_id(row) for row in ROWS])
def test_options_meet(row, tmp_path, caplog, request):
    if row["async_save"]:
        request.getfixturevalue("slow_background_disk")
    tokenizer = llama_tokenizer()
    built = build(row, tokenizer)
    made = callbacks(row, built, tmp_path)
    schedule = dict(max_steps=6) if row["save_strategy"] == "steps" else dict(max_steps=-1, num_train_epochs=3)
    trainer = Trainer(model=built.model, args=training_args(tmp_path / "trainer", save_strategy=row["save_strategy"],
                                                             **schedule),
                      train_dataset=TinyTextDataset(len(tokenizer), rows=8), processing_class=tokenizer,
                      callbacks=[*made, *([SignalAtStep()] if row["preempt"] else [])])
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        trainer.train()
    assert trainer.state.global_step == (PREEMPT_AT if row["preempt"] else 6)
    for index, callback in enumerate(made):
        out = tmp_path / f"out{index}"
        assert entries(out) == expected_names(row), index
        assert callback.preempted == row["preempt"]
        for name in expected_names(row):
            assert verify_checkpoint(out / name) == [], (index, name)
        no_leftovers(out)
        check_reload(row, index, built, last_checkpoint(row, out), tokenizer)
        if row["upload"]:
            remote = tmp_path / f"remote{index}"
            assert entries(remote) == expected_names(row)
            assert all(verify_checkpoint(remote / name) == [] for name in expected_names(row))
        if row["hook"]:  # every publish in order; with an upload, those uploaded (one pruned before its turn is not)
            published = [f"step_{s}" for s in SCHEDULED if not row["preempt"] or s < PREEMPT_AT]
            published += [f"step_{PREEMPT_AT}"] if row["preempt"] else ["final"]
            hooked = (tmp_path / f"hooked{index}").read_text().split()
            assert hooked == (published if not row["upload"] else [n for n in published if n in hooked]), hooked
            assert hooked[-1] == published[-1]
    unexpected = [r.getMessage() for r in caplog.records if r.name.startswith("open_instruct_ckpt")
                  and r.levelno >= logging.WARNING and not r.getMessage().startswith(EXPECTED_WARNINGS)]
    assert unexpected == []
