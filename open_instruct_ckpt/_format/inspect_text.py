"""What `open-instruct-ckpt inspect` prints: the facts `_inspect.describe` found, as aligned lines."""

from __future__ import annotations

from typing import Any

from .manifest import MANIFEST_NAME
from .units import human_bytes


def lines(info: dict[str, Any]) -> list[str]:
    """`inspect`'s text: one line per fact of `_inspect.describe`, then the files."""
    complete = "yes (manifest valid, files present with their sizes)" if info["complete"] else f"no: {info['problem']}"
    lines = [info["path"], f"  complete:    {complete}", f"  step:        {info['step']}",
             f"  strategy:    {info['strategy']}"]
    if info["part_of"]:
        lines.append(f"  part of:     {info['part_of']} (its {MANIFEST_NAME} lists these files)")
    lines += _model_lines(info)
    generation = info["generation_config"]
    if generation:
        eos = ", ".join(f"{i} {t!r}" if t is not None else str(i)
                        for i, t in zip(generation["eos_token_id"], generation["eos_tokens"]))
        lines.append(f"  generation:  eos_token_id [{eos}], bos {generation['bos_token_id']}, "
                     f"pad {generation['pad_token_id']}")
    if info["tokenizer"]:
        tok = info["tokenizer"]
        lines.append(f"  tokenizer:   {tok['class']}, vocab {tok['vocab_size']}, eos {tok['eos_token']!r}, "
                     f"pad {tok['pad_token']!r}")
    if info["linked_from"]:
        lines.append(f"  final/:      hard links to {info['linked_from']} (shares its files, not a copy)")
    elif info["final_links_here"]:
        lines.append("  final/:      hard links to this checkpoint (shares its files, not a copy)")
    lines.append(f"  files:       {len(info['files'])}, {human_bytes(info['total_bytes'])}")
    lines += [f"    {name:<40} {human_bytes(size):>10}" for name, size in info["files"].items()]
    return lines


def _model_lines(info: dict[str, Any]) -> list[str]:
    """The weights, the model and the adapter; a model inside (merged LoRA's `merged/`) on a line of its own."""
    lines = []
    if info["weights"]:
        lines.append(f"  weights:     {_weights(info['weights'])}")
    if info["config"]:
        lines.append(f"  model:       {_architectures(info['config'])}, config dtype {info['config']['dtype']}")
    if info["adapter"]:
        adapter = info["adapter"]
        lines.append(f"  adapter:     {adapter['peft_type']} r={adapter['r']} on {adapter['target_modules']}, "
                     f"base {adapter['base_model_name_or_path'] or '(not set: AutoPeftModel cannot load it)'}")
    for sub, inside in info["models_inside"].items():
        model = _architectures(inside["config"]) if inside["config"] else "no config.json"
        weights = _weights(inside["weights"]) if inside["weights"] else "no readable weights"
        lines.append(f"  {sub + '/:':<13}{model}, {weights} (inspect {info['path']}/{sub})")
    return lines


def _weights(weights: dict[str, Any]) -> str:
    return f"{weights['parameters']:,} parameters in {weights['tensors']} tensors, dtype {', '.join(weights['dtypes'])}"


def _architectures(config: dict[str, Any]) -> str:
    names = config["architectures"]
    names = ", ".join(map(str, names)) if isinstance(names, list) and names else "?"
    return f"{names} ({config['model_type']})"
