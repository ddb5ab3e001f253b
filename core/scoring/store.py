"""Columnar on-disk store of per-token scores: Parquet fragments, one folder per scoring setting.

Layout under the store's root (`<cache_dir()>/scores` for the app's cache):

    <setting key>/setting.json          what the setting is (model, template, convention, ...)
    <setting key>/vocab.parquet         the text of every token id the setting's rows use
    <setting key>/part-<ns>-<pid>-<rand>.parquet   fragments: one row per example
    <setting key>/.lock                 the setting's file lock (writers, compaction, quarantine)
    quarantine/                         files that could not be read, moved aside

A fragment row holds one example: its content key (`key`), id, prompt, response, convention,
truncated, response_start and the list columns token_ids (int32, the whole sequence), logprob
(float64) and rank (int32) per response token, and top_ids (int32) / top_logprobs (float32)
flattened to k per response token (k is in the file's metadata). A token id's text depends only
on the model, which is part of the setting, so the texts are kept once per setting
(`vocab.parquet`, id -> text), not per token.

Writes take the setting's file lock, add the new ids' texts to the vocabulary first and then add
a fragment; both files are written to a temp file, fsynced and renamed, so a reader sees all of a
file or nothing, and a fragment's ids always have their texts. Past `MAX_FRAGMENTS` the
`MERGE_FAN_IN` smallest fragments are merged into one (size-tiered: appending one scoring batch
at a time stays cheap); `compact` merges them all. Readers take no lock: a fragment never changes
once written, and one removed by a concurrent compaction makes the reader list the folder again.
When the same key is in several fragments the newest wins (they hold the same scores: the key is
the content and the setting).

A file that cannot be read (truncated, a page checksum mismatch, columns that disagree with each
other or ids without a text) is moved to `quarantine/` and reported as a warning string, never
raised; its examples read as missing, so the caller scores them again. Without its vocabulary a
setting's fragments cannot be read, so a damaged vocabulary moves the whole setting aside.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from core.errors import LensError
from core.io import read_json, write_atomic, write_json_atomic
from core.scoring.tokens import TokenScores

STORE_SCHEMA = 1
ROW_GROUP = 128  # examples per Parquet row group: a lookup of a few examples decodes only theirs
MAX_FRAGMENTS = 16  # past this many fragments in a setting, a write merges the smallest ones:
MERGE_FAN_IN = 8  # this many, so a row is rewritten about log8(rows / append size) times
LOCK_TIMEOUT = 120.0
QUARANTINE = "quarantine"
VOCAB_FILE = "vocab.parquet"
_STALE_TEMP_S = 3600.0  # a temp file this old belongs to a writer that died

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("convention", pa.string()),
        ("truncated", pa.bool_()),
        ("response_start", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("logprob", pa.list_(pa.float64())),
        ("rank", pa.list_(pa.int32())),
        ("top_ids", pa.list_(pa.int32())),
        ("top_logprobs", pa.list_(pa.float32())),
    ]
)
VOCAB_SCHEMA = pa.schema([("id", pa.int32()), ("text", pa.string())])
_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,  # as small as level 3 on these columns, and faster to write
    "write_page_checksum": True,
    "row_group_size": ROW_GROUP,
    "use_dictionary": ["convention"],  # zstd does better on token ids than dictionary pages
    # float32 log-probs widened to float64 keep four zero bytes: split by byte, they compress away
    "use_byte_stream_split": ["logprob.list.element", "top_logprobs.list.element"],
}
_VOCAB_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "write_page_checksum": True,
    "use_dictionary": False,
}
# What reading a damaged Parquet file raises (pyarrow's errors are OSError / ValueError kinds).
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException)


class _Corrupt(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


class _Retry(Exception):
    """A file disappeared or was skipped: list the folder again."""


@dataclass
class _Fragment:
    """What a reader keeps of one fragment: its keys, row groups, k and parsed footer."""

    signature: tuple[int, int]
    rows: dict[str, int]
    group_starts: np.ndarray
    top_k: int
    metadata: Any = field(repr=False)


class VocabTexts(Mapping[int, str]):
    """Token id -> text of a setting's vocabulary file, read lazily: a few lookups (one
    example) go to the Arrow column, many (a whole dataset's records) build a dict once."""

    _LOOKUPS_BEFORE_DICT = 20_000

    def __init__(self, ids: np.ndarray, texts: pa.Array) -> None:
        self._ids = ids
        self._texts = texts
        self._dict: dict[int, str] | None = None
        self._lookups = 0

    def _as_dict(self) -> dict[int, str]:
        if self._dict is None:
            self._dict = dict(zip(self._ids.tolist(), self._texts.to_pylist(), strict=True))
        return self._dict

    def __getitem__(self, token_id: int) -> str:
        if self._dict is not None:
            return self._dict[token_id]
        self._lookups += 1
        if self._lookups > self._LOOKUPS_BEFORE_DICT:
            return self._as_dict()[token_id]
        at = int(np.searchsorted(self._ids, token_id))
        if at == self._ids.size or self._ids[at] != token_id:
            raise KeyError(token_id)
        return self._texts[at].as_py()

    def texts_of(self, ids: np.ndarray) -> list[str]:
        """Texts of many ids at once (KeyError for an id without one)."""
        self._lookups += int(ids.size)
        if self._dict is not None or self._lookups > self._LOOKUPS_BEFORE_DICT:
            table = self._as_dict()
            return [table[i] for i in ids.tolist()]
        at = np.searchsorted(self._ids, ids)
        ok = at < self._ids.size
        if not ok.all() or not np.array_equal(self._ids[at], ids):
            missing = ids[~ok] if not ok.all() else ids[self._ids[at] != ids]
            raise KeyError(int(missing[0]))
        return self._texts.take(pa.array(at)).to_pylist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return int(self._ids.size)


@dataclass
class _Vocab:
    """A setting's token texts and which ids have one."""

    signature: tuple[int, int] | None
    texts: Mapping[int, str]
    known: np.ndarray = field(repr=False)


_EMPTY_VOCAB = _Vocab(None, {}, np.zeros(0, dtype=bool))

# Fragments never change once written, so what a reader learns of one is shared by every store
# object of the process (pages, background threads), keyed by path and checked against size and
# mtime; so is a vocabulary, reloaded when a writer has replaced it.
_INDEXES: dict[str, _Fragment] = {}
_VOCABS: dict[str, _Vocab] = {}
_CACHE_LOCK = threading.Lock()


def _forget(path: Path) -> None:
    with _CACHE_LOCK:
        _INDEXES.pop(str(path), None)
        _VOCABS.pop(str(path), None)


def _prune(folder: Path, paths: Sequence[Path]) -> None:
    """Drop what this process keeps of fragments in `folder` that are gone (compacted or moved
    away by another process)."""
    prefix, live = f"{folder}{os.sep}", {str(p) for p in paths}
    with _CACHE_LOCK:
        for name in [n for n in _INDEXES if n.startswith(prefix) and n not in live]:
            del _INDEXES[name]


@dataclass
class StoreRead:
    """Rows found for a lookup: their content keys and scores (in the order asked), and what
    went wrong on the way (files moved aside), as sentences a page or the CLI can show."""

    keys: list[str]
    scores: TokenScores
    warnings: list[str] = field(default_factory=list)


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _list_column(table: pa.Table, name: str, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and per-row lengths of a list column (no nulls allowed), owned by numpy
    (a chunk per row group is copied once, so the Arrow buffers can go)."""
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"column {name} has missing rows")
    values, lengths = [], []
    for chunk in col.chunks:
        flat = chunk.flatten()
        if flat.null_count:
            raise ValueError(f"column {name} has missing values")
        values.append(flat.to_numpy(zero_copy_only=False))
        lengths.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
    if not values:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
    flat_values = np.concatenate(values).astype(dtype, copy=False)
    return flat_values, np.concatenate(lengths).astype(np.int64)


def _plain_column(table: pa.Table, name: str) -> list[Any]:
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"column {name} has missing rows")
    return col.to_pylist()


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _all_known(known: np.ndarray, ids: np.ndarray) -> bool:
    return not ids.size or bool(ids.min() >= 0 and ids.max() < known.size and known[ids].all())


_PLAIN = ["key", "id", "prompt", "response", "convention", "truncated", "response_start"]


def _scores_of(
    read: Callable[[list[str]], pa.Table], top_k: int, vocab: _Vocab
) -> tuple[list[str], TokenScores]:
    """Content keys and scores of a fragment's rows (`read(columns)` reads them), one list
    column at a time to keep the peak memory near the result's; ValueError when the columns
    disagree."""
    k = top_k
    token_ids, n_tok = _list_column(read(["token_ids"]), "token_ids", np.int32)
    logprob, n_resp = _list_column(read(["logprob"]), "logprob", np.float64)
    rank, n_rank = _list_column(read(["rank"]), "rank", np.int32)
    top_ids, n_top = _list_column(read(["top_ids"]), "top_ids", np.int32)
    top_lp, n_top_lp = _list_column(read(["top_logprobs"]), "top_logprobs", np.float32)
    if not (np.array_equal(n_rank, n_resp) and np.array_equal(n_top, n_resp * k)):
        raise ValueError("rank / top-k lengths disagree with the log-probs")
    if not np.array_equal(n_top_lp, n_top):
        raise ValueError("top-k ids and log-probs differ in length")
    if not (_all_known(vocab.known, token_ids) and _all_known(vocab.known, top_ids)):
        raise ValueError("a token id has no text in the vocabulary")
    table = read(_PLAIN)
    keys = _plain_column(table, "key")
    scores = TokenScores(
        ids=tuple(_plain_column(table, "id")),
        prompts=tuple(_plain_column(table, "prompt")),
        responses=tuple(_plain_column(table, "response")),
        conventions=tuple(_plain_column(table, "convention")),
        token_ids=token_ids,
        token_offsets=_offsets(n_tok),
        response_start=np.asarray(_plain_column(table, "response_start"), dtype=np.int32),
        logprob=logprob,
        offsets=_offsets(n_resp),
        rank=rank,
        top_ids=top_ids.reshape(-1, k) if k else np.zeros((logprob.size, 0), np.int32),
        top_logprobs=top_lp.reshape(-1, k) if k else np.zeros((logprob.size, 0), np.float32),
        truncated=np.asarray(_plain_column(table, "truncated"), dtype=bool),
        vocab=vocab.texts,
    )
    return keys, scores


def _table_of(keys: Sequence[str], scores: TokenScores) -> pa.Table:
    """The fragment table of `scores` (rows keyed by `keys`), with its metadata."""
    k = scores.top_k

    def lists(values: np.ndarray, offsets: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32)), pa.array(values.reshape(-1), type=typ)
        )

    table = pa.Table.from_arrays(
        [
            pa.array(list(keys), pa.string()),
            pa.array(list(scores.ids), pa.string()),
            pa.array(list(scores.prompts), pa.string()),
            pa.array(list(scores.responses), pa.string()),
            pa.array(list(scores.conventions), pa.string()),
            pa.array(scores.truncated, pa.bool_()),
            pa.array(scores.response_start.astype(np.int32), pa.int32()),
            lists(scores.token_ids, scores.token_offsets, pa.int32()),
            lists(scores.logprob, scores.offsets, pa.float64()),
            lists(scores.rank, scores.offsets, pa.int32()),
            lists(scores.top_ids, scores.offsets * k, pa.int32()),
            lists(scores.top_logprobs, scores.offsets * k, pa.float32()),
        ],
        schema=SCHEMA,
    )
    return table.replace_schema_metadata(
        {b"plens.schema": str(STORE_SCHEMA).encode(), b"plens.top_k": str(k).encode()}
    )


def _open(path: Path, metadata: Any = None) -> tuple[Any, pq.ParquetFile]:
    fh = open(path, "rb")  # noqa: SIM115 - closed by the caller; keeps a removed file readable
    try:
        return fh, pq.ParquetFile(fh, metadata=metadata, page_checksum_verification=True)
    except BaseException:
        fh.close()
        raise


class ScoreStore:
    """Parquet fragments of per-token scores under `root`, one folder per setting key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- layout

    def setting_dir(self, setting: str) -> Path:
        """The folder of one setting's fragments."""
        if not setting or not all(c.isalnum() or c in "-_" for c in setting):
            raise ValueError(f"bad setting key {setting!r}")
        return self.root / setting

    def settings(self) -> list[str]:
        """Setting keys that have a folder."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name != QUARANTINE)

    def fragments(self, setting: str) -> list[Path]:
        """The setting's fragments, oldest first."""
        folder = self.setting_dir(setting)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        parts = [n for n in names if n.startswith("part-") and n.endswith(".parquet")]
        return [folder / n for n in sorted(parts)]

    def _lock(self, setting: str) -> FileLock:
        folder = self.setting_dir(setting)
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / ".lock"), timeout=LOCK_TIMEOUT)

    # ----------------------------------------------------------------- reading

    def _vocab(self, setting: str) -> _Vocab:
        """The setting's token texts (cached per process until the file changes)."""
        path = self.setting_dir(setting) / VOCAB_FILE
        try:
            signature = _signature(path)
        except FileNotFoundError:
            return _EMPTY_VOCAB
        with _CACHE_LOCK:
            cached = _VOCABS.get(str(path))
        if cached is not None and cached.signature == signature:
            return cached
        try:
            fh, pf = _open(path)
            with fh:
                table = pf.read()
            if not table.schema.equals(VOCAB_SCHEMA):
                raise ValueError("columns differ from a vocabulary's")
            ids = table.column("id").to_numpy(zero_copy_only=False).astype(np.int64)
            texts = table.column("text").combine_chunks()
            if texts.null_count:
                raise ValueError("a token has no text")
            if ids.size and (ids[0] < 0 or np.any(np.diff(ids) <= 0)):
                raise ValueError("token ids are not distinct, ascending and >= 0")
        except FileNotFoundError:
            return _EMPTY_VOCAB
        except PermissionError:
            raise
        except _READ_ERRORS as exc:
            raise _Corrupt(path, f"{type(exc).__name__}: {exc}") from None
        known = np.zeros(int(ids.max()) + 1 if ids.size else 0, dtype=bool)
        known[ids] = True
        vocab = _Vocab(signature, VocabTexts(ids, texts), known)
        with _CACHE_LOCK:
            _VOCABS[str(path)] = vocab
        return vocab

    def _index(self, path: Path) -> _Fragment:
        """The keys, row groups and k of a fragment (cached per process)."""
        signature = _signature(path)
        with _CACHE_LOCK:
            cached = _INDEXES.get(str(path))
        if cached is not None and cached.signature == signature:
            return cached
        try:
            fh, pf = _open(path)
            with fh:
                meta = pf.schema_arrow.metadata or {}
                if int(meta.get(b"plens.schema", b"0")) != STORE_SCHEMA:
                    raise ValueError("not a score-store fragment of this version")
                if not pf.schema_arrow.equals(SCHEMA.with_metadata(meta)):
                    raise ValueError("columns differ from the store's")
                top_k = int(meta[b"plens.top_k"])
                keys = _plain_column(pf.read(columns=["key"]), "key")
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
                metadata = pf.metadata
        except (FileNotFoundError, PermissionError):
            raise
        except _READ_ERRORS as exc:
            raise _Corrupt(path, f"{type(exc).__name__}: {exc}") from None
        if top_k < 0 or len(keys) != sum(sizes):
            raise _Corrupt(path, "inconsistent fragment metadata")
        frag = _Fragment(
            signature=signature,
            rows={key: i for i, key in enumerate(keys)},
            group_starts=_offsets(np.asarray(sizes, dtype=np.int64)),
            top_k=top_k,
            metadata=metadata,
        )
        with _CACHE_LOCK:
            _INDEXES[str(path)] = frag
        return frag

    def _read_rows(
        self, path: Path, frag: _Fragment, rows: Sequence[int] | None, vocab: _Vocab
    ) -> tuple[list[str], TokenScores, np.ndarray]:
        """The row groups of a fragment that hold `rows` (all when None), as keys and scores,
        and where each of `rows` is among them."""
        try:
            fh, pf = _open(path, frag.metadata)
            with fh:
                if rows is None:
                    local = np.arange(int(frag.group_starts[-1]), dtype=np.int64)

                    def read(columns: list[str]) -> pa.Table:
                        return pf.read(columns=columns)
                else:
                    row_arr = np.asarray(rows, dtype=np.int64)
                    groups = np.searchsorted(frag.group_starts, row_arr, side="right") - 1
                    wanted = np.unique(groups)
                    base = _offsets(np.diff(frag.group_starts)[wanted])[:-1]
                    local = (
                        row_arr - frag.group_starts[groups] + base[np.searchsorted(wanted, groups)]
                    )
                    group_list = wanted.tolist()

                    def read(columns: list[str]) -> pa.Table:
                        return pf.read_row_groups(group_list, columns=columns)

                keys, scores = _scores_of(read, frag.top_k, vocab)
        except (FileNotFoundError, PermissionError):
            raise
        except _READ_ERRORS as exc:
            raise _Corrupt(path, f"{type(exc).__name__}: {exc}") from None
        if rows is not None and [frag.rows.get(keys[i]) for i in local.tolist()] != list(rows):
            raise _Corrupt(path, "row keys changed between reads")
        return keys, scores, local

    # ----------------------------------------------------------------- damaged files

    def _move_aside(self, setting: str, path: Path, reason: str) -> str:
        """Move an unreadable file to quarantine/ (the setting's lock held); the warning. A
        vocabulary takes its setting's fragments with it: they cannot be read without it."""
        stamp = time.time_ns()
        moving = [path] + (self.fragments(setting) if path.name == VOCAB_FILE else [])
        moved = 0
        for item in moving:
            _forget(item)
            dest = self.root / QUARANTINE / f"{setting}-{item.name}.{stamp}"
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
                moved += 1
            except FileNotFoundError:
                continue
        where = (
            f"moved it to {self.root / QUARANTINE}"
            if moved
            else "another process already moved it away"
        )
        if path.name == VOCAB_FILE and len(moving) > 1:
            where += f", with the setting's {len(moving) - 1} fragment(s) that need it"
        return (
            f"score store: could not read {path.name} ({reason}); {where}. "
            "Its examples are scored again."
        )

    def _quarantine(self, setting: str, path: Path, reason: str) -> str:
        """`_move_aside` under the setting's lock."""
        with self._lock(setting):
            return self._move_aside(setting, path, reason)

    @staticmethod
    def _unreadable(path: Path, exc: OSError) -> str:
        return (
            f"score store: cannot open {path} ({exc.strerror or exc}); "
            "its examples are scored again."
        )

    def read(self, setting: str, keys: Iterable[str]) -> StoreRead:
        """The stored rows among `keys`, in the order asked (each key once)."""
        wanted = list(dict.fromkeys(keys))
        warnings: list[str] = []
        skip: set[Path] = set()
        for _ in range(64):
            listed = self.fragments(setting)
            _prune(self.setting_dir(setting), listed)
            paths = [p for p in listed if p not in skip]
            if not paths or not wanted:
                return StoreRead([], TokenScores.empty(), warnings)
            current: Path | None = None
            try:
                vocab = self._vocab(setting)  # after listing: it covers every listed fragment
                where: dict[str, tuple[int, int]] = {}
                indexes: list[_Fragment] = []
                for f, path in enumerate(paths):
                    current = path
                    frag = self._index(path)
                    indexes.append(frag)
                    rows = frag.rows
                    for key in wanted:
                        row = rows.get(key)
                        if row is not None:
                            where[key] = (f, row)  # later (newer) fragments win
                by_fragment: dict[int, list[str]] = {}
                for key in wanted:
                    if key in where:
                        by_fragment.setdefault(where[key][0], []).append(key)
                found_keys: list[str] = []  # of the rows wanted, as read
                picks: list[np.ndarray] = []  # where those rows are in `parts`, joined
                parts: list[TokenScores] = []
                base = 0
                for f, frag_keys in sorted(by_fragment.items()):
                    current = paths[f]
                    rows_of = [where[k][1] for k in frag_keys]
                    got, scores, local = self._read_rows(paths[f], indexes[f], rows_of, vocab)
                    found_keys.extend(got[i] for i in local.tolist())
                    picks.append(local + base)
                    parts.append(scores)
                    base += len(scores)
            except FileNotFoundError:
                continue  # compacted or moved away meanwhile: list the folder again
            except PermissionError as exc:
                where_path = current or self.setting_dir(setting) / VOCAB_FILE
                warnings.append(self._unreadable(where_path, exc))
                if current is None:
                    return StoreRead([], TokenScores.empty(), warnings)
                skip.add(current)
                continue
            except _Corrupt as bad:
                warnings.append(self._quarantine(setting, bad.path, bad.reason))
                continue
            if not parts:
                return StoreRead([], TokenScores.empty(), warnings)
            pa.default_memory_pool().release_unused()  # the Arrow buffers read are all copied
            joined = TokenScores.concat(parts)
            pick = np.concatenate(picks)
            position = {k: i for i, k in enumerate(found_keys)}
            order = np.array([position[k] for k in wanted if k in position], dtype=np.int64)
            rows = pick[order]
            if rows.size == len(joined) and np.array_equal(rows, np.arange(rows.size)):
                scores = joined  # every row read, already in the order asked
            else:
                scores = joined.take(rows)
            return StoreRead([found_keys[i] for i in order.tolist()], scores, warnings)
        warnings.append("score store: gave up reading after repeated concurrent changes")
        return StoreRead([], TokenScores.empty(), warnings)

    # ----------------------------------------------------------------- writing

    def _write_fragment(self, setting: str, keys: Sequence[str], scores: TokenScores) -> Path:
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.parquet"
        path = self.setting_dir(setting) / name
        table = _table_of(keys, scores)
        write_atomic(path, lambda fh: pq.write_table(table, fh, **_WRITE_OPTIONS), binary=True)
        return path

    def _extend_vocab(self, setting: str, scores: TokenScores, warnings: list[str]) -> None:
        """Add the texts of the ids `scores` uses that the vocabulary lacks (lock held)."""
        try:
            vocab = self._vocab(setting)
        except (_Corrupt, PermissionError) as exc:
            path = self.setting_dir(setting) / VOCAB_FILE
            reason = exc.reason if isinstance(exc, _Corrupt) else str(exc)
            warnings.append(self._move_aside(setting, path, reason))
            vocab = _EMPTY_VOCAB
        used = np.unique(np.concatenate([scores.token_ids, scores.top_ids.reshape(-1)]))
        known = vocab.known
        inside = used[used < known.size]
        new = np.concatenate([inside[~known[inside]], used[used >= known.size]])
        if not new.size:
            return
        texts = {**dict(vocab.texts), **{i: scores.vocab[i] for i in new.tolist()}}
        ids = np.fromiter(sorted(texts), dtype=np.int32, count=len(texts))
        table = pa.Table.from_arrays(
            [pa.array(ids, pa.int32()), pa.array([texts[i] for i in ids.tolist()], pa.string())],
            schema=VOCAB_SCHEMA,
        )
        path = self.setting_dir(setting) / VOCAB_FILE
        write_atomic(path, lambda fh: pq.write_table(table, fh, **_VOCAB_OPTIONS), binary=True)

    def write(
        self,
        setting: str,
        keys: Sequence[str],
        scores: TokenScores,
        *,
        info: dict[str, Any] | None = None,
    ) -> list[str]:
        """Add rows (`keys[i]` is the content key of example i of `scores`, each key once) as a
        new fragment; past `MAX_FRAGMENTS`, merge the `MERGE_FAN_IN` smallest. Returns
        warnings about files that could not be read on the way."""
        if len(keys) != len(scores):
            raise ValueError(f"{len(keys)} keys for {len(scores)} examples")
        if len(set(keys)) != len(keys):
            raise ValueError("a key is given twice")
        warnings: list[str] = []
        if not len(scores):
            return warnings
        try:
            with self._lock(setting):
                folder = self.setting_dir(setting)
                if info is not None and not (folder / "setting.json").exists():
                    write_json_atomic(folder / "setting.json", {"schema": STORE_SCHEMA, **info})
                self._extend_vocab(setting, scores, warnings)
                self._write_fragment(setting, keys, scores)
                if len(self.fragments(setting)) > MAX_FRAGMENTS:
                    warnings += self._compact_locked(setting, smallest=MERGE_FAN_IN)
        except Timeout:
            raise LensError(
                f"the score store {self.setting_dir(setting)} is locked by another process"
            ) from None
        return warnings

    def compact(self, setting: str | None = None) -> list[str]:
        """Merge every fragment of `setting` (of every setting when None) into one, the newest
        row of each key kept. Returns warnings about files that could not be read."""
        warnings: list[str] = []
        for key in [setting] if setting else self.settings():
            try:
                with self._lock(key):
                    warnings += self._compact_locked(key, smallest=None)
            except Timeout:
                raise LensError(
                    f"the score store {self.setting_dir(key)} is locked by another process"
                ) from None
        return warnings

    def _compact_locked(self, setting: str, *, smallest: int | None) -> list[str]:
        """Merge the `smallest` smallest fragments (all when None); the setting's lock held."""
        warnings: list[str] = []
        folder = self.setting_dir(setting)
        now = time.time()
        for name in os.listdir(folder):
            if name.startswith(".part-") or name.startswith(f".{VOCAB_FILE}."):
                try:
                    if now - (folder / name).stat().st_mtime > _STALE_TEMP_S:
                        (folder / name).unlink()
                except FileNotFoundError:
                    pass
        paths = self.fragments(setting)
        if smallest is not None:
            sizes = {p: p.stat().st_size for p in paths}
            paths = sorted(sorted(paths, key=sizes.__getitem__)[:smallest])  # oldest first again
        if len(paths) < 2:
            return warnings
        try:
            vocab = self._vocab(setting)
        except _Corrupt as bad:
            return [self._move_aside(setting, bad.path, bad.reason)]
        parts: list[tuple[list[str], TokenScores]] = []
        merged: list[Path] = []
        for path in paths:
            try:
                keys, scores, _ = self._read_rows(path, self._index(path), None, vocab)
                parts.append((keys, scores))
                merged.append(path)
            except _Corrupt as bad:
                warnings.append(self._move_aside(setting, path, bad.reason))
            except PermissionError as exc:
                warnings.append(self._unreadable(path, exc))
            except FileNotFoundError:
                continue
        seen: set[str] = set()
        kept: list[tuple[list[str], TokenScores]] = []
        for keys, scores in reversed(parts):  # newest first: its row of a key wins
            rows = [i for i, key in enumerate(keys) if key not in seen]
            seen.update(keys)
            if len(rows) == len(keys):
                kept.append((keys, scores))
            elif rows:
                kept.append(([keys[i] for i in rows], scores.take(rows)))
        kept.reverse()  # oldest first again: rows stay in the order they were written
        keep_keys = [key for keys, _ in kept for key in keys]
        keep = [scores for _, scores in kept]
        if keep:
            self._write_fragment(setting, keep_keys, TokenScores.concat(keep))
        for path in merged:
            _forget(path)
            path.unlink(missing_ok=True)
        return warnings

    # ----------------------------------------------------------------- whole store

    def stored_keys(self, setting: str, keys: Iterable[str]) -> set[str]:
        """Which of `keys` the setting holds, from the fragments' key columns alone: nothing is
        decoded, written or moved (a fragment that cannot be read counts as holding none)."""
        wanted, found = set(keys), set()
        for path in self.fragments(setting):
            try:
                found |= wanted.intersection(self._index(path).rows)
            except (FileNotFoundError, PermissionError, _Corrupt):
                continue
        return found

    def setting_info(self, setting: str) -> dict[str, Any] | None:
        """What the setting is (its `setting.json`: model, template, convention, ...), or None
        when the file is missing or unreadable."""
        data = read_json(self.setting_dir(setting) / "setting.json")
        return data if isinstance(data, dict) else None

    def count(self) -> int:
        """Distinct (setting, example) rows stored."""
        total = 0
        for setting in self.settings():
            keys: set[str] = set()
            for path in self.fragments(setting):
                try:
                    keys.update(self._index(path).rows)
                except (FileNotFoundError, PermissionError, _Corrupt):
                    continue
            total += len(keys)
        return total

    def clear(self) -> None:
        """Remove every setting's files."""
        for setting in self.settings():
            with self._lock(setting):
                for path in [*self.fragments(setting), self.setting_dir(setting) / VOCAB_FILE]:
                    _forget(path)
                    path.unlink(missing_ok=True)
            shutil.rmtree(self.setting_dir(setting), ignore_errors=True)
