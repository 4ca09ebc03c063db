"""Rank-0 peak memory of a FullModel save under 2-process torch FSDP2 (gloo on CPU), vs model bytes.

Run by hand:  python benchmarks/fsdp2_peak_memory.py [--hidden 1024 --layers 12 --shard 50MB]
It launches itself under torchrun once per mode, in fresh processes so each peak stands alone:
  unsharded       FullModel()                       streams module by module into one file
  sharded         FullModel(max_shard_size=SHARD)   writes each shard as soon as it is full
  get_state_dict  accelerate's FSDP2 `Accelerator.get_state_dict` (get_model_state_dict with
                  full_state_dict=True, cpu_offload=True), then rank 0 writes it: what the Trainer
                  does for its own FULL_STATE_DICT checkpoints, for comparison
The model is built on the meta device and sharded there (fully_shard per decoder layer, then the
root, as accelerate wraps it), so no rank ever holds it whole before the save: the increase of
rank 0's peak RSS (VmHWM) over its RSS before the save is the cost of the save.
"""

from pathlib import Path

import _peak_memory

MODES = ("unsharded", "sharded", "get_state_dict")


def build_sharded_model(hidden: int, layers: int):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")  # only this rank's shards are ever allocated
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().normal_(0.0, 0.02, generator=generator)
    return model


def write_accelerate_state_dict(model, directory: Path | None) -> None:
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # accelerate's FSDP2 get_state_dict
    if directory is not None:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def worker(opts) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    _peak_memory.measure(opts, build_sharded_model(opts.hidden, opts.layers), write_accelerate_state_dict)


def main() -> None:
    opts = _peak_memory.parse(__doc__, MODES)
    if opts.mode:
        return worker(opts)
    _peak_memory.run_all(__file__, MODES, opts, {})


if __name__ == "__main__":
    main()
