"""Drift from the base model: how far a tuned model's next-token distributions moved, token by
token, on the base model's own answers to a probe (`core.eval.probes`).

For a prompt probe the base model answers each prompt once, greedily (`max_new_tokens` tokens,
cached per model, chat template, prompt and length in `<cache_dir()>/probe_answers.sqlite`).
Every later model is teacher-forced on prompt + that answer; at each answer position the base
distribution p and the tuned distribution q over the full vocabulary give (float64):

- token KL(p || q) = sum_v p_v (log p_v - log q_v): forward KL, base first (RL's Razor);
- top-1 agreement: argmax q == argmax p (llama.cpp's "same top p");
- the answer token's NLL under both (its change is "dnll"; the answer is the base's greedy
  choice, so a negative dnll means the tuned model grew MORE sure of the base's own answer);
- the entropies of p and q;
- the KL split by direction: positions where q gave the answer token at least the base's
  probability (sharpening toward the base's own answer, "kl_toward") and the rest ("kl_away").
  kl = kl_toward + kl_away exactly.

A general-text probe (`probes.PROBE_TEXT`) is teacher-forced on the passage itself (plain text,
no chat template), and also reports the change in bits per byte of the passage ("dbpb").

The base logits come from the same process: with a PEFT adapter (LoRA, DoRA) the adapter is
disabled for the reference pass (`PeftModel.disable_adapter`), so the KL is exact; a full fine-
tune needs a frozen copy of the base passed as `reference` (it costs one more model in memory:
the base's parameter bytes, `reference_bytes`). The base model against itself (no adapter, no
reference) is drift 0 by definition and is scored in one pass. Where the output head allows it,
the base's side is kept as an exact per-position summary (`core.eval.base_summary`), so a round
after the first runs the tuned pass alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import LensError
from core.eval.base_summary import (
    BaseSummaryCache,
    Summary,
    forward_with_hidden,
    plain_head,
    summarise,
    summary_drift,
    summary_model_key,
)
from core.eval.probes import FILE_PREFIX, Probe, load_probe
from core.io import cache_dir
from core.kvstore import KVCache
from core.model.encoding import EncodedPair, encode_prompt
from core.model.interface import GenerationConfig, LanguageModel

if TYPE_CHECKING:  # torch at import; a drift task's caller passes one (`require_loaded`)
    from core.model.loading import LoadedModel

#: Metrics of a drift task, the primary one first. Lower KL is less drift.
DRIFT_METRICS = (
    "kl",
    "kl_p99",
    "top1_agree",
    "dnll",
    "kl_toward",
    "kl_away",
    "dentropy",
    "base_nll",
    "dbpb",
)
#: What each metric means, for tables, charts and the report.
DRIFT_LABELS = {
    "kl": "token KL(base ‖ tuned), nats",
    "kl_p99": "p99 token KL, nats",
    "top1_agree": "top-1 agreement with the base",
    "dnll": "Δ NLL of the base's answer, nats/token",
    "kl_toward": "KL where the base's answer gained probability",
    "kl_away": "KL where the base's answer lost probability",
    "dentropy": "Δ entropy, nats/token",
    "base_nll": "the base's NLL of its own answer (diagnostic)",
    "dbpb": "Δ bits per byte",
}
#: Per-item (numerator, denominator) keys of each metric with a paired interval.
ITEM_RATIOS = {
    "kl": ("kl_sum", "tokens"),
    "top1_agree": ("agree", "tokens"),
    "kl_toward": ("kl_toward_sum", "tokens"),
    "kl_away": ("kl_away_sum", "tokens"),
}
#: Decimal places kept for per-token values in saved rounds (the "where it forgot" view).
TOKEN_DIGITS = 6
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Per-token statistics (the exact computation; tests compare it with a numpy reference)
# --------------------------------------------------------------------------------------------


def token_drift(ref_logits: Any, tuned_logits: Any, targets: Any) -> dict[str, np.ndarray]:
    """Per position (rows of the (T, V) logits), in float64: KL(p_ref || p_tuned), whether the
    two top-1 tokens agree, each side's log-probability of `targets` and each side's entropy."""
    import torch  # lazy: heavy

    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    tuned = torch.log_softmax(tuned_logits.double(), dim=-1)
    p = ref.exp()
    kl = (p * (ref - tuned)).sum(-1).clamp(min=0.0)
    tgt = targets.to(ref.device)[:, None]
    return {
        "kl": kl.cpu().numpy(),
        "agree": (ref.argmax(-1) == tuned.argmax(-1)).cpu().numpy(),
        "ref_lp": ref.gather(-1, tgt)[:, 0].cpu().numpy(),
        "tuned_lp": tuned.gather(-1, tgt)[:, 0].cpu().numpy(),
        "ref_ent": (-(p * ref).sum(-1)).cpu().numpy(),
        "tuned_ent": (-(tuned.exp() * tuned).sum(-1)).cpu().numpy(),
    }


def item_details(
    item_id: str,
    domain: str,
    ids: Sequence[int],
    stats: dict[str, np.ndarray],
    n_bytes: int | None = None,
) -> dict[str, Any]:
    """One probe item's saved detail: sums for pooled metrics and their paired intervals, and
    the per-token KL and Δ log-probability for the "where it forgot" view."""
    kl, ref_lp, tuned_lp = stats["kl"], stats["ref_lp"], stats["tuned_lp"]
    toward = tuned_lp >= ref_lp
    detail: dict[str, Any] = {
        "id": item_id,
        "domain": domain,
        "tokens": int(kl.size),
        "kl_sum": float(kl.sum()),
        "kl_max": float(kl.max()) if kl.size else 0.0,
        "agree": int(stats["agree"].sum()),
        "nll_base_sum": float(-ref_lp.sum()),
        "nll_tuned_sum": float(-tuned_lp.sum()),
        "ent_base_sum": float(stats["ref_ent"].sum()),
        "ent_tuned_sum": float(stats["tuned_ent"].sum()),
        "kl_toward_sum": float(kl[toward].sum()),
        "kl_away_sum": float(kl[~toward].sum()),
        "ids": [int(i) for i in ids],
        "token_kl": np.round(kl, TOKEN_DIGITS).tolist(),
        "token_dlp": np.round(tuned_lp - ref_lp, TOKEN_DIGITS).tolist(),
    }
    if n_bytes is not None:
        detail["bytes"] = int(n_bytes)
    return detail


def drift_metrics(details: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """A drift task's metrics, pooled over its items' tokens (see `DRIFT_LABELS`)."""
    tokens = sum(d["tokens"] for d in details)
    if not tokens:
        return dict.fromkeys(DRIFT_METRICS)

    def pooled(key: str) -> float:
        return sum(float(d[key]) for d in details) / tokens

    all_kl = np.concatenate([np.asarray(d["token_kl"], dtype=np.float64) for d in details])
    dnll = pooled("nll_tuned_sum") - pooled("nll_base_sum")
    n_bytes = sum(int(d.get("bytes") or 0) for d in details)
    delta_nats = sum(d["nll_tuned_sum"] - d["nll_base_sum"] for d in details)
    return {
        "kl": pooled("kl_sum"),
        "kl_p99": float(np.percentile(all_kl, 99)),
        "top1_agree": pooled("agree"),
        "dnll": dnll,
        "kl_toward": pooled("kl_toward_sum"),
        "kl_away": pooled("kl_away_sum"),
        "dentropy": pooled("ent_tuned_sum") - pooled("ent_base_sum"),
        "base_nll": pooled("nll_base_sum"),
        "dbpb": delta_nats / math.log(2) / n_bytes if n_bytes else None,
    }


def drift_item_scores(details: Sequence[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Per item id, (numerator, denominator) of a drift metric (None for one without a per-item
    ratio, e.g. the p99)."""
    if metric in ITEM_RATIOS:
        num, den = ITEM_RATIOS[metric]
        return {str(d["id"]): (float(d[num]), float(d[den])) for d in details}
    if metric == "dnll":
        return {
            str(d["id"]): (float(d["nll_tuned_sum"] - d["nll_base_sum"]), float(d["tokens"]))
            for d in details
        }
    if metric == "dentropy":
        return {
            str(d["id"]): (float(d["ent_tuned_sum"] - d["ent_base_sum"]), float(d["tokens"]))
            for d in details
        }
    if metric == "dbpb" and all(d.get("bytes") for d in details):
        return {
            str(d["id"]): ((d["nll_tuned_sum"] - d["nll_base_sum"]) / math.log(2), d["bytes"])
            for d in details
        }
    return None


# --------------------------------------------------------------------------------------------
# The base model's answers (cached)
# --------------------------------------------------------------------------------------------


class ProbeAnswerCache(KVCache[list[int]]):
    """The base model's greedy answer ids per (model + dtype, chat template, prompt, length)."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / "probe_answers.sqlite",
            "answers",
            encode=lambda ids: json.dumps(ids),
            decode=lambda value: list(json.loads(value)),
            value_type="TEXT",
        )

    @staticmethod
    def key(model_key: str, template_fp: str, prompt: str, max_new_tokens: int) -> str:
        """Cache key of one greedy answer."""
        payload = json.dumps([1, model_key, template_fp, prompt, int(max_new_tokens), "greedy"])
        return hashlib.sha256(payload.encode()).hexdigest()


def base_answers(
    base_lm: LanguageModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    cache: ProbeAnswerCache | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[list[int]], int]:
    """The base model's greedy answer ids to each prompt (from `cache` where it has them), and
    how many were generated now. `base_lm` must give the base model's logits."""
    keys = [
        ProbeAnswerCache.key(base_lm.cache_key, base_lm.template_fingerprint, p, max_new_tokens)
        for p in prompts
    ]
    found = cache.get_many(keys) if cache is not None else {}
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
        out = base_lm.generate(
            [prompts[i] for i in todo], config, batch_size=batch_size, progress=progress
        )
        fresh = {keys[i]: gens[0].token_ids for i, gens in zip(todo, out, strict=True)}
        if cache is not None:
            cache.put_many(fresh)
        found = {**found, **fresh}
    return [found[k] for k in keys], len(todo)


# --------------------------------------------------------------------------------------------
# The reference (base) model
# --------------------------------------------------------------------------------------------


def reference_bytes(model: Any) -> int:
    """Bytes of a model's parameters: the memory a frozen reference copy costs."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_same_tokenizer(lm: LanguageModel, reference: LanguageModel) -> None:
    """One line when the reference ("base") model's tokenizer differs from the tuned model's:
    token KL is only defined over one vocabulary."""
    a, b = lm.tokenizer, reference.tokenizer
    if len(a) != len(b) or a.get_vocab() != b.get_vocab():
        raise LensError(
            f"The base model '{reference.name}' has a different "
            f"tokenizer ({len(b)} tokens) from the tuned model '{lm.name}' "
            f"({len(a)} tokens): drift compares distributions over one vocabulary."
        )


def _adapter_switch(lm: LoadedModel) -> Any:
    """The PEFT model's `disable_adapter` context manager, or None without an adapter."""
    return getattr(lm.model, "disable_adapter", None)


@contextlib.contextmanager
def reference_logits_model(
    lm: LoadedModel, reference: LoadedModel | None, is_base: bool
) -> Iterator[LoadedModel]:
    """The `LoadedModel` whose logits are the base's, for the block's duration: `reference`
    when given, else `lm` with its PEFT adapter disabled, else (`is_base`) `lm` itself."""
    if reference is not None:
        check_same_tokenizer(lm, reference)
        yield reference
        return
    if is_base:
        yield lm
        return
    disable = _adapter_switch(lm)
    if disable is None:
        raise LensError(
            "Drift needs the base model's logits: this model has no adapter to disable "
            "(a full fine-tune), and no frozen base copy was given."
        )
    with disable():
        yield lm


# --------------------------------------------------------------------------------------------
# Scoring a drift task
# --------------------------------------------------------------------------------------------


@dataclass
class _Sequence:
    item: int
    enc: EncodedPair
    n_bytes: int | None


def _prompt_sequences(
    lm: LanguageModel,
    probe: Probe,
    answers: Sequence[Sequence[int] | None],
    prompts: Sequence[list[int]],
) -> list[_Sequence]:
    """Teacher-forcing inputs of a prompt probe (items without an answer left out)."""
    seqs = []
    for k, (ids, prompt) in enumerate(zip(answers, prompts, strict=True)):
        if ids:  # None: did not fit the context; []: the base answered nothing to measure
            seqs.append(_Sequence(k, EncodedPair(prompt + list(ids), len(prompt)), None))
    return seqs


def _text_sequences(lm: LanguageModel, probe: Probe) -> tuple[list[_Sequence], list[str]]:
    """Plain-text inputs of a passage probe: BOS (when the tokenizer has one) + the passage."""
    seqs, too_long = [], []
    bos = lm.tokenizer.bos_token_id
    for k, ex in enumerate(probe.items):
        ids = list(lm.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        head = [bos] if bos is not None else ids[:1]
        body = ids if bos is not None else ids[1:]
        if not body:
            continue
        if len(head) + len(body) > lm.max_length:
            too_long.append(ex.id)
            continue
        n_bytes = len(lm.tokenizer.decode(body).encode("utf-8"))
        seqs.append(_Sequence(k, EncodedPair(head + body, len(head)), n_bytes))
    return seqs, too_long


def _logits(lm: LoadedModel, encs: list[EncodedPair]) -> list[Any]:
    return lm.response_logits(encs)


def _pairwise(ref_logits: list[Any], tuned: list[Any], answers: list[Any]) -> list[dict[str, Any]]:
    """`token_drift` of each pair of a batch from both sides' full logits."""
    return [token_drift(r, t, a) for r, t, a in zip(ref_logits, tuned, answers, strict=True)]


def _batch_stats(
    lm: LoadedModel,
    reference: LoadedModel | None,
    is_base: bool,
    head: Any,
    encs: list[EncodedPair],
    answers: list[Any],
    keys: list[str],
    found: dict[str, Summary],
) -> tuple[list[dict[str, np.ndarray]], dict[str, Summary]]:
    """One batch's per-item `token_drift` statistics, and the base summaries it computed (added
    to `found` too). With `head` (see `core.eval.base_summary`) a round runs the tuned pass only,
    plus the base's pass where a summary is missing; without it, both passes as before."""
    if head is None:
        if is_base and reference is None:
            tuned = ref_logits = _logits(lm, encs)
        else:
            with reference_logits_model(lm, reference, is_base) as ref:
                ref_logits = _logits(ref, encs)
            tuned = _logits(lm, encs)
        return _pairwise(ref_logits, tuned, answers), {}
    fresh: dict[str, Summary] = {}

    def keep(logits: list[Any], hidden: list[Any] | None) -> None:
        if hidden is None:
            return
        for key, h, z, a in zip(keys, hidden, logits, answers, strict=True):
            if key not in found:
                fresh[key] = found[key] = summarise(head, h, z, a)

    if is_base:  # the base itself: drift 0 in one pass, and its summaries for later rounds
        logits, hidden = forward_with_hidden(lm, head, encs)
        keep(logits, hidden)
        return _pairwise(logits, logits, answers), fresh
    ref_logits = None
    if any(key not in found for key in keys):
        with reference_logits_model(lm, None, False):
            ref_logits, ref_hidden = forward_with_hidden(lm, head, encs)
        keep(ref_logits, ref_hidden)
    tuned, hidden = forward_with_hidden(lm, head, encs)
    if hidden is not None and all(key in found for key in keys):
        return [
            summary_drift(found[key], h, z, a)
            for key, h, z, a in zip(keys, hidden, tuned, answers, strict=True)
        ], fresh
    if ref_logits is None:
        with reference_logits_model(lm, None, False):
            ref_logits = _logits(lm, encs)
    return _pairwise(ref_logits, tuned, answers), fresh


def score_drift(
    lm: LoadedModel,
    probe: Probe,
    *,
    max_new_tokens: int,
    is_base: bool,
    reference: LoadedModel | None = None,
    batch_size: int = 8,
    answer_cache: ProbeAnswerCache | None = None,
    summary_cache: BaseSummaryCache | None = None,
    one_pass: bool = True,
    progress: ProgressFn | None = None,
    from_file: bool = False,
) -> tuple[dict[str, float | None], list[dict[str, Any]], list[str]]:
    """Drift of `lm` from the base model on `probe`: (metrics, per-item details, notes).

    `is_base` says `lm` is the base model itself (drift 0, one pass). `one_pass=False` runs the
    reference pass beside the tuned one even where the base's summaries would serve (the same
    numbers within 1e-6; for checks and benchmarks). `progress(done, total)` counts items. An
    item longer than the model's context is left out with a note (for a user's probe file that
    is an error naming it)."""
    import torch  # lazy: heavy

    notes: list[str] = []
    with torch.inference_mode(), reference_logits_model(lm, reference, is_base) as ref:
        if probe.plain_text:
            seqs, too_long = _text_sequences(lm, probe)
        else:
            encoded = [encode_prompt(lm.tokenizer, ex.prompt) for ex in probe.items]
            fits = [
                k for k, ids in enumerate(encoded) if len(ids) + max_new_tokens <= lm.max_length
            ]
            fitting = set(fits)
            too_long = [ex.id for k, ex in enumerate(probe.items) if k not in fitting]
            answered, generated = base_answers(
                ref,
                [probe.items[k].prompt for k in fits],
                max_new_tokens,
                batch_size=batch_size,
                cache=answer_cache,
            )
            answers: list[list[int] | None] = [None] * len(probe.items)
            for k, ids in zip(fits, answered, strict=True):
                answers[k] = ids
            seqs = _prompt_sequences(lm, probe, answers, encoded)
            if generated:
                notes.append(f"the base model answered {generated} probe prompt(s) now (cached)")
    if too_long:
        if from_file:
            raise LensError(
                f"Probe item '{too_long[0]}' (and {len(too_long) - 1} more) is longer than the "
                f"model's {lm.max_length}-token context with its {max_new_tokens}-token answer."
            )
        notes.append(f"{len(too_long)} probe item(s) longer than the model's context left out")
    if not seqs:
        raise LensError(f"Probe '{probe.name}' has no item that fits the model's context.")
    details: list[dict[str, Any]] = [{} for _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].enc.input_ids))
    # One pass a round where the base's side is summarised (`core.eval.base_summary`): a model
    # with an adapter over a plain output head. A frozen copy (full fine-tune) runs both passes.
    summarised = reference is None and (is_base or _adapter_switch(lm) is not None)
    head = plain_head(lm) if one_pass and summarised else None
    summaries: BaseSummaryCache | None = None
    keys: list[str] = []
    found: dict[str, Summary] = {}
    if head is not None:
        summaries = summary_cache if summary_cache is not None else BaseSummaryCache()
        model_key = summary_model_key(lm, head)
        keys = [BaseSummaryCache.key(model_key, seq.enc) for seq in seqs]
        found = summaries.get_many(keys)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            members = order[start : start + batch_size]
            encs = [seqs[i].enc for i in members]
            answers = [torch.tensor(enc.input_ids[enc.response_start :]) for enc in encs]
            batch_keys = [keys[i] for i in members] if keys else []
            per_item, fresh = _batch_stats(
                lm, reference, is_base, head, encs, answers, batch_keys, found
            )
            if summaries is not None and fresh:
                summaries.put_many(fresh)
            for i, item_stats in zip(members, per_item, strict=True):
                seq = seqs[i]
                answer = seq.enc.input_ids[seq.enc.response_start :]
                ex = probe.items[seq.item]
                details[i] = item_details(
                    ex.id, str(ex.meta.get("domain", probe.name)), answer, item_stats, seq.n_bytes
                )
            done += len(members)
            if progress:
                progress(done, len(seqs))
    return drift_metrics(details), details, notes


def drift_task(
    lm: LoadedModel,
    spec: Any,
    suite: Any,
    *,
    is_base: bool,
    reference: LoadedModel | None = None,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, float | None], list[dict[str, Any]], int, list[str]]:
    """A suite's drift spec: its probe loaded and scored (metrics, details, items, notes)."""
    probe = load_probe(spec.task, spec.split, spec.n, spec.seed)
    metrics, details, notes = score_drift(
        lm,
        probe,
        max_new_tokens=spec.max_new_tokens,
        is_base=is_base,
        reference=reference,
        batch_size=max(suite.batch_size, 8),
        answer_cache=ProbeAnswerCache(),
        progress=progress,
        from_file=spec.task.startswith(FILE_PREFIX),
    )
    return metrics, details, len(details), notes
