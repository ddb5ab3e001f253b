"""One SQLite key-value cache class, behind the score cache and the evaluation cache.

A `KVCache` maps string keys (content hashes the caller builds) to values through an
encode/decode pair, in one table of one SQLite file. Several processes may read and write at
once (WAL journal, 30 s busy timeout); a crash mid-write never leaves half a row.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import quote

V = TypeVar("V")
_CHUNK = 500  # keys per SELECT (SQLite's bound-parameter limit is 999 on old builds)


class KVCache(Generic[V]):
    """Key -> value store in table `table` of the SQLite file `path`."""

    def __init__(
        self,
        path: str | Path,
        table: str,
        *,
        encode: Callable[[V], bytes | str],
        decode: Callable[[bytes | str], V],
        value_type: str = "BLOB",
    ) -> None:
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.table = table
        self._encode = encode
        self._decode = decode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            use_wal(db)
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value {value_type})"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        """The cached values among `keys`."""
        wanted = list(keys)
        found: dict[str, V] = {}
        with self._connect() as db:
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, value FROM {self.table} WHERE key IN ({marks})"
                for key, value in db.execute(query, chunk):
                    found[key] = self._decode(value)
        return found

    def get(self, key: str) -> V | None:
        """The cached value of `key`, if any."""
        return self.get_many([key]).get(key)

    def put_many(self, items: dict[str, V]) -> None:
        """Store (or replace) values, in one transaction."""
        rows = [(key, self._encode(value)) for key, value in items.items()]
        with self._connect() as db:
            db.executemany(f"INSERT OR REPLACE INTO {self.table} (key, value) VALUES (?, ?)", rows)

    def put(self, key: str, value: V) -> None:
        """Store (or replace) one value."""
        self.put_many({key: value})

    def __bool__(self) -> bool:
        return True  # an empty cache is still a cache (`if cache:` must not mean "has rows")

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])

    def clear(self) -> None:
        """Remove every cached value."""
        with self._connect() as db:
            db.execute(f"DELETE FROM {self.table}")


def use_wal(db: sqlite3.Connection, wait_s: float = 60.0) -> None:
    """Put `db`'s file in WAL mode (left alone if it is already). Switching a new file needs an
    exclusive lock, and while another connection is making the same file SQLite answers
    "database is locked" at once, without calling its busy handler: eight stores opened at the
    same moment lost one or two of them that way. So the switch is retried for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.2)


def open_untouched(path: str | Path) -> sqlite3.Connection:
    """A connection that reads the SQLite file `path` without writing beside it: opened
    immutable (no -wal / -shm files made) unless a crash left a journal with rows in it, which
    only a normal connection reads (it may then write the -shm file a journal needs)."""
    path = Path(path)
    wal = Path(f"{path}-wal")
    if wal.is_file() and wal.stat().st_size:
        return sqlite3.connect(path, timeout=60)
    return sqlite3.connect(f"file:{quote(str(path.resolve()))}?immutable=1", uri=True, timeout=60)
