"""Our log lines follow the Trainer's log level, and print like the Trainer's own when nothing configured logging;
the writer logs one line per save."""

import logging
import subprocess
import sys
import textwrap

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel

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


def test_one_log_line_per_save_on_the_writer(tmp_path, tokenizer, llama, caplog):
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved checkpoint")]
    assert len(saved) == 2
    assert str(tmp_path / "step_2") in saved[0] and " bytes in " in saved[0]
