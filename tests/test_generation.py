"""Batched generation: left padding must not change greedy output; settings are validated."""

import pytest

from core.errors import LensError
from core.model.generation import GenerationConfig, generate_responses


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    prompts = ["Say something.", "A much longer prompt that needs padding in a batch, surely."]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate_responses(tiny_lm, prompts, cfg, batch_size=2)
    single = [generate_responses(tiny_lm, [p], cfg)[0][0] for p in prompts]
    assert [g[0].text for g in batched] == [g.text for g in single]
    assert all(g[0].n_tokens <= 12 for g in batched)


def test_sampling_returns_n_sequences_and_is_seeded(tiny_lm):
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=7)
    first = generate_responses(tiny_lm, ["Hi"], cfg)
    again = generate_responses(tiny_lm, ["Hi"], cfg)
    assert len(first[0]) == 3
    assert [g.text for g in first[0]] == [g.text for g in again[0]]


def test_bad_settings_are_clear_errors(tiny_lm):
    with pytest.raises(LensError):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(LensError, match="sampling"):
        GenerationConfig(num_return_sequences=4)
    with pytest.raises(LensError, match="context"):
        generate_responses(tiny_lm, ["word " * 300], GenerationConfig(max_new_tokens=10))


def test_shared_prefill_draws_the_same_samples_as_expanding_the_prompts(tiny_lm):
    # two prompts of different lengths: the short one is left-padded in the shared prefill
    prompts = ["Hi", "A much longer prompt that needs padding in a batch, surely."]
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=3)
    shared = generate_responses(tiny_lm, prompts, cfg, batch_size=2)
    expanded = generate_responses(tiny_lm, prompts, cfg, batch_size=2, share_prefill=False)
    assert [[g.text for g in gens] for gens in shared] == [
        [g.text for g in gens] for gens in expanded
    ]
    assert [len(gens) for gens in shared] == [3, 3]
    assert len({g.text for g in shared[1]}) > 1  # real samples, not one copied three times


def test_thread_setting_from_argument_or_environment(monkeypatch):
    import torch

    from core.model.generation import set_torch_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("PLENS_THREADS", raising=False)
        assert set_torch_threads() == before  # nothing given: torch's default stays
        assert set_torch_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("PLENS_THREADS", "2")
        assert set_torch_threads() == 2 == torch.get_num_threads()
        assert set_torch_threads(1) == 1  # the argument wins over the environment
        monkeypatch.setenv("PLENS_THREADS", "two")
        with pytest.raises(LensError, match="PLENS_THREADS must be an integer"):
            set_torch_threads()
        with pytest.raises(LensError, match="at least 1"):
            set_torch_threads(0)
    finally:
        torch.set_num_threads(before)
