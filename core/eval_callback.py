"""Evaluation during training: a `transformers.TrainerCallback` that scores the model being
trained on a suite's small fixed subsets at step 0 (the base model), every N steps and at the
end, and appends the results to `<run_dir>/metrics.jsonl`.

Records (one line each, written with `core.jobs.append_metric`: one write, then fsync):

- ``{"kind": "eval", "step", "time", "task", "metric", "value", "n", "role"}`` per task and metric;
- ``{"kind": "eval_summary", "step", "time", "bwt", "ti", "nll_easy_change", "notes",
  "seconds"}`` after each round, against the step-0 result (TI / BWT are null when undefined;
  `notes` says why).

Rounds run in the model's own dtype, without autocast, even when training uses bf16 autocast:
on the embedded model on a CPU a round took 6x longer under bf16 autocast than in float32
(docs/BENCHMARKS.md). Accelerate's mixed precision wraps the trained model's `forward` in
autocast in place (`Accelerator.prepare_model` keeps the original as `_original_forward`), so the
callback calls the original forward for the length of a round and restores the wrapper after.

Step 0 is the base model: a fresh LoRA adapter starts as an exact no-op (its B matrix is zero).
Its result comes from the evaluation cache when the model's fingerprint is known and the suite
was run before, so repeated runs do not pay for it again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from core.evaluation import (
    Comparison,
    EvalCache,
    EvalSuite,
    SuiteResult,
    base_suite_result,
    compare_results,
    run_suite,
)
from core.jobs import append_metric
from core.models import LoadedModel


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
        self.base: SuiteResult | None = None
        self.last_step: int | None = None
        self.history: list[tuple[int, SuiteResult, Comparison | None]] = []
        self.seconds = 0.0

    # -- trainer events -----------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step 0 (or the resumed step): the reference every later round is compared with."""
        if state.is_world_process_zero:
            self._round(args, state, kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every N steps."""
        step = state.global_step
        if state.is_world_process_zero and step % self.every_n_steps == 0:
            if step != self.last_step:
                self._round(args, state, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The final model, unless the last round already saw it."""
        if state.is_world_process_zero and self.eval_at_end and state.global_step != self.last_step:
            self._round(args, state, kwargs)

    def _round(self, args: Any, state: Any, kwargs: dict[str, Any]) -> None:
        self.evaluate(state.global_step, kwargs["model"], kwargs.get("processing_class"))

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

    def evaluate(self, step: int, model: Any, tokenizer: Any = None) -> SuiteResult:
        """Run one round on `model` now and append its records; returns the result.

        No autocast, even when training runs under bf16 autocast (see the module docstring).
        """
        started = time.monotonic()
        lm = self._loaded(model, tokenizer)
        with torch.no_grad(), without_mixed_precision_wrapper(model):
            cache = self.cache if self.fingerprint else None
            if step == 0 and self.base is None:
                result, _ = base_suite_result(lm, self.suite, cache=cache)
                self.base = result
            else:
                if self.base is None and cache is not None:  # resumed run: base from cache
                    key = EvalCache.key(lm.cache_key, lm.template_fingerprint, self.suite)
                    self.base = cache.get(key)
                result = run_suite(lm, self.suite, base=self.base, keep_details=False)
        now = time.time()
        for record in result.records(step, now):
            append_metric(self.run_dir, record)
        comparison = None
        seconds = time.monotonic() - started
        if self.base is not None:
            comparison = compare_results(self.base, result, self.suite)
            record = comparison.summary_record(step, now)
            record["seconds"] = seconds
            append_metric(self.run_dir, record)
        self.seconds += seconds
        self.last_step = step
        self.history.append((step, result, comparison))
        return result
