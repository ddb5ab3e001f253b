"""Where a run forgot, the model side: the run's tokenizer and one item's probe text, the base
and tuned model's top-k next tokens at every answer position of ONE item (two forward passes of
one sequence; the base's logits from the same model with its adapter disabled, as in the rounds),
and the weights a round evaluated (the checkpoint of that step, the final adapter, or the adapter
an evaluation job used), loaded once per process (`TUNED_SLOT`), with the recomputed KL checked
against the saved one. The rounds, items and aggregates are in `core.study.drift`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.data.records import Example
from core.data.tasks import get_task
from core.errors import LensError
from core.eval.drift import reference_logits_model, token_drift
from core.eval.probes import is_probe_name, load_probe
from core.eval.runner import load_adapter
from core.eval.scorers import SuiteResult, TaskResult
from core.io import file_stamp, read_json
from core.jobs.runfiles import (
    ADAPTER_DIR,
    SUMMARY_JSON,
    checkpoint_step,
    checkpoints,
)
from core.model.encoding import encode_prompt
from core.study.drift import (
    KL_TOLERANCE,
    TOP_K,
    DriftItem,
    drift_items,
    drift_tasks,
    load_round,
)
from core.viz.drift import TokenHover

if TYPE_CHECKING:  # torch at import: the models are loaded on demand
    from core.model.loading import LoadedModel

# --------------------------------------------------------------------------------------------
# Tokens: the run's tokenizer, one item's probe text
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Any:
    """The tokenizer of `model` (as a run's config names it: "default", a folder, a .gguf file
    or a Hugging Face id in the local cache), without loading the model."""
    from transformers import AutoTokenizer  # lazy: heavy

    from core.model.loading import DEFAULT_MODEL, prepare_embedded_model  # lazy: heavy (torch)

    try:
        if model == DEFAULT_MODEL:
            return AutoTokenizer.from_pretrained(str(prepare_embedded_model()))
        path = Path(model).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except LensError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise LensError(
            f"The tokenizer of model '{model}' cannot be loaded here: {first}"
        ) from None


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Readable text of each token id (decoded one at a time, as the heatmaps show tokens).
    LensError for an id outside the vocabulary (the round was made with another tokenizer)."""
    size = len(tokenizer)
    wrong = [i for i in ids if not 0 <= int(i) < size]
    if wrong:
        raise LensError(
            f"Token id {wrong[0]} is outside this tokenizer's {size}-token vocabulary: the round "
            "was not made with the run's model."
        )
    unique = sorted(set(int(i) for i in ids))
    texts = dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]), strict=True))
    return [texts[int(i)] for i in ids]


def probe_example(task: TaskResult, item_id: str) -> tuple[Example, bool]:
    """The probe item `item_id` of a drift task (its prompt, or its passage for the text probe)
    and whether the probe is plain text. LensError when the probe no longer has it."""
    name = task.task
    if is_probe_name(name):
        probes = [load_probe(name)]
    else:
        probes = [load_probe(name, split) for split in get_task(name).splits]
    for probe in probes:
        for ex in probe.items:
            if ex.id == item_id:
                return ex, probe.plain_text
    raise LensError(
        f"Probe item '{item_id}' is not among the items of '{name}' here (the probe's "
        "data changed, or a probe file moved)."
    )


def prefix_ids(
    tokenizer: Any, example: Example, plain_text: bool, answer: Sequence[int]
) -> list[int]:
    """The token ids before the answer in the teacher-forced sequence: the chat-templated prompt
    (`encode_prompt`), or for the text probe the BOS token (the passage's first token when the
    tokenizer has none), as `core.eval.drift` builds them. LensError when the passage does not
    tokenize to the saved ids."""
    if not plain_text:
        return encode_prompt(tokenizer, example.prompt)
    ids = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    head, body = ([bos], ids) if bos is not None else (ids[:1], ids[1:])
    if body != list(answer):
        raise LensError(
            f"Passage '{example.id}' tokenizes differently from the saved round's "
            "tokens: the round was made with another tokenizer."
        )
    return head


# --------------------------------------------------------------------------------------------
# Top-k alternatives of one item (two forward passes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenAlternatives:
    """Per answer token (rows), both models' top-k next tokens and the answer token's
    probability under each, and the recomputed KL(base ‖ tuned)."""

    answer_ids: tuple[int, ...]
    base_ids: np.ndarray = field(repr=False)  # (T, k) token ids, most likely first
    base_probs: np.ndarray = field(repr=False)  # (T, k)
    tuned_ids: np.ndarray = field(repr=False)
    tuned_probs: np.ndarray = field(repr=False)
    base_p: np.ndarray = field(repr=False)  # (T,) probability of the answer token
    tuned_p: np.ndarray = field(repr=False)
    kl: np.ndarray = field(repr=False)  # (T,) nats

    @property
    def k(self) -> int:
        """Alternatives per token."""
        return int(self.base_ids.shape[1])


#: Device and dtype of the on-demand top-k passes: float32, as the rounds are evaluated.
ALT_DEVICE, ALT_DTYPE = "auto", "float32"


def _answer_logits(lm: LoadedModel, ids: Sequence[int], start: int) -> Any:
    """The logits of the positions that predict tokens `start`.. of `ids` (one sequence)."""
    import torch  # lazy: heavy

    x = torch.tensor([list(ids)], dtype=torch.long, device=lm.device)
    logits = lm.model(input_ids=x, use_cache=False).logits
    return logits[0, start - 1 : len(ids) - 1].double().cpu()


def token_alternatives(
    lm: LoadedModel,
    prefix: Sequence[int],
    answer: Sequence[int],
    *,
    k: int = TOP_K,
    reference: LoadedModel | None = None,
    is_base: bool = False,
) -> TokenAlternatives:
    """Teacher-force `prefix` + `answer` through the base and the tuned model and return, per
    answer token, each model's top-`k` next tokens with probabilities, the answer token's
    probability under each and the token KL(base ‖ tuned), computed as the rounds compute it.

    `lm` is the tuned model; the base's logits are `reference`'s when given, else `lm`'s with
    its PEFT adapter disabled; `is_base` says `lm` is the base itself (one pass, KL 0)."""
    import torch  # lazy: heavy

    if not prefix:
        raise LensError("The teacher-forced sequence needs at least one token before the answer.")
    if not answer:
        raise LensError("The item has no answer tokens to explain.")
    ids = [*prefix, *answer]
    if len(ids) > lm.max_length:
        raise LensError(
            f"The item is {len(ids)} tokens long, more than the model's "
            f"{lm.max_length}-token context."
        )
    start = len(prefix)
    with torch.inference_mode():
        tuned = _answer_logits(lm, ids, start)
        if is_base and reference is None:
            base = tuned
        else:
            with reference_logits_model(lm, reference, is_base) as ref:
                base = _answer_logits(ref, ids, start)
        stats = token_drift(base, tuned, torch.tensor(list(answer)))
        k = max(1, min(k, base.shape[-1]))
        b_top = torch.log_softmax(base, dim=-1).topk(k, dim=-1)
        t_top = torch.log_softmax(tuned, dim=-1).topk(k, dim=-1)
    return TokenAlternatives(
        answer_ids=tuple(int(i) for i in answer),
        base_ids=b_top.indices.numpy(),
        base_probs=b_top.values.exp().numpy(),
        tuned_ids=t_top.indices.numpy(),
        tuned_probs=t_top.values.exp().numpy(),
        base_p=np.exp(stats["ref_lp"]),
        tuned_p=np.exp(stats["tuned_lp"]),
        kl=stats["kl"],
    )


# --------------------------------------------------------------------------------------------
# The weights a round evaluated, and the one model slot for them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundWeights:
    """Which model a round evaluated: "base" (step 0), "adapter" (a PEFT folder) or "full" (a
    full fine-tune's model folder) at `path`; `kind` "" with `reason` when none is kept."""

    kind: str
    path: Path | None = None
    describe: str = ""
    reason: str = ""


def _weights_in(folder: Path, describe: str) -> RoundWeights | None:
    if (folder / "adapter_config.json").is_file():
        return RoundWeights("adapter", folder, describe)
    if (folder / "config.json").is_file():
        return RoundWeights("full", folder, describe)
    return None


def round_weights(
    run_dir: str | Path, step: int, result: SuiteResult | None = None
) -> RoundWeights:
    """The weights the round of `step` evaluated: the base model at step 0, the adapter an
    evaluation job recorded, the run's `checkpoint-<step>/`, or its final `adapter/` when the run
    ended at that step (summary.json's `final_step`)."""
    root = Path(run_dir)
    if result is not None and result.adapter:
        found = _weights_in(
            Path(result.adapter), f"the adapter this round evaluated ({result.adapter})"
        )
        if found is not None:
            return found
        return RoundWeights(
            "", reason=f"the adapter this round evaluated ({result.adapter}) is gone"
        )
    if step == 0:
        return RoundWeights("base", None, "the base model (step 0)")
    kept = []
    for folder in checkpoints(root):
        n = checkpoint_step(folder)
        kept.append(n)
        if n == step:
            found = _weights_in(folder, f"checkpoint of step {step}")
            if found is not None:
                return found
    summary = read_json(root / SUMMARY_JSON)
    final = summary.get("final_step") if isinstance(summary, dict) else None
    if final == step:
        found = _weights_in(root / ADAPTER_DIR, f"the final adapter (step {step})")
        if found is not None:
            return found
    have = []
    if kept:
        have.append("checkpoints of step " + ", ".join(str(n) for n in kept))
    if isinstance(final, int) and (root / ADAPTER_DIR).is_dir():
        have.append(f"the final adapter of step {final}")
    return RoundWeights(
        "",
        reason=f"the run keeps no weights of step {step} ("
        + ("; ".join(have) if have else "no checkpoint or adapter saved")
        + "), so the top-5 cannot be recomputed for this round",
    )


class TunedSlot:
    """One (base + round weights) model per process for the on-demand top-k passes, and the lock
    that serialises them (disabling an adapter is not thread-safe). Loading other weights frees
    the previous ones. The app's shared model (`core.model.loading.MODEL_SLOT`) is never used:
    applying an adapter changes the base model in place."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._models: tuple[Any, Any | None] | None = None

    def get(self, model: str, weights: RoundWeights, device: str = ALT_DEVICE) -> tuple[Any, Any]:
        """(tuned model, reference or None) for `weights` on top of `model`; call with `lock`
        held."""
        import gc

        from core.model.loading import load_model  # lazy: heavy (torch)

        path = weights.path
        marker = "adapter_config.json" if weights.kind == "adapter" else "config.json"
        stamp = file_stamp(path / marker) if path is not None else None  # a re-saved folder reloads
        key = (model, weights.kind, str(path), stamp, device)
        if self._key == key and self._models is not None:
            return self._models
        self._key, self._models = None, None
        gc.collect()
        if weights.kind == "base":
            models: tuple[Any, Any | None] = (load_model(model, device, ALT_DTYPE), None)
        elif weights.kind == "adapter":
            assert path is not None
            models = (load_adapter(load_model(model, device, ALT_DTYPE), path), None)
        elif weights.kind == "full":
            models = (
                load_model(str(path), device, ALT_DTYPE),
                load_model(model, device, ALT_DTYPE),
            )
        else:
            raise LensError(weights.reason or "No weights to load for this round.")
        self._key, self._models = key, models
        return models

    def clear(self) -> None:
        """Drop the held models."""
        with self.lock:
            self._key, self._models = None, None


TUNED_SLOT = TunedSlot()


@dataclass
class ItemAlternatives:
    """What the page shows for one item beyond the round: the probe text, and (when the round's
    weights are kept) both models' top-k per answer token with their texts."""

    item_id: str
    prompt: str
    plain_text: bool
    weights: str = ""
    alternatives: TokenAlternatives | None = None
    base_texts: list[list[str]] = field(default_factory=list)
    tuned_texts: list[list[str]] = field(default_factory=list)
    note: str = ""  # the recomputed KL disagrees with the saved one, or why there is no top-k

    def hovers(self) -> list[TokenHover] | None:
        """Per answer token, what the hover shows (None without alternatives)."""
        alt = self.alternatives
        if alt is None:
            return None
        return [
            TokenHover(
                base_p=float(alt.base_p[i]),
                tuned_p=float(alt.tuned_p[i]),
                base_top=list(zip(self.base_texts[i], alt.base_probs[i].tolist(), strict=True)),
                tuned_top=list(zip(self.tuned_texts[i], alt.tuned_probs[i].tolist(), strict=True)),
            )
            for i in range(len(alt.answer_ids))
        ]


def find_item(task: TaskResult, item_id: str) -> DriftItem:
    """One item of a drift task by id (LensError when absent or unusable)."""
    items, _ = drift_items(task)
    for it in items:
        if it.id == item_id:
            return it
    raise LensError(f"'{task.name}' has no usable item '{item_id}'.")


def item_alternatives(
    run_dir: str | Path,
    model: str,
    step: int,
    task_name: str,
    item_id: str,
    *,
    k: int = TOP_K,
    device: str = ALT_DEVICE,
    on_prompt: Callable[[ItemAlternatives], None] | None = None,
    status: Callable[[str], None] | None = None,
) -> ItemAlternatives:
    """The probe text of one item of a saved round and, when the round's weights are kept, both
    models' top-`k` at each answer token (`token_alternatives`), checked against the round's
    saved token KL. `on_prompt` gets the result early, with the probe text only (a page shows it
    while the models load); `status` gets one line per stage."""

    def say(text: str) -> None:
        if status:
            status(text)

    result = load_round(run_dir, step)
    task = next((t for t in drift_tasks(result) if t.name == task_name), None)
    if task is None:
        raise LensError(f"The round of step {step} has no drift task '{task_name}'.")
    item = find_item(task, item_id)
    say("finding the probe item")
    try:
        example, plain = probe_example(task, item_id)
    except LensError as exc:
        raise LensError(
            f"The probe text of '{item_id}' cannot be found, so its top-{k} cannot be "
            f"computed: {exc}"
        ) from None
    out = ItemAlternatives(item_id, example.prompt, plain)
    weights = round_weights(run_dir, step, result)
    if not weights.kind:
        out.note = weights.reason
        return out
    out.weights = weights.describe
    if on_prompt:
        on_prompt(ItemAlternatives(item_id, example.prompt, plain, weights.describe))
    with TUNED_SLOT.lock:
        say(f"loading {model} with {weights.describe}")
        lm, reference = TUNED_SLOT.get(model, weights, device)
        prefix = prefix_ids(lm.tokenizer, example, plain, item.ids)
        say("two forward passes (base and tuned)")
        alt = token_alternatives(
            lm, prefix, item.ids, k=k, reference=reference, is_base=weights.kind == "base"
        )
        out.base_texts = [lm.token_texts([int(i) for i in row]) for row in alt.base_ids]
        out.tuned_texts = [lm.token_texts([int(i) for i in row]) for row in alt.tuned_ids]
    out.alternatives = alt
    gap = float(np.max(np.abs(alt.kl - item.kl))) if item.tokens else 0.0
    if gap > KL_TOLERANCE + 0.02 * float(np.max(item.kl)):
        out.note = (
            f"The recomputed token KL differs from the round's by up to {gap:.3f} nats: "
            f"{weights.describe} may not be the model this round evaluated (or it ran in "
            "another precision), so read the top-5 with care."
        )
    return out
