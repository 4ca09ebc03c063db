"""FullModel(writers="all") against writers="main": one whole save (gather, write, hash, seal, publish),
2 processes on CPU/gloo, under DeepSpeed ZeRO-3 and torch FSDP2, the same sharded model and shard plan.

Run by hand:  python benchmarks/parallel_writers.py [--hidden 1024 --layers 12 --shard 50MB --repeats 3]
It launches itself under torchrun once per engine; inside, the two writer modes alternate, best of
--repeats each, with a barrier before every save. Both ranks share this machine's disk and its cores,
so the ratio here is a lower bound of what separate nodes' disks give.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _peak_memory
import fsdp2_peak_memory
import zero3_peak_memory

ENGINES = ("zero3", "fsdp2")
MODES = ("main", "all")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard", default="50MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # set when launched under torchrun
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def build(engine: str, hidden: int, layers: int):
    if engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        return zero3_peak_memory.build_partitioned_model(hidden, layers)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return fsdp2_peak_memory.build_sharded_model(hidden, layers)


def worker(opts: argparse.Namespace) -> None:
    import torch.distributed as dist

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._write.layout import pretrained_weights
    from open_instruct_ckpt._write.roles import team_for
    from open_instruct_ckpt._write.saver import Saver
    from open_instruct_ckpt._write.settings import SaveSettings
    from open_instruct_ckpt.tiny import llama_tokenizer

    model = build(opts.engine, opts.hidden, opts.layers)
    is_writer = dist.get_rank() == 0
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(-1, opts.repeats):  # repeat -1 warms up both modes and is not counted
        for mode in MODES:
            settings = SaveSettings(llama_tokenizer(), None, opts.out / opts.engine, keep_last=None)
            saver = Saver(settings, team_for(is_writer, mode, dist.get_rank(), dist.get_world_size()))
            dist.barrier()
            started = time.perf_counter()
            saver.save(model, f"step_{repeat + 1}_{mode}", repeat + 1, FullModel(max_shard_size=opts.shard))
            dist.barrier()
            if repeat >= 0:
                seconds[mode].append(time.perf_counter() - started)
    if is_writer:
        layout = pretrained_weights(model, opts.shard).layout
        result = {"engine": opts.engine, "model_bytes": layout.total_bytes, "files": len(layout.files), "seconds": seconds}
        (opts.out / f"{opts.engine}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(engine: str, opts: argparse.Namespace, out: Path) -> dict:
    flags = ["--engine", engine, "--out", str(out), "--hidden", str(opts.hidden), "--layers", str(opts.layers),
             "--shard", opts.shard, "--repeats", str(opts.repeats)]
    extensions = Path(__file__).resolve().parents[1] / ".torch_extensions"
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)}
    return _peak_memory.launch_two(__file__, flags, out / f"{engine}.json", env)


def main() -> None:
    opts = parse()
    if opts.engine:
        return worker(opts)
    with tempfile.TemporaryDirectory() as out:
        results = [launch(engine, opts, Path(out)) for engine in ENGINES]
    print(f"model: Llama hidden={opts.hidden} layers={opts.layers}, fp32, "
          f"{results[0]['model_bytes'] / _peak_memory.MB:.0f} MiB in {results[0]['files']} shard files of "
          f"{opts.shard}; 2 processes, best of {opts.repeats}")
    print(f"{'engine':<7} {'writers=main':>13} {'writers=all':>12} {'all / main time':>16}")
    for r in results:
        main_s, all_s = min(r["seconds"]["main"]), min(r["seconds"]["all"])
        print(f"{r['engine']:<7} {main_s:>12.2f}s {all_s:>11.2f}s {all_s / main_s:>15.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
