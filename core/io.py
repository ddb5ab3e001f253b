"""File plumbing used everywhere, once: where the app keeps its files, atomic writes of files and
folders (a crash never leaves half of one), and JSON / JSONL reading and appending.

Every function that writes a path the user named (`--out`) reports a folder where a file is
expected, or a folder that cannot be created, as a one-line `LensError`, never a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LensError


def cache_dir() -> Path:
    """Root of everything the app caches and writes: `$PLENS_CACHE_DIR`, else
    `~/.cache/perplexity-lens`."""
    root = os.environ.get("PLENS_CACHE_DIR") or Path.home() / ".cache" / "perplexity-lens"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The folder, beside `core/` in site-packages, that the wheel puts the app in (pyproject.toml).
PACKAGED_APP = "perplexity_lens"


def app_root() -> Path:
    """The folder holding `app.py`, `pages/`, `components/`, `docs/` and `.streamlit/`: beside
    an installed `core`, the wheel's `perplexity_lens/` folder; otherwise the checkout that
    this `core` was imported from."""
    beside = Path(__file__).resolve().parents[1]
    packaged = beside / PACKAGED_APP
    return packaged if (packaged / "app.py").is_file() else beside


# --------------------------------------------------------------------------- writing


def output_path(path: str | Path) -> Path:
    """`path` as a file about to be written: its folder exists (made if needed); a path that
    is a folder, or a folder that cannot be made, is a one-line `LensError`."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise LensError(f"{target} is a folder; name a file to write.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LensError(
            f"cannot create the folder {target.parent}: {exc.strerror or exc}."
        ) from None
    return target


def write_atomic(path: str | Path, write: Callable[[Any], None], *, binary: bool = False) -> Path:
    """Write `path` all or nothing: `write(fh)` fills a temp file beside it, which is fsynced and
    renamed over `path` (an error leaves the old file as it was)."""
    target = output_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise LensError(f"cannot write into {target.parent}: {exc.strerror or exc}.") from None
    try:
        with os.fdopen(
            fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})
        ) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise LensError(f"cannot write {target}: {exc.strerror or exc}.") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda fh: fh.write(text))


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return write_atomic(path, lambda fh: fh.write(data), binary=True)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""

    def dump(fh: Any) -> None:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")

    return write_atomic(path, dump)


def jsonl_line(record: Any) -> str:
    """One JSONL line (with its newline)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> int:
    """Write `rows` as JSON lines to `path` atomically; returns the number of rows."""
    count = 0

    def dump(fh: Any) -> None:
        nonlocal count
        for row in rows:
            fh.write(jsonl_line(row))
            count += 1

    write_atomic(path, dump)
    return count


def fresh_sibling_dir(target: Path, kind: str) -> Path:
    """A new empty hidden folder beside `target` (`.<name>.<kind>-<random>`).

    Plain `mkdir`, not `tempfile.mkdtemp`: the folder becomes the result, which should get
    ordinary permissions (0777 less the umask), not mkdtemp's private 0700."""
    for _ in range(100):
        candidate = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {target}")


def replace_dir_atomic(target: str | Path, build: Callable[[Path], None]) -> Path:
    """Make the folder `target` all or nothing: `build(tmp)` fills a fresh folder beside it,
    which then takes `target`'s place (an old `target` is kept until the swap has succeeded, and
    put back if it fails). Nothing is left behind on an error, which `OSError`s become a one-line
    `LensError`."""
    final = Path(target).expanduser()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_sibling_dir(final, "tmp")
    except OSError as exc:
        raise LensError(f"cannot write into {final.parent}: {exc.strerror or exc}.") from None
    backup: Path | None = None
    try:
        build(tmp)
        if final.exists():
            backup = fresh_sibling_dir(final, "old")
            backup.rmdir()
            os.rename(final, backup)
        try:
            os.rename(tmp, final)
        except OSError:
            if backup is not None:
                os.rename(backup, final)
                backup = None
            raise
    except OSError as exc:
        raise LensError(f"cannot write {final}: {exc.strerror or exc}.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return final


def append_jsonl(path: str | Path, record: Any) -> None:
    """Append one record as one whole line (one write, then fsync). If an earlier writer died
    mid-line, the record starts on a fresh line, so only the broken line is lost."""
    append_jsonl_lines(path, [record])


def append_jsonl_lines(path: str | Path, records: Iterable[Any]) -> None:
    """Append records as whole lines in ONE write, then fsync: a process killed meanwhile
    leaves all of them or none (at worst a cut last line, which readers skip), never some."""
    line = "".join(jsonl_line(r) for r in records).encode("utf-8")
    if not line:
        return
    fd = os.open(Path(path), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- reading


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None if the file is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def iter_jsonl(path: str | Path, *, strict: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-empty line of a JSONL file.

    strict: a file that is missing, not UTF-8 text or has a line that is not JSON is a
    one-line `LensError` naming the file and line (user files). Otherwise a missing file is
    empty and bad lines are skipped (files being appended to: a record being written right now,
    or one cut off by a crash)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        if strict:
            raise LensError(f"cannot read {p}: {exc.strerror or exc}.") from None
        return
    if strict and b"\0" in data[:8192]:
        raise LensError(f"{p} is a binary file, not JSON lines.")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            if strict:
                raise LensError(f"{p}:{lineno}: not UTF-8 text.") from None
        except ValueError as exc:
            if strict:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise LensError(f"{p}:{lineno}: not valid JSON ({reason})") from None


def read_jsonl(path: str | Path, *, strict: bool = False) -> list[Any]:
    """The values of a JSONL file's lines (see `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, strict=strict)]


def file_stamp(path: str | Path) -> tuple[int, int] | None:
    """(modification time in ns, size) of a file, None when it is missing: a cache key that
    changes whenever the file does."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


# --------------------------------------------------------------------------- migration

#: What `python -m core migrate` appends to the name of a file in an old format it converted:
#: the old file is kept under that name, never deleted.
MIGRATED_SUFFIX = ".migrated"


@dataclass(frozen=True)
class MigrationStep:
    """One line of `python -m core migrate`'s report: a file (or folder) in one of the project's
    own older formats, what was done to it (or would be, in a dry run) and whether it changed."""

    path: Path
    text: str
    converted: bool = True


def migrated_name(path: str | Path) -> Path:
    """Where a migration keeps the old `path`: `<path>.migrated`, else `<path>.migrated-2`, ...
    (the first that does not exist: an old copy is never overwritten)."""
    path = Path(path)
    candidate = path.with_name(path.name + MIGRATED_SUFFIX)
    n = 2
    while candidate.exists():
        candidate = path.with_name(f"{path.name}{MIGRATED_SUFFIX}-{n}")
        n += 1
    return candidate


def keep_copy(path: str | Path) -> Path:
    """Copy `path` to `<path>.migrated` before it is rewritten in place, unless that copy exists
    already (from an interrupted migration: it holds the original); the copy's path."""
    path = Path(path)
    copy = path.with_name(path.name + MIGRATED_SUFFIX)
    if not copy.exists():
        temp = copy.with_name(f".{copy.name}.{secrets.token_hex(4)}.tmp")
        shutil.copy2(path, temp)
        os.replace(temp, copy)
    return copy
