"""Objects several tests (and benches) build the same way."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from core.data.records import ScoredExample
from core.datagen.config import GenDataConfig
from core.eval.drift import drift_metrics, item_details, score_drift
from core.eval.probes import FILE_PREFIX, load_probe
from core.eval.runner import load_adapter
from core.eval.scorers import SuiteResult, TaskResult
from core.io import write_json_atomic
from core.jobs.runfiles import CONFIG_JSON, append_metric, eval_round_path, runs_dir
from core.model.encoding import encode_pair
from core.scoring.tokens import TokenScores, _offsets
from core.study.protocol import (
    REPORT_HTML,
    RESULTS_JSON,
    ProtocolConfig,
    aggregate,
    write_protocol_report,
)
from core.training.config import TrainConfig

if TYPE_CHECKING:
    from core.model.loading import LoadedModel

#: Six small prompt/response pairs the training tests (and the kill-resume harness) train on.
TRAIN_ROWS = [
    {"id": "a", "prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"id": "b", "prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"id": "c", "prompt": "Capital of France?", "response": "The capital of France is Paris."},
    {"id": "d", "prompt": "Reverse 'abc'.", "response": "'cba'"},
    {"id": "e", "prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
    {"id": "f", "prompt": "Say hello.", "response": "Hello! How can I help you today?"},
]


def save_tiny_llama(folder: Path, tokenizer: Any) -> Path:
    """The suite's tiny model: a 2-layer, 64-wide llama with `tokenizer` (SmolLM2's), seeded, saved
    with its tokenizer as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- scored examples

#: The prompt tokens `make_example` puts before the response unless told otherwise.
PROMPT_TOKENS = ["<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "Add", " x", "\n"]
#: The top-k alternatives of a response token `tok` unless told otherwise, and their
#: probabilities.
TOP_TOKENS = [" the", "\n", "(", "x", "1"]
TOP_PROBS = [0.5, 0.2, 0.1, 0.05, 0.02, 0.01]


def token_id(text: str) -> int:
    """The tests' vocabulary: "t<N>" is token N, any other text a stable id from its bytes
    (10**6 and up), so a text always has one id and any examples made by `make_example` join
    into one `TokenScores`."""
    number = re.fullmatch(r"t(\d+)", text)
    if number:
        return int(number[1])
    return 10**6 + int.from_bytes(hashlib.blake2b(text.encode(), digest_size=3).digest(), "big")


def make_example(
    ex_id: str = "ex-1",
    ppl: Sequence[float] = (),
    tokens: Sequence[str] | None = None,
    *,
    logprob: Sequence[float] | None = None,
    prompt_tokens: Sequence[str] = PROMPT_TOKENS,
    top_tokens: Sequence[Sequence[str]] | None = None,
    top_probs: Sequence[Sequence[float]] | None = None,
    **fields: Any,
) -> ScoredExample:
    """One scored example: `prompt_tokens`, then the response `tokens` (default "t0", "t1", ...)
    with token perplexities `ppl` (or log-probs `logprob`). Ranks cycle 1, 2, 3; each token's
    top-6 alternatives are itself and `TOP_TOKENS` with `TOP_PROBS` unless `top_tokens` /
    `top_probs` say otherwise. Token ids are `token_id` of the texts. Any other `ScoredExample`
    field (prompt, response, truncated, source, meta, ...) is a keyword; the prompt and response
    texts default to the joined tokens."""
    logprob = [-math.log(p) for p in ppl] if logprob is None else [float(v) for v in logprob]
    n = len(logprob)
    tokens = [f"t{i}" for i in range(n)] if tokens is None else list(tokens)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens for {n} scores")
    if top_tokens is None:
        top_tokens = [[tok, *TOP_TOKENS] for tok in tokens]
    if top_probs is None:
        top_probs = [TOP_PROBS[: len(row)] for row in top_tokens]
    texts = [*prompt_tokens, *tokens]
    values: dict[str, Any] = {
        "id": ex_id,
        "prompt": "".join(prompt_tokens),
        "response": "".join(tokens),
        "convention": "prompt",
        "token_ids": [token_id(t) for t in texts],
        "tokens": texts,
        "response_start": len(prompt_tokens),
        "logprob": logprob,
        "rank": [1 + i % 3 for i in range(n)],
        "top_ids": [[token_id(t) for t in row] for row in top_tokens],
        "top_tokens": [list(row) for row in top_tokens],
        "top_logprobs": [[math.log(p) for p in row] for row in top_probs],
    }
    return ScoredExample(**{**values, **fields})


def scores_of(examples: Sequence[ScoredExample]) -> TokenScores:
    """The columns of scored records (what every dataset-level function takes)."""
    return TokenScores.from_examples(list(examples))


def columns(groups: Mapping[str, Sequence[ScoredExample]]) -> dict[str, TokenScores]:
    """Groups of records (source -> examples) as groups of columns."""
    return {source: scores_of(examples) for source, examples in groups.items()}


#: Token texts of `synthetic` scores (token id = index).
SYNTHETIC_TEXTS = [
    "Ġdef",
    "Ġx",
    "(",
    "):",
    "Ċ",
    "Ġreturn",
    "Ġ42",
    "<|im_end|>",
    "Ġ",
    "3.14",
    "é",
    "==",
]


def synthetic(n: int = 12, k: int = 3, seed: int = 7) -> TokenScores:
    """Small columnar scores with the awkward cases: an example without response tokens (3), a
    truncated one (5), repeated perplexities, metas, and two data sources."""
    rng = np.random.default_rng(seed)
    n_resp = rng.integers(1, 30, n)
    n_resp[3] = 0
    n_prompt = rng.integers(2, 12, n)
    tok_off, off = _offsets(n_prompt + n_resp), _offsets(n_resp)
    r = int(off[-1])
    logprob = np.round(-rng.exponential(1.5, r), 1)  # rounded: ties between tokens
    vocab = dict(enumerate(SYNTHETIC_TEXTS))
    truncated = np.zeros(n, dtype=bool)
    truncated[5] = True
    return TokenScores(
        ids=tuple(f"ex-{i}" for i in range(n)),
        prompts=tuple(f"Solve this.\n\nProblem {i}: add {i} and 1." for i in range(n)),
        responses=tuple(f"def f():\n    return {i + 1}\n" for i in range(n)),
        conventions=("prompt",) * n,
        token_ids=rng.integers(0, len(SYNTHETIC_TEXTS), int(tok_off[-1])).astype(np.int32),
        token_offsets=tok_off,
        response_start=n_prompt.astype(np.int32),
        logprob=logprob,
        offsets=off,
        rank=rng.integers(0, 9, r).astype(np.int32),
        top_ids=rng.integers(0, len(SYNTHETIC_TEXTS), (r, k)).astype(np.int32),
        top_logprobs=np.sort(-rng.exponential(2.0, (r, k)).astype(np.float32), axis=1),
        truncated=truncated,
        vocab=vocab,
        sources=("ground_truth",) * (n - 2) + ("self_output",) * 2,
        metas=tuple({"answer": str(i)} if i % 2 else {} for i in range(n)),
    )


# --------------------------------------------------------------------------- run folders

#: Six prompt/response pairs on disk (ids ex-1..): the data of `make_adapter_run`'s runs.
SAMPLE = Path(__file__).resolve().parent / "data" / "sample.jsonl"


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runs folder ($PLENS_RUNS_DIR) under the test's tmp_path."""
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    return root


@pytest.fixture
def trained_run(tiny_model_dir: Path, runs: Path) -> Path:
    """A finished STM run folder of the tiny model: config, summary (final step 3) and a LoRA
    adapter with non-zero weights (so it changes the model)."""
    from peft import LoraConfig, get_peft_model  # lazy: heavy
    from transformers import AutoModelForCausalLM  # lazy: heavy

    run = runs_dir() / "20260101-000000-stm1"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run / "adapter")
    (run / "config.json").write_text(json.dumps({"method": "stm", "tau": 2.5, "task": "mbpp"}))
    (run / "summary.json").write_text(json.dumps({"final_step": 3}))
    return run


def make_run(
    root: Path,
    run_id: str,
    method: str,
    tau: float | None,
    share: float | None,
    scores: Mapping[int, Mapping[str, tuple[str, float, str]]],
    bwt_ti: Mapping[int, tuple[float | None, float | None]],
    seed: int = 0,
) -> Path:
    """A finished training run folder without weights: config, summary and metrics.jsonl (a
    data record, 4 train steps, `scores` as {step: {task: (metric, value, role)}} evaluation
    records, `bwt_ti` as {step: (bwt, ti)} summaries, done, then a half-written last line)."""
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"method": method, "tau": tau, "seed": seed, "model": "default"})
    )
    recs = [{"kind": "data", "time": 100.0, "method": method, "tau": tau, "masked_share": share}]
    recs += [
        {
            "kind": "train",
            "step": s,
            "epoch": s / 4,
            "time": 100.0 + s,
            "loss": 2.0 - 0.1 * s,
            "lr": 1e-4,
        }
        for s in range(1, 5)
    ]
    for step, values in scores.items():
        for task, (metric, value, role) in values.items():
            recs.append(
                {
                    "kind": "eval",
                    "step": step,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "n": 20,
                    "role": role,
                }
            )
    for step, (bwt, ti) in bwt_ti.items():
        recs.append({"kind": "eval_summary", "step": step, "bwt": bwt, "ti": ti})
    recs.append({"kind": "done", "step": 4})
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra'  # half-written last line
    (folder / "metrics.jsonl").write_text(text)
    (folder / "summary.json").write_text(
        json.dumps({"train_runtime_s": 40.0, "wall_time_s": 60.0, "finished": 160.0})
    )
    return folder


def make_gt_and_stm_runs(root: Path) -> Path:
    """Two finished runs under `root` (records only): gt1 (MBPP pass@1 0.20 -> 0.25, GSM8K acc
    0.10 -> 0.05: BWT -50%, TI +25%) and stm1 at τ 2.5 (0.20 -> 0.22, GSM8K unchanged: BWT 0,
    TI +10%)."""
    base = {"mbpp": ("pass@1", 0.20, "target"), "gsm8k": ("acc", 0.10, "ood")}
    make_run(
        root,
        "gt1",
        "gt",
        None,
        None,
        {0: base, 4: {"mbpp": ("pass@1", 0.25, "target"), "gsm8k": ("acc", 0.05, "ood")}},
        {0: (0.0, 0.0), 4: (-50.0, 25.0)},
    )
    make_run(
        root,
        "stm1",
        "stm",
        2.5,
        0.3,
        {0: base, 4: {"mbpp": ("pass@1", 0.22, "target"), "gsm8k": ("acc", 0.10, "ood")}},
        {0: (0.0, 0.0), 4: (0.0, 10.0)},
    )
    return root


def make_adapter_run(
    root: Path, run_id: str, model_dir: Path, *, method: str = "stm", seed: int = 1
) -> Path:
    """A finished run folder: config.json training `model_dir` on tests/data/sample.jsonl, and
    a LoRA adapter with random (non-zero) B matrices in adapter/, as training saves it."""
    import torch  # lazy: heavy
    from peft import LoraConfig, get_peft_model  # lazy: heavy
    from transformers import AutoModelForCausalLM  # lazy: heavy

    folder = root / run_id
    folder.mkdir(parents=True)
    config = {
        "model": str(model_dir),
        "task": None,
        "data": str(SAMPLE),
        "id_col": "id",
        "method": method,
        "tau": 2.5,
        "seed": 0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text(
        json.dumps({"kind": "data", "time": 1.0, "method": method, "tau": 2.5}) + "\n"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    peft_model.save_pretrained(folder / "adapter")
    return folder


def write_training_run(root: Path, name: str = "r1", **settings: Any) -> Path:
    """A finished cpu-quick run: 16 s per step of 8 sequences, a 30 s evaluation round at step 0
    and one of 40 s at step 4."""
    folder = root / name
    folder.mkdir(parents=True)
    config = TrainConfig.from_preset(
        "cpu-quick",
        device="cpu",
        eval_every=4,
        eval_suite={"suite": "during", "limit": None},
        **settings,
    )
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    rows = [
        {"kind": "data", "time": 990.0},
        {"kind": "start", "time": 1000.0, "step": 0, "max_steps": 8},
        {"kind": "eval", "time": 1020.0, "step": 0, "task": "a", "metric": "nll", "value": 1.0},
        {"kind": "eval", "time": 1030.0, "step": 0, "task": "b", "metric": "nll", "value": 1.0},
        {"kind": "train", "time": 1046.0, "step": 1, "loss": 1.0},
        {"kind": "train", "time": 1062.0, "step": 2, "loss": 0.9},
        {"kind": "train", "time": 1078.0, "step": 3, "loss": 0.8},
        {"kind": "eval", "time": 1134.0, "step": 4, "task": "a", "metric": "nll", "value": 1.0},
        {"kind": "train", "time": 1135.0, "step": 4, "loss": 0.7},
        {"kind": "train", "time": 1151.0, "step": 5, "loss": 0.7},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_generation_run(root: Path, name: str = "g1", **settings: Any) -> Path:
    """A cpu-quick generation run: 2 prompts x 4 samples of 96 tokens (half the 192 limit) in
    2 x 8 s of generation, 20 s of wall time."""
    folder = root / name
    folder.mkdir(parents=True)
    config = GenDataConfig.from_preset("cpu-quick", device="cpu", **settings)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    cands = [{"n_tokens": 96, "text": "x", "correct": False} for _ in range(4)]
    records = [{"id": f"p{i}", "seconds": 8.0, "candidates": cands} for i in range(2)]
    (folder / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "gendata.json").write_text(json.dumps({"wall_seconds": 20.0}))
    return folder


# --------------------------------------------------------------------------- protocols


def sweep_row(setting: str, arc_low: float, arc_high: float) -> dict[str, Any]:
    """One setting of a recorded CPU sweep: its ARC-Easy interval and a target gain."""
    interval = {"estimate": (arc_low + arc_high) / 2, "low": arc_low, "high": arc_high, "n": 570}
    target = {"estimate": -0.3, "low": -0.4, "high": -0.2, "n": 60}
    return {
        "setting": setting,
        "finetune": "full",
        "learning_rate": 1e-4,
        "paired": {
            "arc_easy acc": {**interval, "role": "ood", "higher_is_better": True},
            "mbpp_ppl nll": {**target, "role": "target", "higher_is_better": False},
        },
    }


def finished_protocol(root: Path) -> dict[str, Any]:
    """A finished cpu protocol (gt and stm, seeds 0 and 1) under `root`: its run folders
    (`make_run`), config, results and report; returns the results."""
    config = ProtocolConfig.from_preset("cpu", methods=["gt", "stm"], seeds=[0, 1])
    folder = root / "protocol-cpu"
    folder.mkdir()
    write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    runs = []
    for arm, share, forgetting in (("gt", None, (10.0, 10.2)), ("stm", 0.3, (1.0, 1.2))):
        for seed, easy in zip((0, 1), forgetting, strict=True):
            rid = f"protocol-cpu-{arm}-s{seed}"
            base = {"mbpp_ppl": ("nll", 1.4, "target"), "arc_challenge": ("acc", 0.25, "ood")}
            end = {"mbpp_ppl": ("nll", 1.2, "target"), "arc_challenge": ("acc", 0.25, "ood")}
            tau = 2.5 if arm == "stm" else None
            bwt_ti = {0: (0.0, None), 4: (0.0, None)}
            make_run(root, rid, arm, tau, share, {0: base, 4: end}, bwt_ti, seed=seed)
            summary = {"kind": "eval_summary", "step": 4, "bwt": 0.0, "ti": None}
            with open(root / rid / "metrics.jsonl", "a") as fh:  # after the half-written line
                fh.write("\n" + json.dumps({**summary, "nll_easy_change": easy}) + "\n")
            label = "ground truth" if arm == "gt" else "STM τ=2.5"
            runs.append(
                {"arm": arm, "label": label, "seed": seed, "run": rid, "status": "succeeded"}
            )
    results = aggregate(config, runs, ["a note"], 120.0)
    write_protocol_report(results, [r["run"] for r in runs], folder / REPORT_HTML)
    write_json_atomic(folder / RESULTS_JSON, results)
    return results


# --------------------------------------------------------------------------- drift

#: The prompts of `make_drift_run`'s probe file.
DRIFT_PROMPTS = (
    "Write a function that adds two numbers.",
    "What is the capital of France?",
    "Name three primes.",
)


def lora(lm: LoadedModel, *, trained: bool, seed: int = 0) -> LoadedModel:
    """`lm` with a fresh LoRA adapter on a deep copy of its model; `trained` perturbs lora_B
    (a fresh adapter's B is zero)."""
    import torch  # lazy: heavy
    from peft import LoraConfig, get_peft_model  # lazy: heavy

    model = get_peft_model(
        copy.deepcopy(lm.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    if trained:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.eval()
    return replace(lm, model=model)


def drift_task_result(name: str, task: str, details: list[dict], role: str = "ood") -> TaskResult:
    """A drift task's result from per-item details, as `run_suite` saves it (no metrics for
    details too broken to pool)."""
    try:
        metrics = drift_metrics(details)
    except (KeyError, TypeError, ValueError):
        metrics = {}
    return TaskResult(name, task, "drift", role, "kl", metrics, len(details), 0.1, details)


def save_round(run: Path, step: int, tasks: list[TaskResult], adapter: str | None = None) -> None:
    """An evaluation round of `tasks` at `step`, saved in the run folder as the runner saves it."""
    result = SuiteResult("fake", "fp", "default", adapter, tasks, 1.0, created=1.0)
    write_json_atomic(eval_round_path(run, step), result.to_dict())


def make_drift_run(root: Path, model_dir: Path, *, step: int = 3, run_id: str = "stm-run") -> Path:
    """A finished STM run of the tiny model: a LoRA adapter with non-zero weights saved as its
    final adapter (summary final_step = `step`), and rounds at step 0 (the base: KL 0) and at
    `step` whose drift task ("drift:probe", a user's probe file of `DRIFT_PROMPTS`) was scored
    with that very adapter, so the recomputed top-k must agree with it."""
    import torch  # lazy: heavy
    from peft import LoraConfig, get_peft_model  # lazy: heavy
    from transformers import AutoModelForCausalLM  # lazy: heavy

    from core.model.loading import load_model  # lazy: heavy (torch)

    run = root / run_id
    run.mkdir(parents=True)
    probe_file = root / f"{run_id}-probe.txt"
    probe_file.write_text("\n".join(DRIFT_PROMPTS) + "\n")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(run / "adapter")
    (run / "config.json").write_text(
        json.dumps({"method": "stm", "tau": 2.5, "model": str(model_dir), "task": "mbpp"})
    )
    (run / "summary.json").write_text(json.dumps({"final_step": step}))
    append_metric(
        run,
        {
            "kind": "data",
            "time": 1.0,
            "method": "stm",
            "tau": 2.5,
            "mask": "high, tau=2.5",
            "masked_share": 0.18,
            "source": "mbpp/train: 8 examples",
            "n_examples": 8,
            "n_response_tokens": 900,
        },
    )
    probe = load_probe(FILE_PREFIX + str(probe_file))
    base = load_model(str(model_dir), device="cpu", dtype="float32")
    name, task = "drift:probe", FILE_PREFIX + str(probe_file)
    _, base_details, _ = score_drift(base, probe, max_new_tokens=8, is_base=True)
    save_round(run, 0, [drift_task_result(name, task, base_details)])
    tuned = load_adapter(base, run / "adapter")
    _, details, _ = score_drift(tuned, probe, max_new_tokens=8, is_base=False)
    save_round(run, step, [drift_task_result(name, task, details)])
    return run


def hand_details() -> list[dict]:
    """Three items: 'a' (arc_easy) and 'b' (arc_easy) and 'c' (gsm8k), per-token KL chosen so
    every aggregate can be checked by hand."""

    def one(item_id, domain, ids, kl, dlp):
        kl, dlp = np.asarray(kl, float), np.asarray(dlp, float)
        stats = {
            "kl": kl,
            "agree": kl < 0.5,
            "ref_lp": np.full(kl.size, -1.0),
            "tuned_lp": -1.0 + dlp,
            "ref_ent": np.ones(kl.size),
            "tuned_ent": np.ones(kl.size),
        }
        return item_details(item_id, domain, ids, stats)

    return [
        one("a", "arc_easy", [10, 11, 12, 13, 11], [1.0, 0.2, 0.0, 0.0, 0.8], [-2, 0, 0, 0, -1]),
        one("b", "arc_easy", [11, 11], [0.1, 0.1], [0.1, 0.1]),
        one("c", "gsm8k", [10, 10, 10, 10, 10, 10], [0.3] * 6, [-0.3] * 6),
    ]


# --------------------------------------------------------------------------- token losses


def write_train_rows(path: Path) -> Path:
    """`TRAIN_ROWS` as a JSONL training file at `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS), encoding="utf-8")
    return path


def tiny_config(model_dir: Path, data_file: Path, **overrides: Any) -> TrainConfig:
    """A training config of the tiny model on `data_file`: fp32 on the CPU, 64 tokens, batches of
    3, two steps (`overrides` on top)."""
    base = dict(
        model=str(model_dir),
        device="cpu",
        task=None,
        data=str(data_file),
        id_col="id",
        max_length=64,
        batch_size=3,
        learning_rate=1e-3,
        max_steps=2,
        precision="fp32",
    )
    return TrainConfig.from_preset("paper", **{**base, **overrides})


def tiny_protocol_config(model_dir: Path, **overrides: Any) -> ProtocolConfig:
    """The `cpu` protocol on the tiny model, sized for a test: ground truth and STM-25%, seed 0,
    8 examples of 96 tokens, one epoch in batches of 4 at lr 1e-2, the `tiny` suite
    (`overrides` on top)."""
    base = dict(
        model=str(model_dir),
        methods=["gt", "stm_share"],
        seeds=[0],
        limit=8,
        max_length=96,
        epochs=1.0,
        batch_size=4,
        learning_rate=1e-2,
        suite="tiny",
    )
    return ProtocolConfig.from_preset("cpu", **{**base, **overrides})


def loss_config(model_dir: Path, data_file: Path, **overrides: Any) -> TrainConfig:
    """The token-loss tests' training config: `tiny_config` with one batch of all six rows and
    no LoRA dropout (a naive pass must see the same network as the trainer's)."""
    return tiny_config(model_dir, data_file, **{"batch_size": 6, "lora_dropout": 0.0, **overrides})


@pytest.fixture(scope="session")
def fitted_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model fitted a little to the six rows (full fine-tune, 32 Adam steps): the
    rows' tokens get probabilities across (0, 1) and the top-K entropies vary, so every loss's
    weights spread instead of all being ~1/V (a random model's probability of any token)."""
    import torch  # lazy: heavy

    from core.model.loading import load_model  # lazy: heavy (torch)

    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    encs = [
        encode_pair(lm.tokenizer, r["prompt"], r["response"], max_length=64) for r in TRAIN_ROWS
    ]
    width = max(len(e.input_ids) for e in encs)
    ids = torch.zeros(len(encs), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, enc in enumerate(encs):
        n = len(enc.input_ids)
        ids[i, :n] = torch.tensor(enc.input_ids)
        attention[i, :n] = 1
        labels[i, enc.response_start : n] = ids[i, enc.response_start : n]
    torch.manual_seed(0)
    model = lm.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(32):
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("fitted-tiny")
    model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def loss_trainer(
    tmp_path: Path, model_dir: Path, data_file: Path, *, perturb: bool = True, **overrides: Any
) -> tuple[Any, dict[str, Any]]:
    """A trainer of `overrides` (`loss_config`) on a fresh copy of `model_dir` and one batch of
    all six rows; with `perturb`, the LoRA B matrices are random (a fresh adapter is the base
    exactly)."""
    import torch  # lazy: heavy

    from core.model.loading import load_model  # lazy: heavy (torch)
    from core.training.trainer import build_trainer  # lazy: heavy (trl)

    config = loss_config(model_dir, data_file, **overrides)
    lm = load_model(str(model_dir), device="cpu", dtype="float32")
    trainer, _ = build_trainer(config, tmp_path / "run", lm=lm)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return trainer, trainer._prepare_inputs(batch)
