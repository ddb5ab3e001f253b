"""A generated set picked in the sidebar reaches the pages with each example's `meta` (asserts,
gold answers), read through core.datagen.store like training reads it."""

from __future__ import annotations

import pytest

from components.session import Selection, load_dataset_cached
from core.data.records import Example
from core.datagen.store import write_generated_set
from core.errors import LensError


def test_generated_set_keeps_scorer_metadata():
    examples = [
        Example(f"t{i}", f"Add {i} and 1.", f"{i + 1}", meta={"answer": str(i + 1), "tests": [i]})
        for i in range(3)
    ]
    folder = write_generated_set(
        "so-test", "self_output", examples, data_key="task:x", model="m", model_fingerprint="f"
    )
    sel = Selection(kind="generated", data_path=str(folder / "examples.jsonl"), limit=2)
    dataset = load_dataset_cached(sel)
    assert [ex.id for ex in dataset.examples] == ["t0", "t1"]
    assert dataset.examples[1].meta == {"answer": "2", "tests": [1]}
    assert dataset.report.loaded == 2 and "so-test" in dataset.report.summary()


def test_missing_generated_set_is_a_clear_error(tmp_path):
    sel = Selection(kind="generated", data_path=str(tmp_path / "gone" / "examples.jsonl"))
    with pytest.raises(LensError, match="Generated set 'gone' is gone"):
        load_dataset_cached(sel)
