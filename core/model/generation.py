"""Batched response generation from chat-templated prompts (greedy or sampled).

Prompts are encoded with `core.model.encoding.encode_prompt`, the same prefix that scoring and
training put before a response, so a generated answer is later scored in exactly the context it
was generated in. Batches are left-padded and grouped by prompt length.

Several samples per prompt (Self-Output) share one prompt prefill: the batch's prompts run
through the model once, their KV cache is copied N times, and `generate` continues from it, so
the prompt is not recomputed for every sample (docs/BENCHMARKS.md, "Data generation").

`stream_response` answers one prompt token by token (Explore's "generate the model's own
answer"): a callback gets the text after every token, a flag stops it early, and it runs with the
thread count measured fastest on a busy machine (`LIVE_THREADS`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from core.errors import LensError
from core.model.encoding import encode_prompt
from core.model.interface import Generation, GenerationConfig, ProgressFn  # re-exported
from core.model.loading import LoadedModel

THREADS_ENV = "PLENS_THREADS"


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count for this process and return the count in effect.

    `threads`, else `$PLENS_THREADS`, else torch's default is left alone. On a busy shared
    machine one thread per job can be several times faster than oversubscribed cores
    (docs/BENCHMARKS.md, "Data generation").
    """
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return torch.get_num_threads()
        try:
            threads = int(raw)
        except ValueError:
            raise LensError(f"{THREADS_ENV} must be an integer, got {raw!r}.") from None
    if threads < 1:
        raise LensError(f"threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _stop_ids(lm: LoadedModel) -> list[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None and lm.tokenizer.eos_token_id not in ids:
        ids.append(lm.tokenizer.eos_token_id)
    return ids


def _prefill_prompts(lm: LoadedModel, ids: torch.Tensor, attn: torch.Tensor) -> DynamicCache:
    """KV cache of the left-padded prompts without their last token (generate feeds that one).

    Positions count from each row's first real token, exactly as `generate` numbers them, so
    greedy output from this cache equals generating from scratch (tests/test_generation.py).
    """
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.model.config)
    extra = {}
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        extra["logits_to_keep"] = 1  # the prompt's logits are not needed, only its cache
    lm.model(
        input_ids=ids[:, :-1],
        attention_mask=attn[:, :-1],
        position_ids=positions[:, :-1],
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    return cache


@torch.inference_mode()
def generate_responses(
    lm: LoadedModel,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 8,
    system: str | None = None,
    progress: ProgressFn | None = None,
    share_prefill: bool = True,
) -> list[list[Generation]]:
    """Generate `config.num_return_sequences` responses per prompt, in input order.

    `batch_size` prompts (each with all its samples) are decoded together. With several samples
    per prompt, `share_prefill` runs each prompt through the model once and copies its KV cache;
    False lets `generate` expand the prompt first (same samples, slower; kept for the benchmark).
    """
    config = config or GenerationConfig()
    encoded = [encode_prompt(lm.tokenizer, p, system) for p in prompts]
    limit = lm.max_length - config.max_new_tokens
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
    if too_long:
        raise LensError(
            f"{len(too_long)} prompt(s) leave no room for {config.max_new_tokens} new tokens "
            f"in the model's {lm.max_length}-token context (first: #{too_long[0]})."
        )
    stop = _stop_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else stop[0]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Generation]] = [[] for _ in prompts]
    generator_seed = config.seed
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in members)
        ids = torch.full((len(members), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, i in enumerate(members):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            attn[row, width - n :] = 1
        ids, attn = ids.to(lm.device), attn.to(lm.device)
        settings = {
            "max_new_tokens": config.max_new_tokens,
            "do_sample": config.do_sample,
            "temperature": config.temperature if config.do_sample else None,
            "top_p": config.top_p if config.do_sample else None,
            "top_k": None,
            "eos_token_id": stop,
            "pad_token_id": pad,
        }
        copies = config.num_return_sequences
        if share_prefill and copies > 1 and width > 1:
            # prefill the prompts once and copy their cache: generate's own
            # num_return_sequences would run every prompt through the model `copies` times
            cache = _prefill_prompts(lm, ids, attn)
            cache.batch_repeat_interleave(copies)
            ids = ids.repeat_interleave(copies, dim=0)
            attn = attn.repeat_interleave(copies, dim=0)
            settings["past_key_values"] = cache
        else:
            settings["num_return_sequences"] = copies
        if config.do_sample:
            torch.manual_seed(generator_seed + start)
        out = lm.model.generate(input_ids=ids, attention_mask=attn, **settings)
        new = out[:, width:].tolist()
        for j, seq in enumerate(new):
            i = members[j // config.num_return_sequences]
            cut = next((k for k, t in enumerate(seq) if t in stop), None)
            tokens = seq if cut is None else seq[:cut]
            text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
            ids_out = seq if cut is None else seq[: cut + 1]
            results[i].append(
                Generation(
                    text=text, n_tokens=len(tokens), finished=cut is not None, token_ids=ids_out
                )
            )
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return results


#: Torch threads for one interactive answer (`stream_response`) unless $PLENS_THREADS says
#: otherwise: on the 2-core machine, busy with a training job, one thread was the faster
#: setting (docs/BENCHMARKS.md, "Live generation").
LIVE_THREADS = 1


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` torch CPU threads (None: $PLENS_THREADS, else
    `LIVE_THREADS`), then restore the previous count. The count is process-wide: other work
    in the process runs with it meanwhile."""
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        threads = int(raw) if raw.isdigit() and int(raw) > 0 else LIVE_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


#: `stream_response`'s callback: (the text so far, tokens so far), after every new token.
UpdateFn = Callable[[str, int], None]


class _TokenStreamer(BaseStreamer):
    """Receives `generate`'s tokens as they are chosen (the prompt first, which it skips),
    cuts at a stop token, and reports the decoded text so far."""

    def __init__(
        self,
        lm: LoadedModel,
        stop: Sequence[int],
        on_update: UpdateFn | None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.tokenizer, self.stop, self.on_update = lm.tokenizer, set(stop), on_update
        self.should_stop = should_stop
        self.ids: list[int] = []
        self.stopped_at: int | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate puts the prompt ids first
            self._prompt_seen = True
            return
        if self.should_stop is not None and self.should_stop():
            return  # a token chosen after the stop request: not part of the answer
        for token in value.reshape(-1).tolist():
            if self.stopped_at is not None:
                return
            self.ids.append(int(token))
            if token in self.stop:
                self.stopped_at = len(self.ids) - 1
                return
            if self.on_update is not None:
                self.on_update(self.text, len(self.ids))

    def end(self) -> None:
        """Nothing to flush: every token was reported as it came."""

    @property
    def text(self) -> str:
        tokens = self.ids if self.stopped_at is None else self.ids[: self.stopped_at]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


class _StopWhen(StoppingCriteria):
    """Stops generation as soon as `should_stop()` says so (a Stop button)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],),
            bool(self.should_stop()),
            dtype=torch.bool,
            device=input_ids.device,
        )


@torch.inference_mode()
def stream_response(
    lm: LoadedModel,
    prompt: str,
    config: GenerationConfig | None = None,
    *,
    system: str | None = None,
    on_update: UpdateFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int | None = None,
) -> Generation:
    """One response to `prompt`, token by token: `on_update(text so far, tokens so far)` after
    each new token, `should_stop()` checked at each (True ends it: the answer up to the request
    comes back, `finished` False). The same answer `generate_responses` gives for this prompt
    (greedy, or sampled with the same seed). Runs with `threads` torch threads (see
    `torch_threads`)."""
    config = config or GenerationConfig()
    if config.num_return_sequences != 1:
        raise LensError("A streamed answer is one sequence; use generate_responses for several.")
    ids = encode_prompt(lm.tokenizer, prompt, system)
    if len(ids) > lm.max_length - config.max_new_tokens:
        raise LensError(
            f"The prompt leaves no room for {config.max_new_tokens} new tokens in the model's "
            f"{lm.max_length}-token context."
        )
    stop = _stop_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else stop[0]
    streamer = _TokenStreamer(lm, stop, on_update, should_stop)
    extra = {}
    if should_stop is not None:
        extra["stopping_criteria"] = StoppingCriteriaList([_StopWhen(should_stop)])
    input_ids = torch.tensor([ids], dtype=torch.long, device=lm.device)
    with torch_threads(threads):
        if config.do_sample:
            torch.manual_seed(config.seed)  # what generate_responses seeds its first batch with
        lm.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None,
            top_k=None,
            eos_token_id=stop,
            pad_token_id=pad,
            streamer=streamer,
            **extra,
        )
    cut = streamer.stopped_at
    tokens = streamer.ids if cut is None else streamer.ids[:cut]
    return Generation(
        text=streamer.text,
        n_tokens=len(tokens),
        finished=cut is not None,
        token_ids=streamer.ids if cut is None else streamer.ids[: cut + 1],
    )


def encode_settings(config: GenerationConfig) -> str:
    """?gen= value: "greedy-256" or "sample-256-0.7-0.95-0"."""
    if not config.do_sample:
        return f"greedy-{config.max_new_tokens}"
    return f"sample-{config.max_new_tokens}-{config.temperature:g}-{config.top_p:g}-{config.seed}"


def decode_settings(value: str | None) -> GenerationConfig:
    """Inverse of `encode_settings`; raises LensError for a malformed value."""
    if not value:
        return GenerationConfig()
    parts = value.split("-")
    try:
        if parts[0] == "greedy" and len(parts) == 2:
            return GenerationConfig(max_new_tokens=int(parts[1]))
        if parts[0] == "sample" and len(parts) == 5:
            return GenerationConfig(
                max_new_tokens=int(parts[1]),
                do_sample=True,
                temperature=float(parts[2]),
                top_p=float(parts[3]),
                seed=int(parts[4]),
            )
    except ValueError:
        pass
    raise LensError(f"Generation settings '{value}' in the URL are not valid; using the defaults.")
