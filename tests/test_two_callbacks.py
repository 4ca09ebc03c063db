"""Two CheckpointCallbacks in one Trainer (a PPO-style policy and value head, each in its own output_dir):
each saves on the Trainer's schedule, whatever the other did to `control.should_save`; preemption reaches both."""

import signal

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from conftest import entries, training_args
from open_instruct_ckpt import CheckpointCallback, ModelAttribute, verify_checkpoint
from open_instruct_ckpt.tiny import PolicyAndValue, TinyTextDataset, llama_model


def two_callback_trainer(tmp_path, tokenizer, policy_dir, value_dir, **overrides):
    model = PolicyAndValue(llama_model(tokenizer))
    callbacks = [CheckpointCallback(ModelAttribute("policy"), output_dir=policy_dir),
                 CheckpointCallback(ModelAttribute("value_head"), output_dir=value_dir)]
    trainer = Trainer(model=model, args=training_args(tmp_path / "trainer", **overrides), processing_class=tokenizer,
                      train_dataset=TinyTextDataset(len(tokenizer)), callbacks=callbacks)
    return trainer, model, callbacks


@pytest.mark.parametrize("save_strategy", ["steps", "epoch"])
def test_each_callback_saves_every_scheduled_step(tmp_path, tokenizer, save_strategy):
    overrides = dict(max_steps=4) if save_strategy == "steps" else dict(max_steps=-1, num_train_epochs=2)
    trainer, model, _ = two_callback_trainer(tmp_path, tokenizer, tmp_path / "policy", tmp_path / "value",
                                             save_strategy=save_strategy, **overrides)
    trainer.train()
    expected = {"step_2", "step_4", "final"} if save_strategy == "steps" else {"step_16", "step_32", "final"}
    assert entries(tmp_path / "policy") == expected and entries(tmp_path / "value") == expected
    for name in expected:
        assert verify_checkpoint(tmp_path / "policy" / name) == [] and verify_checkpoint(tmp_path / "value" / name) == []
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "policy" / "final") is not None
    value = load_file(tmp_path / "value" / "final" / "model.safetensors")
    assert value.keys() == {"weight", "bias"} and value["weight"].equal(model.value_head.weight.detach())
    assert not [p for p in (tmp_path / "trainer").glob("checkpoint-*")]  # save_only_model: the Trainer's stay off


def test_two_callbacks_in_one_output_dir_are_refused_when_the_trainer_is_built(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"two CheckpointCallbacks of this Trainer write into output_dir .*give each "
                                         r"its own directory"):
        two_callback_trainer(tmp_path, tokenizer, tmp_path / "shared", tmp_path / "shared")
    with pytest.raises(ValueError, match=r"two CheckpointCallbacks of this Trainer write into output_dir"):
        two_callback_trainer(tmp_path, tokenizer, None, None)  # both default to args.output_dir
    assert not (tmp_path / "shared").exists()


class SignalAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            signal.raise_signal(signal.SIGUSR1)


def test_a_preemption_signal_reaches_both_callbacks(tmp_path, tokenizer):
    trainer, _, callbacks = two_callback_trainer(tmp_path, tokenizer, tmp_path / "policy", tmp_path / "value",
                                                 max_steps=10)
    trainer.add_callback(SignalAtStep(3))
    before = signal.getsignal(signal.SIGUSR1)
    trainer.train()
    assert trainer.state.global_step == 3 and all(callback.preempted for callback in callbacks)
    assert entries(tmp_path / "policy") == {"step_2", "step_3"} == entries(tmp_path / "value")
    assert signal.getsignal(signal.SIGUSR1) == before  # both watches gave the handler back
