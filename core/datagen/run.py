"""Generated training data: Self-Output and Rephrase sets, made by a background job.

Self-Output (docs/METHOD.md): for each training prompt the model samples N responses; every sample is
checked by the task's verifier (MBPP / HumanEval: the asserts run in `core.eval.sandbox`; GSM8K: the
final number; MATH: the last \boxed{} answer); among the correct ones the label is picked by
sequence perplexity (lowest by default, or random / highest) under the scoring model, in either
perplexity convention. Prompts with no correct sample are dropped and counted.

Rephrase: the model is shown the instruction AND the ground-truth answer through an editable
template and writes its own answer; the same verifier filters it; the kept answer is paired with
the ORIGINAL instruction.

Teacher (distillation): `teacher` names another model that generates; the scoring model (the
student, `model`) still ranks the candidates.

Resume: every finished prompt is appended as one line to `<run_dir>/candidates.jsonl` (all its
samples, their verdicts and perplexities, the chosen one). A restarted run skips the prompts found
there, so a cancelled or killed job loses at most the batch that was in flight. The samples of a
half-finished batch are drawn afresh on restart (the sampling seed is per batch).

The result is written with `core.datagen.store.write_generated_set` under a versioned name
(`<base>-v<N>`, N one more than the newest existing version), with provenance in the manifest:
models, settings, seed, acceptance rate, prompts kept and dropped, tokens and wall time.

No Streamlit imports here.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.data.records import Example, prompt_hash
from core.data.sources import load_source
from core.data.tasks import get_task
from core.datagen.config import MATH_HINT, SELECTIONS, GenDataConfig
from core.errors import LensError
from core.eval.grading import check_answers, resolve_verifier
from core.eval.suites import GSM8K_INSTRUCTION
from core.io import append_jsonl, read_json, read_jsonl, write_json_atomic
from core.jobs.metrics import DoneRecord, GenerateRecord, StartRecord, as_records
from core.jobs.runfiles import StatusFn, append_metric
from core.jobs.state import StateReporter, as_reporter

CANDIDATES_JSONL = "candidates.jsonl"
STATE_JSON = "gendata.json"

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- selection


def select_candidate(
    ppls: Sequence[float | None], correct: Sequence[bool], rule: str, rng: random.Random
) -> int | None:
    """Index of the label among the candidates: the correct one with the lowest (or highest)
    sequence perplexity, or a random correct one; None when no candidate is correct."""
    pool = [i for i, ok in enumerate(correct) if ok]
    if not pool:
        return None
    if rule == "random":
        return rng.choice(pool)
    if rule not in ("lowest", "highest"):
        raise LensError(f"selection must be one of {', '.join(SELECTIONS)}, got '{rule}'.")
    scored = [i for i in pool if ppls[i] is not None]
    if not scored:
        return pool[0]
    sign = 1.0 if rule == "lowest" else -1.0
    return min(scored, key=lambda i: (sign * float(ppls[i]), i))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the run


@dataclass
class GenerationSummary:
    """What a generation run produced (also the provenance written to the manifest)."""

    n_prompts: int = 0
    n_done: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    n_samples: int = 0
    n_correct: int = 0
    n_tokens: int = 0
    n_unfinished: int = 0
    generation_seconds: float = 0.0
    wall_seconds: float = 0.0
    dropped_ids: list[str] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        """Share of samples that passed the verifier."""
        return self.n_correct / self.n_samples if self.n_samples else None

    @property
    def kept_rate(self) -> float | None:
        """Share of prompts with at least one correct sample (kept in the set)."""
        return self.n_kept / self.n_done if self.n_done else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, rates included."""
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["kept_rate"] = self.kept_rate
        data["tokens_per_second"] = (
            self.n_tokens / self.generation_seconds if self.generation_seconds else None
        )
        return data

    def describe(self) -> str:
        """One line for logs and the CLI."""
        rate = self.acceptance_rate
        return (
            f"{self.n_kept} of {self.n_done} prompts kept ({self.n_dropped} dropped: no correct "
            f"sample); {self.n_correct}/{self.n_samples} samples correct"
            + (f" ({100 * rate:.1f}%)" if rate is not None else "")
            + f"; {self.n_tokens} tokens in {self.generation_seconds:.0f}s of generation"
        )


def load_source_examples(config: GenDataConfig) -> list[Example]:
    """The prompts (with their ground truth and meta) the run generates for."""

    dataset = load_source(
        task=config.task,
        split=config.split,
        data=config.data,
        prompt_col=config.prompt_col,
        response_col=config.response_col,
        id_col=config.id_col,
        limit=config.limit,
    )
    if not dataset.examples:
        raise LensError("The data has no examples to generate for.")
    return dataset.examples


def preflight(config: GenDataConfig) -> int:
    """Check the data loads and every example has a verifier, before any model is loaded or a
    job is queued (raises `LensError` with one line). Returns the number of prompts."""
    examples = load_source_examples(config)
    for ex in examples:
        resolve_verifier(config.verify, ex, config.task)
    return len(examples)


def generation_prompt(config: GenDataConfig, example: Example) -> str:
    """What the generating model is shown for `example` (the stored prompt stays the original)."""
    if config.kind == "rephrase":
        base = config.template.format_map(
            {"instruction": example.prompt, "reference": example.response}
        )
    else:
        base = example.prompt
    return base + _hint_text(config)


def _hint_text(config: GenDataConfig) -> str:
    if config.hint == "none":
        return ""
    if config.hint != "auto":
        return config.hint
    if config.task == "gsm8k":
        return GSM8K_INSTRUCTION
    if config.task == "math":
        return MATH_HINT
    return ""


def read_candidates(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-prompt records of a run (`candidates.jsonl`), skipping a half-written last line."""
    records = read_jsonl(Path(run_dir) / CANDIDATES_JSONL)
    return [rec for rec in records if isinstance(rec, dict) and "id" in rec]


def _append_candidates(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record as one whole line, then fsync (a crash loses at most that line)."""
    append_jsonl(run_dir / CANDIDATES_JSONL, record)


def summarise(records: Sequence[dict[str, Any]], n_prompts: int) -> GenerationSummary:
    """Totals over per-prompt records (a resumed run counts every attempt's work)."""
    summary = GenerationSummary(n_prompts=n_prompts)
    for rec in records:
        cands = rec.get("candidates", [])
        summary.n_done += 1
        summary.n_samples += len(cands)
        summary.n_correct += sum(bool(c.get("correct")) for c in cands)
        summary.n_tokens += sum(int(c.get("n_tokens", 0)) for c in cands)
        summary.n_unfinished += sum(not c.get("finished", True) for c in cands)
        summary.generation_seconds += float(rec.get("seconds", 0.0))
        if rec.get("chosen") is None:
            summary.n_dropped += 1
            summary.dropped_ids.append(str(rec["id"]))
        else:
            summary.n_kept += 1
    return summary


def _default_name(config: GenDataConfig, model_label: str) -> str:
    from core.datagen.store import generated_sets_dir  # lazy: heavy (torch)

    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_label).name or model_label).strip("-")
    base = f"{config.kind.replace('_', '-')}-{config.data_label()}-{model}"
    root = generated_sets_dir()
    versions = [0]
    if root.is_dir():
        for folder in root.iterdir():
            m = re.fullmatch(re.escape(base) + r"-v(\d+)", folder.name)
            if m:
                versions.append(int(m.group(1)))
    return f"{base}-v{max(versions) + 1}"


def _data_key(config: GenDataConfig) -> str:
    from core.datagen.store import file_data_key, task_data_key  # lazy: heavy (torch)

    if config.task:
        return task_data_key(config.task, config.split or get_task(config.task).default_split)
    return file_data_key(str(config.data))


def _run_state(config: GenDataConfig, run_dir: Path) -> dict[str, Any]:
    """The run folder's fixed facts (set name, settings); a resumed run must match them (the
    thread count may change: it does not change what is generated)."""

    settings = {k: v for k, v in config.to_dict().items() if k not in ("name", "threads")}
    state = read_json(run_dir / STATE_JSON)
    if isinstance(state, dict):
        if state.get("settings") != settings:
            changed = sorted(
                k for k in settings if settings.get(k) != state.get("settings", {}).get(k)
            )
            raise LensError(
                f"{run_dir} holds a generation run with other settings ({', '.join(changed)}); "
                "use a new run folder."
            )
        return state
    model_label = config.teacher or config.model
    state = {
        "name": config.name or _default_name(config, model_label),
        "settings": settings,
        "started": time.time(),
    }
    write_json_atomic(run_dir / STATE_JSON, state)
    return state


def generation_progress(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Latest progress of a run from its metrics records: done/total prompts, kept, accepted."""
    progress: dict[str, Any] = {"done": 0, "total": None, "finished": False}
    for rec in as_records(records):
        if isinstance(rec, StartRecord | GenerateRecord | DoneRecord):
            progress.update({k: v for k, v in rec.to_dict().items() if k != "kind"})
        if isinstance(rec, DoneRecord):
            progress["finished"] = True
    return progress


def run_generation(
    config: GenDataConfig,
    run_dir: str | Path,
    *,
    status: StatusFn | None = None,
    progress: ProgressFn | None = None,
    student: Any = None,
    teacher: Any = None,
) -> Path:
    """Generate, verify, select and write the set; resumable in `run_dir`. Returns the set folder.

    `student` / `teacher` take already loaded models (`core.model.loading.LoadedModel`; tests pass the
    tiny model); otherwise they are loaded from `config.model` / `config.teacher`.
    `progress(done, total)` is called after each prompt's record is saved.
    """
    from core.datagen.store import write_generated_set  # lazy: heavy (torch)
    from core.model.generation import (  # lazy: heavy (torch)
        GenerationConfig,
        generate_responses,
        set_torch_threads,
    )
    from core.model.loading import load_model  # lazy: heavy (torch)
    from core.scoring.cache import ScoreCache  # lazy: heavy (pyarrow)
    from core.scoring.score import score_examples  # lazy: heavy (pyarrow)

    threads = set_torch_threads(config.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    reporter = as_reporter(status)
    t0 = time.monotonic()
    state = _run_state(config, run)
    examples = load_source_examples(config)
    verifiers = {ex.id: resolve_verifier(config.verify, ex, config.task) for ex in examples}
    by_id = {ex.id: ex for ex in examples}
    records = {
        r["id"]: r
        for r in read_candidates(run)
        if r["id"] in by_id and r.get("prompt_hash") == prompt_hash(by_id[r["id"]].prompt)
    }
    todo = [ex for ex in examples if ex.id not in records]
    total = len(examples)
    print(
        f"{config.describe()}: {total} prompts, {len(records)} already done "
        f"(resumed from {CANDIDATES_JSONL})"
        if records
        else f"{config.describe()}: {total} prompts",
        f"({threads} torch thread{'s' if threads > 1 else ''})",
        flush=True,
    )
    append_metric(
        run,
        StartRecord(done=len(records), total=total),
    )
    if reporter is not None:
        reporter.preparing("loading models")
    student = student or load_model(config.model, device=config.device, dtype=config.dtype)
    if config.teacher and teacher is None:
        teacher = load_model(config.teacher, device=config.device, dtype=config.dtype)
    generator = teacher or student
    wall_before = float(state.get("wall_seconds", 0.0))
    n_samples = config.samples_per_prompt
    gen_config = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        num_return_sequences=n_samples,
        seed=config.seed,
    )
    cache = ScoreCache()
    order = {ex.id: i for i, ex in enumerate(examples)}
    for start in range(0, len(todo), config.prompt_batch):
        chunk = todo[start : start + config.prompt_batch]
        if reporter is not None:  # "generating · 40/400 prompts · 3m10s, about 28m left"
            reporter.generating(len(records), total, "prompts")
        t_gen = time.monotonic()
        # seed per batch from the first prompt's position: a resumed run draws new batches the
        # same way a fresh run would from that point
        batch_config = GenerationConfig(
            **{**gen_config.to_dict(), "seed": config.seed + order[chunk[0].id]}
        )
        outputs = generate_responses(
            generator,
            [generation_prompt(config, ex) for ex in chunk],
            batch_config,
            batch_size=config.prompt_batch,
        )
        seconds = (time.monotonic() - t_gen) / len(chunk)
        for ex, samples in zip(chunk, outputs, strict=True):
            texts = [s.text for s in samples]
            verdicts = check_answers(ex, texts, verifiers[ex.id], workers=config.workers)
            correct = [v.correct and bool(t.strip()) for v, t in zip(verdicts, texts, strict=True)]
            ppls: list[float | None] = [None] * len(texts)
            good = [i for i, ok in enumerate(correct) if ok]
            if good:
                cands = [Example(f"{ex.id}#{i}", ex.prompt, texts[i]) for i in good]
                scored = score_examples(
                    student, cands, convention=config.convention, cache=cache, source=config.kind
                )
                by_cand = {rec.id: rec.seq_ppl for rec in scored.examples}
                for i in good:
                    ppls[i] = by_cand.get(f"{ex.id}#{i}")
            rng = random.Random(f"{config.seed}:{ex.id}")
            chosen = select_candidate(ppls, correct, config.selection, rng)
            record = {
                "id": ex.id,
                "prompt_hash": prompt_hash(ex.prompt),
                "verifier": verifiers[ex.id],
                "seconds": seconds,
                "chosen": chosen,
                "candidates": [
                    {
                        "text": s.text,
                        "n_tokens": s.n_tokens,
                        "finished": s.finished,
                        "correct": correct[i],
                        "detail": verdicts[i].detail,
                        "ppl": ppls[i],
                    }
                    for i, s in enumerate(samples)
                ],
            }
            _append_candidates(run, record)
            records[ex.id] = record
            state["wall_seconds"] = wall_before + time.monotonic() - t0
            write_json_atomic(run / STATE_JSON, state)
            if progress:
                progress(len(records), total)
        done = summarise(list(records.values()), total)
        append_metric(run, GenerateRecord(fields=_counts(done)))
        print(f"{done.n_done}/{total} prompts: {done.describe()}", flush=True)

    summary = summarise([records[ex.id] for ex in examples], total)
    summary.wall_seconds = wall_before + time.monotonic() - t0
    kept = []
    for ex in examples:
        rec = records[ex.id]
        if rec["chosen"] is None:
            continue
        cand = rec["candidates"][rec["chosen"]]
        meta = {
            **ex.meta,
            "gendata": {
                "ppl": cand["ppl"],
                "n_samples": len(rec["candidates"]),
                "n_correct": sum(c["correct"] for c in rec["candidates"]),
                "finished": cand["finished"],
            },
        }
        kept.append(Example(id=ex.id, prompt=ex.prompt, response=cand["text"], meta=meta))
    if not kept:
        raise LensError(
            f"No prompt had a correct sample ({summary.n_correct} of {summary.n_samples} samples "
            f"correct): nothing to write. The samples are in {run / CANDIDATES_JSONL}."
        )
    if reporter is not None:
        reporter.saving("the generated set")
    provenance = {
        "version": _version_of(state["name"]),
        "student_model": config.model,
        "student_fingerprint": student.fingerprint,
        "teacher_model": config.teacher,
        "scoring": {"convention": config.convention, "selection": config.selection},
        "verifier": sorted(set(verifiers.values())),
        "seed": config.seed,
        "torch_threads": threads,
        "config": config.to_dict(),
        "run_dir": str(run.absolute()),
        **summary.to_dict(),
    }
    folder = write_generated_set(
        state["name"],
        config.kind,
        kept,
        data_key=_data_key(config),
        model=config.teacher or config.model,
        model_fingerprint=generator.fingerprint,
        settings={**gen_config.to_dict(), "hint": config.hint, "prompt_batch": config.prompt_batch},
        note=f"{summary.describe()}; generated by {generator.display_name}",
        provenance=provenance,
    )
    append_metric(run, DoneRecord(fields={"set": str(folder), **_counts(summary)}))
    print(f"wrote {folder}: {summary.describe()}", flush=True)
    return folder


def _counts(summary: GenerationSummary) -> dict[str, Any]:
    """The progress fields of metrics records ("generate" after each batch, and "done")."""
    return {
        "done": summary.n_done,
        "total": summary.n_prompts,
        "kept": summary.n_kept,
        "dropped": summary.n_dropped,
        "samples": summary.n_samples,
        "correct": summary.n_correct,
        "tokens": summary.n_tokens,
        "acceptance_rate": summary.acceptance_rate,
    }


def _version_of(name: str) -> int | None:
    m = re.search(r"-v(\d+)$", name)
    return int(m.group(1)) if m else None


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "generate" job process (see `core.jobs.registry.run_job_process`)."""
    config = GenDataConfig.from_dict(job.config)

    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    run_generation(config, job.path, status=status)
    registry.set_message(job.id, "done")
