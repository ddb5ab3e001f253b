"""User data: prompt/response pairs from a JSONL or CSV file, or from a Hugging Face hub dataset.

Every problem a user can cause is reported as a one-line `DataError` (never a traceback):
missing file, a file that is not UTF-8, a malformed JSON line, an empty file, missing columns,
the same column for prompt and response, duplicate ids, and (for the hub) no network access.

Rules, shared by files and hub datasets:

- Rows whose prompt or response is empty or whitespace-only (or missing, None or NaN) are skipped
  and counted in `report.skipped_empty`, their ids in `report.skipped_ids`.
- Ids come from `id_col` when given (converted with str(); must be unique and non-empty),
  otherwise "row-{n}" with n the 1-based row number: the line number for JSONL (blank lines
  count as lines but hold no row), the data row for CSV (the header is not counted) and the
  element position for a JSON array file or a hub dataset.
- Non-string values are converted with str(); None and NaN count as empty.
- Prompt and response text is kept exactly as written (no stripping), since whitespace changes
  tokens.
- Chat data: a "messages" column in chat format (a list of {"role", "content"} turns, or a JSON
  string of one) gives prompt = the first user turn and response = the first assistant turn after
  it. It is used when `messages_col` is given, or automatically when the default "prompt" /
  "response" columns are absent and a "messages" column exists.
- `limit` keeps the first N usable rows (after skipping empty ones); the whole file is still
  checked for structure and duplicate ids.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.data.records import Dataset, Example, LoadReport
from core.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)
TSV_SUFFIXES = (".tsv",)
MESSAGES_COLUMN = "messages"

_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot"}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_columns(path: str | Path) -> list[str]:
    """Column names of a JSONL/JSON or CSV file, in first-seen order.

    For JSONL this is the union of the keys of all rows; for CSV the header row.
    """
    columns, _rows = _read_file(Path(path).expanduser())
    return columns


def load_user_data(
    path: str | Path,
    prompt_col: str = "prompt",
    response_col: str = "response",
    id_col: str | None = None,
    limit: int | None = None,
    *,
    messages_col: str | None = None,
) -> Dataset:
    """Load prompt/response pairs from a .jsonl/.json/.ndjson, .csv or .tsv file.

    See the module docstring for the rules on empty rows, ids, chat-format "messages" columns and
    `limit`. Raises `DataError` with a one-line message for any problem with the file.
    """
    path = Path(path).expanduser()
    _check_limit(limit)
    columns, rows = _read_file(path)
    return _build_dataset(
        name=path.stem,
        source=path.name,
        columns=columns,
        rows=rows,
        prompt_col=prompt_col,
        response_col=response_col,
        id_col=id_col,
        limit=limit,
        messages_col=messages_col,
        where=path.name,
    )


def load_hub_dataset(
    hub_id: str,
    split: str = "train",
    prompt_col: str = "prompt",
    response_col: str = "response",
    id_col: str | None = None,
    limit: int | None = None,
    *,
    config_name: str | None = None,
    messages_col: str | None = None,
) -> Dataset:
    """Load prompt/response pairs from a Hugging Face hub dataset with `datasets.load_dataset`.

    `config_name` selects a dataset configuration (e.g. "main" for openai/gsm8k). Same rules as
    `load_user_data`; rows are numbered by position in the split. Without network access (or with
    HF_HUB_OFFLINE=1 and nothing cached) this raises a one-line `DataError`. Note that without
    HF_HUB_OFFLINE=1, `datasets` retries an unreachable hub for about 20 s before giving up.
    """
    hub_id = (hub_id or "").strip()
    if not hub_id:
        raise DataError("Give a Hugging Face dataset id, like 'openai/gsm8k'.")
    _check_limit(limit)
    ds = _hub_load(hub_id, split, config_name)
    columns = list(ds.column_names)
    rows = ((i + 1, row) for i, row in enumerate(ds))
    label = hub_id if config_name is None else f"{hub_id} ({config_name})"
    return _build_dataset(
        name=hub_id.rsplit("/", 1)[-1],
        source=f"{label} [{split}]",
        columns=columns,
        rows=rows,
        prompt_col=prompt_col,
        response_col=response_col,
        id_col=id_col,
        limit=limit,
        messages_col=messages_col,
        where=f"dataset '{hub_id}'",
    )


def parse_messages_column(
    value: Any, row: int | str | None = None
) -> tuple[str | None, str | None]:
    """(prompt, response) from one chat-format "messages" value.

    `value` is a list of turns, each a mapping with "role" and "content" (ShareGPT-style "from" /
    "value" with "human" / "gpt" also works), or a JSON string holding such a list (as in a CSV
    cell). prompt = the first user turn, response = the first assistant turn after it; system
    turns and later turns are ignored. Missing turns give None. A value that is not a list of
    turns raises `DataError` naming `row`.
    """
    where = f"Row {row}: " if row is not None else ""
    if _is_missing(value):
        return None, None
    if isinstance(value, str):
        if not value.strip():
            return None, None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}the messages value is not valid JSON (expected a list of "
                '{"role": ..., "content": ...} turns).'
            ) from None
    if not isinstance(value, list | tuple):
        raise DataError(
            f"{where}the messages value must be a list of {{role, content}} turns, "
            f"not {type(value).__name__}."
        )
    prompt: str | None = None
    for turn in value:
        if not isinstance(turn, Mapping):
            raise DataError(
                f"{where}each message must be an object with 'role' and 'content', "
                f"found {type(turn).__name__}."
            )
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        role = str(role).strip().lower() if role is not None else ""
        if prompt is None and role in _USER_ROLES:
            prompt = _to_text(content)
        elif prompt is not None and role in _ASSISTANT_ROLES:
            return prompt, _to_text(content)
    return prompt, None


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a whole number of at least 0 (got {limit!r}).")


def _read_file(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Columns and (row number, row) pairs of a data file, with one-line errors."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + CSV_SUFFIXES + TSV_SUFFIXES:
        kinds = ", ".join(JSON_SUFFIXES + CSV_SUFFIXES + TSV_SUFFIXES)
        raise DataError(f"Unsupported file type '{suffix or name}' for {name}: use one of {kinds}.")
    if not path.exists():
        raise DataError(f"File not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Could not read {path}: {exc.strerror or exc}") from None
    text = _decode_utf8(raw, name)
    if not text.strip():
        raise DataError(f"{name} is empty.")
    if suffix in JSON_SUFFIXES:
        return _parse_json(text, name)
    return _parse_csv(text, name, sep="\t" if suffix in TSV_SUFFIXES else ",")


def _decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:start].count(b"\n") + 1
        raise DataError(
            f"{name} is not UTF-8 text: invalid byte 0x{raw[start]:02x} at byte offset {start} "
            f"(line {line}). Save the file as UTF-8 and try again."
        ) from None


def _parse_json(text: str, name: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """JSON Lines, or (when the text starts with "[") one JSON array of objects."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
            ) from None
        for i, item in enumerate(data, start=1):
            if not isinstance(item, dict):
                raise DataError(
                    f"{name}: item {i} of the JSON array is {_json_kind(item)}, not an object "
                    "with named fields."
                )
            rows.append((i, item))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{name}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})."
                ) from None
            if not isinstance(item, dict):
                raise DataError(
                    f"{name}, line {lineno}: expected a JSON object with named fields, "
                    f"found {_json_kind(item)}."
                )
            rows.append((lineno, item))
    if not rows:
        raise DataError(f"{name} has no rows.")
    columns: dict[str, None] = {}
    for _, row in rows:
        for key in row:
            columns.setdefault(str(key), None)
    return list(columns), rows


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _parse_csv(
    text: str, name: str, sep: str = ","
) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Every cell as a string, read with the stdlib `csv` module (no "NA"/"None" guessing).

    Rows are numbered 1, 2, ... after the header; blank lines are ignored. A row with fewer
    fields than the header gets empty values for the rest; a row with more is an error.
    """
    # Long responses exceed the csv module's default 128 KiB field limit; raise it (process-wide).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    try:
        header = next((r for r in reader if r), None)
        if header is None:
            raise DataError(f"{name} is empty.")
        columns = [c.strip() for c in header]
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        if dupes:
            raise DataError(f"{name}: the header names column '{dupes[0]}' more than once.")
        rows: list[tuple[int, dict[str, Any]]] = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) > len(columns):
                shown = "tab" if sep == "\t" else f"'{sep}'"
                raise DataError(
                    f"{name}, line {reader.line_num}: {len(fields)} fields but the header has "
                    f"{len(columns)} ({', '.join(columns)}); put quotes around values that "
                    f"contain a {shown}."
                )
            rows.append((len(rows) + 1, dict(zip(columns, fields, strict=False))))
    except csv.Error as exc:
        hint = " (is a quote left open?)" if "end of data" in str(exc) else ""
        raise DataError(
            f"{name} could not be read as CSV (line {reader.line_num}): {exc}{hint}."
        ) from None
    if not rows:
        raise DataError(f"{name} has a header row ({', '.join(columns)}) but no data rows.")
    return columns, rows


# --------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------


def _hub_load(hub_id: str, split: str, config_name: str | None) -> Any:
    """`datasets.load_dataset(hub_id, config_name, split=split)` with one-line errors."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config_name, split=split)
    except ConnectionError as exc:
        raise DataError(
            f"Could not load dataset '{hub_id}' from the Hugging Face hub: no network access "
            f"({_one_line(exc)}). Use a local JSONL/CSV file or a built-in task instead."
        ) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise DataError(
            f"Could not load dataset '{hub_id}' from the Hugging Face hub: {_one_line(exc)}"
        ) from None
    except FileNotFoundError as exc:
        raise DataError(f"Could not find dataset '{hub_id}': {_one_line(exc)}") from None
    except ValueError as exc:
        # Unknown split, missing or unknown config name, ...
        raise DataError(f"Could not load dataset '{hub_id}' [{split}]: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - anything else from the hub stack, as one line
        if _looks_offline(exc):
            raise DataError(
                f"Could not load dataset '{hub_id}' from the Hugging Face hub: no network access "
                f"({_one_line(exc)})."
            ) from None
        raise DataError(
            f"Could not load dataset '{hub_id}' from the Hugging Face hub: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _looks_offline(exc: BaseException) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        name = type(exc).__name__
        if name in {"OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "TimeoutException"}:
            return True
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Rows -> Dataset
# --------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if type(value).__name__ in {"NAType", "NaTType"}:  # pandas.NA / pandas.NaT
        return True
    try:  # numpy / pandas NaN-like scalars
        return bool(value != value) and not isinstance(value, list | tuple | dict | str)
    except (TypeError, ValueError):
        return False


def _to_text(value: Any) -> str | None:
    """str(value), or None for a missing value."""
    if _is_missing(value):
        return None
    return value if isinstance(value, str) else str(value)


def _is_empty(text: str | None) -> bool:
    return text is None or not text.strip()


def _build_dataset(
    *,
    name: str,
    source: str,
    columns: list[str],
    rows: Iterable[tuple[int, Mapping[str, Any]]],
    prompt_col: str,
    response_col: str,
    id_col: str | None,
    limit: int | None,
    messages_col: str | None,
    where: str,
) -> Dataset:
    report = LoadReport(source=source)
    available = ", ".join(columns) if columns else "(none)"

    use_messages = messages_col
    if use_messages is None and (
        prompt_col == "prompt"
        and response_col == "response"
        and "prompt" not in columns
        and "response" not in columns
        and MESSAGES_COLUMN in columns
    ):
        use_messages = MESSAGES_COLUMN
        report.warnings.append(
            "no 'prompt'/'response' columns: used the 'messages' column (chat format): "
            "first user turn as prompt, first assistant turn as response"
        )

    if use_messages is None and prompt_col == response_col:
        raise DataError(
            f"The prompt and response must come from different columns of {where} (both are "
            f"'{prompt_col}'). Available columns: {available}."
        )
    needed = [use_messages] if use_messages is not None else [prompt_col, response_col]
    if id_col:
        needed.append(id_col)
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        names = ", ".join(f"'{c}'" for c in missing)
        raise DataError(
            f"Missing column{plural} {names} in {where}. Available columns: {available}."
        )

    examples: list[Example] = []
    id_rows: dict[str, int] = {}
    multi_turn = 0
    done = limit == 0
    for rownum, row in rows:
        if id_col:
            ex_id = _to_text(row.get(id_col))
            if _is_empty(ex_id):
                raise DataError(f"Row {rownum} of {where} has an empty id in column '{id_col}'.")
            assert ex_id is not None
            if ex_id in id_rows:
                raise DataError(
                    f"Duplicate id '{ex_id}' in column '{id_col}' of {where} "
                    f"(rows {id_rows[ex_id]} and {rownum}); ids must be unique."
                )
            id_rows[ex_id] = rownum
        else:
            ex_id = f"row-{rownum}"
        if done:
            continue  # keep checking ids over the whole file
        if use_messages is not None:
            value = row.get(use_messages)
            prompt, response = parse_messages_column(value, row=rownum)
            if isinstance(value, list) and _count_user_turns(value) > 1:
                multi_turn += 1
        else:
            prompt, response = _to_text(row.get(prompt_col)), _to_text(row.get(response_col))
        if _is_empty(prompt) or _is_empty(response):
            report.skipped_empty += 1
            report.skipped_ids.append(ex_id)
            continue
        assert prompt is not None and response is not None
        examples.append(Example(id=ex_id, prompt=prompt, response=response))
        if limit is not None and len(examples) >= limit:
            done = True

    if multi_turn:
        report.warnings.append(
            f"{multi_turn} conversations have more than one user turn; only the first "
            "exchange was used"
        )
    if not examples and limit != 0:
        cols = f"'{use_messages}'" if use_messages else f"'{prompt_col}' and '{response_col}'"
        raise DataError(
            f"No usable rows in {where}: all {report.skipped_empty} rows have an empty "
            f"prompt or response (columns {cols})."
        )
    report.loaded = len(examples)
    return Dataset(name=name, examples=examples, report=report)


def _count_user_turns(turns: list[Any]) -> int:
    count = 0
    for turn in turns:
        if isinstance(turn, Mapping):
            role = str(turn.get("role", turn.get("from", ""))).strip().lower()
            count += role in _USER_ROLES
    return count


__all__ = [
    "load_hub_dataset",
    "load_user_data",
    "parse_messages_column",
    "read_columns",
]
