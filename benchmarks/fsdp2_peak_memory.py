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

MODES = ("unsharded", "sharded", "get_state_dict")
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


def worker(opts: argparse.Namespace) -> None:
    import torch.distributed as dist

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._gather import stored_nbytes
    from open_instruct_ckpt._shards import plan_shards

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_sharded_model(opts.hidden, opts.layers)
    plan = plan_shards(model, opts.shard)
    directory = Path(tempfile.mkdtemp(dir=opts.out)) if rank == 0 else None
    dist.barrier()
    rss_before, peak_reset = memory_kib("VmRSS"), reset_peak()
    started = time.perf_counter()
    if opts.mode == "get_state_dict":
        write_accelerate_state_dict(model, directory)
        held = None
    else:
        written = FullModel(max_shard_size=opts.shard if opts.mode == "sharded" else None).save(model, directory, None)
        held = written.peak_held_bytes
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
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    print("{:<14} {:>11} {:>9} {:>10} {:>8} {:>10} {:>6}".format(*header))
    for r in results:
        cost = r["vm_hwm"] - r["rss_before_save"]
        held = f"{r['peak_held_bytes'] / MB:.0f} MiB" if r["peak_held_bytes"] is not None else "-"
        print(f"{r['mode']:<14} {r['rss_before_save'] / MB:>7.0f} MiB {r['vm_hwm'] / MB:>5.0f} MiB "
              f"{cost / MB:>6.0f} MiB {cost / r['model_bytes']:>8.2f} {held:>10} {r['seconds']:>5.1f}s")
    if not all(r["peak_reset"] for r in results):
        print("note: VmHWM could not be reset here; 'peak RSS' includes model construction")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
