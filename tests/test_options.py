"""Grouped options: each object is checked when it is built, with the value and the fix; the deprecated keywords
still work (with a DeprecationWarning naming the new spelling) and behave exactly as the new objects do."""

from __future__ import annotations

import json
import warnings

import pytest

from conftest import entries, make_trainer
from open_instruct_ckpt import AutoInterval, CheckpointCallback, FullModel, Retry, TrainerInterval, Upload
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt.tiny import llama_model


@pytest.mark.parametrize("build,match", [
    (lambda: AutoInterval(), r"AutoInterval chooses the interval from the failure rate: pass mtbf_hours="),
    (lambda: AutoInterval(mtbf_hours=24, failure_probability=0.1), r"pass mtbf_hours or failure_probability, not both"),
    (lambda: TrainerInterval(mtbf_hours=0), r"TrainerInterval\(mtbf_hours=0\): must be a positive, finite number"),
    (lambda: AutoInterval(mtbf_hours=float("inf")), r"mtbf_hours=inf\): must be a positive, finite number"),
    (lambda: AutoInterval(mtbf_hours=float("nan")), r"mtbf_hours=nan\): must be a positive, finite number"),
    (lambda: AutoInterval(mtbf_hours=1e307), r"mtbf_hours=1e\+307\) is outside \[0.000277778, 8.76e\+09\] hours"),
    (lambda: AutoInterval(failure_probability=float("nan")), r"failure_probability=nan\): must be a positive, finite"),
    (lambda: AutoInterval(failure_probability=1e-300), r"failure_probability=1e-300\) is below 1e-12"),
    (lambda: TrainerInterval(failure_probability=2.0), r"failure_probability=2.0\) is a probability: use a number"),
    (lambda: AutoInterval(mtbf_hours=24, max_steps=0), r"AutoInterval\(max_steps=0\) must be a positive int of steps"),
    (lambda: Retry(max_delay_s=-1), r"Retry\(max_delay_s=-1\) must be a number of seconds >= 0"),
])
def test_bad_options_name_the_value_and_the_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("keywords,match", [
    (dict(save_interval="often"), r"save_interval='often' must be 'trainer' .* or 'auto'"),
    (dict(save_interval="auto"), r"AutoInterval chooses the interval from the failure rate"),
    (dict(mtbf_hours=24, max_save_interval=100), r"max_save_interval bounds save_interval='auto'; pass "
                                                 r"interval=AutoInterval\(\.\.\., max_steps=N\)"),
    (dict(upload_wait_s=-5), r"\['wait_s'\] configure an upload but upload_to is missing; pass upload=Upload\(to="),
])
def test_deprecated_keywords_are_checked_as_strictly(keywords, match):
    with pytest.raises(ValueError, match=match):
        CheckpointCallback(FullModel(), **keywords)


def test_unknown_keywords_and_both_spellings_at_once_are_refused(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'upload_too'"):
        CheckpointCallback(FullModel(), upload_too=str(tmp_path))
    with pytest.raises(TypeError, match=r"got both interval= and the deprecated keywords \['mtbf_hours'\]"):
        CheckpointCallback(FullModel(), interval=TrainerInterval(), mtbf_hours=24)


def run(tmp_path, tokenizer, name, **options):
    callback = CheckpointCallback(FullModel(), keep_last=1, **options)
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path / name, callback, max_steps=6, save_steps=2).train()
    record = json.loads((tmp_path / name / RUN_RECORD_NAME).read_text())
    return entries(tmp_path / name), entries(tmp_path / f"{name}-remote"), record


def test_old_and_new_spellings_behave_the_same(tmp_path, tokenizer):
    new = run(tmp_path, tokenizer, "new", interval=AutoInterval(mtbf_hours=1e6, max_steps=4),
              upload=Upload(to=str(tmp_path / "new-remote"), wait_s=60, timeout_s=30))
    with pytest.warns(DeprecationWarning) as caught:
        old = run(tmp_path, tokenizer, "old", save_interval="auto", mtbf_hours=1e6, max_save_interval=4,
                  upload_to=str(tmp_path / "old-remote"), upload_wait_s=60, upload_timeout_s=30)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("pass interval=AutoInterval(mtbf_hours=1000000.0" in m for m in messages)
    assert any("pass upload=Upload(to=" in m and "upload_to=..." in m for m in messages)
    assert new[:2] == old[:2] == ({"step_6", "final"}, {"step_6", "final"})
    keys = ("save_interval", "mtbf_hours", "failure_probability", "keep_last", "current_interval", "total_steps")
    assert {k: new[2][k] for k in keys} == {k: old[2][k] for k in keys}


def test_the_common_case_needs_no_options():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback = CheckpointCallback(FullModel())
    assert callback.writers == "main" and not callback.async_save
