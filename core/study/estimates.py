"""How long a job will take, from rates measured on this machine, and which preset fits it.

The Train and Generate forms show an estimate before a job starts. It rests, in this order, on:

1. **this machine's own runs**: every run folder under the runs root whose settings match
   (same model, device and fine-tuning for training; same generating model and device for
   generation) gives its measured rate: seconds per training sequence from the times of its
   logged steps (median of the gaps between steps, so an evaluation round between two steps
   does not count as training), seconds per evaluation round from the gap an evaluation round
   leaves in its metrics, and generated tokens per second from `candidates.jsonl`, with the
   wall-clock overhead of checking and ranking the samples from `gendata.json`;
2. **the benchmark machine** (docs/BENCHMARKS.md: 2 AMD EPYC cores, the embedded model), only
   for the embedded model on a CPU, and labelled as such;
3. nothing: the form says that the first run will set the rate.

Every estimate carries a sentence saying which of these it rests on.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.fmt import count, duration, num
from core.jobs.runfiles import runs_dir

#: docs/BENCHMARKS.md, "Training": the cpu-quick preset on 2 EPYC cores, LoRA r 16, batch 8,
#: max_length 320, embedded model: 23.5-36 s per step (2026-11-22 and 2026-12-01).
BENCH_TRAIN_SECONDS_PER_SEQUENCE = (23.5 / 8, 36.0 / 8)
BENCH_TRAIN_MAX_LENGTH = 320
#: docs/BENCHMARKS.md, "The cpu-quick preset, end to end": 8 MBPP prompts x 4 samples of at most
#: 192 tokens, 5,062 tokens in about 4 minutes of wall time (generation, sandbox checks and
#: ranking), one torch thread.
BENCH_GEN_TOKENS_PER_SECOND = 5062 / 240
BENCH_GEN_FILL = 5062 / (32 * 192)  # share of the token limit a sample used there
BENCH_SOURCE = "the benchmark machine (docs/BENCHMARKS.md: 2 AMD EPYC cores, embedded model)"


@dataclass(frozen=True)
class Estimate:
    """A job's expected wall time (seconds, with an upper end when it is a range) and what it
    rests on; `seconds` is None when nothing measured applies."""

    seconds: float | None
    high: float | None = None
    basis: str = ""
    measured_here: bool = False

    def text(self) -> str:
        """One line for a form: "Estimated time: about 12m00s (up to 30m00s). Rests on …"."""
        if self.seconds is None:
            return f"Estimated time: not known yet. {self.basis}".strip()
        span = f"about {duration(self.seconds)}"
        if self.high is not None and self.high > self.seconds * 1.1:
            span += f" (up to {duration(self.high)})"
        return f"Estimated time: {span}. {self.basis}".strip()


# --------------------------------------------------------------------------- the machine


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU on this machine."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def resolved_device(device: str) -> str:
    """The device kind a job asking for `device` runs on here: "cuda", "mps" or "cpu"."""
    device = (device or "auto").strip().lower()
    if device.startswith("cuda"):
        return "cuda"
    if device in ("cpu", "mps"):
        return device
    if has_cuda():
        return "cuda"
    try:
        import torch

        if torch.backends.mps.is_available():
            return "mps"
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return "cpu"


def preset_for_device(device: str) -> str:
    """The preset a form opens on: the paper's sizes on a CUDA GPU, `cpu-quick` elsewhere (the
    paper's 400 prompts x 32 samples x 512 tokens, or 3 epochs at lr 2e-5, take days on a CPU)."""
    return "paper" if resolved_device(device) == "cuda" else "cpu-quick"


def device_note(device: str) -> str:
    """Why the form opened on its preset, in a few words."""
    kind = resolved_device(device)
    if kind == "cuda":
        return "a CUDA GPU is available here"
    if (device or "auto") == "auto":
        return f"this machine has no CUDA GPU (jobs run on the {kind.upper()})"
    return f"the sidebar's device is {kind.upper()}"


# --------------------------------------------------------------------------- reading runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _run_folders(root: Path) -> Iterable[Path]:
    """Run folders under `root`: its children and their children (a protocol keeps its
    Self-Output generation inside its own folder)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir():
            found.append(child)
            found.extend(g for g in child.iterdir() if g.is_dir())
    return found


def runs_fingerprint(root: str | Path | None = None) -> str:
    """Changes whenever a run folder's measurements change (a cache key for the estimates):
    the names and modification times of their metrics and candidates files."""
    import hashlib

    digest = hashlib.sha256()
    for folder in sorted(_run_folders(_runs_root(root))):
        for name in ("metrics.jsonl", "candidates.jsonl"):
            try:
                stamp = (folder / name).stat().st_mtime_ns
            except OSError:
                continue
            digest.update(f"{folder}/{name}:{stamp};".encode())
    return digest.hexdigest()[:16]


def runs_key() -> tuple[str, str]:
    """The runs root and its fingerprint: the cache key of a form's estimate (the Train and
    Generate pages read the run folders again only when it changes)."""
    return str(_runs_root(None)), runs_fingerprint()


def _runs_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)

    return runs_dir()


def _same_device(config: dict[str, Any], device: str) -> bool:
    return resolved_device(str(config.get("device") or "auto")) == resolved_device(device)


@dataclass(frozen=True)
class TrainingRun:
    """What one finished or running training run measured."""

    folder: Path
    seconds_per_sequence: float | None
    max_length: int
    eval_rounds: dict[str, list[float]]  # suite key -> seconds of each round


def _suite_key(eval_suite: Any) -> str:
    """A comparable name of a config's evaluation suite (name and limit)."""
    if isinstance(eval_suite, dict):
        return f"{eval_suite.get('suite', 'during')}:{eval_suite.get('limit')}"
    if isinstance(eval_suite, list) and len(eval_suite) == 1:
        return f"{eval_suite[0]}:None"
    return f"{eval_suite or 'during'}:None"


def measure_training_run(folder: Path, config: dict[str, Any]) -> TrainingRun:
    """Seconds per training sequence (median gap between logged steps, per sequence of the
    step) and the seconds of each evaluation round (the gap from the record before a round to
    its last result) of one run folder."""
    rows = _read_jsonl(folder / "metrics.jsonl")
    world = max([int(r.get("world_size") or 1) for r in rows if r.get("kind") == "start"] or [1])
    per_step: list[float] = []
    previous: dict[str, Any] | None = None
    for row in rows:
        if row.get("kind") == "start":
            previous = None  # a resume: the gap to the first step includes loading
        elif row.get("kind") == "train" and row.get("step") is not None:
            if previous is not None and int(row["step"]) > int(previous["step"]):
                gap = float(row.get("time") or 0) - float(previous.get("time") or 0)
                steps = int(row["step"]) - int(previous["step"])
                if gap > 0:
                    per_step.append(gap / steps)
            previous = row
    sequences = int(config.get("batch_size") or 1) * int(config.get("grad_accum") or 1) * world
    per_sequence = statistics.median(per_step) / sequences if per_step else None
    rounds: list[float] = []
    before: float | None = None
    round_end: float | None = None
    round_step: Any = None
    for row in rows:
        kind, time = row.get("kind"), float(row.get("time") or 0.0)
        if kind == "eval":
            if round_end is None or row.get("step") != round_step:
                if round_end is not None and before is not None:
                    rounds.append(round_end - before)
                    before = round_end
                round_step = row.get("step")
            round_end = time
        else:
            if round_end is not None and before is not None:
                rounds.append(round_end - before)
            round_end = None
            if time:
                before = time
    if round_end is not None and before is not None:
        rounds.append(round_end - before)
    key = _suite_key(config.get("eval_suite"))
    return TrainingRun(
        folder=folder,
        seconds_per_sequence=per_sequence,
        max_length=int(config.get("max_length") or 1024),
        eval_rounds={key: [r for r in rounds if r > 0]} if rounds else {},
    )


def training_runs(
    *, model: str, device: str, finetune: str, root: str | Path | None = None
) -> list[TrainingRun]:
    """The measured training runs on this machine with the same model, device and fine-tuning."""
    runs = []
    for folder in _run_folders(_runs_root(root)):
        config = _read_json(folder / "config.json")
        if not isinstance(config, dict) or "finetune" not in config:
            continue
        if config.get("model") != model or config.get("finetune") != finetune:
            continue
        if not _same_device(config, device):
            continue
        run = measure_training_run(folder, config)
        if run.seconds_per_sequence is not None or run.eval_rounds:
            runs.append(run)
    return runs


def training_steps(config: Any, n_examples: int | None) -> int | None:
    """Optimizer steps of a training config over `n_examples` (None when unknown)."""
    if config.max_steps:
        return int(config.max_steps)
    if not n_examples:
        return None
    # as the trainer counts them: batches per epoch, then optimizer steps per epoch
    per_epoch = max(1, math.ceil(n_examples / int(config.batch_size)) // int(config.grad_accum))
    return max(1, math.ceil(per_epoch * float(config.epochs)))


def eval_rounds(config: Any, steps: int | None) -> int:
    """Evaluation rounds a training config runs: step 0, every `eval_every` steps and the end."""
    if not config.eval_every or not steps:
        return 0
    every = int(config.eval_every)
    return 1 + steps // every + (1 if steps % every else 0)


def estimate_training(
    config: Any, n_examples: int | None, *, root: str | Path | None = None
) -> Estimate:
    """Expected wall time of a training config (`core.training.config.TrainConfig`) on
    `n_examples` examples, from this machine's runs, else the benchmark machine's."""
    steps = training_steps(config, n_examples)
    if steps is None:
        return Estimate(
            None, basis="The number of examples is not known before the job reads the data."
        )
    sequences = steps * int(config.batch_size) * int(config.grad_accum)
    device = resolved_device(config.device)
    runs = training_runs(
        model=config.model, device=config.device, finetune=config.finetune, root=root
    )
    timed = [r for r in runs if r.seconds_per_sequence is not None]
    same_length = [r for r in timed if r.max_length == int(config.max_length)]
    note = ""
    if same_length:
        rate = statistics.median(r.seconds_per_sequence for r in same_length)  # type: ignore[misc]
        used = same_length
    elif timed:
        # longer sequences cost about in proportion (an upper bound when examples are shorter)
        rate = statistics.median(
            r.seconds_per_sequence * int(config.max_length) / r.max_length  # type: ignore[operator]
            for r in timed
        )
        used = timed
        lengths = ", ".join(sorted({str(r.max_length) for r in timed}))
        note = (
            f", scaled from max_length {lengths} to {config.max_length}: an upper bound when "
            "the examples are shorter"
        )
    else:
        used = []
        rate = None
    rounds = eval_rounds(config, steps)
    round_s, round_note = _round_seconds(runs, config) if rounds else (None, "")
    plan = f"{count(steps)} steps of {count(int(config.batch_size) * int(config.grad_accum))}"
    if rate is not None:
        seconds = sequences * rate
        basis = (
            f"{plan} at {num(rate * int(config.batch_size) * int(config.grad_accum))} s per step, "
            f"measured on this machine ({_runs_phrase(used)} of {config.model} on the "
            f"{device.upper()}, {config.finetune}{note})."
        )
        measured = True
        high = None
    elif config.model == "default" and device == "cpu":
        low_rate, high_rate = (
            r * int(config.max_length) / BENCH_TRAIN_MAX_LENGTH
            for r in BENCH_TRAIN_SECONDS_PER_SEQUENCE
        )
        seconds, high = sequences * low_rate, sequences * high_rate
        scaled = (
            ""
            if int(config.max_length) == BENCH_TRAIN_MAX_LENGTH
            else f", scaled from max_length {BENCH_TRAIN_MAX_LENGTH} to {config.max_length}"
        )
        basis = (
            f"{plan} at the rate of {BENCH_SOURCE}{scaled}: no training run has been measured "
            "on this machine yet."
        )
        measured = False
    else:
        return Estimate(
            None,
            basis=f"{plan}: no run of {config.model} on the {device.upper()} has been measured "
            "here yet; the first steps of this run set the rate (the job view shows its ETA).",
        )
    basis += " Loading the model and the data come on top."
    if config.method != "gt":
        basis += " A masked method first scores its examples (free when already scored)."
    if rounds:
        if round_s is not None:
            seconds += rounds * round_s
            if high is not None:
                high += rounds * round_s
            basis += f" Plus {count(rounds)} evaluation rounds of about {duration(round_s)} "
            basis += f"each ({round_note})."
        else:
            basis += (
                f" Plus {count(rounds)} evaluation rounds, not measured here yet for this suite "
                "(a round of the protocol suite took about a minute on the benchmark machine)."
            )
    return Estimate(seconds, high, basis, measured)


def _round_seconds(runs: list[TrainingRun], config: Any) -> tuple[float | None, str]:
    key = _suite_key(config.eval_suite)
    rounds = [s for r in runs for s in r.eval_rounds.get(key, [])]
    if not rounds:
        return None, ""
    return statistics.median(rounds), f"median of {count(len(rounds))} measured here"


def _runs_phrase(runs: list[Any]) -> str:
    return "1 earlier run" if len(runs) == 1 else f"median of {count(len(runs))} earlier runs"


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationRun:
    """What one generation run measured."""

    folder: Path
    tokens: int
    generation_seconds: float
    overhead: float  # wall time / generation time (checking and ranking the samples)
    fill: float  # mean tokens per sample / the run's token limit
    rows: int  # sequences decoded together (prompt_batch x samples per prompt)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of generation."""
        return self.tokens / self.generation_seconds


def measure_generation_run(folder: Path, config: dict[str, Any]) -> GenerationRun | None:
    """Tokens per second, wall-clock overhead and fill of one generation run folder."""
    records = _read_jsonl(folder / "candidates.jsonl")
    tokens = samples = 0
    seconds = 0.0
    for rec in records:
        cands = rec.get("candidates") or []
        seconds += float(rec.get("seconds") or 0.0)
        samples += len(cands)
        tokens += sum(int(c.get("n_tokens") or 0) for c in cands if isinstance(c, dict))
    if not tokens or seconds <= 0:
        return None
    state = _read_json(folder / "gendata.json")
    wall = float(state.get("wall_seconds") or 0.0) if isinstance(state, dict) else 0.0
    overhead = max(1.0, wall / seconds) if wall else 1.0
    limit = int(config.get("max_new_tokens") or 512)
    per_prompt = int(config.get("n_samples") or 1) if config.get("kind") != "rephrase" else 1
    return GenerationRun(
        folder=folder,
        tokens=tokens,
        generation_seconds=seconds,
        overhead=overhead,
        fill=min(1.0, tokens / samples / limit) if samples else 1.0,
        rows=int(config.get("prompt_batch") or 1) * per_prompt,
    )


def generation_runs(
    *, model: str, device: str, root: str | Path | None = None
) -> list[GenerationRun]:
    """Measured generation runs on this machine whose generating model (the teacher, else the
    model) and device match."""
    runs = []
    for folder in _run_folders(_runs_root(root)):
        config = _read_json(folder / "config.json")
        if not isinstance(config, dict) or "n_samples" not in config:
            continue
        if (config.get("teacher") or config.get("model")) != model:
            continue
        if not _same_device(config, device):
            continue
        run = measure_generation_run(folder, config)
        if run is not None:
            runs.append(run)
    return runs


def estimate_generation(
    config: Any, n_prompts: int | None, *, root: str | Path | None = None
) -> Estimate:
    """Expected wall time of a generation config (`core.datagen.config.GenDataConfig`) over
    `n_prompts` prompts: at most every sample runs to the token limit, typically they stop
    where earlier runs' samples stopped."""
    if not n_prompts:
        return Estimate(
            None, basis="The number of prompts is not known before the job reads the data."
        )
    samples = n_prompts * config.samples_per_prompt
    most = samples * int(config.max_new_tokens)
    generator = config.teacher or config.model
    device = resolved_device(config.device)
    plan = (
        f"{count(n_prompts)} prompts × {count(config.samples_per_prompt)} samples × at most "
        f"{count(config.max_new_tokens)} tokens"
    )
    runs = generation_runs(model=generator, device=config.device, root=root)
    if runs:
        rows = config.prompt_batch * config.samples_per_prompt
        close = [r for r in runs if r.rows == rows] or runs
        rate = statistics.median(r.tokens_per_second for r in close)
        overhead = statistics.median(r.overhead for r in close)
        fill = statistics.median(r.fill for r in close)
        batch_note = "" if close[0].rows == rows else f", decoding {close[0].rows} rows at once"
        basis = (
            f"{plan} at {num(rate)} tokens/s, measured on this machine ({_runs_phrase(close)} "
            f"of {generator} on the {device.upper()}{batch_note}); checking and ranking the "
            f"samples added {num(100 * (overhead - 1), 2)}% there, and samples used "
            f"{num(100 * fill, 2)}% of their token limit."
        )
        return Estimate(
            most * fill / rate * overhead, most / rate * overhead, basis, measured_here=True
        )
    if generator == "default" and device == "cpu":
        rate = BENCH_GEN_TOKENS_PER_SECOND
        basis = (
            f"{plan} at {num(rate)} tokens/s (checks and ranking included), the rate of "
            f"{BENCH_SOURCE}: no generation run has been measured on this machine yet."
        )
        return Estimate(most * BENCH_GEN_FILL / rate, most / rate, basis)
    return Estimate(
        None,
        basis=f"{plan}: no generation with {generator} on the {device.upper()} has been measured "
        "here yet; the job view shows its progress and rate once it runs.",
    )
