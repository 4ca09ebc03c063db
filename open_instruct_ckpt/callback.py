"""CheckpointCallback: decides WHEN to save; strategies decide what, private modules how."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import _gather, _generation_config, _io, _save
from ._dist import CheckpointError, raise_on_all_ranks
from ._manifest import FINAL_NAME, step_name
from ._preemption import DEFAULT_SIGNALS, PreemptionWatch
from .strategies import FullModel, LoRAAdapter, ModelAttribute, SaveStrategy

logger = logging.getLogger(__name__)

_FROM_ARGS = "save_total_limit"
_STRATEGY_TYPES = (FullModel, LoRAAdapter, ModelAttribute)


class CheckpointCallback(TrainerCallback):
    """Saves inference-ready checkpoints when `TrainingArguments` say so, and `final/` at the end.

    Args:
        strategy: what to save: `FullModel()`, `LoRAAdapter()` or `ModelAttribute("policy")`.
        tokenizer: saved beside the weights; defaults to the Trainer's `processing_class`.
        generation_config: None (automatic), "default", "olmo", a dict of overrides or a `GenerationConfig`.
        output_dir: where `step_<N>/` and `final/` go; defaults to `args.output_dir`.
        trainer_checkpoints: keep the Trainer's own resumable `checkpoint-N` saves. None keeps them
            unless `args.save_only_model` (then they would only duplicate ours).
        keep_last: how many `step_<N>` checkpoints to keep; defaults to `args.save_total_limit`.
        preemption_signals: signals that make every rank save and stop at the next step.
    """

    def __init__(
        self,
        strategy: SaveStrategy,
        *,
        tokenizer: Any = None,
        generation_config: _generation_config.GenerationConfigSpec = None,
        output_dir: str | Path | None = None,
        trainer_checkpoints: bool | None = None,
        keep_last: int | None | str = _FROM_ARGS,
        preemption_signals: Sequence[int] = DEFAULT_SIGNALS,
    ) -> None:
        _check_arguments(strategy, output_dir, trainer_checkpoints, keep_last)
        _generation_config.check_spec(generation_config)
        self.strategy = strategy
        self._tokenizer = tokenizer
        self._generation_config = generation_config
        self._output_dir = Path(output_dir) if output_dir is not None else None
        self._trainer_checkpoints = trainer_checkpoints
        self._keep_last = keep_last
        self._preemption = PreemptionWatch(preemption_signals)
        self._settings: _save.SaveSettings | None = None
        self._lock: _io.RunLock | None = None
        self._last_saved: tuple[int, Path | None] | None = None
        self.preempted = False

    # -- set-up -------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._set_up(args, kwargs.get("model"), kwargs.get("processing_class"))
        if args.should_save:
            logger.info(self._trainer_checkpoint_reason(args))
            self._warn_if_trainer_gathers(args)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = kwargs.get("model")
        self._set_up(args, model, kwargs.get("processing_class"))
        self._last_saved, self.preempted = None, False
        problem = self._claim_output_dir(model) if args.should_save else None
        try:
            raise_on_all_ranks(CheckpointError(problem) if problem else None)
        except Exception:
            self._stand_down()  # on_train_end will not run
            raise
        self._preemption.install()

    def _set_up(self, args: TrainingArguments, model: nn.Module | None, processing_class: Any) -> None:
        _check_training_arguments(args, self.keeps_trainer_checkpoints(args), self._preemption.signals)
        tokenizer = _resolve_tokenizer(self._tokenizer, processing_class)
        if model is None:
            raise ValueError("CheckpointCallback needs the model: use it through transformers.Trainer")
        _gather.check_engine(model)
        self.strategy.check(model)
        _generation_config.build(self._generation_config, self.strategy.saved_module(model), tokenizer)
        keep_last = args.save_total_limit if self._keep_last == _FROM_ARGS else self._keep_last
        _check_keep_last(keep_last, "TrainingArguments.save_total_limit" if self._keep_last == _FROM_ARGS else "keep_last")
        output_dir = self._output_dir or Path(args.output_dir)
        if output_dir.is_file():
            raise ValueError(f"output_dir {output_dir} is a file; pass a directory path as output_dir")
        self._settings = _save.SaveSettings(self.strategy, tokenizer, self._generation_config, output_dir, keep_last)

    def _claim_output_dir(self, model: nn.Module) -> str | None:
        output_dir = self._settings.output_dir
        problem = _io.writable_problem(output_dir)
        if problem:
            return problem
        self._lock = _io.RunLock(output_dir)
        try:
            self._lock.acquire()
        except _io.RunLockHeld as exc:
            self._lock = None
            return str(exc)
        _io.recover(output_dir)
        return _save.startup_space_problem(self._settings, model)

    # -- when to save -------------------------------------------------------------------------

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._preemption.agreed():
            return self._save_for_preemption(args, state, control, kwargs["model"])
        if control.should_save:
            self._save_step(args, state, control, kwargs["model"])
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if control.should_save and not self._saved_at(state.global_step):
            self._save_step(args, state, control, kwargs["model"])
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        try:
            if not self.preempted and state.global_step >= state.max_steps:
                self._save_final(args, state, kwargs["model"])
        finally:
            self._stand_down()
        return control

    def _stand_down(self) -> None:
        """Uninstall the signal handlers and release the output_dir lock (end of run, or a failed one)."""
        self._preemption.uninstall()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _save_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module):
        try:
            path = _save.save(self._settings, model, step_name(state.global_step), state.global_step, args.should_save)
        except BaseException:
            self._stand_down()  # train() ends with this error: no on_train_end will run
            raise
        self._last_saved = (state.global_step, path)
        if not self.keeps_trainer_checkpoints(args):
            control.should_save = False

    def _save_for_preemption(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module
    ) -> TrainerControl:
        if not self._saved_at(state.global_step):
            self._save_step(args, state, control, model)
        self.preempted = True
        control.should_training_stop = True
        control.should_save = self.keeps_trainer_checkpoints(args)
        logger.warning("Preemption signal received: saved step %d and stopping training", state.global_step)
        return control

    def _save_final(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        if self._saved_at(state.global_step):
            _save.link_final(self._settings, self._last_saved[1], args.should_save)
        else:
            _save.save(self._settings, model, FINAL_NAME, state.global_step, args.should_save)

    def _saved_at(self, step: int) -> bool:
        return self._last_saved is not None and self._last_saved[0] == step

    # -- the Trainer's own checkpoints ----------------------------------------------------------

    def keeps_trainer_checkpoints(self, args: TrainingArguments) -> bool:
        if self._trainer_checkpoints is not None:
            return self._trainer_checkpoints
        return not args.save_only_model

    def _trainer_checkpoint_reason(self, args: TrainingArguments) -> str:
        if self._trainer_checkpoints is not None:
            kept = "kept" if self._trainer_checkpoints else "skipped"
            return f"Trainer checkpoints (checkpoint-N, for resume) are {kept}: trainer_checkpoints={self._trainer_checkpoints}"
        if args.save_only_model:
            return "Trainer checkpoints are skipped: save_only_model=True makes them duplicates of ours"
        return "Trainer checkpoints (checkpoint-N, for resume) are kept beside ours: save_only_model=False"

    def _warn_if_trainer_gathers(self, args: TrainingArguments) -> None:
        if self.keeps_trainer_checkpoints(args):
            for message in _gather.trainer_checkpoint_warnings(args):
                logger.warning(message)


def _check_arguments(strategy: Any, output_dir: Any, trainer_checkpoints: Any, keep_last: Any) -> None:
    if not isinstance(strategy, _STRATEGY_TYPES) and not isinstance(strategy, SaveStrategy):
        raise TypeError(
            f"CheckpointCallback strategy={strategy!r} is not a save strategy; pass FullModel(), "
            "LoRAAdapter() or ModelAttribute('<name>')"
        )
    if isinstance(strategy, type):
        raise TypeError(f"CheckpointCallback got the class {strategy.__name__}; pass an instance: {strategy.__name__}()")
    if output_dir is not None and not isinstance(output_dir, (str, Path)):
        raise TypeError(f"output_dir={output_dir!r} must be a str or pathlib.Path")
    if trainer_checkpoints not in (None, True, False):
        raise TypeError(f"trainer_checkpoints={trainer_checkpoints!r} must be None (automatic), True or False")
    if keep_last != _FROM_ARGS:
        _check_keep_last(keep_last, "keep_last")


def _check_keep_last(keep_last: Any, source: str) -> None:
    if keep_last is None:
        return
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"{source}={keep_last!r}: keep at least 1 checkpoint, or None to keep them all")


def _check_training_arguments(args: TrainingArguments, keeps_trainer: bool, signals: tuple) -> None:
    if str(args.save_strategy) in ("best", "SaveStrategy.BEST"):
        raise ValueError(
            "save_strategy='best' is decided after evaluation, after this callback runs; use "
            "save_strategy='steps' or 'epoch' (the Trainer's load_best_model_at_end still picks the best)"
        )
    if args.load_best_model_at_end and not keeps_trainer:
        raise ValueError(
            "load_best_model_at_end=True needs the Trainer's own checkpoints, which this callback turns off "
            "(save_only_model=True or trainer_checkpoints=False); pass trainer_checkpoints=True"
        )
    if getattr(args, "enable_jit_checkpoint", False) and signals:
        raise ValueError(
            "enable_jit_checkpoint=True installs the Trainer's own SIGTERM handler, which would fight this "
            "callback's preemption handler; set enable_jit_checkpoint=False or pass preemption_signals=()"
        )


def _resolve_tokenizer(tokenizer: Any, processing_class: Any) -> Any:
    chosen = tokenizer if tokenizer is not None else getattr(processing_class, "tokenizer", processing_class)
    if chosen is None:
        raise ValueError(
            "CheckpointCallback needs a tokenizer to save beside the weights: pass "
            "Trainer(processing_class=tokenizer) or CheckpointCallback(..., tokenizer=tokenizer)"
        )
    if not hasattr(chosen, "save_pretrained"):
        raise TypeError(f"tokenizer {type(chosen).__name__} has no save_pretrained; pass a transformers tokenizer")
    return chosen
