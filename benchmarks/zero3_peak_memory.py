"""Rank-0 peak memory of a FullModel save under 2-process DeepSpeed ZeRO-3 (gloo on CPU), vs model bytes.

Run by hand:  python benchmarks/zero3_peak_memory.py [--hidden 1024 --layers 12 --shard 50MB]
It launches itself under torchrun once per mode, in fresh processes so each peak stands alone:
  unsharded   FullModel()                       streams module by module into one file
  sharded     FullModel(max_shard_size=SHARD)   writes each shard as soon as it is full
  gather-all  one GatheredParameters over the whole model, rank 0 copies it all (what
              stage3_gather_16bit_weights_on_model_save does), for comparison
The model is built under `deepspeed.zero.Init`, so no rank ever holds it whole before the save:
the increase of rank 0's peak RSS (VmHWM) over its RSS before the save is the cost of the save.
"""

from pathlib import Path

import _peak_memory

MODES = ("unsharded", "sharded", "gather-all")


def build_partitioned_model(hidden: int, layers: int):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = {"train_batch_size": 2, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    transformers_sees_zero3 = HfDeepSpeedConfig(config)  # weight init gathers while this object lives
    with deepspeed.zero.Init(config_dict_or_path=config):
        # No pad_token_id: transformers' init would index the (partitioned) padding row.
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False,
        ))
    del transformers_sees_zero3
    return model


def gather_all_and_write(model, directory: Path | None) -> None:
    import deepspeed
    from safetensors.torch import save_file

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if directory is not None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def worker(opts) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    _peak_memory.measure(opts, build_partitioned_model(opts.hidden, opts.layers), gather_all_and_write)


def main() -> None:
    opts = _peak_memory.parse(__doc__, MODES)
    if opts.mode:
        return worker(opts)
    extensions = Path(__file__).resolve().parents[1] / ".torch_extensions"
    _peak_memory.run_all(__file__, MODES, opts, {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)})


if __name__ == "__main__":
    main()
