"""The model's own answer to one example, streamed onto the page as it is generated.

The answer is generated in a background thread of the server (`core.datagen.live.answer_live`
through `core.jobs.background`), so the page never blocks and a reload finds the answer where
it is: a fragment polls the text so far, the token count, tokens a second and the time left,
with a Stop button. When it ends, the page reruns and shows the stored, scored and checked
answer ("passes its tests" / "fails its tests").
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from components.session import background_runner, show_task_status
from core.data.records import Example
from core.datagen.live import LiveAnswer, LiveResult, answer_live
from core.jobs.background import DONE, FAILED, RUNNING, BackgroundTask
from core.model.generation import GenerationConfig
from core.model.loading import LoadedModel

POLL_SECONDS = 0.5


def live_answer(
    key: str,
    label: str,
    *,
    load: Callable[[], LoadedModel],
    example: Example,
    config: GenerationConfig,
    task: str | None,
    start: bool,
    restart: bool = False,
) -> LiveResult | None:
    """The live answer under `key`: started when `start` (again when `restart`, e.g. after a
    Stop), streamed while it runs (None then), its `LiveResult` when it ended (None after a
    failure, whose error is shown with a Retry button)."""
    runner = background_runner()
    current = runner.get(key)
    if (current is None and start) or (
        restart and current is not None and current.status != RUNNING
    ):
        live = LiveAnswer(config.max_new_tokens)

        def work(bt: BackgroundTask) -> LiveResult:
            from core.scoring.cache import ScoreCache

            bt.partial = live
            return answer_live(
                load,
                example,
                config,
                live,
                task=task,
                should_stop=bt.stop_requested.is_set,
                cache=ScoreCache(),
            )

        current = runner.start(key, label, work, restart=restart)
    if current is None:
        return None
    if current.status == DONE:
        return current.result
    if current.status == FAILED:
        show_task_status(current)
        if st.button("Retry", key=f"retry:{key}"):
            runner.forget(key)
            st.rerun()
        return None
    _stream(key)
    return None


def _stop(key: str) -> None:
    background_runner().stop(key)


@st.fragment(run_every=POLL_SECONDS)
def _stream(key: str) -> None:
    """The answer so far, its progress line and a Stop button; reruns the page when done."""
    current = background_runner().get(key)
    if current is None or current.status != RUNNING:
        st.rerun(scope="app")
        return
    live: LiveAnswer | None = current.partial
    st.markdown("**Model's own answer** · :gray[streaming]")
    if live is None:
        st.caption("starting…")
        return
    st.code(live.text or "…", language=None, wrap_lines=True)
    bar, button = st.columns([5, 1])
    bar.progress(min(1.0, live.n_tokens / max(1, live.max_new_tokens)), text=live.line())
    stopping = current.stopping
    button.button(
        "Stopping…" if stopping else "Stop",
        key=f"stop:{key}",
        icon=":material/stop:",
        on_click=_stop,
        args=(key,),
        disabled=stopping,
        help="Stop generating: the answer so far is shown, not kept.",
    )
