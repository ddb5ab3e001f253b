"""Fine-tuning with the mask: TRL's SFTTrainer on pre-tokenized (input_ids, labels) data.

What reaches the trainer is decided here and nowhere else:

- Token ids come from `core.model.encoding.encode_pair` (prompt-conditioned chat template, the same
  ids scoring used), and labels from `core.masking.rules.labels_for`: -100 on prompt/template tokens
  and on masked response tokens, the token id elsewhere.
- `method` picks the mask: ``gt`` trains every response token; ``stm`` masks tokens whose
  perplexity under the ORIGINAL model exceeds tau (mode high); ``random`` masks as many tokens
  as stm would at random positions (the control); ``low`` masks ppl < tau; ``percentile`` masks
  k% per example. Scores come from `core.scoring.score_examples` with the score cache, computed
  before any weight changes, in float32 (the app's CPU default, so Explore's scores are reused).
- Examples left with no trainable token stay in the data (they add no loss: TRL divides the
  summed token loss by the number of trainable tokens) and are counted in `summary.json`, the
  log and the start of the run; nothing is dropped silently. Over-long examples are truncated by
  `encode_pair` and counted too.

Why SFTTrainer takes the data as is: TRL 1.16 treats a dataset that already has `input_ids`
as processed, keeps an existing `labels` column, and its collator pads labels with -100. Its
preparation would, with `max_length` set, truncate and then silently drop examples with no
trainable label, so preparation is skipped (`skip_prepare_dataset`) and `max_length` is None:
truncation already happened, visibly, in `encode_pair`.

Data sources (`TrainConfig`): a built-in task split (``task`` + ``split``), or ``data``: a
JSONL/CSV file of prompt/response rows, a generated-set folder (``manifest.json`` of kind
self_output / rephrase + ``examples.jsonl``, see `core.datagen.store`), or a masked export folder
from `core.masking.export_masked_dataset` (its labels already carry a mask; train it with
method ``gt``).

Evaluation during training plugs in as extra `transformers.TrainerCallback`s: pass them to
`build_trainer` / `run_training`; in background jobs, `job_callbacks` asks
`core.training.callbacks_mk.make_training_callbacks(config, run_dir)` for them when ``eval_every`` is set.

Several processes: the same command runs under Accelerate (DDP), all processes sharing one run
folder: ``accelerate launch --num_processes N -m core train --config run.json --run-dir runs/x``.
Every process builds the training data (the main process of each machine first, so its scoring
fills the score cache the others read), prints the sha256 of its rows (`TrainingData.
labels_sha256`) and stops with an error unless all processes hold the same rows. Only the
main process (rank 0) writes config.json, metrics.jsonl, checkpoints' shared files, adapter/,
summary.json and the registry row, prints the run's progress, and evaluates (`EvalCallback`): the
other processes wait for its rounds at their next step (`EVAL_WAIT_S`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.jobs.metrics import DataRecord, DoneRecord, loss_by_step
from core.jobs.runfiles import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    StatusFn,
    checkpoint_step,
    checkpoints,
)
from core.jobs.state import StateReporter, as_reporter
from core.training.callbacks import _metrics_callback, job_callbacks
from core.training.checkpoints import clean_partial, rewind_metrics, with_atomic_checkpoints
from core.training.config import REPORTERS, TrainConfig
from core.training.data import TrainingData, build_training_data

#: How long the other processes of a multi-process run wait (at their next gradient all-reduce)
#: for rank 0's evaluation round: torch's default of 30 minutes can be shorter than one round of
#: a large suite on a large model. Used only when `eval_every` is set.
EVAL_WAIT_S = 6 * 3600
DEFAULT_DDP_TIMEOUT_S = 1800

# --------------------------------------------------------------------------- trainer


def cpu_has_fast_bf16() -> bool:
    """True if the CPU has AMX or AVX512-BF16 (bf16 matmuls much faster than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device_type: str) -> bool:
    """Whether to train under bf16 autocast: auto = CUDA with bf16, or a CPU with AMX/AVX512-BF16."""
    import torch

    if precision == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LensError("bf16 was requested but this GPU does not support it; use fp32.")
        if device_type == "mps":
            raise LensError("bf16 training is not supported on MPS here; use fp32.")
        return True
    if precision == "fp32":
        return False
    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    return False


def _training_device(config: TrainConfig) -> str:
    """The device this process trains on (each Accelerate process gets its own GPU)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if config.device == "auto" and local_rank is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local_rank)}"
    return config.device


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless started by `accelerate launch` /
    torchrun, which set RANK and WORLD_SIZE."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_same_data(data: TrainingData, rank: int, world_size: int) -> str:
    """Under several processes: print this rank's `labels_sha256`, gather every rank's, and
    raise `LensError` on every rank unless they are all the same (each process trains on its
    share of ITS rows, so rows that differ would silently train on a mix). Returns the digest."""
    from accelerate.utils import gather_object

    digest = data.labels_sha256
    print(
        f"rank {rank}/{world_size}: training data sha256 {digest} "
        f"({data.n_examples} examples, {data.n_trainable_tokens} trained tokens"
        + (f"; {data.scores}" if data.scores else "")
        + ")",
        flush=True,
    )
    digests = gather_object([digest])
    if len(set(digests)) > 1:
        shown = ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(digests))
        raise LensError(
            f"The {world_size} processes built different training data ({shown}); every process "
            "must see the same data, models and score cache settings."
        )
    return digest


def _check_reporters(names: list[str]) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise LensError(
                f"report_to {name} needs the '{name}' package: "
                'pip install "perplexity-lens[tracking]"'
            )


def _peft_config(config: TrainConfig) -> Any:
    if config.finetune == "full":
        return None
    from peft import LoraConfig

    target: Any = config.lora_target
    if target != "all-linear":
        target = [t.strip() for t in target.split(",") if t.strip()]
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        use_dora=config.finetune == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_trainer(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: Sequence[Any] | None = None,
    lm: Any = None,
    data: TrainingData | None = None,
    status: StatusFn | None = None,
) -> tuple[Any, TrainingData]:
    """An SFTTrainer ready to `.train()`, and the data it trains on.

    `callbacks` are extra `transformers.TrainerCallback`s (e.g. evaluation every N steps).
    `lm` is a `core.model.loading.LoadedModel` to train (loaded in float32 if not given); masked
    methods score the data with it BEFORE training, i.e. under the original weights.
    """
    import warnings

    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from core.model.loading import load_model

    run = Path(run_dir)
    _check_reporters(config.report_to)
    if lm is None:
        if status:
            status(f"loading model {config.model}")
        lm = load_model(config.model, device=_training_device(config), dtype="float32")
    bf16 = resolve_precision(config.precision, lm.device.type)
    if "tensorboard" in config.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run / "tensorboard"))
    datasets.disable_progress_bars()
    # transformers 5 deprecation noise from peft/TRL internals, not actionable by the user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # The arguments come before the data: they set up the distributed state (gloo on CPU, NCCL
    # on GPUs, with `ddp_timeout`) that `main_process_first` below waits on.
    args = SFTConfig(
        output_dir=str(run / CHECKPOINTS_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_every else "epoch",
        save_steps=config.save_every or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=lm.device.type == "cpu",
        gradient_checkpointing=None,  # deprecated alias in transformers 5; TRL defaults it on
        activation_checkpointing=config.gradient_checkpointing,
        report_to=list(config.report_to) or "none",
        run_name=run.name,
        disable_tqdm=True,
        log_level="warning",
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        eval_strategy="no",
        ddp_timeout=EVAL_WAIT_S if config.eval_every else DEFAULT_DDP_TIMEOUT_S,
    )
    if data is None:
        # Several processes: the main process of each machine scores first and fills the score
        # cache, then the others build the same rows from it (no-op in a single process).
        with args.main_process_first(desc="building the training data"):
            data = build_training_data(config, lm, status=status)
    if args.world_size > 1:
        check_same_data(data, args.process_index, args.world_size)
    train_dataset = datasets.Dataset.from_list(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.rows]
    )
    # checkpoints written whole or not at all (a kill while saving leaves nothing to resume from)
    trainer = with_atomic_checkpoints(SFTTrainer)(
        model=lm.model,
        args=args,
        train_dataset=train_dataset,
        processing_class=lm.tokenizer,
        peft_config=_peft_config(config),
        callbacks=[_metrics_callback(run, status), *(callbacks or [])],
    )
    # Our callback prints one readable line per step; transformers' printer would add a dict.
    trainer.remove_callback(PrinterCallback)
    return trainer, data


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest `checkpoint-N` folder that was written to the end (has trainer_state.json)."""
    found = checkpoints(folder, complete=True)
    return found[-1] if found else None


def _loss_summary(records: list[dict[str, Any]], n: int = 3) -> dict[str, Any]:
    by_step = loss_by_step(records)
    losses = [by_step[s] for s in sorted(by_step)]
    if not losses:
        return {"train_loss_first": None, "train_loss_last": None}
    k = min(n, len(losses))
    return {
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "logged_steps": len(losses),
    }


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    from core import __version__

    return {
        "perplexity_lens": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


def _save_final_model(trainer: Any, target: Path) -> None:
    """Save the adapter (or full model) and tokenizer to `target` via a temp folder + rename."""
    from core.io import replace_dir_atomic

    replace_dir_atomic(target, lambda folder: trainer.save_model(str(folder)))


def run_training(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: Sequence[Any] | None = None,
    status: StatusFn | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (resuming from its last complete checkpoint) and return the
    summary also written to summary.json.

    Writes config.json (or checks that the folder's config is the same), metrics.jsonl (start,
    train, checkpoint and done records), checkpoints/, adapter/ and summary.json. Under several
    processes only rank 0 writes them and prints the run's lines (see the module docstring); the
    other ranks return an empty summary.
    """
    from core.io import write_json_atomic
    from core.jobs.runfiles import CONFIG_JSON, SUMMARY_JSON, append_metric, read_metrics

    run = Path(run_dir).expanduser().absolute()
    main = process_rank()[0] == 0
    run.mkdir(parents=True, exist_ok=True)
    existing = run / CONFIG_JSON
    if existing.is_file():
        if TrainConfig.from_json_file(existing).to_dict() != config.to_dict():
            raise LensError(
                f"{run} holds a run with a different config; use a new run folder or "
                f"--config {existing}."
            )
    elif main:
        write_json_atomic(existing, config.to_dict())
    started = time.time()
    if main:
        print(f"run folder: {run}", flush=True)
        print(f"config: {config.describe()}", flush=True)
    trainer, data = build_trainer(config, run, callbacks=callbacks, status=status)
    main = trainer.is_world_process_zero()
    if main:  # what a killed attempt left half-written goes; its steps after the checkpoint too
        removed = clean_partial(run / CHECKPOINTS_DIR)
        if removed:
            print(f"removed what a killed attempt left half-written: {', '.join(removed)}",
                  flush=True)  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    resume = last_complete_checkpoint(run / CHECKPOINTS_DIR)
    if main:
        rewind_metrics(run, (checkpoint_step(resume) or 0) if resume else 0)
        print(f"data: {data.describe()}", flush=True)
        if data.fully_masked_ids:
            shown = ", ".join(data.fully_masked_ids[:20])
            print(f"examples with no trainable token: {shown}", flush=True)
        if data.skipped:
            shown = "; ".join(f"{i}: {r}" for i, r in data.skipped[:20])
            print(f"skipped examples: {shown}", flush=True)
        if resume is not None:
            print(f"resuming from {resume.name}", flush=True)
        append_metric(run, DataRecord(fields=data.summary()))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    reporter = as_reporter(status)
    if reporter is not None:
        reporter.saving("the final model")
    summary: dict[str, Any] = {}
    if main:
        _save_final_model(trainer, run / ADAPTER_DIR)
        summary = {
            "config": config.to_dict(),
            "model": config.model,
            "finetune": config.finetune,
            "adapter_dir": str(run / ADAPTER_DIR),
            "data": data.summary(),
            "final_step": int(trainer.state.global_step),
            "max_steps": int(trainer.state.max_steps),
            "epochs": float(trainer.state.epoch or 0.0),
            "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
            "wall_time_s": time.time() - started,
            "resumed_from": resume.name if resume else None,
            "precision": "bf16" if trainer.args.bf16 else "fp32",
            "device": str(trainer.args.device),
            "world_size": int(trainer.args.world_size),
            **_loss_summary(read_metrics(run)),
            "versions": _versions(),
            "finished": time.time(),
        }
        write_json_atomic(run / SUMMARY_JSON, summary)
        done = DoneRecord(
            step=summary["final_step"],
            fields={k: summary[k] for k in ("train_loss_first", "train_loss_last")},
        )
        append_metric(run, done)
        print(
            f"done: step {summary['final_step']}, loss {summary['train_loss_first']:.4f} -> "
            f"{summary['train_loss_last']:.4f}, saved {run / ADAPTER_DIR}",
            flush=True,
        )
    return summary


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "train" job process (see `core.jobs.registry.run_job_process`)."""
    config = TrainConfig.from_dict(job.config)

    # the job's state (preparing data, evaluating step k, training step k/N, final evaluation,
    # saving): run_state.json, the status line and the log, with ETAs from measured rates
    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    run_training(config, job.path, callbacks=job_callbacks(config, job.path, status), status=status)
