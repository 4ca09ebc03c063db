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

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("unsharded", "sharded", "gather-all")
MB = 1024 * 1024


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard", default="50MB", help="max_shard_size of the sharded mode")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # set when launched under torchrun
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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


def worker(opts: argparse.Namespace) -> None:
    import deepspeed
    import torch.distributed as dist

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._gather import stored_nbytes
    from open_instruct_ckpt._shards import plan_shards

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = build_partitioned_model(opts.hidden, opts.layers)
    plan = plan_shards(model, opts.shard)
    directory = Path(tempfile.mkdtemp(dir=opts.out)) if rank == 0 else None
    dist.barrier()
    rss_before, peak_reset = memory_kib("VmRSS"), reset_peak()
    started = time.perf_counter()
    if opts.mode == "gather-all":
        gather_all_and_write(model, directory)
        held = None
    else:
        written = FullModel(max_shard_size=opts.shard if opts.mode == "sharded" else None).save(model, directory, None)
        held = getattr(written, "peak_held_bytes", written)
    seconds = time.perf_counter() - started
    if rank == 0:
        result = {
            "mode": opts.mode, "model_bytes": plan.total_bytes, "seconds": round(seconds, 2),
            "largest_module_bytes": max(sum(stored_nbytes(t) for t in own.values()) for _, own in plan.groups),
            "rss_before_save": rss_before * 1024,
            "vm_hwm": memory_kib("VmHWM") * 1024, "peak_reset": peak_reset, "peak_held_bytes": held,
            "files": sorted(p.name for p in directory.iterdir()),
        }
        (opts.out / f"{opts.mode}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, opts: argparse.Namespace, out: Path) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(repo / ".torch_extensions"),
           "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--mode", mode, "--out", str(out),
        "--hidden", str(opts.hidden), "--layers", str(opts.layers), "--shard", opts.shard,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads((out / f"{mode}.json").read_text())


def main() -> None:
    opts = parse()
    if opts.mode:
        return worker(opts)
    with tempfile.TemporaryDirectory() as out:
        results = [launch(mode, opts, Path(out)) for mode in MODES]
    print(f"model: Llama hidden={opts.hidden} layers={opts.layers}, fp32, {results[0]['model_bytes'] / MB:.0f} MiB; "
          f"largest module {results[0]['largest_module_bytes'] / MB:.0f} MiB; shard size {opts.shard}")
    header = ("mode", "RSS before", "peak RSS", "save cost", "x model", "held peak", "time")
    print("{:<11} {:>11} {:>9} {:>10} {:>8} {:>10} {:>6}".format(*header))
    for r in results:
        cost = r["vm_hwm"] - r["rss_before_save"]
        held = f"{r['peak_held_bytes'] / MB:.0f} MiB" if r["peak_held_bytes"] is not None else "-"
        print(f"{r['mode']:<11} {r['rss_before_save'] / MB:>7.0f} MiB {r['vm_hwm'] / MB:>5.0f} MiB "
              f"{cost / MB:>6.0f} MiB {cost / r['model_bytes']:>8.2f} {held:>10} {r['seconds']:>5.1f}s")
    if not all(r["peak_reset"] for r in results):
        print("note: VmHWM could not be reset here; 'peak RSS' includes model construction")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
