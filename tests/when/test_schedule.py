"""When the callback saves: exactly when the Trainer's own decision says so, plus final/ at the end."""


from transformers import AutoModelForCausalLM

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel


def test_ratio_save_steps_with_save_only_model(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=14, save_steps=0.4).train()
    assert entries(tmp_path) == {"step_6", "step_12", "step_14", "final"}


def test_epoch_strategy_saves_at_each_epoch_end(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel())
    make_trainer(llama, tokenizer, tmp_path, callback, rows=16, max_steps=-1, num_train_epochs=2, save_strategy="epoch").train()
    assert entries(tmp_path) == {"step_4", "step_8", "final"}


def test_no_save_strategy_writes_only_final(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_strategy="no").train()
    assert entries(tmp_path) == {"final"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final") is not None
