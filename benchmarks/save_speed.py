"""The issue-10 table in one run: save speed ratios, async blocking, training while saving, callback cost.

    python benchmarks/save_speed.py                  # ~340 MB fp32 Llama (hidden 768, 6 layers), best of 3
    python benchmarks/save_speed.py --dir /mnt/nvme --repeats 5

Every contender writes the same model into the same directory and fsyncs every file it wrote, so
ratios compare work. Times are the best of `--repeats` (the least disturbed by other load). Nothing
here asserts a target: it prints, and `benchmarks/README.md` keeps the latest table by hand.
Rows (issue 10, section 4): 1 sync FullModel vs raw write / save_pretrained / torch.save;
2 async blocked time over the sync save; 3 training throughput while a background save runs;
4 LoRAAdapter vs FullModel save time next to their byte ratio; 5 callback cost on steps without a save.
Row 6 (2-process ZeRO-3/FSDP2 writer memory, writers='all' vs 'main') is `zero3_peak_memory.py`,
`fsdp2_peak_memory.py` and `parallel_writers.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from _peak_memory import back_free_memory
from transformers import Trainer, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel, LoRAAdapter
from open_instruct_ckpt._write.prepare import measure_small_files
from open_instruct_ckpt._write.roles import SOLO
from open_instruct_ckpt._write.saver import Saver
from open_instruct_ckpt._write.settings import SaveSettings
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def ours(strategy, model, tokenizer, target: Path) -> None:
    """One sync save as a run makes it: the small files were measured once, when the run claimed its output_dir
    (not timed here: training's start is not a save)."""
    saver = Saver(SaveSettings(tokenizer, None, target, keep_last=None), SOLO)
    key = (id(strategy), id(model))
    if key not in _small_files:
        _small_files[key] = measure_small_files(saver.settings, strategy.plan(model), None)
    saver.small_files_bytes = _small_files[key]
    saver.save(model, "step_1", 1, strategy)


_small_files: dict[tuple[int, int], int] = {}


def save_pretrained(model, tokenizer, target: Path) -> None:
    model.save_pretrained(target / "hf")
    tokenizer.save_pretrained(target / "hf")
    fsync_tree(target / "hf")


def torch_save(model, target: Path) -> None:
    torch.save(model.state_dict(), target / "model.pt")
    fsync_tree(target)


def raw_write(payload: memoryview, target: Path) -> None:
    with open(target / "raw.bin", "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def best(action, root: Path, repeats: int, nbytes: int = 0) -> float:
    """The best of `repeats` timed runs, after one untimed warm-up run (first-call costs: imports, page faults);
    each run starts on backed memory for three times `nbytes` (the bytes it writes; see `back_free_memory`)."""
    times = []
    for attempt in range(repeats + 1):
        target = Path(tempfile.mkdtemp(dir=root))
        back_free_memory(3 * nbytes)
        started = time.perf_counter()
        action(target)
        if attempt:
            times.append(time.perf_counter() - started)
        shutil.rmtree(target)
        os.sync()  # the deletion's journal commit (and, on a disk mounted with `discard`, its TRIM) before the next
    return min(times)


def async_blocked(model, tokenizer, root: Path, repeats: int) -> tuple[float, float]:
    """Row 2: seconds training is blocked (snapshot) and seconds until the background save is published."""
    blocked, total = [], []
    # One Saver per run, claimed as the callback claims it: the arena is allocated once and reused, and the small
    # files are measured once, at the claim.
    saver = Saver(SaveSettings(tokenizer, None, Path(tempfile.mkdtemp(dir=root)), keep_last=None), SOLO,
                  async_save=True)
    lock = saver.claim(FullModel().plan(model), model, 0, "supersede")
    for step in range(repeats + 1):  # the first save allocates (and first-touches) the arena: not counted
        started = time.perf_counter()
        saver.start(model, f"step_{step}", step, FullModel())
        blocked.append(time.perf_counter() - started)
        saved = saver.wait()
        total.append(time.perf_counter() - started)
        assert saved is not None and saved.path is not None
        shutil.rmtree(saved.path)
    if lock is not None:
        lock.release()
    return min(blocked[1:]), min(total[1:])


def _until_published(path: Path) -> None:
    """Without waiting on the save (which would give it full priority): poll until its rename lands."""
    while not path.is_dir():
        time.sleep(0.01)


def memory_copy(model, repeats: int) -> float:
    """Row 2's limit: one copy of every parameter into a buffer touched before (what a snapshot must do)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer = torch.ones(nbytes, dtype=torch.uint8)

    def copy() -> None:
        offset = 0
        for param in model.parameters():
            n = param.numel() * param.element_size()
            buffer[offset:offset + n].view(param.dtype).view(param.shape).copy_(param.detach())
            offset += n

    return min((lambda started: (copy(), time.perf_counter() - started)[1])(time.perf_counter()) for _ in range(repeats))


def train_steps_per_s(model, steps: int, during: threading.Event | None = None) -> float:
    """Row 3: forward+backward+SGD steps per second on `model` (runs until `during` is cleared, if given)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    done, started = 0, time.perf_counter()
    while done < steps or (during is not None and during.is_set()):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        done += 1
    return done / (time.perf_counter() - started)


def throughput_while_saving(tokenizer, big, root: Path) -> tuple[float, float]:
    """Row 3: a small model trains while a background save of the big model runs, over training alone; and the
    seconds from the save's start to its publish (the background yields CPU to training, so it takes longer)."""
    small = llama_model(tokenizer, hidden=256, layers=2)
    alone = train_steps_per_s(small, 10)
    target = Path(tempfile.mkdtemp(dir=root))
    saver = Saver(SaveSettings(tokenizer, None, target, keep_last=None), SOLO, async_save=True)
    started = time.perf_counter()
    saver.start(big, "step_1", 1, FullModel())
    running = threading.Event()
    running.set()
    watch = threading.Thread(target=lambda: (_until_published(target / "step_1"), running.clear()), daemon=True)
    watch.start()
    during = train_steps_per_s(small, 1, running)
    saver.wait()
    saving_s = time.perf_counter() - started
    shutil.rmtree(target)
    return during / alone, saving_s


def callback_cost(tokenizer, root: Path, steps: int = 40) -> tuple[float, float]:
    """Row 5: seconds per step spent in CheckpointCallback.on_step_end without a save, and the step time."""
    callback = CheckpointCallback(FullModel(), output_dir=root / "cb", existing_checkpoints="supersede")
    spent: list[float] = []
    inner = callback.on_step_end

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = inner(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return result

    callback.on_step_end = timed
    args = TrainingArguments(output_dir=str(root / "cb"), max_steps=steps, save_strategy="steps", save_steps=10**6,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_only_model=True, logging_steps=10**6)
    trainer = Trainer(model=llama_model(tokenizer), args=args, train_dataset=TinyTextDataset(len(tokenizer), rows=4 * steps),
                      processing_class=tokenizer, callbacks=[callback])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    shutil.rmtree(root / "cb", ignore_errors=True)
    # The median call: the Trainer sets should_save at the last step, and that call saves.
    return sorted(spent)[len(spent) // 2], seconds / steps


def lora_vs_full(tokenizer, model, root: Path, repeats: int, model_bytes: int) -> tuple[float, float]:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    lora_s = best(lambda t: ours(LoRAAdapter(), lora, tokenizer, t), root, repeats, model_bytes)
    byte_ratio = LoRAAdapter().plan(lora).stored_bytes / FullModel().plan(model).stored_bytes
    lora.unload()
    return lora_s, byte_ratio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="save_speed-", dir=args.dir))
    tokenizer = llama_tokenizer(extra_words=32000 - 52)
    model = llama_model(tokenizer, hidden=args.hidden, layers=args.layers)
    model_bytes = FullModel().plan(model).stored_bytes
    payload = memoryview(bytearray(os.urandom(1024)) * (model_bytes // 1024))
    r = args.repeats
    sync_s = best(lambda t: ours(FullModel(), model, tokenizer, t), root, r, model_bytes)
    raw_s = best(lambda t: raw_write(payload, t), root, r, model_bytes)
    hf_s = best(lambda t: save_pretrained(model, tokenizer, t), root, r, model_bytes)
    pt_s = best(lambda t: torch_save(model, t), root, r, model_bytes)
    blocked_s, background_s = async_blocked(model, tokenizer, root, r)
    copy_s = memory_copy(model, r)
    throughput, saving_s = throughput_while_saving(tokenizer, model, root)
    lora_s, byte_ratio = lora_vs_full(tokenizer, model, root, r, model_bytes)
    per_step, step_s = callback_cost(llama_tokenizer(), root)
    shutil.rmtree(root, ignore_errors=True)
    print(f"model {model_bytes / 1e6:.0f} MB fp32, best of {r}, dir {args.dir}, {os.cpu_count()} cores\n")
    print("| row | measure | value | target |\n|---|---|---|---|")
    print(f"| 1 | sync FullModel {sync_s:.3f} s; speed vs raw write ({raw_s:.3f} s) | {raw_s / sync_s:.2f}x | >= 0.9x |")
    print(f"| 1 | speed vs save_pretrained ({hf_s:.3f} s) | {hf_s / sync_s:.2f}x | >= 1.0x |")
    print(f"| 1 | speed vs torch.save ({pt_s:.3f} s) | {pt_s / sync_s:.2f}x | - |")
    print(f"| 2 | async blocked {blocked_s:.3f} s over sync save | {blocked_s / sync_s:.2f}x | <= 0.3x |")
    print(f"| 2 | async blocked over one memory copy of the same bytes ({copy_s:.3f} s) | {blocked_s / copy_s:.2f}x "
          "| <= 1.5x |")
    print(f"| 2 | async: snapshot to published | {background_s:.3f} s | - |")
    print(f"| 3 | training steps/s while a background save runs ({saving_s:.2f} s), over none | {throughput:.2f}x "
          "| >= 0.9x |")
    print(f"| 4 | LoRAAdapter save {lora_s:.3f} s over FullModel; bytes ratio {byte_ratio:.4f} | {lora_s / sync_s:.3f}x | - |")
    print(f"| 5 | callback on_step_end without a save: {per_step * 1e6:.0f} us of a {step_s * 1e3:.0f} ms step "
          f"| {per_step / step_s * 100:.3f}% | < 1% |")


if __name__ == "__main__":
    main()
