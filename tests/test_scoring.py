"""Token scoring on the tiny model: batched == reference, cache, ordering, statistics."""

import math

import numpy as np
import pytest

from core.data.records import Example
from core.model import forward
from core.model.encoding import encode_pair
from core.model.forward import CPU_STATS_CHUNK
from core.scoring.cache import ScoreCache
from core.scoring.score import score_examples
from tests.reference import score_one_reference


def _examples(n=9):
    out = []
    for i in range(n):
        prompt = "Write a function. " * (1 + i % 3)
        response = f"def f(x):\n    return x * {i}\n" * (1 + (i * 7) % 5)
        out.append(Example(id=f"ex{i}", prompt=prompt, response=response))
    return out


@pytest.mark.parametrize("convention", ["prompt", "response_only"])
@pytest.mark.parametrize("keep", ["mask", "tail"])
def test_batched_scores_equal_unbatched_reference(tiny_lm, convention, keep, monkeypatch):
    """Both ways of picking the response positions: the per-row mask and, for models whose
    forward takes only an int, the batch's common tail."""
    monkeypatch.setattr(
        forward, "_NO_MASK_KEEP", {type(tiny_lm.model)} if keep == "tail" else set()
    )
    exs = _examples()
    run = score_examples(tiny_lm, exs, convention=convention, token_budget=300, max_batch=4)
    assert [r.id for r in run.examples] == [e.id for e in exs]
    assert (type(tiny_lm.model) in forward._NO_MASK_KEEP) == (keep == "tail")
    for ex, rec in zip(exs, run.examples, strict=True):
        ref = score_one_reference(tiny_lm, ex, convention=convention)
        assert len(ref) == rec.n_response
        np.testing.assert_allclose(rec.logprob, ref, atol=1e-4)


def test_record_statistics_are_consistent(tiny_lm):
    rec = score_examples(tiny_lm, _examples(3)).examples[2]
    lp = np.array(rec.logprob)
    assert rec.seq_ppl == pytest.approx(math.exp(-lp.mean()))
    np.testing.assert_allclose(rec.ppl, np.exp(-lp))
    for i, tid in enumerate(rec.response_token_ids):
        assert rec.top_logprobs[i] == sorted(rec.top_logprobs[i], reverse=True)
        assert (rec.rank[i] == 1) == (rec.top_ids[i][0] == tid)
        assert rec.logprob[i] <= rec.top_logprobs[i][0] + 1e-6
    assert len(rec.tokens) == len(rec.token_ids)
    assert rec.tokens[-1] == "<|im_end|>"


def test_rank_and_top_k_match_full_logits_across_chunks(tiny_lm):
    """Rank and top-k come from a few rows at a time; check them against one full pass."""
    import torch

    ex = _examples(5)[4]  # several lines: more response tokens than one stats chunk
    rec = score_examples(tiny_lm, [ex]).examples[0]
    assert rec.n_response > 2 * CPU_STATS_CHUNK
    enc = encode_pair(tiny_lm.tokenizer, ex.prompt, ex.response)
    ids = torch.tensor([enc.input_ids])
    with torch.inference_mode():
        logprobs = torch.log_softmax(tiny_lm.model(input_ids=ids).logits[0, :-1].float(), -1)
    rows = logprobs[enc.response_start - 1 :]
    targets = ids[0, enc.response_start :]
    target_lp = rows.gather(-1, targets[:, None])[:, 0]
    assert rec.rank == ((rows > target_lp[:, None]).sum(-1) + 1).tolist()
    top_lp, top_ids = rows.topk(len(rec.top_ids[0]), dim=-1)
    assert rec.top_ids == top_ids.tolist()
    np.testing.assert_allclose(rec.top_logprobs, top_lp.numpy(), atol=1e-5)


def test_cache_makes_second_run_free_and_identical(tiny_lm, tmp_path):
    cache = ScoreCache(tmp_path / "scores")
    exs = _examples(5)
    first = score_examples(tiny_lm, exs, cache=cache)
    assert (first.n_cached, first.n_scored) == (0, 5)
    second = score_examples(tiny_lm, exs + [Example("new", "p", "fresh response")], cache=cache)
    assert (second.n_cached, second.n_scored) == (5, 1)
    assert [r.logprob for r in second.examples[:5]] == [r.logprob for r in first.examples]
    other = score_examples(tiny_lm, exs, cache=cache, convention="response_only")
    assert other.n_cached == 0


def test_changed_text_is_rescored(tiny_lm, tmp_path):
    cache = ScoreCache(tmp_path / "s")
    score_examples(tiny_lm, [Example("a", "p", "one")], cache=cache)
    run = score_examples(tiny_lm, [Example("a", "p", "two")], cache=cache)
    assert run.n_scored == 1


def test_progress_reports_reach_the_total(tiny_lm):
    calls = []
    score_examples(
        tiny_lm, _examples(6), token_budget=200, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_truncation_is_counted(tiny_lm):
    run = score_examples(tiny_lm, _examples(4), max_length=40)
    assert run.n_truncated >= 1
    assert all(len(r.token_ids) <= 40 for r in run.examples)
    assert "truncated" in run.summary()


def test_empty_response_is_skipped_and_reported(tiny_lm):
    run = score_examples(tiny_lm, [Example("e", "p", "   "), Example("ok", "p", "fine")])
    assert [r.id for r in run.examples] == ["ok"]
    assert run.skipped == [("e", "empty response")]
