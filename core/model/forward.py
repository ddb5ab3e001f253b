"""Forward passes of a Hugging Face causal LM (`core.model.loading.LoadedModel`): the torch side of
`LanguageModel.score_pairs`, `LanguageModel.continuation_logprobs` and drift's full logits.

Scoring orchestration (length buckets, the score cache, records) lives in `core.scoring.score`;
this module only turns encoded pairs into numbers, batch by batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from core.model.encoding import EncodedPair
from core.model.interface import DEFAULT_TOKEN_BUDGET, PairScores, length_buckets

if TYPE_CHECKING:  # loading.py imports this module
    from core.model.loading import LoadedModel


# Rows of logits per pass. On CPU, 16 x vocab floats stay in cache: about 7x faster than one pass
# over a whole batch (docs/BENCHMARKS.md). A GPU wants large passes.
CPU_STATS_CHUNK = 16
GPU_STATS_CHUNK = 4096


def _token_stats(
    logits: torch.Tensor, targets: torch.Tensor, top_k: int
) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
    """Per-row log-prob of the target, its rank (1 = model's top choice) and the top-k.

    Works through the rows a few at a time: the full (rows x vocab) log-softmax and the
    comparison mask behind the rank would otherwise stream gigabytes through memory for a
    batch of a few thousand response tokens."""
    parts: list[tuple[torch.Tensor, ...]] = []
    n = CPU_STATS_CHUNK if logits.device.type == "cpu" else GPU_STATS_CHUNK
    for chunk, tgt in zip(logits.split(n), targets.split(n), strict=True):
        logprobs = torch.log_softmax(chunk.float(), dim=-1)
        target_lp = logprobs.gather(-1, tgt[:, None])[:, 0]
        rank = (logprobs > target_lp[:, None]).sum(-1, dtype=torch.int32) + 1
        top_lp, top_ids = logprobs.topk(top_k, dim=-1)
        parts.append((target_lp, rank, top_ids, top_lp))
    if not parts:
        return [], [], [], []
    target_lp, rank, top_ids, top_lp = (torch.cat(p) for p in zip(*parts, strict=True))
    return target_lp.tolist(), rank.tolist(), top_ids.tolist(), top_lp.tolist()


# Model classes whose forward does not take a boolean `logits_to_keep` mask (transformers'
# `slice_logits_to_keep`; custom code may only take an int). Found on first use, per class.
_NO_MASK_KEEP: set[type] = set()


def _response_logits(
    lm: LoadedModel, ids: torch.Tensor, attn: torch.Tensor, encs: list[EncodedPair]
) -> list[torch.Tensor]:
    """Per example, the logits of the positions that predict its response tokens.

    Only those positions go through the output projection: a boolean `logits_to_keep` mask
    picks them row by row (half the projection's rows of keeping the batch's common tail, on
    MBPP). Models that do not take a mask keep the tail from the earliest response start."""
    spans = [(e.response_start - 1, len(e.input_ids) - 1) for e in encs]
    kwargs = {
        "input_ids": ids.to(lm.device),
        "attention_mask": attn.to(lm.device),
        "use_cache": False,  # one forward pass: a KV cache would only be built and thrown away
    }
    model_type = type(lm.model)
    if model_type not in _NO_MASK_KEEP:
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        for row, (start, end) in enumerate(spans):
            keep[row, start:end] = True
        try:
            logits = lm.model(**kwargs, logits_to_keep=keep.to(lm.device)).logits
        except torch.OutOfMemoryError:
            raise
        except (TypeError, IndexError, RuntimeError):
            logits = None
        sizes = [end - start for start, end in spans]
        if logits is not None and logits.ndim == 2 and logits.shape[0] == sum(sizes):
            # Rows in mask order: example by example, positions ascending.
            return list(logits.split(sizes))
        _NO_MASK_KEEP.add(model_type)
    # With right padding every response position lies at or after the earliest response start.
    first = min(start for start, _ in spans)
    logits = lm.model(**kwargs, logits_to_keep=ids.shape[1] - first).logits
    return [logits[row, start - first : end - first] for row, (start, end) in enumerate(spans)]


def _padded(lm: LoadedModel, encs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of a batch."""
    width = max(len(e.input_ids) for e in encs)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(encs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(encs), width), dtype=torch.long)
    for row, enc in enumerate(encs):
        ids[row, : len(enc.input_ids)] = torch.tensor(enc.input_ids)
        attn[row, : len(enc.input_ids)] = 1
    return ids, attn


def response_logits(lm: LoadedModel, encs: Sequence[EncodedPair]) -> list[torch.Tensor]:
    """Per example of a batch, the logits of the positions that predict its response tokens
    (one right-padded forward pass; the projection only on those positions). Used by scoring
    and by drift from the base model (core/eval/drift.py)."""
    encs = list(encs)
    ids, attn = _padded(lm, encs)
    return _response_logits(lm, ids, attn, encs)


@torch.inference_mode()
def score_batch(lm: LoadedModel, encs: Sequence[EncodedPair], top_k: int) -> list[PairScores]:
    """`LoadedModel.score_pairs`: one right-padded forward pass over the batch, per pair its
    response tokens' log-probs, ranks and top-`top_k` (`_token_stats`)."""
    encs = list(encs)
    ids, attn = _padded(lm, encs)
    results = []
    for row, (enc, logits) in enumerate(
        zip(encs, _response_logits(lm, ids, attn, encs), strict=True)
    ):
        targets = ids[row, enc.response_start : len(enc.input_ids)].to(lm.device)
        results.append(PairScores(*_token_stats(logits, targets, top_k=top_k)))
    return results


# Model classes whose forward could not continue a copied KV cache (no cache or position ids,
# a cache that is not plain per-layer keys and values, an error): found on first use, per class.
_NO_SHARED_CONTEXT: set[type] = set()
# Cap on (choice rows x cached positions) of one shared-context batch, as a multiple of the token
# budget: every choice row holds its own copy of its context's keys and values.
SHARED_CACHE_FACTOR = 4


def _forward_params(model: torch.nn.Module) -> set[str]:
    """The named parameters of the causal LM's forward; a PEFT wrapper's base model is asked,
    since the wrapper takes everything as **kwargs and passes it through."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):  # no readable signature: take it as accepting nothing
        return set()


def _shared_batches(
    groups: list[list[int]], encs: Sequence[EncodedPair], token_budget: int, max_batch: int
) -> list[list[int]]:
    """Group contexts (indices into `groups`) into shared-context batches, longest first.

    A batch's cost is its padded tokens through the model (contexts, then the choices' tokens
    after the first) under `token_budget`, and its copied cache (choice rows x context width)
    under `SHARED_CACHE_FACTOR` x that: a long context with many choices still goes alone."""

    def widths(g: list[int]) -> tuple[int, int]:
        return encs[g[0]].response_start, max(encs[i].n_response - 1 for i in g)

    order = sorted(range(len(groups)), key=lambda j: tuple(-w for w in widths(groups[j])))
    batches: list[list[int]] = []
    current: list[int] = []
    ctx_w = cont_w = rows = 0
    for j in order:
        c, k = widths(groups[j])
        new_c, new_k, new_rows = max(ctx_w, c), max(cont_w, k), rows + len(groups[j])
        tokens = (len(current) + 1) * new_c + new_rows * new_k
        cached = new_rows * (new_c + new_k)
        too_big = tokens > token_budget or cached > SHARED_CACHE_FACTOR * token_budget
        if current and (too_big or len(current) >= max_batch):
            batches.append(current)
            current, new_c, new_k, new_rows = [], c, k, len(groups[j])
        current.append(j)
        ctx_w, cont_w, rows = new_c, new_k, new_rows
    if current:
        batches.append(current)
    return batches


# What one more forward pass costs, in padded tokens: on CPU a pass streams every weight
# through memory (SmolLM2-135M: ~130 ms for 8 tokens, ~2.5 ms a token after that, one thread),
# so a batch's choices are split by length only where that saves more padding than this. A GPU
# takes short passes for little more than one: split rarely.
CPU_PASS_TOKENS = 48
GPU_PASS_TOKENS = 1024


def _split_by_length(lengths: Sequence[int], pass_tokens: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) runs of `lengths` (longest first) that minimise padded tokens
    plus `pass_tokens` per run: one pass per run, each padded to its first (longest) row."""
    n = len(lengths)
    cost = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            c = cost[start] + pass_tokens + (end - start) * lengths[start]
            if c < cost[end]:
                cost[end], cut[end] = c, start
    runs = []
    end = n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def _shared_context_batch(
    lm: LoadedModel, encs: Sequence[EncodedPair], groups: list[list[int]], keep_param: bool
) -> list[tuple[int, float, bool]] | None:
    """(index, summed log-prob, greedy) of every member of `groups` (each a list of pairs with
    one context), each context run through the model once; None when the model's cache is not
    one this can copy and extend.

    Pass 1: the contexts, right-padded, build a KV cache; each context's last position gives the
    log-probs of its choices' first tokens. Then the choices' other tokens, longest first, in
    passes split by length (`_split_by_length`): each runs on a copy of its rows' context cache,
    right-padded, positions continuing after their own context, the mask covering the context's
    real tokens and the choice's; position j of a choice predicts its token j + 1. One-token
    choices need pass 1 only (MMLU's " A".." D")."""
    from transformers import DynamicCache  # lazy: heavy
    from transformers.cache_utils import DynamicLayer  # lazy: heavy

    pad = lm.tokenizer.pad_token_id or 0
    config = lm.model.config
    ctx_lens = [encs[g[0]].response_start for g in groups]
    width = max(ctx_lens)
    ids = torch.full((len(groups), width), pad, dtype=torch.long)
    attn = torch.zeros((len(groups), width), dtype=torch.long)
    for row, g in enumerate(groups):
        ids[row, : ctx_lens[row]] = torch.tensor(encs[g[0]].input_ids[: ctx_lens[row]])
        attn[row, : ctx_lens[row]] = 1
    cache = DynamicCache(config=config)
    first = min(ctx_lens) - 1  # every context's last position lies at or after this one
    extra = {"logits_to_keep": width - first} if keep_param else {}
    logits = lm.model(
        input_ids=ids.to(lm.device),
        attention_mask=attn.to(lm.device),
        position_ids=torch.arange(width).expand(len(groups), -1).to(lm.device),
        past_key_values=cache,
        use_cache=True,
        **extra,
    ).logits
    layers = getattr(cache, "layers", None)
    if not layers or any(
        type(layer) is not DynamicLayer or layer.get_seq_length() != width for layer in layers
    ):
        return None  # sliding-window, linear or shared layers: copying rows is not enough
    skipped = width - logits.shape[1]  # positions left out of the logits (0 without keep)
    last = torch.tensor([n - 1 - skipped for n in ctx_lens], device=logits.device)
    first_lp = torch.log_softmax(logits[torch.arange(len(groups)), last].float(), dim=-1)
    best = first_lp.max(dim=-1).values.tolist()
    out: dict[int, tuple[float, bool]] = {}
    rows: list[tuple[int, int]] = []  # (group row, pair index) of choices with 2+ tokens
    for row, g in enumerate(groups):
        tokens = torch.tensor([encs[i].input_ids[encs[i].response_start] for i in g])
        for i, lp in zip(g, first_lp[row, tokens.to(first_lp.device)].tolist(), strict=True):
            out[i] = (lp, lp >= best[row])
            if encs[i].n_response > 1:
                rows.append((row, i))
    rows.sort(key=lambda r: -encs[r[1]].n_response)
    lengths = [encs[i].n_response - 1 for _, i in rows]  # inputs: all tokens but the last
    pass_tokens = CPU_PASS_TOKENS if lm.device.type == "cpu" else GPU_PASS_TOKENS
    kv = [(layer.keys, layer.values) for layer in layers]
    for start, end in _split_by_length(lengths, pass_tokens) if rows else []:
        part, cont_w = rows[start:end], lengths[start]
        cids = torch.full((len(part), cont_w), pad, dtype=torch.long)
        cattn = torch.zeros((len(part), cont_w), dtype=torch.long)
        for r, (_, i) in enumerate(part):
            tail = encs[i].input_ids[encs[i].response_start : -1]
            cids[r, : len(tail)] = torch.tensor(tail)
            cattn[r, : len(tail)] = 1
        select = torch.tensor([row for row, _ in part])
        copy = DynamicCache(config=config)
        on_device = select.to(lm.device)
        for layer_idx, (keys, values) in enumerate(kv):
            copy.update(keys[on_device], values[on_device], layer_idx)
        starts = torch.tensor([ctx_lens[row] for row, _ in part])
        logits = lm.model(
            input_ids=cids.to(lm.device),
            attention_mask=torch.cat([attn[select], cattn], dim=1).to(lm.device),
            position_ids=(starts[:, None] + torch.arange(cont_w)).to(lm.device),
            past_key_values=copy,
            use_cache=True,
        ).logits
        sizes = lengths[start:end]
        kept = torch.cat([logits[r, :n] for r, n in enumerate(sizes)])
        targets = [tok for _, i in part for tok in encs[i].input_ids[encs[i].response_start + 1 :]]
        logprob, rank, _, _ = _token_stats(kept, torch.tensor(targets, device=kept.device), 1)
        at = 0
        for (_, i), n in zip(part, sizes, strict=True):
            lp, greedy = out[i]
            more, ranks = logprob[at : at + n], rank[at : at + n]
            out[i] = (lp + sum(more), greedy and all(r == 1 for r in ranks))
            at += n
    return [(i, lp, greedy) for i, (lp, greedy) in out.items()]


def _score_shared_contexts(
    lm: LoadedModel,
    encs: Sequence[EncodedPair],
    groups: list[list[int]],
    out: list[tuple[float, bool]],
    token_budget: int,
    max_batch: int,
) -> list[list[int]]:
    """Score `groups` (pairs sharing a context) with each context run once (see
    `_shared_context_batch`), writing into `out`; returns the groups left to score another way
    (all of them for a model whose forward cannot take a copied cache with position ids)."""
    model_type = type(lm.model)
    params = _forward_params(lm.model)
    if model_type in _NO_SHARED_CONTEXT or not {"past_key_values", "position_ids"} <= params:
        return groups
    keep_param = "logits_to_keep" in params
    batches = _shared_batches(groups, encs, token_budget, max_batch)
    for n, batch in enumerate(batches):
        try:
            scored = _shared_context_batch(lm, encs, [groups[j] for j in batch], keep_param)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, ValueError, IndexError, RuntimeError, AttributeError, ImportError):
            scored = None  # an older transformers or a model's own code: score the usual way
        if scored is None:
            _NO_SHARED_CONTEXT.add(model_type)
            return [groups[j] for b in batches[n:] for j in b]
        for i, lp, greedy in scored:
            out[i] = (lp, greedy)
    return []


@torch.inference_mode()
def continuation_logprobs(
    lm: LoadedModel,
    encs: Sequence[EncodedPair],
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_batch: int = 64,
    share_context: bool = True,
) -> list[tuple[float, bool]]:
    """(summed log-probability of each pair's response tokens, whether every one of them is the
    model's top choice), for ready-made pairs (e.g. `encode_plain_pair`): lm-evaluation-harness's
    loglikelihood.

    Pairs with the same context (a question's choices) run that context through the model once
    and every choice's tokens on a copy of its KV cache (`share_context`; ARC: about a third of
    the tokens of scoring each choice as a whole sequence). A lone pair, and every pair of a
    model whose forward cannot continue a copied cache, is scored as a full sequence, batched by
    length with only the response positions through the output projection, as `score_examples`
    does; False scores all pairs that way (the reference the shared path is tested against)."""
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encs)
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, enc in enumerate(encs):
        by_context.setdefault(tuple(enc.input_ids[: enc.response_start]), []).append(i)
    groups = list(by_context.values())
    if share_context:
        several = [g for g in groups if len(g) > 1]
        left = {
            g[0] for g in _score_shared_contexts(lm, encs, several, out, token_budget, max_batch)
        }
        # in input order, as without sharing: the same batches, the same numbers
        groups = [g for g in groups if len(g) == 1 or g[0] in left]
    # One-token continuations of the same context (MMLU's " A".." D") share one forward pass:
    # the context's last position gives every candidate's log-probability.
    shared: list[list[int]] = []
    rest: list[int] = []
    for g in groups:
        one = [i for i in g if encs[i].n_response == 1]
        if one:
            shared.append(one)
        rest += [i for i in g if encs[i].n_response != 1]
    heads = [encs[g[0]] for g in shared]
    for batch in length_buckets([len(h.input_ids) for h in heads], token_budget, max_batch):
        members = [heads[j] for j in batch]
        ids, attn = _padded(lm, members)
        for j, logits in zip(batch, _response_logits(lm, ids, attn, members), strict=True):
            logprobs = torch.log_softmax(logits[-1].float(), dim=-1)
            best = int(logprobs.argmax())
            for i in shared[j]:
                token = encs[i].input_ids[-1]
                out[i] = (float(logprobs[token]), token == best)
    lengths = [len(encs[i].input_ids) for i in rest]
    for batch in length_buckets(lengths, token_budget, max_batch):
        chosen = [rest[k] for k in batch]
        stats = score_batch(lm, [encs[i] for i in chosen], top_k=1)
        for i, (logprob, rank, _, _) in zip(chosen, stats, strict=True):
            out[i] = (float(sum(logprob)), all(r == 1 for r in rank))
    return out
