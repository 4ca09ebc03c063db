"""Our log lines follow the Trainer's log level, and print like the Trainer's own when nothing configured logging."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    from conftest import make_trainer
    from open_instruct_ckpt import CheckpointCallback, FullModel
    from open_instruct_ckpt.tiny import llama_model, llama_tokenizer
    tokenizer = llama_tokenizer()
    make_trainer(llama_model(tokenizer), tokenizer, sys.argv[1], CheckpointCallback(FullModel()), max_steps=2,
                 log_level=sys.argv[2]).train()
""")


def run(tmp_path, level):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / level), level], capture_output=True,
                          text=True, timeout=300, cwd=str(__import__("pathlib").Path(__file__).parent))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_log_level_info_shows_saves_and_warning_hides_them(tmp_path):
    info = run(tmp_path, "info")
    assert f"Saved checkpoint {tmp_path / 'info' / 'step_2'}: " in info
    assert "Trainer checkpoints are skipped: save_only_model=True" in info
    assert "Saved checkpoint" not in run(tmp_path, "warning")
