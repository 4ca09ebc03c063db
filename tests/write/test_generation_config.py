"""Generation config written with every checkpoint: presets, validation, the live model untouched."""

import json

import pytest
from transformers import GenerationConfig

from conftest import make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, default_generation_config, olmo_generation_config
from open_instruct_ckpt.tiny import llama_tokenizer, olmo_model


def saved_generation_config(directory):
    return json.loads((directory / "generation_config.json").read_text())


def test_olmo_chat_model_gets_two_real_eos_tokens_automatically(tmp_path, olmo_tok, olmo):
    before = olmo.generation_config.to_dict()
    make_trainer(olmo, olmo_tok, tmp_path, CheckpointCallback(FullModel())).train()
    im_end, endoftext = olmo_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert saved_generation_config(tmp_path / "step_2")["eos_token_id"] == [im_end, endoftext]
    assert GenerationConfig.from_pretrained(tmp_path / "final").eos_token_id == [im_end, endoftext]
    assert olmo.generation_config.to_dict() == before


def test_olmo_preset_rejects_a_token_that_only_maps_to_unk(olmo_tok):
    # `<|endoftext|>` is the unk token: `<|im_end|>` missing would map to it and not round-trip.
    tokenizer = llama_tokenizer()
    with pytest.raises(ValueError, match=r"needs the token '<\|im_end\|>', which this tokenizer does not have"):
        olmo_generation_config(tokenizer)
    assert olmo_generation_config(olmo_tok).eos_token_id == olmo_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])


def test_olmo_preset_on_a_tokenizer_without_chat_tokens_fails_at_trainer_construction(tmp_path):
    tokenizer = llama_tokenizer()
    model = olmo_model(tokenizer)
    with pytest.raises(ValueError, match=r"generation_config='olmo' needs the token '<\|im_end\|>'"):
        make_trainer(model, tokenizer, tmp_path, CheckpointCallback(FullModel(), generation_config="olmo"))


def test_olmo_model_without_chat_tokens_falls_back_to_the_default(tmp_path):
    tokenizer = llama_tokenizer()
    make_trainer(olmo_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    assert saved_generation_config(tmp_path / "final")["eos_token_id"] == tokenizer.eos_token_id


def test_default_fills_unset_ids_from_the_tokenizer_only(tokenizer, llama):
    llama.generation_config.pad_token_id = None
    llama.generation_config.eos_token_id = 1
    config = default_generation_config(llama, tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == 1
    assert llama.generation_config.pad_token_id is None


def test_token_id_outside_the_vocabulary_fails_before_training(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), generation_config={"eos_token_id": [2, 999]})
    with pytest.raises(ValueError, match=r"eos_token_id=999 is outside the model's vocabulary of 52 embeddings"):
        make_trainer(llama, tokenizer, tmp_path, callback)


def test_strict_validation_catches_what_lenient_validation_only_logs(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel(), generation_config=GenerationConfig(temperature=0.5))
    with pytest.raises(ValueError, match=r"(?s)invalid generation config for the checkpoint: .*`temperature` is set to `0.5`"):
        make_trainer(llama, tokenizer, tmp_path, callback)


def test_unknown_preset_is_rejected_at_construction():
    with pytest.raises(ValueError, match=r"generation_config='chatml' is not supported; pass None \(automatic\), 'default', 'olmo'"):
        CheckpointCallback(FullModel(), generation_config="chatml")


def test_explicit_generation_config_is_saved_as_given(tmp_path, tokenizer, llama):
    given = GenerationConfig(eos_token_id=2, pad_token_id=3, temperature=0.7, do_sample=True)
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), generation_config=given)).train()
    saved = saved_generation_config(tmp_path / "final")
    assert saved["temperature"] == 0.7 and saved["do_sample"] is True and saved["eos_token_id"] == 2


@pytest.mark.parametrize("spec,match", [
    ({"max_new_token": 5}, r"generation_config has unknown fields \['max_new_token'\]; did you mean "
                           r"'max_new_token' -> 'max_new_tokens'\?"),
    ({"num_beams": 0}, r"generation config num_beams=0 must be an integer >= 1: generate\(\) would fail"),
    ({"max_new_tokens": 0}, r"generation config max_new_tokens=0 must be an integer >= 1"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p=1.5 must be a number in \[0, 1\]"),
    ({"eos_token_id": "x"}, r"generation config eos_token_id='x' must be a token id \(an int\) or a non-empty list"),
    ({"eos_token_id": [2, None]}, r"eos_token_id=\[2, None\] must be a token id"),
])
def test_generation_config_dicts_are_checked_at_construction(spec, match):
    with pytest.raises(ValueError, match=match):
        CheckpointCallback(FullModel(), generation_config=spec)


def test_generation_config_object_is_checked_against_generate_before_training(tmp_path, tokenizer, llama):
    from transformers import GenerationConfig

    config = GenerationConfig(num_beams=2)
    config.num_beams = 0  # set after construction: only the build at on_init_end sees it
    callback = CheckpointCallback(FullModel(), generation_config=config)
    with pytest.raises(ValueError, match=r"num_beams=0 must be an integer >= 1"):
        make_trainer(llama, tokenizer, tmp_path, callback)
