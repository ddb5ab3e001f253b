"""Selective Token Masking (STM) and its controls, as pure functions over scored examples.

A mask is a boolean array over an example's RESPONSE tokens (end-of-turn token included):
True means "masked", i.e. the token stays in the input but gets label -100 and so carries no
loss. Prompt and chat-template tokens are never trainable, whatever the mode; `labels_for` is the
one place that turns a mask into full-sequence training labels.

Modes (token perplexity ppl_i = exp(-logprob_i), see `ScoredExample.ppl_array`):

- ``high`` (STM): mask tokens with ppl > tau (strictly; a token with ppl == tau is kept).
- ``low``: mask tokens with ppl < tau (strictly).
- ``random``: per example, mask exactly as many tokens as ``high`` would at this tau, at random
  positions. The positions come from a per-example generator seeded by (seed, example id), so they
  do not depend on dataset order; for one seed the masks are nested (a lower tau masks a superset).
- ``percentile``: per example, mask k% of the response tokens: the highest-ppl ones (``top``), a
  random set (``random``, same per-example generator as mode ``random``) or the lowest-ppl ones
  (``bottom``). The count is round-half-up of k * n / 100, i.e. floor(k * n / 100 + 0.5). Equal
  ppl values are ordered by position: the earlier token is masked first, for top and bottom alike.

For ``high``/``low``/``random`` the threshold is either an absolute ``tau`` or a ``target_share``
of pooled response tokens to mask, from which `solve_tau_for_share` derives tau (``random`` solves
it as ``high`` does, because its count comes from ``high``).

Speed: build a `PplIndex` once (concatenated perplexities plus offsets and a few lazily cached
orderings) and pass it to `compute_masks`; a tau change is then a few vectorised numpy operations.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import platform
import secrets
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import __version__ as CORE_VERSION
from core.errors import LensError
from core.records import ScoredExample

MODES = ("high", "low", "random", "percentile")
PERCENTILE_RULES = ("top", "random", "bottom")
DEFAULT_TAU = 2.5
DEFAULT_K_PERCENT = 20.0
IGNORE_INDEX = -100
MANIFEST_VERSION = 1

MASKED_JSONL = "masked.jsonl"
HF_DATASET_DIR = "hf_dataset"
MANIFEST_JSON = "manifest.json"


# --------------------------------------------------------------------------- configuration


def _is_number(value: object) -> bool:
    """A real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class MaskConfig:
    """Which tokens to mask.

    ``tau`` and ``target_share`` are alternatives for modes high/low/random: give exactly one
    (``tau`` defaults to 2.5, so pass ``tau=None`` together with ``target_share``). Mode
    ``percentile`` uses ``percentile_rule`` and ``k_percent`` and ignores ``tau``; it rejects a
    ``target_share``. ``seed`` drives modes random and percentile/random only.
    """

    mode: str = "high"
    tau: float | None = DEFAULT_TAU
    target_share: float | None = None
    percentile_rule: str = "top"
    k_percent: float = DEFAULT_K_PERCENT
    seed: int = 0

    def __post_init__(self) -> None:
        self._validate()
        # normalise numpy scalars etc. to plain Python numbers (JSON-safe, hashable)
        if self.tau is not None:
            object.__setattr__(self, "tau", float(self.tau))
        if self.target_share is not None:
            object.__setattr__(self, "target_share", float(self.target_share))
        object.__setattr__(self, "k_percent", float(self.k_percent))
        object.__setattr__(self, "seed", int(self.seed))

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise LensError(f"unknown mask mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.tau is not None:
            if not _is_number(self.tau):
                raise LensError(f"tau must be a number, got {self.tau!r}")
            if not math.isfinite(self.tau) or self.tau <= 0:
                raise LensError(f"tau must be a finite number > 0, got {self.tau!r}")
        if self.target_share is not None:
            share = self.target_share
            if not _is_number(share):
                raise LensError(f"target share must be a number, got {share!r}")
            if not (0.0 <= share <= 1.0):
                raise LensError(f"target share must be between 0 and 1, got {share!r}")
        if self.percentile_rule not in PERCENTILE_RULES:
            raise LensError(
                f"unknown percentile rule {self.percentile_rule!r}; "
                f"choose one of {', '.join(PERCENTILE_RULES)}"
            )
        k = self.k_percent
        if not _is_number(k) or not (0.0 <= k <= 100.0):
            raise LensError(f"k_percent must be between 0 and 100, got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise LensError(f"seed must be an integer, got {self.seed!r}")
        if self.seed < 0:
            raise LensError(f"seed must be >= 0, got {self.seed}")
        if self.mode == "percentile":
            if self.target_share is not None:
                raise LensError("target share does not apply to mode percentile; use k_percent")
        else:
            if self.tau is not None and self.target_share is not None:
                raise LensError("give either tau or target share, not both (set tau=None)")
            if self.tau is None and self.target_share is None:
                raise LensError(f"mode {self.mode} needs a tau or a target share")

    @property
    def uses_tau(self) -> bool:
        """True for the modes that threshold on perplexity (high, low, random)."""
        return self.mode != "percentile"

    def describe(self) -> str:
        """Short human-readable label, e.g. 'high, tau=2.5' or 'percentile top 20%'."""
        if self.mode == "percentile":
            return f"percentile {self.percentile_rule} {self.k_percent:g}%"
        if self.target_share is not None:
            return f"{self.mode}, target share={self.target_share:g}"
        return f"{self.mode}, tau={self.tau:g}"


# --------------------------------------------------------------------------- index


def _example_rng(seed: int, example_id: str) -> np.random.Generator:
    """Per-example generator: SeedSequence([seed, w0, w1, w2, w3]) with w = sha256(id) words.

    The four words are the first 16 bytes of sha256(id as UTF-8), read as little-endian uint32.
    Depending only on (seed, id) makes random masks independent of dataset order.
    """
    digest = hashlib.sha256(example_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


class PplIndex:
    """All response-token perplexities of a dataset, concatenated, plus per-example offsets.

    Build it once per scored dataset (``PplIndex.from_examples``) and reuse it for every tau,
    mode and seed. Orderings needed by some modes (sorted values, per-example ranks, per-seed
    random ranks) are computed on first use and cached. Arrays are read-only.
    """

    def __init__(self, ids: Sequence[str], ppls: Sequence[np.ndarray]) -> None:
        """Index per-example perplexity arrays; ``ids`` must be unique and match ``ppls``."""
        ids = [str(i) for i in ids]
        if len(ids) != len(ppls):
            raise LensError(f"{len(ids)} ids but {len(ppls)} perplexity arrays")
        position: dict[str, int] = {}
        for i, ex_id in enumerate(ids):
            if ex_id in position:
                raise LensError(f"duplicate example id {ex_id!r}; ids must be unique to mask")
            position[ex_id] = i
        arrays = [np.asarray(p, dtype=np.float64).reshape(-1) for p in ppls]
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float64)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        bad_tokens = np.flatnonzero(np.isnan(flat) | (flat < 0))
        if bad_tokens.size:
            bad = int(np.searchsorted(offsets, bad_tokens[0], side="right")) - 1
            raise LensError(f"example {ids[bad]!r} has a NaN or negative token perplexity")
        self.ids: tuple[str, ...] = tuple(ids)
        self.ppl: np.ndarray = _readonly(flat)
        self.offsets: np.ndarray = _readonly(offsets)
        self.n_response: np.ndarray = _readonly(lengths)
        self.example_of: np.ndarray = _readonly(
            np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
        )
        self.position: np.ndarray = _readonly(
            np.arange(flat.size, dtype=np.int64) - offsets[:-1][self.example_of]
        )
        self._pos_of_id = position
        self._unique: tuple[np.ndarray, np.ndarray] | None = None
        self._sorted: np.ndarray | None = None
        self._rank_top: np.ndarray | None = None
        self._rank_bottom: np.ndarray | None = None
        self._rank_random: dict[int, np.ndarray] = {}
        self._candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._nonempty = _readonly(np.flatnonzero(lengths > 0))
        self._nonempty_starts = _readonly(offsets[:-1][self._nonempty])

    @classmethod
    def from_examples(cls, examples: Sequence[ScoredExample]) -> PplIndex:
        """Index the response-token perplexities of scored examples (in the given order)."""
        ppls = []
        for ex in examples:
            if len(ex.logprob) != ex.n_response:
                raise LensError(
                    f"example {ex.id!r}: {len(ex.logprob)} log-probs for {ex.n_response} "
                    "response tokens"
                )
            ppls.append(ex.ppl_array())
        return cls([ex.id for ex in examples], ppls)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        """Response tokens pooled over the dataset (the denominator of every pooled share)."""
        return int(self.ppl.size)

    def index_of(self, example_id: str) -> int:
        """Position of an example id in this index."""
        try:
            return self._pos_of_id[example_id]
        except KeyError:
            raise LensError(f"unknown example id {example_id!r}") from None

    def ppl_of(self, i: int) -> np.ndarray:
        """Response-token perplexities of example number ``i`` (a read-only view)."""
        return self.ppl[self.offsets[i] : self.offsets[i + 1]]

    def sorted_ppl(self) -> np.ndarray:
        """All perplexities, ascending (cached)."""
        if self._sorted is None:
            self._sorted = _readonly(np.sort(self.ppl))
        return self._sorted

    def unique_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct perplexity values (ascending) and how often each occurs (cached)."""
        if self._unique is None:
            values, counts = np.unique(self.sorted_ppl(), return_counts=True)
            self._unique = (_readonly(values), _readonly(counts.astype(np.int64)))
        return self._unique

    def _within_example_rank(self, order: np.ndarray) -> np.ndarray:
        """Turn a global order (grouped by example) into per-token ranks within each example."""
        rank = np.empty(self.ppl.size, dtype=np.int64)
        rank[order] = np.arange(self.ppl.size, dtype=np.int64)
        rank -= self.offsets[:-1][self.example_of]
        return _readonly(rank.astype(np.int32))

    def rank_top(self) -> np.ndarray:
        """Rank of each token within its example by descending ppl, ties by position (cached)."""
        if self._rank_top is None:
            order = np.lexsort((self.position, -self.ppl, self.example_of))
            self._rank_top = self._within_example_rank(order)
        return self._rank_top

    def rank_bottom(self) -> np.ndarray:
        """Rank of each token within its example by ascending ppl, ties by position (cached)."""
        if self._rank_bottom is None:
            order = np.lexsort((self.position, self.ppl, self.example_of))
            self._rank_bottom = self._within_example_rank(order)
        return self._rank_bottom

    def rank_random(self, seed: int) -> np.ndarray:
        """Random rank of each token within its example from (seed, example id) (cached per seed).

        Token at position ``p`` of an example of length n gets rank r where
        ``_example_rng(seed, id).permutation(n)[r] == p``; a count c masks ranks < c.
        """
        seed = int(seed)
        cached = self._rank_random.get(seed)
        if cached is None:
            rank = np.empty(self.ppl.size, dtype=np.int32)
            for i, ex_id in enumerate(self.ids):
                start, n = int(self.offsets[i]), int(self.n_response[i])
                if n == 0:
                    continue
                perm = _example_rng(seed, ex_id).permutation(n)
                rank[start + perm] = np.arange(n, dtype=np.int32)
            cached = _readonly(rank)
            self._rank_random[seed] = cached
        return cached

    def tau_candidates(self, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Reachable masked counts (ascending) and a tau for each, for high or low (cached)."""
        cached = self._candidates.get(mode)
        if cached is None:
            values, counts = self.unique_counts()
            masked, taus = _tau_candidates(values, counts, mode)
            cached = (_readonly(masked), _readonly(taus))
            self._candidates[mode] = cached
        return cached

    def per_example_sum(self, flags: np.ndarray) -> np.ndarray:
        """Per-example count of True in a boolean array aligned with ``ppl``."""
        out = np.zeros(len(self.ids), dtype=np.int64)
        if self._nonempty_starts.size:
            out[self._nonempty] = np.add.reduceat(
                flags.view(np.uint8), self._nonempty_starts, dtype=np.int64
            )
        return out


def _as_index(data: Sequence[ScoredExample] | PplIndex) -> PplIndex:
    if isinstance(data, PplIndex):
        return data
    return PplIndex.from_examples(data)


# --------------------------------------------------------------------------- solving tau


def _tau_candidates(
    values: np.ndarray, counts: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Every reachable masked count for ``mode`` (ascending) with one representative tau each.

    ``values`` are the distinct perplexities ascending, ``counts`` their multiplicities. For high,
    any tau in [u_j, u_{j+1}) masks the values above u_j; for low, tau in (u_j, u_{j+1}] masks
    the values up to u_j. The representative is the midpoint of the interval (robust to float
    round-off when the tau is stored and reapplied), falling back to an endpoint that is inside.
    Counts that no finite positive tau reaches (e.g. keeping an infinite ppl in mode high) are
    left out.
    """
    if values.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    n = int(counts.sum())
    cum = np.cumsum(counts)
    u = values
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = u[:-1], u[1:]
        mid = lo + (hi - lo) / 2.0
    if mode == "high":
        masked = np.concatenate([[n], n - cum])
        inner = np.where(np.isfinite(mid) & (mid >= lo) & (mid < hi), mid, lo)
        with np.errstate(over="ignore"):
            first = u[:1] / 2.0
        taus = np.concatenate([first, inner, u[-1:]])
        ok = np.isfinite(taus) & (taus > 0)
        ok[0] &= bool(first[0] < u[0])
    else:
        masked = np.concatenate([[0], cum])
        above_lo = np.where(np.isfinite(hi), hi, np.nextafter(lo, np.inf))
        inner = np.where(np.isfinite(mid) & (mid > lo) & (mid <= hi), mid, above_lo)
        top = float(u[-1])
        if top == 0.0:
            last = 1.0
        else:
            last = top * 2.0
            if not math.isfinite(last):
                last = float(np.nextafter(top, np.inf))
        taus = np.concatenate([u[:1], inner, [last]])
        ok = np.isfinite(taus) & (taus > 0)
        ok[-1] &= bool(taus[-1] > top)
    masked, taus = masked[ok].astype(np.int64), taus[ok].astype(np.float64)
    if mode == "high":
        masked, taus = masked[::-1].copy(), taus[::-1].copy()
    return masked, taus


def solve_tau_for_share(
    ppls: Sequence[np.ndarray] | np.ndarray | PplIndex, share: float, mode: str = "high"
) -> float:
    """A tau whose pooled masked share (mode ``high`` or ``low``) is as close as possible to share.

    The requested count is ``share * N`` over the N pooled response tokens. Among all counts a
    tau can produce, the one nearest to it is chosen (on a tie, the smaller count), so with
    distinct perplexities the result is within half a token of the request. Equal perplexities
    are masked or kept together, so when many tokens share a value the exact count can be
    unreachable and the result is the nearest reachable count (possibly more than one token off);
    read the achieved share from `MaskStats`. The returned tau is the midpoint between the two
    neighbouring distinct perplexities, so ``compute_masks`` with it reproduces that count.
    """
    if mode not in ("high", "low"):
        raise LensError(f"can only solve tau for mode high or low, got {mode!r}")
    if not _is_number(share) or not 0 <= share <= 1:
        raise LensError(f"target share must be between 0 and 1, got {share!r}")
    if isinstance(ppls, PplIndex):
        n = ppls.n_tokens
        masked, taus = ppls.tau_candidates(mode) if n else (np.zeros(0), np.zeros(0))
    else:
        if isinstance(ppls, np.ndarray):
            flat = np.asarray(ppls, dtype=np.float64).reshape(-1)
        else:
            parts = [np.asarray(p, dtype=np.float64).reshape(-1) for p in ppls]
            flat = np.concatenate(parts) if parts else np.zeros(0)
        if np.isnan(flat).any():
            raise LensError("token perplexities contain NaN; rescore before masking")
        values, counts = np.unique(flat, return_counts=True)
        n = int(flat.size)
        masked, taus = _tau_candidates(values, counts, mode)
    if n == 0:
        raise LensError("no response tokens to solve a tau for")
    if masked.size == 0:
        raise LensError("no finite positive tau can mask any share of these perplexities")
    # masked is strictly increasing: the nearest count is one of the two around the target;
    # on a tie the smaller count wins.
    target = float(share) * n
    i = int(np.searchsorted(masked, target))
    if i == masked.size or (i > 0 and target - masked[i - 1] <= masked[i] - target):
        i -= 1
    return float(taus[i])


# --------------------------------------------------------------------------- masks and stats


@dataclass(frozen=True, eq=False)
class MaskStats:
    """How much a mask removes, pooled and per example.

    Shares are over response tokens (end-of-turn included). ``pooled_share`` is NaN for a dataset
    with no response tokens; ``per_example_share`` is NaN for an example with no response tokens.
    An example is "fully masked" when it has no trainable token left (every response token
    masked, or no response tokens at all): it carries no loss and some trainers drop it silently.
    """

    ids: tuple[str, ...]
    n_examples: int
    n_response_tokens: int
    n_masked: int
    n_kept: int
    pooled_share: float
    per_example_n_response: np.ndarray
    per_example_n_masked: np.ndarray
    per_example_share: np.ndarray
    n_fully_masked: int
    fully_masked_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals (no per-example arrays), as written to the export manifest."""
        return {
            "n_examples": self.n_examples,
            "n_response_tokens": self.n_response_tokens,
            "n_masked": self.n_masked,
            "n_kept": self.n_kept,
            "pooled_share": None if math.isnan(self.pooled_share) else self.pooled_share,
            "n_fully_masked": self.n_fully_masked,
            "fully_masked_ids": list(self.fully_masked_ids),
        }

    def per_example_frame(self) -> pd.DataFrame:
        """One row per example: id, n_response, n_masked, share, fully_masked."""
        kept = self.per_example_n_response - self.per_example_n_masked
        return pd.DataFrame(
            {
                "id": list(self.ids),
                "n_response": self.per_example_n_response,
                "n_masked": self.per_example_n_masked,
                "share": self.per_example_share,
                "fully_masked": kept == 0,
            }
        )

    @staticmethod
    def share_vs_tau_curve(
        ppl_index: PplIndex, taus: Sequence[float] | np.ndarray, mode: str = "high"
    ) -> pd.DataFrame:
        """Same as the module-level `share_vs_tau_curve`."""
        return share_vs_tau_curve(ppl_index, taus, mode)


@dataclass(frozen=True, eq=False)
class MaskResult:
    """Masks of one dataset under one config.

    ``flat`` is the concatenated boolean mask over all response tokens (aligned with
    ``index.ppl``); ``masks[i]`` is example i's read-only view of it, True = masked (label -100).
    ``tau`` is the resolved threshold (solved from ``config.target_share`` if that was given),
    None for mode percentile.
    """

    config: MaskConfig
    tau: float | None
    index: PplIndex
    flat: np.ndarray

    @cached_property
    def masks(self) -> tuple[np.ndarray, ...]:
        """Per-example read-only views of ``flat`` (built on first access)."""
        if not len(self.index):
            return ()
        return tuple(np.split(self.flat, self.index.offsets[1:-1]))

    @property
    def ids(self) -> tuple[str, ...]:
        """Example ids, in the order of ``masks``."""
        return self.index.ids

    def __len__(self) -> int:
        return len(self.index)

    def mask_for(self, example_id: str) -> np.ndarray:
        """The response-token mask of one example, by id."""
        return self.masks[self.index.index_of(example_id)]

    def stats(self) -> MaskStats:
        """Pooled and per-example shares, counts and fully-masked examples."""
        return mask_stats(self)


def compute_masks(examples: Sequence[ScoredExample] | PplIndex, config: MaskConfig) -> MaskResult:
    """Masks for every example (True = excluded from the loss) under ``config``.

    Pass a prebuilt `PplIndex` for speed when masks are recomputed interactively.
    """
    index = _as_index(examples)
    ppl = index.ppl
    tau: float | None = None
    if config.uses_tau:
        if config.target_share is not None:
            solve_mode = "low" if config.mode == "low" else "high"
            tau = solve_tau_for_share(index, config.target_share, solve_mode)
        else:
            tau = float(config.tau)  # type: ignore[arg-type]
    if config.mode == "high":
        flat = ppl > tau
    elif config.mode == "low":
        flat = ppl < tau
    elif config.mode == "random":
        counts = index.per_example_sum(ppl > tau)
        flat = index.rank_random(config.seed) < np.repeat(counts.astype(np.int32), index.n_response)
    else:
        k_count = np.floor(config.k_percent * index.n_response / 100.0 + 0.5).astype(np.int64)
        k_count = np.minimum(k_count, index.n_response)
        if config.percentile_rule == "top":
            rank = index.rank_top()
        elif config.percentile_rule == "bottom":
            rank = index.rank_bottom()
        else:
            rank = index.rank_random(config.seed)
        flat = rank < np.repeat(k_count.astype(np.int32), index.n_response)
    flat = _readonly(np.ascontiguousarray(flat, dtype=bool))
    return MaskResult(config=config, tau=tau, index=index, flat=flat)


def mask_stats(result: MaskResult) -> MaskStats:
    """Pooled share masked, per-example shares, kept/masked counts, fully-masked examples."""
    index = result.index
    per_masked = index.per_example_sum(result.flat)
    per_n = np.asarray(index.n_response)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_share = np.where(per_n > 0, per_masked / np.maximum(per_n, 1), np.nan)
    total = index.n_tokens
    n_masked = int(per_masked.sum())
    full = np.flatnonzero(per_n - per_masked == 0)
    return MaskStats(
        ids=index.ids,
        n_examples=len(index),
        n_response_tokens=total,
        n_masked=n_masked,
        n_kept=total - n_masked,
        pooled_share=(n_masked / total) if total else float("nan"),
        per_example_n_response=per_n,
        per_example_n_masked=per_masked,
        per_example_share=per_share,
        n_fully_masked=int(full.size),
        fully_masked_ids=[index.ids[i] for i in full],
    )


def share_vs_tau_curve(
    ppl_index: PplIndex, taus: Sequence[float] | np.ndarray, mode: str = "high"
) -> pd.DataFrame:
    """Pooled masked share at each tau, for the mask-share-vs-tau chart (columns tau, share).

    Mode ``high`` counts ppl > tau (non-increasing in tau), ``low`` counts ppl < tau
    (non-decreasing). Mode ``random`` masks as many tokens as ``high``, so use ``high`` for it.
    """
    if mode not in ("high", "low"):
        raise LensError(f"the share-vs-tau curve is defined for mode high or low, got {mode!r}")
    tau_arr = np.asarray(taus, dtype=np.float64).reshape(-1)
    s = ppl_index.sorted_ppl()
    n = s.size
    if mode == "high":
        count = n - np.searchsorted(s, tau_arr, side="right")
    else:
        count = np.searchsorted(s, tau_arr, side="left")
    share = count / n if n else np.full(tau_arr.shape, np.nan)
    return pd.DataFrame({"tau": tau_arr, "share": share})


# --------------------------------------------------------------------------- labels


def labels_for(example: ScoredExample, masked: np.ndarray) -> list[int]:
    """Full-sequence training labels: -100 at prompt/template and masked positions, else the id.

    ``masked`` is the example's response-token mask (length ``example.n_response``). This is the
    only place a mask becomes labels.
    """
    mask = np.asarray(masked)
    if mask.dtype != np.bool_:
        raise LensError(f"example {example.id!r}: mask must be boolean, got {mask.dtype}")
    if mask.shape != (example.n_response,):
        raise LensError(
            f"example {example.id!r}: mask has {mask.size} entries for "
            f"{example.n_response} response tokens"
        )
    if not 0 <= example.response_start <= len(example.token_ids):
        raise LensError(f"example {example.id!r}: response_start is outside the token ids")
    ids = np.asarray(example.token_ids[example.response_start :], dtype=np.int64)
    response = np.where(mask, IGNORE_INDEX, ids)
    return [IGNORE_INDEX] * example.response_start + response.tolist()


# --------------------------------------------------------------------------- export


def _check_alignment(examples: Sequence[ScoredExample], result: MaskResult) -> None:
    if len(examples) != len(result):
        raise LensError(f"{len(examples)} examples but masks for {len(result)}")
    for ex, ex_id, mask in zip(examples, result.ids, result.masks, strict=True):
        if ex.id != ex_id:
            raise LensError(f"examples and masks are in a different order ({ex.id!r} vs {ex_id!r})")
        if mask.size != ex.n_response:
            raise LensError(f"example {ex.id!r}: mask length does not match its response")
    for i, ex in enumerate(examples):
        if not np.array_equal(ex.ppl_array(), result.index.ppl_of(i)):
            raise LensError(f"example {ex.id!r}: masks were computed from different scores")


def masked_rows(examples: Sequence[ScoredExample], result: MaskResult) -> list[dict[str, Any]]:
    """The export rows: id, messages, input_ids, labels, response_start, n_response, n_masked."""
    _check_alignment(examples, result)
    rows = []
    for ex, mask in zip(examples, result.masks, strict=True):
        rows.append(
            {
                "id": ex.id,
                "messages": [
                    {"role": "user", "content": ex.prompt},
                    {"role": "assistant", "content": ex.response},
                ],
                "input_ids": [int(t) for t in ex.token_ids],
                "labels": labels_for(ex, mask),
                "response_start": int(ex.response_start),
                "n_response": int(ex.n_response),
                "n_masked": int(mask.sum()),
            }
        )
    return rows


def _jsonl_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def masked_jsonl_bytes(examples: Sequence[ScoredExample], result: MaskResult) -> bytes:
    """The ``masked.jsonl`` content of an export (UTF-8, one `masked_rows` row per line)."""
    return _jsonl_bytes(masked_rows(examples, result))


def scores_fingerprint(examples: Sequence[ScoredExample]) -> str:
    """sha256 of the scored examples' content (ids, texts, token ids, scores, in order).

    Computed from each record's canonical JSON, so scores read back from a ``score`` JSONL and
    the same scores taken from the app's cache give the same fingerprint: the manifest's
    ``source_fingerprint`` identifies what was masked, whichever way it was produced.
    """
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _build_manifest(
    result: MaskResult, stats: MaskStats, extra: Mapping[str, Any] | None, content_sha: str
) -> dict[str, Any]:
    cfg = result.config
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "mode": cfg.mode,
        "tau": result.tau,
        "target_share": cfg.target_share,
        "percentile_rule": cfg.percentile_rule if cfg.mode == "percentile" else None,
        "k_percent": cfg.k_percent if cfg.mode == "percentile" else None,
        "seed": int(cfg.seed),
        **stats.summary(),
        "share_denominator": "response tokens pooled over the dataset, end-of-turn included",
        "files": {"jsonl": MASKED_JSONL, "hf_dataset": HF_DATASET_DIR},
        "masked_jsonl_sha256": content_sha,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "core_version": CORE_VERSION,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise LensError(f"manifest_extra key {key!r} clashes with a built-in manifest field")
        manifest[key] = value
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LensError(f"manifest_extra is not JSON-serialisable: {err}") from None
    return manifest


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _make_sibling_dir(out: Path, kind: str) -> Path:
    """Create a fresh hidden directory next to ``out`` (``.<name>.<kind>-<random>``).

    Plain ``mkdir`` rather than ``tempfile.mkdtemp``: the temporary folder becomes the export,
    which should get ordinary permissions (0777 minus the umask), not mkdtemp's private 0700.
    """
    for _ in range(100):
        candidate = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {out}")


def _prepare_target(out: Path, overwrite: bool) -> bool:
    """Check whether ``out`` may be written; return True if an existing export is replaced."""
    if out.exists() and not out.is_dir():
        raise LensError(f"{out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise LensError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
    if not (out / MANIFEST_JSON).is_file():
        raise LensError(f"{out} is not empty and is not a masked export; refusing to replace it")
    return True


def export_masked_dataset(
    examples: Sequence[ScoredExample],
    mask_result: MaskResult,
    out_dir: str | os.PathLike[str],
    manifest_extra: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``masked.jsonl``, ``hf_dataset/`` and ``manifest.json`` into ``out_dir`` atomically.

    Everything is written to a temporary sibling directory that is renamed into place at the
    end, so ``out_dir`` is either absent/unchanged or a complete export. An existing non-empty
    ``out_dir`` is refused unless ``overwrite=True``, and even then only if it holds a previous
    export (a ``manifest.json``), never an arbitrary directory. Returns ``out_dir``.
    """
    import datasets  # heavy import, only needed here

    out = Path(out_dir).expanduser().absolute()
    _prepare_target(out, overwrite)
    rows = masked_rows(examples, mask_result)
    stats = mask_stats(mask_result)
    jsonl = _jsonl_bytes(rows)
    manifest = _build_manifest(
        mask_result, stats, manifest_extra, hashlib.sha256(jsonl).hexdigest()
    )

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_sibling_dir(out, "tmp")
    except OSError as err:
        raise LensError(f"cannot write into {out.parent}: {err.strerror or err}") from None
    backup: Path | None = None
    try:
        _fsync_write(tmp / MASKED_JSONL, jsonl)
        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp / HF_DATASET_DIR))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()
        _fsync_write(
            tmp / MANIFEST_JSON,
            (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode(
                "utf-8"
            ),
        )
        if _prepare_target(out, overwrite):
            backup = _make_sibling_dir(out, "old")
            backup.rmdir()
            os.rename(out, backup)
        elif out.exists():
            out.rmdir()  # empty directory
        try:
            os.rename(tmp, out)
        except OSError:
            if backup is not None:
                os.rename(backup, out)
                backup = None
            raise
    except LensError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LensError(f"could not write the export to {out}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return out


def load_masked_dataset(
    out_dir: str | os.PathLike[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read an export back: the ``masked.jsonl`` rows and the manifest."""
    out = Path(out_dir).expanduser()
    manifest_path, jsonl_path = out / MANIFEST_JSON, out / MASKED_JSONL
    if not manifest_path.is_file() or not jsonl_path.is_file():
        raise LensError(f"{out} is not a masked export (no {MANIFEST_JSON} or {MASKED_JSONL})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LensError(f"{manifest_path}: not valid JSON ({err.msg})") from None
    rows = []
    with open(jsonl_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LensError(f"{jsonl_path}:{lineno}: not valid JSON ({err.msg})") from None
    if manifest.get("n_examples") is not None and manifest["n_examples"] != len(rows):
        raise LensError(
            f"{out}: manifest lists {manifest['n_examples']} examples but the file has {len(rows)}"
        )
    return rows, manifest


# --------------------------------------------------------------------------- CLI entry


def read_scores_jsonl(scores_path: str | os.PathLike[str]) -> list[ScoredExample]:
    """Read a scores JSONL (one ``ScoredExample.to_json_row()`` per line) into records."""
    return _read_scores(scores_path)[0]


def _read_scores(scores_path: str | os.PathLike[str]) -> tuple[list[ScoredExample], list[str]]:
    """The records of a scores JSONL and the distinct scoring models its rows name.

    ``python -m core score`` writes a ``model`` field (fingerprint and dtype of the scorer) on
    every row; files from elsewhere may lack it, and then the model list is empty.
    """
    path = Path(scores_path).expanduser()
    if not path.is_file():
        raise LensError(f"scores file not found: {path}")
    required = ("id", "token_ids", "response_start", "logprob")
    examples: list[ScoredExample] = []
    models: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise LensError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(data, dict):
                raise LensError(f"{path}:{lineno}: expected a JSON object per line")
            missing = [k for k in required if k not in data]
            if missing:
                raise LensError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            try:
                ex = ScoredExample.from_dict(data)
            except TypeError as err:
                raise LensError(f"{path}:{lineno}: not a scored example ({err})") from None
            if len(ex.logprob) != ex.n_response:
                raise LensError(
                    f"{path}:{lineno}: {len(ex.logprob)} log-probs for {ex.n_response} "
                    "response tokens"
                )
            examples.append(ex)
            if data.get("model"):
                models.add(str(data["model"]))
    if not examples:
        raise LensError(f"{path}: no scored examples")
    return examples, sorted(models)


def mask_cli_command(
    scores_path: str, out_dir: str, config: MaskConfig, *, overwrite: bool = False
) -> str:
    """The ``python -m core mask`` command line that reproduces ``config`` on a scores file.

    Numbers are written with ``repr`` so they parse back to exactly the same floats; a target
    share is passed as ``--share`` (solving tau is deterministic, so the masks are the same).
    """
    args = ["python", "-m", "core", "mask", "--scores", scores_path, "--mode", config.mode]
    if config.mode == "percentile":
        args += ["--k-percent", repr(config.k_percent), "--percentile-rule", config.percentile_rule]
    elif config.target_share is not None:
        args += ["--share", repr(config.target_share)]
    else:
        args += ["--tau", repr(config.tau)]
    if config.mode == "random" or (
        config.mode == "percentile" and config.percentile_rule == "random"
    ):
        args += ["--seed", str(config.seed)]
    args += ["--out", out_dir]
    if overwrite:
        args.append("--overwrite")
    return shlex.join(args)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_mask_cli(
    scores_path: str,
    out_dir: str,
    tau: float | None,
    share: float | None,
    mode: str,
    k_percent: float | None,
    percentile_rule: str,
    seed: int,
    overwrite: bool,
) -> dict[str, Any]:
    """``python -m core mask``: read scores, mask, export; return the written manifest.

    For high/low/random, give ``tau`` or ``share`` (neither means tau = 2.5). For percentile,
    ``k_percent`` is required and ``tau``/``share`` must be left out. The manifest records the
    scoring ``model`` (from the rows' ``model`` field; None for files that lack it; scores of
    several models are refused), the ``source_fingerprint`` (`scores_fingerprint`) and the
    scores file's path and sha256.
    """
    if mode not in MODES:
        raise LensError(f"unknown mask mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "percentile":
        if tau is not None or share is not None:
            raise LensError("--tau/--share do not apply to --mode percentile; use --k-percent")
        if k_percent is None:
            raise LensError("--mode percentile needs --k-percent")
        config = MaskConfig(
            mode=mode, k_percent=k_percent, percentile_rule=percentile_rule, seed=seed
        )
    else:
        if k_percent is not None:
            raise LensError("--k-percent only applies to --mode percentile")
        if tau is not None and share is not None:
            raise LensError("give either --tau or --share, not both")
        if share is not None:
            config = MaskConfig(mode=mode, tau=None, target_share=share, seed=seed)
        else:
            config = MaskConfig(mode=mode, tau=DEFAULT_TAU if tau is None else tau, seed=seed)
    examples, models = _read_scores(scores_path)
    if len(models) > 1:
        raise LensError(
            f"the scores come from {len(models)} different models ({', '.join(models)}); "
            "perplexities of different models are not comparable, so mask each file separately"
        )
    result = compute_masks(examples, config)
    path = Path(scores_path).expanduser()
    extra = {
        "model": models[0] if models else None,
        "source_fingerprint": scores_fingerprint(examples),
        "source_scores_path": str(path.absolute()),
        "source_scores_sha256": _file_sha256(path),
        "conventions": sorted({ex.convention for ex in examples}),
        "sources": sorted({ex.source for ex in examples}),
    }
    out = export_masked_dataset(examples, result, out_dir, extra, overwrite=overwrite)
    return load_masked_dataset(out)[1]
