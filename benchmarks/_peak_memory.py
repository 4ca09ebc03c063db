"""What the two peak-memory benchmarks share: launching one mode per fresh 2-process torchrun, measuring
rank 0's VmHWM rise over one save, and printing the table. Each script supplies its engine: how to
start the process group, build the sharded model, and the comparison mode."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MB = 1024 * 1024


def back_free_memory(nbytes: int) -> None:
    """Touch and free `nbytes` of memory, so the page cache the next write fills is backed by the host.

    On a VM whose balloon does free page reporting (virtio-balloon REPORTING, as here), memory left free for
    ~2 s goes back to the host, and the first write into it pays a host fault per page: 0.5-0.8 s per 338 MB
    here, 15x a plain touch, whoever writes. Without this, which contender lands on such pages is chance."""
    import torch

    torch.ones(nbytes, dtype=torch.uint8)


def parse(description: str, modes: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard", default="50MB", help="max_shard_size of the sharded mode")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="measure the first save of the process (with the engine's one-time allocations)")
    parser.add_argument("--mode", choices=modes, help=argparse.SUPPRESS)  # set when launched under torchrun
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


def measure(opts: argparse.Namespace, model, compare: Callable[[object, Path | None], None]) -> None:
    """Launched rank: one save of `model` in `opts.mode` (FullModel, or `compare` for the comparison mode);
    rank 0 writes its measurements to `<out>/<mode>.json`. Ends the process group."""
    import torch.distributed as dist

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._engines import stored_nbytes
    from open_instruct_ckpt._write.layout import pretrained_weights
    from open_instruct_ckpt._write.roles import team_for
    from open_instruct_ckpt._write.saver import Saver
    from open_instruct_ckpt._write.settings import SaveSettings
    from open_instruct_ckpt.tiny import llama_tokenizer

    rank = dist.get_rank()
    weights = pretrained_weights(model, opts.shard)
    settings = SaveSettings(llama_tokenizer(), None, Path(opts.out) / "ours", keep_last=None)
    saver = Saver(settings, team_for(rank == 0, "main", rank, dist.get_world_size()))
    shard = opts.shard if opts.mode == "sharded" else None

    def save(step: int):
        if opts.mode in ("sharded", "unsharded"):
            return saver.save(model, f"step_{step}", step, FullModel(max_shard_size=shard))
        directory = Path(tempfile.mkdtemp(dir=opts.out)) if rank == 0 else None
        compare(model, directory)
        return directory

    if opts.warmup:  # the engine's first collectives allocate what every later one reuses: not a save's cost
        save(0)
    dist.barrier()
    rss_before, peak_reset = memory_kib("VmRSS"), reset_peak()
    started = time.perf_counter()
    result = save(1)
    held = result.stats.peak_held_bytes if getattr(result, "stats", None) is not None else None
    directory = getattr(result, "path", result)
    seconds = time.perf_counter() - started
    if directory is not None:
        result = {
            "mode": opts.mode, "model_bytes": weights.stored_bytes, "seconds": round(seconds, 2),
            "largest_module_bytes": max(sum(stored_nbytes(t) for t in own.values()) for _, own in weights.groups),
            "rss_before_save": rss_before * 1024,
            "vm_hwm": memory_kib("VmHWM") * 1024, "peak_reset": peak_reset, "peak_held_bytes": held,
            "files": sorted(p.name for p in directory.iterdir()),
        }
        (opts.out / f"{opts.mode}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch_two(script: str, flags: list[str], result: Path, env: dict[str, str]) -> dict:
    """Run `script flags...` as 2 torchrun processes on a free local port; return the JSON it wrote to `result`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), script, *flags]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(flags)} failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(result.read_text())


def launch(script: str, mode: str, opts: argparse.Namespace, out: Path, env: dict[str, str]) -> dict:
    flags = ["--mode", mode, "--out", str(out), "--hidden", str(opts.hidden), "--layers", str(opts.layers),
             "--shard", opts.shard, *([] if opts.warmup else ["--no-warmup"])]
    return launch_two(script, flags, out / f"{mode}.json", env)


def run_all(script: str, modes: tuple[str, ...], opts: argparse.Namespace, env: dict[str, str]) -> None:
    """Every mode in fresh processes, then the table (and the raw results as JSON)."""
    with tempfile.TemporaryDirectory() as out:
        results = [launch(script, mode, opts, Path(out), env) for mode in modes]
    print(f"model: Llama hidden={opts.hidden} layers={opts.layers}, fp32, {results[0]['model_bytes'] / MB:.0f} MiB; "
          f"largest module {results[0]['largest_module_bytes'] / MB:.0f} MiB; shard size {opts.shard}")
    width = max(len(mode) for mode in modes)
    header = ("mode", "RSS before", "peak RSS", "save cost", "x model", "held peak", "time")
    print(f"{{:<{width}}} {{:>11}} {{:>9}} {{:>10}} {{:>8}} {{:>10}} {{:>6}}".format(*header))
    for r in results:
        cost = r["vm_hwm"] - r["rss_before_save"]
        held = f"{r['peak_held_bytes'] / MB:.0f} MiB" if r["peak_held_bytes"] is not None else "-"
        print(f"{r['mode']:<{width}} {r['rss_before_save'] / MB:>7.0f} MiB {r['vm_hwm'] / MB:>5.0f} MiB "
              f"{cost / MB:>6.0f} MiB {cost / r['model_bytes']:>8.2f} {held:>10} {r['seconds']:>5.1f}s")
    if not all(r["peak_reset"] for r in results):
        print("note: VmHWM could not be reset here; 'peak RSS' includes model construction")
    print(json.dumps(results))
