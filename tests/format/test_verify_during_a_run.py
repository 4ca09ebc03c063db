"""`verify OUTPUT_DIR` while a real run writes and prunes there: what retention removes, a save in progress and
a checkpoint replaced under its name are not damage. Threads and events order the run and verify exactly."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from conftest import make_trainer, saver_for
from open_instruct_ckpt import CheckpointCallback, FullModel, cli
from open_instruct_ckpt._format import inspect as _inspect
from open_instruct_ckpt._format import readers as _readers
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

WAIT = 60  # seconds; only reached if an ordering broke


class Verifier(threading.Thread):
    """`cli.main(["verify", ...])` in-process; `pause` blocks it where a test puts it until the run has pruned."""

    def __init__(self, *paths):
        super().__init__(daemon=True)
        self.paths, self.code = paths, None
        self.paused, self.resume = threading.Event(), threading.Event()

    def run(self):
        self.code = cli.main(["verify", *map(str, self.paths)])

    def pause(self):
        if threading.current_thread() is self and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(WAIT)


class PruneWhileVerifying(TrainerCallback):
    """After step 2's save (this runs after CheckpointCallback), verify starts and runs to its pause; after step 4's
    save has pruned step_2 (keep_last=1), verify goes on, and the run waits for it before it writes final/."""

    def __init__(self, verifier):
        self.verifier = verifier

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.verifier.start()
            assert self.verifier.paused.wait(WAIT)
        if state.global_step == 4:
            self.verifier.resume.set()
            self.verifier.join(WAIT)


def verify_while_pruning(tmp_path, monkeypatch, capsys, pause_at):
    out = tmp_path / "out"
    verifier = Verifier(out)
    pause_at(monkeypatch, verifier)
    tokenizer = llama_tokenizer()
    trainer = make_trainer(llama_model(tokenizer), tokenizer, out, CheckpointCallback(FullModel(), keep_last=1))
    trainer.add_callback(PruneWhileVerifying(verifier))
    trainer.train()
    assert not verifier.is_alive() and not (out / "step_2").exists()
    printed = capsys.readouterr().out.splitlines()  # the Trainer prints its logs there too
    return out, verifier.code, [line for line in printed if line.startswith((str(out), "  "))]


def after_listing(monkeypatch, verifier):
    listing = _inspect.list_checkpoints

    def listed_then_paused(output_dir):
        entries = listing(output_dir)
        verifier.pause()
        return entries

    monkeypatch.setattr(_inspect, "list_checkpoints", listed_then_paused)


def after_reading_the_manifest(monkeypatch, verifier):
    opening, listing = _readers.open_inside, _inspect.list_checkpoints
    opened, listing_now = [], threading.Event()

    def listed(output_dir):
        listing_now.set()
        entries = listing(output_dir)
        listing_now.clear()
        opened.clear()
        return entries

    def open_inside(directory, relative):
        if threading.current_thread() is verifier and not listing_now.is_set():
            opened.append(relative)
            if len(opened) == 2:  # the manifest is read, the first file is next
                verifier.pause()
        return opening(directory, relative)

    monkeypatch.setattr(_inspect, "list_checkpoints", listed)
    monkeypatch.setattr(_readers, "open_inside", open_inside)


def test_a_checkpoint_pruned_between_listing_and_checking_is_removed_not_corrupt(tmp_path, monkeypatch, capsys):
    out, code, printed = verify_while_pruning(tmp_path, monkeypatch, capsys, after_listing)
    assert printed == [
        f"{out / 'step_2'}: REMOVED",
        "  removed during the check (a run writing here prunes its old checkpoints), not damaged",
        f"{out / 'step_4'}: OK",  # published meanwhile: listed again and checked
    ]
    assert code == 0


def test_a_checkpoint_pruned_while_its_files_are_read_is_removed_not_corrupt(tmp_path, monkeypatch, capsys):
    out, code, printed = verify_while_pruning(tmp_path, monkeypatch, capsys, after_reading_the_manifest)
    assert printed[0] == f"{out / 'step_2'}: REMOVED" and printed[-1] == f"{out / 'step_4'}: OK"
    assert not any("CORRUPT" in line for line in printed), printed
    assert code == 0


@dataclass(frozen=True)
class VerifyingFullModel(FullModel):
    """A real FullModel save that runs `verify OUTPUT_DIR` first, while its staging directory is the only entry."""

    output_dir: Path | None = None
    codes: list = field(default_factory=list, compare=False, repr=False)

    def plan(self, model, final=False):
        plan = super().plan(model, final)
        transform = plan.weights.transform

        def verifying(state):
            if not self.codes:  # the first module's gather: the staging directory exists, nothing is published
                self.codes.append(cli.main(["verify", str(self.output_dir)]))
            return transform(state)

        return dataclasses.replace(plan, weights=dataclasses.replace(plan.weights, transform=verifying))


def test_an_output_directory_with_only_a_save_in_progress_is_not_corrupt(tmp_path, capsys):
    tokenizer, strategy = llama_tokenizer(), VerifyingFullModel(output_dir=tmp_path)
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(strategy), max_steps=2).train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith((str(tmp_path), "  "))]
    assert printed[:2] == [f"{tmp_path}: SAVING", printed[1]] and strategy.codes[0] == 0
    assert printed[1].startswith("  no complete checkpoint yet; a save is in progress: .tmp-step_2-")


def test_a_checkpoint_replaced_under_its_name_during_the_check_is_checked_again(tmp_path, monkeypatch, capsys):
    tokenizer = llama_tokenizer()
    saver = saver_for(tokenizer, tmp_path)
    saver.save(llama_model(tokenizer), "final", 4, FullModel())
    opening, opened = _readers.open_inside, []

    def open_inside(directory, relative):
        opened.append(relative)
        if len(opened) == 2:  # the old manifest is read: a new final/ with other weights takes its name
            replacement = llama_model(tokenizer)
            replacement.lm_head.weight.data.add_(1.0)
            saver.save(replacement, "final", 4, FullModel())
        return opening(directory, relative)

    monkeypatch.setattr(_readers, "open_inside", open_inside)
    assert cli.main(["verify", str(tmp_path / "final")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'final'}: OK\n"
