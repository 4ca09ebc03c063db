"""A progress bar (bytes written) on the writer for saves longer than about a second, unless
`TrainingArguments(disable_tqdm=True)`; a short save prints nothing."""

from conftest import SlowFullModel, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt._write.saver import save_once
from open_instruct_ckpt.tiny import llama_model


def test_a_long_save_shows_a_bar_unless_disable_tqdm(tmp_path, tokenizer, capsys):
    for name, disable in (("shown", False), ("hidden", True)):
        make_trainer(llama_model(tokenizer), tokenizer, tmp_path / name, CheckpointCallback(SlowFullModel(delay=1.3)),
                     max_steps=2, disable_tqdm=disable).train()
        err = capsys.readouterr().err
        assert ("saving step_2" in err) is not disable


def test_a_short_save_shows_no_bar(tmp_path, tokenizer, llama, capsys):
    save_once(FullModel(), llama, tokenizer, tmp_path, "step_2", 2, show_progress=True)
    assert "saving step_2" not in capsys.readouterr().err
