"""Columnar score store vs the old SQLite/JSON cache, on synthetic scores (no model).

Fills the store with random token ids and log-probs (about 200 response tokens and 100 prompt
tokens per example, top-5, a 49k vocabulary) at 1k / 3k / 10k examples, appending 16 examples at
a time as `score_examples` does (one scoring batch per append, compactions included), and the old
`scores.sqlite` cache (`LegacyScoreCache`) at 1k as the baseline. Each measurement runs in a
fresh process (so the resident memory is that of one reader), and reports:

- write: all appends, then `compact` (old: `put_many` per batch of 16);
- disk: bytes on disk after writing;
- open + first: a new cache object (nothing cached in the process) reading one example as a
  `ScoredExample` record;
- read all: every example into memory (store: columnar `TokenScores`; old: records);
- mask stats: `PplIndex` + `compute_masks(tau=2.5)` + `stats()` over all examples;
- share vs tau: `core.scoring.analytics.share_vs_tau` on the Explore page's 120-point grid (old:
  the list-based version in tests/reference_analytics.py);
- RSS: VmRSS of the reader process after all of the above, and its peak (VmHWM).

    python bench/bench_score_store.py                 # 1k, 3k, 10k (+ old at 1k)
    python bench/bench_score_store.py --sizes 1000    # fewer sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 49152
TOP_K = 5
BATCH = 16  # examples per append: one scoring batch
TAU = 2.5
GRID = np.geomspace(1.05, 1000, 120)


def _rss() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def synthetic(n: int, seed: int = 0):
    """`TokenScores` of n random examples (model-like: float32 log-probs, sorted top-k)."""
    from core.scoring.tokens import TokenScores, _offsets

    rng = np.random.default_rng(seed)
    n_resp = rng.integers(150, 251, n)
    n_prompt = rng.integers(60, 141, n)
    tok_offsets = _offsets(n_prompt + n_resp)
    offsets = _offsets(n_resp)
    r = int(offsets[-1])
    logprob = (-rng.exponential(1.2, r)).astype(np.float32).astype(np.float64)
    top_lp = np.sort(-rng.exponential(2.0, (r, TOP_K)).astype(np.float32), axis=1)[:, ::-1]
    return TokenScores(
        ids=tuple(f"ex{i}" for i in range(n)),
        prompts=tuple(f"Write a function number {i} that does something." for i in range(n)),
        responses=tuple(f"def f{i}(x):\n    return x * {i}\n" for i in range(n)),
        conventions=("prompt",) * n,
        token_ids=rng.integers(0, VOCAB, int(tok_offsets[-1])).astype(np.int32),
        token_offsets=tok_offsets,
        response_start=n_prompt.astype(np.int32),
        logprob=logprob,
        offsets=offsets,
        rank=rng.geometric(0.4, r).astype(np.int32),
        top_ids=rng.integers(0, VOCAB, (r, TOP_K)).astype(np.int32),
        top_logprobs=np.ascontiguousarray(top_lp),
        truncated=np.zeros(n, dtype=bool),
        vocab={i: f"\u0120w{i}" for i in range(VOCAB)},
    )


def _setting():
    from core.scoring.cache import ScoreSetting

    return ScoreSetting("synthetic-model|float32", "template", "prompt", 2048, TOP_K)


def _old_key(rec) -> str:
    from core.scoring.legacy import score_key

    s = _setting()
    return score_key(s.model_key, s.template_fp, s.convention, s.max_length, s.top_k, rec)


def _disk(path: Path) -> int:
    if path.is_file():
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def phase_write(backend: str, n: int, path: Path) -> dict:
    from core.scoring.cache import ScoreCache
    from core.scoring.legacy import LegacyScoreCache

    scores = synthetic(n)
    out: dict = {}
    if backend == "store":
        cache = ScoreCache(path)
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            cache.put(_setting(), scores.take(range(start, min(n, start + BATCH))))
        t1 = time.perf_counter()
        cache.compact()
        out["write_s"] = time.perf_counter() - t0
        out["appends_s"] = t1 - t0
    else:
        records = scores.to_examples()
        old = LegacyScoreCache(path)
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            old.put_many({_old_key(r): r for r in records[start : start + BATCH]})
        out["write_s"] = time.perf_counter() - t0
    out["disk_bytes"] = _disk(path)
    return out


def phase_read(backend: str, n: int, path: Path) -> dict:
    from core.data.records import Example
    from core.masking.rules import MaskConfig, PplIndex, compute_masks
    from core.scoring import analytics
    from core.scoring.cache import ScoreCache
    from core.scoring.legacy import LegacyScoreCache
    from tests.reference_analytics import share_vs_tau_reference

    rss_start, _ = _rss()
    examples = [
        Example(
            f"ex{i}",
            f"Write a function number {i} that does something.",
            f"def f{i}(x):\n    return x * {i}\n",
        )
        for i in range(n)
    ]
    out: dict = {}
    setting = _setting()
    t0 = time.perf_counter()
    if backend == "store":
        first = ScoreCache(path).lookup(setting, examples[:1]).scores.example(0)
    else:
        first = LegacyScoreCache(path).get(_old_key(examples[0]))
    out["open_first_s"] = time.perf_counter() - t0
    assert first is not None and first.id == "ex0"
    t0 = time.perf_counter()
    if backend == "store":
        data = ScoreCache(path).lookup(setting, examples).scores
    else:
        found = LegacyScoreCache(path).get_many([_old_key(ex) for ex in examples])
        data = [found[_old_key(ex)] for ex in examples]
    out["read_all_s"] = time.perf_counter() - t0
    assert len(data) == n
    t0 = time.perf_counter()
    if backend == "store":
        index = PplIndex.from_scores(data)
    else:  # the list-based baseline: one perplexity array per record
        index = PplIndex([ex.id for ex in data], [ex.ppl_array() for ex in data])
    stats = compute_masks(index, MaskConfig(tau=TAU)).stats()
    out["mask_s"] = time.perf_counter() - t0
    out["masked_share"] = stats.pooled_share
    t0 = time.perf_counter()
    if backend == "store":
        curve = analytics.share_vs_tau({"gt": data}, GRID)
    else:
        curve = share_vs_tau_reference({"gt": data}, GRID)
    out["curve_s"] = time.perf_counter() - t0
    out["curve_checksum"] = float(curve["mean_example_share"].sum())
    out["rss_mib"], out["peak_mib"] = _rss()
    out["rss_start_mib"] = rss_start
    return out


def _child(args: argparse.Namespace) -> None:
    fn = phase_write if args.phase == "write" else phase_read
    print(json.dumps(fn(args.backend, args.n, Path(args.path))))


def _run(phase: str, backend: str, n: int, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, backend, str(n), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{phase} {backend} {n} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--baseline", type=int, default=1000, help="old-cache size (0: none)")
    parser.add_argument("--child", nargs=4, metavar=("PHASE", "BACKEND", "N", "PATH"))
    args = parser.parse_args()
    if args.child:
        args.phase, args.backend, n, args.path = args.child
        args.n = int(n)
        _child(args)
        return
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-score-store-") as tmp:
        runs = [("old", args.baseline)] if args.baseline else []
        runs += [("store", n) for n in args.sizes]
        for backend, n in runs:
            path = Path(tmp) / (f"old-{n}.sqlite" if backend == "old" else f"store-{n}")
            row = {"backend": backend, "n": n, **_run("write", backend, n, path)}
            row.update(_run("read", backend, n, path))
            rows.append(row)
            print(f"  done {backend} {n} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    base = rows[0] if args.baseline else None
    print(
        f"Score store bench: {platform.machine()}, {os.cpu_count()} CPUs, synthetic scores "
        f"(~200 response + ~100 prompt tokens per example, top-{TOP_K}), appends of {BATCH}; "
        f"{time.perf_counter() - started:.0f} s in all\n"
    )
    cols = [
        ("write s", "write_s", "{:.2f}"),
        ("disk MB", "disk_bytes", "{:.1f}"),
        ("open+first ms", "open_first_s", "{:.1f}"),
        ("read all s", "read_all_s", "{:.3f}"),
        ("mask stats ms", "mask_s", "{:.1f}"),
        ("share-vs-τ ms", "curve_s", "{:.1f}"),
        ("RSS MiB", "rss_mib", "{:.0f}"),
        ("peak MiB", "peak_mib", "{:.0f}"),
    ]
    print("| cache | examples | " + " | ".join(c for c, _, _ in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for row in rows:
        cells = []
        for _, key, fmt in cols:
            value = row[key]
            scale = {"disk_bytes": 1e-6, "open_first_s": 1e3, "mask_s": 1e3, "curve_s": 1e3}
            text = fmt.format(value * scale.get(key, 1))
            if base is not None and row is not base and row["n"] == base["n"] and base[key]:
                text += f" ({value / base[key]:.2f}x)"
            cells.append(text)
        name = "old SQLite/JSON" if row["backend"] == "old" else "Parquet store"
        print(f"| {name} | {row['n']:,} | " + " | ".join(cells) + " |")
    if base is not None:
        print(
            f"\n(x): store / old at {base['n']:,} examples. The reader's RSS includes the "
            f"interpreter and imports (~{rows[0]['rss_start_mib']:.0f} MiB before reading)."
        )
    if base is not None and args.baseline in args.sizes:
        old_row = base
        new_row = next(r for r in rows[1:] if r["n"] == args.baseline)
        agree = (old_row["masked_share"], old_row["curve_checksum"]) == (
            new_row["masked_share"],
            new_row["curve_checksum"],
        )
        print(f"Same masked share and share-vs-τ curve from both caches: {agree}")


if __name__ == "__main__":
    main()
