"""Save-time ratios in one run: our FullModel save vs save_pretrained, torch.save and a raw disk write.

Every contender writes the same model to the same filesystem and is made durable the same way
(fsync of each file), so the ratios compare work, not page-cache luck. Usage:

    python benchmarks/save_ratios.py --hidden 1024 --layers 12 --repeats 3 --dir /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from save_speed import ours, raw_write, save_pretrained, torch_save  # the same contenders, best-of there

from open_instruct_ckpt import FullModel
from open_instruct_ckpt.tiny import llama_model, llama_tokenizer


def timed(action, root: Path) -> float:
    target = Path(tempfile.mkdtemp(dir=root))
    os.sync()  # start from a clean page cache: no earlier contender's writeback competes
    started = time.perf_counter()
    action(target)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    tokenizer = llama_tokenizer(extra_words=32000 - 52)
    model = llama_model(tokenizer, hidden=args.hidden, layers=args.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    payload = memoryview(bytearray(os.urandom(1024)) * (model_bytes // 1024))
    contenders = {
        "ours (FullModel, atomic+sha256)": lambda t: ours(FullModel(), model, tokenizer, t),
        "save_pretrained + fsync": lambda t: save_pretrained(model, tokenizer, t),
        "torch.save + fsync": lambda t: torch_save(model, t),
        "raw write + fsync": lambda t: raw_write(payload, t),
    }
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, action in contenders.items():
            times[name].append(timed(action, args.dir))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"model: {model_bytes / 1e6:.1f} MB fp32, {args.repeats} repeats, median seconds, dir {args.dir}")
    for name, seconds in medians.items():
        rate = model_bytes / seconds / 1e6
        print(f"{name:34s} {seconds:7.3f} s  {rate:8.1f} MB/s  ratio to ours {seconds / medians[next(iter(medians))]:.2f}")
    ours_s = medians["ours (FullModel, atomic+sha256)"]
    print(f"ours / save_pretrained = {ours_s / medians['save_pretrained + fsync']:.2f}")
    print(f"ours / torch.save      = {ours_s / medians['torch.save + fsync']:.2f}")
    print(f"ours / raw disk write  = {ours_s / medians['raw write + fsync']:.2f}")


if __name__ == "__main__":
    main()
