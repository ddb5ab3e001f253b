"""User data files and hub datasets: valid inputs, and every bad input as a one-line DataError."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.data.userdata import load_hub_dataset, load_user_data, parse_messages_column, read_columns
from core.errors import DataError, LensError

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def error_of(func, *args, **kwargs) -> str:
    """The message of the DataError raised; it must be a single line."""
    with pytest.raises(DataError) as err:
        func(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, LensError)
    return message


# ---------------------------------------------------------------------------- committed fixtures


def test_fixture_jsonl_with_id_column():
    ds = load_user_data(DATA / "sample.jsonl", id_col="id")
    assert [ex.id for ex in ds.examples] == ["ex-1", "ex-2", "ex-3", "ex-5"]
    assert ds.examples[0].response == "def square(x):\n    return x * x\n"
    assert ds.report.loaded == 4
    assert ds.report.skipped_empty == 1
    assert ds.report.skipped_ids == ["ex-4"]
    assert ds.report.summary() == "sample.jsonl: 4 examples, 1 empty rows skipped"
    assert ds.name == "sample"


def test_fixture_jsonl_default_ids_and_columns():
    assert read_columns(DATA / "sample.jsonl") == ["id", "prompt", "response", "source"]
    ds = load_user_data(DATA / "sample.jsonl")
    assert [ex.id for ex in ds.examples] == ["row-1", "row-2", "row-3", "row-5"]
    assert ds.report.skipped_ids == ["row-4"]


def test_fixture_csv_with_custom_columns():
    path = DATA / "sample.csv"
    assert read_columns(path) == ["question", "answer", "qid"]
    ds = load_user_data(path, prompt_col="question", response_col="answer")
    ids = [ex.id for ex in ds.examples]
    assert ids == ["row-1", "row-2", "row-3", "row-5"]
    by_id = {ex.id: ex for ex in ds.examples}
    assert by_id["row-1"].response == "4"
    assert by_id["row-2"].prompt == 'Spell "cat" backwards.'
    assert by_id["row-3"].response == "def add(a, b):\n    return a + b"  # multi-line cell
    assert by_id["row-5"].response == "None"  # the text "None" in a CSV is data, not missing
    assert ds.report.skipped_ids == ["row-4"]
    with_ids = load_user_data(path, "question", "answer", id_col="qid")
    assert [ex.id for ex in with_ids.examples] == ["q1", "q2", "q3", "q5"]


def test_fixture_chat_messages():
    ds = load_user_data(DATA / "chat.jsonl")
    assert [(ex.prompt, ex.response) for ex in ds.examples] == [
        ("Say hello.", "Hello!"),
        ("What is 3 + 4?", "3 + 4 = 7."),
    ]
    assert ds.report.skipped_ids == ["row-3"]
    assert any("messages" in w for w in ds.report.warnings)
    assert any("more than one user turn" in w for w in ds.report.warnings)
    explicit = load_user_data(DATA / "chat.jsonl", messages_col="messages")
    assert explicit.fingerprint() == ds.fingerprint()


# ---------------------------------------------------------------------------- valid variants


def test_limit_keeps_first_usable_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "response": "" if i == 2 else f"r{i}"} for i in range(1, 8)]
    path = write(tmp_path, "d.jsonl", jsonl(*rows))
    ds = load_user_data(path, limit=3)
    assert [ex.id for ex in ds.examples] == ["row-1", "row-3", "row-4"]
    assert ds.report.skipped_ids == ["row-2"]
    assert load_user_data(path, limit=0).examples == []
    assert "limit" in error_of(load_user_data, path, limit=-1)


def test_non_string_values_and_missing_values(tmp_path):
    content = (
        '{"prompt": 12, "response": 3.5}\n'
        '{"prompt": true, "response": null}\n'
        '{"prompt": "x", "response": NaN}\n'
        '{"prompt": "no response key"}\n'
        '{"prompt": "  \\t ", "response": "blank prompt"}\n'
        '{"prompt": "keep  spaces ", "response": " as written\\n"}\n'
    )
    ds = load_user_data(write(tmp_path, "d.jsonl", content))
    assert [(ex.prompt, ex.response) for ex in ds.examples] == [
        ("12", "3.5"),
        ("keep  spaces ", " as written\n"),
    ]
    assert ds.examples[1].id == "row-6"
    assert ds.report.skipped_empty == 4
    assert ds.report.skipped_ids == ["row-2", "row-3", "row-4", "row-5"]


def test_blank_lines_count_as_lines(tmp_path):
    content = (
        "\n"
        + jsonl({"prompt": "a", "response": "b"})
        + "\n\n"
        + jsonl({"prompt": "c", "response": "d"})
    )
    ds = load_user_data(write(tmp_path, "d.jsonl", content))
    assert [ex.id for ex in ds.examples] == ["row-2", "row-5"]


def test_json_array_file_and_utf8_bom(tmp_path):
    arr = json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}])
    assert len(load_user_data(write(tmp_path, "d.json", arr)).examples) == 2
    bom = b"\xef\xbb\xbf" + "prompt,response\nhé,là\n".encode()
    ds = load_user_data(write(tmp_path, "bom.csv", bom))
    assert (ds.examples[0].prompt, ds.examples[0].response) == ("hé", "là")


def test_parse_messages_column_forms():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_messages_column(turns) == ("hi", "hello")
    assert parse_messages_column(json.dumps(turns)) == ("hi", "hello")
    sharegpt = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert parse_messages_column(sharegpt) == ("q", "a")
    assert parse_messages_column([{"role": "assistant", "content": "x"}]) == (None, None)
    assert parse_messages_column(None) == (None, None)
    assert "Row 7" in error_of(parse_messages_column, "not json", row=7)
    assert "list" in error_of(parse_messages_column, {"role": "user"}, row=1)


def test_messages_column_in_csv(tmp_path):
    turns = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    path = write(tmp_path, "chat.csv", "messages\n" + '"' + turns.replace('"', '""') + '"\n')
    ds = load_user_data(path)
    assert (ds.examples[0].prompt, ds.examples[0].response) == ("q", "a")


# ---------------------------------------------------------------------------- bad inputs


def test_file_not_found(tmp_path):
    message = error_of(load_user_data, tmp_path / "missing.jsonl")
    assert message == f"File not found: {tmp_path / 'missing.jsonl'}"
    assert "File not found" in error_of(read_columns, tmp_path / "missing.csv")


def test_unsupported_extension_and_folder(tmp_path):
    message = error_of(load_user_data, write(tmp_path, "d.txt", "hello"))
    assert message.startswith("Unsupported file type '.txt' for d.txt")
    assert ".jsonl" in message and ".csv" in message
    (tmp_path / "folder.jsonl").mkdir()
    assert "is a folder" in error_of(load_user_data, tmp_path / "folder.jsonl")


def test_not_utf8_names_byte_offset_and_line(tmp_path):
    content = b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n'
    message = error_of(load_user_data, write(tmp_path, "latin1.jsonl", content))
    offset = content.index(b"\xe9")
    assert message == (
        f"latin1.jsonl is not UTF-8 text: invalid byte 0xe9 at byte offset {offset} (line 2). "
        "Save the file as UTF-8 and try again."
    )
    utf16 = "prompt,response\na,b\n".encode("utf-16")
    assert "is not UTF-8 text" in error_of(load_user_data, write(tmp_path, "u16.csv", utf16))


def test_malformed_json_line_names_line_number(tmp_path):
    content = jsonl({"prompt": "a", "response": "b"}) + '{"prompt": "c", "response": }\n'
    message = error_of(load_user_data, write(tmp_path, "bad.jsonl", content))
    assert message.startswith("bad.jsonl, line 2: malformed JSON (")
    not_object = jsonl({"prompt": "a", "response": "b"}) + '["a", "b"]\n'
    message = error_of(load_user_data, write(tmp_path, "list.jsonl", not_object))
    assert message == "list.jsonl, line 2: expected a JSON object with named fields, found a list."
    message = error_of(load_user_data, write(tmp_path, "arr.json", '[{"prompt": "a"},'))
    assert message.startswith("arr.json is not valid JSON:")


def test_empty_files(tmp_path):
    assert error_of(load_user_data, write(tmp_path, "e.jsonl", "")) == "e.jsonl is empty."
    assert error_of(load_user_data, write(tmp_path, "ws.jsonl", " \n\n  \n")) == (
        "ws.jsonl is empty."
    )
    assert error_of(load_user_data, write(tmp_path, "e.csv", "")) == "e.csv is empty."
    assert error_of(read_columns, write(tmp_path, "e2.csv", "\n")) == "e2.csv is empty."
    message = error_of(load_user_data, write(tmp_path, "h.csv", "prompt,response\n"))
    assert message == "h.csv has a header row (prompt, response) but no data rows."
    assert error_of(load_user_data, write(tmp_path, "a.json", "[]")) == "a.json has no rows."


def test_missing_columns_lists_available(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"question": "q", "answer": "a"}))
    message = error_of(load_user_data, path)
    assert message == (
        "Missing columns 'prompt', 'response' in d.jsonl. Available columns: question, answer."
    )
    message = error_of(load_user_data, path, prompt_col="question", response_col="reply")
    assert message == "Missing column 'reply' in d.jsonl. Available columns: question, answer."
    message = error_of(load_user_data, path, "question", "answer", id_col="uid")
    assert message == "Missing column 'uid' in d.jsonl. Available columns: question, answer."
    csv_path = write(tmp_path, "d.csv", "q,a\n1,2\n")
    assert "Available columns: q, a." in error_of(load_user_data, csv_path)


def test_prompt_and_response_column_the_same(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "a"}))
    message = error_of(load_user_data, path, prompt_col="text", response_col="text")
    assert message == (
        "The prompt and response must come from different columns of d.jsonl (both are 'text'). "
        "Available columns: text."
    )


def test_duplicate_and_empty_ids(tmp_path):
    rows = [
        {"id": "a", "prompt": "p", "response": "r"},
        {"id": "b", "prompt": "p", "response": "r"},
        {"id": "a", "prompt": "p", "response": "r"},
    ]
    path = write(tmp_path, "d.jsonl", jsonl(*rows))
    message = error_of(load_user_data, path, id_col="id")
    assert message == (
        "Duplicate id 'a' in column 'id' of d.jsonl (rows 1 and 3); ids must be unique."
    )
    # checked over the whole file even with a limit
    assert "Duplicate id 'a'" in error_of(load_user_data, path, id_col="id", limit=1)
    # numbers and strings that print the same are the same id
    path = write(tmp_path, "n.jsonl", jsonl({"id": 1, "prompt": "p", "response": "r"}))
    path.write_text(path.read_text() + jsonl({"id": "1", "prompt": "p", "response": "r"}))
    assert "Duplicate id '1'" in error_of(load_user_data, path, id_col="id")
    path = write(tmp_path, "e.jsonl", jsonl({"id": " ", "prompt": "p", "response": "r"}))
    assert error_of(load_user_data, path, id_col="id") == (
        "Row 1 of e.jsonl has an empty id in column 'id'."
    )


def test_all_rows_empty(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,response\na,\n,b\n")
    assert error_of(load_user_data, path) == (
        "No usable rows in d.csv: all 2 rows have an empty prompt or response "
        "(columns 'prompt' and 'response')."
    )


def test_malformed_csv(tmp_path):
    path = write(tmp_path, "d.csv", 'prompt,response\n"unterminated,quote\n')
    assert error_of(load_user_data, path) == (
        "d.csv could not be read as CSV (line 2): unexpected end of data (is a quote left open?)."
    )
    path = write(tmp_path, "extra.csv", "prompt,response\nWhat is 1,5 + 1?,2,5\n")
    assert error_of(load_user_data, path) == (
        "extra.csv, line 2: 4 fields but the header has 2 (prompt, response); "
        "put quotes around values that contain a ','."
    )
    path = write(tmp_path, "dup.csv", "prompt,prompt,response\na,b,c\n")
    assert error_of(load_user_data, path) == (
        "dup.csv: the header names column 'prompt' more than once."
    )


def test_short_csv_rows_and_tsv(tmp_path):
    path = write(tmp_path, "short.csv", "prompt,response,id\nq,a\n\nq2\n")
    ds = load_user_data(path)
    assert [(ex.id, ex.response) for ex in ds.examples] == [("row-1", "a")]
    assert ds.report.skipped_ids == ["row-2"]  # blank lines are not rows
    tsv = write(tmp_path, "d.tsv", "prompt\tresponse\nsay, hi\thi, there\n")
    ds = load_user_data(tsv)
    assert (ds.examples[0].prompt, ds.examples[0].response) == ("say, hi", "hi, there")


def test_bad_messages_value_names_row(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl({"messages": "hello"}, {"messages": 5}))
    message = error_of(load_user_data, path)
    assert message.startswith("Row 1: the messages value is not valid JSON")


# ---------------------------------------------------------------------------- hub


@pytest.fixture
def hub_offline(monkeypatch):
    """Make `datasets` / `huggingface_hub` fail at once instead of retrying the network."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_unreachable_gives_one_line_error(hub_offline):
    start = time.monotonic()
    message = error_of(load_hub_dataset, "perplexity-lens-test/no-such-dataset")
    assert time.monotonic() - start < 15
    assert message.startswith(
        "Could not load dataset 'perplexity-lens-test/no-such-dataset' from the Hugging Face "
        "hub: no network access ("
    )


def test_hub_empty_id():
    assert error_of(load_hub_dataset, "  ") == (
        "Give a Hugging Face dataset id, like 'openai/gsm8k'."
    )


def test_hub_loader_rows_from_a_local_dataset_folder(tmp_path, hub_offline):
    """`load_dataset` also accepts a local folder; this exercises the hub code path offline."""
    folder = tmp_path / "local_ds"
    folder.mkdir()
    rows = [
        {"prompt": "p1", "response": "r1"},
        {"prompt": "p2", "response": " "},
        {"prompt": "p3", "response": "r3"},
    ]
    (folder / "train.jsonl").write_text(jsonl(*rows), encoding="utf-8")
    ds = load_hub_dataset(str(folder), split="train")
    assert [(ex.id, ex.prompt, ex.response) for ex in ds.examples] == [
        ("row-1", "p1", "r1"),
        ("row-3", "p3", "r3"),
    ]
    assert ds.report.skipped_ids == ["row-2"]
    message = error_of(load_hub_dataset, str(folder), split="validation")
    assert "validation" in message
    message = error_of(load_hub_dataset, str(folder), prompt_col="question")
    assert message == (
        f"Missing column 'question' in dataset '{folder}'. Available columns: prompt, response."
    )
