"""Trainer callbacks: metrics.jsonl records, status lines, and evaluation during training."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from core.eval.compare import Comparison, compare_results
from core.eval.drift import reference_bytes
from core.eval.runner import EvalCache, RoundProgress, base_suite_result, run_suite
from core.eval.scorers import SuiteResult
from core.eval.suites import DRIFT, EvalSuite, suite_from_config
from core.io import read_json, write_json_atomic
from core.jobs.metrics import CheckpointRecord, StartRecord, TrainRecord
from core.jobs.runfiles import (
    StatusFn,
    append_metric,
    append_metrics,
    eval_round_path,
    read_metrics,
)
from core.jobs.state import as_reporter
from core.model.loading import LoadedModel
from core.training.config import TrainConfig
from core.training.losses import WeightLog


def _metrics_callback(
    run_dir: Path, status: StatusFn | None, weight_log: WeightLog | None = None
) -> Any:
    """A TrainerCallback writing start/train/checkpoint records to metrics.jsonl and a readable
    line per log step to stdout (the job's log). Built here so transformers loads lazily.

    `weight_log` (the trainer's `core.training.losses.WeightLog`): each train record also
    carries the token weights trained with since the last one (mean, effective-token share,
    histogram, mean KL)."""
    from transformers import TrainerCallback

    reporter = as_reporter(status)

    class _MetricsCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                world_size = int(args.world_size)
                start = StartRecord(
                    step=int(state.global_step),
                    max_steps=int(state.max_steps),
                    epochs=float(args.num_train_epochs),
                    world_size=world_size,
                )
                append_metric(run_dir, start)
                where = f" on {world_size} processes" if world_size > 1 else ""
                if reporter is None or where:  # else the reporter logs the training state
                    print(
                        f"training: step {state.global_step} of {state.max_steps}{where}",
                        flush=True,
                    )
                if reporter is not None:
                    reporter.training(int(state.global_step), int(state.max_steps))

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            if not state.is_world_process_zero or "loss" not in logs:
                return
            optional = {
                name: float(logs[key])
                for key, name in (
                    ("grad_norm", "grad_norm"),
                    ("mean_token_accuracy", "token_accuracy"),
                    ("entropy", "entropy"),
                    ("num_tokens", "num_tokens"),
                )
                if logs.get(key) is not None
            }
            weights = weight_log.take() if weight_log is not None else None
            record = TrainRecord(
                step=int(state.global_step),
                epoch=float(state.epoch or 0.0),
                loss=float(logs["loss"]),
                lr=float(logs.get("learning_rate", 0.0)),
                **optional,
                **(weights or {}),
            )
            append_metric(run_dir, record)
            line = (
                f"step {state.global_step}/{state.max_steps} · epoch {record.epoch:.2f} · "
                f"loss {record.loss:.4f} · lr {record.lr:.3g}"
            )
            if record.weight_mean is not None and record.weight_mean < 1.0:
                line += f" · weight {record.weight_mean:.3g}"
            if record.weight_share is not None and record.weight_share < 1.0:
                line += f" · share {record.weight_share:.3g}"
            if record.kl is not None:
                line += f" · KL {record.kl:.3g}"
            print(line, flush=True)
            if reporter is not None:
                reporter.training(int(state.global_step), int(state.max_steps))

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                append_metric(run_dir, CheckpointRecord(step=int(state.global_step)))
                print(f"checkpoint saved at step {state.global_step}", flush=True)

    return _MetricsCallback()


# --------------------------------------------------------------------------- job entry


def job_callbacks(config: TrainConfig, run_dir: Path, status: StatusFn | None = None) -> list[Any]:
    """Extra callbacks of a background run: evaluation every `eval_every` steps."""
    if not config.eval_every:
        return []
    return make_training_callbacks(config, run_dir, status=status)


@contextlib.contextmanager
def without_mixed_precision_wrapper(model: Any) -> Iterator[None]:
    """Run `model` with its own `forward` inside the block, not Accelerate's autocast wrapper
    (present only while a mixed-precision trainer has prepared it); restored afterwards."""
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class EvalCallback(TrainerCallback):
    """Evaluate `suite` at step 0, every `every_n_steps` steps and (optionally) at the end.

    `fingerprint` identifies the base model for the evaluation cache (None: no caching).
    `tokenizer` defaults to the trainer's processing class.
    """

    def __init__(
        self,
        suite: EvalSuite,
        run_dir: str | Path,
        every_n_steps: int,
        *,
        model_name: str = "model",
        fingerprint: str | None = None,
        tokenizer: Any = None,
        eval_at_end: bool = True,
        cache: EvalCache | None = None,
        status: StatusFn | None = None,
        load_reference: Callable[[], LoadedModel] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.suite = suite
        self.run_dir = Path(run_dir)
        self.every_n_steps = every_n_steps
        self.model_name = model_name
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.eval_at_end = eval_at_end
        self.cache = cache
        self.status = as_reporter(status, run_dir)
        self.load_reference = load_reference
        self.reference: LoadedModel | None = None
        self.base: SuiteResult | None = None
        self.last_step: int | None = None
        self.history: list[tuple[int, SuiteResult, Comparison | None]] = []
        self.seconds = 0.0
        #: steps whose round is in metrics.jsonl (a resumed run's earlier rounds included)
        self.recorded: set[int] = set()

    # -- trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step 0: the reference every later round is compared with.

        A resumed run evaluates where an uninterrupted one would: its step-0 round (and any
        other already in metrics.jsonl) is read back, not run again, and the step it resumes
        from gets a round only when one was due there and is missing.

        Under several processes only rank 0 evaluates (the whole suite, on its copy of the
        model); the others wait for each round at their next step."""
        if state.is_world_process_zero:
            if int(getattr(args, "world_size", 1)) > 1:
                print(
                    f"evaluation: rank 0 of {args.world_size} evaluates every "
                    f"{self.every_n_steps} steps; the other processes wait for each round",
                    flush=True,
                )
            self._read_recorded()
            step = int(state.global_step)
            if step in self.recorded:
                self.last_step = step
            elif step == 0 or step % self.every_n_steps == 0:
                self._round(args, state, kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every N steps."""
        step = state.global_step
        if state.is_world_process_zero and step % self.every_n_steps == 0:
            if step != self.last_step and step not in self.recorded:
                self._round(args, state, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final model, unless a round already saw it."""
        step = state.global_step
        if state.is_world_process_zero and self.eval_at_end:
            if step != self.last_step and step not in self.recorded:
                self._round(args, state, kwargs)

    def _read_recorded(self) -> None:
        """The rounds a killed attempt of this run recorded (all of each round, or none: see
        `evaluate`), and its step-0 result as the base of later comparisons."""

        self.recorded |= {
            int(r["step"])
            for r in read_metrics(self.run_dir)
            if r.get("kind") == "eval" and r.get("step") is not None
        }
        if 0 in self.recorded and self.base is None:
            saved = read_json(eval_round_path(self.run_dir, 0))
            if isinstance(saved, dict):
                self.base = SuiteResult.from_dict(saved)

    def _round(self, args: Any, state: Any, kwargs: dict[str, Any]) -> None:
        step, max_steps = int(state.global_step), int(state.max_steps)
        self.evaluate(
            step,
            kwargs["model"],
            kwargs.get("processing_class"),
            max_steps=max_steps,
            final=step >= max_steps > 0,
        )
        if self.status is not None and step < max_steps:
            self.status.training(step, max_steps)

    # -- work ---------------------------------------------------------------------------------

    def _loaded(self, model: Any, tokenizer: Any) -> LoadedModel:
        tokenizer = self.tokenizer or tokenizer
        if tokenizer is None:
            raise ValueError("EvalCallback needs a tokenizer (none given, none from the trainer)")
        param = next(model.parameters())
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or 2048
        return LoadedModel(
            name=self.model_name,
            model=model,
            tokenizer=tokenizer,
            device=param.device,
            dtype=param.dtype,
            fingerprint=self.fingerprint or f"training:{self.model_name}",
            max_length=int(context),
        )

    def _reference(self, model: Any) -> LoadedModel | None:
        """The frozen base copy drift needs for a full fine-tune (a PEFT model disables its
        adapter instead): loaded once, on the first round after step 0."""
        needs = any(s.scorer == DRIFT for s in self.suite.specs())
        if not needs or hasattr(model, "disable_adapter") or self.load_reference is None:
            return None
        if self.reference is None:
            self.reference = self.load_reference()
            self.reference.model.requires_grad_(False)
            size = reference_bytes(self.reference.model) / 2**20
            print(
                f"drift: a frozen copy of the base model for reference ({size:.0f} MiB)", flush=True
            )
        return self.reference

    def evaluate(
        self,
        step: int,
        model: Any,
        tokenizer: Any = None,
        *,
        max_steps: int | None = None,
        final: bool = False,
    ) -> SuiteResult:
        """Run one round on `model` now and append its records; returns the result.

        No autocast, even when training runs under bf16 autocast (see the module docstring).
        The round's progress is the job's state (`core.jobs.state`: the log, the status line and
        `run_state.json`): "evaluating step k of N", or "final evaluation" when `final`.
        """
        started = time.monotonic()
        lm = self._loaded(model, tokenizer)
        progress = RoundProgress(
            self.run_dir, step, status=self.status, max_steps=max_steps, final=final
        )
        try:
            with torch.no_grad(), without_mixed_precision_wrapper(model):
                cache = self.cache if self.fingerprint else None
                if step == 0 and self.base is None:
                    result, _ = base_suite_result(lm, self.suite, cache=cache, progress=progress)
                    self.base = result
                else:
                    if self.base is None and cache is not None:  # resumed run: base from cache
                        key = EvalCache.key(lm.cache_key, lm.template_fingerprint, self.suite)
                        self.base = cache.get(key)
                    result = run_suite(
                        lm,
                        self.suite,
                        base=self.base,
                        progress=progress,
                        reference=self._reference(model),
                    )
        finally:
            progress.close()
        now = time.time()
        # the round's per-item results: paired intervals (step k vs step 0, arm vs arm) need them
        write_json_atomic(eval_round_path(self.run_dir, step), result.to_dict())
        records = result.records(step, now)
        comparison = None
        seconds = time.monotonic() - started
        if self.base is not None:
            comparison = compare_results(self.base, result, self.suite)
            record = comparison.summary_record(step, now)
            record["seconds"] = seconds
            records.append(record)
        # one write: a kill leaves the round recorded whole or not at all (then it runs again)
        append_metrics(self.run_dir, records)
        self.recorded.add(step)
        self.seconds += seconds
        self.last_step = step
        self.history.append((step, result, comparison))
        return result


def make_training_callbacks(
    config: Any, run_dir: str | Path, status: StatusFn | None = None
) -> list[Any]:
    """Callbacks for `core.training.trainer`: evaluation every `config.eval_every` steps on the suite
    `config.eval_suite` names (see `suite_from_config`), results in metrics.jsonl."""
    from core.model.loading import (  # lazy: heavy (torch)
        DEFAULT_MODEL,
        EMBEDDED_FINGERPRINT,
        load_model,
    )

    if not getattr(config, "eval_every", None):
        return []
    target = getattr(config, "task", None) if not getattr(config, "data", None) else None
    suite = suite_from_config(getattr(config, "eval_suite", None), target)
    fingerprint = EMBEDDED_FINGERPRINT if config.model == DEFAULT_MODEL else None
    return [
        EvalCallback(
            suite,
            run_dir,
            int(config.eval_every),
            model_name=str(config.model),
            fingerprint=fingerprint,
            cache=EvalCache(),
            status=status,
            load_reference=lambda: load_model(config.model, device=config.device),
        )
    ]
