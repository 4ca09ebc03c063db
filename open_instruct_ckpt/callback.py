"""CheckpointCallback: decides WHEN to save; strategies decide what, the Saver how."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import _engines, _logging, options
from ._after import AfterPublish
from ._dist import is_distributed
from ._format.manifest import FINAL_NAME, step_name
from ._held import Held
from ._measure import metrics
from ._measure.economics import RunEconomics
from ._when import arguments, policy
from ._when.preemption import DEFAULT_SIGNALS, PreemptionWatch
from ._write import generation_config as _generation
from ._write.nodes import check_one_publisher_per_disk, same_run_everywhere
from ._write.prepare import check_shared_output_dir
from ._write.roles import team_for
from ._write.saver import Saved, Saver
from ._write.settings import SaveSettings
from .strategies import CheckpointStrategy, check_strategy, writers_of

logger = logging.getLogger(__name__)


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
        interval: `TrainerInterval()` (the Trainer's schedule; with a failure rate, advice is logged and
            recorded) or `AutoInterval(mtbf_hours=...)` (re-chosen from measured costs after every save).
        upload: `Upload(to="s3://bucket/prefix", ...)`: rank 0 copies every published checkpoint there in the
            background, manifest last (needs `pip install "open_instruct_ckpt[s3]"` for s3://).
        async_save: training waits only for the gather and a copy into a host staging arena; writing, fsync and
            publishing run in the background. At most one save is in flight; its failure is raised on every rank.
        writers: "main" (the Trainer's writer writes every file) or "all" (every rank writes its share of the
            shard files; needs output_dir on a filesystem shared by every rank).
        on_published: `Hook(run=...)`, or what it takes (a command template with `{path}`, `{step}`, `{name}`,
            `{url}`, or a callable): run on rank 0 after each publish (after its upload), in order, in the background.
        stalls: `Stalls(floor_s=60, factor=3, every_s=60)`: when a background save, upload or hook is reported stalled.
    Deprecated keywords (`upload_to`, `upload_storage_options`, `upload_wait_s`, `upload_timeout_s`, `mtbf_hours`,
    `failure_probability`, `save_interval`, `max_save_interval`) still work, with a DeprecationWarning.
    """

    def __init__(
        self,
        strategy: CheckpointStrategy,
        *,
        tokenizer: Any = None,
        generation_config: _generation.GenerationConfigSpec = None,
        output_dir: str | Path | None = None,
        trainer_checkpoints: bool | None = None,
        keep_last: int | None | str = arguments.KEEP_LAST_FROM_ARGS,
        preemption_signals: Sequence[Any] = DEFAULT_SIGNALS,
        existing_checkpoints: str = "error",
        interval: options.Interval | None = None,
        upload: options.Upload | None = None,
        async_save: bool = False,
        writers: str = "main",
        on_published: Any = None,
        stalls: options.Stalls | None = None,
        **deprecated: Any,
    ) -> None:
        interval, upload = options.from_keywords(interval, upload, deprecated)
        check_strategy(strategy)
        arguments.check_callback_arguments(output_dir, trainer_checkpoints, keep_last, existing_checkpoints,
                                           async_save, writers)
        _generation.check_spec(generation_config)
        self.strategy = strategy
        self.writers = writers_of(strategy, writers)
        self.async_save = async_save
        self._tokenizer, self._generation_config = tokenizer, generation_config
        self._output_dir = Path(output_dir) if output_dir is not None else None
        self._trainer_checkpoints, self._keep_last, self._existing = trainer_checkpoints, keep_last, existing_checkpoints
        self._interval = interval
        after = AfterPublish(upload, options.hook_of(on_published), options.stalls_of(stalls))
        self._held = Held(PreemptionWatch(preemption_signals), after)
        weakref.finalize(self, self._held.release)
        self._policy = policy.SavePolicy(self._held.watch, interval.schedule())
        self._economics = RunEconomics(interval.mtbf_hours, interval.failure_probability)
        self._log = metrics.TrainerLog()
        self._settings: SaveSettings  # set by _set_up, when the Trainer is built
        self._last: Saved | None = None  # the latest step save (its path on the publisher)
        self.preempted = False

    def close(self) -> None:
        """Give back the signal handlers and the output_dir lock, stop uploading (done by `on_train_end`)."""
        self._held.release()

    @property
    def saver(self) -> Saver | None:
        """The Saver of the current (or last) run, from `on_train_begin`."""
        return self._held.saver

    @property
    def preemption_signals(self) -> tuple:
        """The signals that make every rank save and stop at the next step."""
        return self._held.watch.signals

    # -- set-up -------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._set_up(args, control, kwargs.get("model"), kwargs.get("processing_class"))
        if args.should_save:
            logger.info(arguments.trainer_checkpoint_reason(self._trainer_checkpoints, args))
            if self.keeps_trainer_checkpoints(args):
                for message in _engines.trainer_checkpoint_warnings(args):
                    logger.warning(message)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.close()
        model: Any = kwargs.get("model")
        self._set_up(args, control, model, kwargs.get("processing_class"))  # every check before the lock is taken
        self._settings = same_run_everywhere(self._settings)
        self._last, self.preempted = None, False
        team = team_for(args.should_save, self.writers, args.process_index, args.world_size)
        try:
            self._held.saver = saver = Saver(self._settings, team, async_save=self.async_save)
            check_one_publisher_per_disk(self._settings.output_dir, team)  # save_on_each_node: node-local disks?
            self._held.lock = saver.claim(self.strategy.plan(model), self.strategy.saved_module(model),
                                          state.global_step, self._existing)
            if team.shares_files and is_distributed():
                check_shared_output_dir(self._settings.output_dir, team)
            self._held.after.open(team, self._settings.output_dir, self._settings.keep_last, saver)
        except BaseException:
            self.close()  # on_train_end will not run
            raise
        self._held.watch.install()
        self._policy.schedule.start(args, state)
        auto = isinstance(self._interval, options.AutoInterval)
        facts = {"run_id": self._settings.run.id, "save_interval": "auto" if auto else "trainer"}
        self._economics.start(self._settings.output_dir, self._settings.keep_last, facts)
        self._log.attach(metrics.calling_trainer())

    def _set_up(self, args: TrainingArguments, control: TrainerControl, model: nn.Module | None,
                processing_class: Any) -> None:
        _logging.follow_trainer(args)
        arguments.check_world_size(args)
        arguments.check_training_arguments(args, self.keeps_trainer_checkpoints(args), self._held.watch.signals)
        arguments.check_writers(self.writers, args)
        policy.check_training_arguments(isinstance(self._interval, options.AutoInterval), args)
        tokenizer = arguments.resolve_tokenizer(self._tokenizer, processing_class)
        if model is None:
            raise ValueError("CheckpointCallback needs the model: use it through transformers.Trainer")
        _engines.check_engine(model)
        self.strategy.check(model)
        _generation.build(self._generation_config, self.strategy.saved_module(model), tokenizer)
        keep_last = arguments.resolve_keep_last(self._keep_last, args)
        output_dir = self._output_dir or Path(args.output_dir or "trainer_output")  # the Trainer's own default
        if output_dir.is_file():
            raise ValueError(f"output_dir {output_dir} is a file; pass a directory path as output_dir")
        arguments.check_one_callback_per_output_dir(output_dir, control, self)
        if self.async_save and self.writers == "all" and args.should_save:
            logger.info("async_save=True with writers='all': every rank stages and writes its own shard files")
        self._settings = SaveSettings(tokenizer, self._generation_config, output_dir, keep_last,
                                      show_progress=not args.disable_tqdm)

    # -- when to save -------------------------------------------------------------------------

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._economics.clock.step_end()
        saver = self._held.saver
        if saver is not None and saver.pending:  # the only collective on a step without a save, while one runs
            self._guarded(lambda: self._handle(saver.poll(), args, state, control))
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
            self._wait(args, state, control, "Train end")
            if not self.preempted and state.global_step >= state.max_steps:
                self._held.after.published(self._guarded(lambda: self._save_final(state, kwargs["model"])))
            self._held.after.finish(stop_when=self._held.watch.unanswered)
            if args.process_index == 0:  # the run record: global rank 0 only, also with save_on_each_node
                self._finish_economics(args, state)
        finally:
            self.close()
        return control

    def _save_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module):
        started = time.perf_counter()
        self._wait(args, state, control, f"The save of step {state.global_step}")  # at most one save in flight
        saver = self._held.saver
        assert saver is not None
        step = state.global_step
        self._guarded(lambda: saver.start(model, step_name(step), step, self.strategy))
        self._policy.schedule.saved(step)
        self._last = Saved(step_name(step), step, None, None)  # its path once published
        if not self.async_save:
            self._wait(args, state, control)
        self._economics.clock.exclude(time.perf_counter() - started)  # what this step waited for is not the step
        if not self.keeps_trainer_checkpoints(args):
            control.should_save = False

    def _wait(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
              who: str = "Training") -> None:
        """Collective: take the result of the save in flight (if any); its failure is raised on every rank."""
        saver = self._held.saver
        if saver is not None and saver.pending:
            self._held.after.waiting(who)
            self._guarded(lambda: self._handle(saver.wait(), args, state, control))

    def _handle(self, saved: Saved | None, args: TrainingArguments, state: TrainerState,
                control: TrainerControl) -> None:
        """Collective (the auto interval's broadcast): a step save was published; upload, measure, advise.

        The checkpoint is published: a failure here (metrics, advice, the run record) only warns."""
        if saved is None:
            return
        self._last = saved
        self._held.after.published(saved)
        proposal = None
        if saved.stats is not None and args.process_index == 0:  # rank 0 measures and records for every node
            try:
                self._log.emit(saved.stats.metrics(), state, control)
                interval = self._policy.schedule.current_interval(args, state)
                advice = self._economics.saved(saved.stats, state.max_steps, interval)
                proposal = advice.optimal.steps if advice is not None else None
            except Exception as exc:
                logger.warning("Checkpoint %s is saved, but measuring it failed (%s: %s); the save interval stays "
                               "as it is", saved.name, type(exc).__name__, exc)
        self._policy.schedule.adopt(proposal)

    def _save_for_preemption(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                             model: nn.Module) -> TrainerControl:
        if not self._saved_at(state.global_step):
            self._save_step(args, state, control, model)
        self._wait(args, state, control, "The preemption stop")  # this step's save must be published first
        self.preempted = True
        control.should_training_stop = True
        control.should_save = self.keeps_trainer_checkpoints(args)
        logger.warning("Preemption signal received: saved step %d and stopping training", state.global_step)
        return control

    def _save_final(self, state: TrainerState, model: nn.Module) -> Saved:
        """`final/` links the last step's files, unless the final plan writes more (a merged LoRA)."""
        saver = self._held.saver
        assert saver is not None
        if self._last is not None and self._saved_at(state.global_step):
            if self.strategy.plan(model, final=True).links_to_steps:
                return saver.link(FINAL_NAME, self._last)
        return saver.save(model, FINAL_NAME, state.global_step, self.strategy, final=True)

    def _finish_economics(self, args: TrainingArguments, state: TrainerState) -> None:
        """Writer, at train end, after every checkpoint was published: advice and the run record only warn."""
        try:
            self._economics.finish(state.max_steps, self._policy.schedule.current_interval(args, state))
        except Exception as exc:
            logger.warning("Checkpoints are saved, but the train-end advice failed (%s: %s)", type(exc).__name__, exc)

    def _guarded(self, work: Any) -> Any:
        """Run `work`; if it raises, give back what the run holds (train() ends with the error: no on_train_end)."""
        try:
            return work()
        except BaseException:
            self.close()
            raise

    def _saved_at(self, step: int) -> bool:
        return self._last is not None and self._last.step == step

    def keeps_trainer_checkpoints(self, args: TrainingArguments) -> bool:
        """Whether the Trainer writes its own resumable `checkpoint-N` beside ours."""
        return arguments.keeps_trainer_checkpoints(self._trainer_checkpoints, args)
