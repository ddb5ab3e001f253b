"""Explore's live answer as a user sees it: the text streams in with its token count and
tokens/s, a Stop button ends it, and the finished answer to an MBPP problem says whether it
passes the task's tests (AppTest, tiny model)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from components.session import background_runner

ROOT = Path(__file__).resolve().parents[1]


def _live_page(key: str) -> None:
    from components.live_generation import live_answer
    from core.data.records import Example
    from core.model.generation import GenerationConfig

    example = Example(id="x", prompt="p", response="r")
    live_answer(
        key,
        "answer",
        load=lambda: None,
        example=example,  # type: ignore[arg-type]
        config=GenerationConfig(max_new_tokens=256),
        task=None,
        start=False,
    )


@pytest.fixture
def streaming():
    """A running live answer: 3 tokens so far, held until the test releases it."""
    from core.datagen.live import GENERATING, LiveAnswer, LiveResult

    background_runner.clear()
    release = threading.Event()
    live = LiveAnswer(256, stage=GENERATING)
    now = time.monotonic()
    live.generating_since = now - 2.0
    live.first_token, live.last_token = now - 1.5, now - 0.5
    live.text, live.n_tokens = "def add(a, b):", 3

    def work(task):
        task.partial = live
        release.wait(30)
        return LiveResult(live.text, live.n_tokens, stopped=task.stopping)

    task = background_runner().start("live-test", "answer", work)
    while task.partial is None:
        time.sleep(0.01)
    yield task, live
    release.set()
    background_runner.clear()


def test_the_answer_streams_with_its_rate_and_can_be_stopped(streaming):
    task, live = streaming
    at = AppTest.from_function(_live_page, args=("live-test",), default_timeout=30).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(c.value == "def add(a, b):" for c in at.code)  # the text so far
    [bar] = at.get("progress")
    assert bar.proto.text.startswith("generating · 3 of at most 256 tokens · 2 tokens/s · ")
    assert "left" in bar.proto.text
    [stop] = [b for b in at.button if b.label == "Stop"]
    stop.click().run()
    assert task.stopping  # the worker sees the request at its next token
    assert [b.label for b in at.button] == ["Stopping…"]


@pytest.fixture
def mbpp_page(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    background_runner.clear()
    at = AppTest.from_file(str(ROOT / "pages" / "explore.py"), default_timeout=120)
    at.query_params.update(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        kind="task",
        task="mbpp",
        split="train",
        limit="2",
        view="GT vs generated",
        gen="sample-8-0.7-0.95-1",
    )
    yield at
    background_runner.clear()


def test_an_mbpp_answer_is_checked_against_the_tasks_tests(mbpp_page):
    at = mbpp_page
    deadline = time.time() + 300

    def rerun_until(done) -> None:
        while True:
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            if done():
                return
            assert time.time() < deadline, [m.value for m in at.markdown]
            time.sleep(0.5)

    rerun_until(lambda: any(b.label == "Generate" for b in at.button))
    next(b for b in at.button if b.label == "Generate").click()

    def texts() -> str:
        return " ".join(m.value for m in at.markdown)

    rerun_until(lambda: "its tests" in texts())
    # a sampled answer of the tiny random model: scored, run against MBPP's asserts, failing
    assert "fails its tests" in texts()
    assert any(
        c.value.startswith("Generated 8 tokens in ") and "tokens/s" in c.value for c in at.caption
    )
