"""The columnar score store: cache semantics on the tiny model, the same statistics as the
list-based code, damaged fragments moved aside and re-scored, and several processes writing at
once. (The old SQLite cache is not read: tests/test_migrate.py carries it over.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.data.records import Example, ScoredExample
from core.data.sources import load_source
from core.masking.rules import (
    MaskConfig,
    PplIndex,
    compute_masks,
    share_vs_tau_curve,
    solve_tau_for_share,
)
from core.model.loading import LoadedModel
from core.scoring import analytics
from core.scoring import store as store_module
from core.scoring.cache import ScoreCache, ScoreSetting, content_key
from core.scoring.tokens import TokenScores
from tests.reference_analytics import (
    example_table_reference,
    sequence_ppl_table_reference,
    share_above_tau_reference,
    share_vs_tau_reference,
)

ROOT = Path(__file__).resolve().parents[1]


def _dicts(records):
    return [r.to_dict() for r in records]


@pytest.fixture(scope="module")
def mbpp():
    return load_source(task="mbpp", split="train", limit=12).examples


@pytest.fixture
def count_batches(monkeypatch):
    """Counts the model's scoring passes (`LoadedModel.score_pairs` calls) and the examples in
    them."""
    calls = {"batches": 0, "examples": 0}
    real = LoadedModel.score_pairs

    def counting(lm, encs, top_k):
        calls["batches"] += 1
        calls["examples"] += len(encs)
        return real(lm, encs, top_k)

    monkeypatch.setattr(LoadedModel, "score_pairs", counting)
    return calls


def _synthetic(n: int, seed: int = 0, k: int = 3, prefix: str = "e") -> list[ScoredExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_resp = int(rng.integers(0, 25)) if i % 7 else 0
        start = int(rng.integers(0, 6))
        ids = rng.integers(0, 300, start + n_resp).tolist()
        top = rng.integers(0, 300, (n_resp, k)).tolist()
        out.append(
            ScoredExample(
                id=f"{prefix}{i}",
                prompt=f"prompt {i}",
                response=f"response {i}",
                convention="prompt",
                token_ids=ids,
                tokens=[f"<{t}>" for t in ids],
                response_start=start,
                logprob=(-rng.exponential(1.0, n_resp)).tolist(),
                rank=rng.integers(1, 50, n_resp).tolist(),
                top_ids=top,
                top_tokens=[[f"<{t}>" for t in row] for row in top],
                top_logprobs=(-rng.exponential(1.0, (n_resp, k))).astype(np.float32).tolist(),
                truncated=bool(i % 3 == 0),
            )
        )
    return out


SETTING = ScoreSetting("model|float32", "tmpl", "prompt", 128, 3)


def _columns(records: list[ScoredExample]) -> TokenScores:
    """Records as the columns `ScoreCache.put` stores (top-k of `SETTING`, even when no record
    of the batch has a response token)."""
    return TokenScores.from_examples(records, top_k=SETTING.top_k)


# --------------------------------------------------------------------------- columns


def test_token_scores_round_trip_take_and_concat():
    recs = _synthetic(30)
    scores = TokenScores.from_examples(recs)
    assert _dicts(scores.to_examples()) == _dicts(recs)
    order = [5, 0, 5, 29, 7]
    assert _dicts(scores.take(order).to_examples()) == _dicts([recs[i] for i in order])
    joined = TokenScores.concat([scores.take([1, 2]), TokenScores.empty(3), scores.take([3])])
    assert _dicts(joined.to_examples()) == _dicts(recs[1:4])
    assert scores.n_tokens == sum(len(r.logprob) for r in recs)
    np.testing.assert_array_equal(scores.ppl(), np.concatenate([r.ppl_array() for r in recs]))
    seq = scores.seq_ppl()
    for i, rec in enumerate(recs):
        assert (np.isnan(seq[i]) and not rec.logprob) or seq[i] == rec.seq_ppl
    with pytest.raises(ValueError, match="top-k rows"):
        TokenScores.from_examples(recs, top_k=2)


def test_store_keeps_every_field_and_finds_newest(tmp_path):
    cache = ScoreCache(tmp_path / "store")
    recs = _synthetic(40)
    cache.put(SETTING, _columns(recs[:25]))
    cache.put(SETTING, _columns(recs[15:]))  # overlap: the newest wins, same rows
    found = cache.lookup(SETTING, list(reversed(recs)) + [Example("x", "p", "not stored")])
    assert found.keys == [content_key(r) for r in reversed(recs)]
    assert _dicts(found.scores.to_examples()) == _dicts(list(reversed(recs)))
    assert len(cache) == 40
    assert cache.compact() == [] and len(cache.store.fragments(SETTING.key())) == 1
    assert _dicts(cache.lookup(SETTING, recs).scores.to_examples()) == _dicts(recs)
    other = ScoreSetting("model|float32", "tmpl", "prompt", 128, 5)
    assert cache.lookup(other, recs).keys == []


def test_many_small_writes_are_compacted(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_FRAGMENTS", 4)
    cache = ScoreCache(tmp_path / "store")
    recs = _synthetic(30)
    for start in range(0, 30, 3):
        cache.put(SETTING, _columns(recs[start : start + 3]))
        assert len(cache.store.fragments(SETTING.key())) <= 4
    assert _dicts(cache.lookup(SETTING, recs).scores.to_examples()) == _dicts(recs)


# --------------------------------------------------------------------------- cache semantics


def test_second_run_is_free_superset_scores_only_new(tiny_lm, mbpp, count_batches):
    from core.scoring.score import score_examples

    cache = ScoreCache()
    first = score_examples(tiny_lm, mbpp[:8], cache=cache)
    assert (first.n_cached, first.n_scored) == (0, 8)
    assert count_batches["examples"] == 8
    again = score_examples(tiny_lm, mbpp[:8], cache=cache)
    assert (again.n_cached, again.n_scored, count_batches["examples"]) == (8, 0, 8)
    assert _dicts(again.examples) == _dicts(first.examples)
    more = score_examples(tiny_lm, mbpp, cache=cache)
    assert (more.n_cached, more.n_scored, count_batches["examples"]) == (8, 4, 12)
    assert [r.id for r in more.examples] == [ex.id for ex in mbpp]
    assert _dicts(more.examples[:8]) == _dicts(first.examples)
    # a fresh cache object (another process) reads the same rows
    assert score_examples(tiny_lm, mbpp, cache=ScoreCache()).n_scored == 0
    # any change of setting or text misses
    assert score_examples(tiny_lm, mbpp[:2], cache=cache, top_k=2).n_cached == 0
    assert score_examples(tiny_lm, mbpp[:2], cache=cache, max_length=64).n_cached == 0
    assert score_examples(tiny_lm, mbpp[:2], cache=cache, convention="response_only").n_cached == 0
    edited = Example(mbpp[0].id, mbpp[0].prompt, mbpp[0].response + "\n# edited")
    assert score_examples(tiny_lm, [edited, mbpp[1]], cache=cache).n_scored == 1


def test_the_same_content_twice_is_scored_once(tiny_lm, mbpp, count_batches):
    from core.scoring.score import score_examples

    run = score_examples(tiny_lm, [mbpp[0], mbpp[1], mbpp[0]], cache=ScoreCache())
    assert count_batches["examples"] == 2 and run.n_scored == 2
    assert [r.id for r in run.examples] == [mbpp[0].id, mbpp[1].id, mbpp[0].id]
    assert run.examples[0].to_dict() == run.examples[2].to_dict()


def test_meta_and_source_come_from_the_caller(tiny_lm, mbpp):
    from core.scoring.score import score_examples

    cache = ScoreCache()
    score_examples(tiny_lm, mbpp[:2], cache=cache)
    tagged = [
        Example(ex.id, ex.prompt, ex.response, meta={"n": i}) for i, ex in enumerate(mbpp[:2])
    ]
    run = score_examples(tiny_lm, tagged, cache=cache, source="mine")
    assert run.n_cached == 2
    assert [(r.source, r.meta) for r in run.examples] == [("mine", {"n": 0}), ("mine", {"n": 1})]
    assert run.scores.sources == ("mine", "mine")


# --------------------------------------------------------------------------- same numbers


def test_columnar_statistics_equal_the_list_based_ones(tiny_lm, mbpp):
    """On a real scored dataset: masking statistics, share-vs-τ curves and the Table-1 summary
    from the columnar view are exactly those of the list-based code."""
    from core.scoring.score import score_examples

    run = score_examples(tiny_lm, mbpp, cache=ScoreCache())
    records = run.examples
    scores = ScoreCache().lookup(_setting(tiny_lm), mbpp).scores  # read from disk
    assert len(scores) == len(records)
    ppl = np.concatenate([r.ppl_array() for r in records])
    taus = np.quantile(ppl, [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]).tolist()
    grid = np.geomspace(ppl.min() * 0.9, ppl.max() * 1.1, 60).tolist() + taus
    new = PplIndex.from_scores(scores)
    old = PplIndex([r.id for r in records], [r.ppl_array() for r in records])  # per record
    np.testing.assert_array_equal(new.ppl, old.ppl)
    np.testing.assert_array_equal(new.offsets, old.offsets)
    assert new.ids == old.ids
    configs = [MaskConfig(tau=t) for t in taus] + [
        MaskConfig(mode="low", tau=taus[3]),
        MaskConfig(mode="random", tau=taus[2], seed=3),
        MaskConfig(mode="percentile", percentile_rule="top", k_percent=25),
        MaskConfig(mode="percentile", percentile_rule="random", k_percent=40, seed=1),
        MaskConfig(tau=None, target_share=0.3),
    ]
    for config in configs:
        a, b = compute_masks(scores, config), compute_masks(old, config)
        np.testing.assert_array_equal(a.flat, b.flat)
        sa, sb = a.stats(), b.stats()
        assert sa.summary() == sb.summary()
        pd.testing.assert_frame_equal(sa.per_example_frame(), sb.per_example_frame())
    assert solve_tau_for_share(new, 0.25) == solve_tau_for_share(old, 0.25)
    pd.testing.assert_frame_equal(share_vs_tau_curve(new, grid), share_vs_tau_curve(old, grid))
    two = {"ground_truth": scores, "half": scores.take(range(0, len(scores), 2))}
    ref = {"ground_truth": records, "half": records[::2]}
    for tau in taus:
        pd.testing.assert_frame_equal(
            analytics.share_above_tau(two, tau), share_above_tau_reference(ref, tau)
        )
    pd.testing.assert_frame_equal(
        analytics.share_vs_tau(two, grid), share_vs_tau_reference(ref, grid)
    )
    pd.testing.assert_frame_equal(
        analytics.sequence_ppl_table(two), sequence_ppl_table_reference(ref)
    )
    # the signature of the scores read from disk is that of the scores just computed
    assert analytics.scores_signature(two) == analytics.scores_signature(
        {"ground_truth": run.scores, "half": run.scores.take(range(0, len(scores), 2))}
    )
    pd.testing.assert_frame_equal(
        analytics.example_table(scores, taus[3]), example_table_reference(records, taus[3])
    )


def _setting(lm):
    from core.scoring.score import score_setting

    return score_setting(lm)


# --------------------------------------------------------------------------- damaged files


def _only_fragment(cache: ScoreCache, setting: ScoreSetting) -> Path:
    [path] = cache.store.fragments(setting.key())
    return path


@pytest.mark.parametrize("damage", ["truncate", "flip", "columns"])
def test_damaged_fragment_is_moved_aside_and_rescored(
    tiny_lm, mbpp, count_batches, damage, tmp_path
):
    from core.scoring.score import score_examples

    cache = ScoreCache()
    first = score_examples(tiny_lm, mbpp[:4], cache=cache)
    setting = _setting(tiny_lm)
    bad = _only_fragment(cache, setting)
    second = score_examples(tiny_lm, mbpp[4:8], cache=cache)  # a second, healthy fragment
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        group = pq.ParquetFile(bad).metadata.row_group(0)
        paths = [group.column(i).path_in_schema for i in range(group.num_columns)]
        chunk = group.column(paths.index("logprob.list.element"))
        at = chunk.data_page_offset + chunk.total_compressed_size // 2
        bad.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    else:  # a readable Parquet file whose columns disagree: one log-prob missing per row
        table = pq.read_table(bad)
        short = pa.array([row[:-1] for row in table.column("logprob").to_pylist()])
        table = table.set_column(table.schema.get_field_index("logprob"), "logprob", short)
        pq.write_table(table.replace_schema_metadata(pq.read_schema(bad).metadata), bad)
    store_module._INDEXES.clear()  # as a fresh process would see it
    count_batches["examples"] = 0
    run = score_examples(tiny_lm, mbpp[:8], cache=ScoreCache())
    assert run.n_cached == 4 and run.n_scored == 4 and count_batches["examples"] == 4
    assert len(run.warnings) == 1 and bad.name in run.warnings[0]
    assert "scored again" in run.warnings[0] and "warning" in run.summary()
    assert not bad.exists()
    moved = list((cache.path / "quarantine").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith(f"{setting.key()}-{bad.name}")
    assert _dicts(run.examples) == _dicts(first.examples + second.examples)
    # the re-scored rows are stored again: nothing left to warn about
    clean = score_examples(tiny_lm, mbpp[:8], cache=ScoreCache())
    assert (clean.n_cached, clean.warnings) == (8, [])


def test_a_store_that_is_not_a_store_is_reported_not_raised(tmp_path):
    cache = ScoreCache(tmp_path / "store")
    cache.put(SETTING, _columns(_synthetic(5)))
    folder = cache.store.setting_dir(SETTING.key())
    (folder / "part-00000000000000000000-1-deadbeef.parquet").write_text("hello")
    found = cache.lookup(SETTING, _synthetic(5))
    assert len(found.keys) == 5 and len(found.warnings) == 1
    assert "deadbeef" in found.warnings[0]


# --------------------------------------------------------------------------- processes

_WORKER = textwrap.dedent(
    """
    import sys
    from core.scoring import store
    store.MAX_FRAGMENTS = 3  # compact often, while the others write and read
    from core.scoring.cache import ScoreCache, ScoreSetting
    from tests.test_score_store import SETTING, _columns, _synthetic
    root, worker = sys.argv[1], int(sys.argv[2])
    cache = ScoreCache(root)
    recs = _synthetic(24, seed=worker, prefix=f"w{worker}-")
    for start in range(0, len(recs), 2):
        cache.put(SETTING, _columns(recs[start : start + 2]))
        found = cache.lookup(SETTING, recs[: start + 2])
        assert found.warnings == [], found.warnings
        assert [r.to_dict() for r in found.scores.to_examples()] == [
            r.to_dict() for r in recs[: start + 2]
        ]
    """
)


def test_several_processes_write_and_compact_at_once(tmp_path):
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(w)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(3)
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    cache = ScoreCache(root)
    everything = [r for w in range(3) for r in _synthetic(24, seed=w, prefix=f"w{w}-")]
    found = cache.lookup(SETTING, everything)
    assert found.warnings == [] and len(found.keys) == len(everything)
    assert _dicts(found.scores.to_examples()) == _dicts(everything)
    assert not list(cache.store.setting_dir(SETTING.key()).glob(".part-*"))


def test_damaged_vocabulary_moves_its_setting_aside(tiny_lm, mbpp, count_batches):
    from core.scoring.score import score_examples

    cache = ScoreCache()
    first = score_examples(tiny_lm, mbpp[:3], cache=cache)
    score_examples(tiny_lm, mbpp[3:5], cache=cache)
    folder = cache.store.setting_dir(_setting(tiny_lm).key())
    vocab = folder / store_module.VOCAB_FILE
    vocab.write_bytes(vocab.read_bytes()[:-40])
    count_batches["examples"] = 0
    run = score_examples(tiny_lm, mbpp[:5], cache=ScoreCache())
    assert (run.n_cached, run.n_scored, count_batches["examples"]) == (0, 5, 5)
    assert len(run.warnings) == 1 and store_module.VOCAB_FILE in run.warnings[0]
    assert "2 fragment(s)" in run.warnings[0]
    assert len(list((cache.path / "quarantine").iterdir())) == 3
    assert _dicts(run.examples[:3]) == _dicts(first.examples)
    assert score_examples(tiny_lm, mbpp[:5], cache=ScoreCache()).n_cached == 5


# Two processes score overlapping selections (each looks its batch up and writes only what is
# missing, as `score_examples` does); with a kill step, the worker SIGKILLs itself in the middle
# of writing that fragment (half of its bytes in the temp file, the setting's lock held).
_SCORER = textwrap.dedent(
    """
    import io, json, os, signal, sys
    from core.scoring import store
    store.MAX_FRAGMENTS = 4  # merges happen while the other process writes
    from core.scoring.cache import ScoreCache, ScoreSetting, content_key
    from tests.test_score_store import SETTING, _columns, _synthetic
    root, lo, hi, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    writes = []
    original = store.write_atomic

    def write_atomic(path, write, **kwargs):
        if os.path.basename(str(path)).startswith("part-"):
            writes.append(path)
            if len(writes) == kill_at:
                def half(fh):
                    buf = io.BytesIO()
                    write(buf)
                    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    fh.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(path, half, **kwargs)
        return original(path, write, **kwargs)

    store.write_atomic = write_atomic
    cache = ScoreCache(root)
    recs = _synthetic(36, seed=11)[lo:hi]
    scored, warnings = [], []
    for start in range(0, len(recs), 2):
        batch = recs[start : start + 2]
        found = cache.lookup(SETTING, batch)
        warnings += found.warnings
        have = set(found.keys)
        missing = [r for r in batch if content_key(r) not in have]
        if missing:
            cache.put(SETTING, _columns(missing))
            scored += [r.id for r in missing]
        seen = cache.lookup(SETTING, recs[: start + 2])  # readable while the other one writes
        warnings += seen.warnings
        assert [r.to_dict() for r in seen.scores.to_examples()] == [
            r.to_dict() for r in recs[: start + 2]
        ]
    print(json.dumps({"scored": scored, "warnings": warnings}))
    """
)


def _scorer(root, lo, hi, kill_at=0):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _SCORER, str(root), str(lo), str(hi), str(kill_at)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_scorers_on_overlapping_selections_one_killed_mid_append(tmp_path):
    """A lab's two scoring jobs share a store and one is killed: the store stays readable, no
    example is stored twice or lost, and a fragment the crash damaged is quarantined and its
    examples scored again when the killed job's selection is scored again."""
    import json

    root = tmp_path / "store"
    everything = _synthetic(36, seed=11)
    survivor, killed = _scorer(root, 0, 24), _scorer(root, 12, 36, kill_at=4)
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    killed.communicate(timeout=300)
    assert killed.returncode == -9  # it died in its 4th fragment write, the lock held
    folder = ScoreCache(root).store.setting_dir(SETTING.key())
    assert list(folder.glob(".part-*"))  # the half-written temp file is all it left
    # readable at once: every example is there once, or missing (the killed one's last batch)
    found = ScoreCache(root).lookup(SETTING, everything)
    assert found.warnings == []
    assert len(found.keys) == len(set(found.keys)) and len(found.keys) < len(everything)
    got = {r.id: r.to_dict() for r in found.scores.to_examples()}
    assert all(got[i] == r.to_dict() for r in everything if (i := r.id) in got)
    assert {f"e{i}" for i in range(24)} <= set(got)  # the survivor's whole selection

    # a crash that tears a renamed fragment (power lost before its pages reached the disk)
    fragments = store_module.ScoreStore(root).fragments(SETTING.key())
    mine = [p for p in fragments if f"-{killed.pid}-" in p.name]
    torn = (mine or fragments)[-1]
    torn_ids = set(pq.read_table(torn, columns=["id"]).column("id").to_pylist())
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    def rescore(lo, hi):
        proc = _scorer(root, lo, hi)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        return json.loads(out)

    def ids(lo, hi):
        return {f"e{i}" for i in range(lo, hi)}

    report = rescore(12, 36)  # the killed job, run again
    assert len(report["warnings"]) == 1 and torn.name in report["warnings"][0]
    assert any(torn.name in p.name for p in (root / "quarantine").iterdir())
    # what it scored again: its examples that the kill or the tear took, nothing else
    assert set(report["scored"]) == ids(12, 36) - (set(got) - torn_ids)
    assert len(report["scored"]) == len(set(report["scored"]))
    # the torn fragment's other rows (merged in from the first job) are missing, not wrong
    report = rescore(0, 24)
    assert report["warnings"] == [] and set(report["scored"]) == torn_ids - ids(12, 36)
    final = ScoreCache(root).lookup(SETTING, everything)
    assert final.warnings == [] and len(final.keys) == len(everything) == len(set(final.keys))
    assert _dicts(final.scores.to_examples()) == _dicts(everything)
