"""ModelAttribute: one submodule of a composite model, prefix stripped, loadable on its own."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from conftest import entries, logits, make_trainer
from open_instruct_ckpt import CheckpointCallback, ModelAttribute
from open_instruct_ckpt.tiny import PolicyAndValue, llama_model


class Actor(torch.nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.model = policy


class NestedComposite(torch.nn.Module):
    """`actor.model` is the policy: a nested attribute path."""

    def __init__(self, policy):
        super().__init__()
        self.actor = Actor(policy)
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)

    def forward(self, input_ids, labels=None, **kwargs):
        out = self.actor.model(input_ids=input_ids, labels=labels, output_hidden_states=True)
        return {"loss": out.loss + self.value_head(out.hidden_states[-1]).pow(2).mean()}


class RecordPolicyLogits(TrainerCallback):
    def __init__(self, get_policy, tokenizer):
        self.get_policy, self.tokenizer, self.by_step = get_policy, tokenizer, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = logits(self.get_policy(model), self.tokenizer).clone()
        model.train()


@pytest.mark.parametrize(
    ("wrap", "attribute", "get_policy"),
    [
        (PolicyAndValue, "policy", lambda m: m.policy),
        (NestedComposite, "actor.model", lambda m: m.actor.model),
    ],
)
def test_policy_loads_on_its_own_with_identical_logits(tmp_path, tokenizer, wrap, attribute, get_policy):
    composite = wrap(llama_model(tokenizer))
    recorder = RecordPolicyLogits(get_policy, tokenizer)
    trainer = make_trainer(composite, tokenizer, tmp_path, CheckpointCallback(ModelAttribute(attribute)))
    trainer.add_callback(recorder)
    trainer.train()
    for name, step in (("step_2", 2), ("final", 4)):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert torch.equal(logits(loaded, tokenizer), recorder.by_step[step])
    keys = load_file(tmp_path / "final" / "model.safetensors")
    assert "model.embed_tokens.weight" in keys
    assert not any(k.startswith(("policy.", "actor.", "value_head")) for k in keys)


def test_plain_submodule_is_saved_as_plain_safetensors(tmp_path, tokenizer):
    composite = PolicyAndValue(llama_model(tokenizer))
    make_trainer(composite, tokenizer, tmp_path, CheckpointCallback(ModelAttribute("value_head"))).train()
    assert {"model.safetensors", "checkpoint.json", "tokenizer.json"} <= entries(tmp_path / "final")
    assert "config.json" not in entries(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert set(saved) == {"weight", "bias"}
    assert torch.equal(saved["weight"], composite.value_head.weight.detach())


def test_missing_attribute_is_named_in_the_error(tmp_path, tokenizer):
    composite = PolicyAndValue(llama_model(tokenizer))
    with pytest.raises(ValueError, match=r"ModelAttribute\('critic'\): PolicyAndValue has no attribute 'critic' "
                                         r"\(its submodules: policy, value_head\)"):
        make_trainer(composite, tokenizer, tmp_path, CheckpointCallback(ModelAttribute("critic")))


@pytest.mark.parametrize("name", ["", "../policy", "policy/x", "a\\b", "..", "a..b", ".policy"])
def test_malformed_attribute_names_are_rejected_at_construction(name):
    with pytest.raises(ValueError, match=r"ModelAttribute\(.*\): "):
        ModelAttribute(name)
