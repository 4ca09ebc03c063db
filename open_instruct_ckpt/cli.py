"""Command line: `open-instruct-ckpt list|latest|inspect|verify|advise|demo`.

Start-up imports only the standard library and the package's stdlib-only readers; torch and
transformers load only for `demo` and `verify --load`. A user mistake is one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from ._format import inspect as _inspect
from ._format import inspect_text as _inspect_text
from ._format import verify as _verify
from ._format.manifest import MANIFEST_NAME, RUN_RECORD_NAME
from ._format.readers import latest_checkpoint
from ._format.units import human_bytes, human_seconds
from ._measure import advisor as _advisor
from ._measure.economics import recorded_costs

PROG = "open-instruct-ckpt"
OK, FAILED, USAGE = 0, 1, 2
EPILOG = """exit codes:
  0  success
  1  a check failed: verify found a damaged checkpoint (or, with --load, it did not load);
     inspect found an incomplete checkpoint; latest found no complete checkpoint
     (a checkpoint that a run prunes while verify checks its output directory is REMOVED, not a failure)
  2  a usage mistake: bad arguments, a path that does not exist, a file where a directory is expected
     (verify instead reports such a path as CORRUPT and goes on checking the others)

Scripts: --model $(open-instruct-ckpt latest out)"""


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _directory(command: str, path: Path) -> Path:
    if not path.exists():
        raise UsageError(f"{PROG} {command}: {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{PROG} {command}: {path} is a file, not a directory")
    return path


# -- list, latest -----------------------------------------------------------------------------------

def list_checkpoints(output_dir: Path) -> int:
    entries = _inspect.list_checkpoints(_directory("list", output_dir))
    if not entries:
        print(f"{PROG} list: no checkpoints in {output_dir}", file=sys.stderr)
        return OK
    width = max(len(e.name) for e in entries)
    print(f"{'name':<{width}}  {'step':>7}  {'size':>10}  status")
    for entry in entries:
        status = "complete" if entry.complete else f"incomplete ({entry.problem})"
        if entry.latest:
            status += "  latest"
        if entry.linked_from:
            status += f"  (hard links to {entry.linked_from})"
        step = "-" if entry.step is None else str(entry.step)
        print(f"{entry.name:<{width}}  {step:>7}  {human_bytes(entry.bytes):>10}  {status}")
    return OK


def latest(output_dir: Path) -> int:
    found = latest_checkpoint(_directory("latest", output_dir))
    if found is None:
        print(f"{PROG} latest: no complete checkpoint in {output_dir}", file=sys.stderr)
        return FAILED
    print(found)
    return OK


# -- inspect ----------------------------------------------------------------------------------------

def inspect(path: Path, as_json: bool) -> int:
    directory = _directory("inspect", path)
    if not (directory / MANIFEST_NAME).exists() and _inspect.list_checkpoints(directory):
        raise UsageError(f"{PROG} inspect: {path} is an output directory; inspect one of its checkpoints "
                         f"(see: {PROG} list {path})")
    info = _inspect.describe(directory)
    print(json.dumps(info, indent=2, default=str) if as_json else "\n".join(_inspect_text.lines(info)))
    return OK if info["complete"] else FAILED


# -- verify -----------------------------------------------------------------------------------------

def verify(paths: list[Path], load: bool) -> int:
    """Each path is checked and reported, even after one that is missing or damaged."""
    failed = False
    for verdict in _verify.verdicts(paths, load):
        if verdict.loaded is not None:
            print(f"{verdict.path}: loaded {verdict.loaded}")
        print(f"{verdict.path}: {verdict.status}")
        for detail in verdict.details:
            print(f"  {detail}")
        failed = failed or verdict.failed
    return FAILED if failed else OK


# -- advise -----------------------------------------------------------------------------------------

def advise(args: argparse.Namespace) -> int:
    recorded: dict[str, Any] = {}
    if args.run_dir is not None:
        recorded = _recorded_costs(_directory("advise", args.run_dir))
    values = {**recorded, **{k: v for k, v in _given_costs(args).items() if v is not None}}
    if args.mtbf_hours is not None:
        values["failure_probability"] = None  # the command line wins over the record
    if args.failure_probability is not None:
        values["mtbf_hours"] = None
    current = values.pop("current_interval", None)
    for name in ("save_seconds", "step_seconds"):
        if values.get(name) is None:
            raise UsageError(f"{PROG} advise: give --{name.replace('_', '-')} (or a RUN_DIR that recorded it)")
    if values.get("mtbf_hours") is None and values.get("failure_probability") is None:
        raise UsageError(f"{PROG} advise: give --mtbf-hours (e.g. 24) or --failure-probability with --total-steps")
    costs = _advisor.Costs(**values)
    try:
        advice = _advisor.advise(costs, current)
    except _advisor.UnusableCost as exc:
        raise UsageError(f"{PROG} advise: {exc}{_recorded_by(exc.field, recorded, args)}") from None
    if args.json:
        print(json.dumps(advice.to_dict(), indent=2))
        return OK
    print(f"Checkpoint economics: {_advisor.summary(advice)}")
    if costs.mtbf_hours is not None:
        young = _advisor.young_daly_seconds(costs.save_seconds, costs.mtbf_hours)
        print(f"Young/Daly: sqrt(2 x {costs.save_seconds:.3g} s x {costs.mtbf_hours:g} h) = "
              f"{human_seconds(young)} between saves")
    print()
    print(_advisor.table(advice))
    return OK


def _given_costs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "save_seconds": args.save_seconds, "step_seconds": args.step_seconds, "mtbf_hours": args.mtbf_hours,
        "failure_probability": args.failure_probability, "total_steps": args.total_steps,
        "keep_last": args.keep_last, "checkpoint_bytes": args.checkpoint_bytes, "current_interval": args.interval,
    }


def _recorded_by(field: str | None, recorded: dict[str, Any], args: argparse.Namespace) -> str:
    """Where a bad value came from, when the run's record gave it and no option overrode it."""
    if field is None or recorded.get(field) is None or _given_costs(args).get(field) is not None:
        return ""
    option = "interval" if field == "current_interval" else field.replace("_", "-")
    return f" (as {args.run_dir / RUN_RECORD_NAME} recorded it; pass --{option} to override)"


def _recorded_costs(run_dir: Path) -> dict[str, Any]:
    recorded = recorded_costs(_inspect.read_run_record(run_dir))
    if recorded is None:
        raise UsageError(f"{PROG} advise: {run_dir} has no readable record of its saves (CheckpointCallback writes "
                         "it after each save); pass --save-seconds and --step-seconds instead")
    return recorded


# -- demo -------------------------------------------------------------------------------------------

def demo(out: Path, steps: int, save_steps: int) -> int:
    """Train a tiny Llama for a few steps with CheckpointCallback(FullModel()) and show what was written."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{PROG} demo: --out {out} is a file, not a directory")
    if _inspect.list_checkpoints(out):
        raise UsageError(f"{PROG} demo: {out} already holds checkpoints; choose another --out or remove it first")
    import logging

    from transformers import Trainer, TrainingArguments

    from . import CheckpointCallback, CheckpointError, FullModel
    from .tiny import TinyTextDataset, llama_model, llama_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
    try:
        trainer.train()
    except CheckpointError as exc:
        print(f"{PROG} demo: {exc}", file=sys.stderr)
        return FAILED
    list_checkpoints(out)
    print(f"latest: {latest_checkpoint(out)}")
    return OK


# -- the parser -------------------------------------------------------------------------------------

def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Find, check and size the checkpoints CheckpointCallback writes.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="checkpoints in order: complete or not, size, which is latest")
    listing.add_argument("output_dir", type=Path)
    newest = commands.add_parser("latest", help="print the newest complete checkpoint's path (for scripts)")
    newest.add_argument("output_dir", type=Path)
    look = commands.add_parser("inspect", help="step, strategy, files, dtype, parameters, EOS, tokenizer, final/")
    look.add_argument("path", type=Path)
    look.add_argument("--json", action="store_true", help="machine-readable output")
    check = commands.add_parser("verify", help="re-read checkpoints against their manifests (sizes, sha256)")
    check.add_argument("paths", type=Path, nargs="+", help="checkpoints, or output directories (all their checkpoints)")
    check.add_argument("--load", action="store_true", help="also load each with the stock loader (slow: imports torch)")
    _add_advise(commands)
    run_demo = commands.add_parser("demo", help="train a tiny model for a few steps with checkpoints")
    run_demo.add_argument("--out", type=Path, required=True)
    run_demo.add_argument("--steps", type=int, default=6)
    run_demo.add_argument("--save-steps", type=int, default=2)
    return parser


def _add_advise(commands: Any) -> None:
    advice = commands.add_parser(
        "advise", help="the optimal save interval and a trade-off table, from costs or a run's record",
        description="N* = sqrt(2 T C / (F s)) steps; with an MTBF, N* s = sqrt(2 C MTBF) (Young/Daly). "
                    "C: blocking seconds per save, s: seconds per step, T: total steps, F: expected failures.",
    )
    advice.add_argument("run_dir", type=Path, nargs="?", help="an output_dir whose run recorded its saves")
    advice.add_argument("--save-seconds", type=float, help="C: seconds training waits for one save")
    advice.add_argument("--step-seconds", type=float, help="s: seconds per training step")
    failures = advice.add_mutually_exclusive_group()
    failures.add_argument("--mtbf-hours", type=float, help="mean time between failures, in hours")
    failures.add_argument("--failure-probability", type=float, help="the chance the run fails (needs --total-steps)")
    advice.add_argument("--total-steps", type=int, help="T: the run's length in steps")
    advice.add_argument("--interval", type=int, help="the current save interval in steps, to compare")
    advice.add_argument("--keep-last", type=int, help="retention, for disk use")
    advice.add_argument("--checkpoint-bytes", type=int, help="size of one checkpoint, for disk use")
    advice.add_argument("--json", action="store_true", help="machine-readable output")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "list":
            return list_checkpoints(args.output_dir)
        if args.command == "latest":
            return latest(args.output_dir)
        if args.command == "inspect":
            return inspect(args.path, args.json)
        if args.command == "verify":
            return verify(args.paths, args.load)
        if args.command == "advise":
            return advise(args)
        return demo(args.out, args.steps, args.save_steps)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        sys.stderr.close()
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
