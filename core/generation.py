"""Batched response generation from chat-templated prompts (greedy or sampled).

Prompts are encoded with `core.encoding.encode_prompt`, the same prefix that scoring and
training put before a response, so a generated answer is later scored in exactly the context it
was generated in. Batches are left-padded and grouped by prompt length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from core.encoding import encode_prompt
from core.errors import LensError
from core.models import LoadedModel

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; `do_sample=False` is greedy (used for evaluation)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    num_return_sequences: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LensError("max_new_tokens must be at least 1.")
        if self.num_return_sequences < 1:
            raise LensError("num_return_sequences must be at least 1.")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise LensError("Sampling needs temperature > 0 and 0 < top_p <= 1.")
        if not self.do_sample and self.num_return_sequences > 1:
            raise LensError("Greedy decoding returns one sequence; enable sampling for several.")

    def to_dict(self) -> dict[str, object]:
        """Plain dict (for provenance records)."""
        return asdict(self)


@dataclass
class Generation:
    """One generated response and its token count (end-of-turn excluded)."""

    text: str
    n_tokens: int
    finished: bool  # False when it stopped at max_new_tokens


def _stop_ids(lm: LoadedModel) -> list[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if lm.tokenizer.eos_token_id is not None and lm.tokenizer.eos_token_id not in ids:
        ids.append(lm.tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_responses(
    lm: LoadedModel,
    prompts: Sequence[str],
    config: GenerationConfig | None = None,
    *,
    batch_size: int = 8,
    system: str | None = None,
    progress: ProgressFn | None = None,
) -> list[list[Generation]]:
    """Generate `config.num_return_sequences` responses per prompt, in input order."""
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
        if config.do_sample:
            torch.manual_seed(generator_seed + start)
        out = lm.model.generate(
            input_ids=ids.to(lm.device),
            attention_mask=attn.to(lm.device),
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            temperature=config.temperature if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None,
            top_k=None,
            num_return_sequences=config.num_return_sequences,
            eos_token_id=stop,
            pad_token_id=pad,
        )
        new = out[:, width:].tolist()
        for j, seq in enumerate(new):
            i = members[j // config.num_return_sequences]
            cut = next((k for k, t in enumerate(seq) if t in stop), None)
            tokens = seq if cut is None else seq[:cut]
            text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
            results[i].append(Generation(text=text, n_tokens=len(tokens), finished=cut is not None))
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return results
