"""Command line: `open-instruct-ckpt demo|list|verify`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ._readers import complete_checkpoints, verify_checkpoint


def demo(out: Path, steps: int, save_steps: int) -> int:
    """Train a tiny Llama for a few steps with CheckpointCallback(FullModel()) and show what was written."""
    from transformers import Trainer, TrainingArguments

    from . import CheckpointCallback, FullModel, latest_checkpoint
    from .tiny import TinyTextDataset, llama_model, llama_tokenizer

    tokenizer = llama_tokenizer()
    model = llama_model(tokenizer)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=save_steps,
        per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], logging_steps=steps,
        save_only_model=True, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TinyTextDataset(len(tokenizer)), processing_class=tokenizer,
        callbacks=[CheckpointCallback(FullModel())],
    )
    trainer.train()
    list_checkpoints(out)
    print(f"latest: {latest_checkpoint(out)}")
    return 0


def list_checkpoints(output_dir: Path) -> int:
    if not output_dir.is_dir():
        what = "is not a directory" if output_dir.exists() else "does not exist"
        print(f"open-instruct-ckpt list: {output_dir} {what}", file=sys.stderr)
        return 2
    for path, manifest in complete_checkpoints(output_dir):
        size = sum(entry["bytes"] for entry in manifest["files"].values())
        print(f"{path.name:>12}  step {manifest['step']:>6}  {size:>12,} bytes  {len(manifest['files'])} files")
    return 0


def verify(paths: list[Path]) -> int:
    failed = 0
    for path in paths:
        problems = verify_checkpoint(path)
        print(f"{path}: {'OK' if not problems else 'CORRUPT'}")
        for problem in problems:
            print(f"  {problem}")
        failed += bool(problems)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="open-instruct-ckpt")
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="train a tiny model for a few steps with checkpoints")
    run_demo.add_argument("--out", type=Path, required=True)
    run_demo.add_argument("--steps", type=int, default=6)
    run_demo.add_argument("--save-steps", type=int, default=2)
    listing = commands.add_parser("list", help="list the complete checkpoints in an output directory")
    listing.add_argument("output_dir", type=Path)
    check = commands.add_parser("verify", help="re-read checkpoints against their manifests")
    check.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return demo(args.out, args.steps, args.save_steps)
    if args.command == "list":
        return list_checkpoints(args.output_dir)
    return verify(args.paths)


if __name__ == "__main__":
    sys.exit(main())
