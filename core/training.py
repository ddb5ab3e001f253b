"""Fine-tuning with the mask: TRL's SFTTrainer on pre-tokenized (input_ids, labels) data.

What reaches the trainer is decided here and nowhere else:

- Token ids come from `core.encoding.encode_pair` (prompt-conditioned chat template, the same
  ids scoring used), and labels from `core.masking.labels_for`: -100 on prompt/template tokens
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
self_output / rephrase + ``examples.jsonl``, see `core.generated`), or a masked export folder
from `core.masking.export_masked_dataset` (its labels already carry a mask; train it with
method ``gt``).

Evaluation during training plugs in as extra `transformers.TrainerCallback`s: pass them to
`build_trainer` / `run_training`; in background jobs, `job_callbacks` asks
`core.evaluation.make_training_callbacks(config, run_dir)` for them when ``eval_every`` is set.

Several GPUs: the same command runs under Accelerate, every process writing to one run folder:
``accelerate launch -m core train --config run.json --run-dir runs/my-run``.
Only the main process writes metrics, the summary and the registry row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import DataError, LensError

METHODS = ("gt", "stm", "random", "low", "percentile")
FINETUNES = ("lora", "dora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
REPORTERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
IGNORE_INDEX = -100
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"

StatusFn = Callable[[str], None]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Everything one training run needs; defaults are the ``paper`` preset.

    Build one with `TrainConfig.from_preset("cpu-quick", limit=32)`; `to_dict` / `from_dict`
    round-trip it through `config.json`.
    """

    preset: str = field(default="paper", metadata=_help("preset the defaults come from"))
    # model
    model: str = field(
        default="default",
        metadata=_help("'default' (embedded SmolLM2-135M), a Hugging Face id or a local folder"),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(
        default="auto",
        metadata=_help(
            "auto (bf16 on GPUs with bf16 and on CPUs with AMX/AVX512-BF16), fp32, bf16"
        ),
    )
    # data
    task: str | None = field(default="mbpp", metadata=_help("built-in task to train on"))
    split: str | None = field(default="train", metadata=_help("task split"))
    data: str | None = field(
        default=None,
        metadata=_help(
            "instead of a task: JSONL/CSV of prompt/response, a generated-set folder or a "
            "masked export folder"
        ),
    )
    prompt_col: str = field(default="prompt", metadata=_help("prompt column of a data file"))
    response_col: str = field(default="response", metadata=_help("response column of a data file"))
    id_col: str | None = field(
        default=None, metadata=_help("id column of a data file (default: row numbers)")
    )
    limit: int | None = field(default=None, metadata=_help("first N examples only"))
    max_length: int = field(default=1024, metadata=_help("tokens per example (longer: truncated)"))
    # mask
    method: str = field(
        default="gt", metadata=_help("gt, stm, random (control), low or percentile")
    )
    tau: float | None = field(default=2.5, metadata=_help("token-perplexity threshold"))
    target_share: float | None = field(
        default=None, metadata=_help("instead of tau: share of response tokens to mask (0-1)")
    )
    k_percent: float = field(default=20.0, metadata=_help("percentile method: k%% per example"))
    percentile_rule: str = field(default="top", metadata=_help("percentile: top, random, bottom"))
    mask_seed: int = field(default=0, metadata=_help("seed of random masks"))
    # fine-tuning
    finetune: str = field(default="lora", metadata=_help("lora, dora or full"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    lora_target: str = field(
        default="all-linear", metadata=_help("'all-linear' or comma-separated module names")
    )
    learning_rate: float = field(default=2e-5, metadata=_help("peak learning rate"))
    epochs: float = field(default=3.0, metadata=_help("passes over the data"))
    max_steps: int | None = field(
        default=None, metadata=_help("stop after N steps (overrides epochs)")
    )
    lr_scheduler: str = field(default="cosine", metadata=_help("cosine, linear, constant, ..."))
    warmup_ratio: float = field(default=0.0, metadata=_help("share of steps for linear warmup"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    batch_size: int = field(default=8, metadata=_help("examples per device per step"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations (less memory, slower)")
    )
    seed: int = field(default=0, metadata=_help("training seed (data order, LoRA init)"))
    # checkpoints, logging, evaluation
    save_every: int | None = field(
        default=None, metadata=_help("checkpoint every N steps (default: every epoch)")
    )
    save_total_limit: int = field(default=2, metadata=_help("checkpoints kept"))
    logging_steps: int = field(default=1, metadata=_help("log the loss every N steps"))
    report_to: list[str] = field(
        default_factory=list, metadata=_help("also log to: tensorboard, mlflow, wandb")
    )
    eval_every: int | None = field(
        default=None, metadata=_help("evaluate every N steps (needs core.evaluation)")
    )
    eval_suite: Any = field(
        default=None, metadata=_help("what to evaluate (passed to the evaluation callbacks)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [r for r in self.report_to.split(",") if r.strip()]
        self.report_to = [r.strip().lower() for r in self.report_to if r.strip().lower() != "none"]
        self.validate()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> TrainConfig:
        """The preset's values, then `overrides`."""
        if name not in PRESETS:
            raise LensError(f"Unknown preset '{name}' (use {', '.join(PRESETS)}).")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From a `config.json` dict: the named preset first, then the given keys."""
        if not isinstance(data, dict):
            raise LensError("A training config must be a JSON object.")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LensError(f"Unknown training setting(s): {', '.join(unknown)}.")
        values = dict(data)
        return cls.from_preset(values.pop("preset", "paper"), **values)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        """Read a config JSON file (e.g. a run's config.json)."""
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise LensError(f"Cannot read config {p}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise LensError(f"{p} is not valid JSON ({exc}).") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what config.json holds)."""
        return asdict(self)

    # -- checks and derived values ----------------------------------------------------------

    def validate(self) -> None:
        """Raise LensError (one line) on any inconsistent setting."""
        if self.preset not in PRESETS:
            raise LensError(f"Unknown preset '{self.preset}' (use {', '.join(PRESETS)}).")
        if self.method not in METHODS:
            raise LensError(f"Unknown method '{self.method}' (use {', '.join(METHODS)}).")
        if self.finetune not in FINETUNES:
            raise LensError(f"Unknown fine-tuning '{self.finetune}' (use {', '.join(FINETUNES)}).")
        if self.precision not in PRECISIONS:
            raise LensError(f"Unknown precision '{self.precision}' (use {', '.join(PRECISIONS)}).")
        if self.lr_scheduler not in SCHEDULERS:
            raise LensError(
                f"Unknown lr scheduler '{self.lr_scheduler}' (use {', '.join(SCHEDULERS)})."
            )
        if bool(self.task) == bool(self.data):
            raise LensError("Give exactly one training data source: a task or a data path.")
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad:
            raise LensError(
                f"Unknown report_to '{bad[0]}' (use {', '.join(REPORTERS)}, or leave it empty)."
            )
        positive = {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
            "save_total_limit": self.save_total_limit,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
        }
        for name, value in positive.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise LensError(f"{name} must be a number > 0, got {value!r}.")
        for name in ("limit", "max_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LensError(f"{name} must be a whole number >= 1, got {value!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 16:
            raise LensError(f"max_length must be at least 16 tokens, got {self.max_length!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise LensError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise LensError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.method != "gt":
            self.mask_config()  # validates tau / share / k

    def mask_config(self) -> Any:
        """The `core.masking.MaskConfig` of a masked method (LensError for method gt)."""
        from core.masking import MaskConfig

        if self.method == "gt":
            raise LensError("Method gt trains every response token; it has no mask.")
        if self.method == "percentile":
            return MaskConfig(
                mode="percentile",
                k_percent=self.k_percent,
                percentile_rule=self.percentile_rule,
                seed=self.mask_seed,
            )
        mode = {"stm": "high", "random": "random", "low": "low"}[self.method]
        if self.target_share is not None:
            return MaskConfig(
                mode=mode, tau=None, target_share=self.target_share, seed=self.mask_seed
            )
        return MaskConfig(mode=mode, tau=self.tau, seed=self.mask_seed)

    def data_label(self) -> str:
        """Short description of the training data."""
        head = f"{self.task}/{self.split}" if self.task else Path(str(self.data)).name
        return head + (f"[:{self.limit}]" if self.limit else "")

    def method_label(self) -> str:
        """Short description of the mask, e.g. 'stm τ=2.5' or 'gt'."""
        if self.method == "gt":
            return "gt"
        if self.method == "percentile":
            return f"percentile {self.percentile_rule} {self.k_percent:g}%"
        if self.target_share is not None:
            return f"{self.method} share={self.target_share:g}"
        return f"{self.method} τ={self.tau:g}"

    def describe(self) -> str:
        """One-line label for job lists."""
        model = "default" if self.model == "default" else Path(self.model).name
        return f"{self.method_label()} · {self.finetune} · {self.data_label()} · {model}"


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (METHOD.md): LoRA on all linear layers, lr 2e-5, 3 epochs, cosine.
    "paper": {},
    # Measured on 2 CPU cores with the embedded model (docs/BENCHMARKS.md, "Training"): 5-8
    # minutes end to end (the shared host's speed varies), and the model changes measurably.
    "cpu-quick": {
        "limit": 48,
        "max_length": 320,
        "epochs": 2.0,
        "learning_rate": 5e-4,
        "lr_scheduler": "cosine",
        "batch_size": 8,
        "lora_r": 16,
        "lora_alpha": 32,
    },
}


# --------------------------------------------------------------------------- CLI flags


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def parse_optional(kind: type) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, or None for "none", "null" or an empty value."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parse_json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return [t.strip() for t in text.split(",") if t.strip()]


def cli_flag(name: str) -> str:
    """The command-line flag of a config field: `max_length` -> `--max-length`."""
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config`, `--preset` and one flag per `TrainConfig` field (all default to unset)."""
    parser.add_argument("--config", help="training config JSON (e.g. a run's config.json)")
    hints = _field_types()
    for f in fields(TrainConfig):
        if f.name == "preset":
            parser.add_argument(
                "--preset", default=None, choices=list(PRESETS), help=f.metadata["help"]
            )
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"default": None, "dest": f.name, "help": f.metadata.get("help")}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "report_to":
            kwargs["type"] = lambda s: [r for r in s.split(",") if r.strip()]
            kwargs["metavar"] = "A,B"
        elif f.name == "eval_suite":
            kwargs["type"] = _parse_json_or_text
            kwargs["metavar"] = "JSON|A,B"
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if args else hint
            kwargs["type"] = parse_optional(base) if args else base
            kwargs["metavar"] = base.__name__.upper()
        parser.add_argument(cli_flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """`--config` file (if any), then `--preset`, then every flag given on the command line."""
    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        base = TrainConfig.from_json_file(args.config).to_dict()
    given = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name != "preset" and getattr(args, f.name, None) is not None
    }
    if "data" in given and "task" not in given:
        given["task"] = None
    if "task" in given and "data" not in given:
        given["data"] = None
    preset = args.preset or base.pop("preset", "paper")
    if args.preset and base:
        # an explicit preset replaces the file's preset defaults, but not its explicit values
        file_preset = base.pop("preset", "paper")
        defaults = TrainConfig.from_preset(file_preset).to_dict()
        base = {k: v for k, v in base.items() if defaults.get(k) != v}
    base.pop("preset", None)
    return TrainConfig.from_preset(preset, **{**base, **given})


def _flag_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def cli_command(config: TrainConfig, *, submit: bool = False) -> str:
    """The exact `python -m core train ...` command that runs `config` (only non-preset values)."""
    defaults = TrainConfig.from_preset(config.preset).to_dict()
    parts = ["python", "-m", "core", "train", "--preset", config.preset]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name == "preset" or value == defaults[f.name]:
            continue
        if f.name == "task" and value is None and config.data:
            continue  # implied by --data
        if isinstance(value, bool):
            parts.append(cli_flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            parts += [cli_flag(f.name), _flag_value(value)]
    if submit:
        parts.append("--submit")
    return shlex.join(parts)


# --------------------------------------------------------------------------- data


@dataclass
class TrainingData:
    """The pre-tokenized rows the trainer sees, and what building them did."""

    rows: list[dict[str, Any]]
    source: str
    method: str
    mask: str
    tau: float | None = None
    n_examples: int = 0
    n_response_tokens: int = 0
    n_trainable_tokens: int = 0
    n_truncated: int = 0
    n_fully_masked: int = 0
    fully_masked_ids: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scores: str = ""

    @property
    def masked_share(self) -> float:
        """Pooled share of response tokens that carry no loss."""
        if not self.n_response_tokens:
            return float("nan")
        return 1.0 - self.n_trainable_tokens / self.n_response_tokens

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for summary.json and the log."""
        share = self.masked_share
        return {
            "source": self.source,
            "method": self.method,
            "mask": self.mask,
            "tau": self.tau,
            "n_examples": self.n_examples,
            "n_response_tokens": self.n_response_tokens,
            "n_trainable_tokens": self.n_trainable_tokens,
            "masked_share": None if math.isnan(share) else share,
            "n_fully_masked": self.n_fully_masked,
            "fully_masked_ids": self.fully_masked_ids[:100],
            "n_truncated": self.n_truncated,
            "n_skipped": len(self.skipped),
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped[:100]],
            "scores": self.scores,
        }

    def describe(self) -> str:
        """One line for the log and the UI."""
        share = self.masked_share
        text = (
            f"{self.n_examples} examples, {self.n_response_tokens} response tokens, "
            f"{self.n_trainable_tokens} trained"
        )
        if self.method != "gt" or share > 0:
            text += f" ({100 * share:.1f}% masked, {self.mask})"
        text += f"; {self.n_fully_masked} examples have no trainable token (kept, no loss)"
        if self.n_truncated:
            text += f"; {self.n_truncated} truncated to max_length"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped"
        return text


def _is_masked_export(folder: Path) -> bool:
    from core.masking import MANIFEST_JSON, MASKED_JSONL

    return (folder / MANIFEST_JSON).is_file() and (folder / MASKED_JSONL).is_file()


def _generated_examples_file(folder: Path) -> Path | None:
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") not in ("self_output", "rephrase"):
        return None
    return folder / str(manifest.get("examples", "examples.jsonl"))


def load_training_examples(config: TrainConfig) -> tuple[Any, list[dict[str, Any]] | None]:
    """(Dataset of examples, None), or (None, masked-export rows) for a masked export folder."""
    from core.sources import load_source
    from core.userdata import load_user_data

    if config.task:
        return load_source(task=config.task, split=config.split, limit=config.limit), None
    path = Path(str(config.data)).expanduser()
    if path.is_dir():
        if _is_masked_export(path):
            from core.masking import load_masked_dataset

            if config.method != "gt":
                raise LensError(
                    f"{path.name} is a masked export: its labels already carry a mask. Train it "
                    "with method gt (every label as given), or mask the original data instead."
                )
            rows, _manifest = load_masked_dataset(path)
            return None, rows[: config.limit] if config.limit else rows
        examples_file = _generated_examples_file(path)
        if examples_file is None:
            raise DataError(
                f"{path} is neither a masked export (manifest.json + masked.jsonl) nor a "
                "generated set (manifest.json of kind self_output/rephrase)."
            )
        return load_user_data(
            examples_file, "prompt", "response", id_col="id", limit=config.limit
        ), None
    if not path.is_file():
        raise DataError(f"Training data not found: {path}")
    return (
        load_user_data(
            path, config.prompt_col, config.response_col, id_col=config.id_col, limit=config.limit
        ),
        None,
    )


def _unscored_record(example: Any, enc: Any) -> Any:
    """A `ScoredExample` shell (ids + response start, no scores) so GT labels also come from
    `labels_for`."""
    from core.records import ScoredExample

    return ScoredExample(
        id=example.id,
        prompt=example.prompt,
        response=example.response,
        convention="prompt",
        token_ids=list(enc.input_ids),
        tokens=[],
        response_start=enc.response_start,
        logprob=[],
        rank=[],
        top_ids=[],
        top_tokens=[],
        top_logprobs=[],
        truncated=enc.truncated,
    )


def _score_for_training(
    lm: Any, examples: Sequence[Any], max_length: int, status: StatusFn | None
) -> tuple[list[Any], list[tuple[str, str]], str]:
    """Score with the original model, reusing the score cache; ids equal `encode_pair`'s at
    `max_length`. Examples that fit the model context are looked up at the model's context
    length first (the key the app uses); only longer ones are scored again truncated."""
    from core.cache import ScoreCache
    from core.scoring import score_examples

    cache = ScoreCache()

    def progress(done: int, total: int) -> None:
        if status:
            status(f"scoring {done}/{total} examples with the original model")

    full = score_examples(lm, examples, cache=cache, progress=progress)
    by_id = {rec.id: rec for rec in full.examples}
    too_long = [
        ex for ex in examples if ex.id in by_id and len(by_id[ex.id].token_ids) > max_length
    ]
    n_cached, n_scored = full.n_cached, full.n_scored
    if too_long:
        cut = score_examples(lm, too_long, cache=cache, max_length=max_length, progress=progress)
        by_id.update({rec.id: rec for rec in cut.examples})
        n_cached, n_scored = n_cached + cut.n_cached, n_scored + cut.n_scored
    records = [by_id[ex.id] for ex in examples if ex.id in by_id]
    note = (
        f"{len(records)} scored under {lm.cache_key} ({n_cached} from cache, {n_scored} computed)"
    )
    return records, list(full.skipped), note


def build_training_data(
    config: TrainConfig, lm: Any, *, status: StatusFn | None = None
) -> TrainingData:
    """Load the configured examples and turn them into (input_ids, labels) rows."""
    import numpy as np

    from core.encoding import encode_pair
    from core.masking import compute_masks, labels_for

    if status:
        status("loading data")
    dataset, export_rows = load_training_examples(config)
    if export_rows is not None:
        return _rows_from_export(config, export_rows)
    examples = list(dataset.examples)
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise DataError("Training examples must have unique ids.")
    data = TrainingData(rows=[], source=dataset.report.summary(), method=config.method, mask="none")
    if config.method == "gt":
        records = []
        for ex in examples:
            if not ex.response.strip():
                data.skipped.append((ex.id, "empty response"))
                continue
            enc = encode_pair(
                lm.tokenizer,
                ex.prompt,
                ex.response,
                max_length=min(config.max_length, lm.max_length),
            )
            records.append(_unscored_record(ex, enc))
        masks = [np.zeros(rec.n_response, dtype=bool) for rec in records]
    else:
        records, data.skipped, data.scores = _score_for_training(
            lm, examples, min(config.max_length, lm.max_length), status
        )
        if not records:
            raise DataError("No example could be scored, so there is nothing to train on.")
        result = compute_masks(records, config.mask_config())
        masks = list(result.masks)
        data.mask = result.config.describe()
        data.tau = result.tau
    for rec, mask in zip(records, masks, strict=True):
        labels = labels_for(rec, np.asarray(mask, dtype=bool))
        _add_row(data, rec.id, list(rec.token_ids), labels, rec.n_response, rec.truncated)
    if not data.rows:
        raise DataError("No training examples left (all empty?).")
    return data


def _add_row(
    data: TrainingData,
    example_id: str,
    input_ids: list[int],
    labels: list[int],
    n_response: int,
    truncated: bool,
) -> None:
    trainable = sum(1 for t in labels if t != IGNORE_INDEX)
    data.rows.append({"id": example_id, "input_ids": input_ids, "labels": labels})
    data.n_examples += 1
    data.n_response_tokens += n_response
    data.n_trainable_tokens += trainable
    data.n_truncated += int(truncated)
    if trainable == 0:
        data.n_fully_masked += 1
        data.fully_masked_ids.append(example_id)


def _rows_from_export(config: TrainConfig, rows: list[dict[str, Any]]) -> TrainingData:
    """Rows of a masked export: its labels were built by `labels_for` when it was exported."""
    data = TrainingData(
        rows=[], source=f"masked export {Path(str(config.data)).name}", method="gt", mask="export"
    )
    for row in rows:
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if len(ids) != len(labels):
            raise DataError(f"Export row {row.get('id')!r}: input_ids and labels differ in length.")
        truncated = len(ids) > config.max_length
        n_response = int(row.get("n_response", len(ids) - int(row.get("response_start", 0))))
        if truncated:
            ids, labels = ids[: config.max_length], labels[: config.max_length]
            n_response = max(0, len(ids) - int(row.get("response_start", 0)))
        _add_row(data, str(row["id"]), ids, labels, n_response, truncated)
    if not data.rows:
        raise DataError("The masked export holds no examples.")
    masked = data.n_response_tokens - data.n_trainable_tokens
    data.mask = f"from export ({masked} response tokens masked)"
    return data


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


def _check_reporters(names: list[str]) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise LensError(f"report_to {name} needs the '{name}' package: pip install {name}")


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


def _metrics_callback(run_dir: Path, status: StatusFn | None) -> Any:
    """A TrainerCallback writing start/train/checkpoint records to metrics.jsonl and a readable
    line per log step to stdout (the job's log). Built here so transformers loads lazily."""
    from transformers import TrainerCallback

    from core.jobs import append_metric

    class _MetricsCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                append_metric(
                    run_dir,
                    {
                        "kind": "start",
                        "step": int(state.global_step),
                        "max_steps": int(state.max_steps),
                        "epochs": float(args.num_train_epochs),
                        "time": time.time(),
                    },
                )
                print(f"training: step {state.global_step} of {state.max_steps}", flush=True)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            logs = logs or {}
            if not state.is_world_process_zero or "loss" not in logs:
                return
            record = {
                "kind": "train",
                "step": int(state.global_step),
                "epoch": float(state.epoch or 0.0),
                "time": time.time(),
                "loss": float(logs["loss"]),
                "lr": float(logs.get("learning_rate", 0.0)),
            }
            for key, name in (
                ("grad_norm", "grad_norm"),
                ("mean_token_accuracy", "token_accuracy"),
                ("entropy", "entropy"),
                ("num_tokens", "num_tokens"),
            ):
                if key in logs and logs[key] is not None:
                    record[name] = float(logs[key])
            append_metric(run_dir, record)
            line = (
                f"step {state.global_step}/{state.max_steps} · epoch {record['epoch']:.2f} · "
                f"loss {record['loss']:.4f} · lr {record['lr']:.3g}"
            )
            print(line, flush=True)
            if status:
                status(f"training: step {state.global_step}/{state.max_steps}")

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                append_metric(
                    run_dir,
                    {"kind": "checkpoint", "step": int(state.global_step), "time": time.time()},
                )
                print(f"checkpoint saved at step {state.global_step}", flush=True)

    return _MetricsCallback()


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
    `lm` is a `core.models.LoadedModel` to train (loaded in float32 if not given); masked
    methods score the data with it BEFORE training, i.e. under the original weights.
    """
    import warnings

    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from core.models import load_model

    run = Path(run_dir)
    _check_reporters(config.report_to)
    if lm is None:
        if status:
            status(f"loading model {config.model}")
        lm = load_model(config.model, device=_training_device(config), dtype="float32")
    if data is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Under Accelerate, the main process scores first and fills the cache for the others.
        with PartialState().main_process_first():
            data = build_training_data(config, lm, status=status)
    elif data is None:
        data = build_training_data(config, lm, status=status)
    bf16 = resolve_precision(config.precision, lm.device.type)
    if "tensorboard" in config.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run / "tensorboard"))
    datasets.disable_progress_bars()
    # transformers 5 deprecation noise from peft/TRL internals, not actionable by the user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    train_dataset = datasets.Dataset.from_list(
        [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.rows]
    )
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
    )
    trainer = SFTTrainer(
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
    """The newest `checkpoint-N` folder that was written to the end (has trainer_state.json).

    A run killed while saving leaves a partial folder; it is skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("checkpoint-") and name[11:].isdigit():
            if (path / "trainer_state.json").is_file():
                found.append((int(name[11:]), path))
    return max(found)[1] if found else None


def _loss_summary(records: list[dict[str, Any]], n: int = 3) -> dict[str, Any]:
    by_step: dict[int, float] = {}
    for rec in records:
        if rec.get("kind") == "train" and rec.get("loss") is not None:
            by_step[int(rec["step"])] = float(rec["loss"])
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
    tmp = target.parent / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


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
    train, checkpoint and done records), checkpoints/, adapter/ and summary.json.
    """
    from core.jobs import CONFIG_JSON, SUMMARY_JSON, append_metric, read_metrics, write_json_atomic

    run = Path(run_dir).expanduser().absolute()
    run.mkdir(parents=True, exist_ok=True)
    existing = run / CONFIG_JSON
    if existing.is_file():
        if TrainConfig.from_json_file(existing).to_dict() != config.to_dict():
            raise LensError(
                f"{run} holds a run with a different config; use a new run folder or "
                f"--config {existing}."
            )
    else:
        write_json_atomic(existing, config.to_dict())
    started = time.time()
    print(f"run folder: {run}", flush=True)
    print(f"config: {config.describe()}", flush=True)
    trainer, data = build_trainer(config, run, callbacks=callbacks, status=status)
    main = trainer.is_world_process_zero()
    print(f"data: {data.describe()}", flush=True)
    if data.fully_masked_ids:
        shown = ", ".join(data.fully_masked_ids[:20])
        print(f"examples with no trainable token: {shown}", flush=True)
    if data.skipped:
        shown = "; ".join(f"{i}: {r}" for i, r in data.skipped[:20])
        print(f"skipped examples: {shown}", flush=True)
    resume = last_complete_checkpoint(run / CHECKPOINTS_DIR)
    if resume is not None:
        print(f"resuming from {resume.name}", flush=True)
    if main:
        append_metric(run, {"kind": "data", "time": time.time(), **data.summary()})
    if status:
        status("training" if resume is None else f"training (resumed from {resume.name})")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if status:
        status("saving")
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
            **_loss_summary(read_metrics(run)),
            "versions": _versions(),
            "finished": time.time(),
        }
        write_json_atomic(run / SUMMARY_JSON, summary)
        append_metric(
            run,
            {
                "kind": "done",
                "step": summary["final_step"],
                "time": time.time(),
                "train_loss_first": summary["train_loss_first"],
                "train_loss_last": summary["train_loss_last"],
            },
        )
        print(
            f"done: step {summary['final_step']}, loss {summary['train_loss_first']:.4f} -> "
            f"{summary['train_loss_last']:.4f}, saved {run / ADAPTER_DIR}",
            flush=True,
        )
    return summary


# --------------------------------------------------------------------------- job entry


def job_callbacks(config: TrainConfig, run_dir: Path) -> list[Any]:
    """Extra callbacks of a background run: evaluation every `eval_every` steps, supplied by
    `core.evaluation.make_training_callbacks(config, run_dir)` when that module provides it."""
    if not config.eval_every:
        return []
    import importlib

    try:
        module = importlib.import_module("core.evaluation")
    except ImportError:
        module = None
    factory = getattr(module, "make_training_callbacks", None)
    if factory is None:
        print(
            "warning: eval_every is set but core.evaluation provides no "
            "make_training_callbacks; no evaluation during training",
            flush=True,
        )
        return []
    return list(factory(config, run_dir))


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "train" job process (see `core.jobs.run_job_process`)."""
    config = TrainConfig.from_dict(job.config)

    def status(message: str) -> None:
        registry.set_message(job.id, message)

    run_training(config, job.path, callbacks=job_callbacks(config, job.path), status=status)
