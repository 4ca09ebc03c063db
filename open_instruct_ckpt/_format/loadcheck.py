"""`verify --load`: open a checkpoint with the stock loaders, as its user would.

- an adapter (`adapter_config.json`): PEFT's `AutoPeftModelForCausalLM` (or `AutoPeftModel` for
  another task), which loads the base model from `base_model_name_or_path`;
- a model (`config.json`): the class named in `config.architectures`, `from_pretrained`, with
  missing, unexpected or mismatched weights counted as a failure; then `AutoTokenizer` and
  `GenerationConfig` when their files are there;
- plain weights (a `ModelAttribute` of a non-transformers module): `safetensors.torch.load_file`;
- and each model inside the checkpoint (merged LoRA's `final/merged/`) as a model.
transformers, peft and torch are imported only here, when a load is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .inspect import models_inside
from .readers import read_manifest


class LoadFailed(Exception):
    """The checkpoint did not load; the message says why and what to do."""


def load(path: Path) -> str:
    """Load the checkpoint at `path`, then each model inside it; returns a short description, raises LoadFailed
    otherwise."""
    manifest = read_manifest(path)
    inside = models_inside(manifest["files"]) if manifest is not None else []
    loaded = [_attempt("", _load_one, path)]
    loaded += [_attempt(f"{sub}/: ", _load_model, path / sub) for sub in inside]
    return "; ".join(loaded)


def _attempt(label: str, loader: Callable[[Path], str], path: Path) -> str:
    try:
        return label + loader(path)
    except LoadFailed as exc:
        raise LoadFailed(f"{label}{exc}") from exc
    except Exception as exc:  # any loader error is the verdict: report it in one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LoadFailed(f"{label}{type(exc).__name__}: {first_line}") from exc


def _load_one(path: Path) -> str:
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path)
    if (path / "config.json").is_file():
        return _load_model(path)
    return _load_tensors(path)


def _load_model(path: Path) -> str:
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    cls = cls or transformers.AutoModel
    model, info = cls.from_pretrained(path, output_loading_info=True)
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys")
    wrong = {key: sorted(map(str, info.get(key) or ())) for key in keys}
    wrong = {key: names for key, names in wrong.items() if names}
    if wrong:
        raise LoadFailed(f"{cls.__name__}.from_pretrained loaded with {wrong}")
    parts = [f"{cls.__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)"]
    if (path / "tokenizer_config.json").is_file():
        parts.append(type(transformers.AutoTokenizer.from_pretrained(path)).__name__)
    if (path / "generation_config.json").is_file():
        eos = transformers.GenerationConfig.from_pretrained(path).eos_token_id
        parts.append(f"GenerationConfig (eos_token_id={eos})")
    return ", ".join(parts)


def _load_adapter(path: Path) -> str:
    config = json.loads((path / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise LoadFailed(
            "adapter_config.json has no base_model_name_or_path, so AutoPeftModelForCausalLM cannot find the base "
            "model; before training set model.peft_config['default'].base_model_name_or_path to the base model's "
            "directory, or load with PeftModel.from_pretrained(base_model, DIR)"
        )
    import peft

    cls = peft.AutoPeftModelForCausalLM if config.get("task_type") == "CAUSAL_LM" else peft.AutoPeftModel
    model = cls.from_pretrained(str(path))
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return f"{cls.__name__} over {base} ({trainable:,} adapter parameters)"


def _load_tensors(path: Path) -> str:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadFailed("no config.json, adapter_config.json or .safetensors file: nothing a loader could open")
    tensors = [t for f in files for t in load_file(f).values()]
    return f"safetensors ({len(tensors)} tensors, {sum(t.numel() for t in tensors):,} parameters)"
