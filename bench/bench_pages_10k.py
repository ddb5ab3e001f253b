"""The Explore and Masking-studio code paths at 1k / 3k / 10k examples, from the score store
(issue #16, part 2), and the same on a real scored dataset.

Synthetic mode (no model): a store is filled with `bench_score_store.synthetic` scores (about
200 response and 100 prompt tokens per example, top-5; 10k examples are about 2M response
tokens), appended 512 examples at a time and compacted. Then, in a fresh process per size (so
its peak RSS is that of one process holding the dataset open), the paths the pages run, with
the same core calls the pages make (the page scripts themselves run Streamlit at import):

- open: `ScoreCache.lookup` of the selection (content keys included) as `score_examples` does
  on a full cache hit, then what Explore shows first: the summary line, the example table
  (`example_columns` + `example_shares`), the range-filter stops, the first page of 50 rows,
  and the first example's record + heatmap HTML (`render_token_heatmap`);
- τ change in the Masking studio: `compute_masks` + `stats()` + the shown example's heatmap with
  its mask (the `PplIndex` is built once when the studio opens: reported separately);
- τ change in Explore: the table's share > τ column + summary + heatmap;
- share-vs-τ: the studio's curve data (`share_vs_tau_curve`, 200 τ) and figure
  (`masking_curve_figure`), and Explore's analytics curve (`analytics.share_vs_tau`, 120 τ);
- export: `scores_fingerprint` + `export_masked_dataset` (masked.jsonl, hf_dataset/, manifest)
  of the τ = 2.5 masks into a temp folder (`datasets` imported before, as a second export
  finds it; its import is reported apart);
- disk: bytes of the store; RSS: VmRSS after opening and VmHWM (peak) at the end.

`--apptest N` runs the Explore page itself in Streamlit's AppTest on N synthetic examples stored
under the embedded model's real scoring setting (the model is loaded first, as a running app has
it): time to the first heatmap (the first examples, shown while the rest are read), to the whole
selection's first table page, a rerun, a τ change, and that process's RSS (model included).
`BENCH_KEEP_APP_DATA=1` keeps that cache folder (store + data.jsonl) to open it in the app:
`PLENS_CACHE_DIR=<folder> streamlit run app.py`, then Explore with
`?kind=file&data=<folder>/data.jsonl&limit=10000`.

    python bench/bench_pages_10k.py                        # 1k, 3k, 10k synthetic
    python bench/bench_pages_10k.py --real /tmp/plens-real # MBPP all + GSM8K test, scored there
    python bench/bench_pages_10k.py --apptest 10000        # Explore in AppTest, embedded model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TAU, TAU2 = 2.5, 3.0
PAGE_SIZE = 50
COLORS = {"A": "#D55E00", "B": "#8250df"}  # the studio's

from bench_score_store import _disk, _rss  # noqa: E402 - this folder is on sys.path (a script)


def _synthetic_examples(n: int) -> list:
    from core.data.records import Example

    return [
        Example(
            f"ex{i}",
            f"Write a function number {i} that does something.",
            f"def f{i}(x):\n    return x * {i}\n",
        )
        for i in range(n)
    ]


def fill(n: int, path: Path, setting=None, vocab=None) -> float:
    """Write n synthetic examples into the store at `path`; seconds taken."""
    from bench_score_store import _setting, synthetic

    from core.scoring.cache import ScoreCache

    scores = synthetic(n)
    if vocab is not None:
        from dataclasses import replace

        scores = replace(scores, vocab=vocab, _cache={})
    cache = ScoreCache(path)
    t0 = time.perf_counter()
    for start in range(0, n, 512):
        cache.put(setting or _setting(), scores.take(range(start, min(n, start + 512))))
    cache.compact()
    return time.perf_counter() - t0


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def pages(path: Path, setting, examples: list) -> dict:
    """Time the page paths on the store at `path` (see the module docstring)."""
    from core.masking.export import export_masked_dataset, scores_fingerprint
    from core.masking.rules import MaskConfig, PplIndex, compute_masks, share_vs_tau_curve
    from core.scoring import analytics
    from core.scoring.cache import ScoreCache, content_key
    from core.viz.charts import masking_curve_figure
    from core.viz.heatmap import render_token_heatmap

    out: dict = {"examples": len(examples)}
    rss0, _ = _rss()
    t0 = time.perf_counter()
    keys = [content_key(ex) for ex in examples]
    hit = ScoreCache(path).lookup(setting, examples, keys)
    scores = hit.scores.with_labels(
        ["ground_truth"] * len(hit.keys), [dict(ex.meta) for ex in examples]
    )
    t_read = time.perf_counter()
    seq = scores.seq_ppl()[scores.n_response > 0]
    summary = (len(scores), scores.n_tokens, float(seq.mean()), int((scores.ppl() > TAU).sum()))
    table = analytics.example_columns(scores)
    table.insert(4, "share > τ", analytics.example_shares(scores, TAU))
    analytics.seq_ppl_ticks(table["seq ppl"].to_numpy(dtype=np.float64))
    first_page = table.iloc[:PAGE_SIZE]
    html = render_token_heatmap(scores.example(0), tau=TAU, max_tokens=3000)
    out["open_s"] = time.perf_counter() - t0
    out["read_s"] = t_read - t0
    out["tokens"] = scores.n_tokens
    out["rss_open_mib"] = _rss()[0]
    out["rss_start_mib"] = rss0
    assert len(scores) == len(examples) and len(first_page) == min(PAGE_SIZE, len(examples))
    assert summary[0] == len(examples) and "pl-root" in html

    t0 = time.perf_counter()
    index = PplIndex.from_scores(scores)
    out["index_s"] = time.perf_counter() - t0
    example, pos = scores.example(0), 0
    # the studio's first screen: the index above, masks + stats, the curve's first figure
    # (which sorts the perplexities once) and the heatmap with its mask
    first = compute_masks(index, MaskConfig(tau=TAU))
    first.stats()
    masking_curve_figure(
        {None: index, "ground_truth": index}, "high", (TAU,), band=(0.2, 0.25), colors=COLORS
    )
    render_token_heatmap(example, tau=TAU, masked=first.mask_at(pos), max_tokens=2000)
    out["studio_open_s"] = time.perf_counter() - t0
    taus = iter([TAU2, TAU] * 50)

    def studio_tau_change() -> None:
        result = compute_masks(index, MaskConfig(tau=next(taus)))
        result.stats()
        render_token_heatmap(example, tau=result.tau, masked=result.mask_at(pos), max_tokens=2000)

    def explore_tau_change() -> None:
        tau = next(taus)
        # the page caches the τ-independent columns; only the share > τ column is recomputed
        analytics.example_shares(scores, tau)
        int((scores.ppl() > tau).sum())
        render_token_heatmap(example, tau=tau, max_tokens=3000)

    out["studio_tau_ms"] = _median_ms(studio_tau_change, 11)
    out["explore_tau_ms"] = _median_ms(explore_tau_change, 11)
    grid = np.geomspace(1.05, 1000, 120)
    out["curve_studio_ms"] = _median_ms(
        lambda: share_vs_tau_curve(index, np.geomspace(1, 1000, 200)), 11
    )
    out["curve_figure_ms"] = _median_ms(
        lambda: masking_curve_figure(
            {None: index, "ground_truth": index}, "high", (TAU,), band=(0.2, 0.25), colors=COLORS
        ),
        5,
    )
    out["curve_explore_ms"] = _median_ms(
        lambda: analytics.share_vs_tau({"ground_truth": scores}, grid), 5
    )

    result = compute_masks(index, MaskConfig(tau=TAU))
    out["masked_share"] = result.stats().pooled_share
    t0 = time.perf_counter()
    import datasets  # noqa: F401  (the export's heavy import: once per app process)

    out["datasets_import_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-pages-export-") as tmp:
        t0 = time.perf_counter()
        extra = {"source_fingerprint": scores_fingerprint(scores)}
        out["fingerprint_s"] = time.perf_counter() - t0
        target = export_masked_dataset(scores, result, Path(tmp) / "export", extra)
        out["export_s"] = time.perf_counter() - t0
        out["export_mb"] = _disk(target) / 1e6
    out["disk_mb"] = _disk(path) / 1e6
    out["rss_mib"], out["peak_mib"] = _rss()
    return out


def _synthetic_child(n: int, path: Path) -> dict:
    from bench_score_store import _setting

    return pages(path, _setting(), _synthetic_examples(n))


def _real_child(cache: Path) -> dict:
    from core.data.tasks import load_task
    from core.scoring.cache import ScoreSetting

    [folder] = [p for p in (cache / "scores").iterdir() if (p / "setting.json").is_file()]
    info = json.loads((folder / "setting.json").read_text())
    info.pop("schema", None)
    setting = ScoreSetting(**info)
    examples = list(load_task("mbpp", split="all").examples)
    examples += list(load_task("gsm8k", split="test").examples)
    from core.scoring.cache import ScoreCache, content_key

    have = set(ScoreCache(cache / "scores").lookup(setting, examples).keys)
    examples = [ex for ex in examples if content_key(ex) in have]  # what the run scored
    out = pages(cache / "scores", setting, examples)
    out["mbpp"] = sum(ex.id.startswith("mbpp") or "mbpp" in ex.id.lower() for ex in examples)
    return out


def _apptest_child(n: int) -> dict:
    """Explore in AppTest on n synthetic examples stored under the embedded model's setting."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-pages-app-"))
    models = Path(os.environ.get("PLENS_CACHE_DIR") or Path.home() / ".cache/perplexity-lens")
    (tmp / "models").symlink_to((models / "models").resolve())
    os.environ["PLENS_CACHE_DIR"] = str(tmp)
    from core.model.loading import MODEL_SLOT
    from core.scoring.score import score_setting

    t0 = time.perf_counter()
    lm = MODEL_SLOT.get("default", device="cpu", dtype="float32")
    model_s = time.perf_counter() - t0
    tok = lm.tokenizer
    vocab = {i: tok.decode([i]) for i in range(len(tok))}
    fill(n, tmp / "scores", score_setting(lm), vocab)
    data = tmp / "data.jsonl"
    with open(data, "w") as fh:
        for ex in _synthetic_examples(n):
            fh.write(json.dumps({"id": ex.id, "prompt": ex.prompt, "response": ex.response}) + "\n")
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "explore.py"), default_timeout=120)
    at.query_params.update(
        model="default", device="cpu", dtype="float32", kind="file", data=str(data), limit=str(n)
    )
    t0 = time.perf_counter()
    runs = 0
    while True:
        at.run()
        runs += 1
        assert not at.exception, [e.value for e in at.exception]
        if any("pl-root" in h.proto.body for h in at.html):
            break
        assert time.perf_counter() - t0 < 300, "Explore did not show a heatmap"
        time.sleep(0.1)
    first = time.perf_counter() - t0
    while not (at.dataframe and len(at.dataframe[0].value) == min(PAGE_SIZE, n)):
        # the first FIRST_LOOK examples show first; the whole selection follows
        assert time.perf_counter() - t0 < 300, "Explore did not show the whole selection"
        time.sleep(0.1)
        at.run()
        runs += 1
        assert not at.exception, [e.value for e in at.exception]
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.run()
    rerun = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.slider(key="tau_slider").set_value(3.0).run()
    tau = time.perf_counter() - t0
    rows = len(at.dataframe[0].value)
    rss, peak = _rss()
    if os.environ.get("BENCH_KEEP_APP_DATA"):  # e.g. to open the same store in a browser
        print(f"app data kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "examples": n,
        "model_load_s": model_s,
        "first_render_s": first,
        "full_table_s": full,
        "runs": runs,
        "rerun_s": rerun,
        "tau_rerun_s": tau,
        "table_rows": rows,
        "rss_mib": rss,
        "peak_mib": peak,
    }


def _run(*args: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    cols = [
        ("examples", "examples", "{:,}"),
        ("response tokens", "tokens", "{:,}"),
        ("open to first heatmap s", "open_s", "{:.2f}"),
        ("(store read s)", "read_s", "{:.2f}"),
        ("studio open s", "studio_open_s", "{:.2f}"),
        ("studio τ change ms", "studio_tau_ms", "{:.1f}"),
        ("Explore τ change ms", "explore_tau_ms", "{:.1f}"),
        ("share-vs-τ data ms", "curve_studio_ms", "{:.1f}"),
        ("share-vs-τ figure ms", "curve_figure_ms", "{:.0f}"),
        ("analytics curve ms", "curve_explore_ms", "{:.0f}"),
        ("export s", "export_s", "{:.2f}"),
        ("(fingerprint s)", "fingerprint_s", "{:.2f}"),
        ("store MB", "disk_mb", "{:.1f}"),
        ("export MB", "export_mb", "{:.0f}"),
        ("RSS open MiB", "rss_open_mib", "{:.0f}"),
        ("peak RSS MiB", "peak_mib", "{:.0f}"),
    ]
    lines = ["| " + " | ".join(c for c, _, _ in cols) + " |", "|" + "---:|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f.format(row[k]) for _, k, f in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 3000, 10000])
    parser.add_argument("--real", type=Path, help="a PLENS_CACHE_DIR with MBPP + GSM8K scored")
    parser.add_argument("--apptest", type=int, default=0, help="examples for the AppTest run")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "fill":
            print(json.dumps({"fill_s": fill(int(rest[0]), Path(rest[1]))}))
        elif kind == "pages":
            print(json.dumps(_synthetic_child(int(rest[0]), Path(rest[1]))))
        elif kind == "real":
            print(json.dumps(_real_child(Path(rest[0]))))
        else:
            print(json.dumps(_apptest_child(int(rest[0]))), flush=True)
            sys.stderr.flush()
            os._exit(0)  # the app's background threads crash the interpreter's finalization
        return
    from machine import cpu_name

    print(f"{cpu_name()}, {os.cpu_count()} CPUs, {date.today().isoformat()}\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pages-") as tmp:
        for n in args.sizes:
            path = Path(tmp) / f"store-{n}"
            row = _run("fill", str(n), str(path))
            row.update(_run("pages", str(n), str(path)))
            rows.append(row)
            print(f"  done {n}", file=sys.stderr)
    if rows:
        print(_table(rows))
        print("\n" + json.dumps(rows))
        base = rows[0]
        for row in rows[1:]:
            ratio = row["tokens"] / base["tokens"]
            parts = [
                f"{k} {row[k] / base[k]:.2f}x"
                for k in ("open_s", "read_s", "studio_tau_ms", "curve_studio_ms", "export_s")
            ]
            print(
                f"{row['examples']:,} vs {base['examples']:,}: tokens {ratio:.2f}x; "
                + ", ".join(parts)
            )
    if args.real:
        real = _run("real", str(args.real))
        print("\nReal (MBPP all + GSM8K test):\n" + _table([real]) + "\n" + json.dumps(real))
    if args.apptest:
        app = _run("apptest", str(args.apptest))
        print("\nAppTest, Explore:\n" + json.dumps(app))


if __name__ == "__main__":
    main()
