"""CheckpointCallback: decides WHEN to save; strategies decide what, private modules how."""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import _arguments, _async, _gather, _generation_config, _logging, _metrics, _policy, _run, _save, _upload
from ._dist import any_rank, is_distributed, raise_on_all_ranks
from ._economics import RunEconomics
from ._lock import RunLock
from ._manifest import FINAL_NAME, step_name
from ._preemption import DEFAULT_SIGNALS, PreemptionWatch
from .strategies import CheckpointStrategy

logger = logging.getLogger(__name__)


class _Held:
    """What a run holds between `on_train_begin` and `on_train_end`: signal handlers, the lock, the upload worker.

    `TrainerCallback` has no hook for a `train()` that raises, so these are also given back when
    the next run starts, when the callback is garbage-collected, and by `CheckpointCallback.close()`.
    """

    def __init__(self, watch: PreemptionWatch, uploader: _upload.Uploader | None,
                 background: _async.BackgroundSaver | None) -> None:
        self.watch = watch
        self.lock: RunLock | None = None
        self.uploader = uploader
        self.background = background

    def release(self) -> None:
        if self.background is not None:
            self.background.wait()  # a background save publishes under the run lock, never after its release
        self.watch.uninstall()
        if self.uploader is not None:
            self.uploader.stop()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


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
        existing_checkpoints: what a run starting at step 0 does with checkpoints an earlier run
            left in output_dir: "error" (refuse before training) or "supersede" (replace and prune them).
        upload_to: an fsspec URL ("s3://bucket/prefix") or a local path; rank 0 uploads every published
            checkpoint there in the background, manifest last (needs `pip install "open_instruct_ckpt[s3]"`).
        upload_storage_options: fsspec options for `upload_to` (for S3: `key`, `secret`, `client_kwargs`).
        upload_wait_s: how long train end waits for the last uploads; None waits as long as they take.
            A preemption signal during that wait ends it at once.
        upload_timeout_s: how long the store may leave a request unanswered (60 s): the start-up probe
            fails after it, and train end stops waiting for an upload that shows no progress for it.
        mtbf_hours / failure_probability: the failure rate (mean time between failures, or the chance
            this run fails); with either, the optimal save interval is logged and recorded with the run.
        save_interval: "trainer" (the Trainer's `save_steps`) or "auto" (re-chosen from measured save
            and step times after every save, never above `max_save_interval`).
        max_save_interval: the longest interval "auto" may choose; None means `args.save_steps`.
        async_save: training waits only for the gather and a copy into a host staging arena (the
            checkpoint's bytes, on the writer); writing, fsync and publishing run in the background.
            At most one save is in flight; its failure is raised on every rank at the next step end.
    """

    def __init__(
        self,
        strategy: CheckpointStrategy,
        *,
        tokenizer: Any = None,
        generation_config: _generation_config.GenerationConfigSpec = None,
        output_dir: str | Path | None = None,
        trainer_checkpoints: bool | None = None,
        keep_last: int | None | str = _arguments.KEEP_LAST_FROM_ARGS,
        preemption_signals: Sequence[Any] = DEFAULT_SIGNALS,
        existing_checkpoints: str = "error",
        upload_to: str | Path | None = None,
        upload_storage_options: dict[str, Any] | None = None,
        upload_wait_s: float | None = 3600.0,
        upload_timeout_s: float = 60.0,
        mtbf_hours: float | None = None,
        failure_probability: float | None = None,
        save_interval: str = "trainer",
        max_save_interval: int | None = None,
        async_save: bool = False,
    ) -> None:
        _arguments.check_callback_arguments(strategy, output_dir, trainer_checkpoints, keep_last, existing_checkpoints,
                                            async_save)
        _policy.check_arguments(save_interval, max_save_interval, mtbf_hours, failure_probability)
        _generation_config.check_spec(generation_config)
        self.strategy = strategy
        self._tokenizer = tokenizer
        self._generation_config = generation_config
        self._output_dir = Path(output_dir) if output_dir is not None else None
        self._trainer_checkpoints = trainer_checkpoints
        self._keep_last = keep_last
        self._existing = existing_checkpoints
        uploader = (_upload.Uploader(upload_to, upload_storage_options, upload_wait_s, upload_timeout_s)
                    if upload_to is not None else None)
        background = _async.BackgroundSaver() if async_save else None
        self._held = _Held(PreemptionWatch(preemption_signals), uploader, background)
        self._save_in_flight = False  # every rank: an async save was started and its verdict not yet taken
        weakref.finalize(self, self._held.release)
        self._save_interval = save_interval
        self._policy = _policy.SavePolicy(self._held.watch, _policy.schedule_for(save_interval, max_save_interval))
        self._economics = RunEconomics(mtbf_hours, failure_probability)
        self._log = _metrics.TrainerLog()
        self._settings: _save.SaveSettings  # set by _set_up, when the Trainer is built
        self._last_saved: tuple[int, Path | None] | None = None
        self.preempted = False

    def close(self) -> None:
        """Give back the signal handlers and the output_dir lock, stop uploading (done by `on_train_end`)."""
        self._held.release()

    # -- set-up -------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._set_up(args, control, kwargs.get("model"), kwargs.get("processing_class"))
        if args.should_save:
            logger.info(self._trainer_checkpoint_reason(args))
            self._warn_if_trainer_gathers(args)
            if self._held.background is not None and self._writers() == "all" and args.world_size > 1:
                logger.warning("async_save=True with FullModel(writers='all') saves synchronously for now: every rank "
                               "writes its shards while training waits; use writers='main' for async saves")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.close()
        model: Any = kwargs.get("model")
        self._set_up(args, control, model, kwargs.get("processing_class"))  # every check before the lock is taken
        self._last_saved, self.preempted, self._save_in_flight = None, False, False
        error = None
        if args.should_save:
            try:
                self._held.lock = _run.claim_output_dir(self._settings, model, state.global_step, self._existing)
                if self._held.uploader is not None and args.process_index == 0:
                    self._held.uploader.open(self._settings.output_dir, self._settings.keep_last)
            except Exception as exc:
                error = exc
        try:
            raise_on_all_ranks(error)
            if self._writers() == "all" and is_distributed():
                _save.check_all_writers(self._settings, args.should_save)
        except BaseException:
            self.close()  # on_train_end will not run
            raise
        self._held.watch.install()
        self._policy.schedule.start(args, state)
        facts = {"run_id": self._settings.run.id, "save_interval": self._save_interval}
        self._economics.start(self._settings.output_dir, self._settings.keep_last, facts)
        self._log.attach(_metrics.calling_trainer())

    def _set_up(self, args: TrainingArguments, control: TrainerControl, model: nn.Module | None,
                processing_class: Any) -> None:
        _logging.follow_trainer(args)
        _arguments.check_world_size(args)
        _arguments.check_training_arguments(args, self.keeps_trainer_checkpoints(args), self._held.watch.signals)
        _policy.check_training_arguments(self._save_interval, args)
        tokenizer = _arguments.resolve_tokenizer(self._tokenizer, processing_class)
        if model is None:
            raise ValueError("CheckpointCallback needs the model: use it through transformers.Trainer")
        _gather.check_engine(model)
        self.strategy.check(model)
        _generation_config.build(self._generation_config, self.strategy.saved_module(model), tokenizer)
        from_args = self._keep_last == _arguments.KEEP_LAST_FROM_ARGS
        keep_last = _arguments.check_keep_last(args.save_total_limit if from_args else self._keep_last,
                                               "TrainingArguments.save_total_limit" if from_args else "keep_last")
        output_dir = self._output_dir or Path(args.output_dir or "trainer_output")  # the Trainer's own default
        if output_dir.is_file():
            raise ValueError(f"output_dir {output_dir} is a file; pass a directory path as output_dir")
        _arguments.check_one_callback_per_output_dir(output_dir, control, self)
        self._settings = _save.SaveSettings(self.strategy, tokenizer, self._generation_config, output_dir, keep_last,
                                            show_progress=not args.disable_tqdm)

    # -- when to save -------------------------------------------------------------------------

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._economics.clock.step_end()
        if self._save_in_flight:  # the only collective on a step without a save, and only while one runs
            self._take_verdict(args, state, control, wait=False)
        decision = self._policy.at_step_end(args, state, control)
        if decision.stop:
            return self._save_for_preemption(args, state, control, kwargs["model"])
        if decision.save:
            self._save_step(args, state, control, kwargs["model"])
        if not self.keeps_trainer_checkpoints(args):
            control.should_save = False
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._policy.at_epoch_end(args, state, control).save and not self._saved_at(state.global_step):
            self._save_step(args, state, control, kwargs["model"])
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        try:
            self._take_verdict(args, state, control, wait=True)
            if not self.preempted and state.global_step >= state.max_steps:
                self._upload(self._save_final(args, state, kwargs["model"]))
            if self._held.uploader is not None:
                self._held.uploader.finish(stop_when=self._held.watch.unanswered)  # a signal ends the wait
            if args.should_save:
                self._finish_economics(args, state)
        finally:
            self.close()
        return control

    def _finish_economics(self, args: TrainingArguments, state: TrainerState) -> None:
        """Writer, at train end, after every checkpoint was published: advice and the run record only warn."""
        try:
            self._economics.finish(state.max_steps, self._policy.schedule.current_interval(args, state))
        except Exception as exc:
            logger.warning("Checkpoints are saved, but the train-end advice failed (%s: %s)", type(exc).__name__, exc)

    def _save_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module):
        try:
            self._take_verdict(args, state, control, wait=True)  # at most one save in flight
            started = time.perf_counter()
            self._settings.last_stats = None
            path = _save.save(self._settings, model, step_name(state.global_step), state.global_step, args.should_save,
                              background=self._held.background)
        except BaseException:
            self.close()  # train() ends with this error: no on_train_end will run
            raise
        self._economics.clock.exclude(time.perf_counter() - started)  # what this step waited for is not the step
        self._last_saved = (state.global_step, path)
        self._policy.schedule.saved(state.global_step)
        self._save_in_flight = self._held.background is not None and any_rank(self._held.background.pending)
        self._upload(path)
        if not self.keeps_trainer_checkpoints(args):
            control.should_save = False
        if not self._save_in_flight:  # an async save is measured when its verdict is taken
            self._after_save(args, state, control)

    def _after_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """Collective (the auto interval's broadcast): measure, report and advise after a step save was published.

        The checkpoint is published: a failure here (metrics, advice, the run record) only warns."""
        proposal, stats = None, self._settings.last_stats
        if args.should_save and stats is not None:
            try:
                self._log.emit(stats.metrics(), state, control)
                interval = self._policy.schedule.current_interval(args, state)
                advice = self._economics.saved(stats, state.max_steps, interval)
                proposal = advice.optimal.steps if advice is not None else None
            except Exception as exc:
                logger.warning("Checkpoint %s is saved, but measuring it failed (%s: %s); the save interval stays "
                               "as it is", stats.name, type(exc).__name__, exc)
        self._policy.schedule.adopt(proposal)

    def _save_for_preemption(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module
    ) -> TrainerControl:
        if not self._saved_at(state.global_step):
            self._save_step(args, state, control, model)
        self._take_verdict(args, state, control, wait=True)  # stopping: this step's save must be published first
        self.preempted = True
        control.should_training_stop = True
        control.should_save = self.keeps_trainer_checkpoints(args)
        logger.warning("Preemption signal received: saved step %d and stopping training", state.global_step)
        return control

    def _save_final(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> Path | None:
        """`final/` links the last step's files, unless the strategy writes more at the end (a merged LoRA)."""
        at_final = getattr(self.strategy, "at_final", None)
        final = at_final(self._settings.tokenizer) if at_final is not None else self.strategy
        if final is self.strategy and self._last_saved is not None and self._last_saved[0] == state.global_step:
            return _save.link_final(self._settings, self._last_saved[1], args.should_save)
        settings = self._settings if final is self.strategy else dataclasses.replace(self._settings, strategy=final)
        return _save.save(settings, model, FINAL_NAME, state.global_step, args.should_save)

    def _take_verdict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, wait: bool) -> None:
        """Collective while an async save is in flight (a no-op otherwise): once it is done on the writer, or when
        `wait`, every rank learns its verdict; a failure is raised on every rank, the previous checkpoint stays."""
        background = self._held.background
        if not self._save_in_flight or background is None or self._last_saved is None:
            return
        if not wait and any_rank(background.in_flight):
            return
        path, error = background.take_verdict()
        self._save_in_flight = False
        try:
            raise_on_all_ranks(error)
        except BaseException:
            self.close()  # train() ends with this error
            raise
        self._last_saved = (self._last_saved[0], path)
        self._upload(path)
        self._after_save(args, state, control)

    def _upload(self, published: Path | None) -> None:
        """Queue a checkpoint just published on this rank, when this rank uploads (rank 0 with upload_to)."""
        uploader = self._held.uploader
        if published is not None and uploader is not None and uploader.is_open:
            uploader.enqueue(published)

    def _writers(self) -> str:
        return getattr(self.strategy, "writers", "main")  # FullModel's option (until writers moves to the callback)

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
