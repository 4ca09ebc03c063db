"""Generation configs for saved checkpoints: built as copies, validated, never set on the live model."""

from __future__ import annotations

import copy
import difflib
from typing import Any, Union

from torch import nn
from transformers import GenerationConfig

OLMO_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
PRESETS = ("default", "olmo")
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

GenerationConfigSpec = Union[None, str, dict, GenerationConfig]

# What `generate()` (its logits processors and beam search) refuses at run time; strict
# `GenerationConfig.validate` lets these through, and the checkpoint would fail only when used.
_GENERATE_LIMITS = {
    "num_beams": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_return_sequences": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_length": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_length": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "no_repeat_ngram_size": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_spec(spec: Any) -> None:
    """Raise early (at construction) for a `generation_config` argument that can never work."""
    if spec is None or isinstance(spec, GenerationConfig) or (isinstance(spec, str) and spec in PRESETS):
        return
    if not isinstance(spec, dict):
        raise ValueError(
            f"generation_config={spec!r} is not supported; pass None (automatic), 'default', 'olmo', "
            "a dict of GenerationConfig fields, or a transformers.GenerationConfig"
        )
    _check_values(spec)
    try:
        unknown = GenerationConfig().update(**copy.deepcopy(spec))
    except ValueError as exc:
        raise ValueError(f"invalid generation config for the checkpoint: {exc}") from exc
    if unknown:
        raise ValueError(f"generation_config has unknown fields {sorted(unknown)}{_suggestion(unknown)}")


def _suggestion(unknown: dict) -> str:
    known = list(GenerationConfig().to_dict())
    guesses = [f"{name!r} -> {match[0]!r}" for name in unknown if (match := difflib.get_close_matches(name, known, 1))]
    return f"; did you mean {', '.join(guesses)}?" if guesses else "; see transformers.GenerationConfig for the fields"


def _check_values(values: dict[str, Any]) -> None:
    for field, (allowed, requirement) in _GENERATE_LIMITS.items():
        if values.get(field) is not None and not allowed(values[field]):
            raise ValueError(
                f"generation config {field}={values[field]!r} must be {requirement}: generate() would fail on "
                "the saved checkpoint"
            )
    for field in TOKEN_FIELDS:
        _ids(field, values.get(field))


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if it is a real token of `tokenizer` (token -> id -> token round-trips)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None:
        return None
    back = tokenizer.convert_ids_to_tokens([ids[0]])
    return ids[0] if back and back[0] == token else None


def default_generation_config(model: nn.Module, tokenizer: Any) -> GenerationConfig:
    """A copy of the model's generation config with unset bos/eos/pad ids taken from the tokenizer."""
    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if isinstance(own, GenerationConfig) else GenerationConfig()
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, field, None) is None:
            setattr(config, field, getattr(tokenizer, field, None))
    return config


def olmo_generation_config(tokenizer: Any, base: GenerationConfig | None = None) -> GenerationConfig:
    """OLMo chat preset: stop on both `<|im_end|>` and `<|endoftext|>`.

    Raises `ValueError` naming a token that is not a real token of `tokenizer`.
    """
    eos = []
    for token in OLMO_EOS_TOKENS:
        found = token_id(tokenizer, token)
        if found is None:
            raise ValueError(
                f"generation_config='olmo' needs the token {token!r}, which this tokenizer does not have "
                f"(it must map to an id and back); add it with tokenizer.add_special_tokens or use "
                "generation_config='default'"
            )
        eos.append(found)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.eos_token_id = eos
    for field in ("bos_token_id", "pad_token_id"):
        if getattr(config, field, None) is None:
            setattr(config, field, getattr(tokenizer, field, None))
    return config


def build(spec: GenerationConfigSpec, model: nn.Module, tokenizer: Any) -> GenerationConfig:
    """The generation config to save with `model`, validated against it."""
    config = _resolve(spec, model, tokenizer)
    validate(config, model)
    return config


def _resolve(spec: GenerationConfigSpec, model: nn.Module, tokenizer: Any) -> GenerationConfig:
    if isinstance(spec, GenerationConfig):
        return copy.deepcopy(spec)
    default = default_generation_config(model, tokenizer)
    if spec == "olmo" or (spec is None and _looks_like_olmo_chat(model, tokenizer)):
        return olmo_generation_config(tokenizer, base=default)
    if isinstance(spec, dict):
        default.update(**copy.deepcopy(spec))
    return default


def _looks_like_olmo_chat(model: nn.Module, tokenizer: Any) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("olmo") and all(token_id(tokenizer, t) is not None for t in OLMO_EOS_TOKENS)


def validate(config: GenerationConfig, model: nn.Module) -> None:
    """Strict transformers validation plus every token id inside the model's vocabulary."""
    try:
        config.validate(strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid generation config for the checkpoint: {exc}") from exc
    _check_values(config.to_dict())
    vocab_size = _vocab_size(model)
    for field in TOKEN_FIELDS:
        for value in _ids(field, getattr(config, field, None)):
            if vocab_size is not None and not 0 <= value < vocab_size:
                raise ValueError(
                    f"generation config {field}={value} is outside the model's vocabulary of {vocab_size} "
                    f"embeddings; fix the token id or resize the embeddings (model.resize_token_embeddings)"
                )


def _ids(field: str, value: Any) -> list[int]:
    if value is None:
        return []
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if not ids or not all(_is_int(v) for v in ids):
        raise ValueError(
            f"generation config {field}={value!r} must be a token id (an int) or a non-empty list of them; look the "
            "id up with tokenizer.convert_tokens_to_ids(token)"
        )
    return ids


def _vocab_size(model: nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)
