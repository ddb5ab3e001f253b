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

The dataset is columnar `TokenScores` (records convert once with `TokenScores.from_examples`).
Speed: build a `PplIndex` once (`PplIndex.from_scores`: concatenated perplexities plus offsets
and a few lazily cached orderings) and pass it to `compute_masks`; a tau change is then a few
vectorised numpy operations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from core.data.records import ScoredExample
from core.errors import LensError
from core.masking.config import MaskConfig, is_number
from core.scoring.tokens import TokenScores

IGNORE_INDEX = -100


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

    Build it once per scored dataset (``PplIndex.from_scores``) and reuse it for every tau,
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
        self._setup(ids, position, flat, offsets, lengths)

    def _setup(
        self,
        ids: list[str],
        position: dict[str, int],
        flat: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        bad_tokens = np.flatnonzero(np.isnan(flat) | (flat < 0))
        if bad_tokens.size:
            bad = int(np.searchsorted(offsets, bad_tokens[0], side="right")) - 1
            raise LensError(f"example {ids[bad]!r} has a NaN or negative token perplexity")
        self.ids: tuple[str, ...] = tuple(ids)
        self.ppl: np.ndarray = _readonly(flat)
        self.offsets: np.ndarray = _readonly(offsets)
        self.n_response: np.ndarray = _readonly(lengths)
        self.example_of: np.ndarray = _readonly(
            np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
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
    def from_scores(cls, scores: TokenScores) -> PplIndex:
        """Index columnar scores as they are (no per-example arrays): the same index as
        ``PplIndex(scores.ids, [scores.ppl_of(i) for i in range(len(scores))])``."""
        ids = [str(i) for i in scores.ids]
        position: dict[str, int] = {}
        for i, ex_id in enumerate(ids):
            if ex_id in position:
                raise LensError(f"duplicate example id {ex_id!r}; ids must be unique to mask")
            position[ex_id] = i
        index = cls.__new__(cls)
        flat = np.array(scores.ppl(), dtype=np.float64)
        offsets = np.array(scores.offsets, dtype=np.int64)
        index._setup(ids, position, flat, offsets, np.diff(offsets))
        return index

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
    if not is_number(share) or not 0 <= share <= 1:
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

    def mask_at(self, i: int) -> np.ndarray:
        """The response-token mask of example number ``i`` (a read-only view of ``flat``, without
        building every example's view as ``masks`` does)."""
        offsets = self.index.offsets
        return self.flat[offsets[i] : offsets[i + 1]]

    def mask_for(self, example_id: str) -> np.ndarray:
        """The response-token mask of one example, by id."""
        return self.masks[self.index.index_of(example_id)]

    def stats(self) -> MaskStats:
        """Pooled and per-example shares, counts and fully-masked examples."""
        return mask_stats(self)


def compute_masks(scores: TokenScores | PplIndex, config: MaskConfig) -> MaskResult:
    """Masks for every example (True = excluded from the loss) under ``config``.

    Pass a prebuilt `PplIndex` (`PplIndex.from_scores`) for speed when masks are recomputed
    interactively.
    """
    index = scores if isinstance(scores, PplIndex) else PplIndex.from_scores(scores)
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


def tau_grid() -> list[float]:
    """τ values the slider offers: fine near 1-10, where masks change most, coarser above."""
    parts = [
        np.arange(1.0, 2.0, 0.05),
        np.arange(2.0, 10.0, 0.1),
        np.arange(10.0, 20.0, 0.5),
        np.arange(20.0, 50.0, 1.0),
        np.arange(50.0, 100.0, 5.0),
        np.arange(100.0, 200.0, 10.0),
        np.arange(200.0, 1000.01, 50.0),
    ]
    return sorted({round(float(v), 2) for v in np.concatenate(parts)})


TAU_GRID = tau_grid()


def snap_tau(value: float) -> float:
    """The grid τ nearest to ``value`` on a log scale."""
    logs = np.log(np.asarray(TAU_GRID))
    return TAU_GRID[int(np.argmin(np.abs(logs - math.log(value))))]
