"""One command, a few minutes, on a machine with one CUDA GPU: the GPU tests, then the figures.

    python benchmarks/gpu_check.py            (from the repository root)

Runs tests/write/test_cuda.py (pinned arena, non-blocking copies synchronised before training resumes, bf16,
no GPU memory kept), then, for a bf16 Llama of about 1 GB on the GPU (fsync everywhere):
- sync FullModel save against `save_pretrained` of the same model;
- async save: seconds training is blocked, against the sync save and against one device-to-pinned-host copy of
  the same bytes (the limit), and seconds until it is published.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def best(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    opts = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/write/test_cuda.py"],
                           cwd=REPO, text=True, capture_output=True)
    print(tests.stdout[-3000:], tests.stderr[-2000:])
    measure(opts)


def measure(opts: argparse.Namespace) -> None:
    from save_speed import fsync_tree

    from open_instruct_ckpt import FullModel
    from open_instruct_ckpt._write.roles import SOLO
    from open_instruct_ckpt._write.saver import Saver, save_once
    from open_instruct_ckpt._write.settings import SaveSettings
    from open_instruct_ckpt.tiny import llama_model, llama_tokenizer

    tokenizer = llama_tokenizer(extra_words=32000 - 52)
    model = llama_model(tokenizer, hidden=opts.hidden, layers=opts.layers).to("cuda", torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=opts.dir))
    r = opts.repeats

    def ours() -> None:
        target = Path(tempfile.mkdtemp(dir=root))
        save_once(FullModel(), model, tokenizer, target)
        shutil.rmtree(target)

    def theirs() -> None:
        target = Path(tempfile.mkdtemp(dir=root))
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        fsync_tree(target)
        shutil.rmtree(target)

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy() -> None:
        offset = 0
        for p in model.parameters():
            n = p.numel() * p.element_size()
            pinned[offset:offset + n].view(p.dtype).view(p.shape).copy_(p.detach(), non_blocking=True)
            offset += n
        torch.cuda.synchronize()

    sync_s, hf_s, copy_s = best(ours, r), best(theirs, r), best(copy, r)
    saver = Saver(SaveSettings(tokenizer, None, root / "async", None), SOLO, async_save=True)
    blocked, total = [], []
    for step in range(r + 1):  # the first save allocates and pins the arena: not counted
        started = time.perf_counter()
        saver.start(model, f"step_{step}", step, FullModel())
        blocked.append(time.perf_counter() - started)
        saver.wait()
        total.append(time.perf_counter() - started)
    shutil.rmtree(root, ignore_errors=True)
    b = min(blocked[1:])
    print(f"\nbf16 Llama {nbytes / 1e9:.2f} GB on {torch.cuda.get_device_name()}, best of {r}, dir {opts.dir}")
    print("| measure | value |\n|---|---|")
    print(f"| sync FullModel save | {sync_s:.3f} s ({nbytes / sync_s / 1e9:.2f} GB/s) |")
    print(f"| save_pretrained | {hf_s:.3f} s |")
    print(f"| speed vs save_pretrained (their time / ours) | {hf_s / sync_s:.2f}x |")
    print(f"| async: training blocked | {b:.3f} s |")
    print(f"| async blocked over the sync save | {b / sync_s:.3f}x |")
    print(f"| one device-to-pinned copy of the same bytes | {copy_s:.3f} s; blocked over it {b / copy_s:.2f}x |")
    print(f"| async: start to published | {min(total[1:]):.3f} s |")
    print(f"| arena pinned | {saver.staging_pinned} |")


if __name__ == "__main__":
    main()
