"""What `open-instruct-ckpt inspect` prints: the facts `_inspect.describe` found, as aligned lines."""

from __future__ import annotations

from typing import Any

from ._advisor import human_bytes


def lines(info: dict[str, Any]) -> list[str]:
    """`inspect`'s text: one line per fact of `_inspect.describe`, then the files."""
    complete = "yes (manifest valid, files present with their sizes)" if info["complete"] else f"no: {info['problem']}"
    lines = [info["path"], f"  complete:    {complete}", f"  step:        {info['step']}",
             f"  strategy:    {info['strategy']}"]
    weights, config = info["weights"], info["config"]
    if weights:
        lines.append(f"  weights:     {weights['parameters']:,} parameters in {weights['tensors']} tensors, "
                     f"dtype {', '.join(weights['dtypes'])}")
    if config:
        lines.append(f"  model:       {', '.join(config['architectures'] or ['?'])} ({config['model_type']}), "
                     f"config dtype {config['dtype']}")
    if info["adapter"]:
        adapter = info["adapter"]
        lines.append(f"  adapter:     {adapter['peft_type']} r={adapter['r']} on {adapter['target_modules']}, "
                     f"base {adapter['base_model_name_or_path'] or '(not set: AutoPeftModel cannot load it)'}")
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
