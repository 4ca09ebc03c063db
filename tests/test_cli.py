"""The command line, through real subprocesses: fast start-up, one-line mistakes, documented exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, LoRAAdapter, TrainerInterval
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt._write.saver import save_once
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

ENTRY_POINT = Path(sys.executable).parent / "open-instruct-ckpt"
COSTS = ("--save-seconds", 30, "--step-seconds", 2, "--mtbf-hours", 24)  # later options win


def cli(*args: object, entry_point: bool = False) -> subprocess.CompletedProcess:
    command = [str(ENTRY_POINT)] if entry_point else [sys.executable, "-m", "open_instruct_ckpt.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, code: int = 2) -> str:
    assert done.returncode == code and done.stdout == "", done
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run: step_2, step_4, final/ (hard links to step_4), and its run record."""
    out = tmp_path_factory.mktemp("run") / "out"
    tokenizer = llama_tokenizer()
    callback = CheckpointCallback(FullModel(), interval=TrainerInterval(mtbf_hours=24))
    make_trainer(llama_model(tokenizer), tokenizer, out, callback).train()
    return out


@pytest.fixture
def run_copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "out", symlinks=True))


def test_importing_the_cli_loads_neither_torch_nor_transformers():
    code = ("import sys, open_instruct_ckpt, open_instruct_ckpt.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'tqdm', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_public_names_still_resolve_lazily():
    code = ("import sys, open_instruct_ckpt as p; assert 'torch' not in sys.modules; "
            "names = [getattr(p, n).__name__ for n in p.__all__]; print('torch' in sys.modules, len(names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "17"]


def test_help_documents_commands_and_exit_codes():
    done = cli("--help", entry_point=True)
    assert done.returncode == 0
    for word in ("list", "latest", "inspect", "verify", "advise", "demo", "exit codes:", "0  success", "2  a usage"):
        assert word in done.stdout


def test_list_shows_order_completeness_size_and_latest(run_copy):
    shutil.copytree(run_copy / "step_4", run_copy / "step_6")
    (run_copy / "step_6" / "model.safetensors").unlink()
    (run_copy / ".tmp-step_8-0123456789ab").mkdir()
    done = cli("list", run_copy)
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:3] for line in done.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["step_2", "step_4", "final", "step_6", ".tmp-step_8-0123456789ab"]
    lines = done.stdout.splitlines()
    assert lines[3].endswith("complete  latest  (hard links to step_4)") and lines[3].startswith("final")
    assert "incomplete (model.safetensors: missing)" in lines[4]
    assert "incomplete (being written, or left by an interrupted save)" in lines[5]
    assert "KiB" in lines[1] and "complete" in lines[1]


def test_latest_prints_the_path_for_scripts(run, tmp_path):
    done = cli("latest", run, entry_point=True)
    assert done.returncode == 0 and done.stdout == f"{run / 'final'}\n"
    (tmp_path / "empty").mkdir()
    assert one_line_error(cli("latest", tmp_path / "empty"), 1) == f"open-instruct-ckpt latest: no complete checkpoint in {tmp_path / 'empty'}"


def test_inspect_text_and_json(run):
    done = cli("inspect", run / "step_4")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for expected in ("complete:    yes", "step:        4", "strategy:    FullModel(max_shard_size=None)",
                     "dtype F32", "LlamaForCausalLM (llama)", "eos_token_id [2 '</s>']",
                     "final/:      hard links to this checkpoint", "model.safetensors"):
        assert expected in text
    info = json.loads(cli("inspect", run / "final", "--json").stdout)
    tokenizer = llama_tokenizer()
    assert info["weights"]["parameters"] == sum(p.numel() for p in llama_model(tokenizer).parameters())
    assert info["generation_config"]["eos_token_id"] == [tokenizer.eos_token_id]
    assert info["linked_from"] == "step_4" and info["complete"] and info["step"] == 4
    assert info["save_stats"]["bytes"] == info["total_bytes"]


def test_inspect_an_incomplete_checkpoint_exits_1(run_copy):
    (run_copy / "step_2" / "config.json").unlink()
    done = cli("inspect", run_copy / "step_2")
    assert done.returncode == 1 and "complete:    no: config.json: missing" in done.stdout


def test_verify_exit_codes_and_every_path_reported_after_a_damaged_one(run_copy, tmp_path):
    assert cli("verify", run_copy / "step_2", run_copy / "final").returncode == 0
    (run_copy / "step_2" / "tokenizer.json").write_text("{}")
    manifest = json.loads((run_copy / "step_4" / "checkpoint.json").read_text())
    manifest["files"]["config.json"] = 7  # a manifest of the wrong shape: reported, never a traceback
    (run_copy / "step_4" / "checkpoint.json").write_text(json.dumps(manifest))
    done = cli("verify", run_copy / "step_2", run_copy / "step_4", run_copy / "final", tmp_path / "missing")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert f"{run_copy / 'step_2'}: CORRUPT\n  tokenizer.json: size 2 bytes" in done.stdout
    assert f"{run_copy / 'step_4'}: CORRUPT" in done.stdout and "file entry 'config.json': not a mapping" in done.stdout
    assert f"{run_copy / 'final'}: OK" in done.stdout and f"{tmp_path / 'missing'}: CORRUPT" in done.stdout


def test_verify_load_opens_each_checkpoint_with_the_stock_loaders(run):
    done = cli("verify", "--load", run / "final")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded LlamaForCausalLM (23,968 parameters)" in done.stdout and done.stdout.endswith("final: OK\n")


def test_verify_an_output_directory_checks_each_checkpoint(run_copy):
    (run_copy / "step_2" / "config.json").unlink()
    done = cli("verify", run_copy)
    assert done.returncode == 1
    assert [line.split(": ")[0] for line in done.stdout.splitlines() if not line.startswith(" ")] == [
        str(run_copy / name) for name in ("step_4", "final", "step_2")  # as `list` orders them: incomplete last
    ]
    assert f"{run_copy / 'step_2'}: CORRUPT" in done.stdout and f"{run_copy / 'final'}: OK" in done.stdout


def test_demo_refuses_an_output_directory_with_checkpoints(run):
    assert "already holds checkpoints; choose another --out" in one_line_error(cli("demo", "--out", run))


def test_verify_load_of_an_adapter_needs_its_base_model_path(tmp_path):
    tokenizer = llama_tokenizer()
    base = llama_model(tokenizer)
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    orphan = get_peft_model(llama_model(tokenizer), config)  # built in memory: no base_model_name_or_path
    save_once(LoRAAdapter(), orphan, tokenizer, tmp_path, "orphan", 1)
    anchored = get_peft_model(llama_model(tokenizer), config)
    anchored.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    save_once(LoRAAdapter(), anchored, tokenizer, tmp_path, "anchored", 1)
    done = cli("verify", "--load", tmp_path / "anchored", tmp_path / "orphan")
    assert done.returncode == 1
    assert "loaded AutoPeftModelForCausalLM over" in done.stdout and f"{tmp_path / 'anchored'}: OK" in done.stdout
    assert f"{tmp_path / 'orphan'}: CORRUPT" in done.stdout
    assert "adapter_config.json has no base_model_name_or_path" in done.stdout
    assert "base_model_name_or_path to the base model's directory" in done.stdout


def test_advise_from_costs():
    done = cli("advise", "--save-seconds", 30, "--step-seconds", 2, "--mtbf-hours", 24, "--total-steps", 10000,
               "--interval", 500)
    assert done.returncode == 0, done.stderr
    assert "optimal interval: 1138 steps (37.9 min)" in done.stdout
    assert "Young/Daly: sqrt(2 x 30 s x 24 h) = 37.9 min" in done.stdout
    table = done.stdout.split("\n\n")[1].splitlines()
    assert table[0].split()[:2] == ["interval", "every"]
    assert [row.split()[0] for row in table[1:]] == ["284", "500", "569", "1138", "2276", "4552"]
    assert json.loads(cli("advise", "--save-seconds", 30, "--step-seconds", 2, "--mtbf-hours", 24,
                          "--json").stdout)["optimal"]["steps"] == 1138


def test_advise_reads_a_runs_record(run):
    record = json.loads((run / RUN_RECORD_NAME).read_text())
    done = cli("advise", run)
    assert done.returncode == 0, done.stderr
    saves = record["saves"]
    assert f"save {sum(s['blocking_seconds'] for s in saves) / len(saves):.2f} s blocking" in done.stdout
    assert "MTBF 24 h" in done.stdout and "current interval: 2 steps" in done.stdout
    assert "MTBF 0.5 h" in cli("advise", run, "--mtbf-hours", 0.5).stdout  # the command line wins


@pytest.mark.parametrize("arguments,message", [
    (("advise", "--save-seconds", 1), "open-instruct-ckpt advise: give --step-seconds"),
    (("advise", "--save-seconds", 1, "--step-seconds", 1), "open-instruct-ckpt advise: give --mtbf-hours"),
    (("advise", "--save-seconds", 1, "--step-seconds", 1, "--failure-probability", 0.1),
     "a failure probability is per run: give the run's total steps too"),
    (("advise", "--save-seconds", "x"), "argument --save-seconds: invalid float value: 'x'"),
    (("frobnicate",), "argument COMMAND: invalid choice: 'frobnicate'"),
    (("advise", *COSTS, "--interval", 0), "advise: current interval 0 must be a whole number >= 1"),
    (("advise", *COSTS, "--interval", -5), "advise: current interval -5 must be a whole number >= 1"),
    (("advise", *COSTS, "--keep-last", -3), "advise: keep last -3 must be a whole number >= 1"),
    (("advise", *COSTS, "--checkpoint-bytes", -1000), "advise: checkpoint bytes -1000 must be a whole number >= 0"),
    (("advise", *COSTS, "--save-seconds", 1e308), "save seconds 1e+308, step seconds 2.0, mtbf hours 24.0"),
    (("advise", *COSTS, "--step-seconds", 1e-200), "is not a finite number (save seconds 30.0, step seconds 1e-200"),
    (("advise", *COSTS, "--mtbf-hours", 1e307), "is not a finite number (save seconds 30.0, step seconds 2.0, mtbf h"),
    (("verify",), "the following arguments are required: paths"),
])
def test_usage_mistakes_are_one_line(arguments, message):
    assert message in one_line_error(cli(*arguments))


@pytest.mark.parametrize("command", [["list"], ["latest"], ["inspect"], ["verify"], ["verify", "--load"], ["advise"],
                                     ["demo", "--out"]])
def test_missing_path_or_file_for_a_directory_is_one_line(command, tmp_path):
    if command[0] == "verify":
        return _verify_reports_a_missing_path_or_a_file_and_fails(command, tmp_path)
    if command[0] != "demo":  # demo creates its output directory
        assert one_line_error(cli(*command, tmp_path / "nope")).endswith(f"{tmp_path / 'nope'} does not exist")
    (tmp_path / "file").write_text("x")
    assert "is a file, not a directory" in one_line_error(cli(*command, tmp_path / "file"))


def _verify_reports_a_missing_path_or_a_file_and_fails(command, tmp_path):
    (tmp_path / "file").write_text("x")
    done = cli(*command, tmp_path / "nope", tmp_path / "file")
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == [f"{tmp_path / 'nope'}: CORRUPT", "  does not exist",
                                        f"{tmp_path / 'file'}: CORRUPT", "  is a file, not a directory"]


def test_inspect_of_an_output_directory_points_to_list(run):
    assert f"open-instruct-ckpt list {run}" in one_line_error(cli("inspect", run))


def test_advise_without_a_record_names_the_options(tmp_path):
    assert "has no readable record of its saves" in one_line_error(cli("advise", tmp_path))
    (tmp_path / RUN_RECORD_NAME).write_text('{"format": "open_instruct_ckpt-run/1", "saves": [{"step": 1}]}')
    assert "pass --save-seconds and --step-seconds" in one_line_error(cli("advise", tmp_path))


@pytest.mark.parametrize("recorded,message", [
    ({"keep_last": "3"}, "keep last '3' must be a whole number >= 1"),
    ({"saves": [{"blocking_seconds": 0.5, "bytes": "many"}]}, "checkpoint bytes 'many' must be a whole number"),
    ({"mean_step_seconds": [2]}, "step seconds [2] must be a positive number"),
    ({"saves": [{"blocking_seconds": 1e308}, {"blocking_seconds": 1e308}]}, "save seconds inf must be a number"),
])
def test_advise_names_a_bad_recorded_value_and_the_option_that_overrides_it(tmp_path, recorded, message):
    record = {"format": "open_instruct_ckpt-run/1", "mean_step_seconds": 2.0, "mtbf_hours": 24, "total_steps": 100,
              "current_interval": 10, "keep_last": 2, "saves": [{"blocking_seconds": 0.5, "bytes": 1000}], **recorded}
    (tmp_path / RUN_RECORD_NAME).write_text(json.dumps(record))
    error = one_line_error(cli("advise", tmp_path))
    assert message in error and f"(as {tmp_path / RUN_RECORD_NAME} recorded it; pass --" in error


@pytest.mark.parametrize("saves", [5, [{"blocking_seconds": 10**400}]])
def test_advise_of_a_record_with_unusable_saves_names_the_options(tmp_path, saves):
    record = {"format": "open_instruct_ckpt-run/1", "mean_step_seconds": 2.0, "saves": saves}
    (tmp_path / RUN_RECORD_NAME).write_text(json.dumps(record))
    assert "pass --save-seconds and --step-seconds" in one_line_error(cli("advise", tmp_path))


def test_advise_counts_the_checkpoints_the_runs_retention_keeps(tmp_path):
    tokenizer = llama_tokenizer()
    callback = CheckpointCallback(FullModel(), keep_last=1, interval=TrainerInterval(mtbf_hours=24))
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path, callback, save_steps=1).train()
    assert json.loads((tmp_path / RUN_RECORD_NAME).read_text())["keep_last"] == 1
    done = cli("advise", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "disk at the current interval: 1 x " in done.stdout and "disk at the optimum: 1 x " in done.stdout
    assert "disk at the current interval: 3 x " in cli("advise", tmp_path, "--keep-last", 3).stdout
