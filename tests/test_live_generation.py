"""The model's own answer, live (Explore's "generate the model's own answer"): streamed token by
token with the same result as batched generation, stoppable, run with a chosen thread count,
then stored, scored and checked against the task's verifier (MBPP asserts in the sandbox), and
read as "correct and low-perplexity" beside the ground truth."""

from __future__ import annotations

import time

import pytest
import torch

from core.data.records import Example
from core.datagen.live import (
    DONE,
    AnswerCheck,
    LiveAnswer,
    answer_live,
    check_answer,
    verdict_line,
)
from core.datagen.store import GenerationStore
from core.jobs.background import DONE as TASK_DONE
from core.jobs.background import BackgroundRunner
from core.model.generation import (
    GenerationConfig,
    generate_responses,
    stream_response,
    torch_threads,
)

GREEDY = GenerationConfig(max_new_tokens=12)
SAMPLED = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, seed=3)
ADD = Example(
    id="mbpp-add",
    prompt="Write a function add(a, b) that returns the sum of a and b.",
    response="def add(a, b):\n    return a + b\n",
    meta={"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
)


@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_streaming_gives_the_batched_answer_token_by_token(tiny_lm, config):
    updates: list[tuple[str, int]] = []
    streamed = stream_response(
        tiny_lm, "Say hello.", config, on_update=lambda t, n: updates.append((t, n))
    )
    [[batched]] = generate_responses(tiny_lm, ["Say hello."], config)
    assert (streamed.text, streamed.n_tokens, streamed.finished) == (
        batched.text,
        batched.n_tokens,
        batched.finished,
    )
    assert streamed.token_ids == batched.token_ids
    # one update a token, counting up, the text growing to the answer
    assert [n for _, n in updates] == list(range(1, streamed.n_tokens + 1))
    assert updates[-1][0] == streamed.text


def test_a_stop_request_ends_the_answer_at_the_next_token(tiny_lm):
    seen: list[int] = []
    answer = stream_response(
        tiny_lm,
        "Say hello.",
        GenerationConfig(max_new_tokens=40),
        on_update=lambda t, n: seen.append(n),
        should_stop=lambda: len(seen) >= 3,
    )
    assert answer.n_tokens == 3 and not answer.finished


def test_threads_are_set_for_the_answer_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_mbpp_answers_are_run_against_the_tasks_asserts():
    good = check_answer(ADD, "```python\ndef add(a, b):\n    return a + b\n```", "mbpp")
    assert good == AnswerCheck("code", True, good.detail) and good.label == "passes its tests"
    bad = check_answer(ADD, "def add(a, b):\n    return a - b\n", "mbpp")
    assert bad.correct is False and bad.label == "fails its tests"
    plain = Example(id="q", prompt="Say hello.", response="Hello!")
    none = check_answer(plain, "Hello!", None)
    assert (
        none.correct is None and none.label == "not checked: this data has no tests or gold answer"
    )
    gsm = Example(id="g", prompt="2 + 2?", response="4", meta={"gold": "4"})
    assert check_answer(gsm, "The answer is 4.", "gsm8k").label == "correct"


def test_the_reading_beside_the_ground_truth():
    passes = AnswerCheck("code", True)
    assert verdict_line(passes, 1.8, 2.4) == (
        "passes its tests: correct and low-perplexity (≤ the ground truth's)"
    )
    assert (
        verdict_line(passes, 3.0, 2.4)
        == "passes its tests: correct, higher perplexity than the ground truth"
    )
    assert verdict_line(AnswerCheck("code", False), 1.0, 2.4) == "fails its tests"
    assert verdict_line(AnswerCheck("", None, "no tests"), 1.0, 2.4) == ""


def test_a_live_answer_is_streamed_stored_scored_and_checked(tiny_lm, tmp_path):
    store = GenerationStore(tmp_path / "generated.sqlite")
    live = LiveAnswer(GREEDY.max_new_tokens)
    result = answer_live(lambda: tiny_lm, ADD, GREEDY, live, task="mbpp", store=store)
    [[expected]] = generate_responses(tiny_lm, [ADD.prompt], GREEDY)
    assert live.stage == DONE and live.text == expected.text == result.text
    assert result.stored is not None and store.find(tiny_lm.cache_key, ADD, GREEDY) is not None
    if expected.text.strip():  # the tiny random model's answer: scored, and it fails the asserts
        assert result.scored is not None and result.scored.response == expected.text
        assert result.check is not None and result.check.label == "fails its tests"
    assert result.tokens_per_s is None or result.tokens_per_s > 0
    line = live.line()
    assert line.startswith(f"done · {expected.n_tokens} of at most 12 tokens")
    # the next time, the stored answer comes back without generating
    again = answer_live(lambda: tiny_lm, ADD, GREEDY, LiveAnswer(12), task="mbpp", store=store)
    assert again.text == result.text and again.tokens_per_s is None and not again.stopped


def test_a_stopped_answer_is_shown_but_not_kept(tiny_lm, tmp_path):
    """In a background task, as the page runs it: Stop ends it early; nothing is stored."""
    store = GenerationStore(tmp_path / "generated.sqlite")
    config = GenerationConfig(max_new_tokens=200)
    runner = BackgroundRunner()
    live = LiveAnswer(config.max_new_tokens)

    def slow_load():
        return tiny_lm

    def work(task):
        task.partial = live

        def should_stop() -> bool:
            if live.n_tokens >= 2:
                runner.stop("answer")  # what the Stop button does, once tokens arrived
            return task.stopping

        return answer_live(slow_load, ADD, config, live, store=store, should_stop=should_stop)

    task = runner.start("answer", "answer", work)
    deadline = time.time() + 60
    while task.status != TASK_DONE and time.time() < deadline:
        time.sleep(0.05)
    assert task.status == TASK_DONE, task.error
    result = task.result
    assert result.stopped and result.stored is None and result.check is None
    assert 2 <= result.n_tokens < 200 and live.stopped
    assert store.find(tiny_lm.cache_key, ADD, config) is None
    assert not runner.stop("answer")  # nothing running any more
