"""`on_published`: a command or callable run after each publish (after its upload), in order, in the background.

Real commands (cp, sh, sleep), a real Trainer on the tiny model; a hook never stops or slows training, and
train end waits for it at most `Hook(wait_s)`, then names what it abandoned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time

import pytest

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, Hook, Upload, verify_checkpoint

PUBLISHED = [("step_2", 2), ("step_4", 4), ("final", 4)]  # max_steps=4, save_steps=2


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith("open_instruct_ckpt")]


def test_a_command_runs_after_each_publish_in_order_with_the_placeholders_filled(tmp_path, tokenizer, llama):
    seen = tmp_path / "seen"
    seen.mkdir()
    hook = ["cp", "{path}/checkpoint.json", f"{seen}/{{name}} at {{step}}.json"]  # one argument with spaces: no shell
    callback = CheckpointCallback(FullModel(), on_published=hook)
    make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    assert sorted(p.name for p in seen.iterdir()) == sorted(f"{name} at {step}.json" for name, step in PUBLISHED)
    for name, step in PUBLISHED:
        copied = json.loads((seen / f"{name} at {step}.json").read_text())
        assert copied == json.loads((tmp_path / "out" / name / "checkpoint.json").read_text())


def test_a_shell_command_sees_the_checkpoint_in_its_environment_and_runs_in_order(tmp_path, tokenizer, llama):
    log = tmp_path / "order.log"
    script = 'sleep 0.2; test -f "$OPEN_INSTRUCT_CKPT_PATH/model.safetensors" && echo "$OPEN_INSTRUCT_CKPT_NAME ' \
             '$OPEN_INSTRUCT_CKPT_STEP $OPEN_INSTRUCT_CKPT_URL" >> "$0"'
    callback = CheckpointCallback(FullModel(), on_published=Hook(["sh", "-c", script, str(log)]))
    make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    out = tmp_path / "out"
    assert log.read_text().splitlines() == [f"{name} {step} {out / name}" for name, step in PUBLISHED]


def test_with_uploads_the_hook_runs_once_the_uploaded_copy_is_complete(tmp_path, tokenizer, llama):
    log, remote = tmp_path / "order.log", tmp_path / "remote"
    script = 'test -f "$1/checkpoint.json" && echo "$2" >> "$0"'  # the manifest is uploaded last
    hook = Hook(["sh", "-c", script, str(log), "{url}", "{name}"])
    callback = CheckpointCallback(FullModel(), upload=Upload(to=str(remote)), on_published=hook)
    make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    assert log.read_text().splitlines() == [name for name, _ in PUBLISHED]


def test_a_failing_command_is_a_warning_with_its_output_and_training_goes_on(tmp_path, tokenizer, llama, caplog):
    hook = Hook(["sh", "-c", "echo loading {name}; echo 'no such task: arc_tiny' >&2; exit 3"])
    callback = CheckpointCallback(FullModel(), on_published=hook)
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    failures = [m for m in warnings_of(caplog) if "exited with status 3" in m]
    assert len(failures) == 3, warnings_of(caplog)
    for (name, _), message in zip(PUBLISHED, failures):
        assert f"for {name} exited with status 3" in message and "training goes on" in message
        assert message.endswith(f"its output ended with:\nloading {name}\nno such task: arc_tiny"), message
    assert all(verify_checkpoint(tmp_path / "out" / name) == [] for name, _ in PUBLISHED)


def test_a_callable_runs_in_the_background_and_its_exception_is_only_logged(tmp_path, tokenizer, llama, caplog):
    calls = []

    def evaluate(checkpoint):
        calls.append((checkpoint.name, checkpoint.step, checkpoint.path, threading.current_thread().name))
        if checkpoint.name == "step_2":
            raise RuntimeError("the evaluation server is down")

    callback = CheckpointCallback(FullModel(), on_published=evaluate)
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback)
        trainer.train()
    assert [(n, s, p) for n, s, p, _ in calls] == [(n, s, tmp_path / "out" / n) for n, s in PUBLISHED]
    assert {thread for *_, thread in calls} == {"open_instruct_ckpt-hook"}
    [failure] = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("open_instruct_ckpt")]
    assert "evaluate failed for step_2 (training goes on)" in failure.getMessage()
    assert str(failure.exc_info[1]) == "the evaluation server is down" and trainer.state.global_step == 4


def test_a_slow_hook_blocks_no_save_and_train_end_waits_at_most_wait_s_then_names_what_it_stops(tmp_path, tokenizer,
                                                                                              llama, caplog):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)  # nobody reads it: the hook's write blocks, as an evaluation that never finishes
    callback = CheckpointCallback(FullModel(), on_published=Hook(["cp", "{path}/config.json", str(fifo)], wait_s=2))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    took = time.monotonic() - started
    print(f"train() with a hook that never ends: {took:.1f} s (Hook(wait_s=2))")
    assert took < 30
    assert {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")} == {"step_2", "step_4",
                                                                                          "final"}
    [abandoned] = [m for m in warnings_of(caplog) if "Train end stopped waiting" in m]
    match = re.search(r"abandoned: step_2 \(running: `cp \S+/step_2/config.json \S+results.fifo` for step_2, \d+ s so "
                      r"far \(pid (\d+)\)\), step_4 \(queued\), final \(queued\)", abandoned)
    assert match and "Hook(wait_s=2) s have passed" in abandoned, abandoned
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(int(match.group(1)), 0)  # stopped, not left behind
    [waiting] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Train end waits for the on_pub")]
    assert "step_2 (running:" in waiting and "final (queued)" in waiting


def test_a_command_past_timeout_s_is_stopped_and_the_next_one_runs(tmp_path, tokenizer, llama, caplog):
    hook = Hook(["sh", "-c", "echo evaluating {name}; exec sleep 60"], timeout_s=0.5, wait_s=30)
    callback = CheckpointCallback(FullModel(), on_published=hook)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback).train()
    assert time.monotonic() - started < 30
    stopped = [m for m in warnings_of(caplog) if "was stopped after Hook(timeout_s=0.5)" in m]
    assert [re.search(r"for (\w+) was stopped", m).group(1) for m in stopped] == [n for n, _ in PUBLISHED]
    assert all(m.endswith(f"evaluating {n}") for m, (n, _) in zip(stopped, PUBLISHED))


def test_a_signal_during_train_end_ends_the_wait_for_hooks_at_once(tmp_path, tokenizer, llama, caplog):
    # final/'s hook runs during train end: it signals the trainer (as `kill -USR1` would), then never ends
    script = 'if [ "$0" = final ]; then kill -USR1 $PPID; exec sleep 60; fi'
    callback = CheckpointCallback(FullModel(), on_published=Hook(["sh", "-c", script, "{name}"], wait_s=60),
                                  preemption_signals=(signal.SIGUSR1,))
    with caplog.at_level(logging.WARNING, logger="open_instruct_ckpt"):
        trainer = make_trainer(llama, tokenizer, tmp_path / "out", callback)
        trainer.train()
    [abandoned] = [m for m in warnings_of(caplog) if "Train end stopped waiting" in m]
    assert "a preemption signal ended the wait" in abandoned and "abandoned: final (running:" in abandoned
    assert trainer.state.global_step == 4 and not callback.preempted  # the signal came after training


@pytest.mark.parametrize("run, error, message", [
    ("lm_eval_not_installed --model hf", ValueError, "'lm_eval_not_installed' is not an executable on PATH"),
    ("cp {path} {out}", ValueError, r"names \{out\}; the placeholders are \{path\}, \{step\}, \{name\}, \{url\}"),
    ("cp {path} '/results", ValueError, "cannot be split into arguments"),
    ("", ValueError, "the command is empty"),
    ("{path}/evaluate.sh", ValueError, "must be fixed, not a placeholder"),
    ("cp {path:x} /results", ValueError, "is not a valid template"),
    (42, TypeError, "must be a command"),
    ([b"cp"], TypeError, "must be a command"),
])
def test_bad_hooks_are_refused_at_construction(run, error, message):
    with pytest.raises(error, match=message):
        CheckpointCallback(FullModel(), on_published=run)


@pytest.mark.parametrize("options, message", [
    (dict(timeout_s=0), r"Hook\(timeout_s=0\) must be a positive number of seconds, or None"),
    (dict(wait_s=None), r"Hook\(wait_s=None\) must be a positive number of seconds"),
    (dict(wait_s=float("inf")), r"Hook\(wait_s=inf\)"),
])
def test_bad_hook_limits_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        Hook("true", **options)


def test_a_checkpoint_pruned_before_its_hook_s_turn_is_skipped_quietly(tmp_path, tokenizer, llama, caplog):
    log = tmp_path / "hooked"
    script = 'if [ "$0" = step_2 ]; then sleep 3; fi; echo "$0" >> "$1"'  # step_4 is pruned (keep_last=1) meanwhile
    callback = CheckpointCallback(FullModel(), keep_last=1, on_published=Hook(["sh", "-c", script, "{name}", str(log)]))
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path / "out", callback, max_steps=6).train()
    assert log.read_text().split() == ["step_2", "step_6", "final"]
    skipped = [r.getMessage() for r in caplog.records if "before its turn" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].endswith("is not run for step_4: pruned (keep_last) before its turn")
    assert not warnings_of(caplog)
