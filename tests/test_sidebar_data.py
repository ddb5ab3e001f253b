"""The sidebar's own data: an upload is named as the user named it in every message, a file with
other column names opens a column picker (never the loader's column clash), messages name only
the sources the sidebar offers, and a bad upload does not take away the file in use."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from components.session import NO_FILE, _save_upload, guess_column, upload_name

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample.jsonl"


@pytest.fixture(autouse=True)
def _in_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))


def start_page(**params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update(kind="file", limit="5", **params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def everything(at: AppTest) -> str:
    parts = [e.value for e in (*at.error, *at.warning, *at.info, *at.success)]
    parts += [c.value for c in at.caption] + [m.value for m in at.markdown]
    return "\n".join(str(p) for p in parts)


def upload(at: AppTest, name: str, content: bytes) -> AppTest:
    at.file_uploader[0].upload(name, content).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_uploads_keep_the_users_file_name():
    path = _save_upload("my data.jsonl", b'{"prompt": "p", "response": "r"}\n')
    assert path.name == "my data.jsonl" and upload_name(path) == "my data.jsonl"
    # an upload saved the old way ("<12 hex>-<name>") is still shown by the user's name
    old = path.parent.parent / "e3b0c44298fc-empty.jsonl"
    assert upload_name(old) == "empty.jsonl"


def test_nothing_chosen_names_only_what_the_sidebar_offers():
    at = start_page()
    assert [e.value for e in at.error] == [NO_FILE]
    assert "hub" not in everything(at).lower()


def test_an_empty_upload_is_named_as_uploaded_and_the_file_in_use_stays():
    at = upload(start_page(), "empty.jsonl", b"")
    assert "empty.jsonl is empty." in [e.value for e in at.error]  # in the sidebar
    assert (  # and in the main area, instead of "upload a file"
        "empty.jsonl cannot be used: empty.jsonl is empty. Upload another file, or choose a "
        "built-in task or a generated set." in [e.value for e in at.error]
    )
    assert "e3b0c44298fc" not in everything(at)  # no content hash in what the user reads

    at = upload(start_page(data=str(SAMPLE)), "broken.jsonl", b"{not json\n")
    assert any(e.value.startswith("broken.jsonl, line 1: malformed JSON") for e in at.error)
    assert any(c.value == "Still using **sample.jsonl**." for c in at.caption)
    assert any("sample.jsonl" in s.value for s in at.success)  # the data still loads


def test_other_column_names_open_a_column_picker():
    at = upload(start_page(), "qa.csv", b"foo,bar,uid\nWhat is 2+2?,4,a\nName a colour.,red,b\n")
    shown = everything(at)
    assert "**qa.csv** has no 'prompt' and 'response' columns" in shown
    assert "must be different" not in shown
    prompt = next(s for s in at.selectbox if s.label == "Prompt column")
    response = next(s for s in at.selectbox if s.label == "Response column")
    assert (prompt.value, response.value, prompt.options) == (None, None, ["foo", "bar", "uid"])
    assert [e.value for e in at.error] == [
        "Choose the prompt and response columns of qa.csv in the sidebar."
    ]

    prompt.set_value("foo").run()
    next(s for s in at.selectbox if s.label == "Response column").set_value("foo").run()
    assert any(
        w.value == "Choose two different columns of qa.csv: the prompt and the response are "
        "both 'foo'."
        for w in at.warning
    )
    next(s for s in at.selectbox if s.label == "Response column").set_value("bar").run()
    assert not at.error, [e.value for e in at.error]
    assert any("qa.csv" in s.value and "2" in s.value for s in at.success)
    assert (at.query_params["pcol"], at.query_params["rcol"]) in (
        (["foo"], ["bar"]),
        ("foo", "bar"),
    )


def test_common_column_names_are_guessed():
    at = upload(start_page(), "qa.csv", b"question,answer\nWhat is 2+2?,4\n")
    prompt = next(s for s in at.selectbox if s.label == "Prompt column")
    response = next(s for s in at.selectbox if s.label == "Response column")
    assert (prompt.value, response.value) == ("question", "answer")
    assert not at.error
    assert guess_column(["Input", "Output"], ("prompt", "input")) == "Input"
    assert guess_column(["text"], ("text",), taken="text") is None
