"""Shared app state: the sidebar model / data picker every page uses, and background scoring.

The selection lives in the URL's query parameters, so a reload (or a shared link) reopens the same
model and data. Scoring runs in a background thread of the server process (core.jobs.background), so
a reload re-attaches to it instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from core.data.records import PROMPT_CONDITIONED, Dataset
from core.errors import LensError
from core.fmt import count, duration
from core.io import cache_dir
from core.jobs.background import DONE, FAILED, BackgroundRunner, BackgroundTask
from core.masking import DEFAULT_TAU, TAU_MAX, TAU_MIN, parse_tau
from core.model.loading import MODEL_SLOT, LoadedModel
from core.scoring.legacy import legacy_score_note
from core.scoring.score import ScoreRun

DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class Selection:
    """What the user picked in the sidebar."""

    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    kind: str = "task"  # "task", "file" or "generated" (data_path = the set's examples.jsonl)
    task: str = "mbpp"
    split: str = "train"
    limit: int = DEFAULT_LIMIT
    data_path: str = ""
    prompt_col: str = "prompt"
    response_col: str = "response"
    id_col: str = ""

    def key(self) -> str:
        """Stable hash of the selection."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def data_label(self) -> str:
        """Short description of the data source."""
        if self.kind == "task":
            return f"{self.task} / {self.split} (first {count(self.limit)})"
        if self.kind == "generated":
            return f"{Path(self.data_path).parent.name} (generated, first {count(self.limit)})"
        return f"{upload_name(self.data_path)} (first {count(self.limit)})"


#: Uploads saved before 2026-12-03 were named "<12 hex digits>-<the user's name>".
_OLD_UPLOAD = re.compile(r"^[0-9a-f]{12}-(.+)$")


def upload_name(path: str | Path) -> str:
    """The name the user gave a data file (an upload's content hash left out)."""
    name = Path(path).name
    old = _OLD_UPLOAD.match(name)
    return old.group(1) if old and Path(path).parent.name == "uploads" else name


@st.cache_resource
def background_runner() -> BackgroundRunner:
    """One runner per server process, shared by all sessions."""
    return BackgroundRunner()


#: Why the sidebar's data is not usable yet (set by the sidebar, read by `load_dataset_cached`).
DATA_PROBLEM = "_plens_data_problem"
NO_FILE = "Upload a JSONL or CSV file in the sidebar, or choose a built-in task or a generated set."
NO_GENERATED_SET = (
    "No generated set yet: make one on the Generate data page, or choose a built-in task or "
    "your own file in the sidebar."
)


def missing_data_message(sel: Selection) -> str | None:
    """What the user still has to do in the sidebar before the data can load, in terms of the
    sources the sidebar offers (None when a file or set is chosen)."""
    if sel.kind == "task" or sel.data_path:
        return None
    problem = st.session_state.get(DATA_PROBLEM)
    if problem:
        return problem
    return NO_GENERATED_SET if sel.kind == "generated" else NO_FILE


def load_dataset_cached(sel: Selection) -> Dataset:
    """Load the selected examples (raises LensError on bad input, and when the sidebar still
    needs a file, a set or a column choice)."""
    message = missing_data_message(sel)
    if message:
        raise LensError(message)
    return _load_dataset(sel)


@st.cache_data(show_spinner=False, max_entries=32)
def _load_dataset(sel: Selection) -> Dataset:
    from core.data.sources import load_source

    if sel.kind == "task":
        return load_source(task=sel.task, split=sel.split, limit=sel.limit)
    if sel.kind == "generated":
        return _load_generated_set(sel)
    return load_source(
        data=sel.data_path,
        prompt_col=sel.prompt_col,
        response_col=sel.response_col,
        id_col=sel.id_col or None,
        limit=sel.limit,
    )


def _load_generated_set(sel: Selection) -> Dataset:
    """A generated set through core.datagen.store's reader, so each example keeps its `meta` (the
    asserts and gold answers scorers need), which a plain prompt/response file read drops."""
    from core.data.records import LoadReport
    from core.datagen.store import list_generated_sets

    folder = Path(sel.data_path).parent.resolve()
    gset = next((s for s in list_generated_sets() if s.path.resolve() == folder), None)
    if gset is None:
        raise LensError(f"Generated set '{folder.name}' is gone or its manifest is unreadable.")
    examples = gset.load_examples()[: sel.limit]
    report = LoadReport(source=f"{gset.name} ({gset.kind})", loaded=len(examples))
    return Dataset(name=gset.name, examples=examples, report=report)


def _save_upload(name: str, data: bytes) -> Path:
    """Keep an upload as `uploads/<content hash>/<its own name>`: two files of the same name
    never collide, and every message names the file as the user named it."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = cache_dir() / "uploads" / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (Path(name).name or "upload")
    if not path.exists():
        path.write_bytes(data)
    return path


REMEMBERED_SELECTION = "_plens_selection"


def _qp(name: str, default: str) -> str:
    """A selection value from the URL, else the one this session used last (switching pages in
    the navigation drops the query string), else the default."""
    return st.query_params.get(
        name, st.session_state.get(REMEMBERED_SELECTION, {}).get(name, default)
    )


def ensure_app_navigation() -> None:
    """Streamlit treats an app with a `pages/` folder as a v1 multipage app until `st.navigation`
    has run once in the process. The first visitor of a fresh server who opens a page URL
    directly would then get the page without app.py's navigation. Switch the flag off and rerun,
    so app.py's `st.navigation` handles the same URL."""
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def sidebar_selection() -> Selection:
    """Draw the model and data pickers in the sidebar and return the selection."""
    from core.data.tasks import list_tasks

    ensure_app_navigation()
    with st.sidebar:
        st.subheader("Model")
        model = (
            st.text_input(
                "Model",
                value=_qp("model", "default"),
                help="'default' = embedded SmolLM2-135M-Instruct (offline). Or a Hugging Face id, "
                "a local model folder, or a .gguf file.",
                label_visibility="collapsed",
            ).strip()
            or "default"
        )
        c1, c2 = st.columns(2)
        devices = ["auto", "cpu", "cuda", "mps"]
        dtypes = ["auto", "float32", "bfloat16", "float16"]
        device = c1.selectbox("Device", devices, index=devices.index(_qp("device", "auto")))
        dtype = c2.selectbox("Dtype", dtypes, index=dtypes.index(_qp("dtype", "auto")))

        st.subheader("Data")
        kinds = {
            "task": "Built-in task",
            "file": "My file (JSONL/CSV)",
            "generated": "Generated set",
        }
        kind = st.radio(
            "Source",
            list(kinds),
            format_func=kinds.get,
            horizontal=True,
            index=list(kinds).index(_qp("kind", "task")),
            label_visibility="collapsed",
        )
        limit = int(
            st.number_input("Examples (first N)", 1, 20000, int(_qp("limit", str(DEFAULT_LIMIT))))
        )
        sel = Selection(model=model, device=device, dtype=dtype, kind=kind, limit=limit)
        if kind == "task":
            specs = {s.name: s for s in list_tasks()}
            names = list(specs)
            task = st.selectbox(
                "Task",
                names,
                index=names.index(_qp("task", "mbpp")) if _qp("task", "mbpp") in names else 0,
                format_func=lambda n: f"{specs[n].title}",
            )
            splits = list(specs[task].splits)
            split_q = _qp("split", splits[0])
            split = st.selectbox(
                "Split", splits, index=splits.index(split_q) if split_q in splits else 0
            )
            sel = Selection(**{**asdict(sel), "task": task, "split": split})
        elif kind == "generated":
            sel = _generated_set_picker(sel)
        else:
            sel = _file_picker(sel)
    st.query_params.update(
        {
            "model": sel.model,
            "device": sel.device,
            "dtype": sel.dtype,
            "kind": sel.kind,
            "task": sel.task,
            "split": sel.split,
            "limit": str(sel.limit),
        }
    )
    if sel.kind == "file" and sel.data_path:
        st.query_params.update(
            {"pcol": sel.prompt_col, "rcol": sel.response_col, "idcol": sel.id_col}
        )
    st.session_state[REMEMBERED_SELECTION] = st.query_params.to_dict()
    return sel


#: Column names a prompt / response column often has, in order of preference.
PROMPT_GUESSES = ("prompt", "instruction", "question", "input", "query", "problem", "text")
RESPONSE_GUESSES = ("response", "output", "answer", "completion", "solution", "target")


def guess_column(columns: Sequence[str], guesses: Sequence[str], taken: str = "") -> str | None:
    """The first of `guesses` among `columns` (case-insensitive), other than `taken`."""
    lower = {c.lower(): c for c in columns if c != taken}
    return next((lower[g] for g in guesses if g in lower), None)


def _file_picker(sel: Selection) -> Selection:
    """Upload (or the file in the URL), then its columns. An upload that cannot be read is
    reported by the name the user gave it, and the file in use before stays in use."""
    from core.data.userdata import MESSAGES_COLUMN, read_columns

    st.session_state.pop(DATA_PROBLEM, None)
    upload = st.file_uploader(
        "JSONL or CSV with prompt/response columns",
        type=["jsonl", "json", "ndjson", "csv", "tsv"],
    )
    path_q = _qp("data", "")
    previous = Path(path_q) if path_q and Path(path_q).is_file() else None
    path = None
    columns: list[str] = []
    if upload is not None:
        path = _save_upload(upload.name, upload.getvalue())
        try:
            columns = read_columns(path)
        except LensError as exc:
            st.error(str(exc))
            path = None
            if previous is not None:
                st.caption(f"Still using **{upload_name(previous)}**.")
            else:
                st.session_state[DATA_PROBLEM] = (
                    f"{upload_name(upload.name)} cannot be used: {exc} Upload another file, or "
                    "choose a built-in task or a generated set."
                )
    if path is None and previous is not None:
        try:
            columns = read_columns(previous)
            path = previous
        except LensError as exc:
            st.error(str(exc))
    if path is None:
        if upload is None:
            st.info("Upload a file to use your own data.")
        return sel
    st.query_params["data"] = str(path)
    name = upload_name(path)

    chat = MESSAGES_COLUMN in columns and "prompt" not in columns and "response" not in columns
    if chat:
        st.caption(
            f"Chat format: the '{MESSAGES_COLUMN}' column gives the prompt (first user turn) and "
            "the response (first assistant turn after it)."
        )
        prompt_col, response_col = "prompt", "response"
    else:
        known = "prompt" in columns and "response" in columns
        if not known:
            st.caption(
                f"**{name}** has no 'prompt' and 'response' columns: choose which of its columns "
                "hold them."
            )

        def pick(label: str, wanted: str, guesses: Sequence[str], taken: str = "") -> str | None:
            choice = wanted if wanted in columns else guess_column(columns, guesses, taken)
            return st.selectbox(
                label,
                columns,
                index=columns.index(choice) if choice in columns else None,
                placeholder="choose a column",
            )

        prompt_col = pick("Prompt column", _qp("pcol", "prompt"), PROMPT_GUESSES)
        response_col = pick(
            "Response column", _qp("rcol", "response"), RESPONSE_GUESSES, taken=prompt_col or ""
        )
        if prompt_col is None or response_col is None:
            st.session_state[DATA_PROBLEM] = (
                f"Choose the prompt and response columns of {name} in the sidebar."
            )
            return sel
        if prompt_col == response_col:
            message = (
                f"Choose two different columns of {name}: the prompt and the response are both "
                f"'{prompt_col}'."
            )
            st.warning(message)
            st.session_state[DATA_PROBLEM] = message
            return sel
    id_options = [""] + [c for c in columns if c not in (prompt_col, response_col)]
    wanted_id = _qp("idcol", "id")
    id_col = st.selectbox(
        "Id column",
        id_options,
        index=id_options.index(wanted_id) if wanted_id in id_options else 0,
        format_func=lambda c: c or "(row number)",
    )
    return Selection(
        **{
            **asdict(sel),
            "data_path": str(path),
            "prompt_col": prompt_col,
            "response_col": response_col,
            "id_col": id_col,
        }
    )


def _generated_set_picker(sel: Selection) -> Selection:
    """Pick a Self-Output / Rephrase set (core.datagen.store); its examples.jsonl becomes the data,
    so every page reads it like a prompt/response file with an id column."""
    from core.datagen.store import list_generated_sets

    problems: list[str] = []
    sets = {s.name: s for s in list_generated_sets(problems=problems)}
    for problem in problems:
        st.warning(f"Skipped a generated set: {problem}")
    if not sets:
        st.info("No generated sets yet: make one on the Generate data page.")
        return sel
    names = list(sets)
    wanted = _qp("gset", names[0])
    name = st.selectbox(
        "Generated set",
        names,
        index=names.index(wanted) if wanted in names else 0,
        format_func=lambda n: f"{n} ({count(sets[n].n_examples)})",
    )
    st.query_params["gset"] = name
    gset = sets[name]
    return Selection(
        **{
            **asdict(sel),
            "data_path": str(gset.path / gset.examples_file),
            "prompt_col": "prompt",
            "response_col": "response",
            "id_col": "id",
        }
    )


def current_model(sel: Selection) -> LoadedModel:
    """The selected model, loaded once per process (switching frees the previous one)."""
    return MODEL_SLOT.get(sel.model, device=sel.device, dtype=sel.dtype)


# Examples scored before the rest, so a page can show them while the whole selection is scored
# (a newcomer's first heatmap after a few seconds instead of after all 50 examples).
FIRST_LOOK = 4


def scoring_task(
    sel: Selection,
    convention: str = PROMPT_CONDITIONED,
    start: bool = True,
    first: Sequence[str] = (),
) -> BackgroundTask | None:
    """The background scoring task of the selection (started on first request).

    The first `FIRST_LOOK` examples, and those whose ids are in `first`, are scored before the
    rest and published as `task.partial`."""
    from core.scoring.cache import ScoreCache
    from core.scoring.score import score_examples

    key = f"score:{sel.key()}:{convention}"
    runner = background_runner()
    task = runner.get(key)
    if task is not None or not start:
        return task
    wanted = set(first)

    def work(task: BackgroundTask) -> ScoreRun:
        dataset = load_dataset_cached(sel)
        examples = dataset.examples
        task.message = f"loading model {sel.model}"
        lm = current_model(sel)
        cache = ScoreCache()
        early = [ex for i, ex in enumerate(examples) if i < FIRST_LOOK or ex.id in wanted]
        notes: list[str] = []
        if len(early) < len(examples):
            task.message = f"scoring the first {len(early)} examples"
            partial = score_examples(lm, early, convention=convention, cache=cache)
            partial.of_total = len(examples)
            task.partial = partial
            notes = partial.warnings  # a damaged score file is moved aside by the first call
        task.message = f"scoring {len(examples)} examples"
        run = score_examples(
            lm, examples, convention=convention, cache=cache, progress=task.progress
        )
        run.warnings = notes + run.warnings
        return run

    return runner.start(key, f"Scoring {sel.data_label}", work)


def show_task_status(task: BackgroundTask) -> None:
    """Progress while running; error (with details) on failure."""
    if task.status == FAILED:
        st.error(task.error)
        if task.detail:
            with st.expander("Details"):
                st.code(task.detail)
        return
    if task.status != DONE:
        label = task.message or task.label
        counts = (
            f": {count(task.done)}/{count(task.total)}" if task.total else ""
        )  # no count for one-off work
        st.progress(task.fraction, text=f"{label}{counts} · {duration(task.elapsed)}")


def wait_for(task: BackgroundTask, rerun_on_partial: bool = False) -> None:
    """Poll a running task without blocking the page; rerun the app when it finishes (and,
    with `rerun_on_partial`, as soon as it publishes an early result)."""

    @st.fragment(run_every=1.0)
    def _poll() -> None:
        current = background_runner().get(task.key)
        if (
            current is None
            or current.status != "running"
            or (rerun_on_partial and current.partial is not None)
        ):
            st.rerun()
        show_task_status(current)

    _poll()


def scores_or_wait(
    sel: Selection,
    convention: str = PROMPT_CONDITIONED,
    early: bool = False,
    first: Sequence[str] = (),
) -> ScoreRun | None:
    """Scores of the selection, or None while they are computed (progress shown).

    With `early`, while the task runs, the examples it has scored first (see `scoring_task`,
    `first`) are returned as soon as they exist, with `run.of_total` set to the selection's size;
    the page reruns by itself when the whole selection is scored."""
    try:
        load_dataset_cached(sel)
    except LensError as exc:
        st.error(str(exc))
        return None
    task = scoring_task(sel, convention, first=first)
    if task is None:
        return None
    run = task_result(task, early=early)
    for note in run.warnings if run is not None else ():
        st.warning(note, icon=":material/warning:")
    old_cache = legacy_score_note()  # scores of an older version wait for `python -m core migrate`
    if old_cache:
        st.info(old_cache, icon=":material/info:")
    return run


def task_result(task: BackgroundTask, *, early: bool = False) -> Any:
    """`task`'s result when done; None while it runs (progress shown, polled by a fragment) or
    after it failed (its error and a Retry button shown). With `early`, a running task's
    `partial` result is returned as soon as it exists."""
    if task.status == DONE:
        return task.result
    if task.status == FAILED:
        show_task_status(task)
        if st.button("Retry", key=f"retry:{task.key}"):
            background_runner().forget(task.key)
            st.rerun()
        return None
    partial = task.partial if early else None
    wait_for(task, rerun_on_partial=early and partial is None)
    return partial


def background_result(
    key: str,
    label: str,
    work: Callable[[BackgroundTask], Any] | None = None,
    *,
    start: bool = True,
) -> Any:
    """Result of the background task `key` (started with `work` when given, `start` is set and
    it is not running yet), or None while it runs or after it failed (see `task_result`)."""
    runner = background_runner()
    task = runner.get(key)
    if task is None:
        if work is None or not start:
            return None
        task = runner.start(key, label, work)
    return task_result(task)


def url_tau() -> float:
    """``?tau=`` read the one way every page reads it: a valid τ as given (never clamped to
    one page's slider), else the default, with a warning for a malformed value."""
    raw = st.query_params.get("tau")
    if raw is None or raw == "":
        return DEFAULT_TAU
    tau = parse_tau(raw)
    if tau is None:
        st.warning(
            f"Ignored ?tau={raw}: τ must be a number from {TAU_MIN:g} to {TAU_MAX:g}; "
            f"using {DEFAULT_TAU:g}."
        )
        return DEFAULT_TAU
    return tau
