"""The store of generated responses and the discovery of generated datasets (core.datagen.store)."""

from __future__ import annotations

import json

import pytest

import core.datagen.store as generated
from core.data.records import Example
from core.datagen.store import (
    GenerationStore,
    StoredGeneration,
    config_from_settings,
    file_data_key,
    generate_and_store,
    list_generated_sets,
    match_examples,
    settings_label,
    task_data_key,
    write_generated_set,
)
from core.errors import DataError
from core.io import cache_dir
from core.model.generation import Generation, GenerationConfig


def save_generation(
    model_key: str, example: Example, config: GenerationConfig, generation: Generation
) -> StoredGeneration:
    """Store one generated response in the default store (see `GenerationStore.save`)."""
    return GenerationStore().save(model_key, example, config, generation)


def load_generations(
    model_key: str, example_id: str, prompt: str | None = None
) -> list[StoredGeneration]:
    """Stored generations of one example under `model_key`, newest first."""
    return GenerationStore().for_example(model_key, example_id, prompt)


EX = Example(id="ex-1", prompt="Add 2 and 3.", response="5", meta={"answer": 5})
GREEDY = GenerationConfig(max_new_tokens=16)
SAMPLED = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, seed=3)


def test_saved_generation_survives_a_new_store_and_is_keyed_by_settings_and_prompt():
    save_generation("model-a|float32", EX, GREEDY, Generation("2 + 3 = 5", 7, True))
    save_generation("model-a|float32", EX, SAMPLED, Generation("It is 5.", 5, True))
    save_generation("model-b|float32", EX, GREEDY, Generation("five", 1, True))

    store = GenerationStore()  # a fresh object reads the same file: a server restart
    assert store.path == cache_dir() / "generated.sqlite"
    found = store.find("model-a|float32", EX, GREEDY)
    assert (found.text, found.n_tokens, found.finished) == ("2 + 3 = 5", 7, True)
    assert found.config == GREEDY
    assert store.find("model-a|float32", EX, SAMPLED).text == "It is 5."
    assert store.find("model-b|float32", EX, SAMPLED) is None
    # Same id, different prompt (the data changed): the stored answer does not apply.
    edited = Example(id="ex-1", prompt="Add 2 and 4.", response="6")
    assert store.find("model-a|float32", edited, GREEDY) is None
    assert load_generations("model-a|float32", "ex-1", edited.prompt) == []

    texts = [g.text for g in load_generations("model-a|float32", "ex-1")]
    assert texts == ["It is 5.", "2 + 3 = 5"]  # newest first
    assert len(store) == 3


def test_saving_the_same_key_replaces_the_answer():
    store = GenerationStore()
    store.save("m", EX, GREEDY, Generation("first", 1, False))
    store.save("m", EX, GREEDY, Generation("second", 1, True))
    assert len(store) == 1
    assert store.find("m", EX, GREEDY).text == "second"


def test_for_examples_matches_id_and_prompt():
    store = GenerationStore()
    other = Example(id="ex-2", prompt="Say hi.", response="hi")
    store.save("m", EX, GREEDY, Generation("5", 1, True))
    store.save("m", other, GREEDY, Generation("hello", 1, True))
    renamed = Example(id="ex-2", prompt="Say hello.", response="hello")
    found = store.for_examples("m", [EX, renamed])
    assert list(found) == ["ex-1"]
    assert [g.text for g in found["ex-1"]] == ["5"]


def test_stored_generation_as_example_keeps_prompt_and_records_settings():
    stored = save_generation("m", EX, SAMPLED, Generation("It is 5.", 5, False))
    ex = stored.as_example(EX)
    assert (ex.id, ex.prompt, ex.response) == ("ex-1", EX.prompt, "It is 5.")
    assert ex.meta["answer"] == 5
    assert config_from_settings(ex.meta["generation"]) == SAMPLED
    assert ex.meta["finished"] is False


def test_settings_label():
    assert settings_label(GREEDY) == "greedy, ≤16 tok"
    assert settings_label(SAMPLED) == "sampled T=0.7 top-p=0.9 seed 3, ≤16 tok"


def test_generate_and_store_generates_once_then_reuses(tiny_lm, monkeypatch):
    examples = [Example(id=f"q{i}", prompt=f"Count to {i}.", response=str(i)) for i in range(1, 6)]
    config = GenerationConfig(max_new_tokens=6)
    calls: list[int] = []
    real = generated.generate_responses

    def counting(lm, prompts, cfg):
        calls.append(len(prompts))
        return real(lm, prompts, cfg)

    monkeypatch.setattr(generated, "generate_responses", counting)
    progress: list[tuple[int, int]] = []
    first = generate_and_store(
        tiny_lm, examples, config, chunk_size=2, progress=lambda d, t: progress.append((d, t))
    )
    assert calls == [2, 2, 1]
    assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert [g.example_id for g in first] == ["q1", "q2", "q3", "q4", "q5"]
    assert all(0 <= g.n_tokens <= 6 and g.model_key == tiny_lm.cache_key for g in first)

    again = generate_and_store(tiny_lm, examples, config, chunk_size=2)
    assert calls == [2, 2, 1]  # nothing regenerated
    assert [g.text for g in again] == [g.text for g in first]


def test_generate_and_store_keeps_finished_chunks_when_a_later_chunk_fails(tiny_lm, monkeypatch):
    examples = [Example(id=f"q{i}", prompt=f"Name {i} fruits.", response="x") for i in range(4)]
    real = generated.generate_responses
    calls = {"n": 0}

    def fails_second_time(lm, prompts, cfg):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(lm, prompts, cfg)

    monkeypatch.setattr(generated, "generate_responses", fails_second_time)
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(RuntimeError):
        generate_and_store(tiny_lm, examples, config, chunk_size=2)
    store = GenerationStore()
    kept = [store.find(tiny_lm.cache_key, ex, config) is not None for ex in examples]
    assert kept == [True, True, False, False]


def test_data_keys():
    assert task_data_key("mbpp", "train") == "task:mbpp/train"
    root = cache_dir()
    a, b, c = root / "a.jsonl", root / "b.jsonl", root / "c.jsonl"
    a.write_text('{"prompt": "p", "response": "r"}\n')
    b.write_text('{"prompt": "p", "response": "r"}\n')
    c.write_text('{"prompt": "p", "response": "other"}\n')
    assert file_data_key(a) == file_data_key(b) != file_data_key(c)
    assert file_data_key(a).startswith("file:")


def _set_examples() -> list[Example]:
    return [
        Example(id="ex-1", prompt="Add 2 and 3.", response="5", meta={"passed": True}),
        Example(id="ex-2", prompt="Say hi.", response="hi"),
    ]


def test_generated_sets_are_listed_filtered_and_loaded():
    write_generated_set(
        "mbpp-self-output",
        "self_output",
        _set_examples(),
        data_key="task:mbpp/train",
        model="default",
        model_fingerprint="fp-a",
        settings={"temperature": 0.7, "n": 32},
    )
    write_generated_set(
        "mbpp-rephrase",
        "rephrase",
        _set_examples()[:1],
        data_key="task:mbpp/train",
        model="default",
        model_fingerprint="fp-b",
    )
    write_generated_set(
        "gsm8k-self-output",
        "self_output",
        _set_examples(),
        data_key="task:gsm8k/test",
        model="default",
        model_fingerprint="fp-a",
    )
    names = {s.name for s in list_generated_sets()}
    assert names == {"mbpp-self-output", "mbpp-rephrase", "gsm8k-self-output"}
    mbpp = list_generated_sets("task:mbpp/train")
    assert {(s.name, s.source) for s in mbpp} == {
        ("mbpp-self-output", "self_output"),
        ("mbpp-rephrase", "rephrase"),
    }
    mine = list_generated_sets("task:mbpp/train", model_fingerprint="fp-a")
    assert [s.name for s in mine] == ["mbpp-self-output"]
    gset = mine[0]
    assert gset.n_examples == 2 and gset.settings == {"temperature": 0.7, "n": 32}
    assert gset.load_examples() == _set_examples()
    manifest = json.loads((gset.path / "manifest.json").read_text())
    assert manifest["kind"] == "self_output" and manifest["format"] == 1


def test_rewriting_a_set_replaces_it():
    for response in ("old", "new"):
        write_generated_set(
            "s",
            "rephrase",
            [Example(id="1", prompt="p", response=response)],
            data_key="k",
            model="m",
            model_fingerprint="f",
        )
    [gset] = list_generated_sets("k")
    assert [ex.response for ex in gset.load_examples()] == ["new"]
    assert sorted(p.name for p in gset.path.parent.iterdir()) == ["s"]


def test_broken_sets_are_reported_not_fatal():
    write_generated_set(
        "good", "self_output", _set_examples(), data_key="k", model="m", model_fingerprint="f"
    )
    root = cache_dir() / "generated_sets"
    (root / "bad-json").mkdir()
    (root / "bad-json" / "manifest.json").write_text("{not json")
    (root / "bad-kind").mkdir()
    (root / "bad-kind" / "manifest.json").write_text(json.dumps({"kind": "gt", "data_key": "k"}))
    problems: list[str] = []
    sets = list_generated_sets("k", problems=problems)
    assert [s.name for s in sets] == ["good"]
    assert len(problems) == 2
    assert any(p.startswith("bad-json: unreadable manifest.json") for p in problems)
    assert any("bad-kind: kind 'gt' is not one of self_output, rephrase" in p for p in problems)

    (sets[0].path / "examples.jsonl").write_text('{"id": "1", "prompt": "p"}\n')
    with pytest.raises(DataError, match="line 1 of examples.jsonl is not a valid example"):
        sets[0].load_examples()


def test_write_generated_set_rejects_bad_kind_and_name():
    with pytest.raises(DataError, match="kind must be one of"):
        write_generated_set("x", "ground_truth", [], data_key="k", model="m", model_fingerprint="f")
    with pytest.raises(DataError, match="Invalid generated-set name"):
        write_generated_set("../x", "rephrase", [], data_key="k", model="m", model_fingerprint="f")


def test_match_examples_needs_same_id_and_prompt():
    shown = _set_examples()
    gen = [
        Example(id="ex-1", prompt="Add 2 and 3.", response="2+3=5"),
        Example(id="ex-2", prompt="Say hello.", response="hello"),  # prompt differs
        Example(id="ex-9", prompt="Other.", response="o"),
    ]
    assert list(match_examples(gen, shown)) == ["ex-1"]
