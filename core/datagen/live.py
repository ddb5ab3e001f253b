"""The model's own answer to one example, live: streamed token by token, stoppable, stored,
scored and checked against the task's verifier.

Explore's "generate the model's own answer" runs `answer_live` in a background thread of the
server (`core.jobs.background`), so a reload finds it again; the page polls `LiveAnswer` (the
text so far, tokens, tokens a second) and shows it as it grows. A finished answer is kept in the
generation store (the next visit shows it without generating), scored like every response, and
checked: MBPP / HumanEval code runs against the task's asserts in the sandbox
(`core.eval.grading`), GSM8K's final number and MATH's boxed answer are compared with the gold
one. An answer the user stopped is shown but not kept (it is not what the settings produce).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.data.records import Example, ScoredExample
from core.datagen.store import GenerationStore, StoredGeneration
from core.errors import LensError
from core.eval.grading import check_answers, resolve_verifier
from core.fmt import count, duration, num
from core.model.generation import GenerationConfig, stream_response
from core.model.loading import LoadedModel

#: What the answer is doing now.
LOADING, GENERATING, SCORING, CHECKING, DONE = (
    "loading the model",
    "generating",
    "scoring the answer",
    "checking the answer",
    "done",
)


@dataclass
class LiveAnswer:
    """The answer as it grows, written by the worker thread and read by the page."""

    max_new_tokens: int
    text: str = ""
    n_tokens: int = 0
    stage: str = LOADING
    started: float = field(default_factory=time.monotonic)
    #: when generation began (after the model loaded), and the first / latest token came
    generating_since: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    stopped: bool = False

    def update(self, text: str, n_tokens: int) -> None:
        """`stream_response`'s callback: the text and token count so far."""
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.text, self.n_tokens, self.last_token = text, n_tokens, now

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed: tokens after the first over the time since it came (the first
        token also carries the prompt's prefill); None before two tokens."""
        if self.first_token is None or self.last_token is None or self.n_tokens < 2:
            return None
        spent = self.last_token - self.first_token
        return (self.n_tokens - 1) / spent if spent > 0 else None

    @property
    def seconds(self) -> float:
        """Seconds since generation began (0 while the model loads)."""
        if self.generating_since is None:
            return 0.0
        return (self.last_token or time.monotonic()) - self.generating_since

    def line(self) -> str:
        """The progress line: "generating · 112 of at most 256 tokens · 9.8 tokens/s · 12s, at
        most 15s left"."""
        if self.stage == LOADING:
            return f"{LOADING} · {duration(time.monotonic() - self.started)}"
        text = (
            f"{self.stage} · {count(self.n_tokens)} of at most {count(self.max_new_tokens)} tokens"
        )
        rate = self.tokens_per_s
        if rate is not None:
            text += f" · {num(rate, 3)} tokens/s"
        if self.generating_since is not None:
            text += f" · {duration(self.seconds)}"
            if self.stage == GENERATING and rate:
                left = (self.max_new_tokens - self.n_tokens) / rate
                text += f", at most {duration(left)} left"
        return text


@dataclass(frozen=True)
class AnswerCheck:
    """The answer against the task's verifier."""

    verifier: str  # "code", "number", "boxed"; "" when the data has none
    correct: bool | None  # None: not checked
    detail: str = ""

    @property
    def label(self) -> str:
        """What the page says: "passes its tests", "fails its tests", "correct", "wrong", or
        why it was not checked."""
        if self.correct is None:
            return f"not checked: {self.detail}" if self.detail else "not checked"
        if self.verifier == "code":
            return "passes its tests" if self.correct else "fails its tests"
        return "correct" if self.correct else "wrong"


def check_answer(example: Example, text: str, task: str | None) -> AnswerCheck:
    """`text` as an answer to `example`, checked by the verifier its data supports (code in
    the sandbox against the task's asserts; the final number; the boxed answer)."""

    try:
        verifier = resolve_verifier("auto", example, task)
    except LensError:
        return AnswerCheck("", None, "this data has no tests or gold answer")
    try:
        [verdict] = check_answers(example, [text], verifier, workers=1)
    except LensError as exc:
        return AnswerCheck(verifier, None, str(exc))
    return AnswerCheck(verifier, bool(verdict.correct), verdict.detail)


@dataclass
class LiveResult:
    """How a live answer ended: stored, scored and checked, or stopped early (not kept)."""

    text: str
    n_tokens: int
    stopped: bool
    stored: StoredGeneration | None = None
    scored: ScoredExample | None = None
    check: AnswerCheck | None = None
    #: decoding speed and seconds spent generating (None when the answer came from the store)
    tokens_per_s: float | None = None
    seconds: float | None = None


def answer_live(
    load: Callable[[], LoadedModel],
    example: Example,
    config: GenerationConfig,
    live: LiveAnswer,
    *,
    task: str | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    store: GenerationStore | None = None,
    cache: Any = None,
    threads: int | None = None,
) -> LiveResult:
    """Generate (or take the stored) answer of the model `load()` gives to `example`, streaming
    it into `live`; store, score and check it. A stop request ends generation at the next
    token: that answer is returned as it is, not stored, scored or checked."""
    from core.scoring.score import score_examples  # lazy: heavy (pyarrow)

    lm = load()
    store = GenerationStore() if store is None else store
    stored = store.find(lm.cache_key, example, config)
    rate = seconds = None
    if stored is None:
        live.stage, live.generating_since = GENERATING, time.monotonic()
        generation = stream_response(
            lm,
            example.prompt,
            config,
            on_update=live.update,
            should_stop=should_stop,
            threads=threads,
        )
        live.text, live.n_tokens = generation.text, generation.n_tokens
        rate, seconds = live.tokens_per_s, live.seconds
        if (
            should_stop()
            and not generation.finished
            and generation.n_tokens < config.max_new_tokens
        ):
            live.stopped, live.stage = True, DONE
            return LiveResult(
                generation.text,
                generation.n_tokens,
                stopped=True,
                tokens_per_s=rate,
                seconds=seconds,
            )
        stored = store.save(lm.cache_key, example, config, generation)
    else:
        live.text, live.n_tokens = stored.text, stored.n_tokens
    live.stage = SCORING
    run = score_examples(lm, [stored.as_example(example)], source="generated", cache=cache)
    scored = run.examples[0] if run.examples else None
    live.stage = CHECKING
    check = check_answer(example, stored.text, task) if stored.text.strip() else None
    live.stage = DONE
    return LiveResult(
        stored.text,
        stored.n_tokens,
        stopped=False,
        stored=stored,
        scored=scored,
        check=check,
        tokens_per_s=rate,
        seconds=seconds,
    )


def verdict_line(check: AnswerCheck | None, ppl: float | None, gt_ppl: float | None) -> str:
    """The GT-vs-generated reading of one answer: "correct and low-perplexity" (it passes and
    its sequence perplexity is at most the ground truth's), "correct, higher perplexity than
    the ground truth", "fails its tests", ...; "" when it was not checked."""
    if check is None or check.correct is None:
        return ""
    if not check.correct:
        return check.label
    if ppl is None or gt_ppl is None:
        return check.label
    if ppl <= gt_ppl:
        return f"{check.label}: correct and low-perplexity (≤ the ground truth's)"
    return f"{check.label}: correct, higher perplexity than the ground truth"
