"""A real consumer of `on_published`: lm-eval (EleutherAI's evaluation harness) evaluates each published checkpoint
through its own loader (`--model hf --model_args pretrained={path}`), offline, on a local multiple-choice task.

lm-eval pulls in datasets, pandas, pyarrow, scikit-learn, nltk and more, so it is not in the test extra:
`tox -e lmeval` installs `.[test,eval]` and runs this file, and `.ci/run` runs that environment. Elsewhere
the test is skipped.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, Hook

pytest.importorskip("lm_eval", reason="needs lm-eval: `tox -e lmeval` installs it and runs this test")

TASK = "tiny_checkpoints"
DOCS = [  # words of the tiny tokenizer's vocabulary
    {"context": "the model saves", "choices": ["checkpoints", "tokens"], "answer": 0},
    {"context": "lora adapters and", "choices": ["zero", "writes"], "answer": 1},
    {"context": "a model writes tokens to", "choices": ["disk", "three"], "answer": 0},
    {"context": "checkpoints under", "choices": ["the", "zero"], "answer": 1},
]


def local_task(directory) -> None:
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
    )


def test_lm_eval_evaluates_the_checkpoint_the_run_publishes(tmp_path, tokenizer, llama, monkeypatch, caplog):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks, results = tmp_path / "tasks", tmp_path / "results"
    tasks.mkdir()
    local_task(tasks)
    hook = Hook([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", "pretrained={path},dtype=float32",
                 "--tasks", TASK, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
                 "--output_path", f"{results}/{{name}}"], timeout_s=300, wait_s=600)
    callback = CheckpointCallback(FullModel(), on_published=hook)
    # one evaluation (about 20 s, most of it lm-eval's start-up): final/ only; tests/test_hooks.py runs one per step
    make_trainer(llama, tokenizer, tmp_path / "out", callback, max_steps=2, save_strategy="no").train()
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    [found] = (results / "final").rglob("results_*.json")
    report = json.loads(found.read_text())
    accuracy = report["results"][TASK]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and report["n-samples"][TASK]["effective"] == len(DOCS)
    model_args = report["config"]["model_args"]
    pretrained = model_args["pretrained"] if isinstance(model_args, dict) else model_args
    assert str(tmp_path / "out" / "final") in pretrained
