"""The scale table: saves of 2-rank ZeRO-3 and FSDP2 models from ~0.1 GB up to 2 GB (gloo on CPU), sync and async.

    python benchmarks/scale.py [--sizes 0.1,0.5,1,2] [--engines zero3,fsdp2] [--dir /tmp]

Per engine and size, one fresh 2-process launch builds the model already sharded (no rank ever holds it whole),
then rank 0 measures, fsync everywhere:
  sync     one FullModel() save after a warm-up save (one file, streamed module by module): seconds per GB, and
           the writer's extra
           peak (rise of VmHWM, reset just before, over RSS before the save)
  async    one async save after a warm-up save: seconds training was blocked, seconds to published, extra peak
           (the arena, which holds this rank's shard, is allocated by the warm-up and reused)
  baseline the whole model gathered on rank 0 and written with safetensors' save_file: accelerate's full state
           dict (FSDP2) or one GatheredParameters over the model (ZeRO-3, what
           stage3_gather_16bit_weights_on_model_save does)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _peak_memory

HIDDEN = 1024
LAYER_BYTES = 10 * HIDDEN * HIDDEN * 4  # fp32 attention (4 h^2) and MLP (3 h x 2h) of one decoder layer
GB = 1e9


def layers_for(size_gb: float) -> int:
    return max(1, round(size_gb * GB / LAYER_BYTES))


def build(engine: str, layers: int):
    import fsdp2_peak_memory
    import zero3_peak_memory

    if engine == "fsdp2":
        return fsdp2_peak_memory.build_sharded_model(HIDDEN, layers)
    return zero3_peak_memory.build_partitioned_model(HIDDEN, layers)


def baseline(engine: str, model, directory: Path | None) -> None:
    import fsdp2_peak_memory
    import zero3_peak_memory

    if engine == "fsdp2":
        fsdp2_peak_memory.write_accelerate_state_dict(model, directory)
    else:
        zero3_peak_memory.gather_all_and_write(model, directory)


def timed_peak(action, prefault: int) -> tuple[float, int]:
    """Collective: (seconds, rank's VmHWM rise over its RSS before) of `action()`, between barriers, on memory
    backed for `prefault` bytes (see `_peak_memory.back_free_memory`)."""
    import torch.distributed as dist

    _peak_memory.back_free_memory(prefault)
    dist.barrier()
    before = _peak_memory.memory_kib("VmRSS")
    _peak_memory.reset_peak()
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    dist.barrier()
    return seconds, (_peak_memory.memory_kib("VmHWM") - before) * 1024


def worker(opts: argparse.Namespace) -> None:
    import torch.distributed as dist

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._write.layout import pretrained_weights
    from open_instruct_ckpt._write.roles import team_for
    from open_instruct_ckpt._write.saver import Saver
    from open_instruct_ckpt._write.settings import SaveSettings
    from open_instruct_ckpt.tiny import llama_tokenizer

    if opts.engine == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    model = build(opts.engine, opts.layers)
    rank, writer = dist.get_rank(), dist.get_rank() == 0
    team = team_for(writer, "main", rank, dist.get_world_size())
    root = Path(opts.out)
    settings = SaveSettings(llama_tokenizer(), None, root / "ckpt", keep_last=1)
    sync = Saver(settings, team)
    result: dict = {"model_bytes": pretrained_weights(model, None).stored_bytes, "layers": opts.layers}
    prefault = result["model_bytes"] * (3 if writer else 1)  # the writer's page cache and gathers; a share elsewhere
    sync.save(model, "step_0", 0, FullModel())  # warm-up: first collectives, first writes, lazy imports
    result["sync_s"], result["sync_peak"] = timed_peak(lambda: sync.save(model, "step_1", 1, FullModel()), prefault)
    asynchronous = Saver(settings, team, async_save=True)
    asynchronous.start(model, "step_2", 2, FullModel())
    asynchronous.wait()
    blocked: list[float] = []

    def async_save() -> None:
        started = time.perf_counter()
        asynchronous.start(model, "step_3", 3, FullModel())
        blocked.append(time.perf_counter() - started)
        asynchronous.wait()

    result["async_s"], result["async_peak"] = timed_peak(async_save, prefault)
    result["blocked_s"], result["arena_bytes"] = blocked[0], asynchronous.staging_capacity
    directory = Path(tempfile.mkdtemp(dir=root)) if writer else None
    result["base_s"], result["base_peak"] = timed_peak(lambda: baseline(opts.engine, model, directory), prefault)
    if writer:
        (root / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def row(engine: str, size: float, r: dict) -> str:
    gb, model = r["model_bytes"] / GB, r["model_bytes"]
    return (f"| {engine} | {gb:.2f} | {r['sync_s'] / gb:.2f} | {r['base_s'] / r['sync_s']:.2f}x | "
            f"{r['blocked_s']:.3f} ({r['blocked_s'] / r['sync_s']:.3f}x) | {r['async_s'] / gb:.2f} | "
            f"{r['sync_peak'] / model:.2f}x | {r['async_peak'] / model:.2f}x | {r['arena_bytes'] / model:.2f}x | "
            f"{r['base_peak'] / model:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1,0.5,1,2", help="model sizes in GB (fp32)")
    parser.add_argument("--engines", default="zero3,fsdp2")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts)
    extensions = Path(__file__).resolve().parents[1] / ".torch_extensions"
    env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)}
    print("| engine | GB | sync s/GB | baseline time / sync | async blocked s (x sync) | async s/GB | sync extra "
          "peak | async extra peak | arena | baseline extra peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for engine in opts.engines.split(","):
        for size in (float(s) for s in opts.sizes.split(",")):
            with tempfile.TemporaryDirectory(dir=opts.dir) as out:
                flags = ["--worker", "--engine", engine, "--layers", str(layers_for(size)), "--out", out]
                result = _peak_memory.launch_two(__file__, flags, Path(out) / "result.json", env)
            print(row(engine, size, result), flush=True)
    print("extra peak: the writer's (rank 0's) VmHWM rise during the save, over model bytes")


if __name__ == "__main__":
    sys.exit(main())
